"""Decayed popularity, trending and per-category popularity."""

from __future__ import annotations

import copy
import logging
import sys

import numpy as np

from models.base import (
    NO_CATEGORY,
    DecayedScores,
    EventBatch,
    FloatArray,
    IntArray,
    ItemCatalog,
    top_n,
)

logger = logging.getLogger(__name__)

_EMPTY_ROWS = np.zeros(0, dtype=np.int64)
_EMPTY_SCORES = np.zeros(0, dtype=np.float64)


class PopularityModel:
    """Item popularity by type weight, halving every ``half_life_ms`` of event time.

    The same score serves every user. Refunds subtract their purchase's
    weight, and no score drops below zero. A cache of the leading items keeps
    ``candidates`` from scanning the whole catalog after every event.

    >>> from schemas import Event
    >>> from models.engine import Recommender
    >>> engine = Recommender()
    >>> engine.learn([Event("e1", "view", "u1", "i1", 0), Event("e2", "purchase", "u2", "i2", 0)])
    >>> [engine.catalog.ids[row] for row in engine.models["popular"].candidates("u1", 2)]
    ['i2', 'i1']
    """

    def __init__(self, name: str, half_life_ms: float) -> None:
        self.name = name
        self.scores = DecayedScores(half_life_ms)
        self._cache = _EMPTY_ROWS
        self._cache_n = 0
        self._threshold = np.inf
        self._in_cache = np.zeros(0, dtype=bool)
        self._reference: int | None = None

    def learn(self, batch: EventBatch) -> None:
        """Add each event's type weight to its item."""
        self.scores.add(batch.items, batch.weights, batch.times)
        if self.scores.reference_ms != self._reference or (batch.weights < 0).any():
            self._cache_n = 0
            return
        if self._cache_n == 0:
            return
        raw = self.scores.raw()
        if len(self._in_cache) < len(raw):
            grown = np.zeros(max(len(raw), 2 * len(self._in_cache)), dtype=bool)
            grown[: len(self._in_cache)] = self._in_cache
            self._in_cache = grown
        items = batch.items
        risen = items[(raw[items] >= self._threshold) & ~self._in_cache[items]]
        if len(risen):
            risen = np.unique(risen)
            self._cache = np.concatenate([self._cache, risen])
            self._in_cache[risen] = True
            if len(self._cache) > 8 * self._cache_n:
                self._cache_n = 0

    def _leading(self, n: int) -> IntArray:
        if self._cache_n < n:
            raw = self.scores.raw()
            self._cache_n = max(n, 16)
            self._cache = top_n(raw, 4 * self._cache_n)
            self._in_cache = np.zeros(len(raw), dtype=bool)
            self._in_cache[self._cache] = True
            full = len(self._cache) >= 4 * self._cache_n
            self._threshold = float(raw[self._cache].min()) if full else 0.0
            self._reference = self.scores.reference_ms
        return self._cache

    def candidates(self, user_id: str, n: int) -> IntArray:
        """Return the ``n`` most popular items, best first."""
        cache = self._leading(n)
        return top_n(self.scores.raw()[cache], n, cache)

    def score(self, user_id: str, items: IntArray) -> tuple[IntArray, FloatArray]:
        """Return the popularity of the items that have any."""
        raw = self.scores.raw()
        known = items[items < len(raw)]
        values = raw[known]
        keep = values > 0
        return known[keep], values[keep]

    def forget_user(self, user_id: str) -> None:
        """Keep the counts: they hold no per-user state."""

    def state_bytes(self) -> int:
        """Return the size of the score array and the cache."""
        return int(self.scores.raw().nbytes + self._cache.nbytes + self._in_cache.nbytes)


