"""Array helpers of the neighbour models, checked against plain Python definitions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.base import best_rows, neighbour_row, sum_by_row

# Few distinct values and rows, so that ties and repeated rows come up often.
_VALUES = st.sampled_from([0.1, 0.2, 0.3, 1.0 / 3.0, 1.5, 2.0, 1e-9])
_ROWS = st.dictionaries(st.integers(0, 12), _VALUES, max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_ROWS, st.sampled_from([1.0, 0.5, 1.0 / 3.0, 0.7])), max_size=6))
def test_sum_by_row_matches_running_sum(weighted_rows) -> None:
    expected: dict[int, float] = {}
    parts = []
    for row, factor in weighted_rows:
        for target, value in row.items():
            expected[target] = expected.get(target, 0.0) + factor * value
        targets, values = neighbour_row(row)
        parts.append((targets, values * factor))
    rows, sums = sum_by_row(parts)
    assert rows.tolist() == sorted(expected)
    assert sums.tolist() == [expected[row] for row in sorted(expected)]
    assert rows.dtype == np.int64
    assert sums.dtype == np.float64


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 50), _VALUES), max_size=20, unique_by=lambda p: p[0]),
    st.integers(0, 25),
)
def test_best_rows_matches_full_sort(pairs, n) -> None:
    rows = np.array([row for row, _ in pairs], dtype=np.int64)
    scores = np.array([score for _, score in pairs], dtype=np.float64)
    expected = sorted(pairs, key=lambda pair: (-pair[1], pair[0]))[:n]
    assert best_rows(rows, scores, n).tolist() == [row for row, _ in expected]


def _large_score_arrays(size: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    cases = [
        ("uniform", rng.random(size)),
        ("float32 normal", rng.standard_normal(size).astype(np.float32)),
        ("ascending", np.arange(size, dtype=np.float64)),
        ("descending", np.arange(size, 0, -1).astype(np.float64)),
        ("few values", rng.integers(0, 5, size).astype(np.float64)),
        ("constant", np.ones(size)),
        # The evenly spaced sample contains only the low values.
        ("spikes off the sample", np.where(np.arange(size) % 12 == 5, 9.0, rng.random(size))),
    ]
    return [(f"{name}, {size} scores", scores) for name, scores in cases]


# Sizes where only the partial sort applies, just above the sampled cut's
# minimum, in the range of a mid-sized catalog, and far above it.
@pytest.mark.parametrize(
    ("name", "scores"),
    [case for size in (3_001, 8_193, 55_001, 200_003) for case in _large_score_arrays(size)],
)
@pytest.mark.parametrize("n", [1, 100, 3000])
def test_best_rows_long_array_exact(name, scores, n) -> None:
    rows = np.arange(len(scores), dtype=np.int64)
    expected = rows[np.lexsort((rows, -scores))[:n]]
    assert best_rows(rows, scores, n).tolist() == expected.tolist(), name
