"""Pseudonymize user ids with a keyed HMAC.

A pseudonym replaces the shop's user id in everything that rests or is
reported: checkpoints, logs, metric labels and dead-letter records. The key
never appears in a log line. Without it, a pseudonym cannot be linked back
to a user id; with it, only by hashing candidate ids.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections import OrderedDict
from pathlib import Path

from stream.settings import Settings, SettingsError

logger = logging.getLogger(__name__)

KEY_BYTES = 32
MIN_KEY_BYTES = 16
PSEUDONYM_HEX_CHARS = 32


class Pseudonymizer:
    """Map user ids to stable 128-bit pseudonyms, written as 32 hex characters.

    >>> p = Pseudonymizer(b"k" * 32)
    >>> p("alice") == p("alice"), p("alice") == p("Alice"), len(p("alice"))
    (True, False, 32)
    """

    __slots__ = ("_cache", "_cache_size", "_key")

    def __init__(self, key: bytes, cache_size: int = 1 << 18) -> None:
        if len(key) < MIN_KEY_BYTES:
            msg = f"pseudonym key is {len(key)} bytes; expected at least {MIN_KEY_BYTES}"
            raise SettingsError(msg)
        self._key = key
        # Active users send many events, so recent pseudonyms are kept in
        # memory (never on disk) instead of hashing every event again.
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._cache_size = cache_size

    def __call__(self, user_id: str) -> str:
        """Return the pseudonym of ``user_id``."""
        pseudonym = self._cache.get(user_id)
        if pseudonym is None:
            digest = hmac.digest(self._key, user_id.encode("utf-8", "surrogatepass"), "sha256")
            pseudonym = digest[: PSEUDONYM_HEX_CHARS // 2].hex()
            if len(self._cache) >= self._cache_size:
                self._cache.popitem(last=False)
            self._cache[user_id] = pseudonym
        return pseudonym

    def discard(self, user_id: str) -> None:
        """Drop ``user_id`` from the in-memory cache, as a forget request needs."""
        self._cache.pop(user_id, None)

    def __getstate__(self) -> bytes:
        return self._key

    def __setstate__(self, key: bytes) -> None:
        self.__init__(key)  # type: ignore[misc]

    def derive_key(self, purpose: str) -> bytes:
        """Derive a separate key for ``purpose`` (such as checkpoint integrity)."""
        return hmac.digest(self._key, b"fusionrec:" + purpose.encode(), hashlib.sha256)

    def __repr__(self) -> str:
        return "Pseudonymizer(key=***)"


class Sealer:
    """Encrypt and authenticate small payloads with AES-256-GCM.

    Checkpoints use it for the Redis keys of lists still to be written,
    because those keys may contain the shop's user ids.

    >>> sealer = Sealer(b"k" * 32)
    >>> sealer.open(sealer.seal(b"recs:user:alice"))
    b'recs:user:alice'
    """

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key[:32])

    def seal(self, data: bytes) -> bytes:
        """Return a random nonce followed by the ciphertext and tag of ``data``."""
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, data, None)

    def open(self, sealed: bytes) -> bytes:
        """Return the plaintext of `seal` output; raise ``InvalidTag`` when altered."""
        return self._aead.decrypt(sealed[:12], sealed[12:], None)

    def __repr__(self) -> str:
        return "Sealer(key=***)"


def load_pseudonymizer(settings: Settings, *, create: bool = False) -> Pseudonymizer:
    """Read the pseudonym key from the environment or the key file.

    The key comes from ``FUSIONREC_PSEUDONYM_KEY`` (hex, or any text of 16
    or more bytes), else from ``FUSIONREC_PSEUDONYM_KEY_FILE``, else from
    ``pseudonym.key`` in the data folder. With ``create``, which only the
    worker sets, a missing ``pseudonym.key`` is created with a random key and
    mode 0600. Tools that only read, such as ``fusionrec recs``, raise
    `SettingsError` instead, because a new key would match no stored
    pseudonym. A lost key makes every pseudonym new, so back up that file
    with the checkpoints.
    """
    if settings.pseudonym_key:
        key = _key_bytes(settings.pseudonym_key)
        if len(key) < MIN_KEY_BYTES:
            msg = f"FUSIONREC_PSEUDONYM_KEY is {len(key)} bytes; {_KEY_FILE_EXPECTED}"
            raise SettingsError(msg)
        return Pseudonymizer(key)
    path = Path(settings.pseudonym_key_file or settings.data_path / "pseudonym.key")
    if path.exists():
        return _read_key_file(path)
    if settings.pseudonym_key_file:
        msg = f"pseudonym key file {path} does not exist; create it or unset the variable"
        raise SettingsError(msg)
    if not create:
        msg = (
            f"pseudonym key file {path} does not exist. The worker creates it on its first "
            "start, so run this command with the worker's FUSIONREC_DATA_DIR, or set "
            "FUSIONREC_PSEUDONYM_KEY or FUSIONREC_PSEUDONYM_KEY_FILE to the worker's key"
        )
        raise SettingsError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    logger.info("created a new pseudonym key file at %s", path)
    return Pseudonymizer(bytes.fromhex(key))


_KEY_FILE_EXPECTED = (
    f"expected {2 * KEY_BYTES} hex characters, such as the output of "
    f"`openssl rand -hex {KEY_BYTES}`, or other UTF-8 text of 16 bytes or more"
)


def _read_key_file(path: Path) -> Pseudonymizer:
    # The messages never quote the file's content, because it is the secret.
    try:
        text = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        msg = f"pseudonym key file {path} is not UTF-8 text; {_KEY_FILE_EXPECTED}"
        raise SettingsError(msg) from exc
    except OSError as exc:
        msg = f"cannot read pseudonym key file {path}: {exc.strerror or exc}"
        raise SettingsError(msg) from exc
    key = _key_bytes(text)
    if len(key) < MIN_KEY_BYTES:
        msg = f"pseudonym key in {path} is {len(key)} bytes; {_KEY_FILE_EXPECTED}"
        raise SettingsError(msg)
    return Pseudonymizer(key)


def _key_bytes(text: str) -> bytes:
    """Return the key that ``text`` gives: its hex digits when they make a key, else its bytes.

    Text such as "12345678901234567890" is also valid hex, but too short a
    key as hex, so it is taken as the 20 bytes of text that it is.
    """
    try:
        key = bytes.fromhex(text)
    except ValueError:
        return text.encode()
    return key if len(key) >= MIN_KEY_BYTES else text.encode()
