"""The per-group choice of ordering in learned fusion."""

from __future__ import annotations

import numpy as np
import pytest

from models.base import ModelError
from models.engine import MODEL_NAMES, ORDER_POLICIES, EngineConfig, Recommender
from models.fusion import OrderSelector
from schemas import Event

T0 = 1_700_000_000_000
MINUTE_MS = 60_000


def _line(n: int, user: str, item: str, invoice: str, minute: int = 0) -> Event:
    return Event(f"e{n}", "purchase", user, item, T0 + minute * MINUTE_MS, session_id=invoice)


def test_selector_keeps_first_policy_on_ties() -> None:
    selector = OrderSelector(["fused", "other"])
    keys = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    groups = np.zeros(3, dtype=np.int64)
    assert selector.reorder(keys, keys[0], groups, cold=False).tolist() == [3.0, 2.0, 1.0]


def test_selector_switches_to_better_policy() -> None:
    selector = OrderSelector(["fused", "other"], depth=1, z=1.0)
    keys = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    groups = np.zeros(3, dtype=np.int64)
    for _ in range(3):
        selector.record(keys, groups, target=2, cold=False)
    assert selector.choice(0, cold=False) == 1
    reordered = selector.reorder(keys, keys[0], groups, cold=False)
    assert np.argsort(-reordered).tolist() == [2, 1, 0]
    assert sorted(reordered.round(6).tolist()) == [1.0, 2.0, 3.0]


def test_selector_reorders_only_within_groups() -> None:
    selector = OrderSelector(["fused", "other"], depth=1, z=1.0)
    keys = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    groups = np.array([0, 0, 1, 1], dtype=np.int64)
    for _ in range(3):
        selector.record(keys, groups, target=1, cold=False)
    reordered = selector.reorder(keys, keys[0], groups, cold=False)
    assert np.argsort(-reordered).tolist() == [1, 0, 2, 3]


def test_selector_counts_cold_users_apart() -> None:
    selector = OrderSelector(["fused", "other"], depth=1, z=1.0)
    keys = np.array([[2.0, 1.0], [1.0, 2.0]])
    groups = np.zeros(2, dtype=np.int64)
    for _ in range(3):
        selector.record(keys, groups, target=1, cold=True)
    assert selector.choice(0, cold=True) == 1
    assert selector.choice(0, cold=False) == 0


def test_selector_ignores_policy_without_opinion() -> None:
    selector = OrderSelector(["fused", "other"], depth=1)
    keys = np.array([[2.0, 1.0], [-np.inf, -np.inf]])
    groups = np.zeros(2, dtype=np.int64)
    selector.record(keys, groups, target=0, cold=False)
    assert selector.credit[False][0].tolist() == [2.0, 0.0]


def test_selector_keeps_default_on_near_tie() -> None:
    selector = OrderSelector(["fused", "other"], depth=1)
    keys = np.array([[2.0, 1.0], [1.0, 2.0]])
    groups = np.zeros(2, dtype=np.int64)
    for target in (0, 1, 1):
        selector.record(keys, groups, target=target, cold=False)
    assert selector.lead[False][0, 1] > 0
    assert selector.choice(0, cold=False) == 0


def test_selector_credits_served_slots() -> None:
    selector = OrderSelector(["fused", "other"], depth=2)
    keys = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 4.0, 3.0]])
    groups = np.array([0, 0, 1, 1], dtype=np.int64)
    selector.record(keys, groups, target=2, cold=False)
    assert selector.credit[False][1].tolist() == [1.0, 1.0]


def test_selector_rejects_invalid_settings() -> None:
    with pytest.raises(ModelError, match="depth is 0"):
        OrderSelector(["fused"], depth=0)
    with pytest.raises(ModelError, match="z is -1"):
        OrderSelector(["fused"], z=-1.0)


def test_engine_records_policy_hits_while_learning() -> None:
    engine = Recommender(EngineConfig(fusion_learn_every=1))
    engine.learn([_line(0, "u1", "a", "s1"), _line(1, "u1", "b", "s1")])
    engine.learn([_line(2, "u2", "a", "s2", minute=5)])
    engine.learn([_line(3, "u2", "b", "s2", minute=5)])
    credit = engine.selector.credit[True][0]
    assert credit[ORDER_POLICIES.index("basket")] > 0
    assert credit[ORDER_POLICIES.index("covisit")] > 0


def test_engine_without_selection_keeps_learned_scores() -> None:
    engine = Recommender(EngineConfig(fusion_select_order=False, fusion_learn_every=1))
    engine.learn([_line(0, "u1", "a", "s1"), _line(1, "u1", "b", "s1")])
    engine.learn([_line(2, "u2", "a", "s2", minute=5)])
    engine.learn([_line(3, "u2", "b", "s2", minute=5)])
    assert engine.selector.credit[True].sum() == 0


def _covisited_pair_events() -> list[Event]:
    # Items z0..z9 are popular, z0 the most, and "hot" follows "a" in every
    # session. The last event is the first of user "me", on "a".
    events = []
    for item in range(10):
        for _ in range(20 - item):
            events.append(Event(f"e{len(events)}", "view", f"p{len(events)}", f"z{item}", T0))
    for user in range(5):
        for item in ("a", "hot"):
            events.append(Event(f"e{len(events)}", "view", f"c{user}", item, T0 + len(events)))
    events.append(Event(f"e{len(events)}", "view", "me", "a", T0 + len(events)))
    return events


def test_unproven_group_follows_fixed_weights() -> None:
    # The fusion never learns, so every group keeps the order of the fixed
    # weights, which put "hot" first.
    engine = Recommender(EngineConfig(fusion_learn_every=0))
    engine.learn(_covisited_pair_events())
    scored = engine.candidate_scores("me")

    learned = engine.fused(scored, "learned")
    weighted = engine.fused(scored, "weighted")

    def new_items_order(scores: np.ndarray) -> list[str]:
        # Group 0 contains the candidates new to the user.
        rows, _ = engine.top_rows(scored, scores, len(scored.items), scored.groups == 0)
        return [engine.catalog.ids[row] for row in rows]

    assert new_items_order(learned)[0] == "hot"
    assert new_items_order(learned) == new_items_order(weighted)


@pytest.mark.parametrize("fixed_new_order", [True, False])
def test_new_item_order_once_proven(fixed_new_order: bool) -> None:
    # Every group is proven, and the rates reward only the first item of
    # `popular`. The fixed order puts "hot", the co-visited item, first.
    config = EngineConfig(
        fusion_learn_every=0,
        fusion_min_hits=0,
        fusion_select_order=False,
        fusion_fixed_new_order=fixed_new_order,
    )
    engine = Recommender(config)
    engine.learn(_covisited_pair_events())
    popular = MODEL_NAMES.index("popular")
    for cold in (True, False):
        engine.fusion.hits[cold][:, 0] = 0.0
        engine.fusion.hits[cold][popular, 0, 0] = engine.fusion.shown[cold][popular, 0, 0]
    scored = engine.candidate_scores("me")

    def first_new_item(strategy: str) -> str:
        rows, _ = engine.top_rows(scored, engine.fused(scored, strategy), 1, scored.groups == 0)
        return engine.catalog.ids[rows[0]]

    assert first_new_item("weighted") == "hot"
    assert first_new_item("learned") == ("hot" if fixed_new_order else "z0")
