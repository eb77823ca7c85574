"""Produce the events of a file to Kafka in event-time order.

``fusionrec replay PATH --format taobao|online-retail|diginetica|jsonl`` reads a plain or
gzip file with `stream.sources.read_events`, which maps rows to events, skips
and counts invalid rows and sorts the events by event time. Each event is sent
as JSON to ``events.{type}`` with the UTF-8 bytes of its user_id as the key,
so that all events of a user land on one partition in order. ``--dry-run``
reads and validates without connecting to Kafka. The summary counts rows read,
events produced and rows skipped by reason, and shows the first skipped rows
of each reason with their line, the value read and what was expected;
``--json`` prints it as one JSON object on stdout.

The Kafka message timestamp is the time of sending, not the event time,
because the broker's time-based retention would delete old event times, such
as those of a 2017 data set, at once.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, UnsupportedVersionError
from tqdm import tqdm

from schemas import Event
from stream.kafka import CONNECT_TIMEOUT_S, client_options
from stream.settings import Service, Settings, SettingsError, check_bootstrap
from stream.sources import FORMATS, LoadResult, Rejection, SourceError, printable, read_events
from stream.topics import EVENT_TOPICS

logger = logging.getLogger(__name__)

# Description shown by `fusionrec replay --help`, in plain text because
# argparse prints it as it is.
CLI_DESCRIPTION = (
    "Produce the events of a file to Kafka in event-time order, keyed by user id, to"
    " the topics events.view, events.click and events.purchase. Rows that the worker"
    " would reject are skipped and counted by reason. With --dry-run the file is only"
    " read and validated, and no broker is needed."
)

# Deliveries awaited at once; bounds the memory of pending futures.
MAX_IN_FLIGHT = 20_000
# Seconds without a confirmed delivery after which a replay gives up: the
# producer retries a batch for as long as the broker stays away.
DELIVERY_TIMEOUT_S = 30.0
# The maximum wait for the producer to stop once the replay ends.
_STOP_WAIT_S = 5.0


class ReplayError(RuntimeError):
    """The events cannot be produced: no broker, a missing topic, or failed deliveries."""


class TokenBucket:
    """Limit a rate of events per second, allowing a burst of ``burst`` events.

    `take` returns how long to wait before the next event may be sent, so the
    caller decides how to sleep. ``clock`` returns seconds and is replaceable
    in tests.

    >>> now = [0.0]
    >>> bucket = TokenBucket(rate_per_s=2.0, burst=1.0, clock=lambda: now[0])
    >>> bucket.take(), bucket.take()
    (0.0, 0.5)
    >>> now[0] = 10.0
    >>> bucket.take()
    0.0
    """

    def __init__(
        self, rate_per_s: float, burst: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not rate_per_s > 0:
            msg = f"rate is {rate_per_s} events per second; expected a positive number"
            raise ValueError(msg)
        if burst < 1:
            msg = f"burst is {burst} events; expected at least 1"
            raise ValueError(msg)
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def take(self) -> float:
        """Take one token and return the seconds to wait until it is available."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate_per_s)
        self._last = now
        self._tokens -= 1.0
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate_per_s


