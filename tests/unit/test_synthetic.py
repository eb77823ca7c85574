"""The synthetic sample: deterministic, valid against the contract, shaped like shop traffic."""

from __future__ import annotations

import gzip
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import EVENT_TYPES, decode_event, event_from_object
from stream.synthetic import (
    DEFAULT_SPAN_MS,
    DEFAULT_START_MS,
    generate_events,
    main,
    write_jsonl,
)

NOW_MS = DEFAULT_START_MS + 2 * DEFAULT_SPAN_MS


@pytest.fixture(scope="module")
def sample() -> list:
    return list(generate_events(20_000, n_users=800, n_items=1_000, seed=11, now_ms=NOW_MS))


def test_count_is_exact(sample: list) -> None:
    assert len(sample) == 20_000


def test_same_seed_same_events() -> None:
    first = list(generate_events(2_000, 100, 300, seed=5, now_ms=NOW_MS))
    second = list(generate_events(2_000, 100, 300, seed=5, now_ms=NOW_MS))
    assert first == second


def test_other_seed_other_events() -> None:
    first = list(generate_events(2_000, 100, 300, seed=5, now_ms=NOW_MS))
    second = list(generate_events(2_000, 100, 300, seed=6, now_ms=NOW_MS))
    assert [e.item_id for e in first] != [e.item_id for e in second]


def test_times_never_decrease(sample: list) -> None:
    times = [event.timestamp_ms for event in sample]
    assert all(a <= b for a, b in zip(times, times[1:], strict=False))


def test_times_within_span(sample: list) -> None:
    assert sample[0].timestamp_ms >= DEFAULT_START_MS
    assert sample[-1].timestamp_ms <= DEFAULT_START_MS + DEFAULT_SPAN_MS


def test_event_ids_unique(sample: list) -> None:
    ids = [event.event_id for event in sample]
    assert len(set(ids)) == len(ids)


def test_events_pass_the_decoder(sample: list) -> None:
    for event in sample:
        raw = orjson.dumps(event.to_json())
        decoded = decode_event(
            raw, topic_type=event.type, key=event.user_id.encode(), check_key=True
        )
        assert decoded == event


def test_ids_within_population(sample: list) -> None:
    users = {int(event.user_id[1:]) for event in sample}
    items = {int(event.item_id[1:]) for event in sample}
    assert min(users) >= 0
    assert max(users) < 800
    assert min(items) >= 0
    assert max(items) < 1_000


def test_every_type_occurs_in_funnel_order(sample: list) -> None:
    counts = Counter(event.type for event in sample)
    assert set(counts) == set(EVENT_TYPES)
    assert counts["view"] > counts["click"] > counts["purchase"]


def test_purchase_follows_click_of_same_item(sample: list) -> None:
    clicked: dict[str, set[str]] = defaultdict(set)
    for event in sample:
        if event.type == "click":
            clicked[event.session_id].add(event.item_id)
        if event.type == "purchase":
            assert event.item_id in clicked[event.session_id]


def test_purchases_have_quantity_and_price(sample: list) -> None:
    purchases = [event for event in sample if event.type == "purchase"]
    assert purchases
    for event in purchases:
        assert event.quantity is not None
        assert event.quantity >= 1
        assert event.price is not None
        assert event.price > 0
        assert event.currency == "EUR"


def test_views_carry_no_quantity(sample: list) -> None:
    views = [event for event in sample if event.type == "view"]
    assert all(event.quantity is None for event in views)


def test_item_keeps_category_and_price(sample: list) -> None:
    categories: dict[str, set[str | None]] = defaultdict(set)
    prices: dict[str, set[float]] = defaultdict(set)
    for event in sample:
        categories[event.item_id].add(event.category)
        if event.price is not None:
            prices[event.item_id].add(event.price)
    assert all(len(values) == 1 for values in categories.values())
    assert all(len(values) == 1 for values in prices.values())
    assert None not in set().union(*categories.values())


def test_popularity_is_skewed(sample: list) -> None:
    views = Counter(event.item_id for event in sample if event.type == "view")
    ranked = sorted(views.values(), reverse=True)
    top_share = sum(ranked[:10]) / sum(ranked)
    # Ten of a thousand items would get 1 % of the views under a uniform law.
    assert top_share > 0.1


