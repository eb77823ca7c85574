"""Random draws keyed by stable ids, so that learning does not depend on arrival order.

A worker that restarts from a checkpoint receives the same events as an
uninterrupted one, but in other batches and, across topics and partitions, in
another order. Draws from one sequential generator would then differ in
every batch after the first difference: new items would get other initial
vectors and events other negatives. Here every draw is a pure function of an
id (an item, a user or an event), so two runs that learn the same events draw
the same values, whatever the batches.

The keys are 64-bit BLAKE2b digests of the ids. Uniforms come from the
SplitMix64 finalizer applied to the key plus a counter, and normals from
the Box-Muller transform of two uniforms.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from models.base import FloatArray, IntArray, ModelError, UInt64Array

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_TWO_TO_MINUS_53 = 2.0**-53


def _mix(values: UInt64Array) -> UInt64Array:
    # The SplitMix64 finalizer: a bijection on 64-bit integers whose output
    # bits each depend on every input bit.
    mixed = values ^ (values >> np.uint64(30))
    mixed = mixed * _MIX_1
    mixed ^= mixed >> np.uint64(27)
    mixed *= _MIX_2
    mixed ^= mixed >> np.uint64(31)
    return mixed


def keyed_bits(keys: UInt64Array, count: int) -> UInt64Array:
    """Return ``count`` pseudo-random 64-bit words per key, shaped ``(len(keys), count)``."""
    with np.errstate(over="ignore"):
        counters = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
        return _mix(keys.astype(np.uint64)[:, None] + counters[None, :])


def keyed_uniforms(keys: UInt64Array, count: int) -> FloatArray:
    """Return ``count`` uniforms in [0, 1) per key, shaped ``(len(keys), count)``.

    >>> keys = np.array([1, 2], dtype=np.uint64)
    >>> draws = keyed_uniforms(keys, 3)
    >>> draws.shape, bool(((draws >= 0) & (draws < 1)).all())
    ((2, 3), True)
    >>> bool((keyed_uniforms(keys[1:], 3) == draws[1:]).all())
    True
    """
    bits = keyed_bits(keys, count)
    return np.asarray((bits >> np.uint64(11)).astype(np.float64) * _TWO_TO_MINUS_53)


def keyed_normals(keys: UInt64Array, count: int, scale: float = 1.0) -> FloatArray:
    """Return ``count`` normal draws with standard deviation ``scale`` per key.

    >>> draws = keyed_normals(np.arange(20_000, dtype=np.uint64), 4)
    >>> abs(float(draws.mean())) < 0.02, abs(float(draws.std()) - 1.0) < 0.02
    (True, True)
    """
    uniforms = keyed_uniforms(keys, 2 * count)
    radius = np.sqrt(-2.0 * np.log1p(-uniforms[:, :count]))
    angle = 2.0 * np.pi * uniforms[:, count:]
    return np.asarray(scale * radius * np.cos(angle))


class KeyedSampler:
    """Draws item rows in proportion to weights, keyed by one hash per draw.

    Each item owns ``max(1, round(weight / unit))`` points on a ring of
    64-bit positions, placed by hashing the item's own hash with the point's
    number. A draw takes the first point at or after its key. So a draw
    depends only on the key and on the items and weights, not on item rows or
    insertion order, and a small change of the weights moves few draws.

    >>> from models.base import stable_hashes
    >>> sampler = KeyedSampler()
    >>> hashes = stable_hashes(["a", "b", "c"])
    >>> sampler.rebuild(hashes, np.array([1.0, 1.0, 8.0]))
    >>> rows = sampler.draw(np.arange(3000, dtype=np.uint64) * np.uint64(7919), 1)
    >>> bool((np.bincount(rows.ravel(), minlength=3)[2] > 1800))
    True
    """

    def __init__(self, unit: float = 1.0) -> None:
        if not unit > 0:
            msg = f"unit is {unit}; expected a positive weight per ring point"
            raise ModelError(msg)
        self.unit = unit
        self._positions: UInt64Array = np.zeros(0, dtype=np.uint64)
        self._rows: npt.NDArray[np.int32] = np.zeros(0, dtype=np.int32)

    def __len__(self) -> int:
        return len(self._positions)

    def rebuild(
        self,
        item_hashes: UInt64Array,
        weights: FloatArray | None = None,
        max_points: int | None = None,
    ) -> None:
        """Place the points of every item row; ``weights`` of None gives each row one point.

        With ``max_points``, a point stands for more weight than ``unit``
        where the weights would need more points, so the ring keeps about
        that many points, plus one for each item whose weight rounds to none.
        """
        n_items = len(item_hashes)
        if weights is None:
            points = np.ones(n_items, dtype=np.int64)
        else:
            weights = weights[:n_items]
            unit = self.unit
            if max_points is not None:
                unit = max(unit, float(weights.sum()) / max_points)
            points = np.maximum(1, np.rint(weights / unit)).astype(np.int64)
        rows = np.repeat(np.arange(n_items, dtype=np.int64), points)
        starts = np.cumsum(points) - points
        number = np.arange(len(rows), dtype=np.uint64) - np.repeat(starts, points).astype(np.uint64)
        with np.errstate(over="ignore"):
            positions = _mix(item_hashes.astype(np.uint64)[rows] ^ _mix(number * _GOLDEN))
        order = np.argsort(positions, kind="stable")
        self._positions = positions[order]
        self._rows = rows[order].astype(np.int32)

    def state_bytes(self) -> int:
        """Return the size of the ring's arrays."""
        return int(self._positions.nbytes + self._rows.nbytes)

    def draw(self, keys: UInt64Array, count: int) -> IntArray:
        """Return ``count`` rows per key, shaped ``(len(keys), count)``."""
        if not len(self._positions):
            msg = "the sampler has no items; call rebuild with at least one item first"
            raise ModelError(msg)
        targets = keyed_bits(keys, count)
        found = np.searchsorted(self._positions, targets, side="left")
        found[found == len(self._positions)] = 0
        return np.asarray(self._rows[found], dtype=np.int64)
