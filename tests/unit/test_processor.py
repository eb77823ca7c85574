"""The worker's processing logic on in-memory messages, without services."""

import math
import pickle
from datetime import UTC, datetime

import orjson
import pytest

from schemas import Event, validator
from stream.privacy import Pseudonymizer
from stream.processor import Message, Processor
from stream.settings import Settings

from corpus import BAD_CASES, TRICKY_USER_IDS, future_case

NOW_MS = 1_760_000_000_000
KEY = b"p" * 32


def _processor(**changes):
    settings = Settings(**changes)
    return Processor(settings, Pseudonymizer(KEY), clock=lambda: NOW_MS / 1000)


def _message(event: Event, offset: int, partition: int = 0) -> Message:
    return Message(
        f"events.{event.type}",
        partition,
        offset,
        event.user_id.encode(),
        orjson.dumps(event.to_json()),
    )


def _stream(events):
    return [_message(event, offset) for offset, event in enumerate(events)]


def _warm_events(users=30, start=NOW_MS - 3_600_000):
    events = []
    for n in range(users * 6):
        user = f"user-{n % users}"
        events.append(Event(f"w-{n}", "view", user, f"item-{n % 17}", start + n * 10))
    return events


def test_bad_messages_become_dead_letters():
    processor = _processor()
    cases = [*BAD_CASES, future_case(NOW_MS)]
    messages = [
        Message(f"events.{case.topic_type}", 0, offset, case.key, case.value)
        for offset, case in enumerate(cases)
    ]
    outcome = processor.process_events(messages)
    assert len(outcome.dead_letters) == len(cases)
    check = validator("deadletter.schema.json")
    for (_, raw), case in zip(outcome.dead_letters, cases, strict=True):
        record = orjson.loads(raw)
        assert check.is_valid(record), record
        assert record["reason"] == case.reason
        assert record["field"] == case.field


def test_dead_letter_hides_user_id():
    processor = _processor()
    raw = b'{"event_id": "e", "type": "view", "user_id": "alice", "item_id": "", "timestamp": 1}'
    outcome = processor.process_events([Message("events.view", 0, 0, b"alice", raw)])
    key, value = outcome.dead_letters[0]
    assert b"alice" not in value
    assert b"alice" not in key


def test_truncated_dead_letter_hides_user_id():
    processor = _processor()
    raw = b'{"event_id": "e", "type": "view", "user_id": "alice-in-a-cut-message'
    outcome = processor.process_events([Message("events.view", 0, 0, b"alice", raw)])
    assert b"alice" not in outcome.dead_letters[0][1]


_NESTED_300 = b'{"x": ' + b"[" * 300 + b"]" * 300 + b"}"


def test_nested_update_and_forget_become_dead_letters():
    processor = _processor()
    updates = processor.process_item_updates([Message("items.updates", 0, 0, None, _NESTED_300)])
    forgets = processor.process_forget([Message("users.forget", 0, 0, None, _NESTED_300)])
    assert len(updates.dead_letters) == 1
    assert len(forgets.dead_letters) == 1
    assert orjson.loads(forgets.dead_letters[0][1])["reason"] == "unknown_field"


def test_failed_redaction_keeps_letter_without_payload(monkeypatch):
    processor = _processor()

    def fail(*args):
        raise TypeError("stands in for a fault in the redaction")

    monkeypatch.setattr(processor, "_redacted_payload", fail)
    good = Event("e-good", "view", "alice", "i1", NOW_MS - 1000)
    messages = [Message("events.view", 0, 0, b"alice", b"not json"), _message(good, 1)]

    outcome = processor.process_events(messages)

    record = orjson.loads(outcome.dead_letters[0][1])
    assert record["payload"] == "<not kept: redacting it failed with TypeError>"
    assert validator("deadletter.schema.json").is_valid(record)
    assert outcome.applied == 1
    assert processor.metrics.errors.labels(kind="dead_letter_payload")._value.get() == 1


def test_valid_events_around_bad_ones_applied():
    processor = _processor()
    good = _warm_events(users=5)
    messages = []
    for offset, event in enumerate(good):
        messages.append(_message(event, 2 * offset))
        messages.append(Message("events.view", 0, 2 * offset + 1, b"x", b"garbage"))
    outcome = processor.process_events(messages)
    assert outcome.applied == len(good)
    assert len(outcome.dead_letters) == len(good)


