"""The prequential protocol and its metrics, on tiny hand-computed streams."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.base import EventBatch
from models.engine import EngineConfig, Recommender
from models.evaluation import RankMetrics, default_strategies, evaluate, wilson_interval
from schemas import Event
from stream.synthetic import generate_events

T0 = 1_700_000_000_000


def _view(n: int, user: str, item: str, kind: str = "view") -> Event:
    return Event(f"e{n}", kind, user, item, T0 + n * 1000)


def test_rank_metrics_hand_computed() -> None:
    metrics = RankMetrics()
    for rank in (1, 2, None, 4):
        metrics.add(rank)
    assert metrics.hits == 3
    assert metrics.n == 4
    assert metrics.hr == pytest.approx(0.75)
    assert metrics.ndcg == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 4)
    assert metrics.mrr == pytest.approx((1 + 0.5 + 0.25) / 4)


def test_rank_metrics_empty_is_zero() -> None:
    metrics = RankMetrics()
    assert metrics.hr == 0.0
    assert metrics.to_json()["hr_ci95"] == [0.0, 1.0]


def test_single_event_interval_holds_estimate() -> None:
    metrics = RankMetrics()
    metrics.add(1)
    figures = metrics.to_json()
    assert figures["ndcg@10"] == 1.0
    assert figures["ndcg_ci95"] == [0.0, 1.0]
    assert figures["mrr_ci95"] == [0.0, 1.0]


def test_mean_interval_capped_at_one() -> None:
    metrics = RankMetrics()
    for rank in (1, 1, 1, 2):
        metrics.add(rank)
    low, high = metrics.to_json()["ndcg_ci95"]
    assert low < metrics.ndcg
    assert high == 1.0


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(0.7225, abs=1e-4)
    assert high == pytest.approx(1.0)


@given(st.integers(min_value=1, max_value=10**7), st.data())
def test_wilson_interval_contains_rate(n: int, data: st.DataObject) -> None:
    hits = data.draw(st.integers(min_value=0, max_value=n))
    low, high = wilson_interval(hits, n)
    assert 0.0 <= low <= hits / n
    assert hits / n <= high <= 1.0


def test_json_keys_match_contract() -> None:
    result = RankMetrics()
    result.add(2)
    shown = result.to_json()
    assert {"hr@10", "ndcg@10", "mrr@10", "hits", "n"} <= set(shown)


def test_first_event_of_user_not_evaluated() -> None:
    stream = [_view(0, "a", "x"), _view(1, "b", "x"), _view(2, "c", "y")]
    result = evaluate(stream, strategies=["popular"])
    assert result.results["popular"].all_events.n == 0


def test_every_step_samples_global_index() -> None:
    stream = [_view(n, "u", f"i{n % 3}") for n in range(10)]
    result = evaluate(stream, strategies=["popular"], every=3)
    # Indices 3, 6 and 9 are multiples of 3 with history; index 0 has none.
    assert result.results["popular"].all_events.n == 3


def test_recent_items_hand_computed() -> None:
    # u alternates a and b. From index 2 on, the item is in u's history and
    # the own-items model hits. Index 1 (b) is new to u and misses.
    stream = [_view(n, "u", "ab"[n % 2]) for n in range(6)]
    result = evaluate(stream, EngineConfig(repeat_purchases="allow"), strategies=["recent"])
    recent = result.results["recent"]
    assert recent.all_events.n == 5
    assert recent.all_events.hits == 4
    assert recent.new_to_user.n == 1


def test_new_to_user_leaves_history_out() -> None:
    # After u saw x, the new-to-user list for y must not contain x, so the
    # popularity list (x first, then y) puts y first.
    stream = [
        _view(0, "v", "x"),
        _view(1, "v", "x"),
        _view(2, "w", "y"),
        _view(3, "u", "x"),
        _view(4, "u", "y"),
    ]
    result = evaluate(stream, strategies=["popular"])
    popular = result.results["popular"]
    assert popular.new_to_user.n == 1
    assert popular.new_to_user.hits == 1
    assert popular.new_to_user.mrr == pytest.approx(1.0)


def test_rank_recorded_for_ndcg() -> None:
    # Index 1 (v on x): x is the only item, rank 1. Index 4 (u on y): x has
    # two views, and z's single view is newer than y's, so y ranks third.
    stream = [
        _view(0, "v", "x"),
        _view(1, "v", "x"),
        _view(2, "w", "y"),
        _view(3, "u", "z"),
        _view(4, "u", "y"),
    ]
    result = evaluate(stream, strategies=["popular"])
    popular = result.results["popular"]
    assert popular.all_events.hits == 2
    assert popular.all_events.mrr_sum == pytest.approx(1 + 1 / 3)


def test_purchase_policy_applies_to_all_events() -> None:
    stream = [_view(0, "u", "x", "purchase"), _view(1, "u", "x", "purchase")]
    excluded = evaluate(stream, EngineConfig(repeat_purchases="exclude"), strategies=["recent"])
    allowed = evaluate(stream, EngineConfig(repeat_purchases="allow"), strategies=["recent"])
    assert excluded.results["recent"].all_events.hits == 0
    assert allowed.results["recent"].all_events.hits == 1


def test_by_type_and_coverage() -> None:
    stream = [_view(0, "u", "x"), _view(1, "u", "x", "click"), _view(2, "u", "y", "purchase")]
    result = evaluate(stream, EngineConfig(repeat_purchases="allow"), strategies=["recent"])
    shown = result.to_json()["results"]["recent"]
    assert shown["kind"] == "model"
    assert shown["by_type"]["click"]["hits"] == 1
    assert shown["by_type"]["purchase"]["hits"] == 0
    assert 0.0 < shown["coverage"] <= 1.0


def test_unknown_strategy_rejected() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'best'"):
        evaluate([], strategies=["best"])


def test_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="every is 0"):
        evaluate([], every=0)


def test_timeline_buckets_count_hits() -> None:
    stream = [_view(n, "u", "x") for n in range(8)]
    result = evaluate(
        stream, EngineConfig(repeat_purchases="allow"), strategies=["recent"], buckets=2
    )
    starts, rates = result.timeline("recent")
    assert starts == [0, 4]
    assert rates == [1.0, 1.0]


def test_batches_see_only_earlier_items(monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker adds a batch's new items to the catalog as it learns
    # them. The evaluation must not add them earlier, or the context model
    # could draw an item as a negative before the item's first event.
    stream = [Event(f"e{n}", "view", f"u{n % 3}", f"i{n}", n * 1000) for n in range(12)]
    observed: list[tuple[str, int]] = []
    original = Recommender._batch

    def recording_batch(engine: Recommender, events: list[Event]) -> EventBatch:
        observed.append((events[0].event_id, len(engine.catalog)))
        return original(engine, events)

    monkeypatch.setattr(Recommender, "_batch", recording_batch)
    evaluate(stream, EngineConfig(repeat_purchases="allow"), every=4, strategies=["context"])
    assert observed
    for event_id, catalog_size in observed:
        # Item i{n} first appears at event e{n}.
        assert catalog_size == int(event_id.removeprefix("e"))


def test_strategy_hits_independent_of_others() -> None:
    # Every strategy ranks the same candidate scores of an event, and only
    # popularity padding reads a model again. A strategy scored alone must
    # get the very figures it gets after all the others, or a comparison run
    # would report other hits than a run of the default list.
    words = ("red", "mug", "lamp", "bag", "tin", "card")

    def title(item_id: str) -> str:
        number = int(item_id.removeprefix("i"))
        return f"{words[number % 6]} {words[number // 6 % 6]}"

    stream = [
        replace(event, title=title(event.item_id))
        for event in generate_events(1500, n_users=40, n_items=200, seed=3)
    ]
    config = EngineConfig(repeat_purchases="allow")
    # Both orders, so that each checked strategy is scored once after the
    # strategies that precede it in the default order and once after those
    # that follow it. The learned fusion comes last in one and first in the
    # other.
    orders = {"default": default_strategies(), "reversed": default_strategies()[::-1]}
    together = {
        order: evaluate(stream, config, every=2, strategies=names).to_json()["results"]
        for order, names in orders.items()
    }
    assert together["default"]["learned"]["all"]["hits"] > 0
    assert together["default"]["title"]["all"]["hits"] > 0
    for name in ("learned", "mf", "title"):
        alone = evaluate(stream, config, every=2, strategies=[name]).to_json()["results"][name]
        for order, results in together.items():
            assert alone == results[name], (name, order)


def test_strategy_figures_ignore_other_strategies() -> None:
    # With a fixed-weight default, matrix factorization scored alone must get
    # the figures it gets next to the learned fusion.
    stream = list(generate_events(1500, n_users=40, n_items=200, seed=3))
    config = EngineConfig(repeat_purchases="allow", fusion="weighted")
    alone = evaluate(stream, config, every=2, strategies=["mf"]).to_json()["results"]["mf"]
    together = evaluate(stream, config, every=2, strategies=["mf", "learned"])
    assert alone == together.to_json()["results"]["mf"]
