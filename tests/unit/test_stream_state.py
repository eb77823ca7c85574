"""State helpers of the worker that need no services."""

import logging
import os
import pickle
import re

import orjson
import pytest

from stream.checkpoint import CheckpointError, CheckpointFormatError, CheckpointStore
from stream.dedup import DedupWindow
from stream.logs import JsonFormatter, RepeatLimit, configure_logging
from stream.privacy import Pseudonymizer, load_pseudonymizer
from stream.ratelimit import UserRateLimiter
from stream.settings import Service, Settings, SettingsError
from stream.sink import redis_client


def test_dedup_rejects_repeat():
    window = DedupWindow(window_ms=10_000, max_entries=100)
    assert window.add("e1", "u", 1_000)
    assert not window.add("e1", "u", 1_000)


def test_dedup_evicts_by_event_time():
    window = DedupWindow(window_ms=10_000, max_entries=100)
    window.add("old", "u", 0)
    window.add("new", "u", 20_000)
    assert "old" not in window
    assert "new" in window


def test_dedup_evicts_by_count():
    window = DedupWindow(window_ms=10**9, max_entries=3)
    for n in range(5):
        window.add(f"e{n}", "u", n)
    assert len(window) == 3
    assert "e0" not in window
    assert "e4" in window


def test_dedup_forgets_owner():
    window = DedupWindow(window_ms=10**9, max_entries=100)
    window.add("a", "alice", 1)
    window.add("b", "bob", 2)
    assert window.forget_owner("alice") == 1
    assert "a" not in window
    assert window.owners() == {"bob"}
    assert window.add("a", "alice", 3)


def test_dedup_survives_pickle():
    window = DedupWindow(window_ms=10**9, max_entries=100)
    window.add("a", "alice", 1)
    again = pickle.loads(pickle.dumps(window))
    assert not again.add("a", "alice", 1)


def test_rate_limit_refills_on_event_time():
    limiter = UserRateLimiter(rate_per_s=2.0, burst=2.0)
    assert limiter.allow("u", 0)
    assert limiter.allow("u", 0)
    assert not limiter.allow("u", 0)
    assert limiter.allow("u", 500)


def test_rate_limit_ignores_arrival_order():
    stamps = [0, 100, 200, 900, 950, 1_500, 1_501, 1_502]
    forward = UserRateLimiter(rate_per_s=1.0, burst=2.0)
    backward = UserRateLimiter(rate_per_s=1.0, burst=2.0)
    allowed_forward = sum(forward.allow("u", stamp) for stamp in stamps)
    allowed_backward = sum(backward.allow("u", stamp) for stamp in reversed(stamps))
    assert allowed_forward == allowed_backward


def test_pair_limit_spares_sample_in_partition_chunks():
    import random
    import zlib

    from stream.ratelimit import PairRateLimiter
    from stream.synthetic import generate_events

    settings = Settings()
    events = list(generate_events(3000, n_users=200, n_items=500, seed=3))
    partitions: dict[tuple[str, int], list] = {}
    for event in events:
        partition = zlib.crc32(event.user_id.encode()) % 4
        partitions.setdefault((event.type, partition), []).append(event)
    rng = random.Random(1)
    arrival = []
    while partitions:
        name = rng.choice(sorted(partitions))
        arrival += partitions[name][:200]
        partitions[name] = partitions[name][200:]
        if not partitions[name]:
            del partitions[name]
    limiter = PairRateLimiter(
        settings.item_repeat_rate_per_s, settings.item_repeat_burst, settings.item_repeat_max_pairs
    )
    limited = sum(not limiter.allow(e.user_id, e.item_id, e.timestamp_ms) for e in arrival)
    assert limited == 0


def test_sweep_spares_bot_stamping_the_past():
    limiter = UserRateLimiter(rate_per_s=1.0, burst=2.0)
    now_ms = 3_600_000
    assert limiter.allow("shopper", now_ms)
    allowed = 0
    for _ in range(5):
        allowed += sum(limiter.allow("bot", 0) for _ in range(10))
        limiter.sweep(now_ms)
    assert allowed == 2


def test_sweep_drops_quiet_users():
    limiter = UserRateLimiter(rate_per_s=1.0, burst=2.0)
    limiter.allow("quiet", 0)
    limiter.allow("active", 10_000)
    assert limiter.sweep(10_000) == 1
    assert limiter.users() == {"active"}


