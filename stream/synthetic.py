"""Generate a deterministic sample of storefront events for demos and tests.

The sample imitates the shape of real shop traffic without copying any data
set. Item popularity follows a Zipf law, and every item has one category and
one price. Users differ in activity and prefer a few categories. Each user's
events come in sessions that run through a view, click and purchase funnel.
Sessions of different users interleave, and event times never decrease.

The same arguments give the same events on every run. The only random draw is
`random.Random.random`, whose sequence for a seed Python keeps across
versions, so the sample stays the same after an upgrade too.

Write a sample file with ``python -m stream.synthetic demo-data/sample.jsonl.gz``
and replay it with ``fusionrec replay demo-data/sample.jsonl.gz --format jsonl``.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from io import BufferedIOBase
from pathlib import Path
from typing import Final

import orjson

from schemas import Event
from schemas.events import MIN_TIMESTAMP_MS
from stream.logs import configure_logging
from stream.sources import ClosingGzip

logger = logging.getLogger("stream.synthetic")

# 2025-01-01T00:00:00Z: a fixed start keeps the sample reproducible.
DEFAULT_START_MS: Final = 1_735_689_600_000
DEFAULT_SPAN_MS: Final = 14 * 24 * 3600 * 1000
ITEM_ZIPF_EXPONENT: Final = 1.05
CATEGORY_ZIPF_EXPONENT: Final = 0.8
MEAN_SESSION_EVENTS: Final = 8.0
MAX_SESSION_EVENTS: Final = 200
MEAN_GAP_MS: Final = 40_000.0
MAX_GAP_MS: Final = 15 * 60 * 1000
# Share of a session's new views taken from the user's favourite categories;
# the rest follow global popularity.
FAVOURITE_SHARE: Final = 0.75
# Chance that a session's next view returns to an item viewed before in it.
REVISIT_CHANCE: Final = 0.15
CLICK_CHANCE: Final = 0.3
PURCHASE_CHANCE: Final = 0.35
CURRENCY: Final = "EUR"


@dataclass(frozen=True)
class _Catalog:
    item_ids: list[str]
    item_category: list[int]
    item_price: list[float]
    category_names: list[str]
    item_cumulative: list[float]
    category_items: list[list[int]]
    category_cumulative: list[list[float]]
    category_popularity: list[float]


@dataclass
class _Session:
    session_id: str
    user: int
    favourites: list[int]
    remaining: int
    time_ms: float
    viewed: list[int]
    pending: list[tuple[str, int]]


def generate_events(
    n_events: int,
    n_users: int,
    n_items: int,
    seed: int = 0,
    start_ms: int = DEFAULT_START_MS,
    *,
    span_ms: int = DEFAULT_SPAN_MS,
    now_ms: int | None = None,
) -> Iterator[Event]:
    """Generate ``n_events`` storefront events in event-time order.

    Parameters
    ----------
    n_events
        Number of events to generate; 0 gives none.
    n_users
        Size of the user population, ids ``u0`` to ``u{n_users - 1}``. Users
        differ in activity, so some of them may have no event.
    n_items
        Size of the catalog, ids ``i0`` to ``i{n_items - 1}``.
    seed
        Seed of the generator; the same arguments always give the same events.
    start_ms
        Time of the earliest possible event, in epoch milliseconds.
    span_ms
        Every event time lies in ``[start_ms, start_ms + span_ms]``.
    now_ms
        The current time in epoch milliseconds, used only to check that the
        sample ends in the past; defaults to the system clock.

    Returns
    -------
    Iterator[Event]
        Events with non-decreasing ``timestamp_ms``, ids ``syn{seed}-{index}``
        and a session id; clicks and purchases carry a price, purchases a
        quantity.

    Raises
    ------
    ValueError
        If a size is negative or zero, or the span would end after ``now_ms``.

    Examples
    --------
    >>> events = list(generate_events(200, n_users=20, n_items=50, seed=7))
    >>> len(events)
    200
    >>> all(a.timestamp_ms <= b.timestamp_ms for a, b in zip(events, events[1:]))
    True
    >>> [e.event_id for e in events[:2]]
    ['syn7-0', 'syn7-1']
    >>> events == list(generate_events(200, n_users=20, n_items=50, seed=7))
    True

    """
    _check_sizes(n_events, n_users, n_items, span_ms)
    end_ms = start_ms + span_ms
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if end_ms > now:
        msg = (
            f"start_ms {start_ms} plus span_ms {span_ms} ends at {end_ms}, after the "
            f"current time {now}; expected a sample that ends in the past"
        )
        raise ValueError(msg)
    return _generate(n_events, n_users, n_items, seed, start_ms, end_ms)


def write_jsonl(path: str | Path, events: Iterable[Event]) -> int:
    """Write events as JSON lines of the wire contract and return how many were written.

    A name ending in ``.gz`` is gzip-compressed. The file is written under a
    temporary name and renamed when complete, so a reader never sees half a
    sample.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_jsonl(folder / "sample.jsonl", generate_events(10, 3, 5, seed=1))
    10
    >>> len((folder / "sample.jsonl").read_text().splitlines())
    10

    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    count = 0
    try:
        with _open_binary(partial, gzipped=target.suffix == ".gz") as handle:
            for event in events:
                handle.write(orjson.dumps(event.to_json()))
                handle.write(b"\n")
                count += 1
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    logger.info("wrote %d events to %s", count, target)
    return count


