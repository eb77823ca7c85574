"""Session co-occurrence: pairs, sessions, scoring order and limits."""

from __future__ import annotations

import numpy as np
import pytest

from models.base import ModelError
from models.basket import SessionCoOccurrenceModel
from models.engine import EngineConfig, Recommender
from schemas import Event

T0 = 1_700_000_000_000
MINUTE_MS = 60_000


def _line(n: int, user: str, item: str, invoice: str | None, minute: int = 0) -> Event:
    return Event(f"e{n}", "purchase", user, item, T0 + minute * MINUTE_MS, session_id=invoice)


def _basket_ids(engine: Recommender, user: str, n: int = 10) -> list[str]:
    rows = engine.models["basket"].candidates(user, n)
    return [engine.catalog.ids[row] for row in rows]


def test_basket_pairs_lines_of_one_invoice() -> None:
    engine = Recommender()
    engine.learn(
        [
            _line(0, "u1", "a", "s1"),
            _line(1, "u1", "b", "s1"),
            _line(2, "u1", "c", "s1"),
            _line(3, "u2", "a", "s2", minute=5),
        ]
    )
    assert sorted(_basket_ids(engine, "u2")) == ["b", "c"]


def test_basket_ignores_pairs_across_invoices() -> None:
    engine = Recommender()
    engine.learn([_line(0, "u1", "a", "s1"), _line(1, "u1", "b", "s2", minute=1)])
    engine.learn([_line(2, "u2", "a", "s3", minute=2)])
    assert _basket_ids(engine, "u2") == []


def test_late_line_keeps_current_basket() -> None:
    engine = Recommender()
    engine.learn(
        [
            _line(0, "u1", "a", "s1", minute=60),
            _line(1, "u1", "z", "s0"),
            _line(2, "u1", "b", "s1", minute=60),
            _line(3, "u2", "a", "s2", minute=61),
        ]
    )
    assert _basket_ids(engine, "u2") == ["b"]


def test_late_event_keeps_gap_session() -> None:
    engine = Recommender(EngineConfig(basket_session_gap_ms=10 * MINUTE_MS))
    engine.learn(
        [
            _line(0, "u1", "a", None, minute=60),
            _line(1, "u1", "z", None),
            _line(2, "u1", "b", None, minute=61),
            _line(3, "u2", "a", None, minute=62),
        ]
    )
    assert _basket_ids(engine, "u2") == ["b"]


def test_slightly_late_event_keeps_gap_clock() -> None:
    # The line at minute 62 is within the 10-minute gap of the last one, so
    # it joins the basket, but the basket's clock stays at minute 66. The
    # line at minute 74 is then 8 minutes later and still in the basket.
    engine = Recommender(EngineConfig(basket_session_gap_ms=10 * MINUTE_MS))
    engine.learn(
        [
            _line(0, "u1", "a", None, minute=60),
            _line(1, "u1", "b", None, minute=66),
            _line(2, "u1", "c", None, minute=62),
            _line(3, "u1", "d", None, minute=74),
            _line(4, "u2", "d", None, minute=200),
        ]
    )
    assert sorted(_basket_ids(engine, "u2")) == ["a", "b", "c"]


def test_basket_splits_sessions_by_gap() -> None:
    engine = Recommender(EngineConfig(basket_session_gap_ms=10 * MINUTE_MS))
    engine.learn(
        [
            _line(0, "u1", "a", None),
            _line(1, "u1", "b", None, minute=5),
            _line(2, "u1", "c", None, minute=60),
            _line(3, "u2", "a", None, minute=61),
        ]
    )
    assert _basket_ids(engine, "u2") == ["b"]


def test_basket_scores_latest_session_newest_first() -> None:
    engine = Recommender()
    engine.learn(
        [
            _line(0, "u1", "a", "s1"),
            _line(1, "u1", "b", "s1"),
            _line(2, "u1", "c", "s2", minute=5),
            _line(3, "u1", "d", "s2", minute=5),
        ]
    )
    model = engine.models["basket"]
    assert isinstance(model, SessionCoOccurrenceModel)
    rows = engine.catalog.index
    assert model.scoring_items("u1") == [rows["d"], rows["c"]]


def test_basket_newest_item_weighs_most() -> None:
    engine = Recommender()
    engine.learn(
        [
            _line(0, "u1", "a", "s1"),
            _line(1, "u1", "x", "s1"),
            _line(2, "u2", "b", "s2"),
            _line(3, "u2", "y", "s2"),
            _line(4, "u3", "a", "s3", minute=5),
            _line(5, "u3", "b", "s3", minute=5),
        ]
    )
    rows = np.array([engine.catalog.index["x"], engine.catalog.index["y"]], dtype=np.int64)
    scored, scores = engine.models["basket"].score("u3", rows)
    assert scored.tolist() == rows.tolist()
    assert scores[1] > scores[0]