def test_rate_limit_restarts_after_quiet_period():
    limiter = UserRateLimiter(rate_per_s=1.0, burst=2.0)
    assert limiter.allow("u", 0)
    assert limiter.allow("u", 0)
    flood = [limiter.allow("u", 3_600_000) for _ in range(10)]
    assert sum(flood) == 2


def test_pair_limit_caps_one_item():
    from stream.ratelimit import PairRateLimiter

    limiter = PairRateLimiter(rate_per_s=0.1, burst=3.0, max_pairs=100)
    allowed = [limiter.allow("u", "i", 1_000) for _ in range(10)]
    assert sum(allowed) == 3
    assert limiter.allow("u", "other", 1_000)
    assert limiter.allow("v", "i", 1_000)


def test_pair_limit_bounds_memory():
    from stream.ratelimit import PairRateLimiter

    limiter = PairRateLimiter(rate_per_s=0.1, burst=3.0, max_pairs=5)
    for n in range(20):
        limiter.allow("u", f"i{n}", n)
    assert len(limiter) == 5


def test_rate_limit_is_per_user():
    limiter = UserRateLimiter(rate_per_s=1.0, burst=1.0)
    assert limiter.allow("a", 0)
    assert limiter.allow("b", 0)
    assert limiter.users() == {"a", "b"}


def test_rate_limit_sweep_drops_full_buckets():
    limiter = UserRateLimiter(rate_per_s=1.0, burst=1.0)
    limiter.allow("a", 0)
    assert limiter.sweep(5_000) == 1
    assert len(limiter) == 0


def test_checkpoint_round_trip(tmp_path):
    store = CheckpointStore(tmp_path, b"k" * 32)
    store.write({"x": 1})
    state, path = store.restore()
    assert state == {"x": 1}
    assert path.name.startswith("checkpoint-")


def test_checkpoint_keeps_newest(tmp_path):
    store = CheckpointStore(tmp_path, b"k" * 32, keep=2)
    for n in range(5):
        store.write({"n": n})
    assert [seq for seq, _ in store.paths()] == [5, 4]
    assert store.restore()[0] == {"n": 4}


def test_failed_checkpoint_leaves_no_temporary(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, b"k" * 32)
    store.write({"n": 1})

    def fail_fsync(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("stream.checkpoint.os.fsync", fail_fsync)
    with pytest.raises(OSError, match="No space"):
        store.write({"n": 2})

    assert sorted(path.name for path in tmp_path.iterdir()) == [store.paths()[0][1].name]
    assert store.restore()[0] == {"n": 1}


def test_torn_checkpoint_falls_back(tmp_path):
    store = CheckpointStore(tmp_path, b"k" * 32)
    store.write({"n": 1})
    info = store.write({"n": 2})
    data = info.path.read_bytes()
    info.path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="payload bytes"):
        store.read(info.path)
    assert store.restore()[0] == {"n": 1}
    assert store.set_aside() == [info.path.with_name(info.path.name + ".invalid")]


def test_invalid_checkpoints_no_longer_counted(tmp_path):
    store = CheckpointStore(tmp_path, b"k" * 32, keep=2)
    store.write({"n": 1})
    (tmp_path / "checkpoint-00000000000000000200.bin").write_bytes(b"")
    (tmp_path / "checkpoint-00000000000000000300.bin").mkdir()

    assert store.restore()[0] == {"n": 1}
    store.write({"n": 2})

    assert [state for state in (store.read(path) for _, path in store.paths())] == [
        {"n": 2},
        {"n": 1},
    ]
    assert len(store.set_aside()) == 2


def test_altered_checkpoint_is_detected(tmp_path):
    store = CheckpointStore(tmp_path, b"k" * 32)
    info = store.write({"n": 1})
    data = bytearray(info.path.read_bytes())
    data[-1] ^= 0xFF
    info.path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="integrity"):
        store.read(info.path)


def test_checkpoint_of_other_key_is_rejected(tmp_path):
    CheckpointStore(tmp_path, b"k" * 32).write({"n": 1})
    assert CheckpointStore(tmp_path, b"j" * 32).restore() is None


class _Retired:
    """Stands in for a class that a later version no longer has."""


