"""Item similarity from titles: items whose names share rare words."""

from __future__ import annotations

import itertools
import logging
import math
import re
from array import array
from typing import Any

import numpy as np

from models.base import (
    EventBatch,
    FloatArray,
    IntArray,
    ModelError,
    UserNeighbourScores,
    add_in_time_order,
    newest_items,
    pairs_in_time_order,
    sum_by_row,
)

logger = logging.getLogger(__name__)

# A word is a run of three or more letters. Digits, punctuation and shorter
# runs such as "of" or sizes like "6" would link too many unrelated items.
_WORD = re.compile(r"[^\W\d_]{3,}")


def title_words(title: str) -> list[str]:
    """Return the distinct words of a title, lower-cased and sorted.

    >>> title_words("ALARM CLOCK BAKELIKE PINK, alarm clock")
    ['alarm', 'bakelike', 'clock', 'pink']
    >>> title_words("SET OF 6 T-LIGHTS")
    ['lights', 'set']
    """
    return sorted(set(_WORD.findall(title.lower())))


class TitleModel(UserNeighbourScores):
    """Items whose titles share rare words with the items the user touched last.

    Two items are as similar as the cosine of their title words weighted by
    inverse document frequency, ``log((1 + n) / df)``, where n counts the
    items with a title and df those whose title has the word. A
    user is scored from their last ``recent_items`` distinct items, the item
    at position p (0 is the newest) weighing ``1 / (1 + p) ** recency_power``;
    an item is never its own neighbour.

    Titles arrive on events and item updates, and an item whose title
    changes is re-indexed. Scores read the word counts as they stand, so an
    item reaches lists with its first title. Only item norms, which scale an
    item's similarities to every other item, are kept: all of them are
    recomputed once the number of titled items has moved by
    ``norm_refresh_share`` since the last time. Between those times a new
    item gets its norm on arrival, and a changed title recomputes the norms
    of the items that share its old or new words. Words carried by more
    than ``max_word_items`` items link no items, because their weight is
    near 0 and scanning them costs time.

    Co-visitation links only items that were bought together. Titles also
    link a new item to the product line the user is buying, before anyone
    has bought both. On Online Retail invoices, the names of products in one
    line share words across stock-code families ("LUNCH BOX", "JUMBO BAG").

    >>> from schemas import Event
    >>> from models.engine import Recommender
    >>> engine = Recommender()
    >>> engine.learn([
    ...     Event("e1", "purchase", "u1", "a", 0, title="alarm clock pink"),
    ...     Event("e2", "purchase", "u2", "b", 1000, title="alarm clock red"),
    ...     Event("e3", "purchase", "u2", "c", 2000, title="lunch box"),
    ... ])
    >>> [engine.catalog.ids[row] for row in engine.models["title"].candidates("u1", 5)]
    ['b']
    """

    def __init__(
        self,
        recent_items: int = 5,
        recency_power: float = 2.0,
        max_word_items: int = 5_000,
        norm_refresh_share: float = 0.01,
    ) -> None:
        if recent_items < 1:
            msg = f"recent_items is {recent_items}; expected at least 1"
            raise ModelError(msg)
        if max_word_items < 1:
            msg = f"max_word_items is {max_word_items}; expected at least 1"
            raise ModelError(msg)
        if not norm_refresh_share >= 0:
            msg = f"norm_refresh_share is {norm_refresh_share}; expected a share >= 0"
            raise ModelError(msg)
        super().__init__()
        self.name = "title"
        self.recent_items = recent_items
        self.recency_power = recency_power
        self.max_word_items = max_word_items
        self.norm_refresh_share = norm_refresh_share
        self._vocabulary: dict[str, int] = {}
        self._postings: list[list[int]] = []
        self._item_words: dict[int, tuple[int, ...]] = {}
        self._norms = np.zeros(0, dtype=np.float64)
        self._norms_at = 0
        # Each user's last items with their event times, oldest first.
        # Each user's last items and their times, as `add_in_time_order` keeps them.
        self._recent: dict[str, array[int]] = {}

    @property
    def n_titled(self) -> int:
        """Number of items that have a title."""
        return len(self._item_words)

    def set_title(self, item: int, title: str) -> None:
        """Index item row ``item`` under the words of ``title``, replacing its old title.

        An empty title, or one without words, removes the item from the index.
        """
        words = tuple(self._word_id(word) for word in title_words(title))
        old = self._item_words.get(item)
        if old == words or (old is None and not words):
            # Nothing changes: the same words, or no words for an unindexed item.
            return
        self._version += 1
        if old is not None:
            for word in old:
                self._postings[word].remove(item)
        if words:
            for word in words:
                self._postings[word].append(item)
            self._item_words[item] = words
            if len(self._norms) <= item:
                grown = np.zeros(max(item + 1, 2 * len(self._norms), 16), dtype=np.float64)
                grown[: len(self._norms)] = self._norms
                self._norms = grown
        else:
            self._item_words.pop(item, None)
            if item < len(self._norms):
                self._norms[item] = 0.0
        if abs(self.n_titled - self._norms_at) > self.norm_refresh_share * self._norms_at:
            self._refresh_norms()
        elif old is None:
            self._norms[item] = self._norm(words)
        else:
            # A changed title moves the document frequency of its old and new
            # words, and with it the norm of every item that carries them.
            self._refresh_word_norms({*old, *words})
            if words:
                self._norms[item] = self._norm(words)

    def _word_id(self, word: str) -> int:
        word_id = self._vocabulary.get(word)
        if word_id is None:
            word_id = self._vocabulary[word] = len(self._postings)
            self._postings.append([])
        return word_id

    def _idf(self, word: int) -> float:
        return math.log((1 + self.n_titled) / len(self._postings[word]))

    def _norm(self, words: tuple[int, ...]) -> float:
        return math.sqrt(sum(self._idf(word) ** 2 for word in words))

    def _refresh_word_norms(self, words: set[int]) -> None:
        for word in words:
            posting = self._postings[word]
            if len(posting) > self.max_word_items:
                continue
            for item in posting:
                self._norms[item] = self._norm(self._item_words[item])

    def _refresh_norms(self) -> None:
        # Array operations, because a refresh covers the whole catalog, and a
        # catalog growing to a million titles is refreshed about 900 times.
        self._norms_at = self.n_titled
        if not self._item_words:
            return
        counts = np.fromiter(map(len, self._postings), dtype=np.float64, count=len(self._postings))
        squares = np.log((1 + self.n_titled) / np.maximum(counts, 1.0)) ** 2
        lengths = np.fromiter(map(len, self._item_words.values()), dtype=np.int64)
        words = np.fromiter(
            itertools.chain.from_iterable(self._item_words.values()),
            dtype=np.int64,
            count=int(lengths.sum()),
        )
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        items = np.fromiter(self._item_words.keys(), dtype=np.int64, count=len(lengths))
        self._norms[items] = np.sqrt(np.add.reduceat(squares[words], starts))
        logger.debug("recomputed title norms of %d items", self._norms_at)

    def learn(self, batch: EventBatch) -> None:
        """Track each user's last items.

        The engine indexes the titles that events carry before the batch
        reaches the models, in the order of the events' timestamps.
        """
        self._version += 1
        items = batch.items.tolist()
        weights = batch.weights.tolist()
        times = batch.times.tolist()
        for event, item, weight, time_ms in zip(batch.events, items, weights, times, strict=True):
            if weight <= 0:
                continue
            recent = self._recent.get(event.user_id)
            if recent is None:
                recent = self._recent[event.user_id] = array("q")
            add_in_time_order(recent, item, time_ms, self.recent_items)

    def __setstate__(self, state: dict[str, Any]) -> None:
        recent = state.get("_recent", {})
        for user_id, items in recent.items():
            recent[user_id] = pairs_in_time_order(items)
        self.__dict__.update(state)

    def user_items(self, user_id: str) -> list[int]:
        """Return the user's last items, newest first."""
        recent = self._recent.get(user_id)
        return [] if recent is None else newest_items(recent)

    def _compute_user_scores(self, user_id: str) -> tuple[IntArray, FloatArray]:
        parts: list[tuple[IntArray, FloatArray]] = []
        for position, source in enumerate(self.user_items(user_id)):
            words = self._item_words.get(source)
            if not words:
                continue
            norm = self._norm(words)
            if norm == 0.0:
                continue
            factor = 1.0 / ((1 + position) ** self.recency_power * norm)
            for word in words:
                posting = self._postings[word]
                if len(posting) > self.max_word_items:
                    continue
                idf = self._idf(word)
                rows = np.array(posting, dtype=np.int64)
                rows = rows[rows != source]
                parts.append((rows, np.full(len(rows), factor * idf * idf)))
        rows, scores = sum_by_row(parts)
        if len(rows):
            norms = self._norms[rows]
            keep = norms > 0
            rows = rows[keep]
            scores = scores[keep] / norms[keep]
        return rows, scores

    def forget_user(self, user_id: str) -> None:
        """Drop the user's last items. Titles contain no user id."""
        self._recent.pop(user_id, None)
        self._drop_kept_scores()

    def state_bytes(self) -> int:
        """Return an estimate: 100 bytes per word and indexed word, 100 per user, 16 per item."""
        indexed = sum(len(words) for words in self._item_words.values())
        recent = sum(100 + 8 * len(items) for items in self._recent.values())
        return 100 * (len(self._vocabulary) + 2 * indexed) + recent + self._norms.nbytes
