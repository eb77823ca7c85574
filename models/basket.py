"""Session co-occurrence: items that appear together in one session or basket."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from models.base import (
    EventBatch,
    FloatArray,
    IntArray,
    ModelError,
    UserNeighbourScores,
    neighbour_row,
    sum_by_row,
)

logger = logging.getLogger(__name__)

_MAX_DECAY_EXPONENT = 60.0


# Maximum number of distinct items a session remembers, so that an item seen
# again in it forms no new pairs. No Online Retail invoice with a customer
# has more than 541. A session past this keeps only its latest items, and an
# older item seen again then pairs once more.
_SEEN_LIMIT = 1_000


class _Session:
    __slots__ = ("items", "last_ms", "seen", "session_id")

    def __init__(self) -> None:
        # `items`: the latest distinct items, oldest first. `seen`: all of
        # them, up to `_SEEN_LIMIT`.
        self.items: list[int] = []
        self.seen: set[int] = set()
        self.session_id: str | None = None
        self.last_ms: int | None = None


class SessionCoOccurrenceModel(UserNeighbourScores):
    """Pairs of distinct items that share a session, normalized like item kNN.

    A session is an event's ``session_id`` (an invoice is one basket). With
    ``session_gap_ms`` set, a run of a user's events without a session id
    and with gaps below it is a session too. Otherwise such events are
    ignored, because on Taobao browsing runs paired this way ranked worse
    than co-visitation and lowered fused new-to-user HR@10.

    Each item that joins a session adds a count of 1, whatever the event
    type, to its pair with each of the ``max_session_items`` distinct items
    before it in the session, in both directions, so the order of a basket
    does not matter within that window. The window bounds the work per event
    and lets the later lines of a long invoice pair and score. On Online
    Retail, pairing only the first 50 lines gave 6,924 new-to-user hits for
    `basket` alone, and the window gave 7,749.
    Counts decay with ``half_life_ms`` of event time. The similarity of items
    i and j is their pair count divided by ``(n_i * n_j) ** 0.5``, where n
    counts the sessions an item appeared in (the cosine of the items'
    session vectors). An event of an earlier session that arrives after the
    user's current one started pairs with nothing and leaves that session
    as it was.

    A user is scored from the last ``score_items`` items of their latest
    session, which is still the previous basket when a new one starts. The
    item at position p (0 is the newest) weighs ``1 / (1 + p)``, because on
    Online Retail the newest lines of a basket predict the next line better
    than the whole basket does. Scoring reads at most ``max_session_items``
    items, the size of the window.

    >>> from schemas import Event
    >>> from models.engine import Recommender
    >>> engine = Recommender()
    >>> engine.learn([Event("e1", "purchase", "u1", "a", 0, session_id="s1"),
    ...               Event("e2", "purchase", "u1", "b", 0, session_id="s1"),
    ...               Event("e3", "purchase", "u2", "a", 1000, session_id="s2")])
    >>> [engine.catalog.ids[row] for row in engine.models["basket"].candidates("u2", 5)]
    ['b']
    """

    def __init__(
        self,
        session_gap_ms: int | None = None,
        max_session_items: int = 50,
        half_life_ms: float = 30 * 86_400_000,
        max_neighbors: int = 200,
        score_items: int = 20,
    ) -> None:
        if max_session_items < 1:
            msg = f"max_session_items is {max_session_items}; expected at least 1"
            raise ModelError(msg)
        if score_items < 1:
            msg = f"score_items is {score_items}; expected at least 1"
            raise ModelError(msg)
        if not half_life_ms > 0:
            msg = f"half_life_ms is {half_life_ms}; expected a positive number of milliseconds"
            raise ModelError(msg)
        super().__init__()
        self.name = "basket"
        self.session_gap_ms = session_gap_ms
        self.max_session_items = max_session_items
        self.half_life_ms = float(half_life_ms)
        self.max_neighbors = max_neighbors
        self.score_items = score_items
        self.reference_ms: int | None = None
        self._rows: dict[int, dict[int, float]] = {}
        # Decayed session count of each item, indexed by catalog row.
        self._counts = np.zeros(0, dtype=np.float64)
        self._sessions: dict[str, _Session] = {}

    def learn(self, batch: EventBatch) -> None:
        """Pair each event's item with the other items of the user's session."""
        self._version += 1
        items = batch.items.tolist()
        weights = batch.weights.tolist()
        times = batch.times.tolist()
        for event, item, weight, time_ms in zip(batch.events, items, weights, times, strict=True):
            if weight <= 0 or (event.session_id is None and self.session_gap_ms is None):
                continue
            session = self._sessions.get(event.user_id)
            if session is None:
                session = self._sessions[event.user_id] = _Session()
            if self._is_late(session, event.session_id, time_ms):
                continue
            if self._is_new_session(session, event.session_id, time_ms):
                session.items = []
                session.seen = set()
            if session.last_ms is None or time_ms >= session.last_ms:
                # A late event that joins the basket leaves its clock at the
                # newest event, or the next one could look like a new basket.
                session.session_id = event.session_id
                session.last_ms = time_ms
            if item in session.seen:
                continue
            if len(session.seen) >= _SEEN_LIMIT:
                # A session id that a producer reuses for good, or a run of
                # events split only by the gap, would grow without bound.
                session.seen = set(session.items)
            session.seen.add(item)
            scale = self._scale(time_ms)
            if item >= len(self._counts):
                self._grow(item)
            self._counts[item] += scale
            for other in session.items:
                self._add(other, item, scale)
                self._add(item, other, scale)
            session.items.append(item)
            del session.items[: -self.max_session_items]

    def _is_late(self, session: _Session, session_id: str | None, time_ms: int) -> bool:
        # A late event of an earlier basket pairs with nothing, because that
        # basket is no longer kept. The current basket stays as it is.
        if session.last_ms is None or time_ms >= session.last_ms:
            return False
        if session_id is not None and session.session_id is not None:
            return session_id != session.session_id
        gap = self.session_gap_ms if self.session_gap_ms is not None else 0
        return session.last_ms - time_ms > gap

    def _is_new_session(self, session: _Session, session_id: str | None, time_ms: int) -> bool:
        if session.last_ms is None:
            return True
        if session_id is not None and session.session_id is not None:
            return session_id != session.session_id
        gap = self.session_gap_ms if self.session_gap_ms is not None else 0
        return time_ms - session.last_ms > gap

    def _scale(self, time_ms: int) -> float:
        if self.reference_ms is None:
            self.reference_ms = time_ms
        exponent = (time_ms - self.reference_ms) / self.half_life_ms
        if exponent > _MAX_DECAY_EXPONENT:
            self._rescale(time_ms)
            exponent = 0.0
        return math.exp2(exponent)

    def _add(self, source: int, target: int, amount: float) -> None:
        row = self._rows.get(source)
        if row is None:
            row = self._rows[source] = {}
        row[target] = row.get(target, 0.0) + amount
        if len(row) > 2 * self.max_neighbors:
            strongest = sorted(row.items(), key=lambda pair: (-pair[1], pair[0]))
            self._rows[source] = dict(strongest[: self.max_neighbors])

    def _grow(self, item: int) -> None:
        counts = np.zeros(max(item + 1, 2 * len(self._counts), 1024), dtype=np.float64)
        counts[: len(self._counts)] = self._counts
        self._counts = counts

    def __setstate__(self, state: dict[str, Any]) -> None:
        counts = state.get("_counts")
        if isinstance(counts, dict):
            # State written before the counts became an array.
            array = np.zeros(max(counts, default=-1) + 1, dtype=np.float64)
            for item, count in counts.items():
                array[item] = count
            state["_counts"] = array
        for session in state.get("_sessions", {}).values():
            if not hasattr(session, "seen"):
                # State written when a session kept only its first items.
                session.seen = set(session.items)
        self.__dict__.update(state)

    def _rescale(self, time_ms: int) -> None:
        assert self.reference_ms is not None
        factor = math.exp2((self.reference_ms - time_ms) / self.half_life_ms)
        for row in self._rows.values():
            for target in row:
                row[target] *= factor
        self._counts *= factor
        self.reference_ms = time_ms

    def scoring_items(self, user_id: str) -> list[int]:
        """Return the last ``score_items`` items of the user's latest session, newest first."""
        session = self._sessions.get(user_id)
        if session is None:
            return []
        return session.items[: -self.score_items - 1 : -1]

    def _compute_user_scores(self, user_id: str) -> tuple[IntArray, FloatArray]:
        parts: list[tuple[IntArray, FloatArray]] = []
        counts = self._counts
        for position, source in enumerate(self.scoring_items(user_id)):
            row = self._rows.get(source)
            # A rescale after a gap of many half-lives can round a count to 0.
            if not row or counts[source] <= 0.0:
                continue
            source_norm = (1 + position) * math.sqrt(counts[source])
            targets, values = neighbour_row(row)
            norms = source_norm * np.sqrt(counts[targets])
            positive = norms > 0.0
            parts.append((targets[positive], values[positive] / norms[positive]))
        return sum_by_row(parts)

    def replace_session_ids(self, token: Callable[[str], str]) -> None:
        """Replace the session id of each user's current session with ``token`` of it."""
        for session in self._sessions.values():
            if session.session_id is not None:
                session.session_id = token(session.session_id)

    def forget_user(self, user_id: str) -> None:
        """Drop the user's session. Pair counts contain no user id."""
        self._sessions.pop(user_id, None)
        self._drop_kept_scores()

    def state_bytes(self) -> int:
        """Return an estimate: about 100 bytes per stored pair and session item, and the counts."""
        pairs = sum(len(row) for row in self._rows.values())
        sessions = sum(
            len(session.items) + len(session.seen) + 1 for session in self._sessions.values()
        )
        return 100 * (pairs + sessions) + self._counts.nbytes
