"""Online implicit matrix factorization in numpy."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import numpy.typing as npt

from models.base import (
    EventBatch,
    FloatArray,
    IntArray,
    ItemCatalog,
    ModelError,
    best_rows,
    stable_hash,
)
from models.retrieval import CellIndex
from models.sampling import KeyedSampler, keyed_normals

logger = logging.getLogger(__name__)

_EMPTY_ROWS = np.zeros(0, dtype=np.int64)
_EMPTY_SCORES = np.zeros(0, dtype=np.float64)
Float32Array = npt.NDArray[np.float32]
# Up to this many entries, `row_totals` sums in a dictionary, because
# np.unique costs more than the loop on the few rows of a small batch.
_DICT_TOTALS_MAX = 64
# The ring of negatives keeps about this many points, 12 bytes each, or 4
# per item where the catalog is larger. Both evaluation files stay below it,
# so their negatives are drawn as without the limit.
RING_MIN_POINTS = 1 << 20
RING_POINTS_PER_ITEM = 4


def row_totals(rows: IntArray, values: FloatArray) -> FloatArray:
    """Return for each entry the sum of the values of every entry with its row.

    Each row's values are added in entry order starting from 0, as
    ``np.bincount`` adds them, so both paths give the same sums to the last bit.

    >>> row_totals(np.array([3, 7, 3]), np.array([1.0, 2.0, 0.5])).tolist()
    [1.5, 2.0, 1.5]
    """
    if len(rows) > _DICT_TOTALS_MAX:
        unique, inverse = np.unique(rows, return_inverse=True)
        sums = np.bincount(inverse, weights=values, minlength=len(unique))
        return np.asarray(sums[inverse], dtype=np.float64)
    totals: dict[int, float] = {}
    row_list = rows.tolist()
    for row, value in zip(row_list, values.tolist(), strict=True):
        totals[row] = totals.get(row, 0.0) + value
    return np.array([totals[row] for row in row_list], dtype=np.float64)


class ImplicitMF:
    """Logistic matrix factorization learned online from implicit feedback.

    Each event is a positive example weighted by its type weight. It brings
    ``negatives`` items drawn with probability proportional to
    ``(count + 1) ** sampling_power``, so popular items are the usual
    negatives, and a draw equal to the event's own item is left out. One SGD
    step with L2 runs over a whole batch at once, and a
    row with many events in the batch takes a smaller rate, so that the sum
    of its steps cannot overshoot (see `_row_rates`). User and
    item tables are float32 and grow as ids arrive. Every random draw is keyed
    by an id and ``seed``: a new vector by its user or item id, the negatives
    of an event by its event id. So the tables do not depend on the order in
    which items first arrive, nor on how events are cut into batches, beyond
    the SGD step itself. Users with no vector get no scores: scoring never
    creates one.

    >>> from schemas import Event
    >>> from models.engine import Recommender
    >>> engine = Recommender()
    >>> engine.learn([Event("e1", "view", "u1", "a", 0)])
    >>> items, scores = engine.models["mf"].score("u1", np.array([0]))
    >>> items.tolist(), bool(np.isfinite(scores).all())
    ([0], True)
    >>> engine.models["mf"].score("nobody", np.array([0]))[0].tolist()
    []
    """

    def __init__(
        self,
        catalog: ItemCatalog,
        factors: int = 32,
        learning_rate: float = 0.05,
        l2: float = 0.01,
        negatives: int = 3,
        sampling_power: float = 0.75,
        init_scale: float = 0.1,
        seed: int = 0,
        index_min_items: int = 200_000,
        index_scan_items: int = 100_000,
    ) -> None:
        if factors < 1:
            msg = f"factors is {factors}; expected at least 1"
            raise ModelError(msg)
        if negatives < 0:
            msg = f"negatives is {negatives}; expected 0 or more"
            raise ModelError(msg)
        if not (math.isfinite(learning_rate) and learning_rate >= 0):
            msg = f"learning_rate is {learning_rate}; expected a finite number >= 0"
            raise ModelError(msg)
        if not (math.isfinite(l2) and l2 >= 0):
            msg = f"l2 is {l2}; expected a finite number >= 0"
            raise ModelError(msg)
        self.name = "mf"
        self.catalog = catalog
        self.factors = factors
        self.learning_rate = learning_rate
        self.l2 = l2
        self.negatives = negatives
        self.sampling_power = sampling_power
        self.init_scale = init_scale
        self._user_salt = np.uint64(stable_hash("mf:user", seed))
        self._item_salt = np.uint64(stable_hash("mf:item", seed))
        self._negative_salt = np.uint64(stable_hash("mf:negative", seed))
        self._sampler = KeyedSampler()
        self.user_rows: dict[str, int] = {}
        self._free_rows: list[int] = []
        self._user_factors: Float32Array = np.zeros((0, factors), dtype=np.float32)
        self._item_factors: Float32Array = np.zeros((0, factors), dtype=np.float32)
        self._n_items = 0
        self._counts = np.zeros(0, dtype=np.float64)
        self._sampler_items = 0
        self._events_since_sampler = 0
        self.index_min_items = index_min_items
        self.index_scan_items = index_scan_items
        self._seed = seed
        self._index: CellIndex | None = None
        self._learned_since_index = 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("index_min_items", 200_000)
        state.setdefault("index_scan_items", 100_000)
        state.setdefault("_seed", 0)
        state.setdefault("_index", None)
        state.setdefault("_learned_since_index", 0)
        self.__dict__.update(state)
        if self._index is not None:
            # The pickle keeps the cells but not the index's copy of the
            # vectors, which equals the item table in cell order.
            self._index.attach(self.item_factors())

    @property
    def n_items(self) -> int:
        """Number of item rows with a vector."""
        return self._n_items

    def item_factors(self) -> Float32Array:
        """Return the item table, one row per catalog item seen so far."""
        return self._item_factors[: self._n_items]

    def user_vector(self, user_id: str) -> Float32Array | None:
        """Return the user's vector, or ``None`` when the user has none."""
        row = self.user_rows.get(user_id)
        return None if row is None else self._user_factors[row]

    def _initial_vectors(self, keys: npt.NDArray[np.uint64]) -> Float32Array:
        return keyed_normals(keys, self.factors, self.init_scale).astype(np.float32)

    def _ensure_items(self, size: int) -> None:
        if size <= self._n_items:
            return
        if size > len(self._item_factors):
            grown = np.zeros((max(size, 2 * len(self._item_factors), 16), self.factors), np.float32)
            grown[: self._n_items] = self._item_factors[: self._n_items]
            self._item_factors = grown
            counts = np.zeros(len(grown), dtype=np.float64)
            counts[: len(self._counts)] = self._counts
            self._counts = counts
        keys = self.catalog.hashes[self._n_items : size] ^ self._item_salt
        self._item_factors[self._n_items : size] = self._initial_vectors(keys)
        self._n_items = size

    def _user_row(self, user_id: str) -> int:
        row = self.user_rows.get(user_id)
        if row is not None:
            return row
        if self._free_rows:
            row = self._free_rows.pop()
        else:
            row = len(self.user_rows)
            if row >= len(self._user_factors):
                capacity = max(row + 1, 2 * len(self._user_factors), 16)
                grown = np.zeros((capacity, self.factors), dtype=np.float32)
                grown[: len(self._user_factors)] = self._user_factors
                self._user_factors = grown
        key = np.array([stable_hash(user_id)], dtype=np.uint64) ^ self._user_salt
        self._user_factors[row] = self._initial_vectors(key)[0]
        self.user_rows[user_id] = row
        return row

    def _sample_negatives(self, keys: npt.NDArray[np.uint64]) -> IntArray:
        # The ring of the sampler is rebuilt after a tenth of the catalog's
        # size in events (at least 1,000), or once the catalog has grown by a
        # tenth, because a rebuild sorts every item.
        stale = self._events_since_sampler >= max(1000, self._n_items // 10)
        if stale or 10 * self._n_items > 11 * self._sampler_items:
            self._events_since_sampler = 0
            self._sampler_items = self._n_items
            weights = (self._counts[: self._n_items] + 1.0) ** self.sampling_power
            # The counts never decay, so without a limit the ring would grow
            # with the traffic even over a fixed catalog.
            limit = max(RING_MIN_POINTS, RING_POINTS_PER_ITEM * self._n_items)
            self._sampler.rebuild(self.catalog.hashes[: self._n_items], weights, limit)
        return self._sampler.draw(keys ^ self._negative_salt, self.negatives)

    def learn(self, batch: EventBatch) -> None:
        """Take one SGD step over the batch's positive events and their sampled negatives."""
        positive = np.flatnonzero(batch.positive)
        if len(positive) == 0:
            return
        items = batch.items[positive]
        weights = batch.weights[positive].astype(np.float32)
        self._ensure_items(int(items.max()) + 1)
        users = np.array(
            [self._user_row(batch.events[p].user_id) for p in positive.tolist()], dtype=np.int64
        )
        negatives = self._sample_negatives(batch.event_hashes[positive])
        self._step(users, items, weights, negatives)
        self._learned_since_index += len(positive)
        if self._n_items >= self.index_min_items:
            # Built while learning rather than at the first query that finds
            # it stale, so that the cells depend on the events alone and not
            # on when lists happened to be computed.
            self._current_index()
        np.add.at(self._counts, items, 1.0)
        self._events_since_sampler += len(items)

    def _step(
        self, users: IntArray, items: IntArray, weights: Float32Array, negatives: IntArray
    ) -> None:
        user_vectors = self._user_factors[users]
        item_vectors = self._item_factors[items]
        negative_vectors = self._item_factors[negatives]

        positive_scores = np.einsum("bf,bf->b", user_vectors, item_vectors)
        negative_scores = np.einsum("bf,bnf->bn", user_vectors, negative_vectors)
        with np.errstate(over="ignore"):
            # exp overflows to inf for scores below about -88 in float32,
            # which gives the sigmoid's limit of 0, as intended.
            positive_grad = weights * (1.0 / (1.0 + np.exp(-positive_scores)) - 1.0)
            negative_grad = 1.0 / (1.0 + np.exp(-negative_scores))

        # A negative drawn equal to its event's item would undo the event's
        # own step, so such draws are left out.
        not_own_item = negatives != items[:, None]
        negative_grad = negative_grad * not_own_item

        user_grad = positive_grad[:, None] * item_vectors
        user_grad += np.einsum("bn,bnf->bf", negative_grad, negative_vectors)
        user_grad += self.l2 * user_vectors
        item_grad = positive_grad[:, None] * user_vectors + self.l2 * item_vectors
        negative_item_grad = negative_grad[:, :, None] * user_vectors[:, None, :]
        negative_item_grad += self.l2 * negative_vectors
        negative_item_grad *= not_own_item[:, :, None]

        user_rates, item_rates, negative_rates = self._row_rates(
            users,
            items,
            weights,
            negatives,
            not_own_item,
            user_vectors,
            item_vectors,
            negative_vectors,
        )
        np.add.at(self._user_factors, users, -user_rates[:, None] * user_grad)
        np.add.at(self._item_factors, items, -item_rates[:, None] * item_grad)
        np.add.at(
            self._item_factors,
            negatives.reshape(-1),
            -negative_rates.reshape(-1, 1) * negative_item_grad.reshape(-1, self.factors),
        )
        if self._index is not None:
            self._index.update(self._item_factors, np.union1d(items, negatives))

    def _row_rates(
        self,
        users: IntArray,
        items: IntArray,
        weights: Float32Array,
        negatives: IntArray,
        not_own_item: npt.NDArray[np.bool_],
        user_vectors: Float32Array,
        item_vectors: Float32Array,
        negative_vectors: Float32Array,
    ) -> tuple[Float32Array, Float32Array, Float32Array]:
        """Return the learning rate of each gradient term of the batch, by the row it moves.

        The terms of one row are summed into one step, and a row with many
        terms in a batch, such as a user with a hundred events, overshoots
        and can grow without bound. The loss of one row, with the other rows
        fixed, has a curvature of at most ``curvature``: a quarter of each
        term's weight times the squared norm of the other vector, plus L2.
        A step of at most 1 / ``curvature`` cannot overshoot it, so each
        row's rate is cut to that where it is smaller than ``learning_rate``.
        Rows with few terms keep the plain rate. Negatives left out, where
        ``not_own_item`` is False, add no term.
        """
        user_squares = np.einsum("bf,bf->b", user_vectors, user_vectors).astype(np.float64)
        item_squares = np.einsum("bf,bf->b", item_vectors, item_vectors).astype(np.float64)
        negative_squares = (
            np.einsum("bnf,bnf->bn", negative_vectors, negative_vectors) * not_own_item
        )
        positive_weights = weights.astype(np.float64)

        user_terms = 0.25 * (positive_weights * item_squares + negative_squares.sum(axis=1))
        item_terms = 0.25 * positive_weights * user_squares
        negative_terms = (0.25 * user_squares[:, None] + self.l2) * not_own_item

        user_rates = self._capped_rates(users, user_terms + self.l2)
        all_items = np.concatenate([items, negatives.reshape(-1)])
        all_terms = np.concatenate([item_terms + self.l2, negative_terms.reshape(-1)])
        all_rates = self._capped_rates(all_items, all_terms)
        item_rates = all_rates[: len(items)]
        negative_rates = all_rates[len(items) :].reshape(negatives.shape)
        return user_rates, item_rates, negative_rates

    def _capped_rates(self, rows: IntArray, curvatures: npt.NDArray[np.float64]) -> Float32Array:
        curvature = row_totals(rows, curvatures)
        rates = np.minimum(self.learning_rate, 1.0 / np.maximum(curvature, 1e-12))
        return np.asarray(rates, dtype=np.float32)

    def candidates(self, user_id: str, n: int) -> IntArray:
        """Return the ``n`` items with the highest dot product.

        The whole catalog is scanned below ``index_min_items`` items; above,
        a `CellIndex` scans about ``index_scan_items`` of them. Learning
        builds the index and rebuilds it when it is stale.
        """
        vector = self.user_vector(user_id)
        if vector is None or self._n_items == 0 or n <= 0:
            return _EMPTY_ROWS
        if self._n_items >= self.index_min_items:
            return self._current_index().search(self.item_factors(), vector, n)
        scores = self._item_factors[: self._n_items] @ vector
        return best_rows(None, scores, n)

    def _current_index(self) -> CellIndex:
        # The index is rebuilt once the catalog has grown by a tenth, because
        # items added since the build are scanned on every query. It is also
        # rebuilt once as many events as indexed items have moved vectors,
        # because items drift away from the centre of their cell.
        # NOTE: the build runs inside `learn` and takes seconds at a million
        # items (2.9 s on the benchmark machine), which stalls that batch.
        index = self._index
        if (
            index is None
            or 10 * self._n_items > 11 * index.built_items
            or self._learned_since_index >= index.built_items
        ):
            index = CellIndex(self.item_factors(), self.index_scan_items, seed=self._seed)
            self._index = index
            self._learned_since_index = 0
        return index

    def score(self, user_id: str, items: IntArray) -> tuple[IntArray, FloatArray]:
        """Return the dot products of the user's vector with the given item vectors."""
        vector = self.user_vector(user_id)
        if vector is None:
            return _EMPTY_ROWS, _EMPTY_SCORES
        known = items[items < self._n_items]
        scores = (self._item_factors[known] @ vector).astype(np.float64)
        return known, scores

    def forget_user(self, user_id: str) -> None:
        """Erase the user's vector and free its row."""
        row = self.user_rows.pop(user_id, None)
        if row is not None:
            self._user_factors[row] = 0.0
            self._free_rows.append(row)

    def state_bytes(self) -> int:
        """Return the size of both tables, the counts and the user index."""
        tables = self._user_factors.nbytes + self._item_factors.nbytes + self._counts.nbytes
        tables += self._sampler.state_bytes()
        if self._index is not None:
            tables += self._index.nbytes()
        return int(tables + 100 * len(self.user_rows))
