"""Prometheus metrics of one worker, kept in a registry of its own.

Labels carry topics, partitions, reasons and kinds, never a user id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class WorkerMetrics:
    """Counters, gauges and histograms that the worker updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.consumed = Counter(
            "fusionrec_events_consumed",
            "Messages read from the event topics.",
            ["topic"],
            registry=registry,
        )
        self.applied = Counter(
            "fusionrec_events_applied",
            "Events learned by the models, by event type.",
            ["type"],
            registry=registry,
        )
        self.duplicates = Counter(
            "fusionrec_events_duplicate",
            "Events skipped because their event_id was already applied.",
            registry=registry,
        )
        self.rejected = Counter(
            "fusionrec_messages_rejected",
            "Messages sent to the dead-letter topic, by topic and reason.",
            ["topic", "reason"],
            registry=registry,
        )
        self.dropped = Counter(
            "fusionrec_events_dropped",
            "Valid events not learned, by reason: rate_limited, item_repeat_limited, "
            "forgotten_user or already_checkpointed.",
            ["reason"],
            registry=registry,
        )
        self.item_updates = Counter(
            "fusionrec_item_updates_applied",
            "Item stock, price, category and title updates applied.",
            registry=registry,
        )
        self.item_update_fields_stale = Counter(
            "fusionrec_item_update_fields_stale",
            "Fields of item updates left unapplied because a newer update had set them.",
            ["field"],
            registry=registry,
        )
        self.forgets = Counter(
            "fusionrec_users_forgotten", "Forget requests applied.", registry=registry
        )
        self.lag = Gauge(
            "fusionrec_consumer_lag",
            "Messages between the last one processed and the partition's end.",
            ["topic", "partition"],
            registry=registry,
        )
        self.learn_seconds = Histogram(
            "fusionrec_learn_seconds",
            "Time to learn one batch of events.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.refresh_seconds = Histogram(
            "fusionrec_refresh_seconds",
            "Time to recompute one batch of user lists.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.redis_write_seconds = Histogram(
            "fusionrec_redis_write_seconds",
            "Time of one pipelined Redis write.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.lists_written = Counter(
            "fusionrec_lists_written", "User lists written to Redis.", registry=registry
        )
        self.pending_lists = Gauge(
            "fusionrec_lists_pending",
            "Lists computed but not yet written to Redis.",
            registry=registry,
        )
        self.users_to_refresh = Gauge(
            "fusionrec_users_to_refresh",
            "Users whose list the worker still has to compute.",
            registry=registry,
        )
        self.checkpoint_age = Gauge(
            "fusionrec_checkpoint_age_seconds",
            "Seconds since the last checkpoint was written or restored.",
            registry=registry,
        )
        self.checkpoint_seconds = Histogram(
            "fusionrec_checkpoint_seconds",
            "Time to write one checkpoint.",
            buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=registry,
        )
        self.errors = Counter(
            "fusionrec_errors",
            "Errors caught and handled, by kind.",
            ["kind"],
            registry=registry,
        )
        self.users = Gauge("fusionrec_users", "Users known to the models.", registry=registry)
        self.items = Gauge("fusionrec_items", "Items known to the models.", registry=registry)

    def render(self) -> bytes:
        """Return the metrics in the Prometheus text format."""
        return generate_latest(self.registry)
