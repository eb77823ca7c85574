"""Draws keyed by stable ids: the same in every run, whatever the batches or item rows."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.base import ItemCatalog, ModelError, stable_hash, stable_hashes
from models.engine import EngineConfig, Recommender
from models.sampling import KeyedSampler, keyed_normals, keyed_uniforms
from schemas import Event


def test_stable_hash_is_a_fixed_value():
    # Checkpoints hold vectors drawn from these hashes, so a change of the
    # hash function would change every model restored from one.
    assert stable_hash("item-1") == 8406168460641299428
    assert stable_hash("item-1") != stable_hash("item-2")
    assert stable_hash("") != stable_hash("", salt=1)


@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=50), st.integers(1, 8))
def test_uniforms_depend_only_on_their_key(keys, count):
    array = np.array(keys, dtype=np.uint64)
    draws = keyed_uniforms(array, count)
    assert draws.shape == (len(keys), count)
    assert ((draws >= 0.0) & (draws < 1.0)).all()
    reversed_draws = keyed_uniforms(array[::-1], count)
    assert np.array_equal(reversed_draws[::-1], draws)


def test_normals_are_finite_with_given_scale():
    draws = keyed_normals(np.arange(50_000, dtype=np.uint64), 2, scale=0.1)
    assert np.isfinite(draws).all()
    assert abs(float(draws.std()) - 0.1) < 0.005


def test_sampler_ignores_row_order():
    ids = [f"item-{n}" for n in range(200)]
    keys = np.arange(1000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    first, second = KeyedSampler(), KeyedSampler()
    first.rebuild(stable_hashes(ids))
    shuffled = list(reversed(ids))
    second.rebuild(stable_hashes(shuffled))
    drawn_first = [ids[row] for row in first.draw(keys, 2).ravel()]
    drawn_second = [shuffled[row] for row in second.draw(keys, 2).ravel()]
    assert drawn_first == drawn_second


def test_sampler_new_item_moves_few_draws():
    ids = [f"item-{n}" for n in range(500)]
    keys = np.arange(5000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    before, after = KeyedSampler(), KeyedSampler()
    before.rebuild(stable_hashes(ids))
    after.rebuild(stable_hashes([*ids, "item-new"]))
    moved = np.count_nonzero(before.draw(keys, 1) != after.draw(keys, 1))
    assert moved < 0.02 * len(keys)


def test_sampler_follows_weights():
    sampler = KeyedSampler()
    sampler.rebuild(stable_hashes(["light", "heavy"]), np.array([1.0, 30.0]))
    rows = sampler.draw(np.arange(4000, dtype=np.uint64) * np.uint64(7919), 1).ravel()
    assert np.count_nonzero(rows == 1) > 0.8 * len(rows)


def test_empty_sampler_raises():
    with pytest.raises(ModelError, match="no items"):
        KeyedSampler().draw(np.zeros(1, dtype=np.uint64), 1)


def test_catalog_hashes_follow_ids():
    catalog = ItemCatalog()
    catalog.add("b")
    catalog.add("a")
    assert catalog.hashes.tolist() == [stable_hash("b"), stable_hash("a")]


def test_mf_new_vectors_do_not_depend_on_rows():
    # With a learning rate of 0 the tables keep their initial vectors.
    config = EngineConfig(mf_learning_rate=0.0)
    first, second = Recommender(config), Recommender(config)
    first.learn([Event("e1", "view", "u1", "x", 0), Event("e2", "view", "u2", "y", 1)])
    second.learn([Event("e2", "view", "u2", "y", 1), Event("e1", "view", "u1", "x", 0)])
    for item in ("x", "y"):
        first_row, second_row = first.catalog.index[item], second.catalog.index[item]
        first_vector = first.models["mf"].item_factors()[first_row]
        second_vector = second.models["mf"].item_factors()[second_row]
        assert np.array_equal(first_vector, second_vector), item
    for user in ("u1", "u2"):
        first_vector = first.models["mf"].user_vector(user)
        second_vector = second.models["mf"].user_vector(user)
        assert np.array_equal(first_vector, second_vector), user