def test_users_have_sessions(sample: list) -> None:
    sessions_by_user: dict[str, set[str | None]] = defaultdict(set)
    for event in sample:
        sessions_by_user[event.user_id].add(event.session_id)
    assert any(len(sessions) > 1 for sessions in sessions_by_user.values())
    owners: dict[str | None, set[str]] = defaultdict(set)
    for event in sample:
        owners[event.session_id].add(event.user_id)
    assert all(len(users) == 1 for users in owners.values())


def test_zero_events_gives_none() -> None:
    assert list(generate_events(0, 5, 5, now_ms=NOW_MS)) == []


@pytest.mark.parametrize(
    ("n_events", "n_users", "n_items", "name"),
    [(-1, 5, 5, "n_events"), (5, 0, 5, "n_users"), (5, 5, 0, "n_items")],
)
def test_invalid_size_rejected(n_events: int, n_users: int, n_items: int, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        generate_events(n_events, n_users, n_items, now_ms=NOW_MS)


def test_span_ending_after_now_rejected() -> None:
    with pytest.raises(ValueError, match="ends in the past"):
        generate_events(10, 5, 5, start_ms=NOW_MS - 1000, span_ms=10_000, now_ms=NOW_MS)


def test_default_start_is_in_the_past() -> None:
    events = list(generate_events(10, 5, 5))
    assert len(events) == 10


@settings(max_examples=30, deadline=None)
@given(
    n_events=st.integers(0, 300),
    n_users=st.integers(1, 30),
    n_items=st.integers(1, 60),
    seed=st.integers(0, 2**32),
)
def test_any_size_is_valid(n_events: int, n_users: int, n_items: int, seed: int) -> None:
    events = list(generate_events(n_events, n_users, n_items, seed, now_ms=NOW_MS))
    assert len(events) == n_events
    for event in events:
        assert event_from_object(event.to_json()) == event


def test_write_jsonl_plain(tmp_path: Path) -> None:
    events = list(generate_events(100, 10, 20, seed=2, now_ms=NOW_MS))
    path = tmp_path / "sample.jsonl"
    assert write_jsonl(path, events) == 100
    lines = path.read_bytes().splitlines()
    assert [event_from_object(orjson.loads(line)) for line in lines] == events


def test_write_jsonl_gzip_is_reproducible(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    write_jsonl(first, generate_events(100, 10, 20, seed=2, now_ms=NOW_MS))
    write_jsonl(second, generate_events(100, 10, 20, seed=2, now_ms=NOW_MS))
    assert first.read_bytes() == second.read_bytes()
    assert len(gzip.decompress(first.read_bytes()).splitlines()) == 100


def test_write_jsonl_leaves_no_partial_file(tmp_path: Path) -> None:
    def failing():
        yield from generate_events(5, 2, 2, now_ms=NOW_MS)
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        write_jsonl(tmp_path / "broken.jsonl", failing())
    assert list(tmp_path.iterdir()) == []


def test_command_line_writes_sample(tmp_path: Path) -> None:
    path = tmp_path / "demo" / "sample.jsonl.gz"
    assert main([str(path), "--events", "500", "--users", "50", "--items", "80"]) == 0
    assert len(gzip.decompress(path.read_bytes()).splitlines()) == 500


def test_command_line_if_missing_keeps_file(tmp_path: Path) -> None:
    path = tmp_path / "sample.jsonl"
    path.write_text("kept\n")
    assert main([str(path), "--events", "10", "--if-missing"]) == 0
    assert path.read_text() == "kept\n"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--start-ms", "0"], "--start-ms is 0"),
        (["--span-days", "inf"], "--span-days is inf"),
        (["--span-days", "nan"], "--span-days is nan"),
        (["--events", "-1"], "--events is -1"),
    ],
)
def test_cli_names_bad_flag(tmp_path: Path, capsys, flags: list[str], message: str) -> None:
    from stream.synthetic import main

    assert main([str(tmp_path / "out.jsonl"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_rejects_folder_as_output(tmp_path: Path, capsys) -> None:
    from stream.synthetic import main

    assert main([str(tmp_path), "--events", "10"]) == 2
    assert "is a folder" in capsys.readouterr().err
