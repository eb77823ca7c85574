"""The model Protocol and the item-side state that every model shares.

Models address items by their row in an `ItemCatalog`, an integer that the
engine assigns on first sight, so that scores live in numpy arrays. User ids
stay opaque strings: models use them only as dictionary keys.
"""

from __future__ import annotations

import hashlib
import logging
import math
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

from schemas import Event

logger = logging.getLogger(__name__)

GenericT = TypeVar("GenericT", bound=np.generic)
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
UInt64Array = npt.NDArray[np.uint64]

NO_CATEGORY = -1
# The time of an item that a state of an older version kept without one:
# older than any event.
OLDEST_MS = -(2**63)
# Scaled decayed scores are rescaled once their multiplier passes 2**60, far
# below the float64 limit of about 2**1023, so no stored value can overflow.
_MAX_DECAY_EXPONENT = 60.0
# The smallest value that a rescale leaves the largest decayed score at.
_MIN_RESCALED = 1e-250
# The lowest multiplier exponent of an event older than the reference time,
# so that an event over about a thousand half-lives older than the newest
# one still adds a positive amount: a full 2 ** -1075 would round to 0.
_MIN_DECAY_EXPONENT = math.log2(_MIN_RESCALED)


class ModelError(ValueError):
    """Base class of the errors that models raise on invalid input."""


def stable_hash(text: str, salt: int = 0) -> int:
    """Return a 64-bit hash of ``text`` that is the same in every process and run.

    Python's built-in ``hash`` of a string changes with each process, so it
    cannot key draws that a restarted worker must repeat.

    >>> stable_hash("item-1") == stable_hash("item-1")
    True
    >>> stable_hash("item-1") != stable_hash("item-1", salt=1)
    True
    """
    digest = hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=8, salt=salt.to_bytes(16, "little")
    ).digest()
    return int.from_bytes(digest, "little")


def stable_hashes(texts: Iterable[str], salt: int = 0) -> UInt64Array:
    """Return `stable_hash` of each text as an array."""
    return np.fromiter((stable_hash(text, salt) for text in texts), dtype=np.uint64)


