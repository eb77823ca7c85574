"""Measure throughput, freshness and memory against the real broker and Redis.

One run measures three legs on the same events, each in a child process of
its own so that psutil can read its CPU time and peak RSS:

``ceiling``
    A plain aiokafka consumer that decodes each event with orjson and writes
    a list of ``k`` entries per touched user through the worker's `RedisSink`
    (pipelined ``SET EX``, the same batch size), with no models.
``worker``
    A real ``fusionrec worker`` process with every model and fusion.
``naive``
    River's ``reco.BiasedMF`` learning each event and ranking the 1,000 most
    popular items with ``rank``, writing each list through the same sink. It
    runs on the first ``--naive-events`` events only, because it is slow.

Each leg first drains a backlog of events produced before it starts
(saturation throughput), then receives events at fixed offered loads while
probe events measure freshness. A probe is a copy of a stream event under a
user id that has no other event. So the first list that lands in Redis for
that user is the one that covers the probe, and freshness is the time from
the probe's produce call to the poll that finds its list. Model state per user
and per item and the cost of one refresh at growing catalog sizes are
measured in a separate child process that holds nothing but the models.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import logging
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas import Event, RecommendationList, RecommendedItem
from stream.cli import output_problem
from stream.kafka import client_options
from stream.metrics import WorkerMetrics
from stream.runner import WorkerProcess, free_port, settings_env
from stream.settings import Settings
from stream.sink import RedisSink, redis_client
from stream.sources import FORMATS, SourceError, printable, read_events
from stream.topics import ALL_TOPICS, EVENT_TOPICS, create_topics, topic_partitions

logger = logging.getLogger(__name__)

# Description shown by `fusionrec bench --help`, in plain text because argparse
# prints it as it is.
CLI_DESCRIPTION = (
    "Measure throughput, freshness and memory against the real broker and Redis, for"
    " a real worker, a consumer without models and a naive River baseline."
    " docs/benchmarks.md records one run."
)

LEGS = ("ceiling", "worker", "naive")
FIXED_LOAD = 5000
FULL_LOADS = (1000, 2500, 5000, 10_000, 20_000, 40_000)
QUICK_LOADS = (1000, 5000)
STANDARD_CATALOG_SIZES = (10_000, 100_000, 1_000_000)
NAIVE_CANDIDATES = 1000
# Each in-process phase runs in a fresh process, because memory freed by an
# earlier phase would be reused by the next one and hide its RSS growth.
MODEL_PHASES = ("processor", "refresh", "memory", "naive_memory")
# Events of the in-process profile of the processor, which runs twice.
PROFILE_EVENTS = 20_000
PROBE_POLL_S = 0.005
HEALTH_POLL_S = 0.05
PERCENTILES = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0))
TYPE_WEIGHTS = {"view": 1.0, "click": 2.0, "purchase": 4.0}
PACKAGES = ("faust-streaming", "aiokafka", "river", "numpy", "redis", "hiredis", "orjson", "psutil")


@dataclass(frozen=True)
class Sizes:
    """Sizes of one benchmark run; ``--quick`` picks smaller ones."""

    events: int
    users: int
    items: int
    naive_events: int
    live_s: float
    probe_every: int
    loads: tuple[int, ...]
    catalog_sizes: tuple[int, ...]
    memory_users: tuple[int, ...]
    memory_events_per_user: int
    naive_memory_users: int


FULL = Sizes(
    events=100_000,
    users=20_000,
    items=20_000,
    naive_events=5_000,
    live_s=8.0,
    probe_every=50,
    loads=FULL_LOADS,
    catalog_sizes=STANDARD_CATALOG_SIZES,
    memory_users=(100_000, 1_000_000),
    memory_events_per_user=5,
    naive_memory_users=100_000,
)
QUICK = Sizes(
    events=20_000,
    users=4_000,
    items=5_000,
    naive_events=1_500,
    live_s=3.0,
    probe_every=25,
    loads=QUICK_LOADS,
    catalog_sizes=(10_000, 100_000),
    memory_users=(20_000, 100_000),
    memory_events_per_user=5,
    naive_memory_users=20_000,
)


class BenchError(RuntimeError):
    """A benchmark step failed; the message names the step and the log to read."""


# -- arguments ----------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        msg = f"{text!r} is not a comma-separated list of integers"
        raise argparse.ArgumentTypeError(msg) from exc
    if not values or any(value <= 0 for value in values):
        msg = f"{text!r} is invalid; expected positive integers such as 1000,5000"
        raise argparse.ArgumentTypeError(msg)
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``fusionrec bench`` to ``parser``."""
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about 3 minutes)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--replay", type=Path, metavar="PATH", help="events from a file")
    parser.add_argument(
        "--format", dest="fmt", choices=FORMATS, default="jsonl", help="format of --replay"
    )
    parser.add_argument("--legs", default=",".join(LEGS), help="legs to run, comma-separated")
    parser.add_argument("--no-models", action="store_true", help="skip the in-process phase")
    parser.add_argument("--events", type=int, help="events of the saturation drain")
    parser.add_argument("--users", type=int, help="synthetic user population")
    parser.add_argument("--items", type=int, help="synthetic catalog size")
    parser.add_argument("--naive-events", type=int, help="events of the naive leg's drain")
    parser.add_argument("--live-seconds", type=float, help="seconds of each fixed-load run")
    parser.add_argument("--probe-every", type=int, help="one probe event per this many events")
    parser.add_argument("--loads", type=_int_list, help="offered loads in events/s, e.g. 1000,5000")
    parser.add_argument("--catalog-sizes", type=_int_list, help="catalog sizes of refresh timing")
    parser.add_argument("--memory-users", type=_int_list, help="user counts of memory growth")
    parser.add_argument("--memory-events-per-user", type=int, help="events learned per new user")
    parser.add_argument("--naive-memory-users", type=int, help="users of River's memory growth")
    parser.add_argument("--seed", type=int, default=11, help="seed of the synthetic events")
    parser.add_argument("--plot", type=Path, help="write the freshness-against-load plot here")
    parser.add_argument("--output", type=Path, help="also write the JSON result to this file")
    parser.add_argument(
        "--profile-worker",
        type=Path,
        metavar="PATH",
        help="run the worker leg under cProfile and write its statistics to PATH (slows it)",
    )
    # Internal: the benchmark starts its own child processes with these.
    parser.add_argument("--child", choices=("ceiling", "naive", "models"), help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=MODEL_PHASES, help=argparse.SUPPRESS)


def sizes_from_args(args: argparse.Namespace) -> Sizes:
    """Return the run's sizes: the ``--quick`` or full defaults, overridden by options."""
    base = QUICK if args.quick else FULL
    overrides = {
        "events": args.events,
        "users": args.users,
        "items": args.items,
        "naive_events": args.naive_events,
        "live_s": args.live_seconds,
        "probe_every": args.probe_every,
        "loads": args.loads,
        "catalog_sizes": args.catalog_sizes,
        "memory_users": args.memory_users,
        "memory_events_per_user": args.memory_events_per_user,
        "naive_memory_users": args.naive_memory_users,
    }
    chosen = {name: value for name, value in overrides.items() if value is not None}
    sizes = replace(base, **chosen)
    for name in ("events", "users", "items", "naive_events", "probe_every"):
        if getattr(sizes, name) <= 0:
            msg = f"--{name.replace('_', '-')} is {getattr(sizes, name)}; expected at least 1"
            raise BenchError(msg)
    if sizes.live_s <= 0 or sizes.memory_events_per_user <= 0:
        msg = "--live-seconds and --memory-events-per-user must be positive"
        raise BenchError(msg)
    return sizes


