"""Behaviour of the Recommender: policies, filters, erasure, determinism."""

from __future__ import annotations

import math
import pickle
import unicodedata

import numpy as np
import pytest

from models.base import DecayedScores, ModelError, top_n
from models.context import ContextModel
from models.engine import MODEL_NAMES, EngineConfig, Recommender
from models.popularity import CategoryModel
from schemas import Event, ItemUpdate

T0 = 1_700_000_000_000


def _event(n: int, user: str, item: str, kind: str = "view", **extra: object) -> Event:
    return Event(f"e{n}", kind, user, item, T0 + n * 1000, **extra)  # type: ignore[arg-type]


def _ids(engine: Recommender, user: str, k: int | None = None) -> list[str]:
    return [entry.item_id for entry in engine.recommend([user], k)[0]]


def _shop() -> list[Event]:
    events = []
    for n in range(40):
        events.append(_event(n, f"u{n % 5}", f"i{n % 8}", ("view", "click")[n % 2]))
    return events


def test_config_rejects_unknown_fusion() -> None:
    with pytest.raises(ModelError, match="fusion is 'best'"):
        Recommender(EngineConfig(fusion="best"))


def test_config_rejects_unknown_weight_name() -> None:
    with pytest.raises(ModelError, match="unknown models"):
        Recommender(EngineConfig(weights={"nope": 1.0}))


def test_config_rejects_empty_mf_index_budget() -> None:
    with pytest.raises(ModelError, match="mf_index_scan_items is 0"):
        Recommender(EngineConfig(mf_index_scan_items=0))


def test_config_rejects_negative_weight() -> None:
    with pytest.raises(ModelError, match="weight of mf is -1.0"):
        Recommender(EngineConfig(weights={"mf": -1.0}))


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("covisit_half_life_ms", 0.0, "covisit_half_life_ms is 0.0"),
        ("covisit_half_life_ms", math.nan, "covisit_half_life_ms is nan"),
        ("popularity_half_life_ms", -1.0, "popularity_half_life_ms is -1.0"),
        ("mf_learning_rate", -0.05, "mf_learning_rate is -0.05"),
        ("mf_learning_rate", math.inf, "mf_learning_rate is inf"),
        ("mf_l2", -0.01, "mf_l2 is -0.01"),
        ("context_learning_rate", math.nan, "context_learning_rate is nan"),
    ],
)
def test_config_rejects_invalid_model_setting(field: str, value: float, shown: str) -> None:
    # Rejected when the engine is built, not at the first event it learns.
    with pytest.raises(ModelError, match=shown):
        Recommender(EngineConfig(**{field: value}))  # type: ignore[arg-type]


def test_unknown_event_type_rejected() -> None:
    with pytest.raises(ModelError, match="event type is 'cart'"):
        Recommender().learn([_event(0, "u", "i", "cart")])


def test_model_version_names_fusion() -> None:
    assert Recommender(EngineConfig(fusion="rrf")).model_version == "fusionrec-0.1/rrf"


def test_refund_undoes_purchase_popularity() -> None:
    engine = Recommender()
    engine.learn([_event(0, "u1", "a", "purchase", quantity=1)])
    engine.learn([_event(1, "u1", "a", "purchase", quantity=-1)])
    engine.learn([_event(2, "u1", "a", "purchase", quantity=-1)])
    popularity = engine.models["popular"].score("", np.array([0]))
    assert len(popularity[0]) == 0
    assert engine.popular() == []


def test_refund_is_never_positive_for_mf() -> None:
    engine = Recommender()
    engine.learn([_event(0, "u1", "a", "purchase", quantity=-2)])
    assert engine.models["mf"].score("u1", np.array([0]))[0].tolist() == []


def test_purchased_items_excluded_by_default() -> None:
    engine = Recommender()
    engine.learn(_shop())
    engine.learn([_event(100, "u1", "i3", "purchase")])
    assert "i3" not in _ids(engine, "u1")
    assert "i3" in _ids(engine, "u2")


def test_purchased_items_allowed_by_policy() -> None:
    engine = Recommender(EngineConfig(repeat_purchases="allow"))
    engine.learn(_shop())
    engine.learn([_event(100, "u1", "i3", "purchase")])
    assert "i3" in _ids(engine, "u1")


def test_rebuyable_category_keeps_purchases() -> None:
    engine = Recommender(EngineConfig(rebuyable_categories=frozenset({"food"})))
    engine.learn(_shop())
    engine.learn([_event(100, "u1", "i3", "purchase", category="food")])
    engine.learn([_event(101, "u1", "i4", "purchase", category="toys")])
    ids = _ids(engine, "u1")
    assert "i3" in ids
    assert "i4" not in ids


def test_refunded_item_no_longer_excluded() -> None:
    engine = Recommender()
    engine.learn(_shop())
    engine.learn([_event(100, "u1", "i3", "purchase", quantity=1)])
    engine.learn([_event(101, "u1", "i3", "purchase", quantity=-1)])
    assert "i3" in _ids(engine, "u1")


def test_partial_refund_keeps_item_excluded() -> None:
    engine = Recommender()
    engine.learn(_shop())
    engine.learn([_event(100, "u1", "i3", "purchase", quantity=3)])
    engine.learn([_event(101, "u1", "i3", "purchase", quantity=-1)])
    assert "i3" not in _ids(engine, "u1")
    engine.learn([_event(102, "u1", "i3", "purchase", quantity=-2)])
    assert "i3" in _ids(engine, "u1")