@dataclass
class ReplaySummary:
    """Counts of one replay, printed at the end."""

    path: str
    fmt: str
    dry_run: bool
    rows_read: int = 0
    events: int = 0
    selected: int = 0
    produced: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_examples: dict[str, list[Rejection]] = field(default_factory=dict)
    failed: Counter[str] = field(default_factory=Counter)
    by_topic: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    # Events left out at the start with --skip.
    skip: int = 0
    # Where a replay that stopped on failed deliveries can resume, as the
    # --skip value: every event before it was delivered.
    resume_from: int | None = None
    # Why the replay stopped early, and its exit code then.
    error: str | None = None
    exit_code: int = 0

    def to_json(self) -> dict[str, Any]:
        """Return the summary as one JSON-ready object with nested counts."""
        out = {
            "path": self.path,
            "format": self.fmt,
            "dry_run": self.dry_run,
            "rows_read": self.rows_read,
            "events": self.events,
            "selected": self.selected,
            "produced": self.produced,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_total": sum(self.skipped.values()),
            "skipped_examples": {
                reason: [rejection.to_json() for rejection in self.skipped_examples[reason]]
                for reason in sorted(self.skipped_examples)
            },
            "failed": dict(sorted(self.failed.items())),
            "by_topic": dict(sorted(self.by_topic.items())),
            "elapsed_s": round(self.elapsed_s, 3),
            "skip": self.skip,
            "resume_from": self.resume_from,
            "exit_code": self.exit_code,
        }
        if self.error is not None:
            out["error"] = self.error
        return out

    def to_text(self) -> str:
        """Return the summary as lines for a terminal."""
        lines = [
            f"rows read   {self.rows_read}",
            f"events      {self.events} valid, {self.selected} selected",
            f"produced    {self.produced}" + (" (dry run)" if self.dry_run else ""),
        ]
        # One count column for all sections, wide enough for topic names with
        # a FUSIONREC_TOPIC_PREFIX.
        names = [*self.by_topic, *self.skipped, *self.failed]
        width = max([22, *(len(name) for name in names)])
        for topic, count in sorted(self.by_topic.items()):
            lines.append(f"  {topic:<{width}} {count}")
        lines.append(f"skipped     {sum(self.skipped.values())}")
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  {reason:<{width}} {count}")
            for rejection in self.skipped_examples.get(reason, []):
                lines.append(f"    {rejection}")
        if self.failed:
            lines.append(f"failed      {sum(self.failed.values())}")
            for error, count in sorted(self.failed.items()):
                lines.append(f"  {error:<{width}} {count}")
        if self.resume_from is not None:
            lines.append(f"resume with --skip {self.resume_from}")
        lines.append(f"elapsed     {self.elapsed_s:.1f} s")
        return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``fusionrec replay`` to ``parser``."""
    parser.add_argument("path", help="file or pipe to replay, plain or gzip")
    parser.add_argument("--format", dest="fmt", required=True, choices=FORMATS, help="file format")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="EVENTS_PER_S",
        help="maximum events sent per second (default: as fast as the broker accepts)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="read and validate the file without producing"
    )
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N", help="produce only the first N events"
    )
    parser.add_argument(
        "--skip",
        type=int,
        default=0,
        metavar="N",
        help="leave out the first N events, to resume a replay that stopped (default: 0)",
    )
    parser.add_argument(
        "--bootstrap-servers",
        default=None,
        metavar="HOST:PORT[,...]",
        help="Kafka brokers (default: FUSIONREC_KAFKA_BOOTSTRAP, then 127.0.0.1:9092)",
    )
    parser.add_argument(
        "--delivery-timeout",
        type=float,
        default=DELIVERY_TIMEOUT_S,
        metavar="SECONDS",
        help=(
            "give up when the broker confirms no delivery for this long "
            f"(default: {DELIVERY_TIMEOUT_S:g})"
        ),
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``fusionrec replay``; return 0 on success, 1 on failed deliveries, 2 on bad input."""
    for flag, value in (("--limit", args.limit), ("--skip", args.skip)):
        if value is not None and value < 0:
            return _reject(args, f"{flag} is {value}; expected 0 or more")
    for flag, value in (("--rate", args.rate), ("--delivery-timeout", args.delivery_timeout)):
        if value is not None and not 0 < value < math.inf:
            return _reject(args, f"{flag} is {value}; expected a positive number")
    if args.bootstrap_servers is not None:
        try:
            check_bootstrap(args.bootstrap_servers, "--bootstrap-servers")
        except SettingsError as exc:
            return _reject(args, str(exc))
    # A dry run connects to no service, and the flag replaces the variable,
    # whose value then needs no check.
    environ = dict(os.environ)
    if args.bootstrap_servers is not None:
        environ["FUSIONREC_KAFKA_BOOTSTRAP"] = args.bootstrap_servers
    services = Service.NONE if args.dry_run else Service.KAFKA
    settings = Settings.from_env(environ, services=services)
    bootstrap = settings.kafka_bootstrap

    started = time.monotonic()
    try:
        loaded = read_events(args.path, args.fmt)
    except (SourceError, OSError, UnicodeDecodeError) as exc:
        return _reject(args, f"cannot read {printable(args.path)}: {exc}")
    except KeyboardInterrupt:
        print("fusionrec replay: interrupted while reading; nothing was sent", file=sys.stderr)
        return 130
    _skip_future(loaded, time.time() + settings.max_future_skew_s)
    if not loaded.events:
        first = loaded.examples["timestamp_in_future"][0]
        return _reject(
            args,
            f"none of the {loaded.rows_read} rows of {args.path} is an event the worker "
            f"would take (skipped: {dict(loaded.skipped)}; first: {first})",
        )
    summary = _summary_of(args, loaded)
    summary.skip = args.skip
    events = loaded.events[args.skip :]
    if args.limit is not None:
        events = events[: args.limit]
    summary.selected = len(events)

    if args.dry_run:
        for event in events:
            summary.by_topic[settings.topic(EVENT_TOPICS[event.type])] += 1
    else:
        try:
            asyncio.run(
                produce_events(
                    events,
                    settings,
                    bootstrap,
                    summary,
                    rate_per_s=args.rate,
                    progress=not args.no_progress,
                    delivery_timeout_s=args.delivery_timeout,
                )
            )
        except ReplayError as exc:
            print(f"fusionrec replay: {exc}", file=sys.stderr)
            summary.elapsed_s = time.monotonic() - started
            summary.error, summary.exit_code = str(exc), 1
            if summary.resume_from is None:
                # Nothing was delivered, as when no broker could be reached.
                summary.resume_from = summary.skip + summary.produced
            _print_summary(summary, as_json=args.json)
            return 1
        except KeyboardInterrupt:
            return _interrupted(args, summary, started, "interrupted", 130)
        except asyncio.CancelledError:
            return _interrupted(args, summary, started, "terminated", 143)
    summary.elapsed_s = time.monotonic() - started
    summary.exit_code = 1 if summary.failed else 0
    _print_summary(summary, as_json=args.json)
    return summary.exit_code


