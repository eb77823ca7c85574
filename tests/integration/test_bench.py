"""`fusionrec bench` on a tiny run: the shape of its JSON and the soundness of its counts.

These tests check what the benchmark measures and reports, never how fast
anything is.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from dataclasses import replace

import orjson
import pytest

from stream.bench import due_count, make_probe, percentiles
from stream.runner import settings_env
from stream.settings import Settings
from stream.sink import redis_client

TINY = [
    "--events", "1500",
    "--users", "150",
    "--items", "300",
    "--naive-events", "300",
    "--live-seconds", "0.5",
    "--loads", "200",
    "--probe-every", "10",
    "--catalog-sizes", "500,1500",
    "--memory-users", "300,600",
    "--naive-memory-users", "300",
]  # fmt: skip


@pytest.fixture(scope="module")
def bench_settings(kafka_bootstrap, redis_url, tmp_path_factory):
    # The same isolation as the run_settings fixture, for one module-wide run:
    # the benchmark derives a topic prefix, group and key prefix per leg from it.
    run_id = f"t{uuid.uuid4().hex[:10]}"
    return replace(
        Settings(),
        kafka_bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        app_id=f"fusionrec-{run_id}",
        topic_prefix=f"{run_id}.",
        redis_key_prefix=f"{run_id}:recs:",
        data_dir=str(tmp_path_factory.mktemp("bench") / "var"),
        partitions=4,
        consumer_session_timeout_s=6.0,
        consumer_heartbeat_s=1.0,
        pseudonym_key="00" * 32,
    )


@pytest.fixture(scope="module")
def tiny_result(bench_settings):
    env = {**os.environ, **settings_env(bench_settings)}
    done = subprocess.run(
        [sys.executable, "-m", "stream.cli", "bench", "--json", *TINY],
        env=env,
        capture_output=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return orjson.loads(done.stdout)


def _ordered(quantiles):
    return quantiles["p50"] <= quantiles["p95"] <= quantiles["p99"]


def test_bench_json_has_required_keys(tiny_result):
    result = tiny_result
    assert isinstance(result["ceiling"]["events_per_s"], float)
    assert isinstance(result["naive"]["events_per_s"], float)
    worker = result["worker"]
    assert isinstance(worker["events_per_s"], float)
    assert set(worker["freshness_s"]) == {"p50", "p95", "p99"}
    assert set(worker["freshness_at_5000_s"]) == {"p50", "p95", "p99"}
    assert isinstance(worker["bytes_per_user"], float)
    assert {"10000", "100000", "1000000"} <= set(result["refresh_ms_p99"])
    assert isinstance(result["refresh_ms_p99"]["1500"], float)
    assert result["refresh_ms_p99"]["1000000"] is None


def test_bench_every_event_reaches_worker(tiny_result, bench_settings):
    worker = tiny_result["worker"]
    # One probe per partition of each event topic after the drain, and again at the end.
    end_probes = 2 * len(("view", "click", "purchase")) * bench_settings.partitions
    live = sum(run["events"] + run["probes"] for run in worker["by_load"])
    assert worker["drain_events"] == 1500
    assert worker["end_probes"] == end_probes
    counts = worker["worker_counts"]
    assert counts["consumed"] == 1500 + end_probes + live
    assert counts["applied"] + counts["dropped"] + counts["duplicates"] == counts["consumed"]
    assert counts["dropped"] == sum(counts["dropped_by_reason"].values())
    assert counts["rejected"] == 0
    assert worker["exit_code"] == 0


def test_bench_legs_cover_every_user(tiny_result):
    for leg in ("ceiling", "worker", "naive"):
        data = tiny_result[leg]
        assert data["users_without_list"] == 0, leg
        assert data["exit_code"] == 0, leg
        assert data["peak_rss_bytes"] > 0, leg


def test_bench_probes_all_land(tiny_result):
    for leg in ("ceiling", "worker", "naive"):
        runs = tiny_result[leg]["by_load"]
        assert runs, leg
        assert runs[-1]["at_saturation"], leg
        for run in runs:
            assert run["probes"] > 0, (leg, run["offered_per_s"])
            assert run["probes_landed"] == run["probes"], (leg, run["offered_per_s"])
            assert _ordered(run["freshness_s"]), (leg, run["offered_per_s"])
            assert run["freshness_s"]["p50"] > 0, (leg, run["offered_per_s"])


def test_bench_naive_runs_on_subset(tiny_result):
    assert tiny_result["naive"]["drain_events"] == 300
    assert tiny_result["events"]["naive_subset"] == 300
    offered = [run["offered_per_s"] for run in tiny_result["worker"]["by_load"]]
    assert 5000.0 in offered


def test_bench_memory_per_requested_count(tiny_result):
    by_users = tiny_result["memory"]["by_users"]
    assert set(by_users) == {"300", "600"}
    assert by_users["600"]["users_added"] == 600
    assert set(by_users["600"]["model_bytes_per_user"]) >= {"mf", "covisit"}
    sizes = tiny_result["refresh"]["by_catalog_size"]
    assert set(sizes) == {"500", "1500"}
    assert sizes["1500"]["items"] >= 1500


def test_bench_leaves_no_keys(tiny_result, bench_settings):
    async def count_keys():
        client = redis_client(bench_settings)
        try:
            pattern = f"{bench_settings.redis_key_prefix}bench-*"
            return len([key async for key in client.scan_iter(pattern, count=1000)])
        finally:
            await client.aclose()

    assert asyncio.run(count_keys()) == 0


def test_percentiles_of_nothing_are_none():
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None}


def test_percentiles_of_known_values():
    values = [float(v) for v in range(1, 101)]
    result = percentiles(values)
    assert result["p50"] == pytest.approx(50.5)
    assert result["p99"] == pytest.approx(99.01)


def test_due_count_follows_schedule():
    assert due_count(0.0, 1000.0, 50) == 1
    assert due_count(0.0105, 1000.0, 50) == 11
    assert due_count(10.0, 1000.0, 50) == 50
    assert due_count(0.0, None, 50) == 50


def test_make_probe_keeps_item_and_time():
    value = orjson.dumps(
        {
            "event_id": "e1",
            "type": "purchase",
            "user_id": "u1",
            "item_id": "i9",
            "timestamp": 1735689600000,
            "session_id": "s1",
            "quantity": 2,
            "price": 3.5,
        }
    )
    probe = orjson.loads(make_probe(value, "bench-probe-x"))
    assert probe["user_id"] == "bench-probe-x"
    assert probe["event_id"] == "bench-probe-x"
    assert probe["item_id"] == "i9"
    assert probe["timestamp"] == 1735689600000
    assert "session_id" not in probe
    retyped = orjson.loads(make_probe(value, "p2", "view"))
    assert retyped["type"] == "view"
    assert "quantity" not in retyped
