"""Rate limits on event time, per user and per user-item pair.

Events of one user arrive on three topics, and Kafka orders them only within
a topic, so a limit must not depend on the order in which they arrive. A
token bucket does, because an older event refills nothing: in a test with
the synthetic sample consumed in chunks of its partitions, buckets rejected
up to 59 valid repeats that time order let through. Each budget here counts
the events in its current span of event time instead: ``n`` events spanning
``t`` seconds are allowed while ``n <= burst + rate * t``, a bound that
holds whatever the order (which of the events are the rejected ones can
still depend on it). A span starts again once a new event comes later than
a full refill (``burst / rate``) after the newest one seen, so a quiet
period does not bank an unbounded allowance.

A late event stretches the span back however old it is. A replay at full
speed can deliver one topic hours of event time ahead of another, and a
limit on how far back the span may reach rejected valid events of the
synthetic sample in that test too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, MutableMapping

# A budget: events counted, and the first and last event time of its span, in ms.
Budget = tuple[int, int, int]


class _Budgets:
    """Event-time budgets by key."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_ms = rate_per_s / 1000.0
        self.burst = burst
        self.refill_ms = burst / self.rate_per_ms

    def take(self, budgets: MutableMapping[Hashable, Budget], key: Hashable, stamp: int) -> bool:
        state = budgets.get(key)
        # A budget of another shape, from a state saved by other code, starts afresh.
        if state is None or len(state) != 3 or stamp > state[2] + self.refill_ms:
            count, first, last = 0, stamp, stamp
        else:
            count, first, last = state
            # NOTE: a producer that stamps one event a day back therefore
            # widens the allowance of its span by a day of the sustained rate.
            first = min(first, stamp)
            last = max(last, stamp)
        allowed = count + 1 <= self.burst + (last - first) * self.rate_per_ms
        budgets[key] = (count + 1 if allowed else count, first, last)
        return allowed


class UserRateLimiter:
    """Limit each user to a sustained rate with a burst, measured on event time.

    Event time rather than arrival time, so that a replay at full speed
    limits the same events as live traffic did.

    >>> limiter = UserRateLimiter(rate_per_s=1.0, burst=2.0)
    >>> [limiter.allow("u", 0) for _ in range(3)]
    [True, True, False]
    >>> limiter.allow("u", 1000)
    True
    """

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self._budget = _Budgets(rate_per_s, burst)
        self._state: dict[Hashable, Budget] = {}
        # The newest event time of any user, and its value when each user
        # last sent an event, so that a sweep spares users still sending.
        self._newest_ms = 0
        self._touched: dict[Hashable, int] = {}

    def __setstate__(self, state: dict[str, object]) -> None:
        state.setdefault("_newest_ms", 0)
        state.setdefault("_touched", {})
        self.__dict__.update(state)

    def __len__(self) -> int:
        return len(self._state)

    def allow(self, user: str, timestamp_ms: int) -> bool:
        """Count one event of ``user`` at ``timestamp_ms``; return False when over budget."""
        self._newest_ms = max(self._newest_ms, timestamp_ms)
        self._touched[user] = self._newest_ms
        return self._budget.take(self._state, user, timestamp_ms)

    def set_limits(self, rate_per_s: float, burst: float) -> None:
        """Replace the rate and burst, keeping the budgets counted so far."""
        self._budget = _Budgets(rate_per_s, burst)

    def users(self) -> set[str]:
        """Return every user with a budget."""
        return {str(user) for user in self._state}

    def forget(self, user: str) -> None:
        """Drop the budget of ``user``."""
        self._state.pop(user, None)
        self._touched.pop(user, None)

    def sweep(self, now_ms: int) -> int:
        """Drop budgets whose span would start again at ``now_ms``; return how many.

        A budget goes only when the user has sent nothing for a full refill,
        measured on the newest event time of all users. Its own event time
        would not do: a bot that stamps every event an hour back would get a
        fresh burst at each sweep.
        """
        refill = self._budget.refill_ms
        touched = self._touched
        stale = [
            user
            for user, state in self._state.items()
            if now_ms > max(int(state[-1]), touched.get(user, 0)) + refill
        ]
        for user in stale:
            del self._state[user]
            touched.pop(user, None)
        return len(stale)


class PairRateLimiter:
    """Limit how often one user may repeat one item, with memory for ``max_pairs`` pairs.

    The per-user limit must let a whole basket through at once, so a flood
    on a single item would still move that item's popularity. This second
    limit caps repeats of the same item. Pairs are kept in least-recently-used
    order, and the oldest is dropped beyond ``max_pairs``.

    >>> limiter = PairRateLimiter(rate_per_s=0.1, burst=2.0, max_pairs=10)
    >>> [limiter.allow("u", "i", 0) for _ in range(3)], limiter.allow("u", "j", 0)
    ([True, True, False], True)
    """

    def __init__(self, rate_per_s: float, burst: float, max_pairs: int) -> None:
        self._budget = _Budgets(rate_per_s, burst)
        self.max_pairs = max_pairs
        self._state: OrderedDict[Hashable, Budget] = OrderedDict()

    def __len__(self) -> int:
        return len(self._state)

    def set_limits(self, rate_per_s: float, burst: float, max_pairs: int) -> None:
        """Replace the rate, burst and pair limit, dropping the oldest pairs beyond it."""
        self._budget = _Budgets(rate_per_s, burst)
        self.max_pairs = max_pairs
        while len(self._state) > max_pairs:
            self._state.popitem(last=False)

    def allow(self, user: str, item: str, timestamp_ms: int) -> bool:
        """Count one event of the pair at ``timestamp_ms``; return False when over budget."""
        pair = (user, item)
        state = self._state
        if pair in state:
            state.move_to_end(pair)
        elif len(state) >= self.max_pairs:
            state.popitem(last=False)
        return self._budget.take(state, pair, timestamp_ms)

    def users(self) -> set[str]:
        """Return every user with a budget."""
        return {pair[0] for pair in self._state if isinstance(pair, tuple)}

    def forget(self, user: str) -> None:
        """Drop every budget of ``user``."""
        self.forget_users({user})

    def forget_users(self, users: set[str]) -> None:
        """Drop every budget of any of ``users``, in one pass over the pairs."""
        for pair in [p for p in self._state if isinstance(p, tuple) and p[0] in users]:
            del self._state[pair]
