"""Python client SDK: E2EE envelope (`e2ee`), device key file (`keystore`), REST client (`rest`).

The envelope format is specified in `ENVELOPE.md` beside this file. The STOMP-over-
WebSocket half of the client comes with the broker.
"""
