"""Log records as text or as one JSON object per line."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

import orjson

_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Format each record as a JSON object with time, level, logger, message and extras.

    Fields passed with ``extra=`` become keys of their own, so a log pipeline
    can filter lifecycle events without parsing the message text.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of JSON."""
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class RepeatLimit(logging.Filter):
    """Pass a message of one logger at most once per ``interval_s``; count the rest.

    A message is its logger and its unformatted text, so "Unable connect to
    node with id %s" of one logger is one message whatever the node. The
    next one that passes says how many were held back.

    >>> limit = RepeatLimit(interval_s=60.0, clock=lambda: 0.0)
    >>> record = logging.makeLogRecord({"name": "aiokafka", "msg": "lost %s", "args": (1,)})
    >>> [limit.filter(record), limit.filter(record)]
    [True, False]
    """

    def __init__(self, interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        # Per message: when it last passed, and how many were held back since.
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Return whether ``record`` is logged; add the count held back to one that is."""
        key = (record.name, str(record.msg))
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if len(self._seen) > 1000:
            # Messages with a text of their own each time would fill it.
            self._seen.clear()
        self._seen[key] = (now, 0)
        if last is not None and last[1]:
            record.msg = (
                f"{record.msg} ({last[1]} more like this in the last {now - last[0]:.0f} s)"
            )
        return True


def configure_logging(level: str, fmt: str = "text") -> None:
    """Send log records to stderr at ``level``, as ``text`` or ``json`` lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # Faust's timers log each late wake-up at INFO, and the worker's batches
    # make them wake late by design, so those lines show only at DEBUG. A
    # level above WARNING applies to them as to every other logger.
    timers = logging.getLogger("mode.timers")
    timers.setLevel(
        logging.DEBUG if root.level <= logging.DEBUG else max(root.level, logging.WARNING)
    )
    # While a broker is away, aiokafka logs each failed reconnect, which
    # comes to thousands of lines a second.
    handler.addFilter(_AIOKAFKA_LIMIT)


class _LibraryLimit(RepeatLimit):
    """Limit the repeats of aiokafka's messages only."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Return whether ``record`` is logged."""
        if not record.name.startswith("aiokafka"):
            return True
        return super().filter(record)


_AIOKAFKA_LIMIT = _LibraryLimit()
