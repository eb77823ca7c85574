"""Malformed, hostile and tricky-but-valid messages for the event topics.

Each bad case names the reason code and the field that the decoder must
report. Tests feed the corpus to the decoder, to the processor and, through
the real broker, to the worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

NOW_MS = 1_760_000_000_000


@dataclass(frozen=True)
class BadCase:
    """A message that must be rejected with ``reason`` blaming ``field``."""

    name: str
    value: bytes | None
    reason: str
    field: str | None
    topic_type: str = "view"
    key: bytes | None = b"u1"


def event(**fields: object) -> dict[str, object]:
    """Return a valid view event of user ``u1`` with ``fields`` changed or added."""
    base: dict[str, object] = {
        "event_id": "e-1",
        "type": "view",
        "user_id": "u1",
        "item_id": "i1",
        "timestamp": NOW_MS,
    }
    base.update(fields)
    return base


def without(name: str) -> dict[str, object]:
    """Return a valid event with field ``name`` removed."""
    base = event()
    del base[name]
    return base


def dumps(obj: object) -> bytes:
    return orjson.dumps(obj)


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


BAD_CASES: list[BadCase] = [
    BadCase("not json", b"hello", "not_json", None),
    BadCase("empty message", b"", "not_json", None),
    BadCase("null value (tombstone)", None, "null_value", None),
    BadCase("truncated json", b'{"event_id": "e-1", "type": "vi', "not_json", None),
    BadCase("invalid utf-8", b'{"event_id": "\xff\xfe", "type": "view"}', "not_utf8", None),
    BadCase(
        "lone surrogate", b'{"event_id": "\\ud800", "type": "view"}', "lone_surrogate", "event_id"
    ),
    BadCase(
        "lone surrogate in title",
        dumps(event(title="caf"))[:-2] + b'\\udce9"}',
        "lone_surrogate",
        "title",
    ),
    BadCase("json array", b"[1, 2, 3]", "not_object", None),
    BadCase("json string", b'"view"', "not_object", None),
    BadCase("json number", b"42", "not_object", None),
    BadCase("json null", b"null", "not_object", None),
    BadCase("deeply nested", _nested(2000), "too_deep", None),
    # orjson 3.13 reads up to 1,024 levels of nesting but writes at most
    # 254, so the dead letter must cut these 300, also without a key.
    BadCase(
        "nested 300 levels, no key",
        b'{"x": ' + b"[" * 300 + b"]" * 300 + b"}",
        "unknown_field",
        "x",
        key=None,
    ),
    BadCase(
        "nested 300 levels in an id",
        b'{"event_id": ' + b"[" * 300 + b"]" * 300 + b"}",
        "wrong_type",
        "event_id",
        key=None,
    ),
    BadCase("nested object as item", dumps(event(item_id={"id": "i1"})), "wrong_type", "item_id"),
    BadCase("nan literal", b'{"event_id":"e","price":NaN}', "not_finite", "price"),
    BadCase("infinity literal", b'{"event_id":"e","price":-Infinity}', "not_finite", "price"),
    BadCase("missing event_id", dumps(without("event_id")), "missing_field", "event_id"),
    BadCase("missing type", dumps(without("type")), "missing_field", "type"),
    BadCase("missing user_id", dumps(without("user_id")), "missing_field", "user_id"),
    BadCase("missing item_id", dumps(without("item_id")), "missing_field", "item_id"),
    BadCase("missing timestamp", dumps(without("timestamp")), "missing_field", "timestamp"),
    BadCase("numeric user_id", dumps(event(user_id=42)), "wrong_type", "user_id"),
    BadCase("numeric item_id", dumps(event(item_id=7)), "wrong_type", "item_id"),
    BadCase("null item_id", dumps(event(item_id=None)), "missing_field", "item_id"),
    BadCase("null user_id", dumps(event(user_id=None)), "missing_field", "user_id"),
    BadCase("null timestamp", dumps(event(timestamp=None)), "missing_field", "timestamp"),
    BadCase("list event_id", dumps(event(event_id=["e"])), "wrong_type", "event_id"),
    BadCase("boolean timestamp", dumps(event(timestamp=True)), "wrong_type", "timestamp"),
    BadCase(
        "fractional timestamp", dumps(event(timestamp=1.5e12 + 0.5)), "wrong_type", "timestamp"
    ),
    BadCase("string quantity", dumps(event(quantity="2")), "wrong_type", "quantity"),
    BadCase("string price", dumps(event(price="9.99")), "wrong_type", "price"),
    BadCase("numeric session_id", dumps(event(session_id=5)), "wrong_type", "session_id"),
    BadCase("unknown type", dumps(event(type="wishlist")), "unknown_type", "type"),
    BadCase("type in capitals", dumps(event(type="VIEW")), "unknown_type", "type"),
    BadCase("type not of topic", dumps(event(type="purchase")), "type_mismatch", "type", "view"),
    BadCase("empty user_id", dumps(event(user_id="")), "empty_id", "user_id"),
    BadCase("empty item_id", dumps(event(item_id="")), "empty_id", "item_id"),
    BadCase("empty event_id", dumps(event(event_id="")), "empty_id", "event_id"),
    BadCase(
        "10 kB user_id", dumps(event(user_id="u" * 10_000)), "id_too_long", "user_id", key=None
    ),
    BadCase("300-char item_id", dumps(event(item_id="i" * 300)), "id_too_long", "item_id"),
    BadCase(
        "huge price",
        b'{"event_id":"e","type":"view","user_id":"u1","item_id":"i1",'
        b'"timestamp":1760000000000,"price":1e400}',
        "not_finite",
        "price",
    ),
    BadCase(
        "400-digit price",
        dumps(event())[:-1] + b',"price":' + b"9" * 400 + b"}",
        "out_of_range",
        "price",
    ),
    BadCase(
        "401-digit timestamp",
        dumps(event(timestamp=0)).replace(b'"timestamp":0', b'"timestamp":1' + b"0" * 400),
        "timestamp_in_future",
        "timestamp",
    ),
    BadCase(
        "negative 401-digit timestamp",
        dumps(event(timestamp=0)).replace(b'"timestamp":0', b'"timestamp":-1' + b"0" * 400),
        "timestamp_too_old",
        "timestamp",
    ),
    BadCase("negative price", dumps(event(price=-1.5)), "negative_price", "price"),
    BadCase(
        "zero quantity",
        dumps(
            event(type="purchase", quantity=0),
        ),
        "invalid_quantity",
        "quantity",
        "purchase",
    ),
    BadCase("absurd quantity", dumps(event(quantity=10**9)), "invalid_quantity", "quantity"),
    BadCase("absurd refund", dumps(event(quantity=-(10**9))), "invalid_quantity", "quantity"),
    BadCase(
        "timestamp in seconds",
        dumps(event(timestamp=1_700_000_000)),
        "timestamp_too_old",
        "timestamp",
    ),
    BadCase(
        "timestamp 1999",
        dumps(event(timestamp="1999-12-31T23:59:59Z")),
        "timestamp_too_old",
        "timestamp",
    ),
    BadCase(
        "year 3001",
        dumps(event(timestamp="3001-01-01T00:00:00+00:00")),
        "timestamp_in_future",
        "timestamp",
    ),
    BadCase(
        "naive iso timestamp",
        dumps(event(timestamp="2024-05-01T10:00:00")),
        "invalid_timestamp",
        "timestamp",
    ),
    BadCase(
        "garbage timestamp", dumps(event(timestamp="yesterday")), "invalid_timestamp", "timestamp"
    ),
    BadCase("key of another user", dumps(event()), "key_mismatch", "user_id", key=b"u2"),
    BadCase("missing key", dumps(event()), "key_mismatch", "user_id", key=None),
    BadCase("unknown field", dumps(event(password="hunter2")), "unknown_field", "password"),
    BadCase(
        "oversized message",
        dumps(event(category="c" * 200, session_id="s" * 200)) + b" " * 20_000,
        "too_large",
        None,
    ),
]


def future_case(now_ms: int, skew_s: float = 300.0) -> BadCase:
    """An event stamped an hour past ``now_ms``, beyond the default skew of five minutes."""
    stamp = now_ms + int(max(3600.0, 10 * skew_s) * 1000)
    return BadCase(
        "an hour ahead", dumps(event(timestamp=stamp)), "timestamp_in_future", "timestamp"
    )


# Accepted: ids stay opaque, so each of these is its own user or item.
TRICKY_USER_IDS: list[str] = [
    "a:b",
    "a/b",
    "a b",
    " a",
    "recs:user:a",
    "caf\u00e9",  # NFC
    "cafe\u0301",  # NFD: the same text to a reader, another id to the shop
    "007",
    "7",
    "1e3",
    "-0",
    "\u7528\u6237",
    "\U0001f600",
    'quote"inside',
    "back\\slash",
]
