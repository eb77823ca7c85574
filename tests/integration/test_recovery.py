"""Crash safety on the real broker: SIGKILL, SIGTERM, corrupt checkpoints, duplicates."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from schemas import Event
from stream.checkpoint import CheckpointStore
from stream.privacy import Pseudonymizer
from stream.runner import WorkerProcess, free_port, settings_env, wait_for_lists
from stream.sources import read_events
from stream.topics import EVENT_TOPICS, FORGET_TOPIC, ITEMS_TOPIC

from kafka_io import committed_offsets, produce_events
from shared_data import TAOBAO_SLICE, shared_file


def _store(settings) -> CheckpointStore:
    key = Pseudonymizer(bytes.fromhex(settings.pseudonym_key)).derive_key("checkpoint")
    return CheckpointStore(Path(settings.data_dir) / "checkpoints", key)


def _final_state(settings) -> dict:
    restored = _store(settings).restore()
    assert restored is not None, "no checkpoint was written"
    return restored[0]


def _replay(
    settings, path: Path, fmt: str, rate: int | None = None, limit: int | None = None
) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "stream.cli",
        "replay",
        str(path),
        "--format",
        fmt,
        "--no-progress",
    ]
    if rate:
        command += ["--rate", str(rate)]
    if limit:
        command += ["--limit", str(limit)]
    env = {**os.environ, **settings_env(settings)}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)


def _applied(worker: WorkerProcess) -> float:
    """Return how many events the worker process applied since it started."""
    text = worker.metrics()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("fusionrec_events_applied_total{")
    )


def _wait_applied(worker: WorkerProcess, expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        applied = _applied(worker)
        if applied >= expected:
            return
        assert time.monotonic() < deadline, f"{applied} of {expected} events applied"
        time.sleep(0.5)


def _wait_checkpointed(settings, applied: int, timeout_s: float) -> None:
    """Wait until the newest checkpoint of ``settings`` counts ``applied`` events."""
    deadline = time.monotonic() + timeout_s
    while True:
        restored = _store(settings).restore()
        counted = restored[0]["counts"].get("applied", 0) if restored else None
        if counted == applied:
            return
        assert time.monotonic() < deadline, f"newest checkpoint counts {counted} of {applied}"
        time.sleep(0.5)


def _events_file() -> tuple[Path, str]:
    # A time-sorted slice of live traffic: its first events span minutes, well
    # inside the de-duplication window, so the second replay is all duplicates.
    # NOTE: on a generated stream (stream.synthetic, 20,000 events of 2,000
    # users) the lists overlapped by 0.88 once, under the 0.9 asserted here for
    # the real slice, so the test skips without it. The cause is not known yet.
    return shared_file(TAOBAO_SLICE), "taobao"


def _overlap(first: list[str], second: list[str]) -> float:
    if not first and not second:
        return 1.0
    return len(set(first) & set(second)) / max(len(first), len(second))


def test_sigkill_three_times_loses_nothing(run_settings, tmp_path):
    # The first events of the real file, sent at a fixed rate so that every
    # kill lands while events arrive.
    path, fmt = _events_file()
    limit, rate = 12_000, 250
    events = read_events(path, fmt).events[:limit]
    expected = Counter(event.type for event in {e.event_id: e for e in events}.values())
    settings = replace(run_settings, checkpoint_interval_s=3.0)
    rng = random.Random(20261204)

    # The uninterrupted run consumes the same replay at the same time, in a
    # consumer group of its own, so that both runs see the events arrive alike
    # and differ only by the kills.
    reference_settings = replace(
        settings,
        app_id=settings.app_id + "-reference",
        data_dir=str(tmp_path / "reference"),
        redis_key_prefix=settings.redis_key_prefix + "ref:",
        web_port=free_port(),
    )
    reference = WorkerProcess(reference_settings, tmp_path / "reference.log").start()
    reference.wait_ready()

    replay = _replay(settings, path, fmt, rate=rate, limit=limit)
    for number in range(3):
        worker = WorkerProcess(settings, tmp_path / f"worker-{number}.log").start()
        worker.wait_ready()
        time.sleep(rng.uniform(2.0, 7.0))
        assert replay.poll() is None, "the replay ended before every kill"
        worker.kill()
    assert replay.wait(300) == 0

    # The last run consumes the rest of the file, then the same file again.
    final = WorkerProcess(settings, tmp_path / "worker-final.log").start()
    final.wait_ready()
    second = _replay(settings, path, fmt, limit=limit)
    assert second.wait(300) == 0
    deadline = time.monotonic() + 300
    while True:
        state_counts = final.health()
        text = final.metrics()
        if "fusionrec_events_duplicate_total" in text:
            duplicates = next(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("fusionrec_events_duplicate_total ")
            )
            if duplicates >= len(events):
                break
        assert time.monotonic() < deadline, f"second replay not de-duplicated: {state_counts}"
        time.sleep(1.0)
    assert final.terminate() == 0
    state = _final_state(settings)

    counts = state["counts"]
    for event_type, count in expected.items():
        assert counts.get(f"applied:{event_type}", 0) == count, event_type
    assert counts["applied"] == sum(expected.values())

    _wait_applied(reference, sum(expected.values()), 240)
    assert reference.terminate() == 0
    reference_state = _final_state(reference_settings)
    assert reference_state["counts"]["applied"] == counts["applied"]

    engine, reference_engine = state["engine"], reference_state["engine"]
    pseudonymize = Pseudonymizer(bytes.fromhex(settings.pseudonym_key))
    users = sorted({pseudonymize(e.user_id) for e in events})
    # A user's views, clicks and purchases arrive on three topics, and Kafka
    # orders them only within a topic, so histories compare as multisets.
    for user in users:
        assert Counter(engine.user_history(user)) == Counter(reference_engine.user_history(user))

    # Lists of a fixed sample of users, to keep the comparison quick.
    users = random.Random(7).sample(users, min(500, len(users)))
    lists = engine.recommend(users, settings.k)
    reference_lists = reference_engine.recommend(users, settings.k)
    overlaps = [
        _overlap([e.item_id for e in mine], [e.item_id for e in theirs])
        for mine, theirs in zip(lists, reference_lists, strict=True)
    ]
    mean_overlap = sum(overlaps) / len(overlaps)
    print(f"mean top-{settings.k} overlap with the uninterrupted run: {mean_overlap:.4f}")
    assert mean_overlap >= 0.9


def test_sigterm_checkpoints_and_exits_zero(run_settings, tmp_path):
    now = int(time.time() * 1000) - 60_000
    events = [
        Event(f"t-{n}", "view", f"user-{n % 20}", f"item-{n % 30}", now + n) for n in range(500)
    ]
    with WorkerProcess(run_settings, tmp_path / "first.log") as worker:
        worker.wait_ready()
        asyncio.run(produce_events(run_settings, events))
        _wait_applied(worker, len(events), 60)
        assert worker.terminate() == 0
    log = (tmp_path / "first.log").read_text()
    assert "checkpoint written (shutdown)" in log
    assert _final_state(run_settings)["counts"]["applied"] == len(events)

    with WorkerProcess(run_settings, tmp_path / "second.log") as worker:
        worker.wait_ready()
        time.sleep(3)
        text = worker.metrics()
        assert worker.terminate() == 0
    assert "fusionrec_events_applied_total{" not in text
    assert _final_state(run_settings)["counts"]["applied"] == len(events)


def test_sigterm_without_checkpoint_folder_exits_one(run_settings, tmp_path):
    now = int(time.time() * 1000) - 60_000
    events = [
        Event(f"u-{n}", "view", f"user-{n % 20}", f"item-{n % 30}", now + n) for n in range(200)
    ]
    worker = WorkerProcess(run_settings, tmp_path / "worker.log").start()
    worker.wait_ready()
    asyncio.run(produce_events(run_settings, events))
    _wait_applied(worker, len(events), 60)
    # A file in place of the folder fails every checkpoint write, as a full
    # or read-only disk does, and even for root.
    folder = Path(run_settings.data_dir) / "checkpoints"
    shutil.rmtree(folder, ignore_errors=True)
    folder.write_text("not a folder")

    assert worker.terminate(timeout_s=60) == 1
    log = (tmp_path / "worker.log").read_text()
    assert "final checkpoint not written" in log
    users = sorted({event.user_id for event in events})
    lists = asyncio.run(wait_for_lists(run_settings, users, timeout_s=30))
    assert sorted(lists) == users


def test_corrupt_checkpoint_falls_back(run_settings, tmp_path):
    settings = replace(run_settings, checkpoint_interval_s=1.0)
    now = int(time.time() * 1000) - 60_000
    first = [
        Event(f"c-{n}", "view", f"user-{n % 9}", f"item-{n % 13}", now + n) for n in range(300)
    ]
    second = [
        Event(f"d-{n}", "click", f"user-{n % 9}", f"item-{n % 13}", now + 1000 + n)
        for n in range(200)
    ]
    with WorkerProcess(settings, tmp_path / "first.log") as worker:
        worker.wait_ready()
        asyncio.run(produce_events(settings, first))
        _wait_applied(worker, len(first), 60)
        assert worker.terminate() == 0
    # Only the stop writes a checkpoint of the second run, so the one before
    # the newest lacks the second batch, whenever the stop comes.
    no_interval = replace(settings, checkpoint_interval_s=3600.0)
    with WorkerProcess(no_interval, tmp_path / "between.log") as worker:
        worker.wait_ready()
        asyncio.run(produce_events(settings, second))
        _wait_applied(worker, len(second), 60)
        assert worker.terminate() == 0

    store = _store(settings)
    newest = store.paths()[0][1]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])

    with WorkerProcess(settings, tmp_path / "second.log") as worker:
        worker.wait_ready()
        _wait_applied(worker, 1, 60)
        time.sleep(3)
        assert worker.terminate() == 0
    log = (tmp_path / "second.log").read_text()
    assert "skipping invalid checkpoint" in log
    assert f"{len(first)} events applied so far" in log
    state = _final_state(settings)
    assert state["counts"]["applied:view"] == len(first)
    assert state["counts"]["applied:click"] == len(second)


def _handover_events(prefix: str) -> list[Event]:
    """Return 4,000 views of 200 users an hour ago, with event ids that start with ``prefix``."""
    now = int(time.time() * 1000) - 3_600_000
    return [
        Event(f"{prefix}-{n}", "view", f"user-{n % 200}", f"item-{n % 500}", now + n * 10)
        for n in range(4000)
    ]


def _start_checkpointed_worker(
    settings, run_settings, events: list[Event], tmp_path: Path
) -> WorkerProcess:
    """Start the first worker with ``settings``, and wait until a checkpoint covers ``events``.

    The events are produced with ``run_settings``, the broker's own address.
    """
    worker = WorkerProcess(settings, tmp_path / "first.log").start()
    worker.wait_ready()
    asyncio.run(produce_events(run_settings, events))
    _wait_applied(worker, len(events), 60)
    _wait_checkpointed(run_settings, len(events), 30)
    return worker


def _start_second_worker(run_settings, tmp_path: Path) -> WorkerProcess:
    """Start a worker of the same group from a copy of the first one's data folder."""
    second_settings = replace(run_settings, data_dir=str(tmp_path / "second"), web_port=free_port())
    shutil.copytree(run_settings.data_dir, second_settings.data_dir)
    return WorkerProcess(second_settings, tmp_path / "second.log").start()


