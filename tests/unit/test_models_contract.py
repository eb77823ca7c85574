"""One contract suite applied to every model of the fusion."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from models.base import Model
from models.engine import MODEL_NAMES, EngineConfig, Recommender
from schemas import Event

_TITLES = ("red alarm clock", "green alarm clock", "lunch box", "red lunch bag", "tea set")


def _stream() -> list[Event]:
    events = []
    for n in range(60):
        user = f"u{n % 4}"
        item = f"i{(n * 7) % 11}"
        kind = ("view", "view", "click", "purchase")[n % 4]
        events.append(
            Event(
                event_id=f"e{n}",
                type=kind,
                user_id=user,
                item_id=item,
                timestamp_ms=1_700_000_000_000 + n * 60_000,
                category=f"c{(n * 7) % 11 % 3}",
                price=1.5 * (n % 5),
                session_id=f"{user}-s{n // 20}",
                title=_TITLES[(n * 7) % 11 % len(_TITLES)],
            )
        )
    return events


def _trained(seed: int = 0) -> Recommender:
    engine = Recommender(EngineConfig(seed=seed))
    engine.learn(_stream())
    return engine


def _all_items(engine: Recommender) -> np.ndarray:
    return np.arange(len(engine.catalog), dtype=np.int64)


@pytest.fixture(params=MODEL_NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_model_implements_protocol(name: str) -> None:
    model = _trained().models[name]
    assert isinstance(model, Model)
    assert model.name == name


def test_learn_leaves_events_unchanged(name: str) -> None:
    engine = Recommender()
    events = _stream()
    before = copy.deepcopy(events)
    engine.learn(events)
    assert events == before


def test_score_leaves_items_unchanged(name: str) -> None:
    engine = _trained()
    items = _all_items(engine)[::-1].copy()
    before = items.copy()
    engine.models[name].score("u1", items)
    assert np.array_equal(items, before)


def test_score_returns_requested_finite(name: str) -> None:
    engine = _trained()
    items = _all_items(engine)
    scored, scores = engine.models[name].score("u1", items)
    assert len(scored) == len(scores)
    assert set(scored.tolist()) <= set(items.tolist())
    assert np.isfinite(scores).all()


def test_candidates_are_known_rows(name: str) -> None:
    engine = _trained()
    rows = engine.models[name].candidates("u1", 5)
    assert len(rows) <= 5 * engine.config.category_recent
    assert ((rows >= 0) & (rows < len(engine.catalog))).all()


def test_pickle_round_trip_scores_equal(name: str) -> None:
    engine = _trained()
    restored = pickle.loads(pickle.dumps(engine))
    items = _all_items(engine)
    original = engine.models[name].score("u2", items)
    copied = restored.models[name].score("u2", items)
    assert np.array_equal(original[0], copied[0])
    assert np.array_equal(original[1], copied[1])


def test_fixed_seed_fixed_output(name: str) -> None:
    first = _trained(seed=7).models[name].score("u3", _all_items(_trained(seed=7)))
    second = _trained(seed=7).models[name].score("u3", _all_items(_trained(seed=7)))
    assert np.array_equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])


def test_unseen_user_gets_no_state(name: str) -> None:
    engine = _trained()
    model = engine.models[name]
    model.candidates("u1", 5)
    before = model.state_bytes()
    items, scores = model.score("never-seen", _all_items(engine))
    model.candidates("never-seen", 5)
    assert np.isfinite(scores).all()
    assert model.state_bytes() == before


def test_unseen_items_are_ignored(name: str) -> None:
    engine = _trained()
    beyond = np.array([len(engine.catalog) - 1], dtype=np.int64)
    items, scores = engine.models[name].score("u1", beyond)
    assert len(items) == len(scores)


def test_forget_user_drops_user_state(name: str) -> None:
    engine = _trained()
    engine.models[name].forget_user("u1")
    if name in ("popular", "trending"):
        return
    items, _ = engine.models[name].score("u1", _all_items(engine))
    assert len(items) == 0
    assert len(engine.models[name].candidates("u1", 5)) == 0


def test_forget_user_leaves_no_id_in_state(name: str) -> None:
    engine = _trained()
    model = engine.models[name]
    model.candidates("u1", 5)
    model.score("u1", _all_items(engine))
    model.forget_user("u1")
    assert b"u1" not in pickle.dumps(model)


def test_forget_user_leaves_no_scores_in_state(name: str) -> None:
    # State after scoring a user and forgetting them equals state after
    # forgetting them unscored, so no score computed for them remains.
    scored = _trained()
    scored.models[name].candidates("u1", 5)
    scored.models[name].score("u1", _all_items(scored))
    scored.models[name].forget_user("u1")
    unscored = _trained()
    unscored.models[name].forget_user("u1")
    assert pickle.dumps(scored.models[name]) == pickle.dumps(unscored.models[name])