def test_refund_arriving_first_cancels_purchase() -> None:
    engine = Recommender()
    engine.learn(_shop())
    engine.learn([_event(101, "u1", "i3", "purchase", quantity=-1)])
    engine.learn([_event(100, "u1", "i3", "purchase", quantity=1)])
    assert "i3" in _ids(engine, "u1")


def test_purchase_after_unmatched_refund_excluded() -> None:
    # The refund is of a purchase from before the stream began.
    engine = Recommender()
    engine.learn(_shop())
    engine.learn([_event(100, "u1", "i3", "purchase", quantity=-1)])
    engine.learn([_event(101, "u1", "i3", "purchase", quantity=1)])
    assert "i3" not in _ids(engine, "u1")


def test_state_without_refunds_restores() -> None:
    engine = Recommender()
    engine.learn(_shop())
    state = engine.__getstate__()
    for user_state in state["_users"].values():
        del user_state.refunds
    restored = Recommender.__new__(Recommender)
    restored.__setstate__(state)

    restored.learn([_event(101, "u1", "i3", "purchase", quantity=-1)])
    restored.learn([_event(100, "u1", "i3", "purchase", quantity=1)])

    assert "i3" in _ids(restored, "u1")


def test_out_of_stock_item_leaves_lists() -> None:
    engine = Recommender()
    engine.learn(_shop())
    assert "i2" in _ids(engine, "u2")
    engine.update_item(ItemUpdate("i2", T0, in_stock=False))
    assert "i2" not in _ids(engine, "u2")
    assert "i2" not in [entry.item_id for entry in engine.popular()]
    engine.update_item(ItemUpdate("i2", T0, in_stock=True))
    assert "i2" in _ids(engine, "u2")


def test_older_update_leaves_newer_fields() -> None:
    engine = Recommender()
    engine.learn(_shop())
    row = engine.catalog.index["i1"]
    engine.update_item(ItemUpdate("i1", T0 + 2000, in_stock=False, price=5.0))

    stale = engine.update_item(ItemUpdate("i1", T0 + 1000, in_stock=True, price=9.0, category="c"))

    assert stale == ("in_stock", "price")
    assert bool(engine.catalog.in_stock[row]) is False
    assert engine.catalog.prices[row] == 5.0
    assert engine.catalog.category_name(row) == "c"
    assert "i1" not in _ids(engine, "u0")


def test_update_with_same_time_applies() -> None:
    engine = Recommender()
    engine.learn(_shop())
    row = engine.catalog.index["i1"]
    engine.update_item(ItemUpdate("i1", T0, in_stock=False))

    stale = engine.update_item(ItemUpdate("i1", T0, in_stock=True))

    assert stale == ()
    assert bool(engine.catalog.in_stock[row]) is True


def test_update_times_survive_pickle() -> None:
    engine = Recommender()
    engine.update_item(ItemUpdate("i1", T0 + 2000, in_stock=False))
    restored = pickle.loads(pickle.dumps(engine))

    stale = restored.update_item(ItemUpdate("i1", T0 + 1000, in_stock=True))

    assert stale == ("in_stock",)


def test_state_without_update_times_accepts_updates() -> None:
    engine = Recommender()
    engine.update_item(ItemUpdate("i1", T0 + 2000, in_stock=False))
    state = engine.__getstate__()
    del state["_update_ms"]
    restored = Recommender.__new__(Recommender)
    restored.__setstate__(state)

    stale = restored.update_item(ItemUpdate("i1", T0 + 1000, in_stock=True))

    assert stale == ()
    assert bool(restored.catalog.in_stock[restored.catalog.index["i1"]]) is True


def test_older_event_leaves_newer_update_fields() -> None:
    engine = Recommender()
    engine.learn([_event(0, "u1", "a", category="c1", price=1.0)])
    engine.update_item(ItemUpdate("a", T0 + 5000, category="c2", price=2.0, title="tea towel"))
    row = engine.catalog.index["a"]

    engine.learn([_event(3, "u2", "a", category="c3", price=3.0, title="garden hose")])

    assert engine.catalog.category_name(row) == "c2"
    assert engine.catalog.prices[row] == 2.0
    title = engine.models["title"]
    engine.learn([_event(6, "u3", "b", title="tea towel red")])
    assert [engine.catalog.ids[r] for r in title.candidates("u3", 5)] == ["a"]


def test_newer_event_makes_update_stale() -> None:
    engine = Recommender()
    engine.learn([_event(0, "u1", "a", category="c1", price=1.0)])
    engine.learn([_event(9, "u2", "a", category="c3", price=3.0)])
    row = engine.catalog.index["a"]

    stale = engine.update_item(ItemUpdate("a", T0 + 5000, category="c2", price=2.0, in_stock=False))

    assert stale == ("price", "category")
    assert engine.catalog.category_name(row) == "c3"
    assert engine.catalog.prices[row] == 3.0
    assert bool(engine.catalog.in_stock[row]) is False


def test_category_cap_limits_each_category() -> None:
    engine = Recommender(EngineConfig(max_per_category=1))
    events = [_event(n, "u1", f"i{n}", category=f"c{n % 2}") for n in range(10)]
    events.append(_event(20, "u2", "i0"))
    engine.learn(events)
    ids = _ids(engine, "u2", 5)
    categories = [engine.catalog.category_name(engine.catalog.index[i]) for i in ids]
    assert len(categories) == len(set(categories))