def test_partitions_back_from_other_worker_are_reread(run_settings, tmp_path):
    # A second worker restored from a copy of the first one's checkpoints
    # joins the group, applies the events of half of the partitions and
    # leaves. The first worker must then apply those events as well.
    events = _handover_events("r")
    first_part, shared_part, last_part = events[:1000], events[1000:3000], events[3000:]
    first = _start_checkpointed_worker(run_settings, run_settings, first_part, tmp_path)

    second = _start_second_worker(run_settings, tmp_path)
    _wait_health(second, lambda r: r["partitions_assigned"] > 0, "a partition of the second", 90)
    asyncio.run(produce_events(run_settings, shared_part))
    _wait_applied(second, 1, 60)
    assert second.terminate() == 0

    asyncio.run(produce_events(run_settings, last_part))
    _wait_applied(first, len(events), 120)
    assert first.terminate() == 0
    assert _final_state(run_settings)["counts"]["applied"] == len(events)


class _Forwarder:
    """Forward TCP connections from a port of 127.0.0.1 to a Kafka broker.

    `stop_listening` closes only the listening socket, so new connections are
    rejected while the accepted ones go on forwarding. `listen` binds the same
    port again.
    """

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.port = free_port()
        self._listening: tuple[socket.socket, threading.Event, threading.Thread] | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """Address to give a Kafka client as its bootstrap server."""
        return f"127.0.0.1:{self.port}"

    def listen(self) -> None:
        """Accept connections on the forwarder's port and forward each to the broker."""
        listener = socket.create_server(("127.0.0.1", self.port))
        # The accept loop wakes up this often to see whether it must stop.
        listener.settimeout(0.2)
        stop = threading.Event()
        thread = threading.Thread(target=self._accept, args=(listener, stop), daemon=True)
        thread.start()
        self._listening = (listener, stop, thread)

    def stop_listening(self) -> None:
        assert self._listening is not None, "the forwarder is not listening"
        listener, stop, thread = self._listening
        self._listening = None
        stop.set()
        thread.join()
        listener.close()

    def close(self) -> None:
        if self._listening is not None:
            self.stop_listening()
        with self._lock:
            connections, self._connections = self._connections, []
        for sock in connections:
            # On Linux, a shutdown wakes the thread blocked in recv, and a close does not.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5.0)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture
