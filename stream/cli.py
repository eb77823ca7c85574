"""The ``fusionrec`` command line."""

from __future__ import annotations

import os

# The models score one user or one small batch at a time, and a threaded
# BLAS spends longer waking its threads than computing such products (a
# 60k-item matrix-vector product took 2.9 ms with two threads and 0.19 ms
# with one on a 2-core machine). It must be set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import asyncio
import contextlib
import datetime
import importlib
import logging
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from schemas import SchemaError, decode_forget
from stream.logs import configure_logging
from stream.settings import _LOG_LEVELS as LOG_LEVELS
from stream.settings import SETTINGS_DOC, Service, Settings, SettingsError

if TYPE_CHECKING:
    import faust

logger = logging.getLogger(__name__)

# Subcommands implemented in their own modules: name -> (module, help).
_MODULE_COMMANDS = {
    "replay": ("stream.replay", "produce the events of a file to Kafka in event-time order"),
    "evaluate": ("stream.evaluate", "prequential evaluation of every model and fusion on a file"),
    "bench": ("stream.bench", "measure throughput, freshness and memory against real services"),
}


def _worker(args: argparse.Namespace) -> int:
    from stream.app import BrokerUnreachableError, GroupBusyError, RegistryKeyError, Worker
    from stream.checkpoint import CheckpointFormatError

    settings = Settings.from_env()
    problem = _local_problem(settings)
    if problem is not None:
        print(f"fusionrec worker: {problem}", file=sys.stderr)
        return 2
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = Worker(settings)
    try:
        worker.restore()
    except CheckpointFormatError as exc:
        print(f"fusionrec worker: {exc}", file=sys.stderr)
        return 2
    try:
        loop.run_until_complete(worker.check_registry_key())
        # Both run before Faust joins the group, so that no event is consumed
        # from misaligned offsets or learned for a user who asked to be forgotten.
        loop.run_until_complete(worker.align_committed_offsets())
        loop.run_until_complete(worker.load_forgotten())
    except RegistryKeyError as exc:
        print(f"fusionrec worker: {exc}", file=sys.stderr)
        return 2
    except (GroupBusyError, BrokerUnreachableError) as exc:
        print(f"fusionrec worker: {exc}", file=sys.stderr)
        return 1

    faust_worker = build_faust_worker(worker.app, loop, settings.log_level)
    try:
        faust_worker.execute_from_commandline()
    except SystemExit:
        # Faust exits with 0 after a clean stop, even when the worker stopped
        # itself or the final checkpoint failed.
        if worker.fatal_error is None and not worker.checkpoint_failed:
            raise
    if worker.fatal_error is not None:
        return 2
    return 1 if worker.checkpoint_failed else 0


def _local_problem(settings: Settings) -> str | None:
    """Return why the worker cannot use its data folder or web port here, or None.

    Both would otherwise fail deep inside Faust, with a traceback that names
    neither setting.
    """
    folder = settings.data_path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return f"FUSIONREC_DATA_DIR is {str(folder)!r}, which is not a writable folder ({reason})"
    with socket.socket() as listener:
        # As the web server binds: a connection of an earlier run still in
        # TIME_WAIT does not block the port, a listening server does.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((settings.web_host, settings.web_port))
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            return (
                f"FUSIONREC_WEB_PORT is {settings.web_port}, which cannot be bound on "
                f"{settings.web_host} ({reason}); stop what uses it or choose another port"
            )
    return None


def output_problem(option: str, path: Path) -> str | None:
    """Return why the file ``path`` given to ``option`` cannot be written, or None.

    Commands call this before a long run, so that a bad path does not cost
    the run's results. The check creates the file only where none exists,
    and removes what it created, so a file that exists or that another
    program creates meanwhile keeps its content. An existing file is opened
    for appending without blocking, so a named pipe without a reader is
    reported instead of waiting.
    """
    if not path.parent.is_dir():
        return f"{option} {path}: no folder {path.parent}"
    if path.is_dir():
        return f"{option} {path} is a folder; expected a file name"
    try:
        created = _open_for_check(path)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return f"{option} {path} cannot be written ({reason}); choose another file"
    if created:
        path.resolve().unlink(missing_ok=True)
    return None