def test_unloadable_checkpoint_stops_restore(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, b"k" * 32)
    store.write({"n": 1})
    newest = store.write({"n": 2, "old": _Retired()})
    monkeypatch.delattr(f"{__name__}._Retired")

    with pytest.raises(CheckpointFormatError) as caught:
        store.restore()

    assert str(newest.path) in str(caught.value)
    assert "cannot load it (AttributeError" in str(caught.value)


def test_worker_restore_names_unloadable_state(tmp_path):
    from dataclasses import replace

    from stream.app import Worker

    settings = replace(Settings(), data_dir=str(tmp_path), kafka_bootstrap="127.0.0.1:9")
    worker = Worker(settings)
    worker.store.write({"version": -1})

    with pytest.raises(CheckpointFormatError, match="ValueError: checkpoint state version -1"):
        Worker(settings).restore()


def test_pseudonym_is_keyed():
    assert Pseudonymizer(b"a" * 32)("u") != Pseudonymizer(b"b" * 32)("u")


def test_pseudonym_keeps_nfc_and_nfd_apart():
    pseudonymize = Pseudonymizer(b"a" * 32)
    assert pseudonymize("caf\u00e9") != pseudonymize("cafe\u0301")


def test_pseudonym_key_file_created_private(tmp_path):
    settings = Settings(data_dir=str(tmp_path))
    first = load_pseudonymizer(settings, create=True)
    again = load_pseudonymizer(settings)
    assert first("u") == again("u")
    assert os.stat(tmp_path / "pseudonym.key").st_mode & 0o777 == 0o600


def test_missing_pseudonym_key_not_created(tmp_path):
    settings = Settings(data_dir=str(tmp_path))
    with pytest.raises(SettingsError, match="does not exist") as caught:
        load_pseudonymizer(settings)
    assert str(tmp_path / "pseudonym.key") in str(caught.value)
    assert not (tmp_path / "pseudonym.key").exists()


@pytest.mark.parametrize("default_file", [True, False], ids=["data dir", "key file setting"])
def test_binary_pseudonym_key_file_rejected(tmp_path, default_file):
    path = tmp_path / "pseudonym.key"
    path.write_bytes(bytes(range(200, 232)))
    if default_file:
        settings = Settings(data_dir=str(tmp_path))
    else:
        settings = Settings(data_dir=str(tmp_path / "data"), pseudonym_key_file=str(path))
    with pytest.raises(SettingsError, match="not UTF-8 text") as caught:
        load_pseudonymizer(settings, create=True)
    assert str(path) in str(caught.value)
    assert "hex characters" in str(caught.value)


def test_short_pseudonym_key_file_rejected(tmp_path):
    path = tmp_path / "pseudonym.key"
    path.write_text("deadbeefdeadbe\n")
    with pytest.raises(SettingsError, match="14 bytes") as caught:
        load_pseudonymizer(Settings(pseudonym_key_file=str(path)))
    assert str(path) in str(caught.value)
    assert "deadbeef" not in str(caught.value)


@pytest.mark.parametrize("text", ["12345678901234567890", "deadbeefdeadbeef"])
def test_digit_text_key_taken_as_text(tmp_path, text):
    # Valid hex, but too short a key as hex: the text itself is the key.
    path = tmp_path / "pseudonym.key"
    path.write_text(text + "\n")

    loaded = load_pseudonymizer(Settings(pseudonym_key_file=str(path)))

    assert loaded("u1") == Pseudonymizer(text.encode())("u1")


def test_short_pseudonym_key_setting_named():
    with pytest.raises(SettingsError, match="FUSIONREC_PSEUDONYM_KEY is 5 bytes"):
        load_pseudonymizer(Settings(pseudonym_key="short"))


