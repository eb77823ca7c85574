"""A bounded window of event ids that have been applied."""

from __future__ import annotations

import hashlib
from collections import deque


class DedupWindow:
    """Remember event ids for a span of event time, up to a maximum count.

    An id is kept until either the newest event time seen is more than
    ``window_ms`` past its event, or ``max_entries`` newer ids push it out,
    whichever comes first. Ids are stored as 64-bit BLAKE2b hashes: at two
    million entries the chance that any new id collides with a stored one is
    about one in ten million, and a collision drops that one event.

    >>> window = DedupWindow(window_ms=1000, max_entries=10)
    >>> window.add("e1", "u", 0), window.add("e1", "u", 10), window.add("e2", "u", 10)
    (True, False, True)
    >>> window.add("e3", "u", 5000), "e1" in window
    (True, False)
    """

    def __init__(self, window_ms: int, max_entries: int) -> None:
        self.window_ms = window_ms
        self.max_entries = max_entries
        self._times: dict[int, int] = {}
        self._owners: dict[int, str] = {}
        self._order: deque[int] = deque()
        self._newest_ms = 0

    def __len__(self) -> int:
        return len(self._times)

    def __contains__(self, event_id: str) -> bool:
        return _hash(event_id) in self._times

    def add(self, event_id: str, owner: str, timestamp_ms: int) -> bool:
        """Record ``event_id``; return False when it was already in the window."""
        key = _hash(event_id)
        if key in self._times:
            return False
        self._times[key] = timestamp_ms
        self._owners[key] = owner
        self._order.append(key)
        if timestamp_ms > self._newest_ms:
            self._newest_ms = timestamp_ms
        self._evict()
        return True

    def resize(self, window_ms: int, max_entries: int) -> None:
        """Replace the span and the maximum count, dropping the ids outside them now."""
        self.window_ms = window_ms
        self.max_entries = max_entries
        self._evict()

    def owners(self) -> set[str]:
        """Return every owner with an id in the window."""
        return set(self._owners.values())

    def forget_owner(self, owner: str) -> int:
        """Remove every id recorded for ``owner``; return how many were removed."""
        return self.forget_owners({owner})

    def forget_owners(self, owners: set[str]) -> int:
        """Remove every id recorded for any of ``owners`` in one pass; return how many."""
        doomed = [key for key, who in self._owners.items() if who in owners]
        for key in doomed:
            del self._times[key]
            del self._owners[key]
        if doomed:
            removed = set(doomed)
            self._order = deque(key for key in self._order if key not in removed)
        return len(doomed)

    def _evict(self) -> None:
        horizon = self._newest_ms - self.window_ms
        order, times = self._order, self._times
        while order and (len(order) > self.max_entries or times[order[0]] < horizon):
            key = order.popleft()
            del times[key]
            del self._owners[key]


def _hash(event_id: str) -> int:
    digest = hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")