async def produce_events(
    events: Sequence[Event],
    settings: Settings,
    bootstrap: str,
    summary: ReplaySummary,
    *,
    rate_per_s: float | None = None,
    progress: bool = True,
    delivery_timeout_s: float = DELIVERY_TIMEOUT_S,
) -> None:
    """Send ``events`` in order to their topics and count deliveries in ``summary``.

    The replay stops at the first batch with a failed delivery, or with
    deliveries that the broker has not confirmed after
    ``delivery_timeout_s`` without progress, instead of sending the rest of
    the file to a broker that takes nothing. ``summary.resume_from`` then gives the
    --skip value that resumes it: every event before that one was
    delivered, and of those after it, only the ones of the same batch may
    be sent twice. A batch spans at most the worker's de-duplication window
    of event time (``FUSIONREC_DEDUP_WINDOW_S``), so the worker still
    remembers their ids and drops them. A replay cancelled by Ctrl-C or
    SIGTERM counts the deliveries confirmed by then and sets
    ``summary.resume_from`` the same way before the cancellation goes on.

    Raises
    ------
    ReplayError
        If the broker cannot be reached, an event topic does not exist, or
        a delivery failed.

    """
    in_flight: list[tuple[asyncio.Future[Any], str, int]] = []
    with _sigterm_cancels(asyncio.get_running_loop()):
        producer = await _start_producer(settings, bootstrap)
        try:
            await _check_topics(producer, settings, bootstrap)
            await _send_events(
                producer,
                events,
                settings,
                summary,
                in_flight,
                rate_per_s,
                progress,
                delivery_timeout_s,
            )
        except asyncio.CancelledError:
            # Stopping first lets the producer deliver what it holds, within
            # its wait. A second signal may cut that wait short, and the
            # count still runs.
            try:
                await _stop_producer(producer, delivery_timeout_s)
            finally:
                _count_interrupted(in_flight, summary)
            raise
        finally:
            await _stop_producer(producer, delivery_timeout_s)


async def _send_events(
    producer: AIOKafkaProducer,
    events: Sequence[Event],
    settings: Settings,
    summary: ReplaySummary,
    in_flight: list[tuple[asyncio.Future[Any], str, int]],
    rate_per_s: float | None,
    progress: bool,
    delivery_timeout_s: float,
) -> None:
    """Send ``events`` in batches, keeping the deliveries not yet counted in ``in_flight``."""
    bucket = TokenBucket(rate_per_s, burst=max(1.0, rate_per_s / 10)) if rate_per_s else None
    window_ms = int(settings.dedup_window_s * 1000)
    batch_size = min(MAX_IN_FLIGHT, settings.dedup_max_entries)
    batch_start_ms = 0
    with tqdm(
        total=len(events), unit="ev", file=sys.stderr, disable=not progress, smoothing=0.1
    ) as bar:
        for index, event in enumerate(events, start=summary.skip):
            if in_flight and event.timestamp_ms - batch_start_ms > window_ms:
                await _collect(in_flight, summary, bar, delivery_timeout_s)
                _stop_on_failure(summary)
            if not in_flight:
                batch_start_ms = event.timestamp_ms
            if bucket is not None:
                wait_s = bucket.take()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
            topic = settings.topic(EVENT_TOPICS[event.type])
            try:
                future = await producer.send(
                    topic,
                    orjson.dumps(event.to_json()),
                    key=event.user_id.encode("utf-8"),
                )
            except KafkaError as exc:
                # Not taken at all, as when no broker gives the metadata.
                failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                failed.set_exception(exc)
                future = failed
            in_flight.append((future, topic, index))
            if len(in_flight) >= batch_size or future.done() and future.exception():
                await _collect(in_flight, summary, bar, delivery_timeout_s)
                _stop_on_failure(summary)
        await _collect(in_flight, summary, bar, delivery_timeout_s)
        _stop_on_failure(summary)


