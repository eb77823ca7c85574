"""Per-model scaling and ranks of candidate scores, checked against their definitions."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from models.fusion import normalize, ranks, ranks_with_subset

# Few distinct values, so that ties and constant rows come up often.
_VALUES = st.sampled_from([-3.0, -0.5, 0.0, 0.25, 1.0, 2.0, 7.5])
_SHAPES = st.tuples(st.integers(1, 6), st.integers(0, 12))


@st.composite
def _scored(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    shape = draw(_SHAPES)
    scores = draw(hnp.arrays(np.float64, shape, elements=_VALUES))
    mask = draw(hnp.arrays(np.bool_, shape))
    return scores, mask


def _normalized_row(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    if low >= 0:
        return [v / high if high > 0 else 1.0 for v in values]
    if high > low:
        return [(v - low) / (high - low) for v in values]
    return [1.0] * len(values)


@settings(max_examples=300, deadline=None)
@given(_scored())
def test_normalize_scales_rows_over_candidates(scored) -> None:
    scores, mask = scored
    out = normalize(scores, mask)
    assert out.shape == scores.shape
    assert (out[~mask] == 0.0).all()
    for row in range(scores.shape[0]):
        chosen = np.flatnonzero(mask[row])
        expected = _normalized_row(scores[row, chosen].tolist()) if len(chosen) else []
        assert out[row, chosen].tolist() == expected


@settings(max_examples=300, deadline=None)
@given(_scored())
def test_ranks_break_ties_by_column(scored) -> None:
    scores, mask = scored
    out = ranks(scores, mask)
    assert (out[~mask] == 0.0).all()
    for row in range(scores.shape[0]):
        chosen = np.flatnonzero(mask[row]).tolist()
        expected = sorted(chosen, key=lambda column: (-scores[row, column], column))
        assert [int(out[row, column]) for column in expected] == list(range(1, len(chosen) + 1))


def test_ranks_keep_infinite_scores_ranked() -> None:
    scores = np.array([[0.5, -np.inf, 2.0, np.inf]])
    mask = np.array([[True, True, False, True]])
    assert ranks(scores, mask).tolist() == [[2.0, 3.0, 0.0, 1.0]]


@settings(max_examples=300, deadline=None)
@given(_scored(), st.data())
def test_subset_ranks_match_subset_alone(scored, data) -> None:
    scores, mask = scored
    subset = data.draw(hnp.arrays(np.bool_, scores.shape[1]))
    full, among = ranks_with_subset(scores, mask, subset)
    assert full.tolist() == ranks(scores, mask).tolist()
    assert among is not None
    assert among.tolist() == ranks(scores, mask & subset[None, :]).tolist()


def test_subset_ranks_keep_infinite_scores() -> None:
    scores = np.array([[0.5, -np.inf, 2.0, np.inf]])
    mask = np.array([[True, True, True, True]])
    _, among = ranks_with_subset(scores, mask, np.array([True, True, False, False]))
    assert among is not None
    assert among.tolist() == [[1.0, 2.0, 0.0, 0.0]]


def test_normalize_wide_row_stays_in_range() -> None:
    scores = np.array([[-1e308, 0.0, 1e308]])
    mask = np.ones_like(scores, dtype=bool)

    values = normalize(scores, mask)

    assert values.tolist() == [[0.0, 0.5, 1.0]]
