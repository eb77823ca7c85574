"""The default per-user rate limit leaves every real user of the public data alone."""

import pytest

from stream.ratelimit import PairRateLimiter, UserRateLimiter
from stream.settings import Settings
from stream.sources import read_events

from shared_data import DIGINETICA, RETAIL, TAOBAO, shared_file


@pytest.mark.parametrize(
    ("path", "fmt"),
    [(TAOBAO, "taobao"), (RETAIL, "online-retail"), (DIGINETICA, "diginetica")],
)
def test_no_real_user_is_rate_limited(path, fmt):
    shared_file(path)
    settings = Settings()
    limiter = UserRateLimiter(settings.user_rate_limit_per_s, settings.user_rate_burst)
    repeats = PairRateLimiter(
        settings.item_repeat_rate_per_s,
        settings.item_repeat_burst,
        settings.item_repeat_max_pairs,
    )
    limited = repeated = 0
    for event in read_events(path, fmt).events:
        limited += not limiter.allow(event.user_id, event.timestamp_ms)
        repeated += not repeats.allow(event.user_id, event.item_id, event.timestamp_ms)
    assert limited == 0, f"{limited} events of {path.name} would be rate-limited"
    assert repeated == 0, f"{repeated} events of {path.name} would be repeat-limited"
