"""Per-model normalization and the fusion strategies.

Fusion works on a score matrix of shape ``(n_models, n_candidates)`` with a
boolean mask of the same shape that marks which model has an opinion on which
candidate. Entries outside the mask are ignored by every strategy, so a model
without an opinion adds nothing to a candidate's fused score.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from models.base import FloatArray, ModelError

logger = logging.getLogger(__name__)

BoolMatrix = npt.NDArray[np.bool_]
FUSION_STRATEGIES = ("weighted", "rrf", "learned")
RRF_OFFSET = 60.0


def normalize(scores: FloatArray, mask: BoolMatrix) -> FloatArray:
    """Scale each model's row to [0, 1] over the candidates it scored.

    Rows that are never negative are divided by their maximum, which keeps a
    model's ratios. Other rows are min-max scaled. Entries outside the mask
    come back as 0 and must stay ignored.

    >>> s = np.array([[2.0, 4.0, 0.0], [-1.0, 1.0, 3.0]])
    >>> m = np.array([[True, True, False], [True, True, True]])
    >>> normalize(s, m).tolist()
    [[0.5, 1.0, 0.0], [0.0, 0.5, 1.0]]
    """
    low = np.where(mask, scores, np.inf).min(axis=1, initial=np.inf)
    high = np.where(mask, scores, -np.inf).max(axis=1, initial=-np.inf)
    never_negative = low >= 0
    # Min-max rows are scaled in halves, so that a span beyond the largest
    # double cannot overflow. Halving is exact, so the quotients are the same.
    offset = np.where(never_negative, 0.0, low / 2)
    span = np.where(never_negative, high, high / 2 - low / 2)
    halved = np.where(never_negative, 1.0, 0.5)
    # A row with nothing to scale by (all zero, or all equal and negative) gets 1.
    flat = ~(span > 0)
    with np.errstate(invalid="ignore"):
        values = (scores * halved[:, None] - offset[:, None]) / np.where(flat, 1.0, span)[:, None]
    values[flat] = 1.0
    return np.where(mask, values, 0.0)


def ranks(scores: FloatArray, mask: BoolMatrix) -> FloatArray:
    """Return each candidate's 1-based rank within each model's row; 0 outside the mask.

    >>> ranks(np.array([[0.2, 0.9, 0.5]]), np.array([[True, True, False]])).tolist()
    [[2.0, 1.0, 0.0]]
    """
    return ranks_with_subset(scores, mask, None)[0]


def ranks_with_subset(
    scores: FloatArray, mask: BoolMatrix, subset: npt.NDArray[np.bool_] | None
) -> tuple[FloatArray, FloatArray | None]:
    """Return `ranks` of the matrix and, from the same sort, the ranks among ``subset`` columns.

    The second result equals ``ranks(scores, mask & subset[None, :])``: a
    stable sort orders the columns of the subset among themselves as it
    orders them among all columns, so the rank within the subset is the
    count of subset columns up to each position. It is None when
    ``subset`` is None.

    >>> scores, mask = np.array([[0.2, 0.9, 0.5]]), np.ones((1, 3), dtype=bool)
    >>> full, among = ranks_with_subset(scores, mask, np.array([True, False, True]))
    >>> full.tolist(), among.tolist()
    ([[3.0, 1.0, 2.0]], [[2.0, 0.0, 1.0]])
    """
    if not np.isfinite(scores[mask]).all():
        # Infinite or NaN scores would tie with the entries left out.
        among = None if subset is None else _ranks_by_row(scores, mask & subset[None, :])
        return _ranks_by_row(scores, mask), among
    order = np.argsort(np.where(mask, -scores, np.inf), axis=1, kind="stable")
    rows = np.arange(scores.shape[0])[:, None]
    out = np.empty_like(scores)
    out[rows, order] = np.arange(1, scores.shape[1] + 1)
    out[~mask] = 0.0
    if subset is None:
        return out, None
    chosen = mask & subset[None, :]
    among = np.empty_like(scores)
    among[rows, order] = np.cumsum(chosen[rows, order], axis=1)
    among[~chosen] = 0.0
    return out, among


def _ranks_by_row(scores: FloatArray, mask: BoolMatrix) -> FloatArray:
    out = np.zeros_like(scores)
    for row in range(scores.shape[0]):
        chosen = np.flatnonzero(mask[row])
        order = chosen[np.argsort(-scores[row, chosen], kind="stable")]
        out[row, order] = np.arange(1, len(order) + 1, dtype=np.float64)
    return out


def weighted_fusion(normalized: FloatArray, mask: BoolMatrix, weights: FloatArray) -> FloatArray:
    """Sum each model's normalized score times its weight.

    >>> weighted_fusion(np.array([[1.0, 0.5]]), np.array([[True, True]]), np.array([2.0])).tolist()
    [2.0, 1.0]
    """
    return np.asarray(weights @ np.where(mask, normalized, 0.0), dtype=np.float64)


def rrf_fusion(rank_matrix: FloatArray, mask: BoolMatrix, weights: FloatArray) -> FloatArray:
    """Sum ``weight / (60 + rank)`` over the models that ranked each candidate.

    >>> fused = rrf_fusion(np.array([[1.0, 2.0]]), np.array([[True, True]]), np.array([1.0]))
    >>> fused.round(4).tolist()
    [0.0164, 0.0161]
    """
    contributions = np.where(mask, 1.0 / (RRF_OFFSET + rank_matrix), 0.0)
    return np.asarray(weights @ contributions, dtype=np.float64)


RANK_EDGES = np.array([1, 2, 3, 4, 6, 9, 14, 24, 49, 99], dtype=np.float64)
N_RANK_BUCKETS = len(RANK_EDGES) + 1
# Candidate groups: not touched by the user, touched in the current session,
# touched in an earlier session.
N_GROUPS = 3
# Weight of the prior hit rate of learned fusion, in served candidates.
PRIOR_SHOWN = 10.0


def rank_buckets(rank_matrix: FloatArray) -> npt.NDArray[np.int64]:
    """Map 1-based ranks to buckets 1, 2, 3, 4, 5–6, 7–9, …, 50–99, 100 and more.

    >>> rank_buckets(np.array([[1.0, 5.0, 6.0, 200.0]])).tolist()
    [[0, 4, 4, 10]]
    """
    return np.searchsorted(RANK_EDGES, rank_matrix, side="left").astype(np.int64)


class LearnedFusion:
    """Fusion by each model's observed hit rate, learned from what users do next.

    For every model, candidate group (see `N_GROUPS`) and rank bucket, the
    fusion counts how many candidates it served there and how many of them
    were the item the user touched next. A candidate's fused score is the sum,
    over the models that ranked it, of that observed rate, so each model
    counts as much as its ranks have been worth on this stream. Cold and warm
    users keep separate counts. Every rate starts from ``prior_rate`` with
    the weight of ``prior_shown`` candidates.

    >>> fusion = LearnedFusion(["a", "b"])
    >>> mask = np.array([[True, True], [True, False]])
    >>> rank_matrix = np.array([[1.0, 2.0], [1.0, 0.0]])
    >>> groups = np.zeros(2, dtype=np.int64)
    >>> for _ in range(20):
    ...     fusion.update(rank_matrix, mask, groups, target=1, cold=False)
    >>> scores = fusion.score(rank_matrix, mask, groups, cold=False)
    >>> bool(scores[1] > scores[0])
    True
    """

    def __init__(
        self,
        model_names: Sequence[str],
        prior_rate: float = 0.001,
        prior_shown: float = PRIOR_SHOWN,
    ) -> None:
        if not 0.0 < prior_rate < 1.0:
            msg = f"prior_rate is {prior_rate}; expected a rate in (0, 1)"
            raise ModelError(msg)
        self.model_names = list(model_names)
        self.prior_shown = prior_shown
        shape = (len(self.model_names), N_GROUPS, N_RANK_BUCKETS)
        self.hits = {cold: np.full(shape, prior_rate * prior_shown) for cold in (True, False)}
        self.shown = {cold: np.full(shape, prior_shown) for cold in (True, False)}
        self.group_hits = {cold: np.zeros(N_GROUPS, dtype=np.int64) for cold in (True, False)}
        self.updates = {True: 0, False: 0}

    def add_model(self, name: str, prior_rate: float) -> None:
        """Append a model whose counts start from the prior, after the existing ones."""
        # States written before the prior was stored used the default.
        prior_shown = getattr(self, "prior_shown", PRIOR_SHOWN)
        self.model_names.append(name)
        for cold in (True, False):
            row = np.full((1, N_GROUPS, N_RANK_BUCKETS), prior_shown)
            self.hits[cold] = np.concatenate([self.hits[cold], prior_rate * row])
            self.shown[cold] = np.concatenate([self.shown[cold], row])

    def rates(self, cold: bool) -> FloatArray:
        """Return the observed hit rates, shaped ``(n_models, N_GROUPS, N_RANK_BUCKETS)``."""
        return np.asarray(self.hits[cold] / self.shown[cold], dtype=np.float64)

    def score(
        self,
        rank_matrix: FloatArray,
        mask: BoolMatrix,
        groups: npt.NDArray[np.int64],
        cold: bool,
    ) -> FloatArray:
        """Return the fused score of each candidate: the sum of its models' hit rates."""
        rates = self.rates(cold)
        buckets = rank_buckets(rank_matrix)
        models = np.arange(len(self.model_names))[:, None]
        per_model = rates[models, groups[None, :], buckets]
        return np.asarray(np.where(mask, per_model, 0.0).sum(axis=0), dtype=np.float64)

    def update(
        self,
        rank_matrix: FloatArray,
        mask: BoolMatrix,
        groups: npt.NDArray[np.int64],
        target: int | None,
        cold: bool,
    ) -> None:
        """Count one served candidate set and the position of the item touched next, if any."""
        buckets = rank_buckets(rank_matrix)
        cells = groups[None, :] * N_RANK_BUCKETS + buckets
        size = N_GROUPS * N_RANK_BUCKETS
        shown = self.shown[cold].reshape(len(self.model_names), size)
        for model in range(len(self.model_names)):
            chosen = cells[model, mask[model]]
            if len(chosen):
                shown[model] += np.bincount(chosen, minlength=size)
        if target is not None:
            self.group_hits[cold][groups[target]] += 1
            hits = self.hits[cold].reshape(len(self.model_names), size)
            for model in np.flatnonzero(mask[:, target]).tolist():
                hits[model, cells[model, target]] += 1.0
        self.updates[cold] += 1

    def named_rates(self, cold: bool, group: int = 0) -> dict[str, list[float]]:
        """Return each model's hit rate per rank bucket for one candidate group, for reports."""
        rates = self.rates(cold)
        return {name: rates[i, group].tolist() for i, name in enumerate(self.model_names)}


