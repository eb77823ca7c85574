"""The worker's logic between Kafka messages and Redis values, without I/O.

`Processor` takes batches of raw messages, validates them, drops what must
not be learned, feeds the rest to the models, and returns what has to be
written: dead-letter records and refreshed lists. The Faust agents, the
benchmark and the tests all drive the same object, so what is tested is what
runs.
"""

from __future__ import annotations

import codecs
import hmac
import itertools
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, AnyStr, overload

import orjson

from models.engine import Recommender
from schemas import (
    MAX_ID_LENGTH,
    Event,
    RecommendationList,
    RecommendedItem,
    SchemaError,
    decode_event,
    decode_forget,
    decode_item_update,
)
from stream.dedup import DedupWindow
from stream.metrics import WorkerMetrics
from stream.privacy import Pseudonymizer
from stream.ratelimit import PairRateLimiter, UserRateLimiter
from stream.settings import Settings
from stream.topics import EVENT_TOPICS, FORGET_TOPIC, ITEMS_TOPIC

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_PAYLOAD_PREVIEW = 2048
# Idle rate budgets are dropped after this many events, so the scan over all
# budgets costs little per event.
_SWEEP_EVERY_EVENTS = 50_000


def _escapable(name: str) -> bytes:
    r"""Return a pattern of ``name`` with each character literal or as a JSON \u escape."""
    parts = []
    for char in name:
        hex_digits = f"{ord(char):04x}"
        code = "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in hex_digits)
        parts.append(b"(?:" + re.escape(char.encode()) + rb"|\\u" + code.encode() + b")")
    return b"".join(parts)


# A user_id value in text that is not valid JSON. Any character of the name
# may be escaped (user\u005fid), the name and the value may be in single or
# double quotes or in none, and the text may be cut short, so a closing quote
# is optional. Groups: the text up to the value, the name's quote, the
# value's quote, the value, and the closing quote.
_USER_ID_IN_TEXT = re.compile(
    rb"""((["'])?"""
    + _escapable("user_id")
    + rb"""(?(2)\2)\s*:\s*(["'])?)((?(3)(?:(?!\3)[^\\]|\\.)*|[^\s,}\]]*))((?(3)(?:\3|$)))"""
)
# Keys shorter than this are not searched for in the text of a payload,
# because replacing every "7" or "42" would garble it.
_MIN_KEY_TO_REDACT = 3
# A valid id has at most MAX_ID_LENGTH characters of up to 4 bytes each, so
# a longer key is nobody's id. Searching a letter for it would cost time in
# proportion to its length on the worker's event loop, so such a key is not
# hidden, and a dead letter keeps at most this many bytes of it.
_MAX_ID_BYTES = 4 * MAX_ID_LENGTH
# Maximum length of a valid id written in the text of a message, with each
# character as JSON escapes: two of 6 characters for one outside the BMP. A
# longer user_id value is not hidden, for the same reason.
_MAX_ID_TEXT = 12 * MAX_ID_LENGTH
# User ids shorter than this are replaced only where they form a whole word.
_WORD_ID_LENGTH = 8
# Marks a state whose session ids are keyed hashes from Processor.session_token.
_SESSION_IDS_HASHED = "hmac-sha256"
_MAX_REDACT_DEPTH = 100


