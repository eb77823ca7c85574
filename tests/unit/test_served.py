"""The index of served lists that rewrites lists when items sell out."""

import numpy as np
import orjson

from schemas import RecommendedItem, validator
from stream.served import ServedLists

ITEMS = [f"i{n}" for n in range(10)]
INDEX = {item: row for row, item in enumerate(ITEMS)}


def _entries(*rows):
    return [RecommendedItem(ITEMS[r], 1.0 - r / 10, ("mf", "popular")) for r in rows]


def _stock(*sold_out):
    stock = np.ones(len(ITEMS), dtype=bool)
    stock[list(sold_out)] = False
    return stock


def test_holders_finds_lists_with_item():
    served = ServedLists(depth=4)
    served.record("a", "recs:user:a", _entries(0, 1, 2), INDEX.get)
    served.record("b", "recs:user:b", _entries(3, 4, 5), INDEX.get)
    assert served.holders([1]).tolist() == [0]
    assert served.holders([9]).tolist() == []


def test_rewrite_moves_spare_up():
    served = ServedLists(depth=4)
    served.record("a", "recs:user:a", _entries(0, 1, 2, 3), INDEX.get)
    (rewritten,) = served.rewrite([1], _stock(1), ITEMS, 3, 7, "v1")
    value = orjson.loads(rewritten.payload)
    assert [entry["item_id"] for entry in value["items"]] == ["i0", "i2", "i3"]
    assert value["computed_at"] == 7
    assert rewritten.key == "recs:user:a"
    assert not rewritten.short
    assert validator("recommendations.schema.json").is_valid(value)


def test_rewrite_marks_short_list():
    served = ServedLists(depth=3)
    served.record("a", "recs:user:a", _entries(0, 1, 2), INDEX.get)
    (rewritten,) = served.rewrite([0], _stock(0), ITEMS, 3, 0, "v1")
    assert rewritten.short
    assert len(orjson.loads(rewritten.payload)["items"]) == 2


def test_rewrite_drops_every_sold_out_item():
    served = ServedLists(depth=5)
    served.record("a", "recs:user:a", _entries(0, 1, 2, 3, 4), INDEX.get)
    (rewritten,) = served.rewrite([1], _stock(1, 3), ITEMS, 5, 0, "v1")
    items = [entry["item_id"] for entry in orjson.loads(rewritten.payload)["items"]]
    assert items == ["i0", "i2", "i4"]


def test_rewritten_list_no_longer_holds_item():
    served = ServedLists(depth=4)
    served.record("a", "recs:user:a", _entries(0, 1, 2, 3), INDEX.get)
    served.rewrite([1], _stock(1), ITEMS, 3, 0, "v1")
    assert served.holders([1]).tolist() == []


def test_forget_drops_list():
    served = ServedLists(depth=4)
    served.record("a", "recs:user:a", _entries(0, 1), INDEX.get)
    served.forget("a")
    assert "a" not in served
    assert served.rewrite([0], _stock(0), ITEMS, 2, 0, "v1") == []


def test_index_grows_past_capacity():
    served = ServedLists(depth=2, capacity=2)
    for n in range(10):
        served.record(f"u{n}", f"recs:user:u{n}", _entries(n % 10, (n + 1) % 10), INDEX.get)
    assert len(served) == 10
    assert len(served.holders([0])) == 2


def test_expired_list_is_dropped():
    served = ServedLists(depth=4)
    served.record("a", "recs:user:a", _entries(0, 1, 2), INDEX.get, expires_at=100.0)
    served.record("b", "recs:user:b", _entries(1, 2, 3), INDEX.get, expires_at=200.0)
    assert served.expire(150.0) == 1
    assert "a" not in served
    assert served.expires_at("b") == 200.0
    assert [r.key for r in served.rewrite([1], _stock(1), ITEMS, 2, 7, "v1")] == ["recs:user:b"]


def test_expiry_survives_growth():
    served = ServedLists(depth=2, capacity=2)
    for n in range(5):
        served.record(f"u{n}", f"recs:user:u{n}", _entries(n), INDEX.get, expires_at=float(n))
    assert served.expires_at("u4") == 4.0
    assert served.expires_at("nobody") == float("inf")
    assert served.expire(2.0) == 3
    assert len(served) == 2