class OrderSelector:
    """Per candidate group, the ordering that has ranked the users' next items better.

    Each policy is one way to order the candidates: a fusion strategy or a
    single model, and the first policy is the default. After every served
    candidate set, the selector credits each policy for the item the user
    touched next. A policy earns 1 if its order of the item's group would have
    put the item in the served top ``depth``, where the group keeps the slots
    that the default gave it. It earns 1 more if the item is among the first
    ``depth`` of its group alone, as in a list of items new to the user.

    A policy replaces the default in a group only once its summed lead in
    credit over the default exceeds ``z`` standard errors of that sum, so
    near ties keep the default. `reorder` then orders each group by its
    chosen policy and keeps the fused scores that the group already had, so
    the mix of groups in a list does not change. Cold and warm users keep
    separate counts.

    >>> selector = OrderSelector(["fused", "a"], depth=1, z=1.0)
    >>> keys = np.array([[2.0, 1.0], [1.0, 2.0]])
    >>> groups = np.zeros(2, dtype=np.int64)
    >>> for _ in range(3):
    ...     selector.record(keys, groups, target=1, cold=False)
    >>> selector.reorder(keys, keys[0], groups, cold=False).round(6).tolist()
    [1.0, 2.0]
    """

    def __init__(self, policy_names: Sequence[str], depth: int = 10, z: float = 2.0) -> None:
        if depth < 1:
            msg = f"depth is {depth}; expected at least 1"
            raise ModelError(msg)
        if not z >= 0:
            msg = f"z is {z}; expected a number of standard errors >= 0"
            raise ModelError(msg)
        self.policy_names = list(policy_names)
        self.depth = depth
        self.z = z
        shape = (N_GROUPS, len(self.policy_names))
        self.credit = {cold: np.zeros(shape) for cold in (True, False)}
        self.lead = {cold: np.zeros(shape) for cold in (True, False)}
        self.lead_squares = {cold: np.zeros(shape) for cold in (True, False)}

    def add_policy(self, name: str) -> None:
        """Append a policy with no credit yet, after the existing ones."""
        self.policy_names.append(name)
        for counts in (self.credit, self.lead, self.lead_squares):
            for cold in (True, False):
                counts[cold] = np.concatenate([counts[cold], np.zeros((N_GROUPS, 1))], axis=1)

    def record(
        self, keys: FloatArray, groups: npt.NDArray[np.int64], target: int, cold: bool
    ) -> None:
        """Credit each policy for where it would have ranked ``target``.

        ``keys`` has one row per policy, where higher is better and minus
        infinity means no opinion. Equal keys count the candidate at the lower position
        as ahead, as `Recommender.top_rows` orders ties by catalog row.
        """
        group = int(groups[target])
        in_group = groups == group
        positions = np.arange(keys.shape[1])
        served = np.lexsort((positions, -keys[0]))[: self.depth]
        slots = int(np.count_nonzero(groups[served] == group))

        own = keys[:, target][:, None]
        ahead = (keys > own) | ((keys == own) & (positions < target)[None, :])
        n_ahead = np.count_nonzero(ahead & in_group[None, :], axis=1)
        ranked = np.isfinite(keys[:, target])
        credit = (ranked & (n_ahead < slots)).astype(np.float64)
        credit += ranked & (n_ahead < self.depth)

        difference = credit - credit[0]
        self.credit[cold][group] += credit
        self.lead[cold][group] += difference
        self.lead_squares[cold][group] += difference * difference

    def choice(self, group: int, cold: bool) -> int:
        """Return the index of the policy chosen for ``group``, 0 unless another leads clearly."""
        lead = self.lead[cold][group]
        clear = lead > self.z * np.sqrt(self.lead_squares[cold][group])
        if not clear.any():
            return 0
        return int(np.argmax(np.where(clear, lead, -np.inf)))

    def reorder(
        self, keys: FloatArray, fused: FloatArray, groups: npt.NDArray[np.int64], cold: bool
    ) -> FloatArray:
        """Give each group's fused scores, highest first, to its members in the chosen order.

        Within a group, members that the chosen policy has no opinion on
        follow those it ranks, in fused order.
        """
        out = fused.copy()
        for group in np.unique(groups).tolist():
            policy = self.choice(group, cold)
            if policy == 0:
                continue
            members = np.flatnonzero(groups == group)
            order = members[np.lexsort((members, -fused[members], -keys[policy, members]))]
            out[order] = descending_values(fused[members])
        return out


def descending_values(values: FloatArray) -> FloatArray:
    """Return ``values`` sorted highest first, each strictly below the one before it.

    Equal scores would fall back to catalog order in top-k, so each value
    is nudged just below the one before it, by 1e-12 of the largest value.
    """
    ordered = np.sort(values)[::-1]
    scale = max(float(np.abs(ordered).max()), 1e-300) if len(ordered) else 1.0
    return ordered - scale * 1e-12 * np.arange(len(ordered))
