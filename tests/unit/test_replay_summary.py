"""The summary that ``fusionrec replay`` prints, and where a failed replay stops."""

import asyncio
import signal
import threading
from collections import Counter
from pathlib import Path

import orjson
import pytest
from aiokafka.errors import KafkaTimeoutError

from schemas import Event
from stream import replay
from stream.cli import main
from stream.replay import ReplaySummary
from stream.settings import Settings


def _events(count: int) -> list[Event]:
    return [Event(f"e{n}", "view", f"u{n % 3}", "i1", 1_700_000_000_000 + n) for n in range(count)]


def _use_producer(monkeypatch, producer: object) -> None:
    async def start(settings: Settings, bootstrap: str) -> object:
        return producer

    async def topics_exist(*args: object) -> None:
        return None

    monkeypatch.setattr(replay, "_start_producer", start)
    monkeypatch.setattr(replay, "_check_topics", topics_exist)


def _jsonl_file(tmp_path: Path, count: int = 50) -> Path:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(event.to_json()) for event in _events(count)) + b"\n")
    return path


def _count_column(lines: list[str], names: list[str]) -> set[int]:
    columns = set()
    for name in names:
        (line,) = [line for line in lines if line.strip().startswith(name)]
        columns.add(line.rindex(" ") + 1)
    return columns


def test_counts_align_under_long_topic_names() -> None:
    summary = ReplaySummary(path="events.csv", fmt="taobao", dry_run=False)
    summary.by_topic = Counter(
        {
            "demo-1796490113.events.click": 6853,
            "demo-1796490113.events.purchase": 1750,
            "demo-1796490113.events.view": 75872,
        }
    )
    lines = summary.to_text().splitlines()
    assert len(_count_column(lines, list(summary.by_topic))) == 1
    assert "  demo-1796490113.events.purchase 1750" in lines


def test_counts_align_across_sections() -> None:
    summary = ReplaySummary(path="events.csv", fmt="taobao", dry_run=True)
    summary.by_topic = Counter({"events.click": 2, "events.view": 10})
    summary.skipped = Counter({"timestamp_in_future": 1, "invalid_behavior_type": 3})
    summary.failed = Counter({"KafkaTimeoutError": 1})
    lines = summary.to_text().splitlines()
    names = [*summary.by_topic, *summary.skipped, *summary.failed]
    assert len(_count_column(lines, names)) == 1