def test_recs_by_pseudonym_needs_key_file(tmp_path, monkeypatch, capsys):
    from stream.cli import main

    monkeypatch.setenv("FUSIONREC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FUSIONREC_REDIS_KEY_BY", "pseudonym")
    monkeypatch.delenv("FUSIONREC_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("FUSIONREC_PSEUDONYM_KEY_FILE", raising=False)
    # The key is needed before Redis, so no connection may be opened.
    monkeypatch.setattr(
        "stream.reader.redis_client", lambda settings: pytest.fail("Redis was contacted")
    )
    assert main(["recs", "u1"]) == 2
    assert "pseudonym key file" in capsys.readouterr().err
    assert not (tmp_path / "pseudonym.key").exists()


def test_pseudonymizer_repr_hides_key():
    assert "aaaa" not in repr(Pseudonymizer(b"a" * 32))


def test_settings_from_env():
    settings = Settings.from_env({"FUSIONREC_K": "7", "FUSIONREC_CHECK_KEY": "false"})
    assert settings.k == 7
    assert settings.check_key is False


def test_settings_reject_bad_number():
    with pytest.raises(SettingsError, match="FUSIONREC_K"):
        Settings.from_env({"FUSIONREC_K": "many"})


@pytest.mark.parametrize(
    ("env", "named"),
    [
        (
            {"FUSIONREC_REDIS_URL": "redis://127.0.0.1:abc/0"},
            "REDIS_URL is 'redis://127.0.0.1:abc/0'",
        ),
        ({"FUSIONREC_REDIS_URL": "redis://127.0.0.1:99999/0"}, "Port out of range"),
        ({"FUSIONREC_REDIS_URL": "redis://[::1/0"}, "Invalid IPv6 URL"),
        ({"FUSIONREC_APP_ID": "  "}, "FUSIONREC_APP_ID is '  '; expected a non-empty id"),
        ({"FUSIONREC_TOPIC_PREFIX": "bad prefix/"}, "TOPIC_PREFIX is 'bad prefix/'"),
        ({"FUSIONREC_TTL_S": "10000000000000000"}, "TTL_S is 10000000000000000; expected at most"),
        ({"FUSIONREC_USER_RATE_LIMIT_PER_S": "5e-324"}, "USER_RATE_LIMIT_PER_S is 5e-324"),
        ({"FUSIONREC_ITEM_REPEAT_RATE_PER_S": "1e-9"}, "ITEM_REPEAT_RATE_PER_S is 1e-09"),
        ({"FUSIONREC_WEIGHTS": "popular=1e39"}, "expected a number in \\[0, 1e\\+06\\]"),
    ],
)
def test_settings_reject_unusable_values(env, named):
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_settings_reject_short_dedup_window():
    with pytest.raises(SettingsError, match="DEDUP_WINDOW_S"):
        Settings.from_env({"FUSIONREC_DEDUP_WINDOW_S": "60"})


def test_settings_mask_secrets():
    masked = Settings(redis_password="pw", pseudonym_key="secret").masked()
    assert masked["FUSIONREC_REDIS_PASSWORD"] == "***"
    assert masked["FUSIONREC_PSEUDONYM_KEY"] == "***"


def test_settings_mask_url_password():
    masked = Settings(redis_url="redis://shop:urlpass@127.0.0.1:6379/0").masked()
    assert masked["FUSIONREC_REDIS_URL"] == "redis://shop:***@127.0.0.1:6379/0"


def test_settings_mask_query_password():
    masked = Settings(redis_url="redis://127.0.0.1:6379/0?password=urlpass").masked()
    assert "urlpass" not in masked["FUSIONREC_REDIS_URL"]
    assert masked["FUSIONREC_REDIS_URL"] == "redis://127.0.0.1:6379/0?password=***"


@pytest.mark.parametrize(
    "url", ["redis://:urlpass@127.0.0.1:6379/0", "redis://127.0.0.1:6379/0?password=urlpass"]
)
def test_password_setting_wins_over_url(url):
    client = redis_client(Settings(redis_url=url, redis_password="setting"))
    assert client.connection_pool.connection_kwargs["password"] == "setting"


def test_url_password_used_without_setting():
    client = redis_client(Settings(redis_url="redis://:urlpass@127.0.0.1:6379/0"))
    assert client.connection_pool.connection_kwargs["password"] == "urlpass"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("USER_RATE_LIMIT_PER_S", "inf", "expected a finite number"),
        ("ITEM_REPEAT_RATE_PER_S", "nan", "expected a finite number"),
        ("CHECKPOINT_INTERVAL_S", "nan", "expected a finite number"),
        ("MAX_FUTURE_SKEW_S", "-5", "expected a number >= 0"),
        ("MAX_PER_CATEGORY", "-1", "expected a number >= 0"),
        ("SEED", "-1", "expected a number >= 0"),
        ("SEED", str(2**32), "expected a number below 2**32"),
        ("FUSION", "wrr", "expected one of '', 'weighted', 'rrf', 'learned'"),
        ("KAFKA_SECURITY_PROTOCOL", "ssl", "expected one of 'PLAINTEXT'"),
        ("LOG_LEVEL", "verbose", "expected one of 'debug'"),
        ("WEIGHTS", "mf=1,popularity=0.2", "WEIGHTS names 'popularity'"),
        ("WEIGHTS", "mf=-1", "expected a number in"),
        ("USER_RATE_BURST", "0.5", "expected at least 1 event"),
        ("ITEM_REPEAT_BURST", "0.5", "expected at least 1 event"),
        ("CONSUMER_SESSION_TIMEOUT_S", "0", "expected a positive number"),
        ("CONSUMER_HEARTBEAT_S", "30", "expected less than"),
    ],
)
def test_settings_reject_unusable_value(variable, value, expected):
    with pytest.raises(SettingsError, match=re.escape(expected)) as raised:
        Settings.from_env({f"FUSIONREC_{variable}": value})
    assert f"FUSIONREC_{variable}" in str(raised.value)


