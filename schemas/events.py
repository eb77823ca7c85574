"""Decode and validate events, item updates and forget requests.

The JSON Schema files beside this module are the contract that producers in
any language validate against. The decoders here apply the same rules by hand,
because a generic validator costs tens of microseconds per message and the
worker decodes every event; a property test keeps both in agreement.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

EVENT_TYPES: Final = ("view", "click", "purchase")
MAX_ID_LENGTH: Final = 256
MAX_TEXT_LENGTH: Final = 256
MAX_TITLE_LENGTH: Final = 512
MAX_CURRENCY_LENGTH: Final = 16
MAX_TIMESTAMP_TEXT_LENGTH: Final = 64
MAX_QUANTITY: Final = 1_000_000
MAX_PRICE: Final = 1_000_000_000.0
MAX_MESSAGE_BYTES: Final = 16_384
# 2000-01-01T00:00:00Z: no shop event is older, and epoch seconds sent by
# mistake for milliseconds land before it and are caught.
MIN_TIMESTAMP_MS: Final = 946_684_800_000
# 3000-01-01T00:00:00Z, the schema's exclusive upper bound; the worker also
# rejects events more than a configured skew ahead of its clock.
MAX_TIMESTAMP_MS: Final = 32_503_680_000_000

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MILLISECOND: Final = timedelta(milliseconds=1)

# The same pattern as the timestamp string in event.schema.json.
_ISO_DATE_TIME: Final = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}([.][0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_ISO_NAIVE: Final = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}([Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}([.][0-9]{1,9})?)?)?$"
)

_EVENT_FIELDS: Final = frozenset(
    {
        "event_id",
        "type",
        "user_id",
        "item_id",
        "timestamp",
        "session_id",
        "currency",
        "category",
        "title",
        "quantity",
        "price",
    }
)
_ITEM_UPDATE_FIELDS: Final = frozenset(
    {"item_id", "timestamp", "in_stock", "price", "category", "title"}
)
_FORGET_FIELDS: Final = frozenset({"user_id", "timestamp"})
# Rejections are logged and kept in dead-letter records, where a user id may
# appear only as its pseudonym, so their details never quote these values.
_PERSONAL_FIELDS: Final = frozenset({"user_id"})
_ID_EXPECTED: Final = f"a string of 1 to {MAX_ID_LENGTH} characters"
_TIMESTAMP_EXPECTED: Final = "epoch milliseconds or an ISO 8601 date-time with a UTC offset"


class SchemaError(ValueError):
    """Base class of every rejection of an input message.

    Attributes
    ----------
    reason
        A stable snake_case code, used as the metric label and the
        dead-letter ``reason``.
    field
        The field to blame, or ``None`` when the message as a whole is wrong.
    detail
        What arrived and what was expected, for a human.

    """

    def __init__(self, reason: str, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.field = field
        self.detail = detail


@dataclass(slots=True)
class Event:
    """One validated storefront event.

    ``timestamp_ms`` is event time in epoch milliseconds, whatever form the
    message used.

    >>> e = decode_event(b'{"event_id": "e1", "type": "view", "user_id": "u1",'
    ...                  b' "item_id": "i1", "timestamp": 1700000000000}')
    >>> (e.user_id, e.item_id, e.timestamp_ms)
    ('u1', 'i1', 1700000000000)
    """

    event_id: str
    type: str
    user_id: str
    item_id: str
    timestamp_ms: int
    session_id: str | None = None
    quantity: int | None = None
    price: float | None = None
    currency: str | None = None
    category: str | None = None
    title: str | None = None

    def __post_init__(self) -> None:
        # Producers often send "" for a value they lack. An empty session id
        # would join all of a user's events, days apart, into one session.
        if self.session_id == "":
            self.session_id = None

    @property
    def is_refund(self) -> bool:
        """Whether this is a purchase with a negative quantity."""
        return self.type == "purchase" and self.quantity is not None and self.quantity < 0

    def to_json(self) -> dict[str, Any]:
        """Return the event in the wire contract, leaving out absent fields.

        >>> Event("e1", "view", "u1", "i1", 1700000000000).to_json()["timestamp"]
        1700000000000
        """
        out: dict[str, Any] = {
            "event_id": self.event_id,
            "type": self.type,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "timestamp": self.timestamp_ms,
        }
        for name in ("session_id", "quantity", "price", "currency", "category", "title"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(slots=True)
class ItemUpdate:
    """A change of stock, price, category or title. Fields left as ``None`` keep their value."""

    item_id: str
    timestamp_ms: int
    in_stock: bool | None = None
    price: float | None = None
    category: str | None = None
    title: str | None = None


@dataclass(slots=True)
class ForgetRequest:
    """A request to erase one user and drop their events stamped before it."""

    user_id: str
    timestamp_ms: int


def parse_object(raw: bytes | None, *, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Parse one message into a JSON object, or raise `SchemaError`.

    ``None`` is a message with a null value, such as a Kafka tombstone.

    >>> parse_object(b'[1, 2]')
    Traceback (most recent call last):
    ...
    schemas.events.SchemaError: expected a JSON object, got a JSON array
    """
    if raw is None:
        msg = "message value is null (a tombstone); expected a JSON object"
        raise SchemaError("null_value", msg)
    if len(raw) > max_bytes:
        msg = f"message is {len(raw)} bytes, over the limit of {max_bytes} bytes"
        raise SchemaError("too_large", msg)
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _parse_error(raw, exc) from exc
    if not isinstance(value, dict):
        msg = f"expected a JSON object, got a JSON {_json_kind(value)}"
        raise SchemaError("not_object", msg)
    return value


