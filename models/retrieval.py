"""Approximate top-N retrieval by inner product over a large item table.

`CellIndex` splits the item vectors into cells with k-means and, for a query,
scans only the items of the cells whose centres score highest against it,
plus every item added since the index was built. It keeps its own copy of the
vectors in cell order, because scanning contiguous rows costs about a
twentieth of gathering the same rows from the item table, and the owner
copies each changed vector into it. The scanned items are scored exactly, so
only the choice of cells is approximate.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from models.base import IntArray, ModelError, best_rows

logger = logging.getLogger(__name__)

Float32Array = npt.NDArray[np.float32]
# Items per cell that k-means aims at, and the rows assigned in one product.
_ITEMS_PER_CELL = 1000
_ASSIGN_CHUNK = 65_536


class CellIndex:
    """Item rows grouped into k-means cells of their vectors.

    Parameters
    ----------
    vectors
        The item table at build time, one row per item.
    scan_items
        About how many items a query scans: whole cells, best first, until
        the count is reached.
    seed
        Seed of the k-means start and of the sample it is fitted on.
    iterations
        Lloyd iterations of k-means.

    >>> rng = np.random.default_rng(0)
    >>> table = rng.standard_normal((5000, 8)).astype(np.float32)
    >>> index = CellIndex(table, scan_items=5000)
    >>> query = table[7]
    >>> exact = np.argsort(-(table @ query), kind="stable")[:10]
    >>> sorted(index.search(table, query, 10).tolist()) == sorted(exact.tolist())
    True

    """

    def __init__(
        self, vectors: Float32Array, scan_items: int = 100_000, seed: int = 0, iterations: int = 6
    ) -> None:
        if scan_items < 1:
            msg = f"scan_items is {scan_items}; expected at least 1"
            raise ModelError(msg)
        started = time.perf_counter()
        n_items = len(vectors)
        self.built_items = n_items
        self.scan_items = scan_items
        n_cells = cells_for(n_items)
        self.centres = _kmeans(vectors, n_cells, np.random.default_rng(seed), iterations)

        cells = np.concatenate(
            [
                _nearest(vectors[start : start + _ASSIGN_CHUNK], self.centres)
                for start in range(0, n_items, _ASSIGN_CHUNK)
            ]
        )
        # Item rows ordered by cell, then by row, and where each cell starts.
        self.order = np.argsort(cells, kind="stable").astype(np.int64)
        self.offsets = np.zeros(n_cells + 1, dtype=np.int64)
        np.cumsum(np.bincount(cells, minlength=n_cells), out=self.offsets[1:])
        self.attach(vectors)

        self.build_seconds = time.perf_counter() - started
        logger.info(
            "item index built: %d items in %d cells in %.2f s",
            n_items,
            n_cells,
            self.build_seconds,
        )

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return len(self.centres)

    def attach(self, table: Float32Array) -> None:
        """Copy the indexed rows of ``table`` in cell order, as after a build or a restore."""
        # The vectors in cell order, and where each item row sits among them.
        self.vectors = np.ascontiguousarray(table[self.order])
        self.position = np.empty(self.built_items, dtype=np.int64)
        self.position[self.order] = np.arange(self.built_items, dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        # The copy of the vectors equals the owner's table in cell order, so
        # a pickle leaves it out and the owner attaches the table on load.
        state = self.__dict__.copy()
        del state["vectors"]
        del state["position"]
        return state

    def update(self, table: Float32Array, rows: IntArray) -> None:
        """Copy the current vectors of ``rows`` from ``table``; rows added later are ignored."""
        indexed = rows[rows < self.built_items]
        self.vectors[self.position[indexed]] = table[indexed]

    def search(self, table: Float32Array, query: Float32Array, n: int) -> IntArray:
        """Return up to ``n`` item rows with the highest score among those scanned.

        ``table`` is the current item table, and its rows past the ones
        indexed are always scanned. Fewer than ``n`` rows come back when
        fewer are scanned, which needs ``n`` near ``scan_items``.
        """
        sizes = np.diff(self.offsets)
        by_centre = np.argsort(-(self.centres @ query), kind="stable")
        reach = np.cumsum(sizes[by_centre])
        probes = np.sort(by_centre[: int(np.searchsorted(reach, self.scan_items)) + 1])
        # Neighbouring probed cells are one slice of the copy.
        starts = self.offsets[probes]
        ends = self.offsets[probes + 1]
        joined = np.flatnonzero(starts[1:] != ends[:-1]) + 1
        first, last = np.r_[0, joined], np.r_[joined - 1, -1]
        spans = zip(starts[first].tolist(), ends[last].tolist(), strict=True)
        rows: list[IntArray] = []
        scores: list[npt.NDArray[np.float32]] = []
        for start, end in spans:
            rows.append(self.order[start:end])
            scores.append(self.vectors[start:end] @ query)
        if len(table) > self.built_items:
            rows.append(np.arange(self.built_items, len(table), dtype=np.int64))
            scores.append(table[self.built_items :] @ query)
        return best_rows(np.concatenate(rows), np.concatenate(scores), n)

    def nbytes(self) -> int:
        """Return the bytes of the cell table, the centres and the copy of the vectors."""
        arrays = (self.order, self.offsets, self.centres, self.vectors, self.position)
        return int(sum(array.nbytes for array in arrays))


def _kmeans(
    vectors: Float32Array, n_cells: int, rng: np.random.Generator, iterations: int
) -> Float32Array:
    # Lloyd's k-means on a sample of 32 vectors per cell, started from
    # sampled vectors. A cell that loses every member keeps its centre.
    sample_size = min(len(vectors), 32 * n_cells)
    sample = vectors[np.sort(rng.choice(len(vectors), size=sample_size, replace=False))]
    centres = sample[rng.choice(sample_size, size=n_cells, replace=False)].copy()
    for _ in range(iterations):
        nearest = _nearest(sample, centres)
        sums = np.zeros_like(centres)
        np.add.at(sums, nearest, sample)
        counts = np.bincount(nearest, minlength=n_cells)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


def _nearest(vectors: Float32Array, centres: Float32Array) -> IntArray:
    # The centre nearest in Euclidean distance: the largest x·c − |c|² / 2.
    half_norms = 0.5 * np.einsum("ij,ij->i", centres, centres)
    return np.asarray(np.argmax(vectors @ centres.T - half_norms, axis=1), dtype=np.int64)


def cells_for(n_items: int) -> int:
    """Return how many cells an index of ``n_items`` items has.

    >>> cells_for(1_000_000), cells_for(300)
    (1000, 1)
    """
    return max(1, min(4096, (n_items + _ITEMS_PER_CELL // 2) // _ITEMS_PER_CELL))
