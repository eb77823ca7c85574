import math
import unicodedata
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    Event,
    RecommendationList,
    RecommendedItem,
    SchemaError,
    decode_event,
    decode_forget,
    decode_item_update,
    event_from_object,
    load_schema,
    validator,
)
from schemas.events import parse_timestamp
from schemas.files import SCHEMA_FILES

from corpus import BAD_CASES, TRICKY_USER_IDS, dumps, event, without


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda case: case.name)
def test_bad_event_rejected_with_reason(case):
    with pytest.raises(SchemaError) as caught:
        decode_event(case.value, topic_type=case.topic_type, key=case.key, check_key=True)
    assert caught.value.reason == case.reason
    assert caught.value.field == case.field
    assert caught.value.detail


def test_corpus_has_forty_cases():
    assert len(BAD_CASES) >= 40
    assert len({case.name for case in BAD_CASES}) == len(BAD_CASES)


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda case: case.name)
def test_bad_event_detail_names_field(case):
    with pytest.raises(SchemaError) as caught:
        decode_event(case.value, topic_type=case.topic_type, key=case.key, check_key=True)
    if case.field is not None and case.reason != "key_mismatch":
        assert case.field in caught.value.detail


def test_key_mismatch_detail_hides_key():
    raw = orjson.dumps(event(user_id="alice"))
    with pytest.raises(SchemaError) as caught:
        decode_event(raw, key=b"mallory", check_key=True)
    assert "mallory" not in caught.value.detail
    assert "alice" not in caught.value.detail


@pytest.mark.parametrize("user_id", TRICKY_USER_IDS)
def test_tricky_user_id_kept_opaque(user_id):
    raw = orjson.dumps(event(user_id=user_id))
    decoded = decode_event(raw, key=user_id.encode(), check_key=True)
    assert decoded.user_id == user_id


def test_nfc_and_nfd_ids_stay_distinct():
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    assert unicodedata.normalize("NFC", nfd) == nfc
    first = decode_event(orjson.dumps(event(user_id=nfc)))
    second = decode_event(orjson.dumps(event(user_id=nfd)))
    assert first.user_id != second.user_id


def test_refund_is_accepted():
    raw = orjson.dumps(event(type="purchase", quantity=-3, price=2.5))
    decoded = decode_event(raw, topic_type="purchase")
    assert decoded.is_refund
    assert decoded.quantity == -3


def test_free_item_is_accepted():
    decoded = decode_event(orjson.dumps(event(type="purchase", price=0)))
    assert decoded.price == 0.0


def test_iso_timestamp_with_offset():
    decoded = decode_event(orjson.dumps(event(timestamp="2017-11-26T09:00:00+08:00")))
    assert decoded.timestamp_ms == 1_511_658_000_000


@pytest.mark.parametrize(
    "text",
    [
        "2017-11-26T01:00:00Z",
        "2017-11-26T01:00:00z",
        "2017-11-26t01:00:00Z",
        "2017-11-26T01:00:00.000+00:00",
    ],
)
def test_iso_timestamp_spellings_agree(text):
    decoded = decode_event(orjson.dumps(event(timestamp=text)))
    assert decoded.timestamp_ms == 1_511_658_000_000


@given(st.integers(min_value=946_684_800_000, max_value=32_503_679_999_999))
def test_iso_timestamp_equals_integer_form(millis):
    seconds, fraction = divmod(millis, 1000)
    text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{fraction:03d}Z"
    assert parse_timestamp(text) == millis


def test_item_update_needs_a_change():
    with pytest.raises(SchemaError) as caught:
        decode_item_update(b'{"item_id": "i1", "timestamp": 1700000000000}')
    assert caught.value.reason == "missing_field"


def test_item_update_of_empty_category_rejected():
    obj = {"item_id": "i1", "timestamp": 1_700_000_000_000, "category": ""}
    assert not validator("item_update.schema.json").is_valid(obj)
    with pytest.raises(SchemaError, match="non-empty category") as caught:
        decode_item_update(orjson.dumps(obj))
    assert caught.value.reason == "missing_field"


def test_item_update_with_only_title():
    update = decode_item_update(
        b'{"item_id": "i1", "timestamp": 1700000000000, "title": "ALARM CLOCK PINK"}'
    )
    assert update.title == "ALARM CLOCK PINK"
    assert update.in_stock is None


def test_overlong_title_rejected_with_its_length():
    with pytest.raises(SchemaError) as caught:
        decode_event(orjson.dumps(event(title="x" * 513)))
    assert caught.value.reason == "text_too_long"
    assert caught.value.field == "title"
    assert "513 characters" in caught.value.detail


