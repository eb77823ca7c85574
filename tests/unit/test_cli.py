"""Arguments, errors and output of the ``fusionrec`` commands."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

import orjson
import pytest

from schemas import Event
from stream.cli import build_faust_worker, main
from stream.settings import Settings


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_topics_create_without_broker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("FUSIONREC_KAFKA_BOOTSTRAP", address)
    assert main(["topics", "--create"]) == 1
    err = capsys.readouterr().err
    assert f"cannot create the topics on Kafka at {address}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "value", ["", "127.0.0.1", "127.0.0.1:", "127.0.0.1:9092,", ":9092", "127.0.0.1:port"]
)
def test_invalid_bootstrap_named(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FUSIONREC_KAFKA_BOOTSTRAP", value)
    assert main(["settings"]) == 2
    err = capsys.readouterr().err
    assert f"FUSIONREC_KAFKA_BOOTSTRAP entry {value.rpartition(',')[2]!r}" in err
    assert "expected comma-separated host:port" in err


@pytest.mark.parametrize("value", ["127.0.0.1:9092", "a:1, b:2", "[::1]:9092"])
def test_valid_bootstrap_accepted(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSIONREC_KAFKA_BOOTSTRAP", value)
    assert main(["settings"]) == 0


def test_redis_url_scheme_checked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FUSIONREC_REDIS_URL", "http://:secret@127.0.0.1:6379/0")
    assert main(["recs", "u1"]) == 2
    err = capsys.readouterr().err
    assert "FUSIONREC_REDIS_URL is 'http://:***@127.0.0.1:6379/0'" in err
    assert "expected a URL starting with redis://, rediss:// or unix://" in err
    assert "secret" not in err
    assert "Traceback" not in err


def _event_file(tmp_path: Path) -> Path:
    path = tmp_path / "events.jsonl"
    event = Event("e1", "view", "u1", "i1", 1_760_000_000_000)
    path.write_bytes(orjson.dumps(event.to_json()) + b"\n")
    return path


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FUSIONREC_REDIS_URL", "http://127.0.0.1:6379/0"),
        ("FUSIONREC_KAFKA_BOOTSTRAP", "127.0.0.1"),
    ],
    ids=["redis url", "kafka bootstrap"],
)
def test_dry_run_ignores_service_settings(
    variable: str,
    value: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(variable, value)
    argv = ["replay", str(_event_file(tmp_path)), "--format", "jsonl", "--dry-run", "--json"]
    assert main([*argv, "--no-progress"]) == 0
    summary = orjson.loads(capsys.readouterr().out)
    assert summary["dry_run"] is True
    assert summary["events"] == 1


def test_replay_json_reports_unreadable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["replay", str(tmp_path / "missing.jsonl"), "--format", "jsonl", "--json"]

    assert main(argv) == 2

    report = orjson.loads(capsys.readouterr().out)
    assert report["exit_code"] == 2
    assert report["error"].startswith("cannot read ")


def test_replay_skip_leaves_out_first_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "events.jsonl"
    events = [Event(f"e{n}", "view", "u1", "i1", 1_760_000_000_000 + n) for n in range(5)]
    path.write_bytes(b"".join(orjson.dumps(event.to_json()) + b"\n" for event in events))
    argv = ["replay", str(path), "--format", "jsonl", "--dry-run", "--json", "--skip", "3"]

    assert main([*argv, "--no-progress"]) == 0

    summary = orjson.loads(capsys.readouterr().out)
    assert summary["selected"] == 2
    assert summary["skip"] == 3


def test_replay_checks_kafka_bootstrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FUSIONREC_KAFKA_BOOTSTRAP", "127.0.0.1")
    argv = ["replay", str(_event_file(tmp_path)), "--format", "jsonl", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "FUSIONREC_KAFKA_BOOTSTRAP entry '127.0.0.1'" in err
    assert "expected comma-separated host:port" in err


def test_replay_flag_replaces_kafka_bootstrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The flag names the broker, so a malformed variable that it overrides
    # is no reason to refuse the run.
    monkeypatch.setenv("FUSIONREC_KAFKA_BOOTSTRAP", "127.0.0.1")
    address = f"127.0.0.1:{_closed_port()}"
    argv = ["replay", str(_event_file(tmp_path)), "--format", "jsonl", "--no-progress"]
    assert main([*argv, "--bootstrap-servers", address]) == 1
    err = capsys.readouterr().err
    assert f"cannot connect to Kafka at {address}" in err
    assert "FUSIONREC_KAFKA_BOOTSTRAP entry" not in err


def test_worker_checks_redis_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A closed Kafka port and a fresh data folder, so that a worker that
    # skipped the check would reach no real service.
    monkeypatch.setenv("FUSIONREC_KAFKA_BOOTSTRAP", f"127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("FUSIONREC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FUSIONREC_REDIS_URL", "http://127.0.0.1:6379/0")
    assert main(["worker"]) == 2
    err = capsys.readouterr().err
    assert "FUSIONREC_REDIS_URL is 'http://127.0.0.1:6379/0'" in err
    assert "expected a URL starting with redis://, rediss:// or unix://" in err


def test_recs_missing_popular_names_its_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def absent(*args: object, **kwargs: object) -> None:
        return None

    monkeypatch.setattr("stream.reader.read_list", absent)
    monkeypatch.setenv("FUSIONREC_REDIS_KEY_PREFIX", "shop1:recs:")
    assert main(["recs", "--popular"]) == 1
    assert "no list in Redis at shop1:recs:popular" in capsys.readouterr().err
    assert main(["recs", "u1"]) == 1
    err = capsys.readouterr().err
    assert "no list in Redis for user 'u1'" in err
    assert "served shop1:recs:popular" in err


def test_forget_without_broker_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("FUSIONREC_KAFKA_BOOTSTRAP", address)
    assert main(["forget", "u1"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert f"cannot connect to Kafka at {address}" in lines[0]


@pytest.mark.parametrize("command", ["replay", "evaluate", "bench"])
def test_help_description_is_plain_text(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    usage, _, description = capsys.readouterr().out.partition("\n\n")
    assert usage.startswith(f"usage: fusionrec {command}")
    assert description.strip()
    assert "``" not in description
    assert "`stream." not in description


def test_faust_worker_ready_writes_no_escape_codes(capsys: pytest.CaptureFixture[str]) -> None:
    import faust

    loop = asyncio.new_event_loop()
    try:
        app = faust.App(
            "cli-test", broker=f"kafka://127.0.0.1:{_closed_port()}", autodiscover=False
        )
        faust_worker = build_faust_worker(app, loop, "info")
        faust_worker._on_startup_end_spinner()
    finally:
        loop.close()
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "\b" not in out


def test_recs_table_shows_computed_at_as_utc(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = {
        "items": [{"item_id": "i1", "score": 0.5, "sources": ["covisit", "popular"]}],
        "computed_at": 1796489946490,
        "model_version": "fusionrec-0.1/learned",
    }

    async def present(*args: object, **kwargs: object) -> dict[str, object]:
        return stored

    monkeypatch.setattr("stream.reader.read_list", present)
    assert main(["recs", "u1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["1", "i1", "0.5000", "covisit,popular"]
    assert lines[-1] == (
        "computed_at=2026-12-05T16:59:06.490Z (1796489946490 ms)"
        " model_version=fusionrec-0.1/learned"
    )


def test_recs_without_redis_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    monkeypatch.setenv("FUSIONREC_REDIS_URL", url)
    assert main(["recs", "u1"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"fusionrec recs: cannot read from Redis at {url}: ")
    assert lines[0].endswith("; start it with `make services-up` or set FUSIONREC_REDIS_URL")
    assert ".)." not in lines[0]
    assert ".;" not in lines[0]


def test_worker_names_unusable_data_dir(tmp_path: Path) -> None:
    from stream.cli import _local_problem

    blocker = tmp_path / "a-file"
    blocker.write_text("")

    problem = _local_problem(Settings(data_dir=str(blocker)))

    assert problem is not None
    assert problem.startswith(f"FUSIONREC_DATA_DIR is '{blocker}', which is not a writable folder")


def test_worker_names_busy_web_port(tmp_path: Path) -> None:
    from stream.cli import _local_problem

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        problem = _local_problem(Settings(data_dir=str(tmp_path), web_port=port))

    assert problem is not None
    assert problem.startswith(f"FUSIONREC_WEB_PORT is {port}, which cannot be bound")


def test_worker_gives_up_on_absent_broker(tmp_path: Path) -> None:
    from stream.app import BrokerUnreachableError, Worker

    worker = Worker(Settings(data_dir=str(tmp_path), kafka_bootstrap="127.0.0.1:9"))

    with pytest.raises(BrokerUnreachableError, match="no Kafka broker at 127.0.0.1:9 replied"):
        asyncio.run(worker._wait_for_topics(wait_s=0.5))


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (b"garbage", "is not JSON"),
        (b'{"items": [{"item_id": 1}]}', "is not a list that the worker writes"),
    ],
    ids=["not json", "wrong shape"],
)
def test_recs_invalid_stored_value_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stored: bytes,
    expected: str,
) -> None:
    class _Client:
        async def get(self, key: str) -> bytes:
            return stored

        async def aclose(self) -> None:
            return None

    monkeypatch.setattr("stream.reader.redis_client", lambda settings: _Client())
    assert main(["recs", "u1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "the value of recs:user:u1" in err
    assert expected in err


def test_output_check_through_link_leaves_no_file(tmp_path: Path) -> None:
    from stream.cli import output_problem

    target = tmp_path / "results" / "result.json"
    target.parent.mkdir()
    link = tmp_path / "result.json"
    link.symlink_to(target)

    assert output_problem("--output", link) is None
    assert link.is_symlink()
    assert not target.exists()


def test_output_check_keeps_file_made_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stream import cli

    target = tmp_path / "report.md"
    real_open = os.open

    def open_after_other_program(path: object, flags: int, *args: int) -> int:
        # Another program creates and fills the file just before the check.
        if not target.exists():
            target.write_bytes(b"report of another run\n")
        return real_open(path, flags, *args)

    monkeypatch.setattr(cli.os, "open", open_after_other_program)

    assert cli.output_problem("--markdown", target) is None
    assert target.read_bytes() == b"report of another run\n"


def test_output_check_fifo_without_reader(tmp_path: Path) -> None:
    from stream.cli import output_problem

    fifo = tmp_path / "results"
    os.mkfifo(fifo)

    problem = output_problem("--output", fifo)

    assert problem is not None
    assert "cannot be written" in problem


def test_forget_rejects_non_utf8_user(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A terminal in Latin-1 passes "jürgen" as bytes that are not UTF-8, and
    # Python decodes them with a lone surrogate for the invalid byte.
    user = os.fsdecode(b"j\xfcrgen")
    monkeypatch.setenv("FUSIONREC_KAFKA_BOOTSTRAP", f"127.0.0.1:{_closed_port()}")

    code = main(["forget", user])

    err = capsys.readouterr().err
    assert code == 2
    assert "invalid forget request" in err
    assert f"user id {user!r} is not valid UTF-8" in err
    assert "Traceback" not in err


def test_recs_rejects_non_utf8_user(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    user = os.fsdecode(b"j\xfcrgen")
    read: list[str] = []

    async def recording(settings: Settings, user_id: str, **kwargs: object) -> None:
        read.append(user_id)

    monkeypatch.setattr("stream.reader.read_list", recording)

    code = main(["recs", user])

    err = capsys.readouterr().err
    assert code == 2
    assert read == []
    assert f"user id {user!r} is not valid UTF-8" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("value", ["degub", "verbose", ""])
def test_log_level_flag_rejects_unknown(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    # FUSIONREC_LOG_LEVEL with such a value stops with exit code 2, and so
    # does the flag that overrides it.
    with pytest.raises(SystemExit) as exit_info:
        main(["--log-level", value, "settings"])

    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"invalid choice: {value!r}" in err
    assert "'debug', 'info', 'warning', 'error'" in err


def test_log_level_flag_any_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--log-level", "WARNING", "settings"]) == 0
    assert logging.getLogger().getEffectiveLevel() == logging.WARNING


def test_topics_keeps_log_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from stream.logs import JsonFormatter

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setenv("FUSIONREC_LOG_FORMAT", "json")

    assert main(["--log-level", "debug", "topics"]) == 0

    assert root.level == logging.DEBUG
    assert len(root.handlers) == 1
    assert isinstance(root.handlers[0].formatter, JsonFormatter)
    assert "events.view" in capsys.readouterr().out.split()


def test_recs_table_shows_out_of_range_computed_at(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The schema takes any non-negative integer, and 10**17 ms lies after
    # the year 9999, the last one that datetime represents.
    stored = {
        "items": [{"item_id": "i1", "score": 0.5, "sources": ["popular"]}],
        "computed_at": 10**17,
        "model_version": "v",
    }

    async def present(*args: object, **kwargs: object) -> dict[str, object]:
        return stored

    monkeypatch.setattr("stream.reader.read_list", present)

    assert main(["recs", "u1"]) == 0

    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == (
        "computed_at=100000000000000000 ms (after the year 9999, so not shown as a date)"
        " model_version=v"
    )
    assert "Traceback" not in captured.err


def test_topics_runs_with_unparsed_redis_number(monkeypatch: pytest.MonkeyPatch) -> None:
    # `topics` never connects to Redis, so a Redis setting does not stop it.
    monkeypatch.setenv("FUSIONREC_TTL_S", "abc")

    assert main(["topics"]) == 0
