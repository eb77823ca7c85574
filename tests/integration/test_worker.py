"""The worker against the real broker and Redis: events in, lists out, rejects aside."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import orjson
import pytest

from schemas import Event, validator
from stream.runner import WorkerProcess, free_port, wait_for_lists
from stream.sink import redis_client
from stream.synthetic import generate_events
from stream.topics import DEADLETTER_TOPIC, EVENT_TOPICS

from corpus import BAD_CASES, TRICKY_USER_IDS, event, future_case
from kafka_io import produce_events, produce_raw, read_topic


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _wait_metric(worker, name, expected, timeout_s=60.0, **labels):
    deadline = time.monotonic() + timeout_s
    while True:
        text = worker.metrics()
        if _metric(text, name, **labels) >= expected or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def test_events_become_lists_in_redis(run_settings, tmp_path):
    events = list(generate_events(3000, n_users=200, n_items=500, seed=3))
    users = {e.user_id for e in events}

    with WorkerProcess(run_settings, tmp_path / "worker.log") as worker:
        worker.wait_ready()
        asyncio.run(produce_events(run_settings, events))
        lists = asyncio.run(wait_for_lists(run_settings, users, timeout_s=120))
        metrics = _wait_metric(worker, "fusionrec_events_applied_total", len(events))
        code = worker.terminate()

    assert code == 0
    assert len(lists) == len(users)
    check = validator("recommendations.schema.json")
    for value in lists.values():
        assert check.is_valid(value)
        assert 0 < len(value["items"]) <= run_settings.k
        item_ids = [entry["item_id"] for entry in value["items"]]
        assert len(item_ids) == len(set(item_ids))
    applied = _metric(metrics, "fusionrec_events_applied_total")
    losses = [
        line for line in metrics.splitlines() if "dropped_total" in line or "rejected" in line
    ]
    assert applied == len(events), losses


def test_popular_list_is_written(run_settings, tmp_path):
    events = list(generate_events(500, n_users=50, n_items=100, seed=4))
    with WorkerProcess(run_settings, tmp_path / "worker.log") as worker:
        worker.wait_ready()
        asyncio.run(produce_events(run_settings, events))
        asyncio.run(wait_for_lists(run_settings, {events[-1].user_id}, timeout_s=60))
        value = asyncio.run(_get_popular(run_settings, timeout_s=30))
        assert worker.terminate() == 0
    assert validator("recommendations.schema.json").is_valid(value)
    assert len(value["items"]) == run_settings.k


async def _get_popular(settings, timeout_s):
    client = redis_client(settings)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            raw = await client.get(f"{settings.redis_key_prefix}popular")
            if raw is not None:
                value = orjson.loads(raw)
                if value["items"]:
                    return value
            await asyncio.sleep(0.5)
    finally:
        await client.aclose()
    pytest.fail("recs:popular was not written")


def test_bad_input_goes_to_deadletter(run_settings, tmp_path):
    now_ms = int(time.time() * 1000)
    cases = [*BAD_CASES, future_case(now_ms)]
    good = [
        Event(f"good-{n}", "view", f"user-{n % 7}", f"item-{n % 11}", now_ms - 60_000 + n)
        for n in range(len(cases))
    ]
    records = []
    for case, valid in zip(cases, good, strict=True):
        records.append((EVENT_TOPICS[case.topic_type], case.key, case.value))
        records.append(("events.view", valid.user_id.encode(), orjson.dumps(valid.to_json())))

    with WorkerProcess(run_settings, tmp_path / "worker.log") as worker:
        worker.wait_ready()
        asyncio.run(produce_raw(run_settings, records))
        asyncio.run(wait_for_lists(run_settings, {e.user_id for e in good}, timeout_s=90))
        dead = asyncio.run(read_topic(run_settings, DEADLETTER_TOPIC, len(cases)))
        metrics = _wait_metric(worker, "fusionrec_messages_rejected_total", len(cases))
        metrics = _wait_metric(worker, "fusionrec_events_applied_total", len(good))
        log = worker.log_text()
        assert worker.terminate() == 0

    assert len(dead) == len(cases)
    check = validator("deadletter.schema.json")
    reasons = {}
    for record in dead:
        value = orjson.loads(record.value)
        assert check.is_valid(value), value
        assert value["source"]["topic"].startswith(run_settings.topic_prefix)
        reasons[value["reason"]] = reasons.get(value["reason"], 0) + 1
    expected = {}
    for case in cases:
        expected[case.reason] = expected.get(case.reason, 0) + 1
    assert reasons == expected
    assert _metric(metrics, "fusionrec_messages_rejected_total") == len(cases)
    assert _metric(metrics, "fusionrec_events_applied_total") == len(good)
    for reason, count in expected.items():
        assert _metric(metrics, "fusionrec_messages_rejected_total", reason=reason) == count
    everything = b"".join(record.value for record in dead)
    assert b'"user_id":"u1"' not in everything
    assert b'"user_id": "u1"' not in everything
    letters = [orjson.loads(record.value) for record in dead]
    unknown = [v for v in letters if v["reason"] == "unknown_field" and v["field"] == "password"]
    assert len(unknown) == 1
    assert unknown[0]["payload"]["user_id"] != "u1"
    assert '"u1"' not in log


def test_tricky_ids_get_distinct_keys(run_settings, tmp_path):
    now_ms = int(time.time() * 1000) - 60_000
    events = [
        Event(f"tricky-{n}", "view", user, f"item-{n}", now_ms + n)
        for n, user in enumerate(TRICKY_USER_IDS)
    ]
    with WorkerProcess(run_settings, tmp_path / "worker.log") as worker:
        worker.wait_ready()
        asyncio.run(produce_events(run_settings, events))
        lists = asyncio.run(wait_for_lists(run_settings, TRICKY_USER_IDS, timeout_s=90))
        assert worker.terminate() == 0
    assert len(lists) == len(TRICKY_USER_IDS)
    keys = asyncio.run(_user_keys(run_settings))
    assert len(keys) == len(TRICKY_USER_IDS)
    for value in lists.values():
        assert value["items"]


async def _user_keys(settings):
    client = redis_client(settings)
    try:
        return [k async for k in client.scan_iter(f"{settings.redis_key_prefix}user:*")]
    finally:
        await client.aclose()


def test_event_helper_builds_valid_event():
    assert validator("event.schema.json").is_valid(event())


def test_second_worker_without_state_names_group(run_settings, tmp_path):
    from stream.app import GroupBusyError, Worker

    events = [Event(f"g-{n}", "view", f"user-{n}", "item-1", 1_700_000_000_000) for n in range(20)]
    with WorkerProcess(run_settings, tmp_path / "first.log") as first:
        first.wait_ready()
        asyncio.run(produce_events(run_settings, events))
        asyncio.run(wait_for_lists(run_settings, ["user-0", "user-19"], 60))
        # The interval checkpoint commits the offsets of those events.
        time.sleep(run_settings.checkpoint_interval_s + 3)
        # A second worker without a state would move the group's offsets back
        # to the start while the first one is still a member.
        second = Worker(replace(run_settings, data_dir=str(tmp_path / "second")))
        with pytest.raises(GroupBusyError, match=f"group {run_settings.app_id} still has"):
            asyncio.run(second.align_committed_offsets(timeout_s=5))
        assert first.terminate() == 0


def test_second_worker_in_group_is_reported(run_settings, tmp_path):
    second_settings = replace(run_settings, web_port=free_port(), data_dir=str(tmp_path / "second"))
    with WorkerProcess(run_settings, tmp_path / "first.log") as first:
        first.wait_ready()
        report = first.health()
        assert report is not None
        assert report["partitions_assigned"] == report["partitions_total"]
        with WorkerProcess(second_settings, tmp_path / "second.log") as second:
            deadline = time.monotonic() + 90
            shared = None
            while time.monotonic() < deadline:
                shared = first.health()
                if shared and shared["partitions_assigned"] < (shared["partitions_total"] or 0):
                    break
                time.sleep(0.5)
            assert shared is not None
            assert shared["partitions_assigned"] < shared["partitions_total"]
            assert shared["ready"] is False
            assert "another worker with app id" in first.log_text()
            joined = second.health()
            assert joined is not None
            assert 0 < joined["partitions_assigned"] < report["partitions_total"]
            assert joined["ready"] is False
            assert second.terminate() == 0
        assert first.terminate() == 0