@dataclass(slots=True)
class Message:
    """One Kafka record as the processor needs it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    # None for a record with a null value, such as a tombstone.
    value: bytes | None


@dataclass
class BatchOutcome:
    """Result of one batch: dead-letter records and users whose list changed."""

    dead_letters: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    dirty: dict[str, str] = field(default_factory=dict)
    # Forget requests: (pseudonym, Redis key) of each erased user.
    forgotten: list[tuple[str, str]] = field(default_factory=list)
    # Catalog rows of items that went out of stock in this batch.
    unavailable: list[int] = field(default_factory=list)
    applied: int = 0


@dataclass(slots=True)
class Refreshed:
    """A recomputed list: the full ranked entries and the JSON value of its top k."""

    pseudonym: str
    key: str
    items: list[RecommendedItem]
    payload: bytes


class Processor:
    """Validate, de-duplicate, rate-limit and learn events; build lists for Redis."""

    def __init__(
        self,
        settings: Settings,
        pseudonymize: Pseudonymizer,
        metrics: WorkerMetrics | None = None,
        engine: Recommender | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.pseudonymize = pseudonymize
        self.metrics = metrics or WorkerMetrics()
        self.clock = clock
        self.engine = engine or Recommender(settings.engine_config())
        self.dedup = DedupWindow(int(settings.dedup_window_s * 1000), settings.dedup_max_entries)
        self.limiter = UserRateLimiter(settings.user_rate_limit_per_s, settings.user_rate_burst)
        self.repeats = PairRateLimiter(
            settings.item_repeat_rate_per_s,
            settings.item_repeat_burst,
            settings.item_repeat_max_pairs,
        )
        # Forget token to the event time of the forget request. A token is a
        # keyed hash of the pseudonym under a separate key, so the registry
        # finds a forgotten user's later events while neither the user id
        # nor the pseudonym appears anywhere in the state.
        self.forgotten: dict[str, int] = {}
        self._forget_key = pseudonymize.derive_key("forget")
        # Session ids are kept as keyed hashes, because shops often build them
        # from user ids and the models only compare them for equality.
        self._session_key = pseudonymize.derive_key("session")
        # Called with the pseudonyms of erased users, so that state kept
        # outside the processor, such as queued dead letters, drops them too.
        self.on_erase: Callable[[set[str]], None] | None = None
        # Next offset to apply, by (topic, partition); lower offsets are already in the state.
        self.offsets: dict[tuple[str, int], int] = {}
        self.counts: Counter[str] = Counter()
        self._warned: Counter[str] = Counter()
        # Newest event time seen, and the events checked by the rate limit
        # since its idle budgets were last dropped.
        self._newest_event_ms = 0
        self._limited_since_sweep = 0
        self._event_topics = {settings.topic(name): kind for kind, name in EVENT_TOPICS.items()}

    # -- events -------------------------------------------------------------

    def process_events(self, messages: Iterable[Message]) -> BatchOutcome:
        """Apply a batch of messages from the event topics, in order."""
        outcome = BatchOutcome()
        accepted: list[Event] = []
        # Purchases that the flood limits keep out of the models.
        limited_purchases: list[Event] = []
        now_ms = int(self.clock() * 1000)

        consumed: Counter[str] = Counter()
        for message in messages:
            if not self._is_new(message):
                self.metrics.dropped.labels(reason="already_checkpointed").inc()
                continue
            consumed[message.topic] += 1
            try:
                event = decode_event(
                    message.value,
                    topic_type=self._event_topics.get(message.topic),
                    key=message.key,
                    check_key=self.settings.check_key,
                    max_bytes=self.settings.max_message_bytes,
                )
                self._check_not_future(event.timestamp_ms, now_ms)
            except SchemaError as exc:
                outcome.dead_letters.append(self._dead_letter(message, exc, now_ms))
                continue
            except Exception as exc:  # noqa: BLE001 - one message must not stop the stream
                outcome.dead_letters.append(self._decode_failed(message, exc, now_ms))
                continue

            try:
                pseudonym, learn = self._admit(event)
            except Exception as exc:  # noqa: BLE001 - one message must not stop the stream
                outcome.dead_letters.append(self._decode_failed(message, exc, now_ms, "admit"))
                continue
            if pseudonym is None:
                continue
            outcome.dirty[pseudonym] = event.user_id
            event.user_id = pseudonym
            if event.session_id is not None:
                event.session_id = self.session_token(event.session_id)
            (accepted if learn else limited_purchases).append(event)

        if self._limited_since_sweep >= _SWEEP_EVERY_EVENTS:
            # Without this, the limiter would keep a budget for every user
            # ever seen, in memory and in every checkpoint.
            self.limiter.sweep(self._newest_event_ms)
            self._limited_since_sweep = 0
        for topic, count in consumed.items():
            self.metrics.consumed.labels(topic=topic).inc(count)
        if accepted:
            # A user's events arrive on three topics in no fixed order, so a
            # batch is learned in event-time order, which makes the models'
            # state depend less on how the consumer interleaved the topics.
            accepted.sort(key=_event_time)
            started = time.perf_counter()
            self.engine.learn(accepted)
            self.metrics.learn_seconds.observe(time.perf_counter() - started)
            by_type = Counter(event.type for event in accepted)
            for event_type, count in by_type.items():
                self.metrics.applied.labels(type=event_type).inc(count)
                self.counts[f"applied:{event_type}"] += count
            self.counts["applied"] += len(accepted)
            outcome.applied = len(accepted)
        if limited_purchases:
            # After the batch is learned, so that the items are in the catalog.
            self.engine.count_purchases(limited_purchases)
        return outcome

    # -- item updates and forget requests -----------------------------------

    def process_item_updates(self, messages: Iterable[Message]) -> BatchOutcome:
        """Apply stock, price, category and title changes."""
        outcome = BatchOutcome()
        now_ms = int(self.clock() * 1000)
        for message in messages:
            if not self._is_new(message):
                continue
            try:
                update = decode_item_update(
                    message.value, max_bytes=self.settings.max_message_bytes
                )
                if message.key is None and self.settings.check_key:
                    msg = "message has no key; expected the UTF-8 bytes of item_id as the Kafka key"
                    raise SchemaError("key_mismatch", msg, "item_id")
                if message.key is not None and message.key != update.item_id.encode():
                    key = _quoted(message.key.decode("utf-8", "replace"))
                    msg = (
                        f"message key {key} differs from item_id {_quoted(update.item_id)}; "
                        "expected the item_id as the Kafka key"
                    )
                    raise SchemaError("key_mismatch", msg, "item_id")
                # Each field keeps its newest update, so an update stamped
                # ahead would make every real one stale until that time.
                self._check_not_future(update.timestamp_ms, now_ms)
            except SchemaError as exc:
                outcome.dead_letters.append(self._dead_letter(message, exc, now_ms))
                continue
            except Exception as exc:  # noqa: BLE001 - one message must not stop the stream
                outcome.dead_letters.append(self._decode_failed(message, exc, now_ms))
                continue
            stale = self.engine.update_item(update)
            for name in stale:
                self.metrics.item_update_fields_stale.labels(field=name).inc()
            if update.in_stock is False and "in_stock" not in stale:
                row = self.engine.catalog.index.get(update.item_id)
                if row is not None:
                    outcome.unavailable.append(row)
            self.metrics.item_updates.inc()
            outcome.applied += 1
        return outcome

    def process_forget(self, messages: Iterable[Message]) -> BatchOutcome:
        """Erase users: models, de-duplication entries, rate buckets and Redis keys."""
        outcome = BatchOutcome()
        now_ms = int(self.clock() * 1000)
        for message in messages:
            if not self._is_new(message):
                continue
            try:
                request = decode_forget(message.value, max_bytes=self.settings.max_message_bytes)
                # A request stamped ahead would drop the user's events up to
                # that time, and the registry never moves a stamp back.
                self._check_not_future(request.timestamp_ms, now_ms)
            except SchemaError as exc:
                outcome.dead_letters.append(self._dead_letter(message, exc, now_ms))
                continue
            except Exception as exc:  # noqa: BLE001 - one message must not stop the stream
                outcome.dead_letters.append(self._decode_failed(message, exc, now_ms))
                continue
            pseudonym = self._record_forget(request.user_id, request.timestamp_ms)
            outcome.forgotten.append((pseudonym, self.redis_key(request.user_id, pseudonym)))
            outcome.applied += 1
        # One pass over the shared tables erases the whole batch.
        self._erase_all([p for p, _ in outcome.forgotten if self._erased_by_request(p)])
        return outcome

    def forget(self, user_id: str, timestamp_ms: int) -> str:
        """Erase ``user_id`` from every part of the state; return its pseudonym.

        A user whose learned events all came after the request is kept, as
        a restore keeps such a user: the request covers nothing of theirs.
        """
        pseudonym = self._record_forget(user_id, timestamp_ms)
        if self._erased_by_request(pseudonym):
            self._erase_all([pseudonym])
        return pseudonym

    def _record_forget(self, user_id: str, timestamp_ms: int) -> str:
        """Add a forget request to the registry; return the user's pseudonym."""
        pseudonym = self.pseudonymize(user_id)
        self.pseudonymize.discard(user_id)
        token = self.forget_token(pseudonym)
        self.forgotten[token] = max(self.forgotten.get(token, 0), timestamp_ms)
        self.metrics.forgets.inc()
        # The log keeps no id at all, not even the pseudonym, so that an
        # erased user leaves no trace in it.
        logger.info("forgot a user: %d forget requests applied so far", len(self.forgotten))
        return pseudonym

    def session_token(self, session_id: str) -> str:
        """Return the keyed hash that the models' state stores in place of ``session_id``.

        Unlike user pseudonyms, tokens are not cached, so that no raw session
        id of a forgotten user stays in memory.
        """
        digest = hmac.digest(
            self._session_key, session_id.encode("utf-8", "surrogatepass"), "sha256"
        )
        return digest[:16].hex()

    def forget_token(self, pseudonym: str) -> str:
        """Return the key of ``pseudonym`` in the forget registry."""
        digest = hmac.digest(self._forget_key, pseudonym.encode(), "sha256")
        return digest[:16].hex()

    def registry_check(self) -> str:
        """Return the check value that the forget registry stores for this key.

        Tokens derived with another pseudonym key match no user, so the
        requests they record would no longer hold.
        """
        digest = hmac.digest(self._forget_key, b"forget registry key check", "sha256")
        return digest[:16].hex()

    def merge_forgotten(self, registry: dict[str, int]) -> int:
        """Add forget requests from elsewhere and erase users they name; return how many."""
        for token, stamp in registry.items():
            self.forgotten[token] = max(self.forgotten.get(token, 0), stamp)
        return self.purge_forgotten()

    def purge_forgotten(self) -> int:
        """Erase every user of the state whose token is in the registry; return how many.

        A checkpoint older than a forget request still contains the user, so
        this runs after every restore.
        """
        if not self.forgotten:
            return 0
        candidates = (
            set(self.engine.user_ids())
            | self.dedup.owners()
            | self.limiter.users()
            | self.repeats.users()
        )
        doomed = [p for p in candidates if self._erased_by_request(p)]
        self._erase_all(doomed)
        return len(doomed)

    def _erased_by_request(self, pseudonym: str) -> bool:
        """Return whether a forget request covers what the state contains of the user.

        Events stamped after the request are admitted again, so a user who
        came back has a state that contains only those and is kept.
        """
        forgotten_at = self.forgotten.get(self.forget_token(pseudonym))
        if forgotten_at is None:
            return False
        first_ms, _ = self.engine.user_event_times(pseudonym)
        return first_ms is None or first_ms <= forgotten_at

    def _erase_all(self, pseudonyms: list[str]) -> None:
        if not pseudonyms:
            return
        if self.on_erase is not None:
            self.on_erase(set(pseudonyms))
        for pseudonym in pseudonyms:
            self.engine.forget_user(pseudonym)
            self.limiter.forget(pseudonym)
        # These two scan their whole tables, so they take the users at once.
        self.dedup.forget_owners(set(pseudonyms))
        self.repeats.forget_users(set(pseudonyms))

    # -- lists --------------------------------------------------------------

    def redis_key(self, user_id: str, pseudonym: str) -> str:
        """Return the Redis key of a user's list."""
        ident = pseudonym if self.settings.redis_key_by == "pseudonym" else user_id
        return f"{self.settings.redis_key_prefix}user:{ident}"

    @property
    def popular_key(self) -> str:
        """Redis key of the fallback list for users without one."""
        return f"{self.settings.redis_key_prefix}popular"

    def refresh(self, dirty: dict[str, str], keys: dict[str, str] | None = None) -> list[Refreshed]:
        """Recompute the lists of ``dirty`` users (pseudonym to user id) in batches.

        ``keys`` gives the Redis key of users whose user id is not at hand
        (pseudonym to key). Each list is ranked ``spare_items`` deeper than k,
        so that an item going out of stock can be replaced without
        recomputing the list.
        """
        out: list[Refreshed] = []
        known_keys = keys or {}
        pseudonyms = [*dirty, *(p for p in known_keys if p not in dirty)]
        size = self.settings.refresh_batch
        k = self.settings.k
        depth = k + self.settings.spare_items
        for start in range(0, len(pseudonyms), size):
            chunk = pseudonyms[start : start + size]
            started = time.perf_counter()
            lists = self.engine.recommend(chunk, depth)
            computed_at = int(self.clock() * 1000)
            for pseudonym, items in zip(chunk, lists, strict=True):
                value = RecommendationList(items[:k], computed_at, self.engine.model_version)
                user_id = dirty.get(pseudonym)
                if user_id is None:
                    key = known_keys[pseudonym]
                else:
                    key = self.redis_key(user_id, pseudonym)
                out.append(Refreshed(pseudonym, key, items, value.to_json()))
            self.metrics.refresh_seconds.observe(time.perf_counter() - started)
        return out

    def popular_list(self) -> bytes:
        """Build the value of ``recs:popular``."""
        items = self.engine.popular(self.settings.k)
        computed_at = int(self.clock() * 1000)
        return RecommendationList(items, computed_at, self.engine.model_version).to_json()

    # -- state --------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Return everything a restart needs, with pseudonyms only."""
        return {
            "version": STATE_VERSION,
            "engine": self.engine,
            "dedup": self.dedup,
            "limiter": self.limiter,
            "repeats": self.repeats,
            "forgotten": dict(self.forgotten),
            "offsets": dict(self.offsets),
            "counts": dict(self.counts),
            "session_ids": _SESSION_IDS_HASHED,
        }

    def load_state(self, state: dict[str, Any]) -> int:
        """Replace the state with a restored checkpoint; return how many users it erased.

        The users erased are those of forget requests known before the load
        and newer than the checkpoint.
        """
        if state.get("version") != STATE_VERSION:
            msg = f"checkpoint state version {state.get('version')!r}; expected {STATE_VERSION}"
            raise ValueError(msg)
        self.engine = state["engine"]
        self.dedup = state["dedup"]
        self.limiter = state["limiter"]
        self.repeats = state["repeats"]
        # Forget requests newer than the checkpoint stay in force.
        newer = self.forgotten
        self.forgotten = dict(state["forgotten"])
        self.offsets = dict(state["offsets"])
        self.counts = Counter(state["counts"])
        if state.get("session_ids") != _SESSION_IDS_HASHED:
            # A state of an older version contains session ids as producers sent
            # them, often built from user ids, and the next events bring hashes.
            self.engine.replace_session_ids(self.session_token)
            logger.info("replaced the session ids of a checkpoint of an older version by hashes")
        self._apply_settings()
        return self.merge_forgotten(newer)

    def _apply_settings(self) -> None:
        """Apply the current list and admission settings to a restored state.

        The pickled objects carry the settings of the worker that saved
        them, and without this a changed setting would be ignored until the
        data folder is emptied.
        """
        settings = self.settings
        config = settings.engine_config()
        if config.seed != self.engine.config.seed:
            logger.warning(
                "the checkpoint's models were built with seed %d, not FUSIONREC_SEED=%d, "
                "and keep that seed until the data folder is emptied",
                self.engine.config.seed,
                config.seed,
            )
        self.engine.set_serving_options(config)
        self.dedup.resize(int(settings.dedup_window_s * 1000), settings.dedup_max_entries)
        self.limiter.set_limits(settings.user_rate_limit_per_s, settings.user_rate_burst)
        self.repeats.set_limits(
            settings.item_repeat_rate_per_s,
            settings.item_repeat_burst,
            settings.item_repeat_max_pairs,
        )

    # -- helpers ------------------------------------------------------------

    def _is_new(self, message: Message) -> bool:
        tp = (message.topic, message.partition)
        if message.offset < self.offsets.get(tp, 0):
            return False
        self.offsets[tp] = message.offset + 1
        return True

    def _admit(self, event: Event) -> tuple[str | None, bool]:
        """Return the pseudonym of an event, None when it is dropped, and whether to learn it.

        An event beyond the flood limits is not learned. A purchase or a
        refund beyond them still counts for the buyer's list, which must
        leave out what the user bought, so it comes back with False.
        """
        pseudonym = self.pseudonymize(event.user_id)
        if self.forgotten:
            forgotten_at = self.forgotten.get(self.forget_token(pseudonym))
            if forgotten_at is not None and event.timestamp_ms <= forgotten_at:
                self._drop("forgotten_user")
                return None, False
        if not self.dedup.add(event.event_id, pseudonym, event.timestamp_ms):
            self.metrics.duplicates.inc()
            self.counts["duplicate"] += 1
            return None, False
        self._newest_event_ms = max(self._newest_event_ms, event.timestamp_ms)
        self._limited_since_sweep += 1
        if not self.limiter.allow(pseudonym, event.timestamp_ms):
            self._drop("rate_limited")
        elif not self.repeats.allow(pseudonym, event.item_id, event.timestamp_ms):
            self._drop("item_repeat_limited")
        else:
            return pseudonym, True
        if event.type == "purchase":
            return pseudonym, False
        return None, False

    def _check_not_future(self, timestamp_ms: int, now_ms: int) -> None:
        if timestamp_ms > now_ms + int(self.settings.max_future_skew_s * 1000):
            ahead_s = (timestamp_ms - now_ms) / 1000
            moment = datetime.fromtimestamp(timestamp_ms / 1000, UTC).isoformat(timespec="seconds")
            msg = (
                f"timestamp {timestamp_ms} ({moment.replace('+00:00', 'Z')}) is {ahead_s:.0f} s "
                f"ahead of the worker clock; expected at most "
                f"{self.settings.max_future_skew_s:.0f} s ahead"
            )
            raise SchemaError("timestamp_in_future", msg, "timestamp")

    def _drop(self, reason: str) -> None:
        self.metrics.dropped.labels(reason=reason).inc()
        self.counts[reason] += 1

    def _dead_letter(
        self, message: Message, error: SchemaError, now_ms: int
    ) -> tuple[bytes | None, bytes]:
        self.metrics.rejected.labels(topic=message.topic, reason=error.reason).inc()
        self.counts[f"rejected:{error.reason}"] += 1
        self._warned[error.reason] += 1
        seen = self._warned[error.reason]
        # The detail and the field may quote the user id, as the name of an
        # unknown field for instance.
        parsed = self._parsed_value(message)
        user_ids = self._user_ids_to_hide(message, parsed)
        detail = self._hide_user_ids(error.detail, user_ids)
        field_name = None if error.field is None else self._hide_user_ids(error.field, user_ids)
        if seen == 1 or seen % 1000 == 0:
            logger.warning(
                "rejected message from %s[%d]@%d: %s (%s); %d of this kind so far",
                message.topic,
                message.partition,
                message.offset,
                error.reason,
                detail,
                seen,
            )
        record = {
            "reason": error.reason,
            "detail": detail,
            "field": field_name,
            "source": {
                "topic": message.topic,
                "partition": message.partition,
                "offset": message.offset,
            },
            "received_at": now_ms,
            "payload": self._kept_payload(message, parsed, user_ids),
        }
        key = None if message.key is None else self._redact_key(message, user_ids)
        return key, orjson.dumps(record)

    def _kept_payload(
        self, message: Message, parsed: Any, user_ids: list[str]
    ) -> dict[str, Any] | str:
        """Return the payload that a dead letter keeps, or a note when redacting it failed.

        The message is rejected already, so a fault in the redaction must not
        stop the batch: the letter then keeps no payload, which is never a
        raw user id either.
        """
        try:
            return self._redacted_payload(message, parsed, user_ids)
        except Exception as exc:  # noqa: BLE001 - one message must not stop the stream
            logger.error(
                "redacting the payload of the message from %s[%d]@%d failed with %s",
                message.topic,
                message.partition,
                message.offset,
                type(exc).__name__,
            )
            self.metrics.errors.labels(kind="dead_letter_payload").inc()
            return f"<not kept: redacting it failed with {type(exc).__name__}>"

    def _decode_failed(
        self, message: Message, error: Exception, now_ms: int, stage: str = "decode"
    ) -> tuple[bytes | None, bytes]:
        # Code that raises anything but SchemaError has a bug. The message
        # goes to the dead-letter topic like any rejected one, so that the
        # rest of its batch is still applied and it can be replayed once the
        # bug is fixed. Only the exception's type is logged and kept,
        # because its text may quote the message and so a user id.
        step = "decoding" if stage == "decode" else "admitting"
        logger.error(
            "%s the message from %s[%d]@%d failed with %s",
            step,
            message.topic,
            message.partition,
            message.offset,
            type(error).__name__,
        )
        self.metrics.errors.labels(kind=f"{stage}_failed").inc()
        detail = f"{step} the message failed with {type(error).__name__}; expected a valid message"
        return self._dead_letter(message, SchemaError(f"{stage}_failed", detail), now_ms)

    def _redact_key(self, message: Message, user_ids: list[str]) -> bytes:
        key = message.key or b""
        text = key.decode("utf-8", "replace")
        # An item update is keyed by its item id, but an event sent to the
        # item topic by mistake is keyed by its user id. A key longer than
        # any id is cut, so that the letter stays far below the producer's
        # size limit.
        if message.topic == self.settings.topic(ITEMS_TOPIC) and text not in user_ids:
            return key[:_MAX_ID_BYTES]
        return self.pseudonymize(text).encode()

    def _parsed_value(self, message: Message) -> Any:
        """Return the message value parsed as JSON, or None when it is not JSON or too large."""
        raw = message.value
        if raw is None or len(raw) > self.settings.max_message_bytes:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None

    def _user_ids_to_hide(self, message: Message, parsed: Any) -> list[str]:
        """Return the user ids that a dead letter of ``message`` must not quote, longest first.

        The message key is the user id when the producer keyed the message
        as the contract requires. The value's ``user_id`` fields, at any
        depth and also as numbers, name user ids too, also when the key is
        missing or differs from them, or when an event went to the item
        topic, whose key is an item id.
        """
        found: set[str] = set()
        user_key = self._user_key(message)
        if user_key is not None:
            found.add(user_key)
        if isinstance(parsed, dict | list):
            # An envelope, such as a CloudEvents "data" field, nests the event.
            for user_id in _nested_user_ids(parsed):
                if len(found) >= _MAX_USER_IDS_HIDDEN:
                    break
                found.add(user_id)
        elif message.value is not None:
            text = message.value[: self.settings.max_message_bytes]
            for match in _USER_ID_IN_TEXT.finditer(text):
                if len(found) >= _MAX_USER_IDS_HIDDEN:
                    break
                found.add(match.group(4).decode("utf-8", "replace"))
        # Replacing every "7" or "42" would garble the text.
        hidden = (u for u in found if _MIN_KEY_TO_REDACT <= len(u) <= _MAX_ID_TEXT)
        return sorted(hidden, key=len, reverse=True)

    def _redacted_payload(
        self, message: Message, parsed: Any, user_ids: list[str]
    ) -> dict[str, Any] | str:
        raw = message.value
        if raw is None:
            return ""
        if isinstance(parsed, dict):
            obj = parsed
            if "user_id" in obj:
                user_id = obj["user_id"]
                obj["user_id"] = (
                    self.pseudonymize(user_id) if isinstance(user_id, str) else "<redacted>"
                )
            # Always walked, also without ids to replace, because it cuts the
            # nesting that orjson can read but not write back.
            pairs = [
                (_whole_id_pattern(user_id), user_id, self.pseudonymize(user_id))
                for user_id in user_ids
            ]
            obj = _replace_strings(obj, pairs)
            text = orjson.dumps(obj)
            if len(text) <= _PAYLOAD_PREVIEW:
                return obj
            raw = text
        # Not an object, or too long to keep whole: keep a cut text with any
        # user_id value that can be found replaced by its pseudonym.
        cut = _USER_ID_IN_TEXT.sub(
            lambda m: (
                m.group(1)
                + self.pseudonymize(m.group(4).decode("utf-8", "replace")).encode()
                + m.group(5)
            ),
            raw[:_PAYLOAD_PREVIEW],
        )
        # Producers key user messages by user id, so the key finds the id
        # wherever the text contains it, whatever the field is called.
        key = message.key
        if key and self._user_key(message) is not None:
            pseudonym = self.pseudonymize(key.decode("utf-8", "replace")).encode()
            cut = _sub_literal(_whole_id_pattern(key), pseudonym, cut)
        # A cut inside a character of the id would leave U+FFFD after its
        # start, which then no longer reads as the start of the id.
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = decoder.decode(cut, final=len(raw) <= _PAYLOAD_PREVIEW)
        return self._hide_user_ids(text, user_ids)

    def _user_key(self, message: Message) -> str | None:
        """Return the message key as the user id to hide, or None when it is no user's id."""
        key = message.key
        if not key or not _MIN_KEY_TO_REDACT <= len(key) <= _MAX_ID_BYTES:
            return None
        if message.topic == self.settings.topic(ITEMS_TOPIC):
            return None
        return key.decode("utf-8", "replace")

    def _hide_user_ids(self, text: str, user_ids: list[str]) -> str:
        """Return ``text`` with each user id, whole or cut short, replaced by its pseudonym."""
        for user_id in user_ids:
            pseudonym = self.pseudonymize(user_id)
            # Error messages quote values as JSON, which escapes a backslash,
            # a quote or a control character of the id.
            quoted = json.dumps(user_id, ensure_ascii=False)[1:-1]
            for form in dict.fromkeys((user_id, quoted)):
                text = _sub_literal(_whole_id_pattern(form), pseudonym, text)
                text = _replace_cut_prefix(text, form, pseudonym)
        return text


