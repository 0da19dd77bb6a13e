"""SecureCollab: end-to-end-encrypted team chat server with an embedded STOMP 1.2 broker."""

__version__ = "0.1.0"
