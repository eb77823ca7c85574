"""Prequential (test-then-train) evaluation of every model and fusion strategy.

The protocol: walk the events in time order with a global index n. Before
learning event n of user u on item i, if u has an earlier event and n is a
multiple of ``every``, build u's top-k from the state after events 0 … n−1.
The all-events list leaves nothing out beyond the serving filters (stock and
the repeat-purchase policy), and it is a hit when i is in it. If i is not
among u's earlier items, a second list leaves those items out and counts
towards the new-to-user figures. Lists shorter than k are padded from decayed
popularity. Then event n is learned.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.engine import MODEL_NAMES, EngineConfig, Recommender
from models.fusion import FUSION_STRATEGIES
from schemas import Event

logger = logging.getLogger(__name__)

Z_95 = 1.959963984540054
BASELINES = ("popular",)


def wilson_interval(hits: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Return the Wilson score interval of a hit rate.

    >>> [round(x, 4) for x in wilson_interval(5, 10)]
    [0.2366, 0.7634]
    >>> wilson_interval(0, 0)
    (0.0, 1.0)
    """
    if n == 0:
        # With no evaluated event, the rate is unknown.
        return 0.0, 1.0
    rate = hits / n
    denominator = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denominator
    spread = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denominator
    # Rounding can put a bound a hair past the rate at 0 or 1, so both are clamped.
    return min(rate, max(0.0, centre - spread)), max(rate, min(1.0, centre + spread))


def strategy_kind(name: str) -> str:
    """Return ``"baseline"``, ``"fusion"`` or ``"model"`` for a strategy name.

    >>> strategy_kind("popular"), strategy_kind("rrf"), strategy_kind("mf")
    ('baseline', 'fusion', 'model')
    """
    if name in BASELINES:
        return "baseline"
    if name in FUSION_STRATEGIES:
        return "fusion"
    return "model"


@dataclass(slots=True)
class RankMetrics:
    """HR@k, NDCG@k and MRR@k accumulated over evaluated events.

    >>> metrics = RankMetrics()
    >>> metrics.add(1); metrics.add(3); metrics.add(None)
    >>> metrics.hits, metrics.n, round(metrics.hr, 4), round(metrics.mrr, 4)
    (2, 3, 0.6667, 0.4444)
    >>> round(metrics.ndcg, 4)
    0.5
    """

    hits: int = 0
    n: int = 0
    ndcg_sum: float = 0.0
    ndcg_squares: float = 0.0
    mrr_sum: float = 0.0
    mrr_squares: float = 0.0

    def add(self, rank: int | None) -> None:
        """Count one evaluated event; ``rank`` is the 1-based rank of the hit or ``None``."""
        self.n += 1
        if rank is None:
            return
        self.hits += 1
        gain = 1.0 / math.log2(rank + 1)
        self.ndcg_sum += gain
        self.ndcg_squares += gain * gain
        self.mrr_sum += 1.0 / rank
        self.mrr_squares += 1.0 / (rank * rank)

    @property
    def hr(self) -> float:
        """Hit rate: hits over evaluated events."""
        return self.hits / self.n if self.n else 0.0

    @property
    def ndcg(self) -> float:
        """Mean NDCG; a hit at rank r scores ``1 / log2(r + 1)``."""
        return self.ndcg_sum / self.n if self.n else 0.0

    @property
    def mrr(self) -> float:
        """Mean reciprocal rank; a miss scores 0."""
        return self.mrr_sum / self.n if self.n else 0.0

    def _mean_interval(self, total: float, squares: float) -> list[float]:
        # Every score lies in [0, 1]: that is the interval until two events
        # give a variance, and it bounds the normal interval after that.
        if self.n < 2:
            return [0.0, 1.0]
        mean = total / self.n
        variance = max(squares / self.n - mean * mean, 0.0) * self.n / (self.n - 1)
        spread = Z_95 * math.sqrt(variance / self.n)
        return [max(0.0, mean - spread), min(1.0, mean + spread)]

    def to_json(self, k: int = 10) -> dict[str, Any]:
        """Return the figures with 95% intervals (Wilson for HR, normal for the means)."""
        return {
            f"hr@{k}": self.hr,
            f"ndcg@{k}": self.ndcg,
            f"mrr@{k}": self.mrr,
            "hits": self.hits,
            "n": self.n,
            "hr_ci95": list(wilson_interval(self.hits, self.n)),
            "ndcg_ci95": self._mean_interval(self.ndcg_sum, self.ndcg_squares),
            "mrr_ci95": self._mean_interval(self.mrr_sum, self.mrr_squares),
        }


@dataclass
class StrategyResult:
    """Every figure of one model or fusion strategy."""

    name: str
    all_events: RankMetrics = field(default_factory=RankMetrics)
    new_to_user: RankMetrics = field(default_factory=RankMetrics)
    by_type: dict[str, RankMetrics] = field(default_factory=dict)
    recommended: set[int] = field(default_factory=set)
    timeline_hits: list[int] = field(default_factory=list)
    timeline_n: list[int] = field(default_factory=list)

    def record(self, kind: str, bucket: int, rank: int | None, rows: Iterable[int]) -> None:
        """Count one all-events list."""
        self.all_events.add(rank)
        self.by_type.setdefault(kind, RankMetrics()).add(rank)
        self.recommended.update(rows)
        while len(self.timeline_n) <= bucket:
            self.timeline_n.append(0)
            self.timeline_hits.append(0)
        self.timeline_n[bucket] += 1
        self.timeline_hits[bucket] += rank is not None

    def to_json(self, n_items: int, k: int = 10) -> dict[str, Any]:
        """Return the result in the shape of ``fusionrec evaluate --json``."""
        return {
            "kind": strategy_kind(self.name),
            "all": self.all_events.to_json(k),
            "new": self.new_to_user.to_json(k),
            "coverage": len(self.recommended) / n_items if n_items else 0.0,
            "by_type": {kind: m.to_json(k) for kind, m in sorted(self.by_type.items())},
        }


