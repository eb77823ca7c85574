"""The cell index of large item tables and its use by matrix factorization."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from models.base import ModelError
from models.engine import EngineConfig, Recommender
from models.retrieval import CellIndex, cells_for
from schemas import Event

T0 = 1_700_000_000_000


def _table(n: int = 6000, factors: int = 8, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, factors)).astype(np.float32)


def _exact(table: np.ndarray, query: np.ndarray, n: int) -> list[int]:
    rows = np.arange(len(table))
    scores = table @ query
    return rows[np.lexsort((rows, -scores))[:n]].tolist()


def test_index_full_budget_is_exact() -> None:
    table = _table()
    index = CellIndex(table, scan_items=len(table))
    assert index.n_cells == cells_for(len(table)) == 6
    for query in table[:20]:
        assert index.search(table, query, 25).tolist() == _exact(table, query, 25)


def test_index_cells_cover_rows_once() -> None:
    table = _table()
    index = CellIndex(table, scan_items=1000)
    assert sorted(index.order.tolist()) == list(range(len(table)))
    assert index.offsets[0] == 0
    assert index.offsets[-1] == len(table)
    assert (index.vectors == table[index.order]).all()


def test_index_finds_updated_vector() -> None:
    table = _table()
    index = CellIndex(table, scan_items=len(table))
    query = table[3]
    table[4000] = 50.0 * query
    assert index.search(table, query, 1).tolist() != [4000]
    index.update(table, np.array([4000, 7, 4000]))
    assert index.search(table, query, 1).tolist() == [4000]


def test_index_scans_rows_added_later() -> None:
    table = _table()
    index = CellIndex(table[:5000], scan_items=1)
    query = table[0]
    table[5500] = 100.0 * query
    assert index.search(table, query, 1).tolist() == [5500]
    # Rows past the indexed ones are ignored by update.
    index.update(table, np.array([5500]))
    assert len(index.position) == 5000


def test_index_budget_scans_best_cell() -> None:
    table = _table()
    index = CellIndex(table, scan_items=1)
    query = table[11]
    # With the budget of one item, only the best cell is scanned, so every
    # result lies in it.
    best = int(np.argmax(index.centres @ query))
    members = set(index.order[index.offsets[best] : index.offsets[best + 1]].tolist())
    assert set(index.search(table, query, 10).tolist()) <= members


def test_index_rejects_empty_budget() -> None:
    with pytest.raises(ModelError, match="scan_items is 0"):
        CellIndex(_table(100), scan_items=0)


def _views(n_items: int, start: int = 0) -> list[Event]:
    return [
        Event(f"e{i}", "view", f"u{i % 7}", f"i{i}", T0 + 1000 * i)
        for i in range(start, start + n_items)
    ]


def test_mf_index_rebuilds_on_growth() -> None:
    # Learned fusion would score, and so build the index, in the middle of a batch.
    config = EngineConfig(mf_index_min_items=300, mf_index_scan_items=100_000, fusion_learn_every=0)
    engine = Recommender(config)
    engine.learn(_views(200))
    mf = engine.models["mf"]
    mf.candidates("u1", 10)
    assert mf._index is None

    engine.learn(_views(200, start=200))
    found = mf.candidates("u1", 10)
    index = mf._index
    assert index is not None
    assert index.built_items == 400
    # The budget covers every cell, so the index gives the exact scan.
    table = mf.item_factors()
    assert found.tolist() == _exact(table, mf.user_vector("u1"), 10)

    engine.learn(_views(30, start=400))
    mf.candidates("u1", 10)
    assert mf._index is index
    engine.learn(_views(20, start=430))
    mf.candidates("u1", 10)
    assert mf._index is not index
    assert mf._index.built_items == 450


def test_mf_index_ignores_query_timing() -> None:
    # A scan budget below the catalog makes the result depend on the cells.
    config = EngineConfig(mf_index_min_items=1000, mf_index_scan_items=200, fusion_learn_every=0)
    served, idle = Recommender(config), Recommender(config)
    # The last views grow the catalog too little for a rebuild, so the served
    # engine keeps the cells built at 2,000 items.
    for start, n_items in ((0, 1000), (1000, 1000), (2000, 100)):
        served.learn(_views(n_items, start=start))
        idle.learn(_views(n_items, start=start))
        served.models["mf"].candidates("u2", 10)
    restored = pickle.loads(pickle.dumps(served))
    users = ["u1", "u2", "u3"]
    for engine in (idle, restored):
        for user in users:
            expected = served.models["mf"].candidates(user, 10).tolist()
            assert engine.models["mf"].candidates(user, 10).tolist() == expected


def test_index_pickle_omits_vector_copy() -> None:
    table = _table()
    index = CellIndex(table, scan_items=1000)
    state = index.__getstate__()
    assert "vectors" not in state
    assert "position" not in state
    restored = pickle.loads(pickle.dumps(index))
    restored.attach(table)
    assert (restored.vectors == index.vectors).all()
    expected = index.search(table, table[9], 10).tolist()
    assert restored.search(table, table[9], 10).tolist() == expected