# -- small helpers --------------------------------------------------------------


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """Return p50, p95 and p99 of ``values`` (linear interpolation), None when empty."""
    if len(values) == 0:
        return {name: None for name, _ in PERCENTILES}
    array = np.asarray(values, dtype=np.float64)
    return {name: float(np.percentile(array, q)) for name, q in PERCENTILES}


def due_count(elapsed_s: float, rate: float | None, total: int) -> int:
    """Return how many of ``total`` sends are due after ``elapsed_s`` at ``rate`` per second.

    A rate of None means as fast as possible, so every send is due at once.
    """
    if rate is None:
        return total
    return min(total, int(elapsed_s * rate) + 1)


def make_probe(value: bytes, probe_id: str, event_type: str | None = None) -> bytes:
    """Return a copy of an encoded event under user id and event id ``probe_id``."""
    obj = orjson.loads(value)
    obj["user_id"] = probe_id
    obj["event_id"] = probe_id
    obj.pop("session_id", None)
    if event_type is not None and event_type != obj["type"]:
        obj["type"] = event_type
        for name in ("quantity", "price", "currency"):
            obj.pop(name, None)
    return orjson.dumps(obj)


def peak_rss_bytes(pid: int) -> int | None:
    """Return the peak resident set size of a process (VmHWM), None when unreadable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def cpu_seconds(process: psutil.Process) -> float:
    """Return the user plus system CPU time a process has used."""
    times = process.cpu_times()
    return float(times.user + times.system)


def leg_settings(base: Settings, run_id: str, leg: str, folder: Path) -> Settings:
    """Return settings with topics, group, keys and data folder of one leg alone."""
    name = f"bench-{run_id}-{leg}"
    return replace(
        base,
        app_id=f"fusionrec-{name}",
        topic_prefix=f"{base.topic_prefix}{name}.",
        redis_key_prefix=f"{base.redis_key_prefix}{name}:",
        data_dir=str(folder / leg),
        web_port=free_port(),
        pseudonym_key=base.pseudonym_key or secrets.token_hex(32),
    )


def user_key(settings: Settings, user_id: str) -> str:
    """Return the Redis key of a user's list, as the worker writes it with user ids."""
    return f"{settings.redis_key_prefix}user:{user_id}"


# -- events -------------------------------------------------------------------------


class EventPool:
    """Encoded events, drawn lazily from a source and kept for every leg to replay."""

    def __init__(self, source: Iterator[Event]) -> None:
        self._source = source
        self.types: list[str] = []
        self.users: list[str] = []
        self.values: list[bytes] = []
        self.items: set[str] = set()

    def ensure(self, count: int) -> int:
        """Encode events until ``count`` exist or the source ends; return how many exist."""
        while len(self.values) < count:
            event = next(self._source, None)
            if event is None:
                break
            self.types.append(event.type)
            self.users.append(event.user_id)
            self.values.append(orjson.dumps(event.to_json()))
            self.items.add(event.item_id)
        return len(self.values)


def synthetic_source(sizes: Sizes, seed: int) -> Iterator[Event]:
    """Return the synthetic events: Zipf items, sessions and a view-click-purchase funnel."""
    from stream.synthetic import generate_events

    # The generator plans sessions for the count it is given and yields lazily,
    # so a generous count costs nothing for events that are never drawn.
    planned = sizes.events + int(sizes.live_s * (sum(sizes.loads) + 500_000)) + 10_000
    return generate_events(planned, sizes.users, sizes.items, seed=seed)


# -- Kafka and Redis I/O ------------------------------------------------------------


@dataclass
class ProduceResult:
    """Counts of one produce run and the send time of each probe."""

    events: int = 0
    probes: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0


async def produce(
    settings: Settings,
    pool: EventPool,
    start: int,
    count: int,
    *,
    rate: float | None,
    probe_every: int,
    probe_tag: str,
    watcher: ProbeWatcher | None = None,
) -> ProduceResult:
    """Produce ``count`` pool events from ``start``, with a probe every ``probe_every`` events.

    With a ``rate`` the sends follow a fixed schedule of that many events per
    second (probes included), so a slow consumer cannot slow the offered load.
    Each probe is handed to ``watcher`` as it is sent.
    """
    topics = {kind: settings.topic(name) for kind, name in EVENT_TOPICS.items()}
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks=1, linger_ms=2, **client_options(settings)
    )
    await producer.start()
    result = ProduceResult()
    sequence = _with_probes(pool, start, count, probe_every, probe_tag)
    total = len(sequence)
    started = time.monotonic()
    try:
        sent = 0
        while sent < total:
            due = due_count(time.monotonic() - started, rate, total)
            while sent < due:
                kind, key, value, probe = sequence[sent]
                if probe is not None:
                    result.probes[probe] = time.time()
                    if watcher is not None:
                        watcher.pending[probe] = result.probes[probe]
                await producer.send(topics[kind], value, key=key)
                sent += 1
            if rate is not None and sent < total:
                await asyncio.sleep(0.002)
        await producer.flush()
    finally:
        await producer.stop()
    result.events = total - len(result.probes)
    result.elapsed_s = time.monotonic() - started
    return result


def _with_probes(
    pool: EventPool, start: int, count: int, probe_every: int, probe_tag: str
) -> list[tuple[str, bytes, bytes, str | None]]:
    sequence: list[tuple[str, bytes, bytes, str | None]] = []
    for index in range(start, start + count):
        value = pool.values[index]
        sequence.append((pool.types[index], pool.users[index].encode(), value, None))
        if (index - start + 1) % probe_every == 0:
            probe_id = f"bench-probe-{probe_tag}-{index}"
            sequence.append(
                (pool.types[index], probe_id.encode(), make_probe(value, probe_id), probe_id)
            )
    return sequence


async def produce_end_probes(settings: Settings, template: bytes, tag: str) -> dict[str, float]:
    """Produce one probe to every partition of every event topic; return their send times.

    Kafka keeps order within a partition, so once every end probe's list
    has landed, every event produced before them has been consumed.
    """
    names = {settings.topic(name): kind for kind, name in EVENT_TOPICS.items()}
    layout = await topic_partitions(settings, list(names))
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks=1, **client_options(settings)
    )
    await producer.start()
    sent: dict[str, float] = {}
    try:
        for topic, partitions in layout.items():
            for partition in partitions:
                probe_id = f"bench-end-{tag}-{topic}-{partition}"
                value = make_probe(template, probe_id, names[topic])
                sent[probe_id] = time.time()
                await producer.send(topic, value, key=probe_id.encode(), partition=partition)
        await producer.flush()
    finally:
        await producer.stop()
    return sent


