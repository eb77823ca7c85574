"""User ids in dead letters and log lines, in every form that a message carries them."""

import orjson

from stream import processor as processor_module
from stream.privacy import Pseudonymizer
from stream.processor import _PAYLOAD_PREVIEW, Message, Processor
from stream.settings import Settings

NOW_MS = 1_760_000_000_000
KEY = b"p" * 32
USER = "alice@example.com"


def _processor() -> Processor:
    return Processor(Settings(), Pseudonymizer(KEY), clock=lambda: NOW_MS / 1000)


def _event(**changes: object) -> dict[str, object]:
    event = {"event_id": "e1", "type": "view", "user_id": USER, "item_id": "i1"}
    return event | {"timestamp": NOW_MS, **changes}


def test_items_topic_letter_key_hides_user_key():
    # A producer sent a user-keyed event to items.updates. The value's
    # user_id is replaced in the payload, so the letter's Kafka key, which
    # is the same id, must not carry it in clear either.
    processor = _processor()
    message = Message("items.updates", 0, 0, USER.encode(), orjson.dumps(_event()))
    outcome = processor.process_item_updates([message])
    key, value = outcome.dead_letters[0]
    assert b"alice" not in value
    assert key is not None
    assert b"alice" not in key


def test_enveloped_user_id_hidden_without_key():
    # An event wrapped in an envelope, as CloudEvents producers send it: the
    # nested user_id is hidden, as the text path hides it in bytes that do
    # not parse.
    processor = _processor()
    raw = orjson.dumps({"specversion": "1.0", "data": _event()})
    outcome = processor.process_events([Message("events.view", 0, 0, None, raw)])
    value = outcome.dead_letters[0][1]
    assert orjson.loads(value)["reason"] == "unknown_field"
    assert b"alice" not in value


def test_enveloped_user_id_hidden_as_text():
    # The text path on the same envelope, cut short so that it is no JSON.
    processor = _processor()
    raw = orjson.dumps({"specversion": "1.0", "data": _event()})[:-2]
    outcome = processor.process_events([Message("events.view", 0, 0, None, raw)])
    value = outcome.dead_letters[0][1]
    assert orjson.loads(value)["reason"] == "not_json"
    assert b"alice" not in value


def test_numeric_user_id_hidden_without_key():
    # A user_id sent as a JSON number, without a key, is hidden in the other
    # fields too, such as a session id built from it.
    processor = _processor()
    raw = orjson.dumps(_event(user_id=10012345, session_id="10012345-s1"))
    outcome = processor.process_events([Message("events.view", 0, 0, None, raw)])
    value = outcome.dead_letters[0][1]
    record = orjson.loads(value)
    assert record["reason"] == "wrong_type"
    assert record["payload"]["user_id"] == "<redacted>"
    assert b"10012345" not in value


def test_backslash_user_id_hidden_in_detail(caplog):
    # A directory-style id such as CORP\jsmith. The error detail quotes the
    # too-long session_id as JSON, which doubles the backslash, and that
    # form of the id is hidden too.
    processor = _processor()
    user = "CORP\\jsmith"
    raw = orjson.dumps(_event(user_id=user, session_id=user + "-" + "s" * 300))
    with caplog.at_level("WARNING"):
        outcome = processor.process_events([Message("events.view", 0, 0, user.encode(), raw)])
    record = orjson.loads(outcome.dead_letters[0][1])
    assert record["reason"] == "text_too_long"
    assert "jsmith" not in record["detail"]
    assert "jsmith" not in caplog.text


def test_cut_inside_multibyte_character_hides_id():
    # The payload of a message that is not a JSON object keeps its first
    # 2048 bytes. When that cut splits a multibyte character of the user
    # id, the start of the id before it is still hidden.
    processor = _processor()
    user = "J\u00fcrgen.M\u00fcller@example.com"
    encoded = user.encode()
    # Keep the id up to the first byte of its second u-umlaut.
    kept_bytes = encoded.index("\u00fc".encode(), 3) + 1
    head = b'["'
    separator = b'", "'
    filler = b"x" * (_PAYLOAD_PREVIEW - len(head) - len(separator) - kept_bytes)
    raw = head + filler + separator + encoded + b'"]'
    assert raw[:_PAYLOAD_PREVIEW].endswith(encoded[:kept_bytes])
    outcome = processor.process_events([Message("events.view", 0, 0, encoded, raw)])
    payload = orjson.loads(outcome.dead_letters[0][1])["payload"]
    assert "J\u00fcrgen" not in payload


def test_cut_inside_ascii_id_is_hidden():
    # The same cut through an ASCII id.
    processor = _processor()
    user = "Juergen.Mueller@example.com"
    encoded = user.encode()
    kept_bytes = 9
    head = b'["'
    separator = b'", "'
    filler = b"x" * (_PAYLOAD_PREVIEW - len(head) - len(separator) - kept_bytes)
    raw = head + filler + separator + encoded + b'"]'
    outcome = processor.process_events([Message("events.view", 0, 0, encoded, raw)])
    payload = orjson.loads(outcome.dead_letters[0][1])["payload"]
    assert "Juergen" not in payload


def test_huge_item_key_cut_in_letter():
    # The broker takes a key of about 1 MB, and more when compressed.
    processor = _processor()
    value = orjson.dumps({"item_id": "i1", "timestamp": NOW_MS, "price": 5})
    message = Message("items.updates", 0, 0, b"k" * 1_000_200, value)

    outcome = processor.process_item_updates([message])

    key, letter = outcome.dead_letters[0]
    assert orjson.loads(letter)["reason"] == "key_mismatch"
    assert key is not None
    assert len(key) <= 1024
    assert len(letter) < 10_000


def test_huge_event_keys_not_searched(monkeypatch):
    # Searching a letter for a key of 1 MB took about 1.5 s on the event loop.
    processor = _processor()
    searched: list[int] = []
    real_pattern = processor_module._whole_id_pattern

    def recording(user_id):
        searched.append(len(user_id))
        return real_pattern(user_id)

    monkeypatch.setattr(processor_module, "_whole_id_pattern", recording)
    messages = [
        Message("events.view", 0, n, b"%03d" % n + b"k" * 1_000_000, orjson.dumps(_event()))
        for n in range(3)
    ]

    outcome = processor.process_events(messages)

    assert len(outcome.dead_letters) == 3
    assert max(searched) <= 1024
    for key, letter in outcome.dead_letters:
        assert key is not None
        assert len(key) < 100
        assert b"alice" not in letter


def test_long_escaped_id_hidden_as_text():
    # A valid id of 172 characters is 1,032 characters once each one is
    # written as a \uXXXX escape, longer than any key of a valid id.
    user = "customer-" + "a" * 163
    escaped = "".join(f"\\u{ord(char):04x}" for char in user)
    # The text ends early, so it is no JSON and is searched as text.
    value = f'{{"user_id": "{escaped}", "note": "{escaped}", '.encode()
    processor = _processor()

    outcome = processor.process_events([Message("events.view", 0, 0, None, value)])

    payload = orjson.loads(outcome.dead_letters[0][1])["payload"]
    assert escaped[:60] not in payload
