"""Per-user token buckets on event time."""

from __future__ import annotations


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
