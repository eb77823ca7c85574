"""Worker settings, read from ``FUSIONREC_`` environment variables.

Every variable, its default and its unit is listed in `SETTINGS_DOC` and in
the README's settings table; ``fusionrec settings`` prints the effective values
with secrets masked.
"""

from __future__ import annotations

import enum
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.connection import parse_url

from models.base import ModelError
from models.engine import MAX_WEIGHT, MODEL_NAMES, EngineConfig
from models.fusion import FUSION_STRATEGIES

PREFIX = "FUSIONREC_"


class SettingsError(ValueError):
    """An environment variable has a value that cannot be used."""


class Service(enum.Flag):
    """Set of services whose settings `Settings.validate` checks."""

    NONE = 0
    KAFKA = enum.auto()
    REDIS = enum.auto()
    ALL = KAFKA | REDIS


# The settings that belong to one service, checked only for commands that
# connect to it.
_SERVICE_FIELDS: dict[Service, frozenset[str]] = {
    Service.KAFKA: frozenset(
        {"kafka_bootstrap", "kafka_security_protocol", "kafka_sasl_mechanism"}
    ),
    Service.REDIS: frozenset(
        {"redis_url", "redis_key_by", "ttl_s", "redis_write_batch", "redis_retry_max_s"}
    ),
}


