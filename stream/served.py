"""The lists last written to Redis, kept to rewrite them when items become unavailable.

When an item goes out of stock, every list that contains it must change at
once, including lists of users who are not active. Recomputing thousands of
lists would take seconds, so each user's last list is kept here with a few
spare items below the cut: the unavailable item is dropped, the next spare
moves up, and the list is written again without asking the models.

Rows are numpy arrays of item rows (``int32``), scores (``float32``) and an
index into a table of source tuples (``int16``), so a lookup of every list
that holds an item is one vectorized scan. The Redis key of each user is kept
in memory only: it may contain the shop's user id, which must not rest in a
checkpoint. After a restart the index is rebuilt from the lists in Redis.

Each entry also keeps the time its Redis key expires. An entry past it is
dropped, so a sold-out item never writes back a list that Redis has expired.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import orjson

from schemas import RecommendedItem

_EMPTY = -1


@dataclass(slots=True)
class Rewritten:
    """A list rebuilt without unavailable items."""

    pseudonym: str
    key: str
    payload: bytes
    short: bool


class ServedLists:
    """Item rows of the last list of every user, with ``depth`` entries each."""

    def __init__(self, depth: int, capacity: int = 1024) -> None:
        self.depth = depth
        self._rows: dict[str, int] = {}
        self._pseudonyms: list[str | None] = []
        self._keys: list[str | None] = []
        self._free: list[int] = []
        # Epoch seconds at which each list's Redis key expires.
        self._expires = np.full(capacity, math.inf, dtype=np.float64)
        self._items = np.full((capacity, depth), _EMPTY, dtype=np.int32)
        self._scores = np.zeros((capacity, depth), dtype=np.float32)
        self._sources = np.zeros((capacity, depth), dtype=np.int16)
        self._source_table: list[tuple[str, ...]] = []
        self._source_index: dict[tuple[str, ...], int] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, pseudonym: object) -> bool:
        return pseudonym in self._rows

    def pseudonyms(self) -> list[str]:
        """Return the pseudonyms of every user with a list in the index."""
        return list(self._rows)

    def record(
        self,
        pseudonym: str,
        key: str,
        items: Sequence[RecommendedItem],
        item_row: Callable[[str], int | None],
        expires_at: float = math.inf,
    ) -> None:
        """Remember the list written for ``pseudonym`` under ``key``, expiring at ``expires_at``.

        ``expires_at`` is in epoch seconds, like the key's TTL in Redis.
        """
        row = self._rows.get(pseudonym)
        if row is None:
            row = self._allocate()
            self._rows[pseudonym] = row
        self._pseudonyms[row] = pseudonym
        self._keys[row] = key
        self._expires[row] = expires_at
        self._items[row] = _EMPTY
        position = 0
        for entry in items[: self.depth]:
            item = item_row(entry.item_id)
            if item is None:
                continue
            self._items[row, position] = item
            self._scores[row, position] = entry.score
            self._sources[row, position] = self._source_id(entry.sources)
            position += 1

    def forget(self, pseudonym: str) -> str | None:
        """Drop the list of ``pseudonym``; return its Redis key, or None when it had none."""
        row = self._rows.pop(pseudonym, None)
        if row is None:
            return None
        key = self._keys[row]
        self._items[row] = _EMPTY
        self._expires[row] = math.inf
        self._keys[row] = None
        self._pseudonyms[row] = None
        self._free.append(row)
        return key

    def expires_at(self, pseudonym: str) -> float:
        """Return when the list of ``pseudonym`` expires, in epoch seconds, or inf when unknown."""
        row = self._rows.get(pseudonym)
        return math.inf if row is None else float(self._expires[row])

    def expire(self, now_s: float) -> int:
        """Drop the lists whose Redis key has expired by ``now_s``; return how many."""
        used = len(self._keys)
        doomed = np.flatnonzero(self._expires[:used] <= now_s).tolist()
        count = 0
        for row in doomed:
            pseudonym = self._pseudonyms[row]
            if pseudonym is not None:
                self.forget(pseudonym)
                count += 1
        return count

    def holders(self, item_rows: Sequence[int]) -> npt.NDArray[np.int64]:
        """Return the rows whose list contains any of ``item_rows``."""
        used = len(self._keys)
        if not used or not item_rows:
            return np.zeros(0, dtype=np.int64)
        hits = np.isin(self._items[:used], np.asarray(item_rows, dtype=np.int32)).any(axis=1)
        return np.flatnonzero(hits)

    def rewrite(
        self,
        unavailable: Sequence[int],
        in_stock: npt.NDArray[np.bool_],
        item_ids: Sequence[str],
        k: int,
        computed_at: int,
        model_version: str,
    ) -> list[Rewritten]:
        """Rebuild every list that contains an item of ``unavailable``.

        Entries whose item is out of stock by ``in_stock`` are dropped and
        the spares below move up. A rebuilt list shorter than ``k`` is marked
        ``short`` so that the caller recomputes it with the models.
        """
        rows = self.holders(unavailable)
        if not len(rows):
            return []
        items = self._items[rows]
        valid = items != _EMPTY
        keep = valid & in_stock[np.where(valid, items, 0)]
        # A stable sort on "not kept" moves kept entries up in their order.
        order = np.argsort(~keep, axis=1, kind="stable")
        kept_counts = keep.sum(axis=1)
        items = np.take_along_axis(items, order, axis=1)
        scores = np.take_along_axis(self._scores[rows], order, axis=1)
        source_ids = np.take_along_axis(self._sources[rows], order, axis=1)
        items[np.arange(self.depth)[None, :] >= kept_counts[:, None]] = _EMPTY
        self._items[rows] = items
        self._scores[rows] = scores
        self._sources[rows] = source_ids

        out = []
        sources = [list(names) for names in self._source_table]
        shown = np.minimum(kept_counts, k).tolist()
        for row, count, row_items, row_scores, row_sources in zip(
            rows.tolist(),
            shown,
            items[:, :k].tolist(),
            scores[:, :k].tolist(),
            source_ids[:, :k].tolist(),
            strict=True,
        ):
            pseudonym, key = self._pseudonyms[row], self._keys[row]
            if pseudonym is None or key is None:
                continue
            # Scores were finite when recorded, so the value is built directly
            # rather than through RecommendationList, which checks each one.
            entries = [
                {"item_id": item_ids[item], "score": score, "sources": sources[source]}
                for item, score, source in zip(
                    row_items[:count], row_scores[:count], row_sources[:count], strict=True
                )
            ]
            value = {"items": entries, "computed_at": computed_at, "model_version": model_version}
            out.append(Rewritten(pseudonym, key, orjson.dumps(value), short=count < k))
        return out

    def _allocate(self) -> int:
        if self._free:
            return self._free.pop()
        row = len(self._keys)
        if row == len(self._items):
            self._grow(2 * row)
        self._keys.append(None)
        self._pseudonyms.append(None)
        return row

    def _grow(self, capacity: int) -> None:
        for name, fill in (("_items", _EMPTY), ("_scores", 0), ("_sources", 0)):
            old = getattr(self, name)
            grown = np.full((capacity, self.depth), fill, dtype=old.dtype)
            grown[: len(old)] = old
            setattr(self, name, grown)
        expires = np.full(capacity, math.inf, dtype=np.float64)
        expires[: len(self._expires)] = self._expires
        self._expires = expires

    def _source_id(self, sources: tuple[str, ...]) -> int:
        index = self._source_index.get(sources)
        if index is None:
            index = len(self._source_table)
            self._source_table.append(sources)
            self._source_index[sources] = index
        return index