def _parse_error(raw: bytes, exc: orjson.JSONDecodeError) -> SchemaError:
    """Return the rejection of a message that orjson cannot parse."""
    text = str(exc)
    if "recursion" in text or "depth limit" in text:
        msg = f"JSON nested too deeply ({text}); expected a flat object of the event contract"
        return SchemaError("too_deep", msg)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        msg = (
            f"message is not valid UTF-8: byte 0x{raw[bad.start]:02x} at offset {bad.start}; "
            "expected JSON text in UTF-8"
        )
        return SchemaError("not_utf8", msg)
    field_error = _field_error_of_valid_json(raw)
    if field_error is not None:
        return field_error
    return SchemaError("not_json", f"message is not valid JSON: {text}")


@dataclass(frozen=True, slots=True)
class _NonFiniteNumber:
    """The text of a JSON number that is NaN, infinite or beyond the range of a double."""

    text: str

    def is_integer(self) -> bool:
        """Return whether the text is an integer literal, with no fraction or exponent."""
        return self.text.lstrip("-").isdigit()


def _timestamp_out_of_range(text: str) -> SchemaError:
    # An integer beyond the range of a double is far outside the accepted
    # years, on the side its sign gives.
    if text.startswith("-"):
        msg = (
            f"timestamp {_cut(text)} is before 2000-01-01; "
            "expected a later time in epoch milliseconds"
        )
        return SchemaError("timestamp_too_old", msg, "timestamp")
    msg = (
        f"timestamp {_cut(text)} is in the year 3000 or later; "
        "expected an earlier time in epoch milliseconds"
    )
    return SchemaError("timestamp_in_future", msg, "timestamp")


def _finite_or_marker(text: str, convert: Callable[[str], float | int]) -> object:
    if math.isfinite(float(text)):
        return convert(text)
    return _NonFiniteNumber(text)


def _field_error_of_valid_json(raw: bytes) -> SchemaError | None:
    r"""Return the rejection that names the field when orjson rejects otherwise valid JSON.

    orjson rejects NaN, Infinity, numbers beyond the range of a double and
    string escapes of lone surrogates such as \ud800, without naming the
    field. The standard parser accepts all of them, which finds the field.
    The object of the standard parser is never returned as valid.
    """
    try:
        obj = json.loads(
            raw,
            parse_constant=_NonFiniteNumber,
            parse_float=lambda text: _finite_or_marker(text, float),
            parse_int=lambda text: _finite_or_marker(text, int),
        )
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    for name, value in obj.items():
        surrogate = _lone_surrogate(name)
        if surrogate is not None:
            msg = (
                f"a field name contains the escape {surrogate}, a UTF-16 surrogate without "
                "its pair; expected only Unicode characters"
            )
            return SchemaError("lone_surrogate", msg)
        error = _scalar_error(name, value)
        if error is not None:
            return error
    return None


