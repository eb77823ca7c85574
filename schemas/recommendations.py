"""The value written to ``recs:user:{user_id}`` and ``recs:popular``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(slots=True)
class RecommendedItem:
    """One entry of a list: the item, its fused score and the models behind it."""

    item_id: str
    score: float
    sources: tuple[str, ...]


@dataclass(slots=True)
class RecommendationList:
    """An ordered top-k list, best first, as stored in Redis.

    >>> recs = RecommendationList([RecommendedItem("i1", 0.9, ("mf",))], 1700000000000, "v1")
    >>> recs.to_json()
    b'{"items":[{"item_id":"i1","score":0.9,"sources":["mf"]}],"computed_at":1700000000000,"model_version":"v1"}'
    >>> RecommendationList.from_json(recs.to_json()) == recs
    True
    """

    items: list[RecommendedItem]
    computed_at: int
    model_version: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> bytes:
        """Serialize to the JSON value of the Redis contract.

        Raises `ValueError` on a score that is not finite, because JSON has
        no NaN and a reader would fail on it.
        """
        entries = []
        for entry in self.items:
            if not math.isfinite(entry.score):
                msg = f"score of item {entry.item_id!r} is {entry.score}; expected a finite number"
                raise ValueError(msg)
            entries.append(
                {"item_id": entry.item_id, "score": entry.score, "sources": list(entry.sources)}
            )
        return orjson.dumps(
            {"items": entries, "computed_at": self.computed_at, "model_version": self.model_version}
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> RecommendationList:
        """Parse a value read from Redis.

        Raises ValueError, KeyError or TypeError when the value is not a list
        in this shape.
        """
        obj = orjson.loads(raw)
        items = []
        for entry in obj["items"]:
            item_id, score, sources = entry["item_id"], entry["score"], entry["sources"]
            if not isinstance(item_id, str):
                msg = f"item_id {item_id!r} is a {type(item_id).__name__}; expected a string"
                raise TypeError(msg)
            if isinstance(score, bool) or not isinstance(score, int | float):
                msg = f"score {score!r} is a {type(score).__name__}; expected a number"
                raise TypeError(msg)
            if not math.isfinite(score):
                msg = f"score is {score}; expected a finite number"
                raise ValueError(msg)
            if not isinstance(sources, list) or not all(isinstance(n, str) for n in sources):
                msg = f"sources {sources!r} is not a list of model names"
                raise TypeError(msg)
            items.append(RecommendedItem(item_id, float(score), tuple(sources)))
        return cls(items, int(obj["computed_at"]), str(obj["model_version"]))
