"""The ``fusionrec evaluate`` subcommand: the prequential evaluation over an event file."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from tqdm import tqdm

from models.engine import EngineConfig
from models.evaluation import Evaluation, default_strategies, evaluate, strategy_kind
from stream.cli import output_problem
from stream.sources import FORMATS, SourceError, printable, read_events

logger = logging.getLogger(__name__)

# Description shown by `fusionrec evaluate --help`, in plain text because
# argparse prints it as it is.
CLI_DESCRIPTION = (
    "Run the prequential evaluation of every model and fusion strategy on an event"
    " file. Before learning each sampled event (see --every) of a user seen before,"
    " every model and strategy ranks a top-10 list for that user, and the event is a"
    " hit when its item is in the list. Prints HR@10 with its 95% interval over all"
    " sampled events and over those whose item is new to the user, and the share of"
    " the catalog that the lists covered. docs/evaluation.md describes the protocol."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``fusionrec evaluate`` to ``parser``."""
    parser.add_argument("path", type=Path, help="event file, plain or .gz")
    parser.add_argument("--format", required=True, choices=FORMATS, help="file format")
    parser.add_argument(
        "--every",
        type=int,
        default=1,
        metavar="N",
        help="evaluate events whose index is a multiple of N (default: 1, every event)",
    )
    parser.add_argument(
        "--repeat-purchases",
        choices=("allow", "exclude"),
        default=EngineConfig().repeat_purchases,
        help="keep or leave out items the user bought (default: the worker's, %(default)s)",
    )
    parser.add_argument(
        "--strategies",
        nargs="+",
        choices=default_strategies(),
        metavar="NAME",
        help="models and fusion strategies to report (default: all of them)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=EngineConfig().seed,
        metavar="N",
        help=(
            "seed of the models' initial vectors and sampled negatives; runs with other "
            "seeds show how much a figure owes to sampling (default: %(default)s)"
        ),
    )
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write HR@10 over time as a PNG")
    parser.add_argument(
        "--markdown", type=Path, metavar="PATH", help="write the result tables as Markdown"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout instead of tables"
    )


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; return the process exit code."""
    if args.every < 1:
        print(f"error: --every is {args.every}; expected 1 or more", file=sys.stderr)
        return 2
    if not 0 <= args.seed < 2**32:
        print(f"error: --seed is {args.seed}; expected a number in [0, 2**32)", file=sys.stderr)
        return 2
    # The outputs are checked before a run of minutes, not after it.
    for option, target in (("--plot", args.plot), ("--markdown", args.markdown)):
        problem = None if target is None else output_problem(option, target)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        print(f"error: --plot {args.plot}: expected a file name ending in .png", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        loaded = read_events(args.path, args.format, refunds=False)
    except (SourceError, OSError) as exc:
        print(f"error: cannot read {printable(str(args.path))}: {exc}", file=sys.stderr)
        return 2
    loaded_s = time.perf_counter() - started
    logger.info("read %d events from %s in %.1f s", len(loaded.events), args.path, loaded_s)

    config = EngineConfig(repeat_purchases=args.repeat_purchases, seed=args.seed)
    # A name given twice would be scored twice into the same result.
    strategies = list(dict.fromkeys(args.strategies)) if args.strategies else None
    if strategies is not None and config.fusion not in strategies:
        strategies.append(config.fusion)
    with tqdm(
        total=len(loaded.events), unit="event", file=sys.stderr, disable=None, desc="evaluate"
    ) as bar:
        result = evaluate(
            loaded.events, config, every=args.every, strategies=strategies, progress=bar.update
        )
    elapsed = time.perf_counter() - started
    logger.info("evaluated %d events in %.1f s", len(loaded.events), elapsed)

    report = result.to_json()
    report["run"] = {
        # A file name that is not UTF-8 cannot go into JSON as it is.
        "path": printable(str(args.path)),
        "format": args.format,
        "every": args.every,
        "repeat_purchases": args.repeat_purchases,
        "seconds": round(elapsed, 1),
        "load": loaded.summary(),
    }
    # The results go to stdout before the files, so that a file that cannot
    # be written after all does not lose them.
    if args.json:
        sys.stdout.write(orjson.dumps(report).decode() + "\n")
    else:
        sys.stdout.write(text_table(report))
    sys.stdout.flush()
    return _write_outputs(args, result, report)


def _write_outputs(args: argparse.Namespace, result: Evaluation, report: dict[str, Any]) -> int:
    """Write the --plot and --markdown files, and return 2 when one of them failed, else 0."""
    code = 0
    if args.plot:
        try:
            write_plot(result, args.plot, title=f"{printable(args.path.name)}, every {args.every}")
        except OSError as exc:
            _report_unwritten("--plot", args.plot, exc)
            code = 2
    if args.markdown:
        try:
            args.markdown.write_text(markdown_tables(report), encoding="utf-8")
        except OSError as exc:
            _report_unwritten("--markdown", args.markdown, exc)
            code = 2
    return code


def _report_unwritten(option: str, path: Path, exc: OSError) -> None:
    reason = exc.strerror or type(exc).__name__
    print(
        f"error: cannot write {option} {path} ({reason}); the results were printed to stdout",
        file=sys.stderr,
    )


def _cell(metrics: dict[str, Any], key: str = "hr@10") -> str:
    low, high = metrics["hr_ci95"]
    return f"{metrics[key]:.4f} ({metrics['hits']}/{metrics['n']}, {low:.4f}–{high:.4f})"


def text_table(report: dict[str, Any]) -> str:
    """Return one line per strategy: HR@10 with hits, n and 95% interval, then NDCG and MRR."""
    lines = [f"events {report['events']}, default strategy {report['default']}"]
    header = f"{'name':10} {'kind':8} {'all HR@10 (hits/n, 95% CI)':44} {'new HR@10':44} coverage"
    lines.append(header)
    for name, result in report["results"].items():
        lines.append(
            f"{name:10} {result['kind']:8} {_cell(result['all']):44} "
            f"{_cell(result['new']):44} {result['coverage']:.3f}"
        )
    return "\n".join(lines) + "\n"


def markdown_tables(report: dict[str, Any]) -> str:
    """Return the report as Markdown tables: all events, new to user, per event type."""
    run_info = report.get("run", {})
    out = [
        f"Events: {report['events']}; one event in {run_info.get('every')} evaluated; "
        f"repeat purchases: {run_info.get('repeat_purchases')}; default: `{report['default']}`; "
        f"run time {run_info.get('seconds')} s.",
        "",
        "| name | kind | all HR@10 | hits / n | 95% CI | all NDCG@10 | all MRR@10 "
        "| new HR@10 | hits / n | 95% CI | new NDCG@10 | new MRR@10 | coverage |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in report["results"].items():
        cells = [f"`{name}`", result["kind"]]
        for part in ("all", "new"):
            metrics = result[part]
            low, high = metrics["hr_ci95"]
            cells += [
                f"{metrics['hr@10']:.4f}",
                f"{metrics['hits']} / {metrics['n']}",
                f"{low:.4f}–{high:.4f}",
                f"{metrics['ndcg@10']:.4f}",
                f"{metrics['mrr@10']:.4f}",
            ]
        cells.append(f"{result['coverage']:.3f}")
        out.append("| " + " | ".join(cells) + " |")
    types = sorted({kind for result in report["results"].values() for kind in result["by_type"]})
    if len(types) > 1:
        out += ["", "All-events HR@10 by event type (hits / n):", ""]
        out.append("| name | " + " | ".join(types) + " |")
        out.append("| --- |" + " --- |" * len(types))
        for name, result in report["results"].items():
            cells = []
            for kind in types:
                metrics = result["by_type"].get(kind)
                cells.append(
                    "–"
                    if metrics is None
                    else f"{metrics['hr@10']:.4f} ({metrics['hits']} / {metrics['n']})"
                )
            out.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_plot(result: Evaluation, path: Path, title: str) -> None:
    """Write all-events HR@10 per slice of the stream, one line per strategy, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5))
    for name in result.results:
        starts, rates = result.timeline(name)
        style = "-" if strategy_kind(name) == "fusion" else ":"
        width = 2.2 if name == result.default else 1.2
        axes.plot(starts, rates, style, linewidth=width, label=name)
    axes.set_xlabel("event index")
    axes.set_ylabel("HR@10, all events")
    axes.set_title(title)
    axes.legend(ncol=2, fontsize="small")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=110)
    finally:
        plt.close(figure)
    logger.info("wrote plot %s", path)


def main(argv: list[str] | None = None) -> int:
    """Run ``evaluate`` on its own, for use without the ``fusionrec`` entry point."""
    parser = argparse.ArgumentParser(prog="fusionrec evaluate", description=CLI_DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