def _open_binary(path: Path, *, gzipped: bool) -> BufferedIOBase:
    raw = open(path, "wb")  # noqa: SIM115
    if not gzipped:
        return raw
    # The fixed gzip header keeps the file the same on every run.
    return ClosingGzip(raw, "wb")


def _check_sizes(n_events: int, n_users: int, n_items: int, span_ms: int) -> None:
    if n_events < 0:
        msg = f"n_events is {n_events}; expected 0 or more"
        raise ValueError(msg)
    for name, value in (("n_users", n_users), ("n_items", n_items), ("span_ms", span_ms)):
        if value < 1:
            msg = f"{name} is {value}; expected a positive integer"
            raise ValueError(msg)


def _generate(
    n_events: int, n_users: int, n_items: int, seed: int, start_ms: int, end_ms: int
) -> Iterator[Event]:
    rng = random.Random(seed)
    catalog = _build_catalog(rng, n_items)
    user_cumulative = _cumulative(math.exp(_normal(rng) * 1.2) for _ in range(n_users))
    favourites_by_user: dict[int, list[int]] = {}

    lengths = _session_lengths(rng, n_events)
    starts = sorted(start_ms + rng.random() * (end_ms - start_ms) for _ in lengths)
    counter = itertools.count()
    active: list[tuple[float, int, _Session]] = []
    index = 0

    for session_index, (length, session_start) in enumerate(zip(lengths, starts, strict=True)):
        # Emit the events of open sessions that come before this session starts.
        while active and active[0][0] <= session_start:
            event, index = _emit(rng, catalog, active, index, seed, end_ms)
            yield event
        user = _draw(rng, user_cumulative)
        if user not in favourites_by_user:
            favourites_by_user[user] = _favourites(rng, catalog)
        session = _Session(
            session_id=f"s{seed}-{session_index}",
            user=user,
            favourites=favourites_by_user[user],
            remaining=length,
            time_ms=session_start,
            viewed=[],
            pending=[],
        )
        heapq.heappush(active, (session.time_ms, next(counter), session))

    while active:
        event, index = _emit(rng, catalog, active, index, seed, end_ms)
        yield event


def _emit(
    rng: random.Random,
    catalog: _Catalog,
    active: list[tuple[float, int, _Session]],
    index: int,
    seed: int,
    end_ms: int,
) -> tuple[Event, int]:
    _, order, session = heapq.heappop(active)
    event_type, item = _next_step(rng, catalog, session)
    event = Event(
        event_id=f"syn{seed}-{index}",
        type=event_type,
        user_id=f"u{session.user}",
        item_id=catalog.item_ids[item],
        timestamp_ms=min(int(session.time_ms), end_ms),
        session_id=session.session_id,
        quantity=_quantity(rng) if event_type == "purchase" else None,
        price=catalog.item_price[item] if event_type != "view" else None,
        currency=CURRENCY if event_type != "view" else None,
        category=catalog.category_names[catalog.item_category[item]],
    )
    session.remaining -= 1
    if session.remaining > 0:
        gap = min(_exponential(rng, MEAN_GAP_MS), MAX_GAP_MS)
        # Funnel steps follow their view within seconds.
        session.time_ms += gap / 10 if session.pending else gap
        heapq.heappush(active, (session.time_ms, order, session))
    return event, index + 1


def _next_step(rng: random.Random, catalog: _Catalog, session: _Session) -> tuple[str, int]:
    if session.pending:
        return session.pending.pop()
    if session.viewed and rng.random() < REVISIT_CHANCE:
        item = session.viewed[int(rng.random() * len(session.viewed))]
    elif session.favourites and rng.random() < FAVOURITE_SHARE:
        category = session.favourites[int(rng.random() * len(session.favourites))]
        members = catalog.category_items[category]
        item = members[_draw(rng, catalog.category_cumulative[category])]
    else:
        item = _draw(rng, catalog.item_cumulative)
    session.viewed.append(item)
    if rng.random() < CLICK_CHANCE:
        # pending is a stack: the click comes first, then the purchase.
        if rng.random() < PURCHASE_CHANCE:
            session.pending.append(("purchase", item))
        session.pending.append(("click", item))
    return "view", item