async def wait_for_leaders(settings: Settings, timeout_s: float = 30.0) -> None:
    """Wait until every partition of the event topics has a leader, so sends do not retry."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **client_options(settings)
    )
    await admin.start()
    names = [settings.topic(name) for name in EVENT_TOPICS.values()]
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            described = await admin.describe_topics(names)
            led = all(
                topic["error_code"] == 0 and all(p["leader"] >= 0 for p in topic["partitions"])
                for topic in described
            )
            if led and len(described) == len(names):
                # The broker reports leaders a moment before every partition
                # accepts writes, so the pause spares producers a retry.
                await asyncio.sleep(1.0)
                return
            if time.monotonic() > deadline:
                msg = f"topics {names} have partitions without a leader after {timeout_s:.0f} s"
                raise BenchError(msg)
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


class ProbeWatcher:
    """Poll Redis for the lists of probe users and record when each first appears."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = redis_client(settings)
        self.pending: dict[str, float] = {}
        # Probe id to (produced at, landed at, computed_at), all in epoch seconds.
        self.landed: dict[str, tuple[float, float, float]] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, probes: dict[str, float]) -> None:
        """Watch these probes, given as probe id to produce time."""
        self.pending.update(probes)

    def start(self) -> None:
        """Start polling in a background task."""
        self._task = asyncio.create_task(self._poll(), name="bench-probe-watcher")

    async def close(self) -> None:
        """Stop polling and close the Redis client."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.aclose()

    async def wait(self, probe_ids: Sequence[str], timeout_s: float) -> bool:
        """Wait until every probe in ``probe_ids`` has landed; return False on timeout."""
        deadline = time.monotonic() + timeout_s
        while any(probe not in self.landed for probe in probe_ids):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(PROBE_POLL_S)
        return True

    async def _poll(self) -> None:
        while True:
            probes = list(self.pending)
            for begin in range(0, len(probes), 1000):
                chunk = probes[begin : begin + 1000]
                values = await self.client.mget([user_key(self.settings, p) for p in chunk])
                now = time.time()
                for probe, raw in zip(chunk, values, strict=True):
                    if raw is None:
                        continue
                    computed_at = orjson.loads(raw)["computed_at"] / 1000
                    self.landed[probe] = (self.pending.pop(probe), now, computed_at)
            await asyncio.sleep(PROBE_POLL_S)


async def user_lists_since(
    settings: Settings, users: Sequence[str], since_s: float
) -> tuple[int, float]:
    """Return how many users lack a list computed since ``since_s``, and the newest computed_at."""
    client = redis_client(settings)
    missing = 0
    newest = 0.0
    try:
        unique = list(dict.fromkeys(users))
        for begin in range(0, len(unique), 1000):
            chunk = unique[begin : begin + 1000]
            for raw in await client.mget([user_key(settings, user) for user in chunk]):
                computed = orjson.loads(raw)["computed_at"] / 1000 if raw is not None else 0.0
                if computed < since_s - 0.001:
                    missing += 1
                newest = max(newest, computed)
    finally:
        await client.aclose()
    return missing, newest


async def delete_run(settings: Settings) -> None:
    """Delete the topics and Redis keys of one leg."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **client_options(settings)
    )
    await admin.start()
    try:
        await admin.delete_topics([settings.topic(name) for name in ALL_TOPICS])
    finally:
        await admin.close()
    client = redis_client(settings)
    try:
        batch: list[Any] = []
        async for key in client.scan_iter(f"{settings.redis_key_prefix}*", count=1000):
            batch.append(key)
            if len(batch) == 1000:
                await client.delete(*batch)
                batch = []
        if batch:
            await client.delete(*batch)
    finally:
        await client.aclose()


# -- leg processes --------------------------------------------------------------