# The mark that error messages put after a value cut short, with the
# closing quote of a cut JSON string before it.
_CUT_MARK = re.compile(r'"?\u2026 \(\d+ characters\)')
# A dead letter checks at most this many cut marks and user ids, so that a
# hostile message cannot make its redaction slow. Beyond that many ids, the
# text keeps pseudonyms only in its user_id fields.
_MAX_CUTS_CHECKED = 8
_MAX_USER_IDS_HIDDEN = 8


def _replace_cut_prefix(text: str, user_id: str, pseudonym: str) -> str:
    """Return ``text`` with a start of ``user_id`` that ends at a cut replaced by ``pseudonym``.

    A cut ends at a cut mark or at the end of the text. The longest proper
    prefix of the id that ends at a cut is replaced. Each cut takes time
    linear in the length of the id. NOTE: a cut that leaves fewer than 3
    characters of the id keeps them, because so short a start also matches
    unrelated text.
    """
    marks = itertools.islice(_CUT_MARK.finditer(text), _MAX_CUTS_CHECKED)
    ends = [match.start() for match in marks] + [len(text)]
    failure: list[int] | None = None
    # From the last cut backwards, so the positions of earlier cuts stay valid.
    for end in reversed(ends):
        if end > len(text):
            # A replacement at a later cut removed this cut's mark along with
            # the start of the id that contained it, and left the text shorter
            # than ``end``. No start of the id ends here, and the slice below
            # would end at the end of the text and misplace the replacement.
            continue
        window = text[max(0, end - len(user_id) + 1) : end]
        # A prefix of the id that ends at the cut and is long enough to replace
        # ends with the window's last 3 characters, so str.find rules out
        # most cuts before the character-by-character scan.
        tail = window[-_MIN_KEY_TO_REDACT:]
        if len(tail) < _MIN_KEY_TO_REDACT or user_id.find(tail, 0, len(user_id) - 1) < 0:
            continue
        if failure is None:
            failure = _failure_function(user_id)
        length = _matched_prefix_length(window, user_id, failure)
        # Try the next shorter start of the id that ends here until one begins
        # a word, the rule that `_whole_id_pattern` applies to a whole id.
        while length >= _MIN_KEY_TO_REDACT and not _starts_word(text, end - length, user_id):
            length = failure[length - 1]
        if length >= _MIN_KEY_TO_REDACT:
            text = text[: end - length] + pseudonym + text[end:]
    return text