@contextlib.contextmanager
def _sigterm_cancels(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Let SIGTERM cancel the current task, as Ctrl-C does, and restore the handler after.

    Only the main thread can take signals, so elsewhere this does nothing.
    """
    task = asyncio.current_task(loop)
    if task is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)


async def _stop_producer(producer: AIOKafkaProducer, delivery_timeout_s: float) -> None:
    # Stopping flushes what the producer still contains, which waits for as
    # long as the broker stays away, and what it contains then is counted as
    # failed already. A second call returns at once.
    stop_s = min(delivery_timeout_s, _STOP_WAIT_S)
    try:
        await asyncio.wait_for(producer.stop(), stop_s)
    except TimeoutError:
        logger.warning("producer not stopped within %.0f s; leaving it", stop_s)


def _count_interrupted(
    in_flight: list[tuple[asyncio.Future[Any], str, int]], summary: ReplaySummary
) -> None:
    """Count the deliveries of a cancelled replay and set where it resumes.

    Every batch before ``in_flight`` was delivered whole, or the replay
    would have stopped on it. It resumes at the first event of
    ``in_flight`` whose delivery is not confirmed, or after the last one.
    """
    resume_from = summary.skip + summary.produced + len(in_flight)
    for future, topic, index in in_flight:
        error = future.exception() if future.done() and not future.cancelled() else None
        if future.done() and not future.cancelled() and error is None:
            summary.produced += 1
            summary.by_topic[topic] += 1
            continue
        if error is not None:
            summary.failed[type(error).__name__] += 1
        resume_from = min(resume_from, index)
    in_flight.clear()
    if summary.resume_from is None or resume_from < summary.resume_from:
        summary.resume_from = resume_from


def _interrupted(
    args: argparse.Namespace, summary: ReplaySummary, started: float, how: str, code: int
) -> int:
    """Report a replay stopped by Ctrl-C or SIGTERM with its resume point; return ``code``."""
    if summary.resume_from is None:
        # Stopped before the first send, as while connecting to the broker.
        summary.resume_from = summary.skip + summary.produced
    message = (
        f"{how} after {summary.produced} delivered events; resume with --skip {summary.resume_from}"
    )
    print(f"fusionrec replay: {message}", file=sys.stderr)
    summary.elapsed_s = time.monotonic() - started
    summary.error, summary.exit_code = message, code
    _print_summary(summary, as_json=args.json)
    return code


def _stop_on_failure(summary: ReplaySummary) -> None:
    if summary.resume_from is None:
        return
    msg = (
        f"{sum(summary.failed.values())} deliveries failed, so the replay stopped after "
        f"{summary.produced} delivered events; once the broker takes events again, resume "
        f"with --skip {summary.resume_from}"
    )
    raise ReplayError(msg)


async def _start_producer(settings: Settings, bootstrap: str) -> AIOKafkaProducer:
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "acks": "all",
        "linger_ms": 20,
        "max_batch_size": 256 * 1024,
        "client_id": "fusionrec-replay",
        **client_options(settings),
    }
    for idempotent in (True, False):
        producer = AIOKafkaProducer(enable_idempotence=idempotent, **options)
        try:
            await asyncio.wait_for(producer.start(), CONNECT_TIMEOUT_S)
        except UnsupportedVersionError:
            await producer.stop()
            logger.warning("broker does not support idempotent producers; sending without")
            continue
        except asyncio.CancelledError:
            await producer.stop()
            raise
        except (KafkaError, OSError, TimeoutError) as exc:
            await producer.stop()
            msg = (
                f"cannot connect to Kafka at {bootstrap}: {exc!r}; start the broker "
                "(make services-up) or set --bootstrap-servers / FUSIONREC_KAFKA_BOOTSTRAP"
            )
            raise ReplayError(msg) from exc
        logger.info("producing to %s (idempotent=%s)", bootstrap, idempotent)
        return producer
    msg = f"cannot start a producer for Kafka at {bootstrap}"
    raise ReplayError(msg)


async def _check_topics(producer: AIOKafkaProducer, settings: Settings, bootstrap: str) -> None:
    # The broker does not create topics on first use, and a send to a missing
    # topic would wait for the request timeout on every event.
    metadata = await producer.client.fetch_all_metadata()
    wanted = [settings.topic(name) for name in EVENT_TOPICS.values()]
    missing = sorted(set(wanted) - set(metadata.topics()))
    if missing:
        msg = (
            f"topic(s) {', '.join(missing)} do not exist on {bootstrap}; "
            "create them with `fusionrec topics --create`"
        )
        raise ReplayError(msg)


async def _collect(
    in_flight: list[tuple[asyncio.Future[Any], str, int]],
    summary: ReplaySummary,
    bar: tqdm,
    timeout_s: float,
) -> None:
    """Wait for the deliveries of ``in_flight`` and count them; give up after a stall.

    A delivery still unconfirmed once ``timeout_s`` passed without any other
    delivery confirmed counts as failed with ``DeliveryTimeout``.
    """
    pending = {future for future, _, _ in in_flight}
    while pending:
        done, pending = await asyncio.wait(pending, timeout=timeout_s)
        if not done:
            break
    first_error: BaseException | None = None
    for future, topic, index in in_flight:
        if not future.done():
            error: BaseException | None = TimeoutError(f"no delivery confirmed for {timeout_s:g} s")
            name = "DeliveryTimeout"
        else:
            error = future.exception()
            name = type(error).__name__
        if error is not None:
            summary.failed[name] += 1
            first_error = first_error or error
            if summary.resume_from is None or index < summary.resume_from:
                summary.resume_from = index
        else:
            summary.produced += 1
            summary.by_topic[topic] += 1
    if first_error is not None:
        logger.error(
            "%d deliveries failed so far; first error: %r",
            sum(summary.failed.values()),
            first_error,
        )
    bar.update(len(in_flight))
    in_flight.clear()


def _skip_future(loaded: LoadResult, limit_s: float) -> None:
    """Skip the events that the worker would reject as stamped after ``limit_s``.

    The worker checks its clock plus ``FUSIONREC_MAX_FUTURE_SKEW_S``, and the
    replay uses its own clock, so a row near the limit may fare otherwise.
    """
    limit_ms = int(limit_s * 1000)
    # The events are in time order, so the future ones are the last.
    in_time = bisect.bisect_right(loaded.events, limit_ms, key=_event_time)
    for event in loaded.events[in_time:]:
        detail = (
            f"event {event.event_id} has timestamp {event.timestamp_ms}, after "
            f"{limit_ms}; expected at most FUSIONREC_MAX_FUTURE_SKEW_S ahead of the "
            "replay's clock, in epoch milliseconds"
        )
        loaded.skip(Rejection("timestamp_in_future", detail))
    del loaded.events[in_time:]


def _event_time(event: Event) -> int:
    return event.timestamp_ms


def _summary_of(args: argparse.Namespace, loaded: LoadResult) -> ReplaySummary:
    return ReplaySummary(
        path=printable(str(args.path)),
        fmt=args.fmt,
        dry_run=args.dry_run,
        rows_read=loaded.rows_read,
        events=len(loaded.events),
        skipped=Counter(loaded.skipped),
        skipped_examples={reason: list(found) for reason, found in loaded.examples.items()},
    )


def _reject(args: argparse.Namespace, message: str) -> int:
    """Report input that the replay cannot use, also as JSON with --json; return 2."""
    message = printable(message)
    print(f"fusionrec replay: {message}", file=sys.stderr)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps({"error": message, "exit_code": 2}) + b"\n")
        sys.stdout.flush()
    return 2


def _print_summary(summary: ReplaySummary, *, as_json: bool) -> None:
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(summary.to_json()) + b"\n")
        sys.stdout.flush()
    else:
        print(summary.to_text())