def forwarder(kafka_bootstrap: str) -> Iterator[_Forwarder]:
    """A listening forwarder to the broker, closed with all its connections after the test."""
    forwarder = _Forwarder(kafka_bootstrap)
    forwarder.listen()
    yield forwarder
    forwarder.close()


def _wait_health(worker: WorkerProcess, condition, description: str, timeout_s: float) -> dict:
    """Poll the worker's health report until ``condition`` holds for it, and return it."""
    deadline = time.monotonic() + timeout_s
    while True:
        report = worker.health()
        if report is not None and condition(report):
            return report
        assert time.monotonic() < deadline, (
            f"{description} not seen after {timeout_s:.0f} s: {report}"
        )
        time.sleep(0.5)


def test_unaligned_partitions_paused_until_broker_replies(run_settings, forwarder, tmp_path):
    # Each alignment after a rebalance starts a new client from the bootstrap
    # address, while the running consumer stays connected to the broker's
    # advertised address. The first worker bootstraps through the forwarder,
    # so while the forwarder does not listen, only its alignment fails.
    events = _handover_events("h")
    first_part, shared_part, last_part = events[:1000], events[1000:3000], events[3000:]
    first_settings = replace(run_settings, kafka_bootstrap=forwarder.address)
    first = _start_checkpointed_worker(first_settings, run_settings, first_part, tmp_path)

    second = _start_second_worker(run_settings, tmp_path)
    _wait_health(second, lambda r: r["partitions_assigned"] > 0, "a partition of the second", 90)
    asyncio.run(produce_events(run_settings, shared_part))
    deadline = time.monotonic() + 60
    while _applied(first) + _applied(second) < len(first_part) + len(shared_part):
        assert time.monotonic() < deadline, "the two workers did not apply the shared events"
        time.sleep(0.5)
    assert _applied(second) > 0
    # An interval checkpoint commits the state's offsets of every assigned
    # partition, which would also move the second worker's commits back. Once
    # the checkpoint covers every applied event, none is written until the
    # alignment has run. The first worker started from an empty state, so its
    # checkpoint counts what its metrics count.
    _wait_checkpointed(run_settings, int(_applied(first)), 30)

    forwarder.stop_listening()
    assert second.terminate() == 0
    # The alignment gives up after 30 s, and the rebalance adds a few seconds.
    report = _wait_health(first, lambda r: r["partitions_paused"] > 0, "paused partitions", 120)
    assert report["ready"] is False
    # A failed alignment pauses every assigned partition of the source topics.
    sources = [*EVENT_TOPICS.values(), ITEMS_TOPIC, FORGET_TOPIC]
    source_partitions = [
        f"{run_settings.topic(name)}[{partition}]"
        for name in sources
        for partition in range(run_settings.partitions)
    ]
    assert report["partitions_paused"] == len(source_partitions)
    paused_applied = _applied(first)
    assert paused_applied < len(events)
    committed = asyncio.run(committed_offsets(run_settings, "events.view"))
    state_offsets = _final_state(run_settings)["offsets"]
    topic = run_settings.topic("events.view")
    ahead = [p for p, offset in committed.items() if (offset or 0) > state_offsets[(topic, p)]]
    assert ahead, f"no commit of the second worker is ahead of the first one's state: {committed}"

    asyncio.run(produce_events(run_settings, last_part))
    # Long enough for partitions that are not paused to deliver the new events.
    until = time.monotonic() + 5
    while time.monotonic() < until:
        report = first.health()
        assert report is not None
        assert report["partitions_paused"] > 0
        assert _applied(first) == paused_applied
        time.sleep(0.5)

    forwarder.listen()
    # Retries back off to 30 s, and the broker probe runs every 5 s.
    _wait_health(first, lambda r: r["partitions_paused"] == 0, "resumed partitions", 120)
    _wait_health(first, lambda r: r["ready"], "readiness", 60)
    # The first worker applies the events the second one applied, then the rest.
    _wait_applied(first, len(events), 120)
    assert first.terminate() == 0
    assert _final_state(run_settings)["counts"]["applied"] == len(events)

    log = first.log_text()
    unaligned = [line for line in log.splitlines() if "not checked against the state's" in line]
    assert unaligned, "no error names the paused partitions"
    for name in source_partitions:
        assert name in unaligned[0]
    assert f"{len(source_partitions)} paused partitions resumed at the state's offsets" in log


def test_recreated_topic_read_from_its_beginning(run_settings):
    from stream.app import Worker

    worker = Worker(run_settings)
    topic = run_settings.topic("events.view")
    # A state restored from before the topic was deleted and created again.
    worker.processor.offsets[(topic, 0)] = 20
    worker.processor.offsets[(topic, 1)] = 0

    asyncio.run(worker.align_committed_offsets(timeout_s=60))

    assert worker.processor.offsets[(topic, 0)] == 0
    assert worker.processor.offsets[(topic, 1)] == 0
    assert worker.metrics.errors.labels(kind="offset_past_log_end")._value.get() == 1