@pytest.mark.parametrize(
    ("variable", "value", "service"),
    [
        ("REDIS_URL", "http://127.0.0.1:6379/0", Service.REDIS),
        ("REDIS_KEY_BY", "hash", Service.REDIS),
        ("TTL_S", "4", Service.REDIS),
        ("REDIS_WRITE_BATCH", "0", Service.REDIS),
        ("TTL_S", "abc", Service.REDIS),
        ("REDIS_WRITE_BATCH", "x", Service.REDIS),
        ("REDIS_RETRY_MAX_S", "soon", Service.REDIS),
        ("KAFKA_BOOTSTRAP", "127.0.0.1", Service.KAFKA),
        ("KAFKA_SECURITY_PROTOCOL", "ssl", Service.KAFKA),
        ("KAFKA_SASL_MECHANISM", "GSSAPI", Service.KAFKA),
    ],
)
def test_settings_check_only_requested_services(variable, value, service):
    environ = {f"FUSIONREC_{variable}": value}
    # Neither raises, because neither checks the service that the value is for.
    Settings.from_env(environ, services=Service.ALL & ~service)
    Settings.from_env(environ, services=Service.NONE)
    with pytest.raises(SettingsError, match=f"FUSIONREC_{variable}"):
        Settings.from_env(environ, services=service)
    with pytest.raises(SettingsError, match=f"FUSIONREC_{variable}"):
        Settings.from_env(environ)


def test_settings_build_the_engine_config():
    config = Settings(fusion="rrf", max_per_category=3, weights="mf=2").engine_config()
    assert config.fusion == "rrf"
    assert config.max_per_category == 3
    assert config.model_weights()["mf"] == 2.0


def test_settings_reject_short_ttl():
    with pytest.raises(SettingsError, match="TTL_S is 4; expected at least 60"):
        Settings.from_env({"FUSIONREC_TTL_S": "4"})


def test_settings_parse_weights():
    assert Settings(weights="mf=1, popular=0.5").parsed_weights() == {"mf": 1.0, "popular": 0.5}
    with pytest.raises(SettingsError, match="name=number"):
        Settings(weights="mf").parsed_weights()


def test_json_log_line_has_extras():
    record = logging.makeLogRecord(
        {
            "msg": "checkpoint written %s",
            "args": ("x",),
            "levelname": "INFO",
            "name": "t",
            "event": "checkpoint_written",
        }
    )
    line = orjson.loads(JsonFormatter().format(record))
    assert line["message"] == "checkpoint written x"
    assert line["event"] == "checkpoint_written"
    assert line["level"] == "info"


@pytest.fixture
def saved_logging():
    """Restore the root and timer loggers after a test that configures logging."""
    root = logging.getLogger()
    timers = logging.getLogger("mode.timers")
    handlers, root_level, timers_level = root.handlers[:], root.level, timers.level
    yield
    root.handlers[:] = handlers
    root.setLevel(root_level)
    timers.setLevel(timers_level)