def _open_for_check(path: Path) -> bool:
    """Open ``path`` for writing and close it; return True when this created the file."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        pass
    else:
        return True
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))
    except FileNotFoundError:
        if not path.is_symlink():
            raise
    else:
        return False
    # O_EXCL refuses every symbolic link, and this one names a file that
    # does not exist yet. Another program may create it meanwhile, and
    # then its file is kept.
    try:
        os.close(os.open(path.resolve(), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        return False
    return True


def build_faust_worker(
    app: faust.App, loop: asyncio.AbstractEventLoop, log_level: str
) -> faust.Worker:
    """Build the Faust worker that runs ``app`` on ``loop``, keeping the project's logging."""
    import faust

    faust_worker = faust.Worker(app, loop=loop, loglevel=log_level.upper(), override_logging=False)
    # Faust's terminal spinner (faust-streaming 0.15) writes a backspace, a
    # cursor escape code and " OK ^" to stdout once the worker is ready, even
    # when stdout is a log file. Without it, Faust logs "Ready" instead.
    faust_worker.spinner = None
    return faust_worker


def _user_id_problem(user_id: str) -> str | None:
    """Return why ``user_id`` cannot be sent to Kafka or Redis, or None.

    Python decodes argument bytes that are not valid UTF-8 into lone
    surrogates, which neither orjson nor redis-py can encode.
    """
    try:
        user_id.encode("utf-8")
    except UnicodeEncodeError:
        return (
            f"user id {user_id!r} is not valid UTF-8 text; give the id in UTF-8, for example"
            " from a terminal with a UTF-8 locale"
        )
    return None


