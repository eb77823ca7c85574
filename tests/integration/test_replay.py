"""``fusionrec replay`` against the real broker, plus its pure parts.

Tests marked ``integration`` need the broker of ``make services-up`` and skip
when it is not reachable. Each of them works on topics with a fresh prefix,
so it neither sees nor leaves events in the shared topics.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas import Event, decode_event
from stream.replay import TokenBucket, add_arguments, run
from stream.settings import Settings
from stream.synthetic import DEFAULT_SPAN_MS, DEFAULT_START_MS, generate_events, write_jsonl
from stream.topics import ALL_TOPICS, EVENT_TOPICS, create_topics

PARTITIONS = 3
NOW_MS = DEFAULT_START_MS + 2 * DEFAULT_SPAN_MS
TOPIC_TYPES = {topic: event_type for event_type, topic in EVENT_TOPICS.items()}


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fusionrec replay")
    add_arguments(parser)
    return parser.parse_args([*argv, "--no-progress"])


def _summary(capsys: pytest.CaptureFixture[str]) -> dict:
    return orjson.loads(capsys.readouterr().out)


@pytest.fixture
def events() -> list[Event]:
    return list(generate_events(3_000, n_users=200, n_items=400, seed=42, now_ms=NOW_MS))


@pytest.fixture
def sample_file(tmp_path: Path, events: list[Event]) -> Path:
    path = tmp_path / "sample.jsonl.gz"
    write_jsonl(path, events)
    return path


@pytest.fixture
def topic_prefix(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    prefix = f"test-replay-{uuid.uuid4().hex[:10]}."
    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS)
    asyncio.run(create_topics(settings))
    monkeypatch.setenv("FUSIONREC_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("FUSIONREC_TOPIC_PREFIX", prefix)
    yield prefix
    asyncio.run(_delete_topics(kafka_bootstrap, [prefix + name for name in ALL_TOPICS]))


async def _delete_topics(bootstrap: str, topics: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(topics)
    finally:
        await admin.close()


async def _consume_all(
    bootstrap: str, prefix: str, expected: int, timeout_s: float = 30.0
) -> list[tuple[str, int, bytes | None, bytes]]:
    """Read the event topics from the start until ``expected`` messages or the timeout."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(prefix + topic, partition)
            for topic in EVENT_TOPICS.values()
            for partition in range(PARTITIONS)
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        received: list[tuple[str, int, bytes | None, bytes]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(received) < expected and loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for tp, records in batches.items():
                for record in records:
                    topic = tp.topic.removeprefix(prefix)
                    received.append((topic, tp.partition, record.key, record.value))
        # One more poll shows whether anything arrived beyond the expected count.
        for tp, records in (await consumer.getmany(timeout_ms=500)).items():
            for record in records:
                received.append(
                    (tp.topic.removeprefix(prefix), tp.partition, record.key, record.value)
                )
        return received
    finally:
        await consumer.stop()


async def _message_count(bootstrap: str, prefix: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(prefix + topic, partition)
            for topic in EVENT_TOPICS.values()
            for partition in range(PARTITIONS)
        ]
        ends = await consumer.end_offsets(partitions)
        return sum(ends.values())
    finally:
        await consumer.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.integration
def test_replay_produces_every_event(
    kafka_bootstrap: str,
    topic_prefix: str,
    sample_file: Path,
    events: list[Event],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(_parse(str(sample_file), "--format", "jsonl", "--json")) == 0
    summary = _summary(capsys)
    assert summary["rows_read"] == len(events)
    assert summary["produced"] == len(events)
    assert summary["skipped"] == {}
    assert summary["failed"] == {}

    received = asyncio.run(_consume_all(kafka_bootstrap, topic_prefix, len(events)))
    assert len(received) == len(events)
    by_id = {event.event_id: event for event in events}
    seen = set()
    for topic, _, key, value in received:
        decoded = decode_event(value, topic_type=TOPIC_TYPES[topic], key=key, check_key=True)
        assert decoded == by_id[decoded.event_id]
        seen.add(decoded.event_id)
    assert seen == set(by_id)


@pytest.mark.integration
def test_replay_counts_per_topic(
    kafka_bootstrap: str,
    topic_prefix: str,
    sample_file: Path,
    events: list[Event],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(_parse(str(sample_file), "--format", "jsonl", "--json")) == 0
    summary = _summary(capsys)
    expected = Counter(EVENT_TOPICS[event.type] for event in events)
    assert summary["by_topic"] == {topic_prefix + t: n for t, n in sorted(expected.items())}

    received = asyncio.run(_consume_all(kafka_bootstrap, topic_prefix, len(events)))
    assert Counter(topic for topic, _, _, _ in received) == expected


@pytest.mark.integration
def test_replay_keeps_user_on_one_partition_in_order(
    kafka_bootstrap: str,
    topic_prefix: str,
    sample_file: Path,
    events: list[Event],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(_parse(str(sample_file), "--format", "jsonl", "--json")) == 0
    capsys.readouterr()
    received = asyncio.run(_consume_all(kafka_bootstrap, topic_prefix, len(events)))

    partitions_of_user: dict[str, set[int]] = defaultdict(set)
    times_in_partition: dict[tuple[str, int], list[int]] = defaultdict(list)
    for topic, partition, key, value in received:
        assert key is not None
        event = orjson.loads(value)
        assert key == event["user_id"].encode("utf-8")
        partitions_of_user[event["user_id"]].add(partition)
        times_in_partition[(topic, partition)].append(event["timestamp"])
    assert all(len(parts) == 1 for parts in partitions_of_user.values())
    for times in times_in_partition.values():
        assert times == sorted(times)


@pytest.mark.integration
def test_replay_limit_sends_first_events(
    kafka_bootstrap: str,
    topic_prefix: str,
    sample_file: Path,
    events: list[Event],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(_parse(str(sample_file), "--format", "jsonl", "--limit", "100", "--json")) == 0
    summary = _summary(capsys)
    assert summary["selected"] == 100
    assert summary["produced"] == 100

    received = asyncio.run(_consume_all(kafka_bootstrap, topic_prefix, 100, timeout_s=10))
    ids = {orjson.loads(value)["event_id"] for _, _, _, value in received}
    assert ids == {event.event_id for event in events[:100]}


@pytest.mark.integration
def test_replay_with_rate_limit_sends_all(
    kafka_bootstrap: str,
    topic_prefix: str,
    sample_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = (str(sample_file), "--format", "jsonl", "--limit", "300", "--rate", "5000", "--json")
    assert run(_parse(*argv)) == 0
    assert _summary(capsys)["produced"] == 300
    assert asyncio.run(_message_count(kafka_bootstrap, topic_prefix)) == 300


@pytest.mark.integration
def test_dry_run_produces_nothing(
    kafka_bootstrap: str,
    topic_prefix: str,
    sample_file: Path,
    events: list[Event],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(_parse(str(sample_file), "--format", "jsonl", "--dry-run", "--json")) == 0
    summary = _summary(capsys)
    assert summary["dry_run"] is True
    assert summary["produced"] == 0
    assert summary["events"] == len(events)
    assert asyncio.run(_message_count(kafka_bootstrap, topic_prefix)) == 0


@pytest.mark.integration
def test_replay_missing_topics_fails(
    kafka_bootstrap: str,
    sample_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FUSIONREC_TOPIC_PREFIX", f"absent-{uuid.uuid4().hex[:10]}.")
    argv = (str(sample_file), "--format", "jsonl", "--bootstrap-servers", kafka_bootstrap)
    assert run(_parse(*argv)) == 1
    assert "do not exist" in capsys.readouterr().err


def test_replay_unreachable_broker_fails(
    sample_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    assert run(_parse(str(sample_file), "--format", "jsonl", "--bootstrap-servers", address)) == 1
    assert f"cannot connect to Kafka at {address}" in capsys.readouterr().err


def test_dry_run_counts_skipped_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "behavior.csv"
    path.write_text(
        "user_id,item_id,category_id,behavior_type,timestamp\n"
        "1,10,100,pv,1511658000\n"
        "1,11,100,buy,1511658060\n"
        "2,10,100,wish,1511658100\n"
        "2,12\n",
        encoding="utf-8",
    )
    assert run(_parse(str(path), "--format", "taobao", "--dry-run", "--json")) == 0
    summary = _summary(capsys)
    assert summary["rows_read"] == 4
    assert summary["events"] == 2
    assert summary["skipped"] == {"short_row": 1, "unknown_behavior_type": 1}
    assert summary["skipped_total"] == 2
    assert summary["by_topic"] == {"events.purchase": 1, "events.view": 1}


def test_dry_run_shows_skipped_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "behavior.csv"
    path.write_text(
        "user_id,item_id,category_id,behavior_type,timestamp\n"
        "1,10,100,pv,1511658000\n"
        "2,10,100,wish,1511658100\n"
        "3,10,100,pv,yesterday\n",
        encoding="utf-8",
    )
    assert run(_parse(str(path), "--format", "taobao", "--dry-run", "--json")) == 0
    examples = _summary(capsys)["skipped_examples"]
    assert examples["unknown_behavior_type"][0]["line"] == 3
    assert "'wish'" in examples["unknown_behavior_type"][0]["detail"]
    assert "expected one of pv, cart, fav, buy" in examples["unknown_behavior_type"][0]["detail"]
    assert examples["invalid_timestamp"][0]["line"] == 4
    assert "'yesterday'" in examples["invalid_timestamp"][0]["detail"]

    assert run(_parse(str(path), "--format", "taobao", "--dry-run")) == 0
    text = capsys.readouterr().out
    assert "line 3: behavior_type 'wish' is unknown" in text
    assert "line 4: timestamp 'yesterday' is invalid" in text


def test_dry_run_skips_rows_stamped_ahead(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ahead_s = int(time.time()) + 3600
    path = tmp_path / "behavior.csv"
    path.write_text(
        "user_id,item_id,category_id,behavior_type,timestamp\n"
        "1,10,100,pv,1511658000\n"
        f"1,11,100,pv,{ahead_s}\n",
        encoding="utf-8",
    )
    assert run(_parse(str(path), "--format", "taobao", "--dry-run", "--json")) == 0
    summary = _summary(capsys)
    assert summary["events"] == 1
    assert summary["skipped"] == {"timestamp_in_future": 1}
    detail = summary["skipped_examples"]["timestamp_in_future"][0]["detail"]
    assert f"timestamp {ahead_s * 1000}" in detail
    assert "behavior.csv:3:" in detail


def test_dry_run_all_rows_ahead_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ahead_s = int(time.time()) + 3600
    path = tmp_path / "behavior.csv"
    path.write_text(
        f"user_id,item_id,category_id,behavior_type,timestamp\n1,11,100,pv,{ahead_s}\n",
        encoding="utf-8",
    )
    assert run(_parse(str(path), "--format", "taobao", "--dry-run", "--json")) == 2
    assert "timestamp_in_future" in capsys.readouterr().err


def test_dry_run_text_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sample.jsonl"
    write_jsonl(path, generate_events(50, 5, 10, seed=3, now_ms=NOW_MS))
    with path.open("a", encoding="utf-8") as handle:
        handle.write("not json\n")
    assert run(_parse(str(path), "--format", "jsonl", "--dry-run")) == 0
    text = capsys.readouterr().out
    assert "rows read   51" in text
    assert "not_json" in text


def test_missing_file_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(_parse(str(tmp_path / "absent.jsonl"), "--format", "jsonl", "--dry-run")) == 2
    assert "absent.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("option", [("--limit", "-1"), ("--rate", "0")])
def test_invalid_option_is_bad_input(
    sample_file: Path, option: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(_parse(str(sample_file), "--format", "jsonl", "--dry-run", *option)) == 2
    assert option[0] in capsys.readouterr().err


def test_token_bucket_allows_burst_then_paces() -> None:
    now = [0.0]
    bucket = TokenBucket(rate_per_s=10.0, burst=3.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.1)
    assert bucket.take() == pytest.approx(0.2)


def test_token_bucket_refills_up_to_burst() -> None:
    now = [0.0]
    bucket = TokenBucket(rate_per_s=10.0, burst=2.0, clock=lambda: now[0])
    bucket.take()
    bucket.take()
    now[0] = 100.0
    assert [bucket.take() for _ in range(2)] == [0.0, 0.0]
    assert bucket.take() > 0


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1.0), (-5.0, 1.0), (10.0, 0.5)])
def test_token_bucket_rejects_invalid(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="expected"):
        TokenBucket(rate_per_s=rate, burst=burst)


@pytest.mark.parametrize("value", ["", "127.0.0.1", "127.0.0.1:port"])
def test_invalid_bootstrap_option_is_bad_input(
    sample_file: Path, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(_parse(str(sample_file), "--format", "jsonl", "--bootstrap-servers", value)) == 2
    err = capsys.readouterr().err
    assert f"--bootstrap-servers entry {value!r}" in err
    assert "expected comma-separated host:port" in err