_HUGE_PRICE = dumps(event())[:-1] + b',"price":' + b"9" * 400 + b"}"
_SURROGATE_TITLE = dumps(event(title="caf"))[:-2] + b'\\udce9"}'


@pytest.mark.parametrize(
    ("raw", "reason", "field", "shown"),
    [
        (dumps(event(user_id=None)), "missing_field", "user_id", "is null"),
        (dumps(without("user_id")), "missing_field", "user_id", "is missing"),
        (dumps(event(price="9.99")), "wrong_type", "price", '"9.99"'),
        (dumps(event(session_id=12345)), "wrong_type", "session_id", "12345"),
        (dumps(event(quantity="2")), "wrong_type", "quantity", '"2"'),
        (dumps(event(timestamp={"at": 1})), "wrong_type", "timestamp", '{"at": 1}'),
        (dumps(event(item_id="i" * 300)), "id_too_long", "item_id", "(300 characters)"),
        (dumps(event(title="x" * 600)), "text_too_long", "title", "(600 characters)"),
        (_HUGE_PRICE, "out_of_range", "price", "9" * 64),
        (_HUGE_PRICE.replace(b"9" * 400, b"9" * 400 + b".5"), "not_finite", "price", "9" * 64),
        (
            dumps(event(timestamp=0)).replace(b'"timestamp":0', b'"timestamp":1' + b"0" * 400),
            "timestamp_in_future",
            "timestamp",
            "in the year 3000 or later",
        ),
        (b'{"event_id":"e","price":[1,NaN]}', "not_finite", "price", "contains NaN"),
        (_SURROGATE_TITLE, "lone_surrogate", "title", "\\udce9"),
        (b'{"e\\ud800":1}', "lone_surrogate", None, "\\ud800"),
    ],
)
def test_rejection_detail_shows_value(raw, reason, field, shown):
    with pytest.raises(SchemaError) as caught:
        decode_event(raw)
    assert caught.value.reason == reason
    assert caught.value.field == field
    assert shown in caught.value.detail


def test_lone_surrogate_not_called_utf8():
    with pytest.raises(SchemaError) as caught:
        decode_event(_SURROGATE_TITLE)
    assert "UTF-8" not in caught.value.detail


def test_invalid_utf8_detail_names_byte():
    with pytest.raises(SchemaError) as caught:
        decode_event(b'{"event_id": "\xff"}')
    assert caught.value.reason == "not_utf8"
    assert "0xff at offset 14" in caught.value.detail


@pytest.mark.parametrize(
    ("user_id", "reason"),
    [(["alice"], "wrong_type"), ("alice" * 60, "id_too_long"), ({"alice": 1}, "wrong_type")],
)
def test_rejection_detail_hides_user_id(user_id, reason):
    with pytest.raises(SchemaError) as caught:
        decode_event(dumps(event(user_id=user_id)))
    assert caught.value.reason == reason
    assert "alice" not in caught.value.detail


@pytest.mark.parametrize(
    ("price", "reason", "shown"),
    [
        (-(10**400), "negative_price", "-1000"),
        (10**400, "invalid_price", "1000"),
        (10**5000, "invalid_price", "more than 4300 digits"),
    ],
    ids=["negative", "positive", "over 4300 digits"],
)
def test_integer_price_beyond_float(price, reason, shown):
    obj = event(price=price)
    with pytest.raises(SchemaError) as caught:
        event_from_object(obj)
    assert caught.value.reason == reason
    assert shown in caught.value.detail


def test_item_update_stock_detail_shows_value():
    with pytest.raises(SchemaError) as caught:
        decode_item_update(b'{"item_id": "i1", "timestamp": 1700000000000, "in_stock": "false"}')
    assert caught.value.reason == "wrong_type"
    assert '"false"' in caught.value.detail


def test_item_update_rejects_string_stock():
    with pytest.raises(SchemaError) as caught:
        decode_item_update(b'{"item_id": "i1", "timestamp": 1700000000000, "in_stock": "no"}')
    assert caught.value.field == "in_stock"


def test_forget_rejects_empty_user():
    with pytest.raises(SchemaError) as caught:
        decode_forget(b'{"user_id": "", "timestamp": 1700000000000}')
    assert caught.value.reason == "empty_id"


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_schema_file_is_valid_json_schema(name):
    schema = load_schema(name)
    validator(name).check_schema(schema)


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda case: case.name)
def test_json_schema_rejects_bad_objects(case):
    if case.value is None:
        return
    try:
        obj = orjson.loads(case.value)
    except orjson.JSONDecodeError:
        return
    if case.reason in ("type_mismatch", "key_mismatch", "too_large"):
        return
    assert not validator("event.schema.json").is_valid(obj)


