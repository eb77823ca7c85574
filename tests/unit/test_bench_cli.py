"""Options and errors of ``fusionrec bench`` that show before or after a run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream import bench
from stream.cli import main


def _fake_run(monkeypatch: pytest.MonkeyPatch, after: Any = None) -> list[bool]:
    """Replace the measurement with an instant one that appends to the returned list."""
    ran: list[bool] = []

    async def finished(*args: object) -> dict[str, object]:
        ran.append(True)
        if after is not None:
            after()
        return {"refresh_ms_p99": {}, "ratios": {}}

    monkeypatch.setattr(bench, "_bench", finished)
    return ran


@pytest.mark.parametrize("option", ["--output", "--plot"])
def test_unwritable_output_rejected_before_run(
    option: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ran = _fake_run(monkeypatch)
    # A link into a folder that is gone, as after `make clean`.
    target = tmp_path / "result.file"
    target.symlink_to(tmp_path / "var" / "bench" / "result.file")

    code = main(["bench", "--json", option, str(target)])

    err = capsys.readouterr().err
    assert code == 2
    assert ran == []
    assert f"{option} {target} cannot be written" in err
    assert "Traceback" not in err


def test_plot_folder_created_before_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_run(monkeypatch)
    plot = tmp_path / "var" / "bench" / "freshness.png"

    code = main(["bench", "--json", "--plot", str(plot)])

    assert code == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_output_lost_after_run_keeps_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "var"
    folder.mkdir()
    output = folder / "result.json"
    _fake_run(monkeypatch, after=folder.rmdir)

    code = main(["bench", "--json", "--output", str(output)])

    captured = capsys.readouterr()
    assert code == 2
    assert orjson.loads(captured.out)["ratios"] == {}
    assert f"cannot write --output {output}" in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read"),
        ("", "cannot read"),
        ("user_id,item_id,category_id,behavior_type,timestamp\n", "no rows"),
    ],
    ids=["missing", "empty", "header only"],
)
def test_unreadable_replay_file_one_line(
    content: str | None,
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ran = _fake_run(monkeypatch)
    path = tmp_path / "events.csv"
    if content is not None:
        path.write_text(content, encoding="utf-8")

    code = main(["bench", "--replay", str(path), "--format", "taobao", "--quick"])

    err = capsys.readouterr().err
    assert code == 2
    assert ran == []
    assert err.startswith(f"fusionrec bench: cannot read {path}: ")
    assert expected in err
    assert err.count("\n") == 1


def test_pipe_replay_rejected_before_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran = _fake_run(monkeypatch)
    fifo = tmp_path / "events"
    os.mkfifo(fifo)

    code = main(["bench", "--replay", str(fifo), "--format", "jsonl"])

    assert code == 2
    assert ran == []
    assert "is not a regular file" in capsys.readouterr().err


def test_unknown_leg_rejected_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran = _fake_run(monkeypatch)
    read: list[object] = []
    monkeypatch.setattr(bench, "read_events", lambda *args: read.append(args))

    code = main(["bench", "--legs", "wroker", "--replay", str(tmp_path / "x"), "--format", "jsonl"])

    assert code == 2
    assert ran == []
    assert read == []
    assert "unknown legs ['wroker']" in capsys.readouterr().err


def test_unwritable_profile_rejected_before_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran = _fake_run(monkeypatch)

    code = main(["bench", "--profile-worker", str(tmp_path / "gone" / "worker.prof")])

    assert code == 2
    assert ran == []
    assert "--profile-worker" in capsys.readouterr().err