class _FailingProducer:
    """Takes events until ``broken_at``; from there on every delivery fails."""

    def __init__(self, broken_at: int, silent: bool = False) -> None:
        self.broken_at = broken_at
        self.silent = silent
        self.sent = 0

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.sent < self.broken_at:
            future.set_result(None)
        elif not self.silent:
            future.set_exception(KafkaTimeoutError("batch expired"))
        # A silent broker leaves the delivery unconfirmed.
        self.sent += 1
        return future

    async def flush(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def _replay(monkeypatch, producer: _FailingProducer, summary: ReplaySummary) -> None:
    _use_producer(monkeypatch, producer)
    asyncio.run(
        replay.produce_events(
            _events(50)[summary.skip :],
            Settings(),
            "127.0.0.1:9",
            summary,
            progress=False,
            delivery_timeout_s=0.2,
        )
    )


def test_replay_stops_at_first_failed_delivery(monkeypatch) -> None:
    producer = _FailingProducer(broken_at=20)
    summary = ReplaySummary(path="events.jsonl", fmt="jsonl", dry_run=False, skip=5)

    with pytest.raises(replay.ReplayError, match="resume with --skip 25") as caught:
        _replay(monkeypatch, producer, summary)

    assert "after 20 delivered events" in str(caught.value)
    assert producer.sent == 21
    assert summary.produced == 20
    assert summary.resume_from == 25


def test_resumed_replay_counts_from_skip(monkeypatch) -> None:
    summary = ReplaySummary(path="events.jsonl", fmt="jsonl", dry_run=False, skip=25)

    _replay(monkeypatch, _FailingProducer(broken_at=10**9), summary)

    assert summary.produced == 25
    assert summary.resume_from is None
    assert summary.to_json()["skip"] == 25


def test_replay_gives_up_on_silent_broker(monkeypatch) -> None:
    summary = ReplaySummary(path="events.jsonl", fmt="jsonl", dry_run=False)

    with pytest.raises(replay.ReplayError, match="resume with --skip 30"):
        _replay(monkeypatch, _FailingProducer(broken_at=30, silent=True), summary)

    assert summary.produced == 30
    assert summary.failed == {"DeliveryTimeout": 20}


def test_unreachable_broker_json_names_error(monkeypatch, tmp_path, capsys) -> None:
    async def unreachable(settings: Settings, bootstrap: str) -> None:
        raise replay.ReplayError(f"cannot connect to Kafka at {bootstrap}")

    monkeypatch.setattr(replay, "_start_producer", unreachable)
    path = tmp_path / "events.jsonl"
    event = Event("e1", "view", "u1", "i1", 1_700_000_000_000)
    path.write_bytes(orjson.dumps(event.to_json()) + b"\n")

    code = main(["replay", str(path), "--format", "jsonl", "--skip", "0", "--json"])

    report = orjson.loads(capsys.readouterr().out)
    assert code == 1
    assert report["exit_code"] == 1
    assert report["error"].startswith("cannot connect to Kafka")
    assert report["resume_from"] == 0


class _StoppedByUser:
    """Confirms ``before`` deliveries, then the user sends ``signum`` to the replay.

    With ``again`` the user sends it once more while the producer flushes.
    """

    def __init__(self, before: int, signum: signal.Signals, *, again: bool = False) -> None:
        self.before = before
        self.signum = signum
        self.again = again
        self.sent = 0

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[None]:
        if self.sent == self.before:
            signal.raise_signal(self.signum)
            await asyncio.sleep(5)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        self.sent += 1
        return future

    async def stop(self) -> None:
        if self.again:
            self.again = False
            signal.raise_signal(self.signum)
            await asyncio.sleep(1)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_reports_resume_point(
    monkeypatch, tmp_path, capsys, signum: signal.Signals, code: int
) -> None:
    _use_producer(monkeypatch, _StoppedByUser(before=10, signum=signum))
    path = _jsonl_file(tmp_path)

    exit_code = main(
        ["replay", str(path), "--format", "jsonl", "--skip", "5", "--json", "--no-progress"]
    )

    captured = capsys.readouterr()
    report = orjson.loads(captured.out)
    assert exit_code == code
    assert report["exit_code"] == code
    assert report["produced"] == 10
    assert report["resume_from"] == 15
    assert "after 10 delivered events; resume with --skip 15" in report["error"]
    assert "resume with --skip 15" in captured.err


class _FirstDeliveryFailsLate:
    """Every delivery succeeds except the first, whose failure the broker reports later,
    as when one partition has lost its leader while the others take their batches."""

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self.sent == 0:
            loop.call_later(0.05, future.set_exception, KafkaTimeoutError("batch expired"))
        else:
            future.set_result(None)
        self.sent += 1
        return future

    async def stop(self) -> None:
        return None


def test_resend_within_dedup_window(monkeypatch) -> None:
    # One event an hour, as in a sparse purchase file: 60 events span more
    # than the worker's de-duplication window of event time (26 h).
    producer = _FirstDeliveryFailsLate()
    _use_producer(monkeypatch, producer)
    hour = 3_600_000
    events = [
        Event(f"e{n}", "purchase", f"u{n}", "i1", 1_700_000_000_000 + n * hour) for n in range(60)
    ]
    summary = ReplaySummary(path="retail.csv", fmt="online-retail", dry_run=False)
    settings = Settings()

    with pytest.raises(replay.ReplayError, match="resume with --skip 0"):
        asyncio.run(
            replay.produce_events(
                events, settings, "127.0.0.1:9", summary, progress=False, delivery_timeout_s=1
            )
        )

    # On resuming, the delivered events of the failed batch are sent again.
    # The batch ended before its events spanned more than the window, so
    # their ids are still in the worker's de-duplication window.
    delivered = events[1 : 1 + summary.produced]
    assert delivered
    assert producer.sent == 1 + summary.produced
    newest_ms = delivered[-1].timestamp_ms
    assert newest_ms - events[0].timestamp_ms <= settings.dedup_window_s * 1000


def test_second_sigterm_keeps_resume_point(monkeypatch, tmp_path, capsys) -> None:
    _use_producer(monkeypatch, _StoppedByUser(before=10, signum=signal.SIGTERM, again=True))
    path = _jsonl_file(tmp_path)

    code = main(
        ["replay", str(path), "--format", "jsonl", "--skip", "5", "--json", "--no-progress"]
    )

    report = orjson.loads(capsys.readouterr().out)
    assert code == 143
    assert report["produced"] == 10
    assert report["resume_from"] == 15


class _Confirming:
    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def stop(self) -> None:
        return None


def _produce(summary: ReplaySummary) -> None:
    asyncio.run(
        replay.produce_events(
            _events(5), Settings(), "127.0.0.1:9", summary, progress=False, delivery_timeout_s=1
        )
    )


def test_replay_off_main_thread(monkeypatch) -> None:
    _use_producer(monkeypatch, _Confirming())
    summary = ReplaySummary(path="events.jsonl", fmt="jsonl", dry_run=False)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            _produce(summary)
        except BaseException as exc:  # noqa: BLE001 - the test reports any error
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(10)

    assert errors == []
    assert summary.produced == 5


def test_replay_restores_sigterm_handler(monkeypatch) -> None:
    _use_producer(monkeypatch, _Confirming())
    summary = ReplaySummary(path="events.jsonl", fmt="jsonl", dry_run=False)

    def previous(signum: int, frame: object) -> None:
        return None

    original = signal.signal(signal.SIGTERM, previous)
    try:
        _produce(summary)
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, original)

    assert summary.produced == 5
    assert after is previous