@dataclass(frozen=True)
class Settings:
    """Effective configuration of a worker, replay or reader process."""

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = field(default="", repr=False)
    kafka_ssl_cafile: str = ""
    kafka_ssl_certfile: str = ""
    kafka_ssl_keyfile: str = ""
    topic_prefix: str = ""
    partitions: int = 8
    app_id: str = "fusionrec"
    consumer_session_timeout_s: float = 30.0
    consumer_heartbeat_s: float = 3.0

    # Redis
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: str = field(default="", repr=False)
    redis_ssl_ca_certs: str = ""
    redis_key_prefix: str = "recs:"
    redis_key_by: str = "user_id"
    ttl_s: int = 30 * 24 * 3600
    redis_write_batch: int = 1000
    redis_retry_max_s: float = 1.0

    # Lists and models
    k: int = 20
    fusion: str = ""
    weights: str = ""
    repeat_purchases: str = "exclude"
    rebuyable_categories: str = ""
    max_per_category: int = 0
    exploration: float = 0.0
    seed: int = 0

    # Batching
    event_batch: int = 2000
    event_batch_wait_ms: int = 50
    refresh_batch: int = 256
    spare_items: int = 10

    # Input rules
    max_message_bytes: int = 16_384
    max_future_skew_s: float = 300.0
    check_key: bool = True
    dedup_window_s: float = 26 * 3600.0
    dedup_max_entries: int = 2_000_000
    user_rate_limit_per_s: float = 50.0
    user_rate_burst: float = 2000.0
    item_repeat_rate_per_s: float = 0.1
    item_repeat_burst: float = 30.0
    item_repeat_max_pairs: int = 500_000

    # State, privacy and operations
    data_dir: str = "var"
    checkpoint_interval_s: float = 30.0
    checkpoints_kept: int = 3
    pseudonym_key: str = field(default="", repr=False)
    pseudonym_key_file: str = ""
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    log_level: str = "info"
    log_format: str = "text"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, services: Service = Service.ALL
    ) -> Settings:
        """Build settings from ``FUSIONREC_*`` variables, rejecting unusable values.

        The settings of a service outside ``services`` are read but not
        checked, so a command that never connects to Redis, for instance,
        runs whatever ``FUSIONREC_REDIS_URL`` contains.
        """
        env = os.environ if environ is None else environ
        unchecked = frozenset().union(
            *(names for service, names in _SERVICE_FIELDS.items() if service not in services)
        )
        values: dict[str, Any] = {}
        for spec in fields(cls):
            name = PREFIX + spec.name.upper()
            if name not in env:
                continue
            try:
                values[spec.name] = _convert(name, env[name], spec.default)
            except SettingsError:
                # A number that does not parse, for a service the command
                # never connects to, keeps its default.
                if spec.name not in unchecked:
                    raise
        settings = cls(**values)
        settings.validate(services)
        return settings

    def validate(self, services: Service = Service.ALL) -> None:
        """Raise `SettingsError` on values that are out of range.

        Of the settings that belong to one service, only those of
        ``services`` are checked.
        """
        if Service.KAFKA in services:
            self._validate_kafka()
        if Service.REDIS in services:
            self._validate_redis()
        positive = {
            "partitions": self.partitions,
            "k": self.k,
            "event_batch": self.event_batch,
            "refresh_batch": self.refresh_batch,
            "max_message_bytes": self.max_message_bytes,
            "checkpoint_interval_s": self.checkpoint_interval_s,
            "checkpoints_kept": self.checkpoints_kept,
            "dedup_max_entries": self.dedup_max_entries,
            "user_rate_limit_per_s": self.user_rate_limit_per_s,
            "user_rate_burst": self.user_rate_burst,
            "item_repeat_rate_per_s": self.item_repeat_rate_per_s,
            "item_repeat_burst": self.item_repeat_burst,
            "item_repeat_max_pairs": self.item_repeat_max_pairs,
            "consumer_session_timeout_s": self.consumer_session_timeout_s,
            "consumer_heartbeat_s": self.consumer_heartbeat_s,
        }
        _check_positive(positive)
        if self.log_format not in ("text", "json"):
            msg = f"{PREFIX}LOG_FORMAT is {self.log_format!r}; expected 'text' or 'json'"
            raise SettingsError(msg)
        if self.repeat_purchases not in ("exclude", "allow"):
            msg = (
                f"{PREFIX}REPEAT_PURCHASES is {self.repeat_purchases!r}; "
                "expected 'exclude' or 'allow'"
            )
            raise SettingsError(msg)
        if not 0.0 <= self.exploration < 1.0:
            msg = f"{PREFIX}EXPLORATION is {self.exploration}; expected a share in [0, 1)"
            raise SettingsError(msg)
        if not _TOPIC_PREFIX.fullmatch(self.topic_prefix):
            msg = (
                f"{PREFIX}TOPIC_PREFIX is {self.topic_prefix!r}; expected at most 200 of the "
                "characters that Kafka allows in topic names: letters, digits, '.', '_' and '-'"
            )
            raise SettingsError(msg)
        if not self.app_id.strip():
            msg = f"{PREFIX}APP_ID is {self.app_id!r}; expected a non-empty id, such as 'fusionrec'"
            raise SettingsError(msg)
        for name in ("user_rate_limit_per_s", "item_repeat_rate_per_s"):
            rate = getattr(self, name)
            if rate < MIN_RATE_PER_S:
                # The limiter divides by the rate per millisecond, which far
                # smaller rates round to 0.
                msg = f"{PREFIX}{name.upper()} is {rate}; expected at least {MIN_RATE_PER_S}"
                raise SettingsError(msg)
        non_negative = {
            "max_future_skew_s": self.max_future_skew_s,
            "max_per_category": self.max_per_category,
            "spare_items": self.spare_items,
            "event_batch_wait_ms": self.event_batch_wait_ms,
            "seed": self.seed,
        }
        for name, value in non_negative.items():
            if value < 0:
                msg = f"{PREFIX}{name.upper()} is {value}; expected a number >= 0"
                raise SettingsError(msg)
        for name in ("user_rate_burst", "item_repeat_burst"):
            burst = getattr(self, name)
            if burst < 1:
                # A bucket below one event rejects every event.
                msg = f"{PREFIX}{name.upper()} is {burst}; expected at least 1 event"
                raise SettingsError(msg)
        if self.consumer_heartbeat_s >= self.consumer_session_timeout_s:
            msg = (
                f"{PREFIX}CONSUMER_HEARTBEAT_S is {self.consumer_heartbeat_s}; expected less "
                f"than {PREFIX}CONSUMER_SESSION_TIMEOUT_S ({self.consumer_session_timeout_s})"
            )
            raise SettingsError(msg)
        if self.seed >= 2**32:
            msg = f"{PREFIX}SEED is {self.seed}; expected a number below 2**32"
            raise SettingsError(msg)
        if not 0 <= self.web_port < 65536:
            msg = f"{PREFIX}WEB_PORT is {self.web_port}; expected a port in [0, 65535]"
            raise SettingsError(msg)
        self._check_choices({"fusion": ("", *FUSION_STRATEGIES), "log_level": _LOG_LEVELS})
        for name, weight in self.parsed_weights().items():
            if name not in MODEL_NAMES:
                msg = (
                    f"{PREFIX}WEIGHTS names {name!r}; expected model names among "
                    f"{', '.join(MODEL_NAMES)}"
                )
                raise SettingsError(msg)
            if not math.isfinite(weight) or not 0 <= weight <= MAX_WEIGHT:
                msg = (
                    f"{PREFIX}WEIGHTS gives {name} the weight {weight}; "
                    f"expected a number in [0, {MAX_WEIGHT:g}]"
                )
                raise SettingsError(msg)
        try:
            self.engine_config().validate()
        except ModelError as exc:
            msg = f"the model settings are invalid: {exc}"
            raise SettingsError(msg) from exc
        if self.dedup_window_s < self.checkpoint_interval_s + 24 * 3600:
            msg = (
                f"{PREFIX}DEDUP_WINDOW_S is {self.dedup_window_s}; expected at least "
                "the checkpoint interval plus 24 hours, so that a replay after a "
                "restart is still de-duplicated"
            )
            raise SettingsError(msg)

    def _validate_kafka(self) -> None:
        check_bootstrap(self.kafka_bootstrap, f"{PREFIX}KAFKA_BOOTSTRAP")
        self._check_choices(
            {
                "kafka_security_protocol": _SECURITY_PROTOCOLS,
                "kafka_sasl_mechanism": _SASL_MECHANISMS,
            }
        )

    def _validate_redis(self) -> None:
        expected = (
            "expected a URL starting with redis://, rediss:// or unix://, "
            "such as redis://127.0.0.1:6379/0"
        )
        try:
            scheme = urlsplit(self.redis_url).scheme
            if scheme in _REDIS_SCHEMES:
                # The client's own parser, which the sink uses later, so that
                # a bad port fails here and not in the running worker.
                parse_url(self.redis_url)
        except ValueError as exc:
            msg = f"{PREFIX}REDIS_URL is {_mask_url_password(self.redis_url)!r} ({exc}); {expected}"
            raise SettingsError(msg) from exc
        if scheme not in _REDIS_SCHEMES:
            msg = f"{PREFIX}REDIS_URL is {_mask_url_password(self.redis_url)!r}; {expected}"
            raise SettingsError(msg)
        _check_positive(
            {
                "ttl_s": self.ttl_s,
                "redis_write_batch": self.redis_write_batch,
                "redis_retry_max_s": self.redis_retry_max_s,
            }
        )
        if self.ttl_s > MAX_TTL_S:
            # Redis rejects an expiry beyond the range of its millisecond
            # clock, and the sink would take that for an endless outage.
            msg = f"{PREFIX}TTL_S is {self.ttl_s}; expected at most {MAX_TTL_S} seconds (10 years)"
            raise SettingsError(msg)
        if self.ttl_s < MIN_TTL_S:
            # recs:popular is written with this TTL and rebuilt every few
            # seconds, so a shorter TTL would let it vanish between rebuilds.
            msg = f"{PREFIX}TTL_S is {self.ttl_s}; expected at least {MIN_TTL_S} seconds"
            raise SettingsError(msg)
        if self.redis_key_by not in ("user_id", "pseudonym"):
            msg = (
                f"{PREFIX}REDIS_KEY_BY is {self.redis_key_by!r}; expected 'user_id' or 'pseudonym'"
            )
            raise SettingsError(msg)

    def _check_choices(self, choices: Mapping[str, tuple[str, ...]]) -> None:
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                listed = ", ".join(repr(choice) for choice in allowed)
                msg = f"{PREFIX}{name.upper()} is {value!r}; expected one of {listed}"
                raise SettingsError(msg)

    def engine_config(self) -> EngineConfig:
        """Build the model configuration from these settings."""
        options: dict[str, Any] = {
            "k": self.k,
            "repeat_purchases": self.repeat_purchases,
            "seed": self.seed,
            "exploration": self.exploration,
            "max_per_category": self.max_per_category or None,
        }
        if self.fusion:
            options["fusion"] = self.fusion
        weights = self.parsed_weights()
        if weights:
            options["weights"] = weights
        categories = [c.strip() for c in self.rebuyable_categories.split(",") if c.strip()]
        if categories:
            options["rebuyable_categories"] = frozenset(categories)
        return EngineConfig(**options)

    def topic(self, name: str) -> str:
        """Return the full name of topic ``name``, with the configured prefix."""
        return f"{self.topic_prefix}{name}"

    @property
    def data_path(self) -> Path:
        """Folder of checkpoints and other local state."""
        return Path(self.data_dir)

    def parsed_weights(self) -> dict[str, float]:
        """Parse ``FUSIONREC_WEIGHTS`` (``name=weight,...``) into a mapping."""
        weights: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in self.weights.split(","))):
            name, sep, value = part.partition("=")
            try:
                if not sep:
                    raise ValueError(part)
                weights[name.strip()] = float(value)
            except ValueError as exc:
                msg = (
                    f"{PREFIX}WEIGHTS entry {part!r} is invalid; "
                    "expected name=number, for example mf=1.0,popular=0.2"
                )
                raise SettingsError(msg) from exc
        return weights

    def masked(self) -> dict[str, Any]:
        """Return every setting by variable name, with secrets replaced by ``***``."""
        out: dict[str, Any] = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name in _SECRETS and value:
                value = "***"
            elif spec.name in _URLS and isinstance(value, str):
                value = _mask_url_password(value)
            out[PREFIX + spec.name.upper()] = value
        return out


