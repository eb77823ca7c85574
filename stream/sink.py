"""Write refreshed lists to Redis in pipelined batches, surviving outages.

Lists wait in a pending map keyed by Redis key, so a user refreshed twice
before a write is written once, with the newer list. ``SET key value EX ttl``
replaces a value and its expiry in one atomic command. A list rewritten
without a sold-out item uses ``SET key value XX KEEPTTL`` instead, so it never
brings back a key that has expired and keeps its expiry. When a pipeline fails
part-way, its connection is in an unknown state, so the pool is disconnected.
The batch goes back into the pending map unless a newer list arrived, and
after a backoff a new pipeline is built on a new connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from stream.metrics import WorkerMetrics
from stream.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Existing:
    """A pending value written only over a key that still exists, keeping its TTL."""

    payload: bytes


# A pending value of None deletes the key. Bytes replace the value and renew
# the TTL. `Existing` rewrites a list that Redis has not expired.
Pending = dict[str, bytes | Existing | None]


def redis_client(settings: Settings, **overrides: Any) -> aioredis.Redis:
    """Create an asyncio Redis client from the settings, without connecting."""
    options: dict[str, Any] = {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 2.0,
        # Retries are the sink's job: it rebuilds pipelines on new connections.
        "retry": Retry(NoBackoff(), 0),
        "protocol": 3,
    }
    if settings.redis_ssl_ca_certs:
        options["ssl_ca_certs"] = settings.redis_ssl_ca_certs
    options.update(overrides)
    client = aioredis.Redis.from_url(settings.redis_url, **options)
    if settings.redis_password:
        # redis-py lets a password in the URL win over the keyword, and the
        # setting is documented to win over the URL.
        client.connection_pool.connection_kwargs["password"] = settings.redis_password
    return client


class RedisSink:
    """Coalesce and write lists; `run` keeps writing until `close`."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.client = redis_client(settings)
        self.pending: Pending = {}
        # The batch being written, out of `pending` until Redis replies.
        self._in_flight: Pending = {}
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # Set whenever a batch has been written, and at close.
        self._progress = asyncio.Event()
        self._closing = False
        self._outage_started: float | None = None
        self.outages = 0

    def unwritten(self, key: str) -> bool:
        """Return whether a write or deletion of ``key`` is queued or still in flight."""
        return key in self.pending or key in self._in_flight

    def owed_keys(self) -> list[str]:
        """Return the keys whose list is queued or in flight, deletions left out."""
        owed = [key for key, value in self.pending.items() if value is not None]
        # A key whose deletion is queued behind its write is not owed.
        owed += [
            key
            for key, value in self._in_flight.items()
            if value is not None and key not in self.pending
        ]
        return owed

    def put(self, key: str, payload: bytes) -> None:
        """Queue ``payload`` as the new value of ``key``."""
        self.pending[key] = payload
        self._idle.clear()
        self._wakeup.set()

    def put_existing(self, key: str, payload: bytes) -> None:
        """Queue ``payload`` for ``key`` only if the key still exists, keeping its TTL.

        A list written by `put` and not yet sent stays a plain write, because
        its key may not exist in Redis yet. A pending deletion stays one.
        """
        if key in self.pending and self.pending[key] is None:
            return
        if isinstance(self.pending.get(key), bytes):
            self.pending[key] = payload
        else:
            self.pending[key] = Existing(payload)
        self._idle.clear()
        self._wakeup.set()

    def delete(self, key: str) -> None:
        """Queue the deletion of ``key``."""
        self.pending[key] = None
        self._idle.clear()
        self._wakeup.set()

    @property
    def in_outage(self) -> bool:
        """Whether the last write attempt failed."""
        return self._outage_started is not None

    async def run(self) -> None:
        """Write pending lists until `close`, retrying with backoff during outages."""
        backoff = 0.05
        while not (self._closing and not self.pending):
            if not self.pending:
                self._idle.set()
                self._wakeup.clear()
                if self._closing:
                    break
                await self._wakeup.wait()
                continue
            try:
                await self.flush_once()
            except (RedisError, OSError) as exc:
                self._begin_outage(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.redis_retry_max_s)
                continue
            backoff = 0.05
            self._end_outage()
        self._idle.set()

    async def flush_once(self) -> int:
        """Write one batch of pending entries; return how many were written."""
        batch_size = self.settings.redis_write_batch
        keys = []
        for key in self.pending:
            keys.append(key)
            if len(keys) == batch_size:
                break
        batch = {key: self.pending.pop(key) for key in keys}
        self._in_flight = batch
        self.metrics.pending_lists.set(len(self.pending))
        started = time.perf_counter()
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, payload in batch.items():
                    if payload is None:
                        pipe.delete(key)
                    elif isinstance(payload, Existing):
                        pipe.set(key, payload.payload, xx=True, keepttl=True)
                    else:
                        pipe.set(key, payload, ex=self.settings.ttl_s)
                replies = await pipe.execute()
        except (RedisError, OSError, asyncio.CancelledError):
            for key, payload in batch.items():
                queued = self.pending.get(key, payload)
                if isinstance(queued, Existing) and not isinstance(payload, Existing):
                    # The failed write never landed, so the rewrite queued
                    # meanwhile must not depend on it: a failed plain write
                    # stays plain, with the newer list, and a deletion stays.
                    queued = None if payload is None else queued.payload
                self.pending[key] = queued
            self.metrics.pending_lists.set(len(self.pending))
            self._in_flight = {}
            await self._discard_connections()
            raise
        self._in_flight = {}
        self._progress.set()
        self.metrics.redis_write_seconds.observe(time.perf_counter() - started)
        # Only user lists count, and a SET XX over an expired key wrote nothing.
        user_prefix = f"{self.settings.redis_key_prefix}user:"
        written = sum(
            1
            for (key, payload), reply in zip(batch.items(), replies, strict=True)
            if payload is not None and reply and key.startswith(user_prefix)
        )
        self.metrics.lists_written.inc(written)
        return len(batch)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is pending; return False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def wait_drained(self) -> None:
        """Wait until every queued write has reached Redis, or the sink closes.

        During a Redis outage nothing is written, so this waits until it ends.
        """
        while (self.pending or self._in_flight) and not self._closing:
            self._progress.clear()
            await self._progress.wait()

    async def close(self, timeout_s: float = 10.0) -> None:
        """Write what is pending (up to ``timeout_s``), then close the client."""
        self._closing = True
        self._progress.set()
        self._wakeup.set()
        if not await self.wait_idle(timeout_s):
            logger.error("closing with %d lists not written to Redis", len(self.pending))
        await self.client.aclose()

    async def _discard_connections(self) -> None:
        try:
            await self.client.connection_pool.disconnect(inuse_connections=True)
        except (RedisError, OSError) as exc:
            logger.debug("disconnecting the Redis pool failed: %r", exc)

    def _begin_outage(self, exc: BaseException) -> None:
        self.metrics.errors.labels(kind="redis_write").inc()
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            self.outages += 1
            logger.warning(
                "Redis outage begun: %s: %s; %d lists pending, retrying with backoff",
                type(exc).__name__,
                exc,
                len(self.pending),
                extra={"event": "redis_outage_begun", "lists_pending": len(self.pending)},
            )

    def _end_outage(self) -> None:
        if self._outage_started is not None:
            lasted = time.monotonic() - self._outage_started
            self._outage_started = None
            logger.warning(
                "Redis outage ended after %.1f s",
                lasted,
                extra={"event": "redis_outage_ended", "seconds": round(lasted, 3)},
            )
