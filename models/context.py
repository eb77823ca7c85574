"""A contextual River classifier: the chance that the user's next item is this one."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Any

import numpy as np
from river import linear_model, optim

from models.base import (
    NO_CATEGORY,
    EventBatch,
    FloatArray,
    IntArray,
    ItemCatalog,
    ModelError,
    stable_hash,
)
from models.sampling import KeyedSampler

logger = logging.getLogger(__name__)

_EMPTY_ROWS = np.zeros(0, dtype=np.int64)
_EMPTY_SCORES = np.zeros(0, dtype=np.float64)
_HOUR_MS = 3_600_000


def price_band(price: float) -> int:
    """Return the power-of-two band of a unit price; -1 when unknown.

    >>> price_band(0.0), price_band(3.0), price_band(float("nan"))
    (0, 2, -1)
    """
    if not math.isfinite(price) or price < 0:
        return -1
    return int(math.floor(math.log2(price + 1.0)))


class _Context:
    __slots__ = ("categories", "hour", "last_ms", "last_type", "seen")

    def __init__(self) -> None:
        self.categories: list[int] = []
        self.hour = -1
        self.last_ms: int | None = None
        self.last_type = ""
        self.seen: OrderedDict[int, None] = OrderedDict()

    def __setstate__(self, state: tuple[None, dict[str, Any]]) -> None:
        # A class with __slots__ pickles as (None, {slot: value}). Contexts
        # saved before last_ms existed lack it, and count as having no time.
        self.last_ms = None
        for name, value in state[1].items():
            setattr(self, name, value)


class ContextModel:
    """River logistic regression on user context and item features.

    The features are whether the item's category is the user's newest or an
    older recent category, and whether the user touched the item before, also
    crossed with the user's last event type. The item's category, its price
    band and the hour of the user's last event complete them. Each positive event is
    learned with label 1 and one item drawn uniformly from the catalog with
    label 0, from the context as it stood before the event. An event stamped
    before the user's last one marks its item as touched but leaves the
    hour, the last event type and the recent categories of the newer one.

    With ``learn_every`` above 1, only every n-th positive event and its
    negative reach the classifier, because ``learn_one`` costs about 5 µs per
    call. Every event still moves the user's context.

    The model keeps context for at most ``max_users`` users and evicts the
    least recently active one past that. Its weights are global, keyed by
    feature names, so scoring never creates state for a user or an item.

    >>> from schemas import Event
    >>> from models.engine import Recommender
    >>> engine = Recommender()
    >>> engine.learn([Event("e1", "view", "u1", "a", 0, category="c")])
    >>> items, scores = engine.models["context"].score("u1", np.array([0]))
    >>> items.tolist(), 0.0 < float(scores[0]) < 1.0
    ([0], True)
    """

    def __init__(
        self,
        catalog: ItemCatalog,
        learning_rate: float = 0.05,
        l2: float = 0.0,
        max_users: int = 100_000,
        max_seen: int = 100,
        learn_every: int = 1,
        seed: int = 0,
    ) -> None:
        if learn_every < 1:
            msg = f"learn_every is {learn_every}; expected at least 1"
            raise ModelError(msg)
        if max_users < 1:
            msg = f"max_users is {max_users}; expected at least 1"
            raise ModelError(msg)
        self.name = "context"
        self.catalog = catalog
        self.max_users = max_users
        self.max_seen = max_seen
        self.learn_every = learn_every
        self._positives = 0
        self.classifier = linear_model.LogisticRegression(optimizer=optim.SGD(learning_rate), l2=l2)
        # Negatives are keyed by event id, not drawn in sequence, so that a
        # restarted worker draws the same ones whatever its batches.
        self._negative_salt = np.uint64(stable_hash("context:negative", seed))
        self._sampler = KeyedSampler()
        self._events_since_sampler = 0
        self._users: OrderedDict[str, _Context] = OrderedDict()
        # The classifier's weight of each ``category=`` feature, at index
        # category + 1, where index 0 is for items without a category. In
        # River 0.26 a learning step changes only the weights of its own
        # features, so the array is updated one category at a time.
        self._category_weights = np.zeros(0, dtype=np.float64)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_category_weights" not in state:
            # State written before the array existed.
            self._category_weights = np.zeros(0, dtype=np.float64)
            for key in self.classifier._weights.keys():
                if key.startswith("category="):
                    self._sync_category(int(key.removeprefix("category=")))

    def _sync_category(self, category: int) -> None:
        index = category + 1
        if index >= len(self._category_weights):
            grown = np.zeros(max(index + 1, 2 * len(self._category_weights), 64))
            grown[: len(self._category_weights)] = self._category_weights
            self._category_weights = grown
        value = self.classifier._weights.get(f"category={category}")
        self._category_weights[index] = value or 0.0

    def _features(self, context: _Context, item: int, category: int) -> dict[str, float]:
        seen = item in context.seen
        features: dict[str, float] = {
            f"category={category}": 1.0,
            f"price={price_band(float(self.catalog.prices[item]))}": 1.0,
            f"hour={context.hour}": 1.0,
        }
        if category != NO_CATEGORY and context.categories:
            if category == context.categories[0]:
                features["same_category"] = 1.0
            elif category in context.categories:
                features["recent_category"] = 1.0
        if seen:
            features["seen"] = 1.0
            features[f"seen_after={context.last_type}"] = 1.0
        return features

    def learn(self, batch: EventBatch) -> None:
        """Learn each positive event against one random item, then move the context."""
        negatives = self._sample_negatives(batch).tolist()
        items = batch.items.tolist()
        positive = batch.positive.tolist()
        categories = batch.categories.tolist()
        for index, event in enumerate(batch.events):
            if not positive[index]:
                continue
            item = items[index]
            context = self._users.get(event.user_id)
            if context is None:
                context = self._users[event.user_id] = _Context()
                if len(self._users) > self.max_users:
                    self._users.popitem(last=False)
            else:
                self._users.move_to_end(event.user_id)
            self._positives += 1
            if context.hour >= 0 and self._positives % self.learn_every == 0:
                # The event's own item takes its category as of the event, so
                # a later event of the batch that changes it does not count.
                self._learn_one(context, item, True, categories[index])
                negative = negatives[index]
                if negative != item:
                    self._learn_one(
                        context, negative, False, int(self.catalog.categories[negative])
                    )
            self._move(context, event.type, event.timestamp_ms, item, categories[index])

    def _learn_one(self, context: _Context, item: int, label: bool, category: int) -> None:
        self.classifier.learn_one(self._features(context, item, category), label)
        self._sync_category(category)

    def _sample_negatives(self, batch: EventBatch) -> IntArray:
        # The ring is rebuilt after a tenth of the catalog's size in events (at
        # least 1,000), or once the catalog has grown by a tenth, and contains the
        # items known at the event where that happens. Items that arrive later
        # are not drawn until the next rebuild. Because rebuilds fall on
        # events, not batches, the draws do not depend on how events are batched.
        keys = batch.event_hashes ^ self._negative_salt
        sizes = batch.catalog_sizes().tolist()
        negatives = np.empty(len(sizes), dtype=np.int64)
        start = 0
        for index, n_items in enumerate(sizes):
            stale = self._events_since_sampler >= max(1000, n_items // 10)
            if stale or 10 * n_items > 11 * len(self._sampler):
                if index > start:
                    negatives[start:index] = self._sampler.draw(keys[start:index], 1)[:, 0]
                start = index
                self._events_since_sampler = 0
                self._sampler.rebuild(self.catalog.hashes[:n_items])
            self._events_since_sampler += 1
        if start < len(sizes):
            negatives[start:] = self._sampler.draw(keys[start:], 1)[:, 0]
        return negatives

    def _move(self, context: _Context, kind: str, time_ms: int, item: int, category: int) -> None:
        context.seen[item] = None
        context.seen.move_to_end(item)
        if len(context.seen) > self.max_seen:
            context.seen.popitem(last=False)
        if context.last_ms is not None and time_ms < context.last_ms:
            # An event older than the user's last one, as a backfill brings,
            # leaves the context of the newest event.
            return
        context.last_ms = time_ms
        context.hour = (time_ms // _HOUR_MS) % 24
        context.last_type = kind
        if category != NO_CATEGORY:
            if category in context.categories:
                context.categories.remove(category)
            context.categories.insert(0, category)
            del context.categories[3:]

    def candidates(self, user_id: str, n: int) -> IntArray:
        """Return no candidates: the model only re-ranks what others propose."""
        return _EMPTY_ROWS

    def score(self, user_id: str, items: IntArray) -> tuple[IntArray, FloatArray]:
        """Return the predicted chance of each item being the user's next one."""
        context = self._users.get(user_id)
        if context is None or len(items) == 0:
            return _EMPTY_ROWS, _EMPTY_SCORES
        # NOTE: reads the weights of river 0.26's LogisticRegression directly,
        # because predict_proba_one per candidate costs about 5 µs each.
        weights: Any = self.classifier._weights
        logits = np.full(len(items), float(self.classifier.intercept), dtype=np.float64)

        categories = self.catalog.categories[items]
        table = self._category_weights
        highest = int(categories.max()) + 1
        if highest >= len(table):
            # Categories that no learning step has touched yet weigh 0.
            table = np.zeros(highest + 1)
            table[: len(self._category_weights)] = self._category_weights
        per_item = table[categories + 1]
        if context.categories:
            same = weights.get("same_category") or 0.0
            recent = weights.get("recent_category") or 0.0
            newest = categories == context.categories[0]
            # The user has at most two older categories, and comparing with
            # each is faster than np.isin on a few hundred candidates.
            older = np.zeros(len(items), dtype=bool)
            for category in context.categories[1:]:
                older |= categories == category
            older &= ~newest
            # Each weight is added only where its feature is on, as summing the
            # item's own features would.
            per_item = np.where(newest, per_item + same, per_item)
            per_item = np.where(older, per_item + recent, per_item)
        logits += per_item

        prices = self.catalog.prices[items]
        bands = np.full(len(items), -1, dtype=np.int64)
        known = np.isfinite(prices) & (prices >= 0)
        bands[known] = np.floor(np.log2(prices[known] + 1.0)).astype(np.int64)
        # Bands are small integers, -1 for an unknown price and about the
        # log2 of the price otherwise, so a table over the range present
        # replaces a sort of the bands.
        lowest = int(bands.min())
        band_range = range(lowest, int(bands.max()) + 1)
        per_band = [weights.get(f"price={band}") or 0.0 for band in band_range]
        logits += np.array(per_band, dtype=np.float64)[bands - lowest]

        logits += weights.get(f"hour={context.hour}") or 0.0
        seen = np.array([item in context.seen for item in items.tolist()], dtype=bool)
        seen_weight = (weights.get("seen") or 0.0) + (
            weights.get(f"seen_after={context.last_type}") or 0.0
        )
        logits[seen] += seen_weight
        return items, 1.0 / (1.0 + np.exp(-logits))

    def forget_user(self, user_id: str) -> None:
        """Drop the user's context; the weights hold no user id."""
        self._users.pop(user_id, None)

    def state_bytes(self) -> int:
        """Return an estimate: about 100 bytes per weight and per remembered item, and the ring."""
        remembered = sum(len(context.seen) + 4 for context in self._users.values())
        return 100 * (len(self.classifier._weights) + remembered) + self._sampler.state_bytes()