# The shortest and the longest list expiry accepted, in seconds.
MIN_TTL_S = 60
MAX_TTL_S = 10 * 365 * 86_400
# The characters of Kafka topic names, leaving room for the longest name
# after the prefix within Kafka's limit of 249 characters.
_TOPIC_PREFIX = re.compile(r"[A-Za-z0-9._-]{0,200}")
# The slowest rate limit accepted, in events per second: one event in about
# 12 days.
MIN_RATE_PER_S = 1e-6
_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_LOG_LEVELS = ("debug", "info", "warning", "error")

_SECRETS = frozenset({"kafka_sasl_password", "redis_password", "pseudonym_key"})
# URLs that may carry a password in their user-info part or query string.
_URLS = frozenset({"redis_url"})


# The URL schemes that redis-py's from_url accepts.
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def check_bootstrap(bootstrap: str, name: str) -> None:
    """Raise `SettingsError` unless ``bootstrap`` is a comma-separated list of host:port.

    ``name`` is the variable or option the list came from, for the message.
    """
    entries = [entry.strip() for entry in bootstrap.split(",")]
    for entry in entries:
        host, _, port = entry.rpartition(":")
        if host.strip("[]") and port.isascii() and port.isdigit() and 0 < int(port) < 65536:
            continue
        msg = (
            f"{name} entry {entry!r} of {bootstrap!r} is invalid; expected "
            "comma-separated host:port pairs, such as 127.0.0.1:9092"
        )
        raise SettingsError(msg)