def _recs(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError, ResponseError

    from stream.reader import ListFormatError, read_list

    if bool(args.user) == args.popular:
        print("fusionrec recs: give either a user id or --popular", file=sys.stderr)
        return 2
    problem = _user_id_problem(args.user)
    if problem is not None:
        print(f"fusionrec recs: {problem}", file=sys.stderr)
        return 2
    settings = Settings.from_env(services=Service.REDIS)
    try:
        value = asyncio.run(read_list(settings, args.user, popular=args.popular))
    except ListFormatError as exc:
        print(f"fusionrec recs: {exc}", file=sys.stderr)
        return 1
    except ResponseError as exc:
        # Redis replied, so it runs: the key is of another type, such as a hash.
        print(
            f"fusionrec recs: Redis refused to read the list: {exc}; expected a string key"
            " that the worker wrote",
            file=sys.stderr,
        )
        return 1
    except (RedisError, OSError) as exc:
        url = settings.masked()["FUSIONREC_REDIS_URL"]
        reason = str(exc).rstrip(".")
        print(
            f"fusionrec recs: cannot read from Redis at {url}: {reason}; start it with"
            " `make services-up` or set FUSIONREC_REDIS_URL",
            file=sys.stderr,
        )
        return 1
    if value is None:
        popular_key = f"{settings.redis_key_prefix}popular"
        if args.popular:
            message = (
                f"no list in Redis at {popular_key}; the worker writes it once it has "
                "learned events"
            )
        else:
            message = (
                f"no list in Redis for user {args.user!r}; a user with no list yet is "
                f"served {popular_key} (fusionrec recs --popular)"
            )
        print(message, file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    print(f"{'rank':>4}  {'item_id':<24} {'score':>10}  sources")
    for rank, entry in enumerate(value["items"], start=1):
        sources = ",".join(entry["sources"])
        print(f"{rank:>4}  {entry['item_id']:<24} {entry['score']:>10.4f}  {sources}")
    print(f"{_computed_at_text(value['computed_at'])} model_version={value['model_version']}")
    return 0


def _computed_at_text(computed_at_ms: int) -> str:
    """Format epoch milliseconds as UTC time and milliseconds, or as milliseconds alone.

    The schema allows any non-negative integer, but datetime ends with the
    year 9999.
    """
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    try:
        computed_at = epoch + datetime.timedelta(milliseconds=computed_at_ms)
    except OverflowError:
        return f"computed_at={computed_at_ms} ms (after the year 9999, so not shown as a date)"
    iso = computed_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return f"computed_at={iso} ({computed_at_ms} ms)"


def _forget(args: argparse.Namespace) -> int:
    from stream.reader import ForgetError, request_forget

    settings = Settings.from_env(services=Service.KAFKA)
    problem = _user_id_problem(args.user)
    if problem is not None:
        print(f"fusionrec: invalid forget request: {problem}", file=sys.stderr)
        return 2
    # The worker would reject an invalid request to the dead-letter topic, so
    # it is checked here first, with the same decoder.
    request = orjson.dumps({"user_id": args.user, "timestamp": int(time.time() * 1000)})
    try:
        decode_forget(request)
    except SchemaError as exc:
        print(f"fusionrec: invalid forget request: {exc.detail}", file=sys.stderr)
        return 2
    try:
        with _client_logs_quiet():
            asyncio.run(request_forget(settings, args.user))
    except ForgetError as exc:
        print(f"fusionrec forget: {exc}", file=sys.stderr)
        return 1
    print("forget request sent; the worker erases the user within a second of reading it")
    return 0


def _settings(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    for name, value in settings.masked().items():
        doc = SETTINGS_DOC.get(name.removeprefix("FUSIONREC_").lower(), "")
        print(f"{name}={value}    # {doc}")
    return 0


def _topics(args: argparse.Namespace) -> int:
    from stream.topics import run as topics_run

    with _client_logs_quiet():
        return topics_run(create=args.create, list_names=not args.create)


@contextlib.contextmanager
def _client_logs_quiet() -> Iterator[None]:
    """Hide the Kafka client's log lines below CRITICAL unless the log level is DEBUG.

    One-shot commands print one error line of their own that names the
    bootstrap servers, so the client's connection errors would only repeat it.
    """
    client = logging.getLogger("aiokafka")
    level = client.level
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        client.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        client.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="fusionrec",
        description="Streaming recommender: Kafka events in, fused top-k lists in Redis out.",
    )
    parser.add_argument(
        "--log-level",
        # DEBUG and debug are one level, as they were before the flag had choices.
        type=str.lower,
        choices=LOG_LEVELS,
        default=None,
        help="log level (default: FUSIONREC_LOG_LEVEL, or info when it is unset)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = commands.add_parser("worker", help="run the Faust worker")
    worker.set_defaults(handler=_worker)

    recs = commands.add_parser("recs", help="print a user's list from Redis")
    recs.add_argument(
        "user", nargs="?", default="", help="the shop's user id (leave out with --popular)"
    )
    recs.add_argument("--popular", action="store_true", help="print recs:popular instead")
    recs.add_argument("--json", action="store_true", help="print the stored JSON value")
    recs.set_defaults(handler=_recs)

    forget = commands.add_parser("forget", help="erase a user (sends a users.forget request)")
    forget.add_argument("user", help="the shop's user id")
    forget.set_defaults(handler=_forget)

    show = commands.add_parser("settings", help="print the effective FUSIONREC_ settings")
    show.set_defaults(handler=_settings)

    topics = commands.add_parser("topics", help="list or create the Kafka topics")
    topics.add_argument("--create", action="store_true", help="create missing topics")
    topics.set_defaults(handler=_topics)

    for name, (module_name, help_text) in _MODULE_COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        sub = commands.add_parser(name, help=help_text, description=module.CLI_DESCRIPTION)
        module.add_arguments(sub)
        sub.set_defaults(handler=_module_handler(module.run))
    return parser


def _module_handler(run: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fusionrec`` command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Logging needs no service settings. Each command checks those of the
        # services it connects to.
        settings = Settings.from_env(services=Service.NONE)
        configure_logging(args.log_level or settings.log_level, settings.log_format)
        code: int = args.handler(args)
    except SettingsError as exc:
        print(f"fusionrec: invalid setting: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of stdout went away, as `fusionrec recs USER | head`
        # does. Python would report the pipe again when it flushes stdout at
        # exit, so stdout is pointed at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