def _scalar_error(field: str, value: object) -> SchemaError | None:
    # A field's value may be an array or object, which the decoders reject
    # later, so the search walks into them. It uses a stack rather than
    # recursion, because the nesting may be as deep as the standard parser allows.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _NonFiniteNumber):
            if item is value and field == "timestamp" and item.is_integer():
                return _timestamp_out_of_range(item.text)
            where = "is" if item is value else "contains"
            if item.is_integer():
                msg = (
                    f"{_preview(field)} {where} {_cut(item.text)}, an integer beyond the range "
                    "of a double; expected a finite number"
                )
                return SchemaError("out_of_range", msg, field[:64])
            msg = (
                f"{_preview(field)} {where} {_cut(item.text)}, which is not a finite double; "
                "expected a finite number"
            )
            return SchemaError("not_finite", msg, field[:64])
        if isinstance(item, str):
            surrogate = _lone_surrogate(item)
            if surrogate is not None:
                msg = (
                    f"{_preview(field)} contains the escape {surrogate}, a UTF-16 surrogate "
                    "without its pair; expected only Unicode characters"
                )
                return SchemaError("lone_surrogate", msg, field[:64])
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _lone_surrogate(text: str) -> str | None:
    """Return the first surrogate code point of ``text`` as a JSON escape, or None."""
    for char in text:
        if 0xD800 <= ord(char) <= 0xDFFF:
            return f"\\u{ord(char):04x}"
    return None