def _check_positive(values: Mapping[str, float]) -> None:
    for name, value in values.items():
        if value <= 0:
            msg = f"{PREFIX}{name.upper()} is {value}; expected a positive number"
            raise SettingsError(msg)


def _mask_url_password(url: str) -> str:
    """Replace the password in a URL's user-info part or query string with ``***``.

    >>> _mask_url_password("redis://:secret@127.0.0.1:6379/0")
    'redis://:***@127.0.0.1:6379/0'
    >>> _mask_url_password("redis://127.0.0.1:6379/0?password=secret&db=1")
    'redis://127.0.0.1:6379/0?password=***&db=1'
    >>> _mask_url_password("redis://127.0.0.1:6379/0")
    'redis://127.0.0.1:6379/0'
    >>> _mask_url_password("redis://:secret@[::1/0")
    'redis://***@[::1/0'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        # Too malformed to parse: every user-info part and password goes.
        masked = re.sub(r"//[^/]*@", "//***@", url)
        return re.sub(r"(?i)(password=)[^&]*", r"\1***", masked)
    if parts.password is not None:
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{user}:***@{host}")
    # redis-py also reads a password from the query string.
    query = [
        (name, "***" if name.lower() == "password" else value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    if query:
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


def _convert(name: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            number = float(raw)
        else:
            return raw
    except ValueError as exc:
        kind = type(default).__name__
        msg = f"{name} is {raw!r}; expected a value of type {kind}"
        raise SettingsError(msg) from exc
    if not math.isfinite(number):
        # No setting has a use for them, and NaN passes every range check.
        msg = f"{name} is {raw!r}; expected a finite number"
        raise SettingsError(msg)
    return number


SETTINGS_DOC: dict[str, str] = {
    "kafka_bootstrap": "Kafka bootstrap servers, comma-separated host:port.",
    "kafka_security_protocol": "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.",
    "kafka_sasl_mechanism": "SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.",
    "kafka_sasl_username": "SASL user name.",
    "kafka_sasl_password": "SASL password (secret, never logged).",
    "kafka_ssl_cafile": "CA bundle that signs the broker certificates.",
    "kafka_ssl_certfile": "Client certificate for mutual TLS.",
    "kafka_ssl_keyfile": "Key of the client certificate.",
    "topic_prefix": (
        "Prefix put before every topic name, to share one cluster: up to 200 letters, "
        "digits, '.', '_' or '-'."
    ),
    "partitions": "Partition count of every topic that the project creates.",
    "app_id": "Faust application id, which is also the Kafka consumer group; not empty.",
    "consumer_session_timeout_s": "Kafka consumer session timeout, in seconds.",
    "consumer_heartbeat_s": "Kafka consumer heartbeat interval, in seconds.",
    "redis_url": "Redis URL; rediss:// turns on TLS.",
    "redis_password": "Redis password (secret, never logged); overrides one in the URL.",
    "redis_ssl_ca_certs": "CA bundle for a rediss:// server.",
    "redis_key_prefix": (
        "Prefix of the Redis keys: {prefix}user:{id}, {prefix}popular and {prefix}forgotten."
    ),
    "redis_key_by": "user_id (the shop's id, default) or pseudonym (the keyed HMAC).",
    "ttl_s": (
        "Expiry of every user list, in seconds (60 to 315360000), renewed whenever the user's "
        "own events recompute the list."
    ),
    "redis_write_batch": "Lists written per Redis pipeline.",
    "redis_retry_max_s": "Longest wait between Redis retries during an outage, in seconds.",
    "k": "Length of each list.",
    "fusion": "Fusion strategy: weighted, rrf or learned; empty means the model default.",
    "weights": (
        "Per-model weights for weighted fusion, as name=number,... with the names popular, "
        "trending, category, covisit, basket, recent, mf, context and title, each in [0, 1e6]."
    ),
    "repeat_purchases": "exclude: purchased items leave the user's list; allow: they stay.",
    "rebuyable_categories": "Comma-separated categories whose purchases stay in lists.",
    "max_per_category": "Most items of one category in a list; 0 means no cap.",
    "exploration": "Share of list slots given to exploration items, in [0, 1).",
    "seed": "Random seed of the models.",
    "event_batch": "Most events taken from Kafka per model update.",
    "event_batch_wait_ms": "Longest wait for a batch to fill, in milliseconds.",
    "refresh_batch": (
        "Users whose lists are recomputed in one batched call, at most: fewer when"
        " a batch would hold the worker for more than about 0.1 s."
    ),
    "spare_items": "Items ranked below the cut of each list, to replace sold-out items at once.",
    "max_message_bytes": "Messages larger than this go to the dead-letter topic.",
    "max_future_skew_s": (
        "Events and forget requests stamped further ahead of the worker clock are rejected."
    ),
    "check_key": (
        "Reject events whose Kafka key is not their user_id, and item updates without a key."
    ),
    "dedup_window_s": (
        "Event time span over which event ids are remembered, in seconds; at least the "
        "checkpoint interval plus 86400."
    ),
    "dedup_max_entries": "Most event ids remembered, whatever their age.",
    "user_rate_limit_per_s": (
        "Sustained events per second of event time that one user may send; at least 1e-6."
    ),
    "user_rate_burst": "Events one user may send at once above the sustained rate.",
    "item_repeat_rate_per_s": (
        "Sustained events per second of event time of one user on one item; at least 1e-6."
    ),
    "item_repeat_burst": "Events one user may send on one item at once.",
    "item_repeat_max_pairs": "User-item pairs whose repeat budget is remembered.",
    "data_dir": "Folder of checkpoints.",
    "checkpoint_interval_s": "Seconds between checkpoints while events arrive.",
    "checkpoints_kept": "Checkpoints kept on disk; older ones are deleted.",
    "pseudonym_key": "Key of the HMAC that pseudonymizes user ids (secret).",
    "pseudonym_key_file": "File holding that key, read when FUSIONREC_PSEUDONYM_KEY is unset.",
    "web_host": "Address of the metrics and health endpoint.",
    "web_port": "Port of the metrics and health endpoint.",
    "log_level": "debug, info, warning or error.",
    "log_format": "text, or json for one JSON object per line with lifecycle fields as keys.",
}