def _ranked_catalog(n_items: int, **config: object) -> Recommender:
    """Build an engine whose item i{n} has n + 1 views, so i{n_items - 1} leads."""
    engine = Recommender(EngineConfig(**config))  # type: ignore[arg-type]
    events = []
    for item in range(n_items):
        events += [_event(len(events), f"v{item}_{v}", f"i{item}") for v in range(item + 1)]
    engine.learn(events)
    return engine


def test_popular_fills_k_past_sold_out_leaders() -> None:
    engine = _ranked_catalog(200)
    for item in range(140, 200):
        engine.update_item(ItemUpdate(f"i{item}", T0, in_stock=False))

    ids = [entry.item_id for entry in engine.popular(20)]

    assert ids == [f"i{item}" for item in range(139, 119, -1)]


def test_unknown_user_list_fills_past_sold_out_leaders() -> None:
    engine = _ranked_catalog(200)
    for item in range(20, 200):
        engine.update_item(ItemUpdate(f"i{item}", T0, in_stock=False))

    ids = _ids(engine, "stranger", 20)

    assert sorted(ids) == sorted(f"i{item}" for item in range(20))


def test_category_cap_holds_in_popular_lists() -> None:
    engine = Recommender(EngineConfig(k=5, max_per_category=1))
    events = [_event(n, f"u{n}", f"i{n % 4}", category="shoes") for n in range(8)]
    events += [_event(10 + n, f"w{n}", f"j{n}", category=f"c{n}") for n in range(3)]
    engine.learn(events)

    for entries in (engine.popular(), engine.recommend(["stranger"])[0]):
        ids = [entry.item_id for entry in entries]
        assert len([item_id for item_id in ids if item_id.startswith("i")]) == 1
        assert len(ids) == 4


def test_unmet_category_cap_reads_bounded_window() -> None:
    # Four categories with a cap of 1 can never fill a list of 20.
    engine = Recommender(EngineConfig(k=20, max_per_category=1))
    events = [_event(n, f"u{n}", f"i{n}", category=f"c{n % 4}") for n in range(25_000)]
    engine.learn(events)
    model = engine.models["popular"]
    windows: list[int] = []
    original = model.candidates

    def recording(user_id: str, n: int) -> np.ndarray:
        windows.append(n)
        return original(user_id, n)

    model.candidates = recording  # type: ignore[method-assign]

    ids = [entry.item_id for entry in engine.popular()]

    assert len(ids) == 4
    # The first window is 4k = 80 rows, and it may grow to 64 times that.
    assert max(windows) <= 64 * 80


def test_category_update_moves_item() -> None:
    engine = Recommender()
    engine.learn([_event(0, "u1", "a", category="c1"), _event(1, "u2", "b", category="c1")])
    engine.update_item(ItemUpdate("a", T0, category="c2"))
    candidates = engine.models["category"].candidates("u2", 5)
    assert [engine.catalog.ids[row] for row in candidates] == ["b"]


def test_unknown_user_gets_trending() -> None:
    engine = Recommender()
    engine.learn(_shop())
    entries = engine.recommend(["stranger"], 3)[0]
    assert len(entries) == 3
    assert all(entry.sources in (("trending",), ("popular",)) for entry in entries)
    assert not engine.has_user("stranger")


def test_lists_fill_k_from_popularity() -> None:
    engine = Recommender()
    engine.learn(_shop())
    assert len(_ids(engine, "u1", 8)) == 8


def test_sources_name_models() -> None:
    engine = Recommender()
    engine.learn(_shop())
    names = {"popular", "trending", "category", "covisit", "basket", "recent", "mf", "context"}
    for entry in engine.recommend(["u1"])[0]:
        assert entry.sources
        assert set(entry.sources) <= names


def test_sources_ordered_by_weighted_score() -> None:
    engine = Recommender()
    engine.learn(_shop())
    scored = engine.candidate_scores("u1")
    rows = scored.items.tolist() + [10**9]
    sources = engine._sources(scored, rows)
    assert sources[-1] == ("popular",)
    for position, names in enumerate(sources[:-1]):
        opinions = {
            name: -engine.weights[m] * scored.normalized[m, position]
            for m, name in enumerate(MODEL_NAMES)
            if scored.mask[m, position]
        }
        assert list(names) == sorted(opinions, key=lambda name: (opinions[name], name))


@pytest.mark.parametrize("fusion", ["weighted", "rrf", "learned"])
def test_zero_weight_models_not_in_sources(fusion: str) -> None:
    # A weight of 0 switches a model off: it adds nothing to any fused
    # score, so no list names it, and items that only it scored are left out.
    config = EngineConfig(fusion=fusion, weights={"mf": 0.0, "recent": 0.0})
    engine = Recommender(config)
    engine.learn(_shop())
    scored = engine.candidate_scores("u1")
    enabled = scored.mask[[MODEL_NAMES.index("mf"), MODEL_NAMES.index("recent")]]
    assert enabled.any()
    for entry in engine.recommend(["u1"], 30)[0]:
        assert entry.sources
        assert "mf" not in entry.sources
        assert "recent" not in entry.sources


@pytest.mark.parametrize("fusion", ["weighted", "rrf", "learned"])
def test_item_without_enabled_opinion_left_out(fusion: str) -> None:
    engine = Recommender(EngineConfig(fusion=fusion, weights={"mf": 0.0}))
    engine.learn(_shop())
    scored = engine.candidate_scores("u1")
    # The first candidate keeps only the opinion of mf, the second none.
    scored.mask[:, :2] = False
    scored.mask[MODEL_NAMES.index("mf"), 0] = True
    fused = engine.fused(scored, fusion)
    assert np.isneginf(fused[:2]).all()
    assert np.isfinite(fused[2:]).all()


