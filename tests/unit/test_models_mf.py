"""Stability of the batched SGD step of matrix factorization."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from models import mf as mf_module
from models.engine import EngineConfig, Recommender
from models.mf import ImplicitMF, row_totals
from schemas import Event

T0 = 1_700_000_000_000


def _mf_after(events: list[Event], chunk: int = 100) -> ImplicitMF:
    engine = Recommender(EngineConfig(fusion_learn_every=0, learn_chunk=chunk))
    engine.learn(events)
    model = engine.models["mf"]
    assert isinstance(model, ImplicitMF)
    return model


def _largest_norm(model: ImplicitMF) -> float:
    users = model._user_factors[: len(model.user_rows)]
    tables = np.concatenate([users, model.item_factors()])
    return float(np.linalg.norm(tables, axis=1).max())


def test_mf_heavy_user_batch_stays_bounded() -> None:
    # One user with 100 events on 10 items in every batch. Summed without a
    # bound, the steps of the user's row overshoot and the vectors diverge.
    events = [Event(f"e{n}", "view", "u0", f"i{n % 10}", T0 + n) for n in range(3000)]
    model = _mf_after(events)
    assert np.isfinite(_largest_norm(model))
    assert _largest_norm(model) < 10.0


def test_mf_single_item_stays_finite() -> None:
    events = [Event(f"e{n}", "purchase", "u0", "i0", T0 + n) for n in range(3000)]
    model = _mf_after(events)
    assert np.isfinite(model.item_factors()).all()
    assert np.isfinite(model.user_vector("u0")).all()


def test_mf_rates_cut_only_for_heavy_rows() -> None:
    # Rows with little curvature in a batch keep the plain rate, so sparse
    # batches learn as before. A heavy row gets 1 / curvature.
    model = ImplicitMF(Recommender().catalog, learning_rate=0.05)
    rows = np.array([3, 7, 3, 9, 9, 9], dtype=np.int64)
    curvatures = np.array([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    rates = model._capped_rates(rows, curvatures)
    assert rates[:3].tolist() == [np.float32(0.05)] * 3
    assert np.allclose(rates[3:], 1.0 / 30.0)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=9),
            st.floats(min_value=0.0, max_value=1e6, allow_subnormal=False),
        ),
        max_size=150,
    )
)
def test_row_totals_match_bincount(entries: list[tuple[int, float]]) -> None:
    # Short inputs take the dictionary path and long ones np.unique. Both
    # must give the sums of np.bincount bit for bit, or MF steps would change.
    rows = np.array([row for row, _ in entries], dtype=np.int64)
    values = np.array([value for _, value in entries], dtype=np.float64)
    unique, inverse = np.unique(rows, return_inverse=True)
    expected = np.bincount(inverse, weights=values, minlength=len(unique))[inverse]
    totals = row_totals(rows, values)
    assert totals.dtype == np.float64
    assert totals.tolist() == expected.tolist()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=2),
            st.integers(min_value=0, max_value=4),
            st.sampled_from(["view", "click", "purchase"]),
        ),
        min_size=1,
        max_size=40,
    ),
    repeats=st.integers(min_value=1, max_value=80),
)
def test_mf_repeated_streams_stay_bounded(rows: list[tuple[int, int, str]], repeats: int) -> None:
    events = [
        Event(f"e{n}", kind, f"u{user}", f"i{item}", T0 + n)
        for n, (user, item, kind) in enumerate(rows * repeats)
    ]
    model = _mf_after(events)
    assert np.isfinite(_largest_norm(model))
    assert _largest_norm(model) < 10.0


def test_mf_own_item_never_negative() -> None:
    # In a catalog of one item every draw is the event's own item, and a
    # step against it would undo the event. The user's score must rise.
    engine = Recommender(EngineConfig(fusion_learn_every=0))
    engine.learn([Event("e0", "view", "u0", "i0", T0)])
    model = engine.models["mf"]
    assert isinstance(model, ImplicitMF)
    before = float(model.score("u0", np.array([0]))[1][0])
    for n in range(1, 50):
        engine.learn([Event(f"e{n}", "view", "u0", "i0", T0 + n)])
    after = float(model.score("u0", np.array([0]))[1][0])
    assert after > before


def test_mf_dropped_negatives_leave_rates() -> None:
    # With one item, every negative drawn is the event's own item and is
    # left out, so the tables must match those learned with no negatives,
    # even where a heavy user's rate is cut.
    events = [Event(f"e{n}", "purchase", "u0", "i0", T0 + n) for n in range(300)]
    tables = []
    for negatives in (0, 3):
        config = EngineConfig(fusion_learn_every=0, learn_chunk=100, mf_negatives=negatives)
        engine = Recommender(config)
        engine.learn(events)
        model = engine.models["mf"]
        assert isinstance(model, ImplicitMF)
        tables.append((model._user_factors[:1].copy(), model.item_factors().copy()))
    assert np.array_equal(tables[0][0], tables[1][0])
    assert np.array_equal(tables[0][1], tables[1][1])


def test_negative_ring_stays_bounded(monkeypatch):
    # The item counts behind the ring never decay. Ten times the events over
    # the same 4 items must not grow the ring past its limit.
    monkeypatch.setattr(mf_module, "RING_MIN_POINTS", 200)
    engine = Recommender(EngineConfig(fusion_learn_every=0, learn_chunk=1000))
    model = engine.models["mf"]
    assert isinstance(model, ImplicitMF)
    for first in range(0, 40_000, 1000):
        engine.learn(
            [
                Event(f"e{n}", "purchase", f"u{n % 3}", f"i{n % 4}", T0 + n)
                for n in range(first, first + 1000)
            ]
        )
    assert len(engine.catalog) == 4
    assert len(model._sampler) <= 200 + 4