class LegProcess:
    """One leg's child process: start it, learn when it consumes, read its usage, stop it."""

    def __init__(
        self, leg: str, settings: Settings, folder: Path, profile_path: Path | None = None
    ) -> None:
        self.leg = leg
        self.settings = settings
        self.log_path = folder / f"{leg}.log"
        self.profile_path = profile_path
        self._worker: WorkerProcess | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def pid(self) -> int:
        """Process id of the running leg."""
        if self._worker is not None and self._worker.process is not None:
            return self._worker.process.pid
        if self._popen is not None:
            return self._popen.pid
        msg = f"{self.leg} leg was never started"
        raise BenchError(msg)

    async def start(self, timeout_s: float = 120.0) -> float:
        """Start the leg; return a time, in epoch seconds, before which it consumed nothing."""
        if self.leg == "worker":
            return await self._start_worker(timeout_s)
        return await self._start_child(timeout_s)

    async def _start_worker(self, timeout_s: float) -> float:
        self._worker = WorkerProcess(self.settings, self.log_path)
        if self.profile_path is None:
            self._worker.start()
        else:
            self._start_profiled_worker(self._worker, self.profile_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # The worker became ready after this poll was sent, and it consumes
            # nothing before it is ready, so the send time is a safe start.
            asked_at = time.time()
            report = await asyncio.to_thread(self._worker.health)
            if report is not None and report.get("ready"):
                return asked_at
            self._check_alive()
            await asyncio.sleep(HEALTH_POLL_S)
        msg = f"worker not ready after {timeout_s:.0f} s; see {self.log_path}"
        raise BenchError(msg)

    def _start_profiled_worker(self, worker: WorkerProcess, profile_path: Path) -> None:
        # cProfile writes its statistics when the worker exits after SIGTERM.
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "cProfile", "-o", str(profile_path)]
        worker.process = subprocess.Popen(
            [*command, "-m", "stream.cli", "worker"],
            env={**os.environ, **settings_env(self.settings)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    async def _start_child(self, timeout_s: float) -> float:
        ready_file = self.log_path.with_suffix(".ready")
        ready_file.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "stream.cli", "bench", "--child", self.leg]
        self._popen = subprocess.Popen(
            [*command, "--ready-file", str(ready_file)],
            env={**os.environ, **settings_env(self.settings)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready_file.exists():
                return float(ready_file.read_text())
            self._check_alive()
            await asyncio.sleep(HEALTH_POLL_S)
        msg = f"{self.leg} leg not ready after {timeout_s:.0f} s; see {self.log_path}"
        raise BenchError(msg)

    def _check_alive(self) -> None:
        process = self._worker.process if self._worker is not None else self._popen
        if process is not None and process.poll() is not None:
            msg = f"{self.leg} leg exited with code {process.returncode}; see {self.log_path}"
            raise BenchError(msg)

    def metrics_text(self) -> str | None:
        """Return the worker's Prometheus text, None for the other legs."""
        return self._worker.metrics() if self._worker is not None else None

    async def stop(self) -> int:
        """Stop the leg with SIGTERM and return its exit code."""
        if self._worker is not None:
            if self._worker.process is None:
                return 0
            code = await asyncio.to_thread(self._worker.terminate)
            if self._log is not None:
                self._log.close()
            return code
        if self._popen is None:
            return 0
        self._popen.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(self._popen.wait, 60)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            code = await asyncio.to_thread(self._popen.wait, 10)
        if self._log is not None:
            self._log.close()
        return code


def metric_total(text: str, name: str) -> float:
    """Sum every sample of metric ``name`` in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metric_by_label(text: str, name: str) -> dict[str, float]:
    """Return the samples of metric ``name`` by the value of their only label."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            label = line[line.index('"') + 1 : line.rindex('"')]
            out[label] = out.get(label, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


# -- one leg ------------------------------------------------------------------------


async def measure_leg(
    leg: str,
    base: Settings,
    pool: EventPool,
    sizes: Sizes,
    run_id: str,
    folder: Path,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Drain a backlog to measure saturation, then run the fixed loads; return the results.

    With ``profile`` the worker leg runs under cProfile and writes its
    statistics there, which slows it, so its figures are then no benchmark.
    """
    settings = leg_settings(base, run_id, leg, folder)
    profile_path = profile if leg == "worker" else None
    wanted = sizes.naive_events if leg == "naive" else sizes.events
    drain_events = min(wanted, pool.ensure(wanted))
    await create_topics(settings)
    await wait_for_leaders(settings)
    process = LegProcess(leg, settings, folder, profile_path)
    watcher = ProbeWatcher(settings)
    result: dict[str, Any] = {"drain_events": drain_events}
    try:
        logger.info("%s leg: producing a backlog of %d events", leg, drain_events)
        backlog = await produce(
            settings, pool, 0, drain_events, rate=None, probe_every=drain_events + 1, probe_tag=leg
        )
        ends = await produce_end_probes(settings, pool.values[drain_events - 1], leg)
        watcher.add(ends)
        watcher.start()
        started_at = await process.start()
        usage = psutil.Process(process.pid)
        cpu_at_start = cpu_seconds(usage)
        if not await watcher.wait(list(ends), timeout_s=max(120.0, drain_events / 200)):
            msg = f"{leg} leg did not drain {drain_events} events; see {process.log_path}"
            raise BenchError(msg)
        await asyncio.sleep(1.0)
        cpu_used = cpu_seconds(usage) - cpu_at_start
        missing, newest = await user_lists_since(settings, pool.users[:drain_events], started_at)
        finished_at = max(max(watcher.landed[p][1] for p in ends), newest)
        consumed = backlog.events + len(ends)
        saturation = consumed / (finished_at - started_at)
        result.update(
            events_per_s=saturation,
            drain_s=finished_at - started_at,
            cpu_s_per_1000_events=1000 * cpu_used / consumed,
            users_without_list=missing,
        )
        logger.info("%s leg: %.0f events/s at saturation", leg, saturation)
        result["by_load"] = await _fixed_loads(
            leg, settings, pool, sizes, saturation, drain_events, watcher
        )
        result.update(_freshness_summary(result["by_load"], saturation))

        # Probes on every partition again, so the counts below cover every event.
        final = await produce_end_probes(settings, pool.values[0], f"{leg}-final")
        watcher.add(final)
        if not await watcher.wait(list(final), timeout_s=120.0):
            logger.warning("%s leg: the final probes did not land within 120 s", leg)
        result["end_probes"] = len(ends) + len(final)
        result["peak_rss_bytes"] = peak_rss_bytes(process.pid)
        result["rss_bytes_at_end"] = int(usage.memory_info().rss)
        text = process.metrics_text()
        if text is not None:
            result["worker_counts"] = {
                "consumed": metric_total(text, "fusionrec_events_consumed_total"),
                "applied": metric_total(text, "fusionrec_events_applied_total"),
                "dropped": metric_total(text, "fusionrec_events_dropped_total"),
                "dropped_by_reason": metric_by_label(text, "fusionrec_events_dropped_total"),
                "duplicates": metric_total(text, "fusionrec_events_duplicate_total"),
                "rejected": metric_total(text, "fusionrec_messages_rejected_total"),
                "lists_written": metric_total(text, "fusionrec_lists_written_total"),
            }
            # Where the worker's time went over the whole leg, from its own histograms.
            result["worker_seconds"] = {
                part: metric_total(text, f"fusionrec_{part}_seconds_sum")
                for part in ("learn", "refresh", "redis_write", "checkpoint")
            }
    finally:
        await watcher.close()
        result["exit_code"] = await process.stop()
        await delete_run(settings)
    return result


async def _fixed_loads(
    leg: str,
    settings: Settings,
    pool: EventPool,
    sizes: Sizes,
    saturation: float,
    offset: int,
    watcher: ProbeWatcher,
) -> list[dict[str, Any]]:
    below = {float(load) for load in sizes.loads if load < 0.95 * saturation}
    if len(below) < 3:
        # A slow leg still gets a curve: half and four fifths of its saturation.
        below.update(round(share * saturation) for share in (0.5, 0.8))
    if leg != "naive":
        below.add(float(FIXED_LOAD))
    loads = [*sorted(below), saturation]
    runs: list[dict[str, Any]] = []
    for index, rate in enumerate(loads):
        count = max(sizes.probe_every, int(rate * sizes.live_s))
        count = min(count, pool.ensure(offset + count) - offset)
        if count < sizes.probe_every:
            logger.warning("%s leg: the events ran out before the load of %.0f/s", leg, rate)
            break
        tag = f"{leg}-{index}"
        sent = await produce(
            settings,
            pool,
            offset,
            count,
            rate=rate,
            probe_every=sizes.probe_every,
            probe_tag=tag,
            watcher=watcher,
        )
        offset += count
        backlog_s = max(0.0, (sent.events - saturation * sent.elapsed_s) / saturation)
        landed = await watcher.wait(list(sent.probes), timeout_s=60.0 + 3 * backlog_s)
        freshness = [
            watcher.landed[p][1] - watcher.landed[p][0] for p in sent.probes if p in watcher.landed
        ]
        to_land = [
            watcher.landed[p][1] - watcher.landed[p][2] for p in sent.probes if p in watcher.landed
        ]
        runs.append(
            {
                "offered_per_s": rate,
                "produced_per_s": (sent.events + len(sent.probes)) / sent.elapsed_s,
                "at_saturation": index == len(loads) - 1,
                "events": sent.events,
                "probes": len(sent.probes),
                "probes_landed": len(freshness),
                "freshness_s": percentiles(freshness),
                "computed_to_found_s": percentiles(to_land),
            }
        )
        logger.info(
            "%s leg: offered %.0f/s, freshness p99 %s s%s",
            leg,
            rate,
            runs[-1]["freshness_s"]["p99"],
            "" if landed else " (some probes never landed)",
        )
        await asyncio.sleep(0.5)
    return runs


def _freshness_summary(runs: list[dict[str, Any]], saturation: float) -> dict[str, Any]:
    empty = percentiles([])
    at_fixed = next((r for r in runs if r["offered_per_s"] == FIXED_LOAD), None)
    at_saturation = next((r for r in runs if r["at_saturation"]), None)
    summary: dict[str, Any] = {
        "freshness_s": at_saturation["freshness_s"] if at_saturation else empty,
        "freshness_at_5000_s": at_fixed["freshness_s"] if at_fixed else empty,
    }
    if at_fixed is None:
        summary["freshness_at_5000_note"] = (
            f"not measured: the saturation throughput ({saturation:.0f} events/s) is below "
            f"{FIXED_LOAD} events/s, so the backlog and freshness grow without bound"
        )
    return summary


# -- child processes of the ceiling and naive legs ----------------------------------------


async def _child_main(kind: str, ready_file: Path) -> None:
    settings = Settings.from_env()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    names = [settings.topic(name) for name in EVENT_TOPICS.values()]
    layout = await topic_partitions(settings, names)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        **client_options(settings),
    )
    await consumer.start()

    sink = RedisSink(settings, WorkerMetrics())
    sink_task = asyncio.create_task(sink.run())
    handler = _CeilingHandler(settings) if kind == "ceiling" else _NaiveHandler(settings)
    try:
        partitions = [TopicPartition(t, p) for t, parts in layout.items() for p in parts]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ready_file.write_text(repr(time.time()))

        wait_ms = settings.event_batch_wait_ms
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=wait_ms, max_records=settings.event_batch)
            values = [record.value for records in batches.values() for record in records]
            if values:
                for key, payload in handler.handle(values):
                    sink.put(key, payload)
            await asyncio.sleep(0)
    finally:
        await sink.close(timeout_s=10.0)
        await asyncio.gather(sink_task, return_exceptions=True)
        await consumer.stop()


class _CeilingHandler:
    """Decode each event and build a list of ``k`` entries for each touched user, no models."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.recent: dict[str, None] = {}

    def handle(self, values: list[bytes]) -> list[tuple[str, bytes]]:
        touched: dict[str, None] = {}
        for value in values:
            obj = orjson.loads(value)
            touched[obj["user_id"]] = None
            self.recent[obj["item_id"]] = None
        while len(self.recent) > self.settings.k:
            del self.recent[next(iter(self.recent))]
        entries = [
            RecommendedItem(item, 1.0 / (rank + 1), ("popular",))
            for rank, item in enumerate(self.recent)
        ]
        computed_at = int(time.time() * 1000)
        return [
            (
                user_key(self.settings, user),
                RecommendationList(entries, computed_at, "bench").to_json(),
            )
            for user in touched
        ]


class _NaiveHandler:
    """River's BiasedMF learning each event and ranking the most popular items for its user."""

    def __init__(self, settings: Settings) -> None:
        from river import optim, reco

        self.settings = settings
        # River ships without type information.
        self.model: Any = reco.BiasedMF(
            n_factors=32,
            bias_optimizer=optim.SGD(0.025),
            latent_optimizer=optim.SGD(0.05),
            l2_latent=0.01,
            seed=settings.seed,
        )
        self.counts: Counter[str] = Counter()
        self.candidates: set[str] = set()
        self.seen = 0

    def handle(self, values: list[bytes]) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for value in values:
            obj = orjson.loads(value)
            user, item = obj["user_id"], obj["item_id"]
            self.model.learn_one(user, item, TYPE_WEIGHTS.get(obj["type"], 1.0))
            self.counts[item] += 1
            self.seen += 1
            # Recounting the leaders after every 1,000 events, not after each
            # one, is already kinder to this baseline than a newcomer's code.
            if self.seen % 1000 == 1:
                self.candidates = {name for name, _ in self.counts.most_common(NAIVE_CANDIDATES)}
            ranked = self.model.rank(user, self.candidates)[: self.settings.k]
            entries = [
                RecommendedItem(str(name), float(self.settings.k - rank), ("mf",))
                for rank, name in enumerate(ranked)
            ]
            computed_at = int(time.time() * 1000)
            value = RecommendationList(entries, computed_at, "bench-naive").to_json()
            out.append((user_key(self.settings, user), value))
        return out


# -- the in-process phase: refresh cost and model state ---------------------------------


def _rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


def _catalog_events(
    rng: np.random.Generator, n_users: int, first: int, count: int, next_item: int, clock: list[int]
) -> tuple[list[Event], int]:
    """Return ``count`` events where about 70% bring a new item; the rest skew to old items."""
    kinds = rng.choice(3, size=count, p=(0.75, 0.2, 0.05))
    new_item = rng.random(count) < 0.7
    skew = rng.random(count) ** 3
    users = rng.integers(0, n_users, size=count)
    events: list[Event] = []
    for index in range(count):
        if new_item[index] or next_item == 0:
            item = next_item
            next_item += 1
        else:
            item = int(skew[index] * next_item)
        clock[0] += 50
        kind = ("view", "click", "purchase")[int(kinds[index])]
        events.append(
            Event(
                f"cat-{first + index}",
                kind,
                f"u{int(users[index])}",
                f"i{item}",
                clock[0],
                category=f"c{item % 500}",
                price=10.0 if kind != "view" else None,
                quantity=1 if kind == "purchase" else None,
            )
        )
    return events, next_item


def _state_config(k: int, seed: int) -> Any:
    """Return the default configuration without test-then-train fusion learning.

    That learning scores the candidates of one event in four, which would
    dominate building a catalog of a million items, and it keeps no state per
    user or per item. Without it, lists come in the fixed-weight order that
    learned fusion uses until it has seen enough hits.
    """
    from models.engine import EngineConfig

    return EngineConfig(k=k, seed=seed, fusion_learn_every=0)


def measure_refresh_cost(sizes: Sizes, seed: int, k: int) -> dict[str, Any]:
    """Time ``recommend`` as the catalog grows to each of ``sizes.catalog_sizes`` items."""
    from models.engine import Recommender

    engine = Recommender(_state_config(k, seed))
    rng = np.random.default_rng(seed)
    n_users = 20_000
    clock = [1_735_689_600_000]
    next_item = 0
    learned = 0
    results: dict[str, Any] = {}
    rss_at: dict[int, int] = {}
    stats_at: dict[int, dict[str, int]] = {}
    learn_s = 0.0
    for target in sorted(sizes.catalog_sizes):
        while next_item < target:
            events, next_item = _catalog_events(rng, n_users, learned, 2000, next_item, clock)
            started = time.perf_counter()
            engine.learn(events)
            learn_s += time.perf_counter() - started
            learned += len(events)
        rss_at[target] = _rss()
        stats_at[target] = dict(engine.stats()["bytes"])
        results[str(target)] = _time_refresh(engine, rng, n_users, k)
        results[str(target)]["events_learned"] = learned
        results[str(target)]["items"] = int(engine.stats()["n_items"])
        logger.info(
            "catalog %d: refresh p99 %.2f ms", target, results[str(target)]["single_ms"]["p99"]
        )
    ordered = sorted(rss_at)
    growth: dict[str, Any] = {"learn_events_per_s": learned / learn_s if learn_s else None}
    if len(ordered) >= 2:
        first, last = ordered[0], ordered[-1]
        added = last - first
        growth["bytes_per_item"] = (rss_at[last] - rss_at[first]) / added
        growth["model_bytes_per_item"] = {
            name: (stats_at[last][name] - stats_at[first].get(name, 0)) / added
            for name in stats_at[last]
        }
        growth["method"] = (
            f"RSS growth from {first} to {last} items divided by the items added; the "
            "events that brought the items (about 1.4 per item) are included"
        )
    return {"by_catalog_size": results, "item_growth": growth}


def _time_refresh(engine: Any, rng: np.random.Generator, n_users: int, k: int) -> dict[str, Any]:
    known = [f"u{int(u)}" for u in rng.choice(n_users, size=600, replace=False)]
    users = [user for user in known if engine.has_user(user)][:300]
    # The first call after learning fills what the models keep between calls,
    # such as the leading items of each category; it is reported apart.
    started = time.perf_counter()
    engine.recommend(users[:1], k)
    first_ms = (time.perf_counter() - started) * 1000
    single: list[float] = []
    for user in users:
        started = time.perf_counter()
        engine.recommend([user], k)
        single.append((time.perf_counter() - started) * 1000)
    per_list: list[float] = []
    for begin in range(0, len(users), 100):
        chunk = users[begin : begin + 100]
        started = time.perf_counter()
        engine.recommend(chunk, k)
        per_list.append((time.perf_counter() - started) * 1000 / len(chunk))
    return {
        "users_timed": len(users),
        "single_ms": percentiles(single),
        "batch_ms_per_list": percentiles(per_list),
        "first_call_ms": first_ms,
        "mf_recall_at_20": _mf_recall(engine, users[:100]),
        "mf_index": _mf_index(engine),
    }


def _mf_index(engine: Any) -> dict[str, Any] | None:
    """Describe the MF model's item index, or None when it scans the whole catalog."""
    index = getattr(engine.models.get("mf"), "_index", None)
    if index is None:
        return None
    return {
        "items": index.built_items,
        "cells": index.n_cells,
        "scan_items": index.scan_items,
        "build_s": index.build_seconds,
    }


def _mf_recall(engine: Any, users: Sequence[str]) -> float | None:
    """Return the recall@20 of the MF model's candidates against an exact dot-product scan.

    None when the MF model offers no ``item_factors`` and ``user_vector`` to scan with.
    """
    model = engine.models.get("mf")
    if model is None or not hasattr(model, "item_factors") or not hasattr(model, "user_vector"):
        return None
    table = model.item_factors()
    hits = 0
    total = 0
    for user in users:
        vector = model.user_vector(user)
        if vector is None or len(table) <= 20:
            continue
        scores = table @ vector
        exact = set(np.argpartition(-scores, 19)[:20].tolist())
        found = set(np.asarray(model.candidates(user, 20)).tolist())
        hits += len(exact & found)
        total += 20
    return hits / total if total else None


def _user_events(
    rng: np.random.Generator,
    first_user: int,
    n_users: int,
    per_user: int,
    n_items: int,
    clock: list[int],
) -> list[Event]:
    """Return ``per_user`` events for each new user, in sessions, on Zipf-skewed items."""
    count = n_users * per_user
    items = np.minimum((rng.pareto(1.05, size=count) * 10).astype(np.int64), n_items - 1)
    kinds = rng.choice(3, size=count, p=(0.75, 0.2, 0.05))
    events: list[Event] = []
    for index in range(count):
        user = first_user + index // per_user
        clock[0] += 5
        kind = ("view", "click", "purchase")[int(kinds[index])]
        item = int(items[index])
        events.append(
            Event(
                f"mem-{user}-{index % per_user}",
                kind,
                f"m{user}",
                f"i{item}",
                clock[0],
                category=f"c{item % 500}",
                price=10.0 if kind != "view" else None,
                quantity=1 if kind == "purchase" else None,
            )
        )
    return events


def measure_user_memory(sizes: Sizes, seed: int, k: int) -> dict[str, Any]:
    """Measure RSS growth of the whole engine as users are added, up to the largest count."""
    from models.engine import Recommender

    engine = Recommender(_state_config(k, seed))
    rng = np.random.default_rng(seed + 1)
    clock = [1_735_689_600_000]
    n_items = sizes.items
    warm = [
        Event(f"warm-{i}", "view", f"w{i % 1000}", f"i{i}", clock[0] + i, category=f"c{i % 500}")
        for i in range(n_items)
    ]
    for begin in range(0, len(warm), 2000):
        engine.learn(warm[begin : begin + 2000])
    clock[0] += n_items
    del warm
    rss_before = _rss()
    stats_before = dict(engine.stats()["bytes"])
    users_before = int(engine.stats()["n_users"])
    added = 0
    by_count: dict[str, Any] = {}
    for target in sorted(sizes.memory_users):
        while added < target:
            chunk = min(2000 // sizes.memory_events_per_user or 1, target - added)
            engine.learn(
                _user_events(rng, added, chunk, sizes.memory_events_per_user, n_items, clock)
            )
            added += chunk
        grown = _rss() - rss_before
        stats = engine.stats()
        users = int(stats["n_users"]) - users_before
        by_count[str(target)] = {
            "users_added": users,
            "bytes_per_user": grown / users,
            "model_bytes_per_user": {
                name: (value - stats_before.get(name, 0)) / users
                for name, value in stats["bytes"].items()
            },
        }
        logger.info("%d users: %.0f bytes per user", users, grown / users)
    return {
        "method": (
            f"RSS growth (psutil, after gc.collect) of a process holding only the engine, "
            f"from a warm catalog of {n_items} items to each user count, divided by the users "
            f"added; each new user brings {sizes.memory_events_per_user} events. Per-model "
            "shares are each model's own state_bytes() estimate."
        ),
        "by_users": by_count,
    }


def measure_naive_memory(sizes: Sizes, seed: int) -> dict[str, Any]:
    """Measure the RSS growth per user of River's BiasedMF with 32 factors."""
    from river import reco

    model: Any = reco.BiasedMF(n_factors=32, seed=seed)
    rng = np.random.default_rng(seed + 2)
    clock = [0]
    for i in range(sizes.items):
        model.learn_one(f"w{i % 1000}", f"i{i}", 1.0)
    rss_before = _rss()
    added = 0
    while added < sizes.naive_memory_users:
        chunk = min(1000, sizes.naive_memory_users - added)
        for event in _user_events(
            rng, added, chunk, sizes.memory_events_per_user, sizes.items, clock
        ):
            model.learn_one(event.user_id, event.item_id, TYPE_WEIGHTS[event.type])
        added += chunk
    return {"users_added": added, "bytes_per_user": (_rss() - rss_before) / added}


_PROFILED = frozenset(
    {
        "process_events",
        "decode_event",
        "learn",
        "refresh",
        "recommend",
        "candidate_scores",
        "candidates",
        "score",
        "top_rows",
        "to_json",
    }
)


def profile_processor(events: Sequence[Event], settings: Settings) -> dict[str, Any]:
    """Run the worker's `Processor` on ``events`` without Kafka or Redis, then under cProfile.

    Each batch of ``event_batch`` events is processed and its dirty users
    refreshed at once, as a worker without backlog does. The first pass is
    timed without the profiler; the second gives the breakdown by function.
    """
    import cProfile
    import pstats

    from stream.privacy import Pseudonymizer
    from stream.processor import Message, Processor

    offsets: Counter[str] = Counter()
    messages: list[Message] = []
    for event in events:
        topic = settings.topic(EVENT_TOPICS[event.type])
        value = orjson.dumps(event.to_json())
        messages.append(Message(topic, 0, offsets[topic], event.user_id.encode(), value))
        offsets[topic] += 1
    key = bytes.fromhex(settings.pseudonym_key) if settings.pseudonym_key else bytes(32)

    def one_pass() -> tuple[float, float, int]:
        processor = Processor(settings, Pseudonymizer(key), WorkerMetrics())
        learn_s = refresh_s = 0.0
        lists = 0
        for begin in range(0, len(messages), settings.event_batch):
            started = time.perf_counter()
            outcome = processor.process_events(messages[begin : begin + settings.event_batch])
            learned = time.perf_counter()
            lists += len(processor.refresh(outcome.dirty))
            learn_s += learned - started
            refresh_s += time.perf_counter() - learned
        return learn_s, refresh_s, lists

    learn_s, refresh_s, lists = one_pass()
    profiler = cProfile.Profile()
    profiler.enable()
    one_pass()
    profiler.disable()
    stats = pstats.Stats(profiler)
    per_1000 = 1000 / len(messages)
    root = str(Path(__file__).resolve().parent.parent) + os.sep
    components: dict[str, float] = {}
    by_own_time: list[tuple[float, str]] = []
    for (filename, _, function), row in stats.stats.items():  # type: ignore[attr-defined]
        own_s, cumulative_s = row[2], row[3]
        name = f"{filename.removeprefix(root)}:{function}"
        by_own_time.append((own_s, name))
        if filename.startswith(root) and function in _PROFILED:
            components[name] = components.get(name, 0.0) + cumulative_s * per_1000
    profiled_s = sum(own for own, _ in by_own_time)
    top = sorted(by_own_time, reverse=True)[:15]
    return {
        "events": len(messages),
        "events_per_s": len(messages) / (learn_s + refresh_s),
        "learn_s_per_1000_events": learn_s * per_1000,
        "refresh_s_per_1000_events": refresh_s * per_1000,
        "lists_per_1000_events": lists * per_1000,
        "refresh_ms_per_list": 1000 * refresh_s / lists if lists else None,
        "profiled_cumulative_s_per_1000_events": dict(
            sorted(components.items(), key=lambda item: -item[1])
        ),
        "top_own_time_share": {name: own / profiled_s for own, name in top},
    }


def _models_child(args: argparse.Namespace) -> int:
    sizes = sizes_from_args(args)
    settings = Settings.from_env()
    result: Any
    if args.phase == "processor":
        source, _ = _source(args, sizes)
        count = min(sizes.events, PROFILE_EVENTS)
        events = [event for _, event in zip(range(count), source, strict=False)]
        result = profile_processor(events, settings)
    elif args.phase == "refresh":
        result = measure_refresh_cost(sizes, args.seed, settings.k)
    elif args.phase == "memory":
        result = measure_user_memory(sizes, args.seed, settings.k)
    else:
        result = measure_naive_memory(sizes, args.seed)
    args.result_file.write_bytes(orjson.dumps(result))
    return 0


def _child_args(args: argparse.Namespace) -> list[str]:
    out = ["--seed", str(args.seed)]
    if args.quick:
        out.append("--quick")
    if args.replay is not None:
        out.extend(["--replay", str(args.replay), "--format", args.fmt])
    options = {
        "--events": args.events,
        "--users": args.users,
        "--items": args.items,
        "--catalog-sizes": args.catalog_sizes,
        "--memory-users": args.memory_users,
        "--memory-events-per-user": args.memory_events_per_user,
        "--naive-memory-users": args.naive_memory_users,
    }
    for name, value in options.items():
        if value is None:
            continue
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        out.extend([name, text])
    return out


async def run_models_child(args: argparse.Namespace, folder: Path, phase: str) -> Any:
    """Run one in-process phase in a fresh child process and return its results."""
    result_file = folder / f"{phase}.json"
    log_path = folder / f"{phase}.log"
    command = [sys.executable, "-m", "stream.cli", "bench", "--child", "models", "--phase", phase]
    with open(log_path, "ab") as log:
        process = await asyncio.create_subprocess_exec(
            *command,
            *_child_args(args),
            "--result-file",
            str(result_file),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        code = await process.wait()
    if code != 0:
        msg = f"the in-process phase {phase} failed with exit code {code}; see {log_path}"
        raise BenchError(msg)
    return orjson.loads(result_file.read_bytes())


# -- the whole run ------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Return the cores, memory, CPU model and package versions of this machine."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": int(psutil.virtual_memory().total),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "packages": versions,
        "kafka_version": os.environ.get("FUSIONREC_KAFKA_VERSION"),
        "git": _git_state(),
    }


def _git_state() -> dict[str, Any] | None:
    """Return the commit of the working tree and the files changed since, None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "changed_files": [line[3:] for line in status.splitlines()]}


async def _redis_version(settings: Settings) -> str | None:
    client = redis_client(settings)
    try:
        info = await client.info("server")
        return str(info.get("redis_version"))
    finally:
        await client.aclose()


def _source(args: argparse.Namespace, sizes: Sizes) -> tuple[Iterator[Event], str]:
    if args.replay is None:
        return synthetic_source(sizes, args.seed), "synthetic"
    loaded = read_events(args.replay, args.fmt)
    logger.info("read %d events from %s", len(loaded.events), args.replay)
    return iter(loaded.events), f"{args.replay} ({args.fmt})"


async def _bench(
    args: argparse.Namespace, sizes: Sizes, folder: Path, source: Iterator[Event], label: str
) -> dict[str, Any]:
    base = Settings.from_env()
    legs = legs_of(args)

    pool = EventPool(source)
    if pool.ensure(sizes.events) < sizes.events:
        logger.warning(
            "the source has only %d events; expected %d for the drain",
            len(pool.values),
            sizes.events,
        )

    run_id = f"{int(time.time())}-{secrets.token_hex(2)}"
    machine = machine_info()
    machine["redis_version"] = await _redis_version(base)
    result: dict[str, Any] = {
        "command": " ".join(["fusionrec", "bench", *sys.argv[2:]]),
        "machine": machine,
        "sizes": {name: getattr(sizes, name) for name in Sizes.__dataclass_fields__},
        "probe_poll_s": PROBE_POLL_S,
    }
    for leg in legs:
        profile = args.profile_worker
        result[leg] = await measure_leg(leg, base, pool, sizes, run_id, folder, profile)

    result["events"] = {
        "source": label,
        "drawn": len(pool.values),
        "drain_users": len(set(pool.users[: sizes.events])),
        "users_seen": len(set(pool.users)),
        "items_seen": len(pool.items),
        "naive_subset": min(sizes.naive_events, len(pool.values)),
    }
    if not args.no_models:
        logger.info("in-process phase: refresh cost and model state")
        for phase in MODEL_PHASES:
            result[phase] = await run_models_child(args, folder, phase)
    _add_summary(result)
    return result


def _add_summary(result: dict[str, Any]) -> None:
    """Fill the required top-level keys and the ratios the targets compare."""
    refresh = result.get("refresh", {}).get("by_catalog_size", {})
    keys = {str(size) for size in STANDARD_CATALOG_SIZES} | set(refresh)
    result["refresh_ms_p99"] = {
        key: refresh[key]["single_ms"]["p99"] if key in refresh else None
        for key in sorted(keys, key=int)
    }
    memory = result.get("memory", {}).get("by_users", {})
    largest = max(memory, key=int) if memory else None
    worker = result.get("worker")
    if worker is not None:
        worker["bytes_per_user"] = memory[largest]["bytes_per_user"] if largest else None
        worker["bytes_per_user_at"] = int(largest) if largest else None
        growth = result.get("refresh", {}).get("item_growth", {})
        worker["bytes_per_item"] = growth.get("bytes_per_item")
    naive = result.get("naive")
    if naive is not None and "naive_memory" in result:
        naive["bytes_per_user"] = result["naive_memory"]["bytes_per_user"]
    ratios: dict[str, float | None] = {}
    ceiling = result.get("ceiling")
    if worker and ceiling:
        ratios["worker_over_ceiling"] = worker["events_per_s"] / ceiling["events_per_s"]
    if worker and naive:
        ratios["worker_over_naive"] = worker["events_per_s"] / naive["events_per_s"]
    result["ratios"] = ratios


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_text(result: dict[str, Any]) -> str:
    """Render the results as plain-text tables."""
    lines = ["leg       events/s  cpu s/1000  peak RSS MB  fresh p50/p95/p99 @5000 (s)  @sat (s)"]
    for leg in LEGS:
        data = result.get(leg)
        if data is None:
            continue
        at_fixed = data["freshness_at_5000_s"]
        at_sat = data["freshness_s"]
        rss = data.get("peak_rss_bytes")
        lines.append(
            f"{leg:<9} {data['events_per_s']:>8.0f}  {data['cpu_s_per_1000_events']:>10.3f}  "
            f"{(rss or 0) / 1e6:>11.0f}  "
            f"{_fmt(at_fixed['p50'])}/{_fmt(at_fixed['p95'])}/{_fmt(at_fixed['p99'])}  "
            f"{_fmt(at_sat['p50'])}/{_fmt(at_sat['p95'])}/{_fmt(at_sat['p99'])}"
        )
    lines.append("")
    lines.append(
        "refresh p99 (ms) by catalog size: "
        + ", ".join(f"{size}: {_fmt(value, 2)}" for size, value in result["refresh_ms_p99"].items())
    )
    for name, value in result.get("ratios", {}).items():
        lines.append(f"{name}: {_fmt(value, 2)}")
    memory = result.get("memory", {}).get("by_users", {})
    for count, data in memory.items():
        lines.append(f"bytes per user at {count} users: {data['bytes_per_user']:.0f}")
    return "\n".join(lines)


def write_plot(result: dict[str, Any], path: Path) -> None:
    """Plot freshness p50 and p99 against the produced load for each leg that has runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    colors = {"ceiling": "tab:blue", "worker": "tab:red", "naive": "tab:gray"}
    for leg in LEGS:
        runs = result.get(leg, {}).get("by_load", [])
        points = sorted(
            (r for r in runs if r["freshness_s"]["p99"] is not None),
            key=lambda r: r["produced_per_s"],
        )
        if not points:
            continue
        loads = [r["produced_per_s"] for r in points]
        for name, style in (("p50", "o--"), ("p99", "s-")):
            values = [r["freshness_s"][name] for r in points]
            axis.plot(loads, values, style, color=colors[leg], label=f"{leg} {name}")
        for run in (r for r in points if r["at_saturation"]):
            axis.plot(
                [run["produced_per_s"]] * 2,
                [run["freshness_s"]["p50"], run["freshness_s"]["p99"]],
                "*",
                color=colors[leg],
                markersize=14,
            )
    axis.axhline(1.0, color="black", linewidth=0.8, linestyle=":", label="1 s")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("produced load (events/s)")
    axis.set_ylabel("freshness: produce to list in Redis (s)")
    # The worker's run at 5,000 events/s lies beyond its saturation
    # throughput, so a leg's saturation run is not always its last point.
    axis.set_title("Freshness against produced load (stars: each leg at saturation)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
    finally:
        plt.close(figure)


def run(args: argparse.Namespace) -> int:
    """Run ``fusionrec bench`` and return the exit code.

    The code is 0 on success, 1 when a step of the run failed, and 2 on bad
    options or an output file that cannot be written.
    """
    if args.child in ("ceiling", "naive"):
        asyncio.run(_child_main(args.child, args.ready_file))
        return 0
    if args.child == "models":
        return _models_child(args)
    try:
        sizes = sizes_from_args(args)
    except BenchError as exc:
        print(f"fusionrec bench: {exc}", file=sys.stderr)
        return 2

    # The options are checked before a run of many minutes, not after it.
    problem = _input_problem(args) or _output_problem(args)
    if problem is not None:
        print(f"fusionrec bench: {problem}", file=sys.stderr)
        return 2
    # A file that cannot be read stops the command before it contacts Kafka or Redis.
    try:
        source, label = _source(args, sizes)
    except (SourceError, OSError, UnicodeDecodeError) as exc:
        print(f"fusionrec bench: cannot read {printable(str(args.replay))}: {exc}", file=sys.stderr)
        return 2

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fusionrec-bench-") as folder:
        try:
            result = asyncio.run(_bench(args, sizes, Path(folder), source, label))
        except BenchError as exc:
            print(f"fusionrec bench: {exc}", file=sys.stderr)
            _keep_logs(Path(folder))
            return 1
    result["elapsed_s"] = time.monotonic() - started

    # The results go to stdout before the files, so that a file that cannot
    # be written after all does not lose them.
    encoded = orjson.dumps(result, option=orjson.OPT_INDENT_2)
    if args.json:
        sys.stdout.buffer.write(encoded + b"\n")
    else:
        print(format_text(result))
    sys.stdout.flush()
    code = 0
    if args.output is not None:
        try:
            args.output.write_bytes(encoded + b"\n")
        except OSError as exc:
            _report_unwritten("--output", args.output, exc)
            code = 2
    if args.plot is not None:
        try:
            write_plot(result, args.plot)
        except OSError as exc:
            _report_unwritten("--plot", args.plot, exc)
            code = 2
    return code


def legs_of(args: argparse.Namespace) -> list[str]:
    """Return the legs that ``--legs`` names.

    Raises
    ------
    BenchError
        If a name is not one of `LEGS`.

    """
    legs = [leg.strip() for leg in args.legs.split(",") if leg.strip()]
    unknown = sorted(set(legs) - set(LEGS))
    if unknown:
        msg = f"--legs names unknown legs {unknown}; expected some of {', '.join(LEGS)}"
        raise BenchError(msg)
    return legs


def _input_problem(args: argparse.Namespace) -> str | None:
    """Return why --legs or --replay cannot be used, or None."""
    try:
        legs_of(args)
    except BenchError as exc:
        return str(exc)
    replay = args.replay
    if replay is not None and Path(replay).exists() and not Path(replay).is_file():
        # The in-process phase reads the file again in a child process, and
        # a pipe gives its events only once.
        return (
            f"--replay {printable(str(replay))} is not a regular file; the bench reads it "
            "twice, so write the events to a file first"
        )
    return None


def _output_problem(args: argparse.Namespace) -> str | None:
    """Return why --output, --plot or --profile-worker cannot be written, or None."""
    if args.plot is not None:
        # write_plot creates the plot's folder, so the check creates it first.
        try:
            args.plot.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            return f"--plot {args.plot}: cannot create the folder {args.plot.parent} ({reason})"
    targets = (
        ("--output", args.output),
        ("--plot", args.plot),
        ("--profile-worker", args.profile_worker),
    )
    for option, target in targets:
        problem = None if target is None else output_problem(option, target)
        if problem is not None:
            return problem
    return None


def _report_unwritten(option: str, path: Path, exc: OSError) -> None:
    reason = exc.strerror or type(exc).__name__
    print(
        f"fusionrec bench: cannot write {option} {path} ({reason}); the results were"
        " printed to stdout",
        file=sys.stderr,
    )


def _keep_logs(folder: Path) -> None:
    kept = Path(tempfile.mkdtemp(prefix="fusionrec-bench-logs-"))
    for log in folder.glob("*.log"):
        (kept / log.name).write_bytes(log.read_bytes())
    print(f"fusionrec bench: logs of the failed run kept in {kept}", file=sys.stderr)