def test_duplicate_event_applied_once():
    processor = _processor()
    event = Event("same", "view", "u", "i", NOW_MS - 1000)
    first = processor.process_events([_message(event, 0)])
    second = processor.process_events([_message(event, 1)])
    assert first.applied == 1
    assert second.applied == 0
    assert processor.counts["duplicate"] == 1


def test_replayed_offsets_are_skipped():
    processor = _processor()
    events = _warm_events(users=3)
    processor.process_events(_stream(events))
    again = processor.process_events(_stream(events))
    assert again.applied == 0
    assert processor.counts["duplicate"] == 0


def test_refund_is_applied():
    processor = _processor()
    buy = Event("b", "purchase", "u", "kettle", NOW_MS - 2000, quantity=2, price=10.0)
    refund = Event("r", "purchase", "u", "kettle", NOW_MS - 1000, quantity=-2, price=10.0)
    outcome = processor.process_events(_stream([buy, refund]))
    assert outcome.applied == 2
    assert not outcome.dead_letters


def test_late_event_is_applied():
    processor = _processor()
    processor.process_events(_stream([Event("new", "view", "u", "i1", NOW_MS - 1000)]))
    late = Event("late", "view", "u", "i2", NOW_MS - 30 * 86_400_000)
    outcome = processor.process_events([_message(late, 1)])
    assert outcome.applied == 1


@pytest.mark.parametrize("user", TRICKY_USER_IDS)
def test_tricky_ids_get_own_keys(user):
    processor = _processor()
    event = Event(f"e-{user}", "view", user, "i", NOW_MS - 1000)
    outcome = processor.process_events([_message(event, 0)])
    refreshed = processor.refresh(outcome.dirty)
    assert refreshed[0].key == f"recs:user:{user}"


def test_tricky_ids_stay_distinct():
    processor = _processor()
    events = [
        Event(f"e{n}", "view", user, f"i{n}", NOW_MS - 1000 + n)
        for n, user in enumerate(TRICKY_USER_IDS)
    ]
    outcome = processor.process_events(_stream(events))
    keys = {entry.key for entry in processor.refresh(outcome.dirty)}
    assert len(keys) == len(TRICKY_USER_IDS)


def test_lists_are_finite_and_bounded():
    processor = _processor(k=10)
    events = _warm_events()
    events.append(Event("free", "purchase", "user-1", "item-1", NOW_MS - 10, quantity=1, price=0))
    outcome = processor.process_events(_stream(events))
    check = validator("recommendations.schema.json")
    for entry in processor.refresh(outcome.dirty):
        value = orjson.loads(entry.payload)
        assert check.is_valid(value)
        assert len(value["items"]) <= 10
        assert all(math.isfinite(item["score"]) for item in value["items"])


def test_purchased_item_left_out():
    processor = _processor()
    events = _warm_events()
    events.append(Event("buy", "purchase", "user-2", "item-3", NOW_MS - 5, quantity=1))
    outcome = processor.process_events(_stream(events))
    lists = {entry.key: orjson.loads(entry.payload) for entry in processor.refresh(outcome.dirty)}
    items = [item["item_id"] for item in lists["recs:user:user-2"]["items"]]
    assert "item-3" not in items


