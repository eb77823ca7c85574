"""Models that apply a batch event by event end in the same state as one event at a time."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from models.engine import EngineConfig, Recommender
from schemas import Event

T0 = 1_700_000_000_000
USERS = ("u0", "u1", "ü2")
# Matrix factorization takes one SGD step per batch, and the context model
# reads prices after the batch, so neither is expected to match.
EVENT_BY_EVENT = ("popular", "trending", "category", "covisit", "basket", "recent", "title")

Row = tuple[str, int, str, str | None, int, str | None, str | None]
event_rows = st.lists(
    st.tuples(
        st.sampled_from(USERS),
        st.integers(min_value=0, max_value=6),
        st.sampled_from(["view", "click", "purchase", "refund"]),
        st.sampled_from([None, "c0", "c1"]),
        # Gaps up to 40 days, and late events up to an hour back.
        st.integers(min_value=-3_600_000, max_value=40 * 86_400_000),
        st.sampled_from([None, "s0", "s1"]),
        st.sampled_from([None, "red alarm clock", "red lunch box"]),
    ),
    min_size=1,
    max_size=40,
)


def _events(rows: list[Row]) -> list[Event]:
    events = []
    time_ms = T0
    for n, (user, item, kind, category, gap, session, title) in enumerate(rows):
        time_ms += gap
        quantity = -1 if kind == "refund" else None
        kind = "purchase" if kind == "refund" else kind
        events.append(
            Event(
                f"e{n}",
                kind,
                user,
                f"i{item}",
                time_ms,
                session_id=session,
                quantity=quantity,
                category=category,
                title=title,
            )
        )
    return events


def _relative(scores: np.ndarray) -> np.ndarray:
    # Decayed scores are stored scaled by a reference time that depends on
    # where batches start, so only their ratios are compared.
    return scores / scores.max() if len(scores) else scores


@settings(max_examples=60, deadline=None)
@given(rows=event_rows, batch=st.integers(min_value=2, max_value=25))
def test_scores_ignore_batch_cuts(rows: list[Row], batch: int) -> None:
    events = _events(rows)
    config = EngineConfig(fusion_learn_every=0)
    single, batched = Recommender(config), Recommender(config)
    for event in events:
        single.learn([event])
    for start in range(0, len(events), batch):
        batched.learn(events[start : start + batch])
    items = np.arange(len(single.catalog), dtype=np.int64)
    for name in EVENT_BY_EVENT:
        for user in USERS:
            expected_items, expected = single.models[name].score(user, items)
            actual_items, actual = batched.models[name].score(user, items)
            assert actual_items.tolist() == expected_items.tolist(), (name, user)
            assert np.allclose(_relative(actual), _relative(expected), rtol=1e-6), (name, user)


def test_late_retouch_keeps_newest_item() -> None:
    # The user views i1 to i5, one a second. A view of i5 stamped before all
    # of them arrives last, as from a retried producer. i5 is still the
    # user's newest item, as when the same events arrive in time order.
    views = [Event(f"e{n}", "view", "u", f"i{n}", T0 + n * 1000) for n in range(1, 6)]
    late = Event("late", "view", "u", "i5", T0)
    arrival = Recommender(EngineConfig(fusion_learn_every=0))
    arrival.learn([*views, late])
    in_order = Recommender(EngineConfig(fusion_learn_every=0))
    in_order.learn([late, *views])

    for name in ("covisit", "title"):
        expected = [in_order.catalog.ids[row] for row in in_order.models[name].user_items("u")]
        actual = [arrival.catalog.ids[row] for row in arrival.models[name].user_items("u")]
        assert expected[0] == "i5", name
        assert actual == expected, name


def test_context_category_ignores_batch_cuts() -> None:
    # Item a carries category c1 on u's event and c2 on v's later event.
    # u's positive example must use c1, the category as of u's event,
    # whether or not v's event is learned in the same batch.
    events = [
        Event("e0", "view", "u", "x", T0),
        Event("e1", "view", "u", "a", T0 + 1000, category="c1"),
        Event("e2", "view", "v", "a", T0 + 2000, category="c2"),
    ]
    config = EngineConfig(fusion_learn_every=0)
    single = Recommender(config)
    for event in events:
        single.learn([event])
    batched = Recommender(config)
    batched.learn(events)

    def category_weights(engine: Recommender) -> dict[str, float]:
        weights = engine.models["context"].classifier._weights  # type: ignore[attr-defined]
        return {key: value for key, value in weights.items() if key.startswith("category=")}

    assert category_weights(batched) == category_weights(single)