def decode_event(
    raw: bytes | None,
    *,
    topic_type: str | None = None,
    key: bytes | None = None,
    check_key: bool = False,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> Event:
    """Decode one Kafka message into an `Event`, or raise `SchemaError`.

    Parameters
    ----------
    raw
        The message value.
    topic_type
        The event type that the source topic carries; an event of another
        type is rejected. ``None`` accepts any type.
    key
        The message key, compared with ``user_id`` when ``check_key`` is set.
    check_key
        Reject a message whose key is not the UTF-8 bytes of its user_id, so
        that every event of a user lands on the partition that owns the user.
    max_bytes
        Messages longer than this are rejected before parsing.

    >>> decode_event(b'{"event_id": "e1", "type": "view", "user_id": "u1",'
    ...              b' "item_id": "i1", "timestamp": 5}')  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    schemas.events.SchemaError: timestamp 5 is before 2000-01-01; expected a later time in ...

    """
    obj = parse_object(raw, max_bytes=max_bytes)
    event = event_from_object(obj)
    if topic_type is not None and event.type != topic_type:
        msg = f"event type {event.type!r} arrived on the topic for {topic_type!r} events"
        raise SchemaError("type_mismatch", msg, "type")
    if check_key:
        expected = event.user_id.encode()
        if key != expected:
            # The key is a user id, so the message does not repeat it.
            shown = "has no key" if key is None else "has a key that differs from user_id"
            msg = f"message {shown}; expected the UTF-8 bytes of user_id as the Kafka key"
            raise SchemaError("key_mismatch", msg, "user_id")
    return event


def event_from_object(obj: dict[str, Any]) -> Event:
    """Validate a parsed JSON object against the event contract.

    >>> event_from_object({"event_id": "e", "type": "buy", "user_id": "u",
    ...                    "item_id": "i", "timestamp": 1700000000000})
    Traceback (most recent call last):
    ...
    schemas.events.SchemaError: type "buy" is not one of view, click, purchase
    """
    _reject_unknown_fields(obj, _EVENT_FIELDS)
    event_id = _required_id(obj, "event_id")
    event_type = obj.get("type")
    if event_type is None:
        raise _missing(obj, "type", f"one of {', '.join(EVENT_TYPES)}")
    if event_type not in EVENT_TYPES:
        msg = f"type {_shown(event_type)} is not one of {', '.join(EVENT_TYPES)}"
        raise SchemaError("unknown_type", msg, "type")
    user_id = _required_id(obj, "user_id")
    item_id = _required_id(obj, "item_id")
    timestamp_ms = _timestamp(obj)

    quantity = obj.get("quantity")
    if quantity is not None:
        quantity = _quantity(quantity)
    price = obj.get("price")
    if price is not None:
        price = _price(price, "price")
    return Event(
        event_id=event_id,
        type=event_type,
        user_id=user_id,
        item_id=item_id,
        timestamp_ms=timestamp_ms,
        session_id=_optional_text(obj, "session_id", MAX_TEXT_LENGTH),
        quantity=quantity,
        price=price,
        currency=_optional_text(obj, "currency", MAX_CURRENCY_LENGTH),
        category=_optional_text(obj, "category", MAX_TEXT_LENGTH),
        title=_optional_text(obj, "title", MAX_TITLE_LENGTH),
    )


def decode_item_update(raw: bytes | None, *, max_bytes: int = MAX_MESSAGE_BYTES) -> ItemUpdate:
    """Decode one message of items.updates, or raise `SchemaError`.

    >>> update = decode_item_update(b'{"item_id": "i1", "timestamp": 1700000000000,'
    ...                             b' "in_stock": false}')
    >>> update.item_id, update.in_stock, update.price
    ('i1', False, None)
    """
    obj = parse_object(raw, max_bytes=max_bytes)
    _reject_unknown_fields(obj, _ITEM_UPDATE_FIELDS)
    item_id = _required_id(obj, "item_id")
    timestamp_ms = _timestamp(obj)
    in_stock = obj.get("in_stock")
    if in_stock is not None and not isinstance(in_stock, bool):
        msg = (
            f"in_stock {_shown(in_stock)} is a JSON {_json_kind(in_stock)}; expected true or false"
        )
        raise SchemaError("wrong_type", msg, "in_stock")
    price = obj.get("price")
    if price is not None:
        price = _price(price, "price")
    category = _optional_text(obj, "category", MAX_TEXT_LENGTH)
    title = _optional_text(obj, "title", MAX_TITLE_LENGTH)
    # The catalog keeps an item's category when it is given an empty one.
    if in_stock is None and price is None and not category and title is None:
        msg = (
            "item update changes nothing; expected at least one of in_stock, price, "
            "a non-empty category, title"
        )
        raise SchemaError("missing_field", msg, None)
    return ItemUpdate(item_id, timestamp_ms, in_stock, price, category, title)


def decode_forget(raw: bytes | None, *, max_bytes: int = MAX_MESSAGE_BYTES) -> ForgetRequest:
    """Decode one message of users.forget, or raise `SchemaError`.

    >>> decode_forget(b'{"user_id": "u1", "timestamp": "2024-01-01T00:00:00Z"}')
    ForgetRequest(user_id='u1', timestamp_ms=1704067200000)
    """
    obj = parse_object(raw, max_bytes=max_bytes)
    _reject_unknown_fields(obj, _FORGET_FIELDS)
    return ForgetRequest(_required_id(obj, "user_id"), _timestamp(obj))


def parse_timestamp(value: object, field: str = "timestamp") -> int:
    """Convert an ISO 8601 string with offset or epoch milliseconds to epoch milliseconds.

    >>> parse_timestamp("2017-11-26T09:00:00+08:00")
    1511658000000
    >>> parse_timestamp("2017-11-26T09:00:00")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    schemas.events.SchemaError: timestamp "2017-11-26T09:00:00" has no UTC offset; ...
    """
    if isinstance(value, bool):
        msg = f"{field} {_shown(value)} is a JSON boolean; expected {_TIMESTAMP_EXPECTED}"
        raise SchemaError("wrong_type", msg, field)
    if isinstance(value, int):
        millis = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise SchemaError("not_finite", f"{field} is {value}; expected a finite number", field)
        if not value.is_integer():
            msg = f"{field} {value!r} is not a whole number; expected epoch milliseconds"
            raise SchemaError("wrong_type", msg, field)
        millis = int(value)
    elif isinstance(value, str):
        millis = _iso_to_millis(value, field)
    else:
        msg = (
            f"{field} {_shown(value)} is a JSON {_json_kind(value)}; expected {_TIMESTAMP_EXPECTED}"
        )
        raise SchemaError("wrong_type", msg, field)
    if millis < MIN_TIMESTAMP_MS:
        if isinstance(value, str):
            expected = "a time from 2000-01-01T00:00:00Z on"
        else:
            # A number this small is most often epoch seconds.
            expected = "a later time in epoch milliseconds, not seconds"
        msg = f"{field} {_shown(value)} is before 2000-01-01; expected {expected}"
        raise SchemaError("timestamp_too_old", msg, field)
    if millis >= MAX_TIMESTAMP_MS:
        if isinstance(value, str):
            expected = "a time before 3000-01-01T00:00:00Z"
        else:
            expected = "an earlier time in epoch milliseconds"
        msg = f"{field} {_shown(value)} is in the year 3000 or later; expected {expected}"
        raise SchemaError("timestamp_in_future", msg, field)
    return millis


def _iso_to_millis(text: str, field: str) -> int:
    if len(text) > MAX_TIMESTAMP_TEXT_LENGTH:
        msg = f"{field} {_shown(text)} is too long; expected an ISO 8601 date-time"
        raise SchemaError("invalid_timestamp", msg, field)
    if _ISO_NAIVE.match(text):
        msg = (
            f"{field} {_shown(text)} has no UTC offset; "
            "expected ISO 8601 with an offset such as +00:00 or Z"
        )
        raise SchemaError("invalid_timestamp", msg, field)
    if text.isascii() and text.lstrip("-").isdigit():
        msg = (
            f"{field} {_shown(text)} is a string of digits; expected epoch milliseconds "
            "as a JSON number, or an ISO 8601 date-time such as 2024-05-01T10:00:00+02:00"
        )
        raise SchemaError("invalid_timestamp", msg, field)
    if not _ISO_DATE_TIME.match(text):
        msg = (
            f"{field} {_shown(text)} is not an ISO 8601 date-time; "
            "expected a form like 2024-05-01T10:00:00+02:00"
        )
        raise SchemaError("invalid_timestamp", msg, field)
    # Python 3.11 reads "Z" but not the lowercase "z" that RFC 3339 allows.
    if text.endswith("z"):
        text = text[:-1] + "Z"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        msg = (
            f"{field} {_shown(text)} is not a real date and time; expected a day that "
            "its month has, an hour from 00 to 23 and an offset under 24 hours, "
            "as in 2024-05-01T10:00:00+02:00"
        )
        raise SchemaError("invalid_timestamp", msg, field) from exc
    if moment.tzinfo is None or moment.utcoffset() is None:
        msg = (
            f"{field} {_shown(text)} has no UTC offset; "
            "expected ISO 8601 with an offset such as +00:00 or Z"
        )
        raise SchemaError("invalid_timestamp", msg, field)
    # Integer arithmetic, because a float of seconds times 1000 can land 1 ms
    # below the instant, so that the string and the integer form would differ.
    return (moment - _EPOCH) // _ONE_MILLISECOND


def _timestamp(obj: dict[str, Any]) -> int:
    # A null counts as a missing field, as it does for every other field.
    value = obj.get("timestamp")
    if value is None:
        raise _missing(obj, "timestamp", _TIMESTAMP_EXPECTED)
    return parse_timestamp(value)


def _missing(obj: dict[str, Any], field: str, expected: str) -> SchemaError:
    state = "null" if field in obj else "missing"
    return SchemaError(
        "missing_field", f"required field {field} is {state}; expected {expected}", field
    )


def _required_id(obj: dict[str, Any], field: str) -> str:
    value = obj.get(field)
    if value is None:
        raise _missing(obj, field, _ID_EXPECTED)
    if not isinstance(value, str):
        msg = f"{_named(field, value)} is a JSON {_json_kind(value)}; expected {_ID_EXPECTED}"
        raise SchemaError("wrong_type", msg, field)
    if not value:
        raise SchemaError("empty_id", f'{field} is empty (""); expected {_ID_EXPECTED}', field)
    if len(value) > MAX_ID_LENGTH:
        msg = f"{_named(field, value)} is too long; expected {_ID_EXPECTED}"
        raise SchemaError("id_too_long", msg, field)
    return value


def _optional_text(obj: dict[str, Any], field: str, max_length: int) -> str | None:
    value = obj.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        msg = f"{field} {_shown(value)} is a JSON {_json_kind(value)}; expected a string or null"
        raise SchemaError("wrong_type", msg, field)
    if len(value) > max_length:
        msg = f"{field} {_shown(value)} is too long; expected at most {max_length} characters"
        raise SchemaError("text_too_long", msg, field)
    return value


def _quantity(value: object) -> int:
    # JSON Schema counts 2.0 as an integer, so the decoder does too. A number
    # beyond the limit keeps the form it arrived in for the message, because
    # a large float converted to an integer shows digits that were not sent.
    if isinstance(value, float) and value.is_integer():
        if abs(value) > MAX_QUANTITY:
            msg = f"quantity {_shown(value)} is beyond the limit of ±{MAX_QUANTITY}"
            raise SchemaError("invalid_quantity", msg, "quantity")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and not math.isfinite(value):
            raise SchemaError("not_finite", f"quantity is {value}; expected an integer", "quantity")
        msg = f"quantity {_shown(value)} is a JSON {_json_kind(value)}; expected an integer"
        raise SchemaError("wrong_type", msg, "quantity")
    if value == 0:
        msg = "quantity is 0; expected a non-zero integer (negative for a refund)"
        raise SchemaError("invalid_quantity", msg, "quantity")
    if abs(value) > MAX_QUANTITY:
        msg = f"quantity {_shown(value)} is beyond the limit of ±{MAX_QUANTITY}"
        raise SchemaError("invalid_quantity", msg, "quantity")
    return value


def _price(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{field} {_shown(value)} is a JSON {_json_kind(value)}; expected a number"
        raise SchemaError("wrong_type", msg, field)
    if isinstance(value, float) and not math.isfinite(value):
        raise SchemaError("not_finite", f"{field} is {value}; expected a finite number", field)
    # The range is checked before the conversion to float, because an int
    # may be too large for a float.
    if value < 0:
        msg = f"{field} {_shown(value)} is negative; expected a number >= 0"
        raise SchemaError("negative_price", msg, field)
    if value > MAX_PRICE:
        msg = f"{field} {_shown(value)} is beyond the limit of {MAX_PRICE:.0f}"
        raise SchemaError("invalid_price", msg, field)
    return float(value)


def _reject_unknown_fields(obj: dict[str, Any], known: frozenset[str]) -> None:
    unknown = obj.keys() - known
    if unknown:
        names = ", ".join(sorted(_preview(name) for name in unknown)[:5])
        msg = f"unknown field(s) {names}; expected only {', '.join(sorted(known))}"
        raise SchemaError("unknown_field", msg, sorted(unknown)[0][:64])


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _preview(value: object, limit: int = 64) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _cut(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _shown(value: object, limit: int = 64) -> str:
    """Return ``value`` as JSON text for an error message, cut after ``limit`` characters.

    A string is cut before it is quoted, and the cut names its full length.
    """
    if isinstance(value, str) and len(value) > limit:
        return f"{_json_text(value[:limit])}… ({len(value)} characters)"
    return _cut(_json_text(value), limit)


def _json_text(value: object) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except ValueError:
        # Python 3.11 and later convert an integer of more than 4300 digits
        # to text only after sys.set_int_max_str_digits raises that limit.
        return "an integer of more than 4300 digits"
    except TypeError:
        return repr(value)
    # A lone surrogate cannot be written as UTF-8, which the dead-letter
    # record and the log need, so such text keeps its escapes.
    if _lone_surrogate(text) is not None:
        return json.dumps(value)
    return text


def _named(field: str, value: object) -> str:
    """Return the field name with its value for an error message, hiding personal values."""
    if field not in _PERSONAL_FIELDS:
        return f"{field} {_shown(value)}"
    if isinstance(value, str):
        return f"{field} ({len(value)} characters, not shown)"
    return f"{field} (not shown)"