@dataclass
class Evaluation:
    """The outcome of one prequential run."""

    default: str
    events: int
    n_items: int
    results: dict[str, StrategyResult]
    bucket_events: int
    k: int = 10

    def to_json(self) -> dict[str, Any]:
        """Return ``{"default", "events", "results"}`` as printed by ``--json``."""
        return {
            "default": self.default,
            "events": self.events,
            "results": {
                name: result.to_json(self.n_items, self.k) for name, result in self.results.items()
            },
        }

    def timeline(self, name: str) -> tuple[list[int], list[float]]:
        """Return (event index at bucket start, all-events HR@k) for one strategy."""
        result = self.results[name]
        starts = [i * self.bucket_events for i in range(len(result.timeline_n))]
        rates = [
            h / n if n else math.nan
            for h, n in zip(result.timeline_hits, result.timeline_n, strict=True)
        ]
        return starts, rates


def _rank_of(rows: Sequence[int], target: int | None) -> int | None:
    if target is None:
        return None
    try:
        return rows.index(target) + 1
    except ValueError:
        return None


def default_strategies() -> tuple[str, ...]:
    """Return every model, the popularity baseline and every fusion strategy.

    >>> default_strategies()[:2]
    ('popular', 'trending')
    """
    return MODEL_NAMES + FUSION_STRATEGIES


def evaluate(
    events: Sequence[Event],
    config: EngineConfig | None = None,
    *,
    every: int = 1,
    k: int = 10,
    strategies: Sequence[str] | None = None,
    buckets: int = 50,
    max_batch: int = 500,
    progress: Callable[[int], None] | None = None,
) -> Evaluation:
    """Run the prequential protocol over ``events``, already in time order.

    Parameters
    ----------
    events
        The stream, stable-sorted by event time.
    config
        The engine configuration; its ``fusion`` names the default strategy.
    every
        Evaluate only events whose index is a multiple of this step.
    k
        List length that the metrics are cut at.
    strategies
        Models and fusion strategies to report; all of them by default.
    buckets
        Number of equal slices of the stream for the HR-over-time series.
    max_batch
        The events between two evaluated events are learned as one batch, as
        the worker learns them, up to this many at a time. Matrix
        factorization takes one SGD step per batch; the other models apply a
        batch event by event.
    progress
        Called with the number of events processed since the last call.

    >>> stream = [Event(str(n), "view", "u", "ab"[n % 2], n * 1000) for n in range(6)]
    >>> result = evaluate(stream, EngineConfig(repeat_purchases="allow"), strategies=["recent"])
    >>> result.results["recent"].all_events.hits, result.results["recent"].all_events.n
    (4, 5)

    """
    if every < 1:
        msg = f"every is {every}; expected a step of at least 1"
        raise ValueError(msg)
    config = config if config is not None else EngineConfig()
    names = list(strategies) if strategies is not None else list(default_strategies())
    known = set(default_strategies())
    for name in names:
        if name not in known:
            msg = f"unknown strategy {name!r}; expected some of {', '.join(sorted(known))}"
            raise ValueError(msg)
    results = {name: StrategyResult(name) for name in names}
    bucket_events = max(1, math.ceil(len(events) / buckets))
    history: dict[str, set[int]] = {}
    # The learned fusion learns also when no strategy reads it, because the
    # events it learns from end batches, and matrix factorization takes one
    # step per batch.
    engine = Recommender(config)
    step = 0

    pending: list[Event] = []
    # Users with an event so far, learned or pending. Their learned items
    # are in ``history``: a pending event's item enters the catalog, and so
    # gets a row, only when the engine learns it, as in the worker.
    active: set[str] = set()

    def learn_pending() -> None:
        engine.learn(pending)
        rows = engine.catalog.index
        for queued in pending:
            history.setdefault(queued.user_id, set()).add(rows[queued.item_id])
        pending.clear()

    for index, event in enumerate(events):
        if event.user_id in active and index % every == 0:
            if pending:
                learn_pending()
            seen = history[event.user_id]
            scored = engine.candidate_scores(event.user_id)
            target = engine.catalog.index.get(event.item_id)
            is_new = target is None or target not in seen
            allowed = None
            if is_new:
                # A set lookup per candidate, because np.isin sorts all of a
                # long history on every call.
                candidates = scored.items.tolist()
                allowed = np.fromiter(
                    (row not in seen for row in candidates), dtype=bool, count=len(candidates)
                )
            bucket = index // bucket_events
            for name in names:
                scores = engine.fused(scored, name)
                rows, _ = engine.top_rows(scored, scores, k)
                results[name].record(event.type, bucket, _rank_of(rows, target), rows)
                if is_new:
                    rows, _ = engine.top_rows(scored, scores, k, allowed, pad_exclude=seen)
                    results[name].new_to_user.add(_rank_of(rows, target))
        pending.append(event)
        active.add(event.user_id)
        if len(pending) >= max_batch:
            learn_pending()
        step += 1
        if progress is not None and step == 1000:
            progress(step)
            step = 0
    if pending:
        learn_pending()
    if progress is not None and step:
        progress(step)
    return Evaluation(config.fusion, len(events), len(engine.catalog), results, bucket_events, k)
