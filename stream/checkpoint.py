"""Atomic, verified checkpoints of the worker's state.

A checkpoint file is ``FRCK`` + format version (1 byte) + payload length
(8 bytes, big-endian) + HMAC-SHA256 of the payload (32 bytes) + the payload,
a pickle of the state. It is written to a temporary file, flushed to disk and
renamed into place, so a reader sees a whole file or none. The HMAC, keyed
from the pseudonym key, detects a torn or altered file before anything is
unpickled. Such a file is reported and the previous checkpoint is used.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MAGIC = b"FRCK"
VERSION = 1
_HEADER = struct.Struct(">4sBQ32s")
_NAME = re.compile(r"^checkpoint-(\d{20})\.bin$")
_SET_ASIDE = re.compile(r"^checkpoint-(\d{20})\.bin\.invalid$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or fails its integrity check."""


class CheckpointFormatError(RuntimeError):
    """A checkpoint passes its integrity check, but this version cannot load its state.

    The file is intact, so the worker stops instead of falling back to an
    older file or to an empty state, either of which would drop the file's
    state without a word.
    """


def format_error(path: Path, exc: Exception) -> CheckpointFormatError:
    """Return the error for checkpoint ``path`` whose state failed to load with ``exc``."""
    msg = (
        f"checkpoint {path} passes its integrity check but this version of fusionrec "
        f"cannot load it ({type(exc).__name__}: {exc}). Start the version that wrote it, "
        f"or move the checkpoint files out of {path.parent} to start from an empty state"
    )
    return CheckpointFormatError(msg)


@dataclass(frozen=True)
class CheckpointInfo:
    """Path, sequence number, size and write time of one checkpoint."""

    path: Path
    sequence: int
    size_bytes: int
    seconds: float


class CheckpointStore:
    """Write and restore checkpoints in one folder, keeping the newest ``keep``."""

    def __init__(self, folder: Path, key: bytes, keep: int = 3) -> None:
        self.folder = folder
        self._key = key
        self.keep = keep

    def paths(self) -> list[tuple[int, Path]]:
        """Return the checkpoint files, newest first, with their sequence numbers."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found, reverse=True)

    def set_aside(self) -> list[Path]:
        """Return the invalid checkpoint files that `restore` renamed."""
        if not self.folder.is_dir():
            return []
        return sorted(path for path in self.folder.iterdir() if _SET_ASIDE.match(path.name))

    def write(self, state: dict[str, Any]) -> CheckpointInfo:
        """Write ``state`` as the next checkpoint and delete the oldest beyond ``keep``."""
        started = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = self.paths()
        sequence = existing[0][0] + 1 if existing else 1
        payload = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        digest = hmac.digest(self._key, payload, hashlib.sha256)
        header = _HEADER.pack(MAGIC, VERSION, len(payload), digest)

        final = self.folder / f"checkpoint-{sequence:020d}.bin"
        temporary = final.with_suffix(".tmp")
        # Owner-only, like the pseudonym key, because the state contains pseudonymized
        # histories. A file left by a crash could have other permissions.
        temporary.unlink(missing_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(header)
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
        except BaseException:
            # A partial file on a full disk would keep the space that the
            # next try needs.
            temporary.unlink(missing_ok=True)
            raise
        _fsync_folder(self.folder)

        for _, old in existing[self.keep - 1 :]:
            old.unlink(missing_ok=True)
        info = CheckpointInfo(final, sequence, len(header) + len(payload), 0.0)
        return CheckpointInfo(info.path, sequence, info.size_bytes, time.perf_counter() - started)

    def read(self, path: Path) -> dict[str, Any]:
        """Read and verify one checkpoint file, or raise `CheckpointError`."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            msg = f"checkpoint {path} cannot be read: {exc}"
            raise CheckpointError(msg) from exc
        if len(data) < _HEADER.size:
            msg = f"checkpoint {path} is {len(data)} bytes, shorter than its header"
            raise CheckpointError(msg)
        magic, version, length, digest = _HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            msg = (
                f"checkpoint {path} has header {magic!r} v{version}; expected {MAGIC!r} v{VERSION}"
            )
            raise CheckpointError(msg)
        payload = data[_HEADER.size :]
        if len(payload) != length:
            msg = f"checkpoint {path} holds {len(payload)} payload bytes; its header says {length}"
            raise CheckpointError(msg)
        if not hmac.compare_digest(digest, hmac.digest(self._key, payload, hashlib.sha256)):
            msg = f"checkpoint {path} fails its integrity check (altered, or another key)"
            raise CheckpointError(msg)
        try:
            state: dict[str, Any] = pickle.loads(payload)  # noqa: S301 - verified by HMAC above
        except Exception as exc:  # noqa: BLE001 - any failure here is a format this version lacks
            raise format_error(path, exc) from exc
        return state

    def restore(self) -> tuple[dict[str, Any], Path] | None:
        """Return the newest valid checkpoint and its path, setting invalid ones aside.

        An invalid file is renamed with the suffix ``.invalid``, where it is
        kept for a look but no longer counts among the checkpoints kept:
        otherwise an invalid file numbered above the valid ones would outlive
        them. A valid file that this version cannot load raises
        `CheckpointFormatError`.
        """
        for _, path in self.paths():
            try:
                state = self.read(path)
            except CheckpointError as exc:
                aside = path.with_name(f"{path.name}.invalid")
                try:
                    path.rename(aside)
                except OSError as rename_error:
                    logger.error("skipping invalid checkpoint: %s (%r)", exc, rename_error)
                else:
                    logger.error("skipping invalid checkpoint, renamed to %s: %s", aside.name, exc)
                continue
            return state, path
        return None


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