@pytest.mark.parametrize("fusion", ["weighted", "rrf", "learned"])
def test_zero_weight_candidates_still_padded(fusion: str) -> None:
    # Only the user's own items have a weight above 0, so the rest of the
    # list is popularity padding, which may take the items that the models
    # of weight 0 proposed.
    weights = {name: 0.0 for name in MODEL_NAMES}
    weights["recent"] = 1.0
    engine = Recommender(EngineConfig(fusion=fusion, weights=weights, fusion_learn_every=0))
    engine.learn([*_shop(), _event(99, "u9", "i3", "view")])
    entries = engine.recommend(["u9"], 5)[0]
    assert [entry.item_id for entry in entries][:1] == ["i3"]
    assert len(entries) == 5
    assert entries[0].sources == ("recent",)
    for entry in entries[1:]:
        assert entry.sources == ("popular",)


def test_scores_sorted_and_finite() -> None:
    for fusion in ("weighted", "rrf", "learned"):
        engine = Recommender(EngineConfig(fusion=fusion))
        engine.learn(_shop())
        scores = [entry.score for entry in engine.recommend(["u1"])[0]]
        assert all(math.isfinite(score) for score in scores)
        assert scores == sorted(scores, reverse=True)


def test_exploration_takes_its_share() -> None:
    engine = Recommender(EngineConfig(exploration=0.25, k=4))
    engine.learn([_event(n, f"u{n}", f"i{n}") for n in range(30)])
    entries = engine.recommend(["u1"])[0]
    assert [entry.sources for entry in entries].count(("explore",)) == 1
    assert len({entry.item_id for entry in entries}) == len(entries)


def test_forget_user_removes_every_trace() -> None:
    engine = Recommender(EngineConfig(fusion="learned"))
    engine.learn(_shop())
    engine.recommend(["u1"])
    engine.forget_user("u1")
    assert not engine.has_user("u1")
    assert engine.user_history("u1") == []
    for name, model in engine.models.items():
        if name not in ("popular", "trending"):
            assert len(model.candidates("u1", 10)) == 0


def test_fusion_ignores_refresh_timing() -> None:
    config = EngineConfig(fusion="learned", fusion_learn_every=1)
    quiet, busy = Recommender(config), Recommender(config)
    for event in _shop():
        quiet.learn([event])
        busy.learn([event])
        busy.recommend([event.user_id])
    for cold in (True, False):
        assert np.array_equal(quiet.fusion.hits[cold], busy.fusion.hits[cold])
        assert np.array_equal(quiet.fusion.shown[cold], busy.fusion.shown[cold])


def test_unproven_group_follows_fixed_weights() -> None:
    engine = Recommender(EngineConfig(fusion="learned", fusion_min_hits=10**9))
    engine.learn(_shop())
    scored = engine.candidate_scores("u1")
    learned = engine.fused(scored, "learned")
    fixed = engine.fused(scored, "weighted")
    for group in range(3):
        members = np.flatnonzero(scored.groups == group)
        by_learned = members[np.lexsort((scored.items[members], -learned[members]))]
        by_fixed = members[np.lexsort((scored.items[members], -fixed[members]))]
        assert by_learned.tolist() == by_fixed.tolist(), group


def test_exploration_lands_within_shown_items() -> None:
    engine = Recommender(EngineConfig(k=5, exploration=0.4, fusion="weighted"))
    events = [_event(n, f"u{n % 7}", f"i{n % 40}") for n in range(200)]
    engine.learn(events)
    entries = engine.recommend(["u1"], 12)[0]
    visible_sources = [entry.sources for entry in entries[:5]]
    assert visible_sources.count(("explore",)) == 2
    assert ("explore",) not in [entry.sources for entry in entries[5:]]
    scores = [entry.score for entry in entries]
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False))


def _two_category_shop() -> list[Event]:
    events = [
        _event(3 * item + user, f"o{user}", f"i{item}", category=f"c{item % 2}")
        for item in range(12)
        for user in range(3)
    ]
    events.append(_event(36, "u1", "i0", category="c0"))
    return events


def test_exploration_keeps_category_cap() -> None:
    engine = Recommender(EngineConfig(k=4, exploration=0.5, max_per_category=1))
    engine.learn(_two_category_shop())

    for extra in range(5):
        engine.learn([_event(40 + extra, "u1", "i0", category="c0")])
        entries = engine.recommend(["u1"])[0]
        categories = [
            engine.catalog.category_name(engine.catalog.index[e.item_id]) for e in entries
        ]

        assert sorted(categories) == ["c0", "c1"]


def test_exploration_keeps_list_at_k() -> None:
    # Eleven popular items sell out, and three others stay in stock.
    events = [
        _event(5 * item + user, f"o{user}", f"hot{item}") for item in range(11) for user in range(5)
    ]
    events += [_event(60 + n, "o9", item) for n, item in enumerate("abc")]
    events.append(_event(70, "u1", "a"))
    engine = Recommender(EngineConfig(k=2, exploration=0.5))
    engine.learn(events)
    for item in range(11):
        engine.update_item(ItemUpdate(f"hot{item}", T0 + 100_000, in_stock=False))

    entries = engine.recommend(["u1"])[0]

    assert len(entries) == 2
    assert len({entry.item_id for entry in entries}) == 2