def test_flooding_user_is_rate_limited():
    processor = _processor()
    warm = _warm_events(users=400)
    processor.process_events(_stream(warm))
    before = orjson.loads(processor.popular_list())["items"]

    flood = [
        Event(f"flood-{n}", "purchase", "bot", "spam-item", NOW_MS - 5000 + n // 10, quantity=1)
        for n in range(5000)
    ]
    outcome = processor.process_events(
        [_message(event, len(warm) + n) for n, event in enumerate(flood)]
    )
    after = orjson.loads(processor.popular_list())["items"]
    limited = processor.counts["rate_limited"] + processor.counts["item_repeat_limited"]
    assert outcome.applied <= processor.settings.item_repeat_burst
    assert limited == 5000 - outcome.applied
    assert [e["item_id"] for e in after][:5] == [e["item_id"] for e in before][:5]
    assert "spam-item" not in [e["item_id"] for e in after][:5]


@pytest.mark.parametrize("refund", [False, True], ids=["purchase", "purchase and refund"])
def test_flood_limited_purchase_still_leaves_list(refund):
    # The user views one item past the repeat limit and then buys it. The
    # purchase is beyond the limit too and is not learned, but the item must
    # leave the buyer's list, and a refund beyond the limit brings it back.
    processor = _processor()
    events = _warm_events()
    burst = int(processor.settings.item_repeat_burst)
    start = NOW_MS - 60_000
    events += [Event(f"v-{n}", "view", "buyer", "item-3", start + n) for n in range(burst + 5)]
    events.append(Event("buy", "purchase", "buyer", "item-3", start + 1000, quantity=1))
    if refund:
        events.append(Event("back", "purchase", "buyer", "item-3", start + 2000, quantity=-1))
    outcome = processor.process_events(_stream(events))
    lists = {entry.key: orjson.loads(entry.payload) for entry in processor.refresh(outcome.dirty)}
    items = [item["item_id"] for item in lists["recs:user:buyer"]["items"]]
    assert processor.counts["item_repeat_limited"] == 5 + (2 if refund else 1)
    assert processor.counts["applied:purchase"] == 0
    assert ("item-3" in items) is refund


def test_forgotten_user_is_erased_and_dropped():
    processor = _processor()
    events = _warm_events()
    processor.process_events(_stream(events))
    pseudonym = processor.pseudonymize("user-4")
    assert processor.engine.has_user(pseudonym)

    processor.forget("user-4", NOW_MS)
    assert not processor.engine.has_user(pseudonym)
    assert pseudonym not in processor.dedup.owners()
    late = Event("late-4", "view", "user-4", "item-1", NOW_MS - 10)
    outcome = processor.process_events([_message(late, 10_000)])
    assert outcome.applied == 0
    assert processor.counts["forgotten_user"] == 1


def test_forget_survives_older_state():
    processor = _processor()
    processor.process_events(_stream(_warm_events()))
    old_state = processor.state()
    pseudonym = processor.pseudonymize("user-5")
    import pickle

    snapshot = pickle.loads(pickle.dumps(old_state))
    processor.forget("user-5", NOW_MS)
    registry = dict(processor.forgotten)

    restored = _processor()
    restored.load_state(snapshot)
    assert restored.engine.has_user(pseudonym)
    restored.merge_forgotten(registry)
    assert not restored.engine.has_user(pseudonym)


def test_user_back_after_forget_survives_restart():
    import pickle

    processor = _processor()
    processor.process_events(_stream(_warm_events()))
    processor.forget("user-6", NOW_MS - 60_000)
    back = Event("back-6", "view", "user-6", "item-2", NOW_MS - 1_000)
    assert processor.process_events([_message(back, 10_000)]).applied == 1
    pseudonym = processor.pseudonymize("user-6")
    snapshot = pickle.loads(pickle.dumps(processor.state()))

    restored = _processor()
    restored.load_state(snapshot)
    restored.merge_forgotten(dict(processor.forgotten))

    assert restored.engine.user_history(pseudonym) == ["item-2"]


def test_restored_state_takes_current_settings():
    import pickle

    processor = _processor()
    processor.process_events(_stream(_warm_events()))
    snapshot = pickle.loads(pickle.dumps(processor.state()))
    only_popular = ",".join(
        f"{name}={1 if name == 'popular' else 0}"
        for name in ("popular", "trending", "category", "covisit", "basket")
        + ("recent", "mf", "context", "title")
    )

    restored = _processor(
        k=5,
        fusion="weighted",
        weights=only_popular,
        max_per_category=2,
        dedup_window_s=30 * 3600.0,
        user_rate_burst=10.0,
    )
    restored.load_state(snapshot)

    assert restored.engine.config.k == 5
    assert restored.engine.config.max_per_category == 2
    assert restored.engine.model_version.endswith("/weighted")
    assert restored.dedup.window_ms == 30 * 3600 * 1000
    pseudonym = restored.pseudonymize("user-1")
    lists = restored.refresh({pseudonym: "user-1"})
    sources = {source for item in lists[0].items for source in item.sources}
    assert sources == {"popular"}
    flood = [Event(f"burst-{n}", "view", "user-1", f"item-{n}", NOW_MS - 1_000) for n in range(20)]
    outcome = restored.process_events([_message(e, 10_000 + n) for n, e in enumerate(flood)])
    assert outcome.applied <= 10


def test_forget_consumed_after_later_events_keeps_them():
    processor = _processor()
    forgotten_at = NOW_MS - 60_000
    later = [
        Event(f"later-{n}", "view", "user-9", f"item-{n}", forgotten_at + 10_000 * n)
        for n in range(1, 4)
    ]
    processor.process_events(_stream(later))
    request = orjson.dumps({"user_id": "user-9", "timestamp": forgotten_at})

    outcome = processor.process_forget([Message("users.forget", 0, 0, b"user-9", request)])

    pseudonym = processor.pseudonymize("user-9")
    assert outcome.applied == 1
    assert processor.engine.user_history(pseudonym) == ["item-1", "item-2", "item-3"]
    assert processor.forget_token(pseudonym) in processor.forgotten


def test_forget_consumed_after_earlier_events_erases_them():
    processor = _processor()
    forgotten_at = NOW_MS - 60_000
    before = Event("before-10", "view", "user-10", "item-1", forgotten_at - 10_000)
    processor.process_events([_message(before, 0)])
    request = orjson.dumps({"user_id": "user-10", "timestamp": forgotten_at})

    processor.process_forget([Message("users.forget", 0, 0, b"user-10", request)])

    assert not processor.engine.has_user(processor.pseudonymize("user-10"))


def test_forget_with_other_key_still_erases():
    processor = _processor()
    forgotten_at = NOW_MS - 60_000
    before = Event("before-11", "view", "user-11", "item-1", forgotten_at - 10_000)
    processor.process_events([_message(before, 0)])
    request = orjson.dumps({"user_id": "user-11", "timestamp": forgotten_at})

    outcome = processor.process_forget([Message("users.forget", 0, 0, b"other", request)])

    assert outcome.applied == 1
    assert not outcome.dead_letters
    assert not processor.engine.has_user(processor.pseudonymize("user-11"))


def test_forget_batch_erases_every_user():
    processor = _processor()
    processor.process_events(_stream(_warm_events()))
    users = ["user-1", "user-2", "user-3"]
    requests = [
        Message(
            "users.forget",
            0,
            n,
            user.encode(),
            orjson.dumps({"user_id": user, "timestamp": NOW_MS}),
        )
        for n, user in enumerate(users)
    ]
    pseudonyms = [processor.pseudonymize(user) for user in users]
    assert all(processor.engine.has_user(pseudonym) for pseudonym in pseudonyms)

    outcome = processor.process_forget(requests)

    assert outcome.applied == 3
    for pseudonym in pseudonyms:
        assert not processor.engine.has_user(pseudonym)
        assert pseudonym not in processor.dedup.owners()
        assert pseudonym not in processor.repeats.users()
    assert processor.engine.has_user(processor.pseudonymize("user-4"))


def test_late_event_before_forget_erases_user():
    processor = _processor()
    forgotten_at = NOW_MS - 60_000
    after = Event("after-7", "view", "user-7", "item-1", forgotten_at + 10_000)
    late = Event("late-7", "view", "user-7", "item-2", forgotten_at - 50_000)
    # Both reach the state before the request, the late one in a later batch.
    processor.process_events([_message(after, 0)])
    processor.process_events([_message(late, 1)])
    pseudonym = processor.pseudonymize("user-7")
    token = processor.forget_token(pseudonym)

    processor.merge_forgotten({token: forgotten_at})

    assert not processor.engine.has_user(pseudonym)


def test_state_of_older_version_erases_forgotten_user():
    processor = _processor()
    forgotten_at = NOW_MS - 60_000
    before = Event("before-8", "view", "user-8", "item-1", forgotten_at - 10_000)
    after = Event("after-8", "view", "user-8", "item-2", forgotten_at + 10_000)
    processor.process_events([_message(before, 0), _message(after, 1)])
    pseudonym = processor.pseudonymize("user-8")
    # A state saved before the earliest event time was kept has no first_ms.
    engine_state = processor.engine.__getstate__()
    delattr(engine_state["_users"][pseudonym], "first_ms")
    processor.engine.__setstate__(engine_state)

    processor.merge_forgotten({processor.forget_token(pseudonym): forgotten_at})

    assert not processor.engine.has_user(pseudonym)


def test_state_holds_no_raw_user_id():
    import pickle

    processor = _processor()
    processor.process_events(_stream(_warm_events()))
    data = pickle.dumps(processor.state())
    assert b"user-1" not in data


def test_future_event_rejected_with_skew():
    processor = _processor(max_future_skew_s=60)
    soon = Event("soon", "view", "u", "i", NOW_MS + 30_000)
    later = Event("later", "view", "u", "i", NOW_MS + 120_000)
    outcome = processor.process_events(_stream([soon, later]))
    assert outcome.applied == 1
    assert orjson.loads(outcome.dead_letters[0][1])["reason"] == "timestamp_in_future"


def test_future_event_detail_shows_timestamp():
    processor = _processor(max_future_skew_s=60)
    later = Event("later", "view", "u", "i", NOW_MS + 120_000)
    outcome = processor.process_events(_stream([later]))
    detail = orjson.loads(outcome.dead_letters[0][1])["detail"]
    assert str(NOW_MS + 120_000) in detail
    assert "at most 60 s ahead" in detail


def test_sold_out_item_is_reported():
    processor = _processor()
    processor.process_events(_stream(_warm_events()))
    update = b'{"item_id": "item-2", "timestamp": 1760000000000, "in_stock": false}'
    outcome = processor.process_item_updates([Message("items.updates", 0, 0, b"item-2", update)])
    assert outcome.unavailable == [processor.engine.catalog.index["item-2"]]


def test_stale_stock_update_is_counted_not_applied():
    processor = _processor()
    processor.process_events(_stream(_warm_events()))
    newer = b'{"item_id": "item-2", "timestamp": 1760000000000, "in_stock": true}'
    older = b'{"item_id": "item-2", "timestamp": 1759990000000, "in_stock": false}'
    messages = [
        Message("items.updates", 0, 0, b"item-2", newer),
        Message("items.updates", 0, 1, b"item-2", older),
    ]

    outcome = processor.process_item_updates(messages)

    row = processor.engine.catalog.index["item-2"]
    assert outcome.unavailable == []
    assert bool(processor.engine.catalog.in_stock[row]) is True
    stale = processor.metrics.item_update_fields_stale.labels(field="in_stock")
    assert stale._value.get() == 1
    assert outcome.applied == 2


def test_item_update_with_wrong_key_rejected():
    processor = _processor()
    update = b'{"item_id": "item-2", "timestamp": 1760000000000, "in_stock": false}'
    outcome = processor.process_item_updates([Message("items.updates", 0, 0, b"other", update)])
    record = orjson.loads(outcome.dead_letters[0][1])
    assert record["reason"] == "key_mismatch"
    assert 'key "other"' in record["detail"]
    assert 'item_id "item-2"' in record["detail"]


def test_item_key_mismatch_detail_cuts_long_key():
    processor = _processor()
    update = b'{"item_id": "item-2", "timestamp": 1760000000000, "in_stock": false}'
    message = Message("items.updates", 0, 0, b"k" * 5000, update)
    outcome = processor.process_item_updates([message])
    detail = orjson.loads(outcome.dead_letters[0][1])["detail"]
    assert "(5000 characters)" in detail
    assert len(detail) < 300


def test_null_value_event_rejected_batch_kept():
    processor = _processor()
    first = Event("n-1", "view", "u2", "x1", NOW_MS - 2000)
    last = Event("n-2", "view", "u2", "x2", NOW_MS - 1000)
    messages = [_message(first, 0), Message("events.view", 0, 1, b"u2", None), _message(last, 2)]
    outcome = processor.process_events(messages)
    assert outcome.applied == 2
    record = orjson.loads(outcome.dead_letters[0][1])
    assert record["reason"] == "null_value"
    assert validator("deadletter.schema.json").is_valid(record)


def test_null_value_item_update_rejected_batch_kept():
    processor = _processor()
    processor.process_events(_stream(_warm_events()))
    update = b'{"item_id": "item-2", "timestamp": 1760000000000, "in_stock": false}'
    messages = [
        Message("items.updates", 0, 0, b"item-2", None),
        Message("items.updates", 0, 1, b"item-2", update),
    ]
    outcome = processor.process_item_updates(messages)
    assert outcome.unavailable == [processor.engine.catalog.index["item-2"]]
    assert orjson.loads(outcome.dead_letters[0][1])["reason"] == "null_value"


def test_null_value_forget_rejected_batch_kept():
    processor = _processor()
    processor.process_events(_stream(_warm_events()))
    request = orjson.dumps({"user_id": "user-3", "timestamp": NOW_MS})
    messages = [
        Message("users.forget", 0, 0, b"user-3", None),
        Message("users.forget", 0, 1, b"user-3", request),
    ]
    outcome = processor.process_forget(messages)
    assert outcome.applied == 1
    assert not processor.engine.has_user(processor.pseudonymize("user-3"))
    assert orjson.loads(outcome.dead_letters[0][1])["reason"] == "null_value"


def test_decoder_bug_becomes_dead_letter(monkeypatch):
    import stream.processor

    real = stream.processor.decode_event

    def flaky(raw, **kwargs):
        if b"boom" in raw:
            raise RuntimeError("decoder bug")
        return real(raw, **kwargs)

    monkeypatch.setattr(stream.processor, "decode_event", flaky)
    processor = _processor()
    bad = Event("e-boom", "view", "u", "boom", NOW_MS - 2000)
    good = Event("e-ok", "view", "u", "fine", NOW_MS - 1000)
    outcome = processor.process_events(_stream([bad, good]))
    assert outcome.applied == 1
    record = orjson.loads(outcome.dead_letters[0][1])
    assert record["reason"] == "decode_failed"
    assert "RuntimeError" in record["detail"]
    assert "decoder bug" not in record["detail"]


def test_budget_of_other_shape_does_not_stop_batch():
    processor = _processor()
    bob = processor.pseudonymize("bob")
    # A budget as other code saved it: (level, newest event time).
    processor.limiter._state[bob] = (3.0, NOW_MS - 5000)
    events = [
        Event("b1", "view", "bob", "i1", NOW_MS - 2000),
        Event("c1", "view", "carol", "i1", NOW_MS - 1000),
    ]
    outcome = processor.process_events(_stream(events))
    assert outcome.applied == 2
    assert outcome.dead_letters == []


def test_admission_bug_becomes_dead_letter(monkeypatch):
    processor = _processor()

    def broken(user, timestamp_ms):
        if user == processor.pseudonymize("bob"):
            raise IndexError("budget bug")
        return True

    monkeypatch.setattr(processor.limiter, "allow", broken)
    events = [
        Event("b1", "view", "bob", "i1", NOW_MS - 2000),
        Event("c1", "view", "carol", "i1", NOW_MS - 1000),
    ]
    outcome = processor.process_events(_stream(events))
    assert outcome.applied == 1
    record = orjson.loads(outcome.dead_letters[0][1])
    assert record["reason"] == "admit_failed"
    assert "IndexError" in record["detail"]
    assert "budget bug" not in record["detail"]


def test_future_forget_rejected_with_skew():
    processor = _processor(max_future_skew_s=60)
    processor.process_events(_stream(_warm_events()))
    ahead = orjson.dumps({"user_id": "user-3", "timestamp": NOW_MS + 3_600_000})
    outcome = processor.process_forget([Message("users.forget", 0, 0, b"user-3", ahead)])
    assert outcome.applied == 0
    assert not processor.forgotten
    assert processor.engine.has_user(processor.pseudonymize("user-3"))
    assert orjson.loads(outcome.dead_letters[0][1])["reason"] == "timestamp_in_future"


def test_idle_rate_budgets_are_dropped(monkeypatch):
    import stream.processor

    monkeypatch.setattr(stream.processor, "_SWEEP_EVERY_EVENTS", 10)
    processor = _processor()
    early = [Event(f"a-{n}", "view", f"early-{n}", "i", NOW_MS - 3_600_000) for n in range(5)]
    late = [Event(f"b-{n}", "view", f"late-{n}", "i", NOW_MS - 1000 + n) for n in range(5)]
    processor.process_events(_stream([*early, *late]))
    budgets = processor.limiter.users()
    assert len(budgets) == 5
    for n in range(5):
        assert processor.pseudonymize(f"late-{n}") in budgets


@pytest.mark.parametrize(
    "raw",
    [
        b"{'event_id': 'L1', 'type': 'view', 'user_id': 'alice@example.com', 'timestamp': 1}",
        b'{"user\\u005fid": "alice@example.com", "type": "view",}',
        b'{"customer": "alice@example.com", "type": "view"',
    ],
    ids=["single quotes", "escaped name", "other field"],
)
def test_unparsed_dead_letter_hides_user_id(raw):
    processor = _processor()
    outcome = processor.process_events([Message("events.view", 0, 0, b"alice@example.com", raw)])
    key, value = outcome.dead_letters[0]
    assert b"alice" not in value
    assert processor.pseudonymize("alice@example.com").encode() in value
    assert b"alice" not in key


@pytest.mark.parametrize(
    "raw",
    [
        b'{"event_id": "e1", "type": "view", "userId": "alice@example.com", "item_id": "i1"}',
        b'{"event_id": "e2", "type": "view", "user": {"ids": ["alice@example.com"]}}',
        b'{"alice@example.com": {"event_id": "e3", "item_id": "i1"}}',
    ],
    ids=["other field name", "nested value", "id as field name"],
)
def test_parsed_dead_letter_hides_keyed_user_id(raw, caplog):
    processor = _processor()
    with caplog.at_level("WARNING"):
        outcome = processor.process_events(
            [Message("events.view", 0, 0, b"alice@example.com", raw)]
        )
    value = outcome.dead_letters[0][1]
    assert b"alice" not in value
    assert processor.pseudonymize("alice@example.com").encode() in value
    assert "alice" not in caplog.text


@pytest.mark.parametrize(
    "raw",
    [b'{"event_id": "e1", "type": "view", "userId": 1001234}', b'{"customer": {"id": 1001234}}'],
    ids=["number field", "nested number"],
)
def test_dead_letter_hides_numeric_user_id(raw):
    processor = _processor()
    outcome = processor.process_events([Message("events.view", 0, 0, b"1001234", raw)])
    value = outcome.dead_letters[0][1]
    assert b"1001234" not in value
    assert processor.pseudonymize("1001234").encode() in value


def test_deeply_nested_dead_letter_hides_user_id():
    processor = _processor()
    raw = b'{"a": ' + b"[" * 1000 + b'"alice@example.com"' + b"]" * 1000 + b"}"
    outcome = processor.process_events([Message("events.view", 0, 0, b"alice@example.com", raw)])
    assert b"alice" not in outcome.dead_letters[0][1]


def test_short_key_not_replaced_in_text():
    processor = _processor()
    raw = b"7 not json 7"
    outcome = processor.process_events([Message("events.view", 0, 0, b"7", raw)])
    assert orjson.loads(outcome.dead_letters[0][1])["payload"] == "7 not json 7"


@pytest.mark.parametrize(
    "raw",
    [
        b"{user_id: 'alice@example.com', item_id: 'i1'}",
        b"{user_id: alice@example.com, item_id: i1}",
        b'{"\\u0075ser_id": "alice@example.com"',
        b"{'user_id': 'alice@example.com', 'type': 'view'",
    ],
    ids=["unquoted name", "unquoted value", "first letter escaped", "single quotes"],
)
def test_keyless_dead_letter_hides_user_id(raw):
    processor = _processor()
    outcome = processor.process_events([Message("events.view", 0, 0, None, raw)])
    value = outcome.dead_letters[0][1]
    assert b"alice" not in value
    assert processor.pseudonymize("alice@example.com").encode() in value


@pytest.mark.parametrize("key", [None, b"bob@example.com"], ids=["no key", "other key"])
@pytest.mark.parametrize(
    "extra",
    [
        {"session_id": "alice@example.com-s1", "price": -1},
        {"title": "for alice@example.com", "price": "x"},
        {"unknown_alice@example.com": 1},
    ],
    ids=["session id", "title", "field name"],
)
def test_dead_letter_hides_user_id_without_its_key(key, extra, caplog):
    processor = _processor()
    obj = {"event_id": "e1", "type": "view", "user_id": "alice@example.com", "item_id": "i1"}
    obj |= {"timestamp": NOW_MS, **extra}
    with caplog.at_level("WARNING"):
        outcome = processor.process_events([Message("events.view", 0, 0, key, orjson.dumps(obj))])
    value = outcome.dead_letters[0][1]
    assert b"alice" not in value
    assert processor.pseudonymize("alice@example.com").encode() in value
    assert "alice" not in caplog.text


@pytest.mark.parametrize(
    "raw",
    [
        b'{"event_id": "e1", "type": "click", "user_id": "view", "item_id": "i1", '
        b'"timestamp": 1, "session_id": "view-s1", "title": "a review", "price": "x"}',
        b"not json: a review from view, session view-s1",
    ],
    ids=["parsed", "unparsed"],
)
def test_short_user_id_spares_longer_words(raw):
    processor = _processor()
    outcome = processor.process_events([Message("events.click", 0, 0, b"view", raw)])
    payload = orjson.dumps(orjson.loads(outcome.dead_letters[0][1])["payload"]).decode()
    pseudonym = processor.pseudonymize("view")
    assert "review" in payload
    assert f"{pseudonym}-s1" in payload
    assert payload.replace("review", "").count("view") == 0


def test_unparsed_keyless_dead_letter_hides_repeated_user_id():
    processor = _processor()
    raw = b'{"user_id": "alice@example.com", "session_id": "alice@example.com-s1",'
    outcome = processor.process_events([Message("events.view", 0, 0, None, raw)])
    value = outcome.dead_letters[0][1]
    assert b"alice" not in value
    assert processor.pseudonymize("alice@example.com").encode() in value


@pytest.mark.parametrize("key", [None, b"alice@example.com"], ids=["no key", "user id key"])
def test_dead_letter_hides_user_id_cut_short(key, caplog):
    # The message quotes only the first 64 characters of a long value, so
    # the cut falls inside the user id.
    processor = _processor()
    session = "x" * 58 + "alice@example.com" * 20
    obj = {"event_id": "e1", "type": "view", "user_id": "alice@example.com", "item_id": "i1"}
    obj |= {"timestamp": NOW_MS, "session_id": session}
    with caplog.at_level("WARNING"):
        outcome = processor.process_events([Message("events.view", 0, 0, key, orjson.dumps(obj))])
    record = orjson.loads(outcome.dead_letters[0][1])
    assert record["reason"] == "text_too_long"
    assert "alice" not in record["detail"]
    assert "alice" not in caplog.text
    assert b"alice" not in outcome.dead_letters[0][1]


def test_misrouted_event_on_items_topic_hides_user_id():
    processor = _processor()
    obj = {"event_id": "e1", "type": "view", "user_id": "alice@example.com", "item_id": "i1"}
    obj |= {"timestamp": NOW_MS, "session_id": "alice@example.com-s1"}
    message = Message("items.updates", 0, 0, b"i1", orjson.dumps(obj))
    outcome = processor.process_item_updates([message])
    key, value = outcome.dead_letters[0]
    assert b"alice" not in value
    assert processor.pseudonymize("alice@example.com").encode() in value
    assert key == b"i1"


def test_state_keeps_session_ids_hashed():
    processor = _processor()
    events = [
        Event(f"s-{n}", "view", "alice@example.com", f"item-{n}", NOW_MS - 1000 + n)
        for n in range(3)
    ]
    for event in events:
        event.session_id = "alice@example.com:visit-1"
    processor.process_events(_stream(events))
    state = pickle.dumps(processor.state())
    assert b"alice" not in state
    assert processor.engine.user_history(processor.pseudonymize("alice@example.com"))


def test_restore_hashes_session_ids_of_older_state():
    # A state written before session ids were hashed contains them as sent:
    # the engine learned them from the processor without the hashing step.
    old = _processor()
    user = old.pseudonymize("alice@example.com")
    events = [
        Event(f"o-{n}", "view", user, f"item-{n}", NOW_MS - 1000 + n, session_id="alice:visit-1")
        for n in range(3)
    ]
    old.engine.learn(events)
    state = old.state()
    state.pop("session_ids", None)

    restored = _processor()
    restored.load_state(pickle.loads(pickle.dumps(state)))

    assert b"alice:visit-1" not in pickle.dumps(restored.state())
    later = Event("o-9", "view", "alice@example.com", "item-9", NOW_MS)
    later.session_id = "alice:visit-1"
    restored.process_events(_stream([later]))
    # The same visit goes on, so its earlier items stay in the session.
    rows = {restored.engine.catalog.index[f"item-{n}"] for n in range(3)}
    assert restored.engine._users[user].session_items >= rows
    assert set(restored.engine.models["basket"]._sessions[user].items) >= rows


def test_restore_keeps_hashed_session_ids():
    processor = _processor()
    event = Event("h-1", "view", "alice@example.com", "item-1", NOW_MS - 1000)
    event.session_id = "alice:visit-1"
    processor.process_events(_stream([event]))
    user = processor.pseudonymize("alice@example.com")
    stored = processor.engine._users[user].session_id

    restored = _processor()
    restored.load_state(pickle.loads(pickle.dumps(processor.state())))

    assert restored.engine._users[user].session_id == stored


def test_keyless_item_update_rejected():
    processor = _processor()
    update = {"item_id": "i1", "timestamp": NOW_MS - 1000, "in_stock": False}
    message = Message("items.updates", 0, 0, None, orjson.dumps(update))
    outcome = processor.process_item_updates([message])
    record = orjson.loads(outcome.dead_letters[0][1])
    assert record["reason"] == "key_mismatch"
    assert "expected the UTF-8 bytes of item_id" in record["detail"]
    assert outcome.applied == 0


def test_future_timestamp_detail_shows_date():
    processor = _processor()
    event = Event("e1", "view", "u1", "i1", NOW_MS + 86_400_000)
    outcome = processor.process_events([_message(event, 0)])
    detail = orjson.loads(outcome.dead_letters[0][1])["detail"]
    moment = datetime.fromtimestamp(NOW_MS / 1000 + 86_400, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert f"({moment})" in detail
    assert "86400 s ahead" in detail