def _build_catalog(rng: random.Random, n_items: int) -> _Catalog:
    n_categories = max(1, round(math.sqrt(n_items)))
    category_popularity = [
        1.0 / (rank + 1) ** CATEGORY_ZIPF_EXPONENT for rank in range(n_categories)
    ]
    category_cumulative_all = _cumulative(category_popularity)
    base_price = [math.exp(2.5 + _normal(rng) * 1.0) for _ in range(n_categories)]

    # Popularity rank is a random permutation, so item i0 is not always the top seller.
    ranks = list(range(n_items))
    _shuffle(rng, ranks)
    popularity = [1.0 / (rank + 1) ** ITEM_ZIPF_EXPONENT for rank in ranks]

    item_category = [_draw(rng, category_cumulative_all) for _ in range(n_items)]
    item_price = [
        round(base_price[category] * math.exp(_normal(rng) * 0.35), 2) for category in item_category
    ]
    category_items: list[list[int]] = [[] for _ in range(n_categories)]
    for item, category in enumerate(item_category):
        category_items[category].append(item)
    category_cumulative = [
        _cumulative(popularity[item] for item in members) for members in category_items
    ]
    return _Catalog(
        item_ids=[f"i{item}" for item in range(n_items)],
        item_category=item_category,
        item_price=item_price,
        category_names=[f"c{category}" for category in range(n_categories)],
        item_cumulative=_cumulative(popularity),
        category_items=category_items,
        category_cumulative=category_cumulative,
        category_popularity=category_popularity,
    )


def _favourites(rng: random.Random, catalog: _Catalog) -> list[int]:
    weights = [
        weight if catalog.category_items[category] else 0.0
        for category, weight in enumerate(catalog.category_popularity)
    ]
    cumulative = _cumulative(weights)
    count = 1 + int(rng.random() * 3)
    return sorted({_draw(rng, cumulative) for _ in range(count)})


def _session_lengths(rng: random.Random, n_events: int) -> list[int]:
    lengths: list[int] = []
    total = 0
    while total < n_events:
        length = min(1 + int(_exponential(rng, MEAN_SESSION_EVENTS - 1)), MAX_SESSION_EVENTS)
        length = min(length, n_events - total)
        lengths.append(length)
        total += length
    return lengths


def _cumulative(weights: Iterable[float]) -> list[float]:
    return list(itertools.accumulate(weights))


def _draw(rng: random.Random, cumulative: Sequence[float]) -> int:
    """Draw an index with probability proportional to its weight."""
    index = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
    return min(index, len(cumulative) - 1)


def _exponential(rng: random.Random, mean: float) -> float:
    return -mean * math.log(1.0 - rng.random())


def _normal(rng: random.Random) -> float:
    # Box-Muller on random() alone, whose output Python keeps stable across versions.
    u1 = 1.0 - rng.random()
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * rng.random())


def _quantity(rng: random.Random) -> int:
    return 1 + int(_exponential(rng, 0.4))


def _shuffle(rng: random.Random, values: list[int]) -> None:
    for i in range(len(values) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        values[i], values[j] = values[j], values[i]


def _argument_problem(args: argparse.Namespace) -> str | None:
    """Return what is wrong with the options, named by their flags, or None."""
    if args.path.is_dir():
        return f"{args.path} is a folder; expected an output file name"
    if args.events < 0:
        return f"--events is {args.events}; expected 0 or more"
    if not math.isfinite(args.span_days) or args.span_days <= 0:
        return f"--span-days is {args.span_days}; expected a positive number of days"
    if args.start_ms < MIN_TIMESTAMP_MS:
        # The event contract rejects earlier times, so the file could not be replayed.
        return f"--start-ms is {args.start_ms}; expected {MIN_TIMESTAMP_MS} (2000-01-01) or later"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Write a synthetic sample: ``python -m stream.synthetic PATH``."""
    parser = argparse.ArgumentParser(
        prog="python -m stream.synthetic",
        description="Write a deterministic synthetic sample of storefront events as JSON lines.",
    )
    parser.add_argument("path", type=Path, help="output file; a name ending in .gz is gzipped")
    parser.add_argument("--events", type=int, default=60_000, help="number of events")
    parser.add_argument("--users", type=int, default=3_000, help="size of the user population")
    parser.add_argument("--items", type=int, default=2_000, help="size of the catalog")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--start-ms",
        type=int,
        default=DEFAULT_START_MS,
        help="earliest event time, in epoch milliseconds (default 2025-01-01T00:00:00Z)",
    )
    parser.add_argument(
        "--span-days", type=float, default=DEFAULT_SPAN_MS / 86_400_000, help="days covered"
    )
    parser.add_argument(
        "--if-missing", action="store_true", help="do nothing when the file exists already"
    )
    args = parser.parse_args(argv)
    configure_logging("info")

    if args.if_missing and args.path.exists():
        logger.info("%s exists; left unchanged", args.path)
        return 0
    problem = _argument_problem(args)
    if problem is not None:
        print(f"python -m stream.synthetic: {problem}", file=sys.stderr)
        return 2
    try:
        events = generate_events(
            args.events,
            args.users,
            args.items,
            args.seed,
            args.start_ms,
            span_ms=int(args.span_days * 86_400_000),
        )
    except ValueError as exc:
        print(f"python -m stream.synthetic: {exc}", file=sys.stderr)
        return 2
    write_jsonl(args.path, events)
    return 0


if __name__ == "__main__":
    sys.exit(main())
