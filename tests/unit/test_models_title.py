"""Title similarity: word weights, recency, title changes, limits and old states."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.base import EventBatch, ModelError
from models.engine import MODEL_NAMES, EngineConfig, Recommender
from models.title import TitleModel, title_words
from schemas import Event, ItemUpdate

T0 = 1_700_000_000_000


def _buy(n: int, user: str, item: str, title: str | None = None, quantity: int = 1) -> Event:
    return Event(f"e{n}", "purchase", user, item, T0 + n * 1000, quantity=quantity, title=title)


def _title_ids(engine: Recommender, user: str, n: int = 10) -> list[str]:
    rows = engine.models["title"].candidates(user, n)
    return [engine.catalog.ids[row] for row in rows]


def _catalog(engine: Recommender, titles: dict[str, str]) -> None:
    engine.learn([_buy(n, "shop", item, title) for n, (item, title) in enumerate(titles.items())])


def test_title_words_keep_letters_only() -> None:
    assert title_words("Müsli-Riegel 6er, MÜSLI") == ["müsli", "riegel"]
    assert title_words("12 x 3 cm") == []


def test_rare_word_outranks_common_word() -> None:
    engine = Recommender()
    _catalog(
        engine,
        {
            "clock": "set vintage alarm clock",
            "lamp": "set vintage lamp",
            "spoons": "set spoons",
            "cups": "set cups",
            "plates": "set plates",
            "bowls": "set bowls",
        },
    )
    engine.learn([_buy(10, "u1", "clock")])

    ranked = _title_ids(engine, "u1")

    assert ranked[0] == "lamp"
    assert "clock" not in ranked


def test_unrelated_titles_give_no_opinion() -> None:
    engine = Recommender()
    _catalog(engine, {"a": "alarm clock pink", "b": "lunch box", "c": "tea towel"})
    engine.learn([_buy(10, "u1", "a")])
    items, _ = engine.models["title"].score("u1", np.arange(3, dtype=np.int64))
    assert items.tolist() == []


def test_newest_item_weighs_most() -> None:
    engine = Recommender()
    _catalog(
        engine,
        {
            "clock": "alarm clock pink",
            "clock2": "alarm clock green",
            "box": "lunch box spaceboy",
            "box2": "lunch box dolly",
        },
    )
    engine.learn([_buy(10, "u1", "clock"), _buy(11, "u1", "box")])
    assert _title_ids(engine, "u1") == ["box2", "clock2"]
    engine.learn([_buy(12, "u1", "clock")])
    assert _title_ids(engine, "u1") == ["clock2", "box2"]


def test_titled_update_reaches_lists_at_once() -> None:
    engine = Recommender()
    _catalog(engine, {"a": "alarm clock pink", "b": "lunch box", "c": "tea towel"})
    engine.learn([_buy(10, "u1", "a")])

    engine.update_item(ItemUpdate("new", T0 + 20_000, title="ALARM CLOCK BLUE"))

    entries = engine.recommend(["u1"])[0]
    sources = {entry.item_id: entry.sources for entry in entries}
    assert "title" in sources["new"]


def test_title_change_reindexes_the_item() -> None:
    engine = Recommender()
    _catalog(engine, {"a": "alarm clock pink", "b": "alarm clock red", "c": "garden hose"})
    engine.learn([_buy(10, "u1", "a")])
    assert _title_ids(engine, "u1") == ["b"]

    engine.update_item(ItemUpdate("b", T0 + 20_000, title="garden hose reel"))

    assert _title_ids(engine, "u1") == []
    engine.learn([_buy(11, "u2", "c")])
    assert _title_ids(engine, "u2") == ["b"]


def test_empty_title_removes_the_item() -> None:
    engine = Recommender()
    _catalog(engine, {"a": "alarm clock pink", "b": "alarm clock red", "c": "tea towel"})
    engine.update_item(ItemUpdate("b", T0 + 20_000, title=""))
    engine.learn([_buy(10, "u1", "a")])
    assert _title_ids(engine, "u1") == []
    assert engine.models["title"].n_titled == 2


@pytest.mark.parametrize("title", ["12 x 6", "", "-- ?"])
def test_wordless_title_of_new_item_ignored(title: str) -> None:
    # The first titled item is the one without words, so no norm is stored yet.
    engine = Recommender()
    engine.learn([_buy(0, "u1", "b", title), _buy(1, "u1", "a", "alarm clock pink")])
    engine.update_item(ItemUpdate("c", T0 + 5_000, title=title))

    assert engine.models["title"].n_titled == 1
    assert engine.user_history("u1") == ["b", "a"]
    assert "c" in engine.catalog.index


def test_too_common_words_link_nothing() -> None:
    engine = Recommender(EngineConfig(title_max_word_items=2))
    _catalog(engine, {"a": "red clock", "b": "red lamp", "c": "red towel", "d": "blue clock"})
    engine.learn([_buy(10, "u1", "a")])
    assert _title_ids(engine, "u1") == ["d"]


def test_refund_is_not_a_recent_item() -> None:
    engine = Recommender()
    _catalog(engine, {"a": "alarm clock pink", "b": "alarm clock red"})
    engine.learn([_buy(10, "u1", "a", quantity=-1)])
    assert _title_ids(engine, "u1") == []


def test_forget_user_drops_recent_items_only() -> None:
    engine = Recommender()
    _catalog(engine, {"a": "alarm clock pink", "b": "alarm clock red"})
    engine.learn([_buy(10, "u1", "a")])
    engine.forget_user("u1")
    assert _title_ids(engine, "u1") == []
    engine.learn([_buy(11, "u2", "a")])
    assert _title_ids(engine, "u2") == ["b"]


def test_state_bytes_grow_with_titles() -> None:
    model = TitleModel()
    before = model.state_bytes()
    model.set_title(0, "alarm clock pink")
    assert model.state_bytes() > before


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("title_recency_power", float("nan")),
        ("title_recency_power", -1.0),
        ("title_recent_items", 0),
        ("title_max_word_items", 0),
    ],
)
def test_invalid_title_setting_named(setting: str, value: float) -> None:
    with pytest.raises(ModelError, match=f"{setting} is"):
        Recommender(EngineConfig(**{setting: value}))


def test_invalid_settings_are_named() -> None:
    with pytest.raises(ModelError, match="recent_items is 0"):
        TitleModel(recent_items=0)
    with pytest.raises(ModelError, match="max_word_items is 0"):
        TitleModel(max_word_items=0)


WORDS = ("red", "blue", "clock", "lamp", "box", "bag", "tea", "set")


@settings(max_examples=80, deadline=None)
@given(
    titles=st.lists(
        st.lists(st.sampled_from(WORDS), min_size=1, max_size=4), min_size=2, max_size=12
    ),
    changes=st.lists(
        st.tuples(st.integers(0, 11), st.lists(st.sampled_from(WORDS), max_size=3)), max_size=3
    ),
    history=st.lists(st.integers(0, 11), min_size=1, max_size=8),
)
def test_scores_equal_idf_cosine_sums(
    titles: list[list[str]], changes: list[tuple[int, list[str]]], history: list[int]
) -> None:
    # With a refresh share of 0 the model must match the exact IDF cosine,
    # also after titles change or are removed.
    model = TitleModel(recent_items=3, recency_power=2.0, norm_refresh_share=0.0)
    for row, words in enumerate(titles):
        model.set_title(row, " ".join(words))
    final = [set(words) for words in titles]
    for row, words in changes:
        row %= len(titles)
        model.set_title(row, " ".join(words))
        final[row] = set(words)
    items = np.array([row % len(titles) for row in history], dtype=np.int64)
    model.learn(_batch(items))

    recent: list[int] = []
    for row in items.tolist():
        if row in recent:
            recent.remove(row)
        recent.append(row)
    recent = recent[-3:][::-1]
    titled = [words for words in final if words]
    n = len(titled)
    idf = {w: math.log((1 + n) / sum(w in s for s in titled)) for w in set().union(*titled)}

    def cosine(a: set[str], b: set[str]) -> float:
        dot = sum(idf[w] ** 2 for w in a & b)
        norm_a = math.sqrt(sum(idf[w] ** 2 for w in a))
        norm_b = math.sqrt(sum(idf[w] ** 2 for w in b))
        return dot / (norm_a * norm_b)

    expected: dict[int, float] = {}
    for position, source in enumerate(recent):
        for row in range(len(final)):
            if row != source and final[row] & final[source]:
                share = cosine(final[source], final[row]) / (1 + position) ** 2
                expected[row] = expected.get(row, 0.0) + share
    rows, scores = model.score("u", np.arange(len(final), dtype=np.int64))
    assert rows.tolist() == sorted(expected)
    assert np.allclose(scores, [expected[row] for row in rows.tolist()])


@pytest.mark.parametrize("new_title", ["garden hose", ""])
def test_title_change_keeps_identical_cosine(new_title: str) -> None:
    # A changed or removed title moves the weights of its words and so the
    # norms of the other items with them. Items 0 and 1 share every word, so
    # their cosine stays 1 whatever the weights.
    model = TitleModel()
    for row, title in enumerate(["alarm clock", "alarm clock", "alarm clock", "tea towel"]):
        model.set_title(row, title)
    model.learn(_batch(np.array([1])))

    model.set_title(2, new_title)

    rows, scores = model.score("u", np.arange(4, dtype=np.int64))
    assert rows.tolist() == [0]
    assert scores[0] == pytest.approx(1.0)


def _batch(items: np.ndarray) -> EventBatch:
    events = [_buy(n, "u", f"i{row}") for n, row in enumerate(items.tolist())]
    weights = np.ones(len(items))
    times = np.array([event.timestamp_ms for event in events], dtype=np.int64)
    return EventBatch(events, items, weights, times, np.full(len(items), -1))


def test_old_state_gains_title_model() -> None:
    engine = Recommender()
    _catalog(engine, {"a": "alarm clock pink", "b": "alarm clock red", "c": "tea towel"})
    engine.learn([_buy(10, "u1", "a"), _buy(11, "u1", "c")])
    engine.recommend(["u1"])
    # Write the state as a worker from before the title model would have.
    state = engine.__getstate__()
    old = dict(state)
    old["models"] = {name: model for name, model in state["models"].items() if name != "title"}
    old["weights"] = state["weights"][:-1]
    old["candidate_counts"] = {k: v for k, v in state["candidate_counts"].items() if k != "title"}
    fusion = pickle.loads(pickle.dumps(engine.fusion))
    fusion.model_names = fusion.model_names[:-1]
    for cold in (True, False):
        fusion.hits[cold] = fusion.hits[cold][:-1]
        fusion.shown[cold] = fusion.shown[cold][:-1]
    del fusion.prior_shown
    old["fusion"] = fusion
    selector = pickle.loads(pickle.dumps(engine.selector))
    selector.policy_names = selector.policy_names[:-1]
    for counts in (selector.credit, selector.lead, selector.lead_squares):
        for cold in (True, False):
            counts[cold] = counts[cold][:, :-1]
    old["selector"] = selector
    restored = Recommender.__new__(Recommender)
    restored.__setstate__(pickle.loads(pickle.dumps(old)))

    assert list(restored.models) == list(MODEL_NAMES)
    assert restored.fusion.hits[False].shape == engine.fusion.hits[False].shape
    assert (restored.fusion.shown[True][-1] == 10.0).all()
    assert restored.selector.credit[False].shape == engine.selector.credit[False].shape
    assert len(restored.weights) == len(MODEL_NAMES)
    # Titles learned before the restart are gone until they arrive again.
    restored.learn([_buy(12, "u1", "a")])
    assert restored.models["title"].candidates("u1", 5).tolist() == []
    restored.learn([_buy(13, "u2", "x", "alarm clock blue"), _buy(14, "u1", "a", "alarm clock")])
    sources = {entry.item_id: entry.sources for entry in restored.recommend(["u1"])[0]}
    assert "title" in sources["x"]


def test_late_event_not_newest_title_item() -> None:
    engine = Recommender()
    engine.learn([_buy(n, "u1", item) for n, item in enumerate("abc")])

    engine.learn([Event("late", "purchase", "u1", "old", T0 - 86_400_000)])

    title = engine.models["title"]
    assert [engine.catalog.ids[row] for row in title.user_items("u1")] == ["c", "b", "a", "old"]


def test_state_with_bare_recent_items_restores() -> None:
    engine = Recommender()
    engine.learn([_buy(n, "u1", item) for n, item in enumerate("ab")])
    title = engine.models["title"]
    state = title.__dict__.copy()
    state["_recent"] = {"u1": title._recent["u1"][::2].tolist()}
    restored = TitleModel.__new__(TitleModel)
    restored.__setstate__(state)

    restored.learn(engine._batch([_buy(5, "u1", "c")]))

    assert [engine.catalog.ids[row] for row in restored.user_items("u1")] == ["c", "b", "a"]
