"""Scoring shortcuts of the context and basket models against their definitions, and old state."""

from __future__ import annotations

import copy
import copyreg
import pickle
import random

import numpy as np
import pytest

from models.basket import SessionCoOccurrenceModel
from models.context import ContextModel
from models.engine import EngineConfig, Recommender, _UserState
from models.popularity import CategoryModel
from schemas import Event

T0 = 1_700_000_000_000


def _stream(n: int, seed: int = 3) -> list[Event]:
    rng = random.Random(seed)
    events = []
    for index in range(n):
        item = rng.randrange(40)
        category = None if item % 7 == 0 else f"c{item % 6}"
        events.append(
            Event(
                f"e{index}",
                rng.choice(["view", "view", "click", "purchase"]),
                f"u{rng.randrange(8)}",
                f"i{item}",
                T0 + 40_000 * index,
                session_id=f"s{index // 5}",
                price=float(item % 9) * 3.5,
                category=category,
            )
        )
    return events


def _context_by_definition(model: ContextModel, user_id: str, items: np.ndarray) -> np.ndarray:
    # The classifier's own prediction from each item's features.
    context = model._users[user_id]
    return np.array(
        [
            model.classifier.predict_proba_one(
                model._features(context, int(item), int(model.catalog.categories[item]))
            )[True]
            for item in items
        ]
    )


@pytest.fixture(scope="module")
def engine() -> Recommender:
    engine = Recommender()
    engine.learn(_stream(600))
    return engine


def test_context_scores_match_classifier(engine: Recommender) -> None:
    model = engine.models["context"]
    assert isinstance(model, ContextModel)
    items = np.arange(len(engine.catalog), dtype=np.int64)
    for user_id in ("u0", "u3", "u7"):
        scored, scores = model.score(user_id, items)
        assert scored.tolist() == items.tolist()
        expected = _context_by_definition(model, user_id, items)
        np.testing.assert_allclose(scores, expected, rtol=1e-12)


def test_context_old_state_rebuilds_table(engine: Recommender) -> None:
    model = engine.models["context"]
    old = dict(model.__dict__)
    del old["_category_weights"]
    restored = ContextModel.__new__(ContextModel)
    restored.__setstate__(pickle.loads(pickle.dumps(old)))
    items = np.arange(len(engine.catalog), dtype=np.int64)
    assert restored.score("u2", items)[1].tolist() == model.score("u2", items)[1].tolist()


def test_basket_old_counts_convert(engine: Recommender) -> None:
    model = engine.models["basket"]
    assert isinstance(model, SessionCoOccurrenceModel)
    state = dict(model.__dict__)
    counts = state["_counts"]
    state["_counts"] = {row: float(counts[row]) for row in np.flatnonzero(counts).tolist()}
    restored = SessionCoOccurrenceModel.__new__(SessionCoOccurrenceModel)
    restored.__setstate__(pickle.loads(pickle.dumps(state)))
    restored._memo_key = None
    items = np.arange(len(engine.catalog), dtype=np.int64)
    for user_id in ("u1", "u5"):
        assert restored.score(user_id, items)[1].tolist() == model.score(user_id, items)[1].tolist()
        assert restored.candidates(user_id, 5).tolist() == model.candidates(user_id, 5).tolist()


def test_basket_old_sessions_load() -> None:
    engine = Recommender()
    engine.learn(_stream(600))
    model = engine.models["basket"]
    assert isinstance(model, SessionCoOccurrenceModel)
    old = pickle.loads(pickle.dumps(model))
    for session in old._sessions.values():
        # Sessions written before they kept the set of their items.
        del session.seen
    restored = pickle.loads(pickle.dumps(old))
    for user_id, session in restored._sessions.items():
        assert session.seen == set(model._sessions[user_id].items)
    assert restored.state_bytes() == model.state_bytes()
    more = [
        Event(f"x{n}", "purchase", "u1", f"i{n % 50}", T0 + 10**9 + n, session_id="later")
        for n in range(12)
    ]
    current = pickle.loads(pickle.dumps(model))
    restored.learn(engine._batch(more))
    current.learn(engine._batch(more))
    assert restored.candidates("u1", 10).tolist() == current.candidates("u1", 10).tolist()