ids = st.text(min_size=1, max_size=40)
optional_text = st.none() | st.text(max_size=30)
# A sentinel for a field left out of the object, as opposed to a field set to null.
ABSENT = object()


def _set_optional(draw, obj, name, value):
    # An optional field without a value is left out or sent as null, which
    # the contract treats alike.
    if value is not None:
        obj[name] = value
    elif draw(st.booleans()):
        obj[name] = None


@st.composite
def valid_events(draw):
    obj = {
        "event_id": draw(ids),
        "type": draw(st.sampled_from(["view", "click", "purchase"])),
        "user_id": draw(ids),
        "item_id": draw(ids),
        "timestamp": draw(st.integers(946_684_800_000, 4_102_444_800_000)),
    }
    for name in ("session_id", "currency", "category", "title"):
        value = draw(optional_text)
        if value is not None and name == "currency":
            value = value[:16]
        _set_optional(draw, obj, name, value)
    quantity = draw(st.none() | st.integers(-1000, 1000).filter(lambda q: q != 0))
    _set_optional(draw, obj, "quantity", quantity)
    price = draw(st.none() | st.floats(0, 1e6, allow_nan=False))
    _set_optional(draw, obj, "price", price)
    return obj


@settings(max_examples=300, deadline=None)
@given(valid_events())
def test_round_trip_of_valid_events(obj):
    raw = orjson.dumps(obj)
    decoded = decode_event(raw)
    assert validator("event.schema.json").is_valid(obj)
    again = decode_event(orjson.dumps(decoded.to_json()))
    assert again == decoded


field_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**13), 10**13),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=300),
    st.lists(st.integers(-1000, 1000), max_size=2),
)


@settings(max_examples=400, deadline=None)
@given(
    valid_events(),
    st.sampled_from(sorted(load_schema("event.schema.json")["properties"])),
    st.just(ABSENT) | field_values,
)
def test_decoder_agrees_with_json_schema(obj, name, value):
    # A stray field value, null or a left-out field must be rejected by both
    # or accepted by both.
    obj = dict(obj)
    if value is ABSENT:
        obj.pop(name, None)
    else:
        obj[name] = value
    schema_ok = validator("event.schema.json").is_valid(obj)
    try:
        decode_event(orjson.dumps(obj))
        decoder_ok = True
    except SchemaError:
        decoder_ok = False
    assert decoder_ok == schema_ok, (name, value)


@st.composite
def item_updates(draw):
    obj = {
        "item_id": draw(ids),
        "timestamp": draw(st.integers(946_684_800_000, 4_102_444_800_000)),
    }
    _set_optional(draw, obj, "in_stock", draw(st.none() | st.booleans()))
    _set_optional(draw, obj, "price", draw(st.none() | st.floats(0, 1e6, allow_nan=False)))
    _set_optional(draw, obj, "category", draw(optional_text))
    _set_optional(draw, obj, "title", draw(optional_text))
    return obj


@settings(max_examples=400, deadline=None)
@given(
    item_updates(),
    st.sampled_from(sorted(load_schema("item_update.schema.json")["properties"])),
    st.just(ABSENT) | field_values,
)
def test_item_update_agrees_with_schema(obj, name, value):
    obj = dict(obj)
    if value is ABSENT:
        obj.pop(name, None)
    else:
        obj[name] = value
    schema_ok = validator("item_update.schema.json").is_valid(obj)
    try:
        decode_item_update(orjson.dumps(obj))
        decoder_ok = True
    except SchemaError:
        decoder_ok = False
    assert decoder_ok == schema_ok, (name, value)


@pytest.mark.parametrize(
    "name", ["session_id", "currency", "category", "title", "quantity", "price"]
)
def test_null_optional_field_is_absent(name):
    obj = event(**{name: None})
    assert validator("event.schema.json").is_valid(obj)
    assert getattr(decode_event(orjson.dumps(obj)), name) is None


@pytest.mark.parametrize("name", ["in_stock", "price", "category", "title"])
def test_null_item_update_field_is_absent(name):
    obj = {"item_id": "i1", "timestamp": 1_700_000_000_000, "title": "LAMP", name: None}
    if name == "title":
        obj["in_stock"] = True
    assert validator("item_update.schema.json").is_valid(obj)
    assert getattr(decode_item_update(orjson.dumps(obj)), name) is None


def test_item_update_of_only_nulls_rejected():
    obj = {"item_id": "i1", "timestamp": 1_700_000_000_000, "in_stock": None, "title": None}
    assert not validator("item_update.schema.json").is_valid(obj)
    with pytest.raises(SchemaError) as caught:
        decode_item_update(orjson.dumps(obj))
    assert caught.value.reason == "missing_field"