def test_exploration_ignores_other_lists_served() -> None:
    config = EngineConfig(k=4, exploration=0.5, seed=7)
    quiet, busy = Recommender(config), Recommender(config)
    quiet.learn(_two_category_shop())
    busy.learn(_two_category_shop())

    busy.recommend(["o1", "o2", "u1", "o1"])

    assert _ids(quiet, "u1") == _ids(busy, "u1")


def test_exploration_draws_again_after_new_events() -> None:
    engine = Recommender(EngineConfig(k=6, exploration=0.5))
    engine.learn([_event(n, f"o{n % 5}", f"i{n % 30}") for n in range(300)])
    engine.learn([_event(300, "u1", "i0")])
    drawn = set()

    for n in range(8):
        engine.learn([_event(301 + n, "u1", "i0")])
        entries = engine.recommend(["u1"])[0]
        drawn.add(tuple(e.item_id for e in entries if e.sources == ("explore",)))

    assert len(drawn) > 1


def test_padding_skips_rows_already_listed() -> None:
    # Only models of weight 0 score the items that the user never touched.
    weights = {"popular": 0.0, "trending": 0.0, "mf": 0.0, "context": 0.0}
    engine = Recommender(EngineConfig(k=5, weights=weights))
    engine.learn([_event(0, "u1", "a"), _event(1, "u2", "b"), _event(2, "u2", "b")])
    scored = engine.candidate_scores("u1")

    rows, _ = engine.top_rows(scored, engine.fused(scored, "popular"), 5)

    assert len(rows) == len(set(rows))


def test_infinite_type_weight_rejected() -> None:
    weights = {"view": math.inf, "click": 2.0, "purchase": 4.0}
    with pytest.raises(ModelError, match="expected a finite weight > 0"):
        Recommender(EngineConfig(type_weights=weights))


def test_user_history_in_learned_order() -> None:
    engine = Recommender()
    engine.learn([_event(0, "u", "b"), _event(1, "u", "a"), _event(2, "u", "b")])
    assert engine.user_history("u") == ["b", "a", "b"]


def test_long_history_keeps_latest_events_and_full_count() -> None:
    engine = Recommender(EngineConfig(cold_events=500))
    engine.learn([_event(n, "u", f"i{n}") for n in range(1_000)])
    assert engine.user_history("u") == [f"i{n}" for n in range(900, 1_000)]
    assert engine.user_event_count("u") == 1_000
    assert not engine.is_cold("u")
    assert len(engine.__getstate__()["_users"]["u"].history) <= 200


def test_state_of_older_version_counts_every_kept_event() -> None:
    engine = Recommender(EngineConfig(cold_events=150))
    engine.learn([_event(n, "u", f"i{n % 7}") for n in range(120)])
    state = engine.__getstate__()
    user = state["_users"]["u"]
    # A state saved before the event count was kept held every event.
    user.history = user.history + user.history[:60]
    delattr(user, "events")

    restored = pickle.loads(pickle.dumps(state))
    engine.__setstate__(restored)

    assert engine.user_event_count("u") == 180
    assert not engine.is_cold("u")
    assert len(engine.user_history("u")) == 100


def test_ids_are_opaque() -> None:
    composed = unicodedata.normalize("NFC", "caf\u00e9")
    decomposed = unicodedata.normalize("NFD", "caf\u00e9")
    engine = Recommender()
    engine.learn([_event(0, "a:b", composed), _event(1, "a b", decomposed)])
    assert engine.has_user("a:b")
    assert not engine.has_user("a")
    assert engine.user_history("a:b") == [composed]
    assert engine.user_history("a b") == [decomposed]
    assert len(engine.catalog) == 2


def test_restore_from_pickle_matches_uninterrupted_run() -> None:
    events = _shop() + [_event(50 + n, f"u{n % 3}", f"j{n % 6}", "purchase") for n in range(30)]
    for fusion in ("weighted", "rrf", "learned"):
        config = EngineConfig(fusion=fusion, seed=3)
        straight = Recommender(config)
        interrupted = Recommender(config)
        for start in range(0, len(events), 10):
            straight.learn(events[start : start + 10])
            straight.recommend(["u0", "u1"])
        for start in range(0, len(events), 10):
            interrupted.learn(events[start : start + 10])
            interrupted.recommend(["u0", "u1"])
            interrupted = pickle.loads(pickle.dumps(interrupted))
        users = ["u0", "u1", "u2", "u3", "nobody"]
        assert straight.recommend(users) == interrupted.recommend(users)


def test_stats_count_users_and_items() -> None:
    engine = Recommender()
    engine.learn(_shop())
    stats = engine.stats()
    assert stats["n_users"] == 5
    assert stats["n_items"] == 8
    assert set(stats["bytes"]) == set(engine.models)
    assert all(value >= 0 for value in stats["bytes"].values())


def test_learned_fusion_updates_on_known_user_event() -> None:
    engine = Recommender(EngineConfig(fusion="learned", fusion_learn_every=1))
    engine.learn(_shop())
    before = engine.stats()["fusion_updates"]["warm"]
    engine.learn([_event(200, "u1", "i2")])
    assert engine.stats()["fusion_updates"]["warm"] == before + 1


def test_decayed_scores_halve_per_half_life() -> None:
    scores = DecayedScores(half_life_ms=10)
    scores.add(np.array([0]), np.array([8.0]), np.array([0]))
    assert scores.values_at(30)[0] == pytest.approx(1.0)


def test_decayed_scores_rescale_without_overflow() -> None:
    scores = DecayedScores(half_life_ms=1)
    scores.add(np.array([0]), np.array([1.0]), np.array([0]))
    scores.add(np.array([1]), np.array([1.0]), np.array([5000]))
    assert np.isfinite(scores.raw()).all()
    assert scores.values_at(5000)[1] == pytest.approx(1.0)