def grow_rows(array: npt.NDArray[GenericT], size: int, fill: object) -> npt.NDArray[GenericT]:
    """Return ``array`` with room for ``size`` rows, new rows set to ``fill``, doubling capacity."""
    if size <= len(array):
        return array
    capacity = max(size, 2 * len(array), 16)
    grown = np.full((capacity, *array.shape[1:]), fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown


class ItemCatalog:
    """Item ids, categories, stock and price, indexed by a dense integer row.

    >>> catalog = ItemCatalog()
    >>> catalog.add("i1", category="c1")
    0
    >>> catalog.add("i2"), catalog.add("i1")
    (1, 0)
    >>> catalog.category_name(0), catalog.category_name(1)
    ('c1', None)
    """

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self.category_names: list[str] = []
        self.category_index: dict[str, int] = {}
        self._categories = np.full(0, NO_CATEGORY, dtype=np.int64)
        self._in_stock = np.ones(0, dtype=bool)
        self._prices = np.full(0, np.nan, dtype=np.float64)
        self._hashes = np.zeros(0, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def categories(self) -> IntArray:
        """Category row of each item, `NO_CATEGORY` where unknown."""
        return self._categories[: len(self.ids)]

    @property
    def in_stock(self) -> npt.NDArray[np.bool_]:
        """Stock flag of each item; an item is in stock until an update marks it out of stock."""
        return self._in_stock[: len(self.ids)]

    @property
    def hashes(self) -> UInt64Array:
        """`stable_hash` of each item id: the same for an item in every run, unlike its row."""
        return self._hashes[: len(self.ids)]

    @property
    def prices(self) -> FloatArray:
        """Last known unit price of each item, NaN where unknown."""
        return self._prices[: len(self.ids)]

    def add(self, item_id: str, category: str | None = None, price: float | None = None) -> int:
        """Return the row of ``item_id``, adding it first if it is new.

        A non-empty ``category`` or a ``price`` given here replaces the stored one.
        """
        row = self.index.get(item_id)
        if row is None:
            row = len(self.ids)
            self.ids.append(item_id)
            self.index[item_id] = row
            size = row + 1
            self._categories = grow_rows(self._categories, size, NO_CATEGORY)
            self._in_stock = grow_rows(self._in_stock, size, True)
            self._prices = grow_rows(self._prices, size, np.nan)
            self._hashes = grow_rows(self._hashes, size, 0)
            self._hashes[row] = stable_hash(item_id)
        if category:
            self._categories[row] = self.category_row(category)
        if price is not None:
            self._prices[row] = price
        return row

    def category_row(self, category: str) -> int:
        """Return the row of ``category``, adding it first if it is new."""
        row = self.category_index.get(category)
        if row is None:
            row = len(self.category_names)
            self.category_names.append(category)
            self.category_index[category] = row
        return row

    def category_of(self, row: int) -> int:
        """Return the category row of item ``row``, `NO_CATEGORY` when unknown."""
        return int(self._categories[row])

    def category_name(self, row: int) -> str | None:
        """Return the category name of item ``row``, or ``None`` when unknown."""
        category = int(self._categories[row])
        return None if category == NO_CATEGORY else self.category_names[category]

    def set_stock(self, row: int, in_stock: bool) -> None:
        """Set the stock flag of item ``row``."""
        self._in_stock[row] = in_stock


@dataclass(slots=True)
class EventBatch:
    """A batch of events with the arrays that models learn from.

    Attributes
    ----------
    events
        The events, in the order they are applied.
    items
        Catalog row of each event's item.
    weights
        Type weight of each event, negative for a refund (it undoes a
        purchase's popularity and is never a positive example).
    times
        Event time in epoch milliseconds.
    categories
        Category row of each event's item after the event was applied.
    first_touch
        Whether each event is a positive event of a user on an item that the
        user had not touched before, earlier in the batch included; None when
        the batch was built without the users' histories.
    catalog_size_before
        Number of catalog rows before the batch's new items were added, so a
        model can tell which items existed at each event of the batch.

    """

    events: Sequence[Event]
    items: IntArray
    weights: FloatArray
    times: IntArray
    categories: IntArray
    first_touch: npt.NDArray[np.bool_] | None = None
    catalog_size_before: int = 0
    _event_hashes: UInt64Array | None = None

    @property
    def event_hashes(self) -> UInt64Array:
        """`stable_hash` of each event id, which keys the random draws made for the event."""
        if self._event_hashes is None:
            self._event_hashes = stable_hashes(event.event_id for event in self.events)
        return self._event_hashes

    def catalog_sizes(self) -> IntArray:
        """Return the number of catalog rows known at each event, its own item included."""
        if not len(self.items):
            return np.zeros(0, dtype=np.int64)
        return np.maximum.accumulate(np.maximum(self.items + 1, self.catalog_size_before))

    @property
    def positive(self) -> npt.NDArray[np.bool_]:
        """Mask of the events that are positive examples (every event but refunds)."""
        return self.weights > 0


@runtime_checkable
class Model(Protocol):
    """The verbs that every model of the fusion implements.

    ``score`` returns only the candidates that the model has an opinion on,
    so fusion never mistakes "no opinion" for a score of zero.
    """

    name: str

    def learn(self, batch: EventBatch) -> None:
        """Apply a batch of events, in order."""

    def candidates(self, user_id: str, n: int) -> IntArray:
        """Return up to ``n`` item rows that the model ranks highest for the user."""

    def score(self, user_id: str, items: IntArray) -> tuple[IntArray, FloatArray]:
        """Return ``(items, scores)`` for the given item rows that the model can score."""

    def forget_user(self, user_id: str) -> None:
        """Remove every trace of the user."""

    def state_bytes(self) -> int:
        """Return an estimate of the memory that the model's state takes."""


class DecayedScores:
    """Per-item scores that halve every ``half_life_ms`` of event time.

    Scores are stored multiplied by ``2 ** ((t - reference) / half_life)``, so
    adding at time t costs one multiply and old entries stay untouched. All
    entries are rescaled together once the multiplier grows large.

    >>> scores = DecayedScores(half_life_ms=1000)
    >>> scores.add(np.array([0, 1]), np.array([1.0, 1.0]), np.array([0, 1000]))
    >>> [round(float(x), 3) for x in scores.values_at(1000)]
    [0.5, 1.0]
    """

    def __init__(self, half_life_ms: float) -> None:
        if not half_life_ms > 0:
            msg = f"half_life_ms is {half_life_ms}; expected a positive number of milliseconds"
            raise ModelError(msg)
        self.half_life_ms = float(half_life_ms)
        self.reference_ms: int | None = None
        self._values = np.zeros(0, dtype=np.float64)
        self._size = 0
        self.version = 0

    def __len__(self) -> int:
        return self._size

    def raw(self) -> FloatArray:
        """Return the scaled scores, comparable with each other but not over time."""
        return self._values[: self._size]

    def values_at(self, time_ms: int) -> FloatArray:
        """Return the scores as they stand at ``time_ms``."""
        if self.reference_ms is None:
            return self.raw().copy()
        factor = 2.0 ** ((self.reference_ms - time_ms) / self.half_life_ms)
        return np.asarray(self.raw() * factor, dtype=np.float64)

    def ensure_size(self, size: int) -> None:
        """Make room for item rows below ``size``."""
        if size > len(self._values):
            grown = np.zeros(max(size, 2 * len(self._values), 16), dtype=np.float64)
            grown[: len(self._values)] = self._values
            self._values = grown
        self._size = max(self._size, size)

    def add(self, items: IntArray, weights: FloatArray, times: IntArray) -> None:
        """Add ``weights`` to ``items`` at ``times``; no score drops below zero."""
        if len(items) == 0:
            return
        if self.reference_ms is None:
            self.reference_ms = int(times[0])
        self.ensure_size(int(items.max()) + 1)
        exponent = (times.astype(np.float64) - self.reference_ms) / self.half_life_ms
        if exponent.max() > _MAX_DECAY_EXPONENT:
            self._rescale(int(times.max()))
            exponent = (times.astype(np.float64) - self.reference_ms) / self.half_life_ms
        # A backfill of old events after live traffic must still rank its
        # items behind the new ones, not drop them, so the multiplier stops
        # at a floor. Items older than that floor rank by their counts.
        amounts = weights * np.exp2(np.maximum(exponent, _MIN_DECAY_EXPONENT))
        # A score is clamped at 0 right after each subtraction, as if the
        # events came one by one. Clamping once after the whole batch would
        # let a refund larger than the score cancel later events of the batch.
        start = 0
        for stop in np.flatnonzero(weights < 0).tolist():
            np.add.at(self._values, items[start:stop], amounts[start:stop])
            row = int(items[stop])
            self._values[row] = max(float(self._values[row] + amounts[stop]), 0.0)
            start = stop + 1
        np.add.at(self._values, items[start:], amounts[start:])
        self.version += 1

    def _rescale(self, time_ms: int) -> None:
        assert self.reference_ms is not None
        factor = 2.0 ** ((self.reference_ms - time_ms) / self.half_life_ms)
        # A gap of over about a thousand half-lives, as between a backfill of
        # old events and live traffic, would round every score to 0 and lose
        # the items' order. The leader is kept at _MIN_RESCALED instead,
        # which still puts every item of the gap far behind any new event.
        # A leader already below that is left as it is, never raised.
        leader = float(self._values.max(initial=0.0))
        if leader > 0:
            factor = min(1.0, max(factor, _MIN_RESCALED / leader))
        self._values *= factor
        self.reference_ms = time_ms
        logger.debug("rescaled decayed scores to reference %d", time_ms)


def add_in_time_order(recent: array[int], item: int, time_ms: int, keep: int) -> None:
    """Move ``item`` to its place by ``time_ms`` in ``recent``, oldest first, keeping ``keep``.

    ``recent`` lists pairs of an item row and its time, flat, because an
    array of 64-bit integers takes far less memory per user than a list of
    tuples. A late event takes its place by time instead of becoming the
    newest item, and one older than all the items kept drops out. An item
    kept already keeps the newer of its two times.

    >>> recent = array("q", [1, 10, 2, 30])
    >>> add_in_time_order(recent, 3, 20, keep=3)
    >>> add_in_time_order(recent, 1, 40, keep=3)
    >>> add_in_time_order(recent, 2, 5, keep=3)
    >>> recent.tolist()
    [3, 20, 2, 30, 1, 40]
    """
    for position in range(0, len(recent), 2):
        if recent[position] == item:
            time_ms = max(time_ms, recent[position + 1])
            del recent[position : position + 2]
            break
    position = len(recent)
    while position and recent[position - 1] > time_ms:
        position -= 2
    recent[position:position] = array("q", (item, time_ms))
    del recent[: max(0, len(recent) - 2 * keep)]


def newest_items(recent: array[int]) -> list[int]:
    """Return the items of pairs kept by `add_in_time_order`, newest first.

    >>> newest_items(array("q", [3, 20, 2, 30, 1, 40]))
    [1, 2, 3]
    """
    return recent[-2::-2].tolist()


def pairs_in_time_order(recent: Iterable[Any]) -> array[int]:
    """Return ``recent`` as flat pairs, converting the forms that older versions saved.

    Older states kept a list of ``(item, time)`` tuples, or of bare items,
    which count as older than any event.

    >>> pairs_in_time_order([(1, 10), (2, 30)]).tolist()
    [1, 10, 2, 30]
    >>> pairs_in_time_order([7]).tolist()[1] == OLDEST_MS
    True
    """
    if isinstance(recent, array):
        return recent
    flat = array("q")
    for entry in recent:
        if isinstance(entry, tuple):
            flat.extend(entry)
        else:
            flat.extend((entry, OLDEST_MS))
    return flat


def find_sorted(rows: IntArray, items: IntArray) -> tuple[IntArray, npt.NDArray[np.bool_]]:
    """Return where each of ``items`` sits in the ascending ``rows``, and whether it is there.

    Positions of missing items are clipped into range, so they index safely
    but point at another row.

    >>> positions, found = find_sorted(np.array([2, 5, 9]), np.array([5, 7, 12]))
    >>> positions.tolist(), found.tolist()
    ([1, 2, 2], [True, False, False])
    """
    if len(rows) == 0:
        return np.zeros(len(items), dtype=np.int64), np.zeros(len(items), dtype=bool)
    positions = np.minimum(np.searchsorted(rows, items), len(rows) - 1)
    return positions, rows[positions] == items


def scores_of(rows: IntArray, scores: FloatArray, items: IntArray) -> tuple[IntArray, FloatArray]:
    """Return the ``items`` found among the ascending ``rows``, with their ``scores``.

    >>> found, values = scores_of(np.array([2, 5]), np.array([0.5, 0.7]), np.array([5, 7]))
    >>> found.tolist(), values.tolist()
    ([5], [0.7])
    """
    if len(rows) == 0 or len(items) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    positions, found = find_sorted(rows, items)
    return items[found], scores[positions[found]]


def neighbour_row(row: dict[int, float]) -> tuple[IntArray, FloatArray]:
    """Return the targets and values of one neighbour row as arrays, in the row's order.

    >>> targets, values = neighbour_row({7: 0.5, 2: 1.5})
    >>> targets.tolist(), values.tolist()
    ([7, 2], [0.5, 1.5])
    """
    targets = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
    values = np.fromiter(row.values(), dtype=np.float64, count=len(row))
    return targets, values


def sum_by_row(parts: Sequence[tuple[IntArray, FloatArray]]) -> tuple[IntArray, FloatArray]:
    """Sum the scores of each row over ``parts``; return the rows ascending with their sums.

    The terms of one row are added in the order of ``parts``, starting from
    0, which is the order a running sum in a dictionary would use, so the sums
    are the same to the last bit.

    >>> rows, scores = sum_by_row([(np.array([7, 2]), np.array([0.5, 1.5])),
    ...                            (np.array([2]), np.array([1.0]))])
    >>> rows.tolist(), scores.tolist()
    ([2, 7], [2.5, 0.5])
    """
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    rows = np.concatenate([part[0] for part in parts])
    scores = np.concatenate([part[1] for part in parts])
    unique, inverse = np.unique(rows, return_inverse=True)
    sums = np.bincount(inverse, weights=scores, minlength=len(unique))
    return unique.astype(np.int64, copy=False), sums.astype(np.float64, copy=False)


def best_rows(rows: IntArray | None, scores: npt.NDArray[np.floating], n: int) -> IntArray:
    """Return the ``n`` rows with the highest scores, best first, ties by row.

    The result equals ``rows[np.lexsort((rows, -scores))[:n]]``, but of an
    array longer than 512 only the leading scores are sorted. ``rows`` None
    means the positions of the scores. Scores must not be NaN.

    >>> best_rows(np.array([4, 1, 9, 3]), np.array([0.1, 0.3, 0.3, 0.2]), 2).tolist()
    [1, 9]
    """
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if len(scores) > _SAMPLED_CUT_MIN and n < len(scores) // 64:
        keep = _above_sampled_cut(scores, n)
        if keep is not None:
            rows = keep if rows is None else rows[keep]
            scores = scores[keep]
    if rows is None:
        rows = np.arange(len(scores), dtype=np.int64)
    if n < len(scores) and len(scores) > _PARTITION_MIN:
        keep = np.argpartition(-scores, n - 1)[:n]
        threshold = scores[keep].min()
        keep = np.flatnonzero(scores >= threshold)
        rows = rows[keep]
        scores = scores[keep]
    order = np.lexsort((rows, -scores))[:n]
    return rows[order].astype(np.int64, copy=False)


# Arrays up to this length are sorted whole, because the partial sort and
# its threshold cost more than they save there: for the top 30 of 150 scores
# a full lexsort took 8 µs against 34 µs (2-core AMD EPYC).
_PARTITION_MIN = 512
# Arrays longer than this are cut at a threshold from a sample before the
# partial sort, because argpartition alone took about 23 ms on a million
# scores on the benchmark machine. The cut pays off well below that: for the
# top 100 of 60,000 float32 scores it took 0.19 ms against 1.9 ms for
# argpartition alone, and for 10,000 scores 0.15 ms against 0.18 ms (2-core
# AMD EPYC, one BLAS thread). The sample must not be longer than the array.
_SAMPLED_CUT_MIN = 8_192
_SAMPLE_SIZE = 4_096


def _above_sampled_cut(scores: npt.NDArray[np.floating], n: int) -> IntArray | None:
    # Positions of the scores at or above a cut that an evenly spaced sample
    # puts at about 4 n scores from the top, or None when fewer than n pass,
    # in which case the caller sorts them all. Either way nothing of the top n
    # is lost, so the result stays exact.
    step = len(scores) // _SAMPLE_SIZE
    sample = scores[::step]
    k = min(len(sample), 4 * n * len(sample) // len(scores) + 8)
    cut = np.partition(sample, len(sample) - k)[len(sample) - k]
    keep = np.flatnonzero(scores >= cut)
    return keep if len(keep) >= n else None


def top_n(scores: FloatArray, n: int, rows: IntArray | None = None) -> IntArray:
    """Return the rows of the ``n`` highest positive scores, best first, ties by row.

    >>> top_n(np.array([0.1, 0.0, 0.3, 0.3]), 2).tolist()
    [2, 3]
    """
    if rows is None:
        rows = np.arange(len(scores), dtype=np.int64)
    positive = scores > 0
    if not positive.all():
        rows = rows[positive]
        scores = scores[positive]
    return best_rows(rows, scores, n)


_NO_SCORES: tuple[IntArray, FloatArray] = (
    np.zeros(0, dtype=np.int64),
    np.zeros(0, dtype=np.float64),
)


class UserNeighbourScores:
    """Base of the models that score a user as a sparse sum of item neighbour rows.

    A subclass computes the scores in `_compute_user_scores` and bumps
    ``_version`` whenever its state changes. The scores of the last user are
    kept until then, because the engine calls `candidates` and then `score`
    for the same user on the same state.
    """

    def __init__(self) -> None:
        self._memo_key: tuple[str, int] | None = None
        self._memo: tuple[IntArray, FloatArray] = _NO_SCORES
        self._version = 0

    def _drop_kept_scores(self) -> None:
        # The memo contains the last scored user's id and scores. Removing
        # that user must clear both, or they would reach the next checkpoint.
        self._memo_key = None
        self._memo = _NO_SCORES
        self._version += 1

    def _compute_user_scores(self, user_id: str) -> tuple[IntArray, FloatArray]:
        """Return the rows the model scores for the user, ascending, with their scores."""
        raise NotImplementedError

    def _user_scores(self, user_id: str) -> tuple[IntArray, FloatArray]:
        key = (user_id, self._version)
        if self._memo_key != key:
            self._memo = self._compute_user_scores(user_id)
            self._memo_key = key
        return self._memo

    def candidates(self, user_id: str, n: int) -> IntArray:
        """Return up to ``n`` item rows with the highest scores for the user."""
        rows, scores = self._user_scores(user_id)
        return best_rows(rows, scores, n)

    def score(self, user_id: str, items: IntArray) -> tuple[IntArray, FloatArray]:
        """Return the given items that the model scores for the user, with their scores."""
        rows, scores = self._user_scores(user_id)
        return scores_of(rows, scores, items)
