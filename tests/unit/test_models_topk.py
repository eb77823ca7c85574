"""Property tests of the top-k invariants over random event streams."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from models.engine import MODEL_NAMES, EngineConfig, Recommender
from schemas import Event, ItemUpdate

T0 = 1_700_000_000_000

event_rows = st.lists(
    st.tuples(
        st.sampled_from(["u0", "u1", "u2", "u:3", "u 4"]),
        st.integers(min_value=0, max_value=14),
        st.sampled_from(["view", "click", "purchase", "refund"]),
        st.sampled_from([None, "c0", "c1", "c2"]),
        st.integers(min_value=0, max_value=7_200_000),
    ),
    min_size=1,
    max_size=60,
)


def _events(rows: list[tuple[str, int, str, str | None, int]]) -> list[Event]:
    events = []
    time_ms = T0
    for n, (user, item, kind, category, gap) in enumerate(rows):
        time_ms += gap
        quantity = -1 if kind == "refund" else 1
        kind = "purchase" if kind == "refund" else kind
        events.append(
            Event(f"e{n}", kind, user, f"i{item}", time_ms, None, quantity, None, None, category)
        )
    return events


@settings(max_examples=60, deadline=None)
@given(
    rows=event_rows,
    k=st.integers(min_value=1, max_value=12),
    fusion=st.sampled_from(["weighted", "rrf", "learned"]),
    policy=st.sampled_from(["exclude", "allow"]),
    cap=st.sampled_from([None, 1, 2]),
    out_of_stock=st.sets(st.integers(min_value=0, max_value=14), max_size=5),
    batch=st.integers(min_value=1, max_value=20),
)
def test_lists_keep_topk_invariants(
    rows: list[tuple[str, int, str, str | None, int]],
    k: int,
    fusion: str,
    policy: str,
    cap: int | None,
    out_of_stock: set[int],
    batch: int,
) -> None:
    engine = Recommender(EngineConfig(fusion=fusion, repeat_purchases=policy, max_per_category=cap))
    events = _events(rows)
    for start in range(0, len(events), batch):
        engine.learn(events[start : start + batch])
        engine.recommend(["u0", "u1"], k)
    for item in out_of_stock:
        engine.update_item(ItemUpdate(f"i{item}", T0, in_stock=False))
    users = ["u0", "u1", "u2", "u:3", "u 4", "nobody"]
    for user, entries in zip(users, engine.recommend(users, k), strict=True):
        ids = [entry.item_id for entry in entries]
        scores = [entry.score for entry in entries]
        assert len(entries) <= k
        assert len(ids) == len(set(ids))
        assert scores == sorted(scores, reverse=True)
        assert all(math.isfinite(score) for score in scores)
        assert not {f"i{item}" for item in out_of_stock} & set(ids)
        assert all(entry.sources for entry in entries)
        if policy == "exclude" and engine.has_user(user):
            purchased = engine._users[user].purchased
            bought = {engine.catalog.ids[row] for row in purchased}
            assert not bought & set(ids)
        if cap is not None and engine.has_user(user):
            categories = [engine.catalog.category_name(engine.catalog.index[i]) for i in ids]
            named = [c for c in categories if c is not None]
            assert all(named.count(c) <= cap for c in set(named))


@settings(max_examples=40, deadline=None)
@given(
    rows=event_rows,
    fusion=st.sampled_from(["weighted", "rrf", "learned"]),
    weights=st.sampled_from([None, {"popular": 0.0}, {"mf": 0.0, "recent": 0.0, "covisit": 0.0}]),
)
def test_sources_name_contributing_models(
    rows: list[tuple[str, int, str, str | None, int]],
    fusion: str,
    weights: dict[str, float] | None,
) -> None:
    engine = Recommender(EngineConfig(fusion=fusion, weights=weights))
    engine.learn(_events(rows))
    for user in ("u0", "u1", "u2", "u:3", "u 4"):
        if not engine.has_user(user):
            continue
        scored = engine.candidate_scores(user)
        enabled = scored.mask & (engine.weights > 0)[:, None]
        for entry in engine.recommend([user], 12)[0]:
            row = engine.catalog.index[entry.item_id]
            position = int(np.searchsorted(scored.items, row))
            if position == len(scored.items) or scored.items[position] != row:
                assert entry.sources == ("popular",)
                continue
            contributing = {MODEL_NAMES[m] for m in np.flatnonzero(enabled[:, position])}
            if not contributing:
                # Only models of weight 0 scored it, so it came from padding.
                assert entry.sources == ("popular",)
                continue
            assert set(entry.sources) == contributing