@pytest.mark.parametrize(("level", "shown"), [("info", False), ("debug", True)])
def test_late_timer_lines_show_only_at_debug(level, shown, capsys, saved_logging):
    configure_logging(level)
    logging.getLogger("mode.timers").info("Timer commit woke up too late")
    logging.getLogger("mode.timers").warning("Timer commit is overlapping")
    logging.getLogger("stream.app").info("worker ready")

    err = capsys.readouterr().err
    assert ("woke up too late" in err) is shown
    assert "is overlapping" in err
    assert "worker ready" in err


def test_timer_warnings_hidden_at_error_level(capsys, saved_logging):
    configure_logging("error")
    logging.getLogger("mode.timers").warning("Timer commit is overlapping")
    logging.getLogger("stream.app").error("checkpoint not written")

    err = capsys.readouterr().err
    assert "is overlapping" not in err
    assert "checkpoint not written" in err


def test_checkpoint_file_is_owner_only(tmp_path):
    store = CheckpointStore(tmp_path, b"k" * 32)
    info = store.write({"n": 1})
    assert info.path.stat().st_mode & 0o777 == 0o600


class _FailingProducer:
    """A stand-in for AIOKafkaProducer that fails to start or to send, and records its stop."""

    fail_at = "start"
    stopped = False

    def __init__(self, **options):
        self.options = options

    async def start(self):
        from aiokafka.errors import KafkaConnectionError

        if self.fail_at == "start":
            raise KafkaConnectionError(
                f"Unable to bootstrap from {self.options['bootstrap_servers']}"
            )

    async def send_and_wait(self, topic, **message):
        from aiokafka.errors import KafkaTimeoutError

        raise KafkaTimeoutError

    async def stop(self):
        type(self).stopped = True


@pytest.mark.parametrize(
    ("fail_at", "expected"),
    [
        ("start", "cannot connect to Kafka at broker-a:9092,broker-b:9092"),
        ("send", "Kafka at broker-a:9092,broker-b:9092 did not take the forget request"),
    ],
)
def test_forget_without_broker_prints_one_line(monkeypatch, capsys, fail_at, expected):
    from stream.cli import main

    monkeypatch.setenv("FUSIONREC_KAFKA_BOOTSTRAP", "broker-a:9092,broker-b:9092")
    monkeypatch.setattr(_FailingProducer, "fail_at", fail_at)
    monkeypatch.setattr(_FailingProducer, "stopped", False)
    monkeypatch.setattr("stream.reader.AIOKafkaProducer", _FailingProducer)
    assert main(["forget", "u1"]) == 1
    output = capsys.readouterr()
    assert output.out == ""
    assert len(output.err.splitlines()) == 1
    assert expected in output.err
    assert "Traceback" not in output.err
    assert _FailingProducer.stopped


def test_cli_rejects_empty_forget(capsys):
    from stream.cli import main

    assert main(["forget", ""]) == 2
    assert "user_id is empty" in capsys.readouterr().err


def test_dedup_forgets_several_owners_at_once():
    window = DedupWindow(window_ms=10_000, max_entries=100)
    for n, owner in enumerate(["a", "b", "c", "a"]):
        window.add(f"e{n}", owner, n)
    assert window.forget_owners({"a", "c"}) == 3
    assert "e1" in window
    assert not any(f"e{n}" in window for n in (0, 2, 3))
    assert window.add("e0", "a", 5)


def test_pair_limit_forgets_several_users_at_once():
    from stream.ratelimit import PairRateLimiter

    limiter = PairRateLimiter(rate_per_s=0.1, burst=3.0, max_pairs=100)
    for user in ("a", "b", "c"):
        limiter.allow(user, "i", 0)
    limiter.forget_users({"a", "c"})
    assert limiter.users() == {"b"}


def test_repeat_limit_counts_held_back_lines():
    now = [0.0]
    limit = RepeatLimit(interval_s=5.0, clock=lambda: now[0])

    def record(node: int) -> logging.LogRecord:
        fields = {"name": "aiokafka", "msg": "Unable connect to node %s", "args": (node,)}
        return logging.makeLogRecord(fields)

    passed = [limit.filter(record(n)) for n in range(4)]
    now[0] = 6.0
    later = record(9)

    assert passed == [True, False, False, False]
    assert limit.filter(later) is True
    assert later.getMessage() == "Unable connect to node 9 (3 more like this in the last 6 s)"