def test_basket_ignores_events_without_session() -> None:
    engine = Recommender()
    engine.learn(
        [
            _line(0, "u1", "a", None),
            _line(1, "u1", "b", None),
            _line(2, "u2", "a", None, minute=1),
        ]
    )
    assert _basket_ids(engine, "u2") == []
    assert engine.models["basket"].state_bytes() == 0


def test_basket_pairs_within_window() -> None:
    engine = Recommender(EngineConfig(basket_max_items=2))
    engine.learn([_line(n, "u1", f"i{n}", "s1") for n in range(4)])
    engine.learn([_line(9, "u2", "i0", "s2", minute=5)])
    assert sorted(_basket_ids(engine, "u2")) == ["i1", "i2"]


def test_basket_long_invoice_scores_latest_lines() -> None:
    engine = Recommender(EngineConfig(basket_max_items=3))
    engine.learn([_line(n, "u1", f"i{n}", "s1") for n in range(8)])
    engine.learn([_line(8, "u1", "i2", "s1")])
    model = engine.models["basket"]
    assert isinstance(model, SessionCoOccurrenceModel)
    rows = engine.catalog.index
    assert model.scoring_items("u1") == [rows["i7"], rows["i6"], rows["i5"]]


def test_basket_counts_repeated_line_once() -> None:
    engine = Recommender(EngineConfig(basket_max_items=2))
    engine.learn([_line(n, "u1", f"i{n}", "s1") for n in range(3)])
    # i0 has left the window of two items, and comes back in the same invoice.
    engine.learn([_line(3, "u1", "i0", "s1")])
    model = engine.models["basket"]
    assert isinstance(model, SessionCoOccurrenceModel)
    rows = engine.catalog.index
    assert model._counts[rows["i0"]] == 1.0
    assert model.scoring_items("u1") == [rows["i2"], rows["i1"]]
    # Pairs i0-i1, i0-i2 and i1-i2 both ways, two items in the window, three seen.
    assert model.state_bytes() == 100 * (6 + 2 + 3 + 1) + model._counts.nbytes


def test_basket_rejects_invalid_settings() -> None:
    with pytest.raises(ModelError, match="max_session_items is 0"):
        SessionCoOccurrenceModel(max_session_items=0)
    with pytest.raises(ModelError, match="score_items is 0"):
        SessionCoOccurrenceModel(score_items=0)
    with pytest.raises(ModelError, match="half_life_ms is 0"):
        SessionCoOccurrenceModel(half_life_ms=0)


def _basket_candidates(session_id: str | None) -> list[str]:
    # u1 views "a" and, ten days later, "b", both under the same session id.
    # u2 then views "a". Ten days apart is no basket, so the session model
    # must not propose "b" to u2.
    engine = Recommender()
    engine.learn(
        [
            Event("e1", "view", "u1", "a", T0, session_id=session_id),
            Event("e2", "view", "u1", "b", T0 + 10 * 86_400_000, session_id=session_id),
            Event("e3", "view", "u2", "a", T0 + 10 * 86_400_000 + 1, session_id="s2"),
        ]
    )
    rows = engine.models["basket"].candidates("u2", 5)
    return [engine.catalog.ids[row] for row in rows]


def test_absent_session_id_pairs_nothing():
    assert _basket_candidates(None) == []


def test_empty_session_id_counts_as_absent():
    # Producers often write "" for a value they lack. An empty session_id
    # counts as none, as an empty category or title does, so events days
    # apart form no basket.
    assert _basket_candidates("") == []


def test_empty_session_id_splits_sessions_by_gap():
    engine = Recommender()
    engine.learn(
        [
            Event("e1", "view", "u1", "a", T0, session_id=""),
            Event("e2", "view", "u1", "b", T0 + 10 * 86_400_000, session_id=""),
        ]
    )
    groups = engine.candidate_scores("u1").groups.tolist()
    # "a" was touched in an earlier session (2), "b" in the current one (1).
    assert sorted(groups) == [1, 2]


def test_session_memory_bounded() -> None:
    engine = Recommender()
    model = engine.models["basket"]
    engine.learn([_line(n, "u1", f"i{n}", "web") for n in range(3_000)])

    session = model._sessions["u1"]
    assert len(session.seen) <= 1_000
    assert set(session.items) <= session.seen
    assert len(session.items) == 50
