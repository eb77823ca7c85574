"""Co-visitation pairs and their time window."""

from __future__ import annotations

from models.covisit import CoVisitationModel
from models.engine import HOUR_MS, Recommender
from schemas import Event

T0 = 1_700_000_000_000
DAY_MS = 24 * HOUR_MS


def _neighbours(engine: Recommender, item: str) -> set[str]:
    model = engine.models["covisit"]
    row = model._rows.get(engine.catalog.index[item], {})  # type: ignore[attr-defined]
    return {engine.catalog.ids[target] for target in row}


def test_covisit_pairs_items_within_window() -> None:
    engine = Recommender()
    engine.learn([Event("e1", "view", "u1", "a", T0), Event("e2", "view", "u1", "b", T0 + 60_000)])
    assert _neighbours(engine, "a") == {"b"}


def test_covisit_skips_late_event_outside_window() -> None:
    # An event stamped a month before the user's last items arrives after
    # them, as in a backfill replayed after live traffic. It lies a month
    # away from them, not inside the hour of the window.
    engine = Recommender()
    engine.learn(
        [
            Event("e1", "view", "u1", "a", T0),
            Event("e2", "view", "u1", "b", T0 + 60_000),
            Event("e3", "view", "u1", "old", T0 - 30 * DAY_MS),
        ]
    )
    assert _neighbours(engine, "old") == set()
    assert "old" not in _neighbours(engine, "b")


def test_late_event_not_newest_item() -> None:
    engine = Recommender()
    engine.learn(
        [Event(f"e{n}", "view", "u1", item, T0 + n * 1000) for n, item in enumerate("abc")]
    )

    engine.learn([Event("late", "view", "u1", "old", T0 - DAY_MS)])
    engine.learn([Event("later", "view", "u1", "mid", T0 + 1500)])

    items = engine.models["covisit"].user_items("u1")
    assert [engine.catalog.ids[row] for row in items] == ["c", "mid", "b", "a", "old"]


def test_state_with_recent_pairs_as_tuples_restores() -> None:
    # Older states kept each user's recent items as (item, time) tuples.
    engine = Recommender()
    engine.learn([Event(f"e{n}", "view", "u1", item, T0 + n) for n, item in enumerate("ab")])
    covisit = engine.models["covisit"]
    state = covisit.__dict__.copy()
    flat = covisit._recent["u1"].tolist()
    state["_recent"] = {"u1": list(zip(flat[::2], flat[1::2], strict=True))}
    restored = CoVisitationModel.__new__(CoVisitationModel)
    restored.__setstate__(state)

    restored.learn(engine._batch([Event("e5", "view", "u1", "c", T0 + 5)]))

    assert [engine.catalog.ids[row] for row in restored.user_items("u1")] == ["c", "b", "a"]