def _failure_function(pattern: str) -> list[int]:
    """Compute the Knuth-Morris-Pratt failure function of ``pattern``.

    Item ``i`` is the length of the longest proper prefix of
    ``pattern[: i + 1]`` that is also a suffix of it.
    """
    failure = [0] * len(pattern)
    matched = 0
    for i in range(1, len(pattern)):
        char = pattern[i]
        while matched and pattern[matched] != char:
            matched = failure[matched - 1]
        if pattern[matched] == char:
            matched += 1
        failure[i] = matched
    return failure


def _matched_prefix_length(text: str, pattern: str, failure: list[int]) -> int:
    """Return the length of the longest prefix of ``pattern`` that is a suffix of ``text``.

    ``failure`` is `_failure_function` of ``pattern``, and ``text`` must be
    shorter than ``pattern``, so that no match is whole.
    """
    matched = 0
    for char in text:
        while matched and pattern[matched] != char:
            matched = failure[matched - 1]
        if pattern[matched] == char:
            matched += 1
    return matched


def _nested_user_ids(value: Any, depth: int = 0) -> Iterator[str]:
    """Yield the value of every ``user_id`` field in ``value``, a number as its digits."""
    if depth >= _MAX_REDACT_DEPTH:
        return
    if isinstance(value, dict):
        user_id = value.get("user_id")
        if isinstance(user_id, str):
            yield user_id
        elif isinstance(user_id, int) and not isinstance(user_id, bool):
            yield str(user_id)
        for item in value.values():
            yield from _nested_user_ids(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from _nested_user_ids(item, depth + 1)


def _replace_strings(
    value: Any, pairs: list[tuple[re.Pattern[str], str, str]], depth: int = 0
) -> Any:
    """Return ``value`` with each user id of ``pairs`` replaced in every string and key.

    A pair is the id's `_whole_id_pattern`, the id and its pseudonym. Below
    100 levels of nesting, which no valid message has, whatever is left
    becomes ``<redacted>``, so a deep payload can neither exhaust the stack
    nor exceed the nesting that orjson writes.
    """
    if isinstance(value, str):
        for pattern, _, pseudonym in pairs:
            value = _sub_literal(pattern, pseudonym, value)
        return value
    # A numeric user id arrives as a number as often as as a string.
    if isinstance(value, int | float) and not isinstance(value, bool):
        text = str(value)
        for _, user_id, pseudonym in pairs:
            if text == user_id:
                return pseudonym
        return value
    if depth >= _MAX_REDACT_DEPTH and isinstance(value, dict | list):
        return "<redacted>"
    if isinstance(value, dict):
        return {
            _replace_strings(name, pairs): _replace_strings(item, pairs, depth + 1)
            for name, item in value.items()
        }
    if isinstance(value, list):
        return [_replace_strings(item, pairs, depth + 1) for item in value]
    return value


@overload
def _whole_id_pattern(user_id: str) -> re.Pattern[str]: ...
@overload
def _whole_id_pattern(user_id: bytes) -> re.Pattern[bytes]: ...
def _whole_id_pattern(user_id: str | bytes) -> re.Pattern[str] | re.Pattern[bytes]:
    """Return a pattern that finds ``user_id`` in a text, unless it is part of a longer word.

    A short id is often a word too, and replacing the user ``view`` inside
    ``review`` would garble the letter. So an id shorter than 8 characters
    that starts with a letter or digit matches only where no letter or digit
    comes before it, and likewise at its end. Punctuation and the underscore
    separate words, so ``alice-s1`` still hides ``alice``. A longer id, such
    as an e-mail address or a UUID, matches wherever it appears, because a
    word containing it by chance is far less likely than a field that glues
    it to other text.
    """
    if isinstance(user_id, bytes):
        body = re.escape(user_id)
        if len(user_id.decode("utf-8", "replace")) >= _WORD_ID_LENGTH:
            return re.compile(body)
        head = rb"(?<![A-Za-z0-9])" if user_id[:1].isalnum() else b""
        tail = rb"(?![A-Za-z0-9])" if user_id[-1:].isalnum() else b""
        return re.compile(head + body + tail)
    if len(user_id) >= _WORD_ID_LENGTH:
        return re.compile(re.escape(user_id))
    head_text = r"(?<![^\W_])" if user_id[:1].isalnum() else ""
    tail_text = r"(?![^\W_])" if user_id[-1:].isalnum() else ""
    return re.compile(head_text + re.escape(user_id) + tail_text)


def _sub_literal(pattern: re.Pattern[AnyStr], replacement: AnyStr, text: AnyStr) -> AnyStr:
    """Return ``text`` with every match of ``pattern`` replaced by ``replacement`` as it is."""
    # A function as the replacement keeps re from reading escapes in it.
    return pattern.sub(lambda _: replacement, text)


def _starts_word(text: str, start: int, user_id: str) -> bool:
    """Tell whether `_whole_id_pattern` lets ``user_id`` begin at ``start`` of ``text``."""
    if start == 0 or len(user_id) >= _WORD_ID_LENGTH:
        return True
    return not (user_id[:1].isalnum() and text[start - 1].isalnum())


def _quoted(text: str, limit: int = 64) -> str:
    """Return ``text`` as a JSON string for an error message, cut after ``limit`` characters."""
    if len(text) <= limit:
        return orjson.dumps(text).decode()
    return f"{orjson.dumps(text[:limit]).decode()}\u2026 ({len(text)} characters)"


def _event_time(event: Event) -> int:
    return event.timestamp_ms


def topic_kind(settings: Settings, topic: str) -> str:
    """Return ``events``, ``items`` or ``forget`` for a topic name."""
    if topic == settings.topic(ITEMS_TOPIC):
        return "items"
    if topic == settings.topic(FORGET_TOPIC):
        return "forget"
    return "events"


def messages_from(records: Sequence[Any]) -> list[Message]:
    """Convert aiokafka ``ConsumerRecord`` objects to `Message`."""
    return [Message(r.topic, r.partition, r.offset, r.key, r.value) for r in records]