def test_recommendation_list_rejects_nan():
    recs = RecommendationList([RecommendedItem("i", math.nan, ("mf",))], 0, "v")
    with pytest.raises(ValueError, match="finite"):
        recs.to_json()


def test_recommendation_list_matches_schema():
    recs = RecommendationList([RecommendedItem("i", 1.5, ("mf", "popular"))], 1, "v1")
    assert validator("recommendations.schema.json").is_valid(orjson.loads(recs.to_json()))


def test_event_to_json_omits_absent_fields():
    assert "price" not in Event("e", "view", "u", "i", 1_700_000_000_000).to_json()


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"item_id": ["i5"], "score": 1.0, "sources": []}, "item_id"),
        ({"item_id": "i5", "score": "NaN", "sources": []}, "score"),
        ({"item_id": "i5", "score": True, "sources": []}, "score"),
        ({"item_id": "i5", "score": 1.0, "sources": "popular"}, "sources"),
        ({"item_id": "i5", "score": 1.0, "sources": [1]}, "sources"),
    ],
)
def test_stored_list_with_bad_entry_rejected(entry, reason):
    raw = orjson.dumps({"items": [entry], "computed_at": 1, "model_version": "v"})
    with pytest.raises((TypeError, ValueError)) as caught:
        RecommendationList.from_json(raw)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    "timestamp",
    ["2024-02-30T10:00:00Z", "2024-01-01T24:00:00Z", "2024-01-01T10:00:00+24:00"],
    ids=["february 30", "hour 24", "offset 24 h"],
)
def test_impossible_date_time_detail_says_expected(timestamp):
    # The text has the ISO 8601 shape but names no real moment, and the
    # detail names what to send instead.
    event = {"event_id": "e1", "type": "view", "user_id": "u1", "item_id": "i1"}
    raw = orjson.dumps(event | {"timestamp": timestamp})
    with pytest.raises(SchemaError) as caught:
        decode_event(raw)
    assert caught.value.reason == "invalid_timestamp"
    assert timestamp in caught.value.detail
    assert "expected" in caught.value.detail


def test_digit_string_timestamp_detail():
    # A producer that quotes epoch milliseconds sends a string of digits.
    event = {"event_id": "e1", "type": "view", "user_id": "u1", "item_id": "i1"}
    raw = orjson.dumps(event | {"timestamp": "1700000000000"})
    with pytest.raises(SchemaError) as caught:
        decode_event(raw)
    assert caught.value.reason == "invalid_timestamp"
    assert "string of digits" in caught.value.detail
    assert "epoch milliseconds as a JSON number" in caught.value.detail


def test_early_iso_timestamp_detail_fits_text():
    # An ISO date-time before 2000 is no epoch-seconds mix-up, so the hint
    # about seconds does not fit it.
    event = {"event_id": "e1", "type": "view", "user_id": "u1", "item_id": "i1"}
    raw = orjson.dumps(event | {"timestamp": "2000-01-01T00:30:00+01:00"})
    with pytest.raises(SchemaError) as caught:
        decode_event(raw)
    assert caught.value.reason == "timestamp_too_old"
    assert "expected a time from 2000-01-01T00:00:00Z on" in caught.value.detail
    assert "seconds" not in caught.value.detail


def test_huge_quantity_detail_shows_value_sent():
    event = {"event_id": "e1", "type": "purchase", "user_id": "u1", "item_id": "i1"}
    raw = orjson.dumps(event | {"timestamp": 1_700_000_000_000, "quantity": 1e30})
    with pytest.raises(SchemaError) as caught:
        decode_event(raw)
    assert caught.value.reason == "invalid_quantity"
    assert "quantity 1e+30 is beyond" in caught.value.detail


@pytest.mark.parametrize(
    "timestamp",
    [32_503_680_000_000, "3000-01-01T00:00:00Z", "2999-12-31T23:30:00-01:00"],
    ids=["millis", "iso", "iso with offset"],
)
def test_year_3000_timestamp_rejected(timestamp):
    raw = orjson.dumps(
        {"event_id": "e1", "type": "view", "user_id": "u1", "item_id": "i1", "timestamp": timestamp}
    )
    with pytest.raises(SchemaError) as caught:
        decode_event(raw)
    assert caught.value.reason == "timestamp_in_future"
    if isinstance(timestamp, str):
        assert "before 3000-01-01T00:00:00Z" in caught.value.detail
    errors = list(validator("event.schema.json").iter_errors(orjson.loads(raw)))
    if isinstance(timestamp, int):
        assert errors