def test_category_old_state_uses_popularity(
    engine: Recommender,
) -> None:
    model = engine.models["category"]
    assert isinstance(model, CategoryModel)
    state = dict(model.__dict__)
    del state["scores"]
    state["popularity"] = engine.models["popular"]
    restored = CategoryModel.__new__(CategoryModel)
    restored.__setstate__(pickle.loads(pickle.dumps(state)))
    assert not hasattr(restored, "popularity")
    popular = engine.models["popular"].scores.raw()
    assert restored.scores.raw().tolist() == popular.tolist()
    assert len(restored.candidates("u4", 5)) > 0


def test_engine_old_state_sets_half_life(
    engine: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = CategoryModel.__getstate__

    def old_layout(model: CategoryModel) -> dict[str, object]:
        state = written(model)
        del state["scores"]
        state["popularity"] = engine.models["popular"]
        return state

    monkeypatch.setattr(CategoryModel, "__getstate__", old_layout)
    blob = pickle.dumps(engine)
    monkeypatch.undo()
    restored = pickle.loads(blob)
    half_life = restored.models["category"].scores.half_life_ms
    assert half_life == restored.config.category_half_life_ms


def test_engine_old_config_fixes_new_items(
    engine: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A state saved before the setting existed has no value for it.
    old_config = copy.copy(engine.config)
    object.__delattr__(old_config, "fusion_fixed_new_order")
    monkeypatch.setattr(engine, "config", old_config)
    restored = pickle.loads(pickle.dumps(engine))
    monkeypatch.undo()
    assert "fusion_fixed_new_order" not in vars(restored.config)
    assert restored.config.fusion_fixed_new_order is True
    assert restored.recommend(["u3"])[0]


def test_category_counts_ignore_batches() -> None:
    # A refund of an item bought before the stream began, then a view of it.
    events = [
        Event("r1", "purchase", "u1", "a", T0, quantity=-1, category="c"),
        Event("v1", "view", "u1", "a", T0 + 1000, category="c"),
        Event("v2", "view", "u2", "a", T0 + 2000, category="c"),
    ]
    config = EngineConfig(fusion_learn_every=0)
    whole, split = Recommender(config), Recommender(config)
    whole.learn(events)
    for event in events:
        split.learn([event])
    for engine in (whole, split):
        assert engine.models["category"].scores.raw().tolist() == [1.0]


@pytest.mark.parametrize("batch_size", [1, 7, 500])
def test_context_negatives_ignore_batches(batch_size: int) -> None:
    # Items keep one category and no price, so only the negatives could differ.
    events = [
        Event(f"e{n}", "view", f"u{n % 3}", f"i{n % 1700}", T0 + n * 1000, category=f"c{n % 4}")
        for n in range(3000)
    ]
    config = EngineConfig(fusion_learn_every=0)
    whole, split = Recommender(config), Recommender(config)
    whole.learn(events)
    for start in range(0, len(events), batch_size):
        split.learn(events[start : start + batch_size])
    assert (
        split.models["context"].classifier._weights == whole.models["context"].classifier._weights
    )


def test_engine_old_user_state_loads(engine: Recommender, monkeypatch: pytest.MonkeyPatch) -> None:
    # User states written while they kept the user's last category.
    def old_layout(state: _UserState, protocol: int) -> tuple[object, ...]:
        slots = {name: getattr(state, name) for name in _UserState.__slots__}
        slots["last_category"] = 2
        return (copyreg.__newobj__, (_UserState,), (None, slots))

    monkeypatch.setattr(_UserState, "__reduce_ex__", old_layout, raising=False)
    blob = pickle.dumps(engine)
    monkeypatch.undo()
    restored = pickle.loads(blob)
    for user_id, state in engine._users.items():
        assert restored._users[user_id] == state
    assert not hasattr(restored._users["u1"], "last_category")
    more = [Event(f"x{n}", "view", "u1", f"i{n}", T0 + 10**9 + n) for n in range(5)]
    restored.learn(more)
    assert restored.user_event_times("u1")[1] == T0 + 10**9 + 4