def test_decayed_scores_keep_order_after_long_gap() -> None:
    # Nine years of event time are far more halvings than a double survives.
    scores = DecayedScores(half_life_ms=86_400_000)
    scores.add(np.array([0, 1, 2]), np.array([1.0, 3.0, 2.0]), np.array([T0, T0, T0]))
    scores.add(np.array([3]), np.array([1.0]), np.array([T0 + 9 * 365 * 86_400_000]))

    raw = scores.raw()

    assert (raw[:3] > 0).all()
    assert np.argsort(-raw).tolist() == [3, 1, 2, 0]


def test_decayed_scores_never_rise_on_rescale() -> None:
    scores = DecayedScores(half_life_ms=1)
    scores.add(np.array([0]), np.array([1e-260]), np.array([0]))
    scores.add(np.array([1]), np.array([1.0]), np.array([5000]))

    assert scores.raw()[0] == 1e-260
    assert scores.raw()[1] == 1.0


def test_popular_list_full_after_backfill_gap() -> None:
    # A backfill of old events, then live traffic years later.
    engine = _ranked_catalog(30)
    engine.learn([Event("live", "view", "now", "fresh", T0 + 9 * 365 * 86_400_000)])

    ids = [entry.item_id for entry in engine.popular(20)]

    assert ids == ["fresh"] + [f"i{item}" for item in range(29, 10, -1)]


def test_popular_list_full_after_late_backfill() -> None:
    # Live traffic first, then a backfill of events nine years older.
    engine = Recommender()
    engine.learn([Event("live", "view", "now", "fresh", T0 + 9 * 365 * 86_400_000)])
    old = [Event(f"old{n}", "view", f"u{n}", f"i{n % 5}", T0 + n) for n in range(15)]
    engine.learn(old)

    ids = [entry.item_id for entry in engine.popular(6)]

    assert ids[0] == "fresh"
    assert sorted(ids[1:]) == [f"i{item}" for item in range(5)]


def test_decayed_scores_never_negative() -> None:
    scores = DecayedScores(half_life_ms=1000)
    scores.add(np.array([0, 0]), np.array([1.0, -5.0]), np.array([0, 0]))
    assert scores.raw()[0] == 0.0


def test_decayed_scores_clamp_in_event_order() -> None:
    # A refund larger than the item's score clamps it to 0 at the refund,
    # so a later event of the same batch counts in full, as one by one.
    items = np.array([0, 0, 0, 0])
    weights = np.array([1.0, 1.0, -5.0, 1.0])
    times = np.zeros(4, dtype=np.int64)
    batched = DecayedScores(half_life_ms=1000)
    batched.add(items, weights, times)
    single = DecayedScores(half_life_ms=1000)
    for n in range(4):
        single.add(items[n : n + 1], weights[n : n + 1], times[n : n + 1])
    assert single.raw()[0] == 1.0
    assert batched.raw()[0] == 1.0


def test_popularity_ignores_batches_with_refunds() -> None:
    events = [_event(n, "u0", "i0") for n in range(3)]
    events.append(_event(3, "u0", "i0", "purchase", quantity=-1))
    events.append(_event(4, "u0", "i0"))
    events.append(_event(5, "u1", "i1"))
    single = Recommender(EngineConfig(fusion_learn_every=0))
    for event in events:
        single.learn([event])
    batched = Recommender(EngineConfig(fusion_learn_every=0))
    batched.learn(events[:3])
    batched.learn(events[3:])
    items = np.arange(2)
    for name in ("popular", "trending"):
        expected = single.models[name].score("u0", items)
        actual = batched.models[name].score("u0", items)
        assert actual[0].tolist() == expected[0].tolist()
        assert np.allclose(actual[1], expected[1])


def test_user_categories_ignore_batches() -> None:
    # The first event names no category, and a later one gives the item
    # one. The first user did not see that category, in any batching.
    events = [_event(0, "u1", "i0"), _event(1, "u0", "i0", category="c0")]
    config = EngineConfig(fusion_learn_every=0)
    single = Recommender(config)
    for event in events:
        single.learn([event])
    batched = Recommender(config)
    batched.learn(events)
    for engine in (single, batched):
        category = engine.models["category"]
        assert isinstance(category, CategoryModel)
        assert category.user_categories("u1") == []


def test_refund_leaves_user_categories() -> None:
    # A refund is never a positive signal, so the category of a returned
    # item does not become the user's newest category.
    engine = Recommender()
    engine.learn(
        [
            _event(0, "u1", "a", category="c0"),
            _event(1, "u1", "b", "purchase", quantity=-1, category="c1"),
        ]
    )
    category = engine.models["category"]
    assert isinstance(category, CategoryModel)
    assert [engine.catalog.category_names[row] for row in category.user_categories("u1")] == ["c0"]


def test_late_event_leaves_user_categories() -> None:
    # A backfill replayed after live traffic brings events older than the
    # user's last one. They must not become the user's newest category.
    engine = Recommender()
    engine.learn([_event(5, "u1", "a", category="c0")])
    engine.learn([_event(1, "u1", "b", category="c1")])
    category = engine.models["category"]
    assert isinstance(category, CategoryModel)
    names = [engine.catalog.category_names[row] for row in category.user_categories("u1")]
    assert names == ["c0"]


