"""Token buckets on event time, per user and per user-item pair."""

from __future__ import annotations

from collections import OrderedDict


class UserRateLimiter:
    """Limit each user to a sustained rate with a burst, measured on event time.

    Event time rather than arrival time, so that a replay at full speed limits
    the same events as live traffic did. An event older than the user's last
    one refills nothing.

    >>> limiter = UserRateLimiter(rate_per_s=1.0, burst=2.0)
    >>> [limiter.allow("u", 0) for _ in range(3)]
    [True, True, False]
    >>> limiter.allow("u", 1000)
    True
    """

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_ms = rate_per_s / 1000.0
        self.burst = burst
        self._buckets: dict[str, tuple[float, int]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, user: str, timestamp_ms: int) -> bool:
        """Take one token of ``user`` at ``timestamp_ms``; return False when none is left."""
        state = self._buckets.get(user)
        if state is None:
            tokens, last_ms = self.burst, timestamp_ms
        else:
            tokens, last_ms = state
            if timestamp_ms > last_ms:
                tokens = min(self.burst, tokens + (timestamp_ms - last_ms) * self.rate_per_ms)
                last_ms = timestamp_ms
        if tokens < 1.0:
            self._buckets[user] = (tokens, last_ms)
            return False
        self._buckets[user] = (tokens - 1.0, last_ms)
        return True

    def users(self) -> set[str]:
        """Return every user with a bucket."""
        return set(self._buckets)

    def forget(self, user: str) -> None:
        """Drop the bucket of ``user``."""
        self._buckets.pop(user, None)

    def sweep(self, now_ms: int) -> int:
        """Drop buckets that would be full again at ``now_ms``; return how many."""
        refill_ms = self.burst / self.rate_per_ms
        stale = [u for u, (_, last) in self._buckets.items() if now_ms - last >= refill_ms]
        for user in stale:
            del self._buckets[user]
        return len(stale)


class PairRateLimiter:
    """Limit how often one user may repeat one item, with memory for ``max_pairs`` pairs.

    The per-user limit must let a whole basket through at once, so a flood
    on a single item would still move that item's popularity; this second
    limit caps repeats of the same item. Pairs are kept in least-recently-used
    order, and the oldest is dropped beyond ``max_pairs``, which forgets only
    pairs whose bucket has long been full again.

    >>> limiter = PairRateLimiter(rate_per_s=0.1, burst=2.0, max_pairs=10)
    >>> [limiter.allow("u", "i", 0) for _ in range(3)], limiter.allow("u", "j", 0)
    ([True, True, False], True)
    """

    def __init__(self, rate_per_s: float, burst: float, max_pairs: int) -> None:
        self.rate_per_ms = rate_per_s / 1000.0
        self.burst = burst
        self.max_pairs = max_pairs
        self._buckets: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, user: str, item: str, timestamp_ms: int) -> bool:
        """Take one token of the pair at ``timestamp_ms``; return False when none is left."""
        pair = (user, item)
        buckets = self._buckets
        state = buckets.get(pair)
        if state is None:
            tokens, last_ms = self.burst, timestamp_ms
            if len(buckets) >= self.max_pairs:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(pair)
            tokens, last_ms = state
            if timestamp_ms > last_ms:
                tokens = min(self.burst, tokens + (timestamp_ms - last_ms) * self.rate_per_ms)
                last_ms = timestamp_ms
        if tokens < 1.0:
            buckets[pair] = (tokens, last_ms)
            return False
        buckets[pair] = (tokens - 1.0, last_ms)
        return True

    def users(self) -> set[str]:
        """Return every user with a bucket."""
        return {user for user, _ in self._buckets}

    def forget(self, user: str) -> None:
        """Drop every bucket of ``user``."""
        for pair in [pair for pair in self._buckets if pair[0] == user]:
            del self._buckets[pair]