class CategoryModel:
    """Items that many users chose in the user's most recent categories, newest category first.

    Popularity here counts users, not events: an item gains 1 when a user
    touches it for the first time, and the counts halve every
    ``half_life_ms`` of event time. So a few users who view one item again
    and again do not lift it over items that many users chose. An item in
    the user's newest category scores its share of that category's leader.
    In each older category the share is multiplied by ``category_decay`` once
    more. It has no opinion on users or items without a category.

    >>> from schemas import Event
    >>> from models.engine import Recommender
    >>> engine = Recommender()
    >>> engine.learn([Event("e1", "view", "u1", "i1", 0, category="c1"),
    ...               Event("e2", "view", "u2", "i2", 0, category="c1")])
    >>> sorted(engine.catalog.ids[row] for row in engine.models["category"].candidates("u2", 5))
    ['i1', 'i2']
    """

    def __init__(
        self,
        catalog: ItemCatalog,
        half_life_ms: float = 3 * 86_400_000,
        n_categories: int = 3,
        category_decay: float = 0.5,
    ) -> None:
        self.name = "category"
        self.catalog = catalog
        # Decayed count of the users who touched each item.
        self.scores = DecayedScores(half_life_ms)
        self.n_categories = n_categories
        self.category_decay = category_decay
        self._members: dict[int, list[int]] = {}
        self._member_arrays: dict[int, IntArray] = {}
        self._item_category = np.full(0, NO_CATEGORY, dtype=np.int64)
        self._recent: dict[str, list[int]] = {}
        # Time of the event that last moved each user's recent categories.
        self._last_ms: dict[str, int] = {}
        # Category to the requested count and its leading items, best first.
        self._leaders: dict[int, tuple[int, IntArray]] = {}
        self._leaders_reference: int | None = None

    def __getstate__(self) -> dict[str, object]:
        # The leaders are a cache, rebuilt on demand after a restore.
        state = self.__dict__.copy()
        state["_leaders"] = {}
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        state.setdefault("_leaders", {})
        state.setdefault("_leaders_reference", None)
        state.setdefault("_last_ms", {})
        popularity = state.pop("popularity", None)
        if "scores" not in state and isinstance(popularity, PopularityModel):
            # State written when this model ranked by the shared event
            # popularity: start from a copy of it, and user counts take over.
            state["scores"] = copy.deepcopy(popularity.scores)
        self.__dict__.update(state)

    def learn(self, batch: EventBatch) -> None:
        """Count first touches, index new items by category, move users' categories forward.

        Refunds, and events older than the user's newest one, leave the
        users' categories as they were.

        A batch without ``first_touch`` counts each positive event as a user.
        """
        first = batch.first_touch if batch.first_touch is not None else batch.positive
        if first.any():
            self.scores.add(batch.items[first], np.ones(int(first.sum())), batch.times[first])
        self.refresh_items(batch.items)
        # Popularity changed only for the batch's items, so only their
        # categories can have new leaders.
        for category in np.unique(self._item_category[batch.items]).tolist():
            self._leaders.pop(category, None)
        positive = batch.positive.tolist()
        categories = batch.categories.tolist()
        for event, category, is_positive in zip(batch.events, categories, positive, strict=True):
            # A refund is never a positive signal, so it does not make the
            # returned item's category the user's newest.
            if category == NO_CATEGORY or not is_positive:
                continue
            # An event older than the one that last moved the user's
            # categories, as from a backfill, leaves the newer order.
            last_ms = self._last_ms.get(event.user_id)
            if last_ms is not None and event.timestamp_ms < last_ms:
                continue
            self._last_ms[event.user_id] = event.timestamp_ms
            recent = self._recent.get(event.user_id)
            if recent is None:
                self._recent[event.user_id] = [category]
                continue
            if recent and recent[0] == category:
                continue
            if category in recent:
                recent.remove(category)
            recent.insert(0, category)
            del recent[self.n_categories :]

    def refresh_items(self, items: IntArray) -> None:
        """Move the given items to their current catalog category."""
        size = len(self.catalog)
        self.scores.ensure_size(size)
        if size > len(self._item_category):
            grown = np.full(max(size, 2 * len(self._item_category)), NO_CATEGORY, dtype=np.int64)
            grown[: len(self._item_category)] = self._item_category
            self._item_category = grown
        current = self.catalog.categories[items]
        changed = np.flatnonzero(current != self._item_category[items])
        for position in changed.tolist():
            row = int(items[position])
            old = int(self._item_category[row])
            new = int(current[position])
            if old == new:
                continue
            if old != NO_CATEGORY:
                self._members[old].remove(row)
                self._member_arrays.pop(old, None)
                self._leaders.pop(old, None)
            if new != NO_CATEGORY:
                self._members.setdefault(new, []).append(row)
                self._member_arrays.pop(new, None)
                self._leaders.pop(new, None)
            self._item_category[row] = new

    def user_categories(self, user_id: str) -> list[int]:
        """Return the user's most recent category rows, newest first."""
        return list(self._recent.get(user_id, ()))

    def _members_of(self, category: int) -> IntArray:
        rows = self._member_arrays.get(category)
        if rows is None:
            rows = np.array(self._members.get(category, ()), dtype=np.int64)
            self._member_arrays[category] = rows
        return rows

    def top_of(self, category: int, n: int) -> IntArray:
        """Return the ``n`` most popular items of one category, best first.

        The leaders of a category are kept until an event touches one of its
        items, since scores of untouched items all decay at the same rate.
        """
        scores = self.scores
        if scores.reference_ms != self._leaders_reference:
            # A rescale can round the smallest scores down to zero.
            self._leaders.clear()
            self._leaders_reference = scores.reference_ms
        cached = self._leaders.get(category)
        if cached is not None and cached[0] >= n:
            return cached[1][:n]
        rows = self._members_of(category)
        if len(rows) == 0:
            return _EMPTY_ROWS
        leaders = top_n(scores.raw()[rows], n, rows)
        self._leaders[category] = (n, leaders)
        return leaders

    def candidates(self, user_id: str, n: int) -> IntArray:
        """Return the leading items of the user's recent categories."""
        recent = self._recent.get(user_id)
        if not recent:
            return _EMPTY_ROWS
        parts = [self.top_of(category, n) for category in recent]
        return np.concatenate(parts)

    def score(self, user_id: str, items: IntArray) -> tuple[IntArray, FloatArray]:
        """Score items of the user's recent categories by popularity share."""
        recent = self._recent.get(user_id)
        if not recent:
            return _EMPTY_ROWS, _EMPTY_SCORES
        raw = self.scores.raw()
        categories = self._item_category[items]
        out_items: list[IntArray] = []
        out_scores: list[FloatArray] = []
        for position, category in enumerate(recent):
            chosen = items[categories == category]
            # An item that no user has touched yet gets no opinion, as in
            # popularity, rather than a score of 0.
            chosen = chosen[raw[chosen] > 0]
            if len(chosen) == 0:
                continue
            leader = self.top_of(category, 1)
            best = float(raw[leader[0]]) if len(leader) else 0.0
            if best <= 0:
                continue
            out_items.append(chosen)
            factor = self.category_decay**position / best
            out_scores.append(raw[chosen] * factor)
        if not out_items:
            return _EMPTY_ROWS, _EMPTY_SCORES
        return np.concatenate(out_items), np.concatenate(out_scores)

    def forget_user(self, user_id: str) -> None:
        """Drop the user's recent categories."""
        self._recent.pop(user_id, None)
        self._last_ms.pop(user_id, None)

    def state_bytes(self) -> int:
        """Return an estimate of the category index and the per-user lists."""
        per_user = sum(sys.getsizeof(v) + 28 * len(v) for v in self._recent.values())
        # A dict slot and an int object per user with a time.
        per_user += 70 * len(self._last_ms)
        index = 8 * len(self._item_category) + 36 * int(sum(map(len, self._members.values())))
        return per_user + index + int(self.scores.raw().nbytes)
