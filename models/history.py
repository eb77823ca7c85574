"""The user's own items: revisits and repeat purchases."""

from __future__ import annotations

import logging
import math

import numpy as np

from models.base import EventBatch, FloatArray, IntArray, ModelError, scores_of

logger = logging.getLogger(__name__)

_EMPTY_ROWS = np.zeros(0, dtype=np.int64)
_EMPTY_SCORES = np.zeros(0, dtype=np.float64)
_MAX_DECAY_EXPONENT = 60.0


class _UserItems:
    __slots__ = ("reference_ms", "scores")

    def __init__(self, reference_ms: int) -> None:
        self.reference_ms = reference_ms
        self.scores: dict[int, float] = {}


class RecentItemsModel:
    """Items the user touched before, by type weight decayed over event time.

    Refunds subtract their purchase weight. Each user keeps at most
    ``max_items`` items; past that the weaker half is dropped.

    >>> from schemas import Event
    >>> from models.engine import Recommender
    >>> engine = Recommender()
    >>> engine.learn([Event("e1", "view", "u1", "a", 0), Event("e2", "purchase", "u1", "b", 0)])
    >>> [engine.catalog.ids[row] for row in engine.models["recent"].candidates("u1", 5)]
    ['b', 'a']
    """

    def __init__(self, half_life_ms: float = 3 * 86_400_000, max_items: int = 200) -> None:
        if not half_life_ms > 0:
            msg = f"half_life_ms is {half_life_ms}; expected a positive number of milliseconds"
            raise ModelError(msg)
        self.name = "recent"
        self.half_life_ms = float(half_life_ms)
        self.max_items = max_items
        self._users: dict[str, _UserItems] = {}

    def learn(self, batch: EventBatch) -> None:
        """Add each event's weight to the user's item."""
        items = batch.items.tolist()
        weights = batch.weights.tolist()
        times = batch.times.tolist()
        for event, item, weight, time_ms in zip(batch.events, items, weights, times, strict=True):
            state = self._users.get(event.user_id)
            if state is None:
                if weight <= 0:
                    continue
                state = self._users[event.user_id] = _UserItems(time_ms)
            exponent = (time_ms - state.reference_ms) / self.half_life_ms
            if exponent > _MAX_DECAY_EXPONENT:
                factor = math.exp2(-exponent)
                state.scores = {k: v * factor for k, v in state.scores.items()}
                state.reference_ms = time_ms
                exponent = 0.0
            value = state.scores.get(item, 0.0) + weight * math.exp2(exponent)
            if value > 0:
                state.scores[item] = value
            else:
                state.scores.pop(item, None)
            if len(state.scores) > self.max_items:
                kept = sorted(state.scores.items(), key=lambda pair: (-pair[1], pair[0]))
                state.scores = dict(kept[: self.max_items // 2])

    def _arrays(self, user_id: str) -> tuple[IntArray, FloatArray]:
        state = self._users.get(user_id)
        if state is None or not state.scores:
            return _EMPTY_ROWS, _EMPTY_SCORES
        rows = np.fromiter(state.scores.keys(), dtype=np.int64, count=len(state.scores))
        scores = np.fromiter(state.scores.values(), dtype=np.float64, count=len(state.scores))
        return rows, scores

    def candidates(self, user_id: str, n: int) -> IntArray:
        """Return the user's strongest items."""
        rows, scores = self._arrays(user_id)
        return rows[np.lexsort((rows, -scores))[:n]]

    def score(self, user_id: str, items: IntArray) -> tuple[IntArray, FloatArray]:
        """Return the user's weight on each given item they touched."""
        rows, scores = self._arrays(user_id)
        if len(rows) == 0:
            return _EMPTY_ROWS, _EMPTY_SCORES
        order = np.argsort(rows)
        found, values = scores_of(rows[order], scores[order], items)
        # A rescale can round a weak item's weight down to 0.
        keep = values > 0
        return found[keep], values[keep]

    def forget_user(self, user_id: str) -> None:
        """Drop the user's items."""
        self._users.pop(user_id, None)

    def state_bytes(self) -> int:
        """Return an estimate: about 100 bytes per stored user item."""
        return 100 * sum(len(state.scores) + 1 for state in self._users.values())
