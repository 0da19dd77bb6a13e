"""Python client SDK for SecureCollab (trio).

- `api.Client`: the high-level client (log in, device key, send/receive/history of
  end-to-end encrypted text, channels); start here.
- `e2ee`: the `securecollab-e2ee-v1` envelope (spec: `ENVELOPE.md` beside this file;
  test vectors: `tests/vectors/e2ee.json`).
- `keystore`: the device key file (0600, optionally passphrase-encrypted).
- `rest.RestClient`: every REST route as a typed async method, token refresh.
- `stomp_ws`: STOMP 1.2 over WebSocket with receipts, heart-beats, reconnect.

The command line (`securecollab login|send|listen|history|channel`) is
`securecollab/cli_client.py`.
"""

from securecollab.client.api import (
    Client,
    NoDeviceKey,
    ReceivedMessage,
    SentMessage,
    UndecryptableMessage,
    UnknownUser,
)

__all__ = [
    "Client",
    "NoDeviceKey",
    "ReceivedMessage",
    "SentMessage",
    "UndecryptableMessage",
    "UnknownUser",
]
