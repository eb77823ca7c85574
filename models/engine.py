"""The recommender that the worker and the evaluation drive: models, fusion, filters, top-k."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from models.base import (
    NO_CATEGORY,
    EventBatch,
    FloatArray,
    IntArray,
    ItemCatalog,
    Model,
    ModelError,
    UInt64Array,
    find_sorted,
    grow_rows,
    stable_hashes,
)
from models.basket import SessionCoOccurrenceModel
from models.context import ContextModel
from models.covisit import CoVisitationModel
from models.fusion import (
    FUSION_STRATEGIES,
    BoolMatrix,
    LearnedFusion,
    OrderSelector,
    descending_values,
    normalize,
    ranks_with_subset,
    rrf_fusion,
    weighted_fusion,
)
from models.history import RecentItemsModel
from models.mf import ImplicitMF
from models.popularity import CategoryModel, PopularityModel
from models.title import TitleModel
from schemas import EVENT_TYPES, Event, ItemUpdate, RecommendedItem

logger = logging.getLogger(__name__)

VERSION = "fusionrec-0.1"
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
MODEL_NAMES = (
    "popular",
    "trending",
    "category",
    "covisit",
    "basket",
    "recent",
    "mf",
    "context",
    "title",
)
# The largest model weight. Fused scores then stay far inside the range of
# float32, the precision in which the worker indexes the lists it served.
MAX_WEIGHT = 1e6
DEFAULT_WEIGHTS: dict[str, float] = {
    "popular": 0.05,
    "trending": 0.05,
    "category": 0.5,
    "covisit": 1.0,
    "basket": 0.3,
    "recent": 1.0,
    "mf": 0.2,
    "context": 0.2,
    "title": 0.5,
}
# Each model's position among the names in alphabetical order, which breaks
# ties between models in the sources of a list entry.
_NAME_ORDER = np.argsort(np.argsort(np.array(MODEL_NAMES)))
# The orderings that learned fusion chooses from per candidate group. The
# first, its own hit-rate sum, is the default.
ORDER_POLICIES = ("learned", "weighted", "rrf", *MODEL_NAMES)
DEFAULT_CANDIDATES: dict[str, int] = {
    "popular": 30,
    "trending": 30,
    "category": 30,
    "covisit": 100,
    "basket": 100,
    "recent": 50,
    "mf": 100,
    "context": 0,
    "title": 100,
}


def _default_type_weights() -> dict[str, float]:
    return {"view": 1.0, "click": 2.0, "purchase": 4.0}


@dataclass(frozen=True)
class EngineConfig:
    """Every tunable of the recommender; the defaults are the product's default configuration.

    >>> EngineConfig().k
    20
    >>> EngineConfig(fusion="rrf").fusion
    'rrf'
    """

    k: int = 20
    fusion: str = "learned"
    weights: dict[str, float] | None = None
    repeat_purchases: str = "exclude"
    rebuyable_categories: frozenset[str] | None = None
    max_per_category: int | None = None
    exploration: float = 0.0
    seed: int = 0
    type_weights: dict[str, float] = field(default_factory=_default_type_weights)
    popularity_half_life_ms: float = DAY_MS
    trending_half_life_ms: float = 3 * HOUR_MS
    recent_half_life_ms: float = HOUR_MS
    recent_max_items: int = 200
    category_recent: int = 3
    category_decay: float = 0.1
    category_half_life_ms: float = 3 * DAY_MS
    covisit_window_items: int = 5
    covisit_window_ms: int = HOUR_MS
    covisit_half_life_ms: float = 30 * DAY_MS
    covisit_backward: float = 1.0
    covisit_max_neighbors: int = 200
    covisit_recency_power: float = 2.0
    basket_session_gap_ms: int | None = None
    basket_max_items: int = 50
    basket_half_life_ms: float = 30 * DAY_MS
    basket_max_neighbors: int = 200
    basket_score_items: int = 20
    mf_factors: int = 32
    mf_learning_rate: float = 0.05
    mf_l2: float = 0.01
    mf_negatives: int = 3
    mf_sampling_power: float = 0.75
    mf_index_min_items: int = 200_000
    mf_index_scan_items: int = 100_000
    context_learning_rate: float = 0.05
    context_max_users: int = 100_000
    context_learn_every: int = 1
    title_recent_items: int = 5
    title_recency_power: float = 2.0
    title_max_word_items: int = 5_000
    fusion_prior_rate: float = 0.001
    fusion_learn_every: int = 4
    fusion_min_hits: int = 100
    fusion_fixed_new_order: bool = True
    learn_chunk: int = 100
    session_gap_ms: int = 30 * 60_000
    fusion_untouched_ranks: bool = True
    fusion_select_order: bool = True
    fusion_select_depth: int = 10
    fusion_select_z: float = 2.0
    cold_events: int = 5
    candidates: dict[str, int] | None = None

    def model_weights(self) -> dict[str, float]:
        """Return the fusion weight of every model, defaults filled in."""
        weights = dict(DEFAULT_WEIGHTS)
        if self.weights:
            weights.update(self.weights)
        return weights

    def weight_array(self) -> FloatArray:
        """Return the fusion weights as an array in the order of `MODEL_NAMES`."""
        weights = self.model_weights()
        return np.array([weights[name] for name in MODEL_NAMES], dtype=np.float64)

    def candidate_counts(self) -> dict[str, int]:
        """Return how many candidates each model proposes, defaults filled in."""
        counts = dict(DEFAULT_CANDIDATES)
        if self.candidates:
            counts.update(self.candidates)
        return counts

    def validate(self) -> None:
        """Raise `ModelError` naming the first field with an invalid value."""
        if self.k < 1:
            msg = f"k is {self.k}; expected at least 1"
            raise ModelError(msg)
        if self.fusion not in FUSION_STRATEGIES:
            msg = f"fusion is {self.fusion!r}; expected one of {', '.join(FUSION_STRATEGIES)}"
            raise ModelError(msg)
        if self.repeat_purchases not in ("exclude", "allow"):
            msg = f"repeat_purchases is {self.repeat_purchases!r}; expected 'exclude' or 'allow'"
            raise ModelError(msg)
        unknown = set(self.weights or {}) - set(MODEL_NAMES)
        if unknown:
            msg = f"weights name unknown models {sorted(unknown)}; expected some of {MODEL_NAMES}"
            raise ModelError(msg)
        for name, weight in self.model_weights().items():
            if not math.isfinite(weight) or not 0 <= weight <= MAX_WEIGHT:
                msg = f"weight of {name} is {weight}; expected a number in [0, {MAX_WEIGHT:g}]"
                raise ModelError(msg)
        if not 0.0 <= self.exploration < 1.0:
            msg = f"exploration is {self.exploration}; expected a share in [0, 1)"
            raise ModelError(msg)
        if self.fusion_learn_every < 0:
            msg = f"fusion_learn_every is {self.fusion_learn_every}; expected 0 (off) or more"
            raise ModelError(msg)
        if self.learn_chunk < 1:
            msg = f"learn_chunk is {self.learn_chunk}; expected at least 1"
            raise ModelError(msg)
        for name in (
            "covisit_recency_power",
            "title_recency_power",
            "mf_learning_rate",
            "mf_l2",
            "context_learning_rate",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                msg = f"{name} is {value}; expected a finite number >= 0"
                raise ModelError(msg)
        for name in (
            "popularity_half_life_ms",
            "trending_half_life_ms",
            "recent_half_life_ms",
            "category_half_life_ms",
            "covisit_half_life_ms",
            "basket_half_life_ms",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                msg = f"{name} is {value}; expected a finite number of milliseconds > 0"
                raise ModelError(msg)
        for name in (
            "mf_index_min_items",
            "mf_index_scan_items",
            "title_recent_items",
            "title_max_word_items",
        ):
            value = getattr(self, name)
            if value < 1:
                msg = f"{name} is {value}; expected at least 1"
                raise ModelError(msg)
        if self.max_per_category is not None and self.max_per_category < 1:
            msg = f"max_per_category is {self.max_per_category}; expected at least 1 or None"
            raise ModelError(msg)
        missing = set(EVENT_TYPES) - set(self.type_weights)
        if missing or any(not (math.isfinite(w) and w > 0) for w in self.type_weights.values()):
            msg = (
                f"type_weights is {self.type_weights}; "
                f"expected a finite weight > 0 for each of {EVENT_TYPES}"
            )
            raise ModelError(msg)


@dataclass(slots=True)
class CandidateScores:
    """One user's candidates with every model's normalized score.

    Attributes
    ----------
    items
        Catalog rows of the candidates, ascending.
    raw
        Each model's own scores, shaped ``(n_models, n_candidates)`` in
        `MODEL_NAMES` order, 0 outside the mask.
    normalized
        The same scores scaled to [0, 1] per model by `normalize`.
    mask
        Which model has an opinion on which candidate.
    ranks
        Each candidate's 1-based rank within each model's opinions, 0 outside the mask.
    groups
        0 for items the user never touched, 1 for items touched in the
        current session, 2 for items touched in an earlier session.
    cold
        Whether the user counts as cold for learned fusion.
    fusion_ranks
        The ranks that learned fusion reads: for items the user never
        touched, the rank among those items only, because a list of items new
        to the user ranks them without the rest.

    """

    user_id: str
    items: IntArray
    raw: FloatArray
    normalized: FloatArray
    mask: BoolMatrix
    ranks: FloatArray
    groups: IntArray
    cold: bool
    fusion_ranks: FloatArray


_UNKNOWN_FIRST_MS = -1

# The engine keeps a user's latest events for `user_history` and the count of
# all of them; the models hold what they learned from older ones. The list is
# cut back once it doubles, so a user with a million events costs no more
# than one with 200.
_HISTORY_KEPT = 100
# The item fields that an update sets, in the column order of the update times.
UPDATE_FIELDS = ("in_stock", "price", "category", "title")
_NEVER_MS = np.iinfo(np.int64).min
_PRICE_FIELD = UPDATE_FIELDS.index("price")
_CATEGORY_FIELD = UPDATE_FIELDS.index("category")
_TITLE_FIELD = UPDATE_FIELDS.index("title")


@dataclass(slots=True)
class _UserState:
    # The items of the user's latest events, oldest first: once the user has
    # _HISTORY_KEPT events, at least that many and at most twice that many.
    history: list[int] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    session_items: set[int] = field(default_factory=set)
    session_id: str | None = None
    last_ms: int | None = None
    purchased: dict[int, int] = field(default_factory=dict)
    # Refunded units that no purchase learned so far covered, with the time
    # of the latest such refund: a purchase stamped earlier that arrives
    # later is cancelled by them.
    refunds: dict[int, tuple[int, int]] = field(default_factory=dict)
    # Time of the earliest event learned, None before any. States saved before
    # it was kept get _UNKNOWN_FIRST_MS, which counts as earlier than any time.
    first_ms: int | None = None
    events: int = 0

    def __setstate__(self, state: tuple[None, dict[str, Any]]) -> None:
        # A slotted class pickles as (None, {slot: value}). States written
        # while the user's last category was kept still carry it, and it is
        # dropped. Slots missing from older states stay unset, and
        # Recommender.__setstate__ fills them in.
        for name, value in state[1].items():
            if name in _USER_STATE_SLOTS:
                setattr(self, name, value)


_USER_STATE_SLOTS = frozenset(_UserState.__slots__)


def _count_units(state: _UserState, item: int, quantity: int, timestamp_ms: int) -> None:
    """Add a purchase's units to the user's balance of ``item``, or take a refund's off.

    A refund beyond the units bought so far is kept, so that a purchase
    stamped no later than it, which arrives after it, nets out. A purchase
    stamped after it was a new one and counts in full.
    """
    if quantity > 0:
        owed = state.refunds.get(item)
        if owed is not None and timestamp_ms <= owed[1]:
            cancelled = min(quantity, owed[0])
            quantity -= cancelled
            if owed[0] > cancelled:
                state.refunds[item] = (owed[0] - cancelled, owed[1])
            else:
                del state.refunds[item]
        if quantity > 0:
            state.purchased[item] = state.purchased.get(item, 0) + quantity
        return
    units = state.purchased.pop(item, 0) + quantity
    if units > 0:
        state.purchased[item] = units
    elif units < 0:
        before = state.refunds.get(item, (0, timestamp_ms))
        state.refunds[item] = (before[0] - units, max(before[1], timestamp_ms))


class Recommender:
    """Online models fused into one top-k list per user.

    Learning is batched and in event order; every event reaches every model.
    Lists leave out items that are out of stock and, unless the policy allows
    repeat purchases, the items the user bought. Results are deterministic
    for a fixed seed and event order, and the object pickles whole.

    >>> engine = Recommender(EngineConfig(k=2))
    >>> engine.learn([Event("e1", "view", "u1", "a", 0), Event("e2", "view", "u1", "b", 1000),
    ...               Event("e3", "view", "u2", "a", 2000)])
    >>> [entry.item_id for entry in engine.recommend(["u2"])[0]]
    ['a', 'b']
    >>> engine.recommend(["u2"])[0][1].sources[:1]
    ('covisit',)
    """

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config if config is not None else EngineConfig()
        config.validate()
        self.model_version = f"{VERSION}/{config.fusion}"
        self.catalog = ItemCatalog()
        self.models: dict[str, Model] = {
            "popular": PopularityModel("popular", config.popularity_half_life_ms),
            "trending": PopularityModel("trending", config.trending_half_life_ms),
            "category": CategoryModel(
                self.catalog,
                config.category_half_life_ms,
                config.category_recent,
                config.category_decay,
            ),
            "covisit": CoVisitationModel(
                window_items=config.covisit_window_items,
                window_ms=config.covisit_window_ms,
                half_life_ms=config.covisit_half_life_ms,
                backward=config.covisit_backward,
                max_neighbors=config.covisit_max_neighbors,
                recency_power=config.covisit_recency_power,
            ),
            "basket": SessionCoOccurrenceModel(
                session_gap_ms=config.basket_session_gap_ms,
                max_session_items=config.basket_max_items,
                half_life_ms=config.basket_half_life_ms,
                max_neighbors=config.basket_max_neighbors,
                score_items=config.basket_score_items,
            ),
            "recent": RecentItemsModel(config.recent_half_life_ms, config.recent_max_items),
            "mf": ImplicitMF(
                self.catalog,
                factors=config.mf_factors,
                learning_rate=config.mf_learning_rate,
                l2=config.mf_l2,
                negatives=config.mf_negatives,
                sampling_power=config.mf_sampling_power,
                seed=config.seed,
                index_min_items=config.mf_index_min_items,
                index_scan_items=config.mf_index_scan_items,
            ),
            "context": ContextModel(
                self.catalog,
                learning_rate=config.context_learning_rate,
                max_users=config.context_max_users,
                learn_every=config.context_learn_every,
                seed=config.seed + 1,
            ),
            "title": _title_model(config),
        }
        self.weights = config.weight_array()
        self.candidate_counts = config.candidate_counts()
        self.fusion = LearnedFusion(MODEL_NAMES, prior_rate=config.fusion_prior_rate)
        self.selector = OrderSelector(
            ORDER_POLICIES, depth=config.fusion_select_depth, z=config.fusion_select_z
        )
        self._rebuyable = {
            self.catalog.category_row(name) for name in config.rebuyable_categories or ()
        }
        self._users: dict[str, _UserState] = {}
        # The last user's candidates, kept until the state changes, because
        # the evaluation scores a user right before learned fusion scores the
        # same user from the same state.
        self._last_scored: CandidateScores | None = None
        # Per item row, the timestamp of the update that last set each of UPDATE_FIELDS.
        self._update_ms = np.full((0, len(UPDATE_FIELDS)), _NEVER_MS, dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_last_scored"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_last_scored", None)
        # States written while exploration drew from one shared generator.
        state.pop("_rng", None)
        # States written before update times were kept let the next update of any field win.
        state.setdefault("_update_ms", np.full((0, len(UPDATE_FIELDS)), _NEVER_MS, dtype=np.int64))
        self.__dict__.update(state)
        if "title" not in self.models:
            self._add_title_model()
        for user_state in self._users.values():
            if not hasattr(user_state, "first_ms"):
                user_state.first_ms = _UNKNOWN_FIRST_MS
            if not hasattr(user_state, "refunds"):
                user_state.refunds = {}
            if not hasattr(user_state, "events"):
                # Older states kept every event in the history.
                user_state.events = len(user_state.history)
                del user_state.history[:-_HISTORY_KEPT]
        category = self.models.get("category")
        if isinstance(category, CategoryModel):
            # A state written before the category model counted users starts
            # from a copy of the event popularity and its half-life. The
            # counts must decay at the configured half-life instead.
            category.scores.half_life_ms = float(self.config.category_half_life_ms)

    def set_serving_options(self, config: EngineConfig) -> None:
        """Take the options of ``config`` that shape lists, keeping what was learned.

        A restored state was built under the options of the worker that
        saved it. The list length, fusion strategy, weights, purchase policy,
        category cap and exploration share apply to scoring only, so the
        current ones replace them. The other options shaped the learned
        state and stay as they were.
        """
        config = replace(
            self.config,
            k=config.k,
            fusion=config.fusion,
            weights=config.weights,
            repeat_purchases=config.repeat_purchases,
            rebuyable_categories=config.rebuyable_categories,
            max_per_category=config.max_per_category,
            exploration=config.exploration,
        )
        config.validate()
        self.config = config
        self.model_version = f"{VERSION}/{config.fusion}"
        self.weights = config.weight_array()
        self._rebuyable = {
            self.catalog.category_row(name) for name in config.rebuyable_categories or ()
        }
        self._last_scored = None

    def _add_title_model(self) -> None:
        # A state saved before the title model existed gets an empty one, and
        # titles arrive again with events and item updates. Learned fusion and
        # the order selector count it from their priors, as for a new worker.
        config = self.config
        self.models["title"] = _title_model(config)
        self.fusion.add_model("title", config.fusion_prior_rate)
        self.selector.add_policy("title")
        self.weights = config.weight_array()
        self.candidate_counts = config.candidate_counts()
        logger.info("added the title model to a state written without it")

    # Learning

    def learn(self, events: Sequence[Event]) -> None:
        """Apply events in the given order to every model.

        Learned fusion learns test-then-train from one event in
        ``fusion_learn_every``, chosen by event id: right before such an
        event is applied, the fusion scores the user's candidates from the
        state the event arrives to and learns where the event's item ranked.
        The events between two of those are applied as one batch of at most
        ``learn_chunk``. So the fusion learns from what the models would have
        served, whenever lists happen to be refreshed, and a restarted worker
        that takes a backlog in large batches learns nearly what a worker that
        took the events one by one learns.

        NOTE: matrix factorization takes one SGD step per batch and rebuilds
        its ring of negatives between batches, and where a batch ends depends
        on where the call started. So `mf` and the lists it feeds still differ
        slightly between two such workers.
        """
        every = self.config.fusion_learn_every
        keys = stable_hashes(event.event_id for event in events)
        start = 0
        for index, event in enumerate(events):
            sampled = every > 0 and not event.is_refund and int(keys[index]) % every == 0
            if sampled or index - start >= self.config.learn_chunk:
                self._learn_batch(events[start:index], keys[start:index])
                start = index
            if sampled:
                self._learn_fusion(event)
        self._learn_batch(events[start:], keys[start:])

    def _learn_batch(self, events: Sequence[Event], keys: UInt64Array) -> None:
        if not events:
            return
        self._last_scored = None
        batch = self._batch(events)
        batch._event_hashes = keys
        for model in self.models.values():
            model.learn(batch)
        self._update_users(batch)

    def _batch(self, events: Sequence[Event]) -> EventBatch:
        type_weights = self.config.type_weights
        purchase_weight = type_weights["purchase"]
        items = np.empty(len(events), dtype=np.int64)
        weights = np.empty(len(events), dtype=np.float64)
        times = np.empty(len(events), dtype=np.int64)
        categories = np.empty(len(events), dtype=np.int64)
        catalog_size_before = len(self.catalog)
        for index, event in enumerate(events):
            weight = type_weights.get(event.type)
            if weight is None:
                msg = f"event type is {event.type!r}; expected one of {', '.join(EVENT_TYPES)}"
                raise ModelError(msg)
            row = self._add_event_item(event)
            items[index] = row
            weights[index] = -purchase_weight if event.is_refund else weight
            times[index] = event.timestamp_ms
            # Read now, not after the batch: a later event of the batch can
            # give the item a category that this event's user never saw.
            categories[index] = self.catalog.category_of(row)
        first_touch = self._first_touches(events, items)
        return EventBatch(
            events, items, weights, times, categories, first_touch, catalog_size_before
        )

    def _add_event_item(self, event: Event) -> int:
        """Return the row of the event's item, taking its category, price and title unless stale.

        An event that carries one of these fields sets it as an item update
        stamped with the event's timestamp would: a field that an update or
        event stamped later has already set keeps its value.
        """
        category = event.category or None
        price = event.price
        title = event.title or None
        row = self.catalog.add(event.item_id)
        if category is None and price is None and title is None:
            return row
        self._update_ms = grow_rows(self._update_ms, row + 1, _NEVER_MS)
        times = self._update_ms[row]
        stamp = event.timestamp_ms
        if category is not None:
            if stamp >= times[_CATEGORY_FIELD]:
                times[_CATEGORY_FIELD] = stamp
            else:
                category = None
        if price is not None:
            if stamp >= times[_PRICE_FIELD]:
                times[_PRICE_FIELD] = stamp
            else:
                price = None
        if title is not None and stamp >= times[_TITLE_FIELD]:
            times[_TITLE_FIELD] = stamp
            title_model = self.models.get("title")
            if isinstance(title_model, TitleModel):
                title_model.set_title(row, title)
        self.catalog.add(event.item_id, category, price)
        return row

    def _first_touches(self, events: Sequence[Event], items: IntArray) -> npt.NDArray[np.bool_]:
        first = np.zeros(len(events), dtype=bool)
        touched: set[tuple[str, int]] = set()
        users = self._users
        for index, (event, item) in enumerate(zip(events, items.tolist(), strict=True)):
            key = (event.user_id, item)
            if key in touched:
                continue
            # A refund is not a first touch, but the user's history records its
            # item. So later events of the batch count as repeats, as they would
            # in the next batch.
            touched.add(key)
            if event.is_refund:
                continue
            state = users.get(event.user_id)
            first[index] = state is None or item not in state.seen
        return first

    def _update_users(self, batch: EventBatch) -> None:
        items = batch.items.tolist()
        for event, item in zip(batch.events, items, strict=True):
            state = self._users.get(event.user_id)
            if state is None:
                state = self._users[event.user_id] = _UserState()
            # Batches are in time order only within themselves, so a late
            # event can be earlier than the first one learned.
            if state.first_ms is None or event.timestamp_ms < state.first_ms:
                state.first_ms = event.timestamp_ms
            state.events += 1
            state.history.append(item)
            if len(state.history) > 2 * _HISTORY_KEPT:
                del state.history[:-_HISTORY_KEPT]
            state.seen.add(item)
            if not self._is_late(state, event):
                if self._new_session(state, event):
                    state.session_items = set()
                state.session_items.add(item)
                if state.last_ms is None or event.timestamp_ms >= state.last_ms:
                    state.session_id = event.session_id
                    state.last_ms = event.timestamp_ms
            if event.type == "purchase":
                # A purchase without a quantity is one unit, and a refund's is negative.
                quantity = 1 if event.quantity is None else event.quantity
                _count_units(state, item, quantity, event.timestamp_ms)

    def _is_late(self, state: _UserState, event: Event) -> bool:
        # An out-of-order event with another session id, or without ids more
        # than a session gap older, belongs to an earlier session.
        if state.last_ms is None or event.timestamp_ms >= state.last_ms:
            return False
        if event.session_id is not None and state.session_id is not None:
            return event.session_id != state.session_id
        return state.last_ms - event.timestamp_ms > self.config.session_gap_ms

    def _new_session(self, state: _UserState, event: Event) -> bool:
        if state.last_ms is None:
            return True
        if event.session_id is not None and state.session_id is not None:
            return event.session_id != state.session_id
        return event.timestamp_ms - state.last_ms > self.config.session_gap_ms

    def _learn_fusion(self, event: Event) -> None:
        if event.user_id not in self._users:
            return
        scored = self.candidate_scores(event.user_id)
        item = self.catalog.index.get(event.item_id)
        target = None
        if item is not None:
            position = int(np.searchsorted(scored.items, item))
            if position < len(scored.items) and scored.items[position] == item:
                target = position
        if target is not None and self.config.fusion_select_order:
            keys = self._policy_keys(scored)
            self.selector.record(keys, scored.groups, target, scored.cold)
        self.fusion.update(scored.fusion_ranks, scored.mask, scored.groups, target, scored.cold)

    # Item updates and erasure

    def update_item(self, update: ItemUpdate) -> tuple[str, ...]:
        """Apply a change of stock, price, category or title, and return the fields left stale.

        Updates may arrive out of order, so each field keeps the value of the
        newest update that set it, by the updates' timestamps. A field of an
        update older than that one is stale and left as it is, and of two
        updates with the same timestamp the later one wins. The change shows
        at the next `recommend`.

        An event that carries a category, a price or a title takes part in
        the same order, as an update of those fields at the event's timestamp.
        """
        self._last_scored = None
        row = self.catalog.add(update.item_id)
        self._update_ms = grow_rows(self._update_ms, row + 1, _NEVER_MS)
        carried = [name for name in UPDATE_FIELDS if getattr(update, name) is not None]
        if update.category == "":
            # An empty category keeps the last one, as a field left out does.
            carried.remove("category")
        times = self._update_ms[row]
        columns = {name: UPDATE_FIELDS.index(name) for name in carried}
        fresh = [name for name in carried if update.timestamp_ms >= times[columns[name]]]
        for name in fresh:
            times[columns[name]] = update.timestamp_ms
        self.catalog.add(
            update.item_id,
            update.category if "category" in fresh else None,
            update.price if "price" in fresh else None,
        )
        if "in_stock" in fresh:
            assert update.in_stock is not None
            self.catalog.set_stock(row, update.in_stock)
        if "title" in fresh:
            assert update.title is not None
            title_model = self.models["title"]
            assert isinstance(title_model, TitleModel)
            title_model.set_title(row, update.title)
        category_model = self.models["category"]
        assert isinstance(category_model, CategoryModel)
        category_model.refresh_items(np.array([row], dtype=np.int64))
        return tuple(name for name in carried if name not in fresh)

    def replace_session_ids(self, token: Callable[[str], str]) -> None:
        """Replace every stored session id with ``token`` of it, as ids of new events will be.

        Session ids are only compared for equality, so a one-to-one
        ``token`` changes no session and no ranking.
        """
        for state in self._users.values():
            if state.session_id is not None:
                state.session_id = token(state.session_id)
        basket = self.models.get("basket")
        if isinstance(basket, SessionCoOccurrenceModel):
            basket.replace_session_ids(token)

    def forget_user(self, user_id: str) -> None:
        """Remove every trace of the user from the engine and every model."""
        self._last_scored = None
        self._users.pop(user_id, None)
        for model in self.models.values():
            model.forget_user(user_id)

    def user_ids(self) -> list[str]:
        """Return the id of every user the engine holds state for."""
        return list(self._users)

    def user_event_times(self, user_id: str) -> tuple[int | None, int | None]:
        """Return the times of the user's earliest and last learned events, None without events.

        The last time is that of the newest event, whatever order the events
        arrived in. A state saved before the earliest time was kept reports
        it as -1.
        """
        state = self._users.get(user_id)
        if state is None:
            return None, None
        return state.first_ms, state.last_ms

    def count_purchases(self, events: Sequence[Event]) -> None:
        """Count the units of purchases and refunds that the models do not learn.

        A worker keeps events beyond its flood limits out of the models, but
        the buyer's list must still leave out what they bought, and a refund
        must bring the item back. Only the buyer's balance of units changes.
        """
        # The scores kept for the last user scored may leave out an item
        # bought now, or keep out one refunded now.
        self._last_scored = None
        for event in events:
            if event.type != "purchase":
                continue
            state = self._users.get(event.user_id)
            if state is None:
                state = self._users[event.user_id] = _UserState()
            row = self.catalog.add(event.item_id)
            quantity = 1 if event.quantity is None else event.quantity
            _count_units(state, row, quantity, event.timestamp_ms)

    def has_user(self, user_id: str) -> bool:
        """Return whether the engine has learned any event of the user."""
        return user_id in self._users

    def user_history(self, user_id: str) -> list[str]:
        """Return the item ids of the user's latest 100 events, in the order learned."""
        state = self._users.get(user_id)
        if state is None:
            return []
        ids = self.catalog.ids
        return [ids[row] for row in state.history[-_HISTORY_KEPT:]]

    def user_event_count(self, user_id: str) -> int:
        """Return how many events of the user the engine has learned."""
        state = self._users.get(user_id)
        return 0 if state is None else state.events

    def stats(self) -> dict[str, Any]:
        """Return counts and the estimated bytes of state per model."""
        return {
            "n_users": len(self._users),
            "n_items": len(self.catalog),
            "bytes": {name: model.state_bytes() for name, model in self.models.items()},
            "fusion_updates": {
                "cold": self.fusion.updates[True],
                "warm": self.fusion.updates[False],
            },
        }

    # Ranking

    def is_cold(self, user_id: str) -> bool:
        """Return whether the user has fewer events than ``cold_events``."""
        state = self._users.get(user_id)
        return state is None or state.events < self.config.cold_events

    def _blocked(self, user_id: str, items: IntArray) -> IntArray:
        keep = self.catalog.in_stock[items]
        state = self._users.get(user_id)
        if self.config.repeat_purchases == "exclude" and state is not None and state.purchased:
            purchased = state.purchased
            bought = np.array([row in purchased for row in items.tolist()], dtype=bool)
            if self._rebuyable and bought.any():
                categories = self.catalog.categories[items]
                rebuyable = np.array([c in self._rebuyable for c in categories.tolist()])
                bought &= ~rebuyable
            keep &= ~bought
        return items[keep]

    def candidate_scores(self, user_id: str, exclude: Collection[int] = ()) -> CandidateScores:
        """Collect candidates from every model and score them with every model.

        ``exclude`` lists catalog rows to leave out beside the filters.
        """
        last = self._last_scored
        if last is not None and last.user_id == user_id and not exclude:
            return last
        parts = [
            self.models[name].candidates(user_id, count)
            for name, count in self.candidate_counts.items()
            if count > 0
        ]
        items = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
        items = self._blocked(user_id, items)
        if exclude:
            drop = np.fromiter(exclude, dtype=np.int64, count=len(exclude))
            items = items[~np.isin(items, drop)]
        scores = np.zeros((len(MODEL_NAMES), len(items)), dtype=np.float64)
        mask = np.zeros((len(MODEL_NAMES), len(items)), dtype=bool)
        for row, name in enumerate(MODEL_NAMES):
            scored, values = self.models[name].score(user_id, items)
            if len(scored) == 0:
                continue
            finite = np.isfinite(values)
            if not finite.all():
                scored = scored[finite]
                values = values[finite]
            positions = np.searchsorted(items, scored)
            scores[row, positions] = values
            mask[row, positions] = True
        normalized = normalize(scores, mask)
        groups = self._groups(user_id, items)
        untouched = groups == 0
        separate = self.config.fusion_untouched_ranks and not untouched.all()
        rank_matrix, among_untouched = ranks_with_subset(
            normalized, mask, untouched if separate else None
        )
        if among_untouched is None:
            fusion_ranks = rank_matrix
        else:
            # A list of items new to the user ranks them without the rest.
            fusion_ranks = np.where(untouched[None, :], among_untouched, rank_matrix)
        result = CandidateScores(
            user_id,
            items,
            scores,
            normalized,
            mask,
            rank_matrix,
            groups,
            self.is_cold(user_id),
            fusion_ranks,
        )
        if not exclude:
            self._last_scored = result
        return result

    def _groups(self, user_id: str, items: IntArray) -> IntArray:
        state = self._users.get(user_id)
        if state is None:
            return np.zeros(len(items), dtype=np.int64)
        session = state.session_items
        seen = state.seen
        # A list filled in one pass costs less than setting array entries one by one.
        groups: list[int] = []
        for row in items.tolist():
            if row in session:
                groups.append(1)
            elif row in seen:
                groups.append(2)
            else:
                groups.append(0)
        return np.array(groups, dtype=np.int64)

    def fused(self, scored: CandidateScores, strategy: str) -> FloatArray:
        """Return one fused score per candidate under ``strategy``, or one model's name.

        A fusion strategy gives minus infinity, which leaves the candidate
        out of the list, to candidates that no model of weight above 0 scored.
        """
        if strategy in FUSION_STRATEGIES:
            enabled = scored.mask & (self.weights > 0)[:, None]
            fused = self._fused_by_strategy(scored, strategy, enabled)
            return np.where(enabled.any(axis=0), fused, -np.inf)
        if strategy in MODEL_NAMES:
            row = MODEL_NAMES.index(strategy)
            return np.where(scored.mask[row], scored.normalized[row], -np.inf)
        msg = f"strategy is {strategy!r}; expected one of {FUSION_STRATEGIES + MODEL_NAMES}"
        raise ModelError(msg)

    def _fused_by_strategy(
        self, scored: CandidateScores, strategy: str, enabled: BoolMatrix
    ) -> FloatArray:
        if strategy == "weighted":
            return weighted_fusion(scored.normalized, scored.mask, self.weights)
        if strategy == "rrf":
            return rrf_fusion(scored.ranks, scored.mask, self.weights)
        learned = self.fusion.score(scored.fusion_ranks, enabled, scored.groups, scored.cold)
        learned = self._order_unproven_groups(scored, learned)
        if not self.config.fusion_select_order:
            return learned
        keys = self._policy_keys(scored, learned)
        return self.selector.reorder(keys, learned, scored.groups, scored.cold)

    def _order_unproven_groups(self, scored: CandidateScores, fused: FloatArray) -> FloatArray:
        # Hits are rare, and rates learned from a few dozen of them flip the
        # order of a whole group with every new hit. Until the fusion has
        # seen ``fusion_min_hits`` next items in a candidate group, the
        # group keeps its fused values but hands them out in the order of the
        # fixed weights, so that lists are stable while the fusion learns.
        proven = self.fusion.group_hits[scored.cold] >= self.config.fusion_min_hits
        if self.config.fusion_fixed_new_order:
            # In every evaluation, learned rates ordered the items new to the
            # user worse than the fixed weights, so that group keeps the fixed order.
            proven[0] = False
        if proven.all():
            return fused
        fixed = weighted_fusion(scored.normalized, scored.mask, self.weights)
        out = fused.copy()
        for group in np.flatnonzero(~proven).tolist():
            members = np.flatnonzero(scored.groups == group)
            if not len(members):
                continue
            order = members[np.lexsort((scored.items[members], -fixed[members]))]
            out[order] = descending_values(fused[members])
        return out

    def _policy_keys(
        self, scored: CandidateScores, learned: FloatArray | None = None
    ) -> FloatArray:
        """Return one row of ordering keys per entry of `ORDER_POLICIES`."""
        enabled = scored.mask & (self.weights > 0)[:, None]
        if learned is None:
            learned = self.fusion.score(scored.fusion_ranks, enabled, scored.groups, scored.cold)
            learned = self._order_unproven_groups(scored, learned)
        keys = np.empty((len(ORDER_POLICIES), scored.mask.shape[1]), dtype=np.float64)
        keys[0] = learned
        keys[1] = weighted_fusion(scored.normalized, enabled, self.weights)
        keys[2] = rrf_fusion(scored.ranks, enabled, self.weights)
        keys[3:] = np.where(enabled, scored.normalized, -np.inf)
        return keys

    def top_rows(
        self,
        scored: CandidateScores,
        scores: FloatArray,
        k: int,
        allowed: npt.NDArray[np.bool_] | None = None,
        pad_exclude: Collection[int] = (),
    ) -> tuple[list[int], list[float]]:
        """Return the best ``k`` candidate rows by ``scores``, then padding from popularity.

        Candidates with a score of minus infinity are left out. ``allowed``
        is an optional boolean mask over the candidates; padding skips every
        candidate that was not taken and the rows in ``pad_exclude``. Padding
        items get scores just below the last ranked one.
        """
        valid = np.isfinite(scores)
        if allowed is not None:
            valid &= allowed
        chosen = np.flatnonzero(valid)
        order = chosen[np.lexsort((scored.items[chosen], -scores[chosen]))]
        rows: list[int] = []
        values: list[float] = []
        per_category: dict[int, int] = {}
        for position in order.tolist():
            row = int(scored.items[position])
            if not self._within_cap(row, per_category):
                continue
            rows.append(row)
            values.append(float(scores[position]))
            if len(rows) == k:
                break
        if len(rows) < k:
            self._pad(scored, rows, values, k, per_category, pad_exclude)
        return rows, values

    def _pad(
        self,
        scored: CandidateScores,
        rows: list[int],
        values: list[float],
        k: int,
        per_category: dict[int, int],
        pad_exclude: Collection[int] = (),
    ) -> None:
        # Candidates that a model of weight above 0 scored but that were not
        # taken were left out on purpose. Those that only models of weight 0
        # scored are padded like items that no model proposed, unless a list
        # ordered by such a model already contains them.
        proposed = (scored.mask & (self.weights > 0)[:, None]).any(axis=0)
        skip = set(scored.items[proposed].tolist()) | set(pad_exclude) | set(rows)
        # The first window leaves out the skipped candidates, most of which are
        # not popular, so that the popularity cache stays small.
        window = 4 * k + len(rows) + len(pad_exclude)
        need = k - len(rows)
        padding = self._leading_rows("popular", scored.user_id, need, skip, per_category, window)
        floor = values[-1] if values else 0.0
        for row in padding:
            floor = math.nextafter(floor, -math.inf) if values else floor - 1e-9
            rows.append(row)
            values.append(floor)

    def _within_cap(self, row: int, per_category: dict[int, int]) -> bool:
        """Count ``row`` against the category cap; return False when its category is full."""
        cap = self.config.max_per_category
        if cap is None:
            return True
        category = int(self.catalog.categories[row])
        if category == NO_CATEGORY:
            return True
        if per_category.get(category, 0) >= cap:
            return False
        per_category[category] = per_category.get(category, 0) + 1
        return True

    def _leading_rows(
        self,
        model_name: str,
        user_id: str,
        k: int,
        skip: Collection[int] = (),
        per_category: dict[int, int] | None = None,
        window: int | None = None,
    ) -> list[int]:
        """Return up to ``k`` of a model's leading rows that pass the list filters, best first.

        The filters are the ones of every list: stock, purchases, the rows in
        ``skip`` and the category cap, whose counts ``per_category`` carries in
        and out. The window of leading rows grows until ``k`` rows pass or the
        model has no more, so a run of sold-out leaders cannot shorten a list,
        up to 64 times the first window.
        ``window`` sets the first window, by default ``4 * k`` plus the skipped rows.
        """
        if k <= 0:
            return []
        model = self.models[model_name]
        want = 4 * k + len(skip) if window is None else max(window, k)
        # Three rounds at most: a category cap that k items cannot meet would
        # otherwise read every item of the catalog for every list.
        max_want = 64 * want
        while True:
            leading = model.candidates(user_id, want)
            counts = dict(per_category) if per_category is not None else {}
            rows: list[int] = []
            for row in self._blocked(user_id, leading).tolist():
                if row in skip or not self._within_cap(row, counts):
                    continue
                rows.append(row)
                if len(rows) == k:
                    break
            if len(rows) == k or len(leading) < want or want >= max_want:
                if per_category is not None:
                    per_category.update(counts)
                return rows
            want *= 4

    def recommend(
        self, user_ids: Sequence[str], k: int | None = None
    ) -> list[list[RecommendedItem]]:
        """Return each user's top-k list, best first, with the models behind each item.

        Unknown users get trending items, padded from popularity. Known users
        get the configured fusion; learned fusion keeps separate hit rates for
        users with fewer than ``cold_events`` events.
        """
        k = self.config.k if k is None else k
        if k < 1:
            msg = f"k is {k}; expected at least 1"
            raise ModelError(msg)
        return [self._recommend_one(user_id, k) for user_id in user_ids]

    def _recommend_one(self, user_id: str, k: int) -> list[RecommendedItem]:
        if user_id not in self._users:
            return self._trending(user_id, k)
        scored = self.candidate_scores(user_id)
        scores = self.fused(scored, self.config.fusion)
        # The share applies to the k items shown. A longer list requested
        # carries spares after them, which replace sold-out items.
        visible = min(k, self.config.k)
        n_explore = int(visible * self.config.exploration)
        rows, values = self.top_rows(scored, scores, k)
        sources = self._sources(scored, rows)
        if n_explore:
            rows, values, sources = self._explore(
                scored.user_id, rows, values, sources, n_explore, visible - n_explore, k
            )
        ids = self.catalog.ids
        return [
            RecommendedItem(ids[row], value, source)
            for row, value, source in zip(rows, values, sources, strict=True)
        ]

    def _sources(self, scored: CandidateScores, rows: list[int]) -> list[tuple[str, ...]]:
        """Name the models behind each row, largest weighted score first, ties by name.

        Models of weight 0 add nothing to a fused score and are not named.
        Rows that no model of weight above 0 scored came from popularity
        padding.
        """
        if not rows or len(scored.items) == 0:
            return [("popular",)] * len(rows)
        positions, is_candidate = find_sorted(scored.items, np.asarray(rows, dtype=np.int64))
        opinions = (scored.mask & (self.weights > 0)[:, None])[:, positions].T
        weighted = (self.weights[:, None] * scored.normalized[:, positions]).T
        keys = np.where(opinions, -weighted, np.inf)
        order = np.lexsort((np.broadcast_to(_NAME_ORDER, keys.shape), keys), axis=-1)
        counts = opinions.sum(axis=1).tolist()
        out: list[tuple[str, ...]] = []
        found = is_candidate.tolist()
        for models, count, candidate in zip(order.tolist(), counts, found, strict=True):
            if candidate and count:
                out.append(tuple(MODEL_NAMES[m] for m in models[:count]))
            else:
                out.append(("popular",))
        return out

    def _explore(
        self,
        user_id: str,
        rows: list[int],
        values: list[float],
        sources: list[tuple[str, ...]],
        n_explore: int,
        position: int,
        k: int,
    ) -> tuple[list[int], list[float], list[tuple[str, ...]]]:
        """Return the ranked list with up to ``n_explore`` trending items drawn in at ``position``.

        The draw is seeded by the engine's seed, the user and the user's
        event count, so it does not depend on which other lists were served
        before. Explored items obey the list filters and the category cap
        like the rest. The list keeps its ``k`` items: ranked items that a
        drawn one displaces or that would break the cap make room, and
        popular items fill any slot still open.
        """
        at = min(position, len(rows))
        counts: dict[int, int] = {}
        for row in rows[:at]:
            self._within_cap(row, counts)
        pool = self._leading_rows("trending", user_id, 10 * n_explore, set(rows[:at]), dict(counts))
        user_hash = int(stable_hashes([user_id])[0])
        seed = [self.config.seed % 2**64, user_hash, self._users[user_id].events]
        order = np.random.default_rng(seed).permutation(len(pool)).tolist()
        picked: list[int] = []
        for index in order:
            if self._within_cap(pool[index], counts):
                picked.append(pool[index])
                if len(picked) == n_explore:
                    break
        if not picked:
            return rows, values, sources
        # Drawn items show in their order on the trending list.
        picked.sort(key=pool.index)
        out_rows = rows[:at] + picked
        out_values = values[:at]
        out_sources = sources[:at] + [("explore",)] * len(picked)
        # Scores stay strictly descending: each explored item scores just
        # below the entry before it, and the ranked items after them below those.
        previous = values[at - 1] if at else 0.0
        for _ in picked:
            previous = math.nextafter(previous, -math.inf)
            out_values.append(previous)
        taken = set(out_rows)
        for row, value, source in zip(rows[at:], values[at:], sources[at:], strict=True):
            if len(out_rows) == k:
                break
            if row in taken or not self._within_cap(row, counts):
                continue
            previous = min(value, math.nextafter(previous, -math.inf))
            out_rows.append(row)
            out_values.append(previous)
            out_sources.append(source)
            taken.add(row)
        padding = self._leading_rows("popular", user_id, k - len(out_rows), taken, counts)
        for row in padding:
            previous = math.nextafter(previous, -math.inf)
            out_rows.append(row)
            out_values.append(previous)
            out_sources.append(("popular",))
        return out_rows, out_values, out_sources

    def _trending(self, user_id: str, k: int) -> list[RecommendedItem]:
        per_category: dict[int, int] = {}
        rows = self._leading_rows("trending", user_id, k, per_category=per_category)
        trending = self.models["trending"]
        scored_rows, scores = trending.score(user_id, np.array(rows, dtype=np.int64))
        out = _normalized_entries(self.catalog.ids, scored_rows, scores, ("trending",))
        padding = self._leading_rows(
            "popular", user_id, k - len(out), set(scored_rows.tolist()), per_category
        )
        for row in padding:
            floor = out[-1].score if out else 1.0
            out.append(
                RecommendedItem(self.catalog.ids[row], math.nextafter(floor, -1.0), ("popular",))
            )
        return out

    def popular(self, k: int | None = None) -> list[RecommendedItem]:
        """Return the most popular items in stock, scores scaled to the leader's.

        The category cap applies, as in every list.
        """
        k = self.config.k if k is None else k
        model = self.models["popular"]
        rows = np.array(self._leading_rows("popular", "", k), dtype=np.int64)
        scored_rows, scores = model.score("", rows)
        return _normalized_entries(self.catalog.ids, scored_rows, scores, ("popular",))


def _title_model(config: EngineConfig) -> TitleModel:
    return TitleModel(
        recent_items=config.title_recent_items,
        recency_power=config.title_recency_power,
        max_word_items=config.title_max_word_items,
    )


def _normalized_entries(
    ids: list[str], rows: IntArray, scores: FloatArray, sources: tuple[str, ...]
) -> list[RecommendedItem]:
    if len(rows) == 0:
        return []
    order = np.lexsort((rows, -scores))
    leader = float(scores[order[0]])
    return [
        RecommendedItem(ids[int(rows[i])], float(scores[i]) / leader, sources)
        for i in order.tolist()
    ]