def test_late_event_leaves_context_last_event() -> None:
    engine = Recommender()
    engine.learn([_event(3_600, "u1", "a", "click", category="c0")])
    engine.learn([_event(0, "u1", "b", "view", category="c1")])
    context = engine.models["context"]
    assert isinstance(context, ContextModel)
    state = context._users["u1"]
    assert state.last_type == "click"
    assert state.hour == ((T0 + 3_600_000) // 3_600_000) % 24
    assert [engine.catalog.category_names[row] for row in state.categories] == ["c0"]
    assert engine.catalog.index["b"] in state.seen


def test_context_restores_without_last_time() -> None:
    engine = Recommender()
    engine.learn([_event(0, "u1", "a")])
    context = engine.models["context"]
    assert isinstance(context, ContextModel)
    # A context saved before the time of the last event was kept.
    del context._users["u1"].last_ms
    restored = pickle.loads(pickle.dumps(context))
    assert restored._users["u1"].last_ms is None
    assert restored._users["u1"].last_type == "view"


def test_late_event_keeps_current_session() -> None:
    # An event stamped two hours before the user's last one arrives late.
    # It belongs to an earlier session, so it neither joins nor ends the
    # current one.
    engine = Recommender(EngineConfig(fusion_learn_every=0))
    engine.learn(
        [
            Event("e1", "view", "u1", "a", T0),
            Event("e2", "view", "u1", "b", T0 + 60_000),
            Event("e3", "view", "u1", "late", T0 - 2 * 3_600_000),
            Event("e4", "view", "u1", "d", T0 + 120_000),
        ]
    )
    rows = np.array([engine.catalog.index[item] for item in ("a", "b", "late", "d")])
    assert engine._groups("u1", rows).tolist() == [1, 1, 2, 1]
    assert engine.user_event_times("u1") == (T0 - 2 * 3_600_000, T0 + 120_000)


def test_slightly_late_event_keeps_clock() -> None:
    # An event stamped 20 minutes before the user's last one is within the
    # 30-minute session gap, so it joins the session, but the session's
    # clock stays at the newest event.
    engine = Recommender(EngineConfig(fusion_learn_every=0))
    minute = 60_000
    engine.learn(
        [
            Event("e1", "view", "u1", "a", T0),
            Event("e2", "view", "u1", "b", T0 + 25 * minute),
            Event("e3", "view", "u1", "c", T0 + 5 * minute),
            Event("e4", "view", "u1", "d", T0 + 40 * minute),
        ]
    )
    rows = np.array([engine.catalog.index[item] for item in ("a", "b", "c", "d")])
    assert engine._groups("u1", rows).tolist() == [1, 1, 1, 1]
    assert engine.user_event_times("u1") == (T0, T0 + 40 * minute)


def test_late_event_of_earlier_session_id() -> None:
    # A late event names the session before the current one. It joins the
    # user's seen items but neither ends nor rejoins the current session.
    engine = Recommender(EngineConfig(fusion_learn_every=0))
    engine.learn(
        [
            Event("e1", "view", "u1", "a", T0, session_id="s1"),
            Event("e2", "view", "u1", "b", T0 + 60_000, session_id="s2"),
            Event("e3", "view", "u1", "late", T0 + 30_000, session_id="s1"),
            Event("e4", "view", "u1", "d", T0 + 120_000, session_id="s2"),
        ]
    )
    rows = np.array([engine.catalog.index[item] for item in ("a", "b", "late", "d")])
    assert engine._groups("u1", rows).tolist() == [2, 1, 2, 1]
    assert engine.user_event_times("u1") == (T0, T0 + 120_000)


def test_top_n_breaks_ties_by_row() -> None:
    assert top_n(np.array([1.0, 2.0, 2.0, 0.5]), 3).tolist() == [1, 2, 0]


def test_context_learn_every_skips_updates() -> None:
    events = [_event(n, "u1", f"i{n % 4}", category="c") for n in range(20)]
    every_event = Recommender(EngineConfig(context_learn_every=1))
    never = Recommender(EngineConfig(context_learn_every=1000))
    every_event.learn(events)
    never.learn(events)
    assert every_event.models["context"].classifier.intercept != 0.0
    assert never.models["context"].classifier.intercept == 0.0
    assert never.models["context"].score("u1", np.array([0]))[0].tolist() == [0]


def test_context_learn_every_rejects_zero() -> None:
    with pytest.raises(ModelError, match="learn_every is 0"):
        Recommender(EngineConfig(context_learn_every=0))


def test_category_leaders_follow_new_events() -> None:
    engine = Recommender()
    engine.learn([_event(n, f"u{n}", "a", category="c") for n in range(3)])
    engine.learn([_event(3, "u3", "b", category="c")])
    category = engine.models["category"]
    row = engine.catalog.category_row("c")
    assert [engine.catalog.ids[r] for r in category.top_of(row, 2)] == ["a", "b"]

    engine.learn([_event(n, f"v{n}", "b", "purchase", category="c") for n in range(4, 8)])
    assert [engine.catalog.ids[r] for r in category.top_of(row, 2)] == ["b", "a"]
    assert [engine.catalog.ids[r] for r in category.top_of(row, 1)] == ["b"]


def test_category_leaders_follow_moved_item() -> None:
    engine = Recommender()
    engine.learn([_event(n, f"u{n}", "a", category="c") for n in range(3)])
    category = engine.models["category"]
    row = engine.catalog.category_row("c")
    assert [engine.catalog.ids[r] for r in category.top_of(row, 2)] == ["a"]

    engine.update_item(ItemUpdate("a", T0 + 10_000, category="d"))
    assert len(category.top_of(row, 2)) == 0


def test_candidate_scores_see_each_learned_event() -> None:
    engine = Recommender()
    engine.learn(_shop())
    before = engine.candidate_scores("u1")
    assert engine.candidate_scores("u1") is before

    engine.learn([_event(100, "u1", "fresh")])
    after = engine.candidate_scores("u1")
    assert after is not before
    assert engine.catalog.index["fresh"] in after.items.tolist()


def test_pickle_leaves_out_cached_scores() -> None:
    engine = Recommender()
    engine.learn(_shop())
    engine.candidate_scores("u1")
    restored = pickle.loads(pickle.dumps(engine))
    assert restored._last_scored is None
    assert restored.models["category"]._leaders == {}
    assert _ids(restored, "u1") == _ids(engine, "u1")


def test_category_counts_users_not_events() -> None:
    engine = Recommender()
    # One user views "a" six times, in one batch and the next; two users view "b" once.
    engine.learn([_event(n, "u1", "a", category="c") for n in range(3)])
    engine.learn([_event(n, "u1", "a", category="c") for n in range(3, 6)])
    engine.learn([_event(6, "u2", "b", category="c"), _event(7, "u3", "b", category="c")])
    category = engine.models["category"]
    row = engine.catalog.category_row("c")
    assert [engine.catalog.ids[r] for r in category.top_of(row, 2)] == ["b", "a"]
    # Event popularity ranks them the other way round.
    assert [engine.catalog.ids[r] for r in engine.models["popular"].candidates("u9", 2)] == [
        "a",
        "b",
    ]


def test_first_touches_skip_refunds_repeats() -> None:
    engine = Recommender()
    engine.learn([_event(0, "u1", "a", "purchase")])
    events = [
        _event(1, "u1", "a"),
        _event(2, "u1", "b"),
        _event(3, "u1", "b"),
        _event(4, "u2", "a", "purchase", quantity=-1),
        _event(5, "u2", "a"),
    ]
    batch = engine._batch(events)
    assert batch.first_touch is not None
    # The refund adds "a" to u2's history, as learning it in an earlier batch would.
    assert batch.first_touch.tolist() == [False, True, False, False, False]


def test_century_gap_keeps_scores_finite():
    # Pair counts decay by half every 30 days, so a gap of a century rounds
    # the older ones to 0, and scoring must skip them rather than divide by 0.
    start, later = 1_511_544_070_000, 4_665_144_070_000
    events = [
        Event("a", "purchase", "u1", "i1", start, session_id="s1"),
        Event("b", "purchase", "u1", "i2", start + 1, session_id="s1"),
        Event("c", "purchase", "u2", "i1", start + 2, session_id="s2"),
        Event("d", "purchase", "u1", "i3", later, session_id="s3"),
        Event("e", "purchase", "u2", "i2", later + 1, session_id="s4"),
        Event("f", "purchase", "u1", "i1", later + 2, session_id="s3"),
    ]
    engine = Recommender(EngineConfig(repeat_purchases="allow"))
    engine.learn(events)
    for user in ("u1", "u2"):
        scored = engine.candidate_scores(user)
        assert np.isfinite(scored.raw).all()
        assert np.isfinite(engine.fused(scored, "learned")).all()


def test_counted_purchase_of_new_user_leaves_list():
    # A purchase that the worker keeps out of the models still counts for
    # the buyer, also one with no event learned yet.
    engine = Recommender(EngineConfig(fusion_learn_every=0))
    engine.learn([Event(f"e{n}", "view", f"u{n}", "hot", T0 + n) for n in range(5)])
    engine.count_purchases([Event("p1", "purchase", "buyer", "hot", T0 + 10, quantity=2)])
    listed = [entry.item_id for entry in engine.recommend(["buyer"])[0]]
    assert engine.has_user("buyer")
    assert "hot" not in listed


def test_category_untouched_item_no_opinion() -> None:
    # "new" gets category c1 and a title from an item update, and no user
    # has touched it. The title model proposes it to u, whose category is c1.
    # Its user count is 0, so the category model, like popularity, must have
    # no opinion on it rather than a score of 0.
    engine = Recommender(EngineConfig(fusion_learn_every=0))
    engine.learn(
        [
            Event("e1", "view", "u", "old", T0, category="c1", title="red mug"),
            Event("e2", "view", "u", "x", T0 + 1000, category="c1"),
        ]
    )
    engine.update_item(ItemUpdate("new", T0 + 2000, category="c1", title="red mug"))
    new = engine.catalog.index["new"]
    model = engine.models["category"]

    assert new not in model.candidates("u", 10).tolist()
    scored, _ = model.score("u", np.array([new], dtype=np.int64))
    assert scored.tolist() == []
    served = {entry.item_id: entry.sources for entry in engine.recommend(["u"])[0]}
    assert "category" not in served["new"]


def test_counted_purchase_of_last_scored_user_leaves_list():
    # The buyer was the last user scored, so the engine keeps their
    # candidate scores, which were computed before the purchase.
    engine = Recommender(EngineConfig(fusion_learn_every=0))
    engine.learn([Event(f"e{n}", "view", f"u{n}", "hot", T0 + n) for n in range(5)])
    engine.learn([Event("b1", "view", "buyer", "hot", T0 + 10)])
    assert "hot" in [entry.item_id for entry in engine.recommend(["buyer"])[0]]
    engine.count_purchases([Event("p1", "purchase", "buyer", "hot", T0 + 20, quantity=1)])
    assert "hot" not in [entry.item_id for entry in engine.recommend(["buyer"])[0]]
