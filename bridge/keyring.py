"""The data directory's master secret and what is derived from it: a sealing key for private keys
kept at rest and the signing key of user access tokens. The secret file is created once, mode 0600."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret)


class Keyring:
    def __init__(self, secret: bytes) -> None:
        self._seal = AESGCM(_derive(secret, b"thingbridge seal v1"))
        self.token_key = _derive(secret, b"thingbridge access token v1")

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Keyring:
        path = data_dir / "secret.key"
        data_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(32))
        return cls(path.read_bytes())

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        """AES-GCM with the record id as associated data, so a sealed value cannot be moved to another row."""
        nonce = os.urandom(12)
        return nonce + self._seal.encrypt(nonce, plaintext, context)

    def open(self, sealed: bytes, context: bytes) -> bytes:
        return self._seal.decrypt(sealed[:12], sealed[12:], context)
