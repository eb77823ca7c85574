"""The evaluate subcommand on a tiny JSON Lines file."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import pytest

from stream.evaluate import add_arguments, run

T0 = 1_700_000_000_000


@pytest.fixture(autouse=True)
def _no_stale_log_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests of `fusionrec` itself point the root logger at the stderr that
    # pytest captured for them and has closed since, so the run's log lines
    # would end in "--- Logging error ---" tracebacks on stderr here.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])


def _write_stream(path: Path) -> None:
    lines = []
    for n in range(30):
        event = {
            "event_id": f"e{n}",
            "type": ("view", "click", "purchase")[n % 3],
            "user_id": f"u{n % 3}",
            "item_id": f"i{n % 5}",
            "timestamp": T0 + n * 60_000,
        }
        lines.append(json.dumps(event))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_json_output_has_contract_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "events.jsonl"
    _write_stream(source)
    code = run(_parse([str(source), "--format", "jsonl", "--json"]))
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["events"] == 30
    assert report["default"] in report["results"]
    for result in report["results"].values():
        assert result["kind"] in ("model", "fusion", "baseline")
        assert {"hr@10", "ndcg@10", "mrr@10", "hits", "n"} <= set(result["all"])
        assert {"hr@10", "ndcg@10", "mrr@10", "hits", "n"} <= set(result["new"])
        assert 0.0 <= result["coverage"] <= 1.0
        assert set(result["by_type"]) <= {"view", "click", "purchase"}
    assert report["results"]["popular"]["kind"] == "baseline"


def test_strategies_keep_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "events.jsonl"
    _write_stream(source)
    run(_parse([str(source), "--format", "jsonl", "--json", "--strategies", "covisit"]))
    report = json.loads(capsys.readouterr().out)
    assert set(report["results"]) == {"covisit", report["default"]}


def test_markdown_and_plot_written(tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    _write_stream(source)
    markdown = tmp_path / "tables.md"
    plot = tmp_path / "hr.png"
    args = [str(source), "--format", "jsonl", "--every", "2", "--markdown", str(markdown)]
    code = run(_parse([*args, "--plot", str(plot)]))
    assert code == 0
    assert "| `covisit` | model |" in markdown.read_text(encoding="utf-8")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_file_fails(tmp_path: Path) -> None:
    assert run(_parse([str(tmp_path / "absent.jsonl"), "--format", "jsonl"])) == 2


def test_every_zero_rejected(tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    _write_stream(source)
    assert run(_parse([str(source), "--format", "jsonl", "--every", "0"])) == 2


def test_plot_into_missing_folder_rejected_first(tmp_path: Path, capsys) -> None:
    source = tmp_path / "events.jsonl"
    _write_stream(source)
    plot = tmp_path / "absent" / "hr.png"
    assert run(_parse([str(source), "--format", "jsonl", "--plot", str(plot)])) == 2
    assert "no folder" in capsys.readouterr().err


def test_plot_needs_png_name(tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    _write_stream(source)
    plot = tmp_path / "hr.svg"
    assert run(_parse([str(source), "--format", "jsonl", "--plot", str(plot)])) == 2


def test_repeated_strategy_counted_once(tmp_path: Path, capsys) -> None:
    source = tmp_path / "events.jsonl"
    _write_stream(source)
    assert run(_parse([str(source), "--format", "jsonl", "--json", "--strategies", "mf"])) == 0
    once = json.loads(capsys.readouterr().out)["results"]["mf"]["all"]["n"]
    argv = [str(source), "--format", "jsonl", "--json", "--strategies", "mf", "mf"]
    assert run(_parse(argv)) == 0
    twice = json.loads(capsys.readouterr().out)["results"]["mf"]["all"]["n"]
    assert twice == once


def test_seed_reaches_the_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stream.evaluate

    source = tmp_path / "events.jsonl"
    _write_stream(source)
    seeds: list[int] = []
    real = stream.evaluate.evaluate

    def recording(events, config, **options):
        seeds.append(config.seed)
        return real(events, config, **options)

    monkeypatch.setattr(stream.evaluate, "evaluate", recording)
    assert run(_parse([str(source), "--format", "jsonl", "--json", "--seed", "7"])) == 0
    assert seeds == [7]


def test_negative_seed_rejected(tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    _write_stream(source)
    assert run(_parse([str(source), "--format", "jsonl", "--seed", "-1"])) == 2


@pytest.mark.parametrize(("option", "name"), [("--markdown", "t.md"), ("--plot", "hr.png")])
def test_unwritable_output_rejected_first(
    option: str,
    name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import stream.evaluate

    source = tmp_path / "events.jsonl"
    _write_stream(source)
    # The folder exists, but the file cannot be created, because it is a
    # link into a folder that does not exist.
    target = tmp_path / name
    target.symlink_to(tmp_path / "missing" / name)
    evaluated: list[int] = []
    real = stream.evaluate.evaluate

    def recording(events, config, **options):
        evaluated.append(len(events))
        return real(events, config, **options)

    monkeypatch.setattr(stream.evaluate, "evaluate", recording)

    code = run(_parse([str(source), "--format", "jsonl", option, str(target)]))

    err = capsys.readouterr().err
    assert code == 2
    assert evaluated == []
    assert f"{option} {target} cannot be written" in err
    assert "Traceback" not in err


def test_output_check_keeps_existing_file(tmp_path: Path) -> None:
    absent_source = tmp_path / "absent.jsonl"
    markdown = tmp_path / "tables.md"
    markdown.write_text("earlier tables\n", encoding="utf-8")
    plot = tmp_path / "hr.png"

    # The outputs are checked before the event file is read, and the missing
    # event file then stops the run before anything is written.
    argv = [str(absent_source), "--format", "jsonl", "--markdown", str(markdown)]
    code = run(_parse([*argv, "--plot", str(plot)]))

    assert code == 2
    assert markdown.read_text(encoding="utf-8") == "earlier tables\n"
    assert not plot.exists()


def test_output_lost_after_run_keeps_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import stream.evaluate

    source = tmp_path / "events.jsonl"
    _write_stream(source)
    folder = tmp_path / "out"
    folder.mkdir()
    markdown = folder / "tables.md"
    real = stream.evaluate.evaluate

    def removing_folder(events, config, **options):
        result = real(events, config, **options)
        folder.rmdir()
        return result

    monkeypatch.setattr(stream.evaluate, "evaluate", removing_folder)

    code = run(_parse([str(source), "--format", "jsonl", "--json", "--markdown", str(markdown)]))

    captured = capsys.readouterr()
    assert code == 2
    assert json.loads(captured.out)["events"] == 30
    assert f"cannot write --markdown {markdown}" in captured.err
    assert "Traceback" not in captured.err


def test_latin1_file_name_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = Path(os.fsdecode(os.fsencode(tmp_path) + b"/k\xe4ufe.jsonl"))
    _write_stream(source)

    code = run(_parse([str(source), "--format", "jsonl", "--json", "--strategies", "popular"]))

    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["run"]["path"].endswith("k\\xe4ufe.jsonl")
