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

    Rows that are never negative are divided by their maximum, so a model's
    ratios survive; other rows are min-max scaled. Entries outside the mask
    come back as 0 and must stay ignored.

    >>> s = np.array([[2.0, 4.0, 0.0], [-1.0, 1.0, 3.0]])
    >>> m = np.array([[True, True, False], [True, True, True]])
    >>> normalize(s, m).tolist()
    [[0.5, 1.0, 0.0], [0.0, 0.5, 1.0]]
    """
    out = np.zeros_like(scores)
    for row in range(scores.shape[0]):
        chosen = mask[row]
        if not chosen.any():
            continue
        values = scores[row, chosen]
        low = float(values.min())
        high = float(values.max())
        if low >= 0:
            out[row, chosen] = values / high if high > 0 else 1.0
        elif high > low:
            out[row, chosen] = (values - low) / (high - low)
        else:
            out[row, chosen] = 1.0
    return out


def ranks(scores: FloatArray, mask: BoolMatrix) -> FloatArray:
    """Return each candidate's 1-based rank within each model's row; 0 outside the mask.

    >>> ranks(np.array([[0.2, 0.9, 0.5]]), np.array([[True, True, False]])).tolist()
    [[2.0, 1.0, 0.0]]
    """
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


class LearnedFusion:
    """A linear ranker over normalized model scores, learned from what users do next.

    Each candidate's features are, per model, its normalized score and a flag
    for the model having an opinion. After a user is served a list, the next
    item they touch, if it was a candidate, is a positive, and the candidates
    ranked above it are negatives: one pairwise logistic (BPR) step per pair.
    Cold and warm users have separate weights, both started from ``prior``.

    >>> fusion = LearnedFusion(["a", "b"], prior=np.array([1.0, 1.0]))
    >>> features = fusion.features(np.array([[1.0, 0.2], [0.0, 1.0]]),
    ...                            np.array([[True, True], [False, True]]))
    >>> fusion.update(features, positive=1, negatives=[0], cold=False)
    >>> bool(fusion.score(features, cold=False)[1] > fusion.score(features, cold=True)[1])
    True
    """

    def __init__(
        self,
        model_names: Sequence[str],
        prior: FloatArray,
        learning_rate: float = 0.05,
        l2: float = 1e-4,
        max_negatives: int = 5,
    ) -> None:
        if len(prior) != len(model_names):
            msg = f"prior has {len(prior)} weights for {len(model_names)} models; expected one each"
            raise ModelError(msg)
        self.model_names = list(model_names)
        self.learning_rate = learning_rate
        self.l2 = l2
        self.max_negatives = max_negatives
        start = np.concatenate([prior, np.zeros(len(prior))]).astype(np.float64)
        self.weights = {True: start.copy(), False: start.copy()}
        self.updates = {True: 0, False: 0}

    def features(self, normalized: FloatArray, mask: BoolMatrix) -> FloatArray:
        """Stack normalized scores and opinion flags into ``(2 * n_models, n_candidates)``."""
        return np.vstack([np.where(mask, normalized, 0.0), mask.astype(np.float64)])

    def score(self, features: FloatArray, cold: bool) -> FloatArray:
        """Return the fused score of each candidate."""
        return np.asarray(self.weights[cold] @ features, dtype=np.float64)

    def update(
        self, features: FloatArray, positive: int, negatives: Sequence[int], cold: bool
    ) -> None:
        """Take one pairwise step of the positive candidate against each negative."""
        if not negatives:
            return
        theta = self.weights[cold]
        chosen = list(negatives)[: self.max_negatives]
        difference = features[:, [positive]] - features[:, chosen]
        margin = theta @ difference
        gradient = difference @ (1.0 / (1.0 + np.exp(margin)))
        theta += self.learning_rate * (gradient / len(chosen) - self.l2 * theta)
        self.updates[cold] += 1

    def named_weights(self, cold: bool) -> dict[str, float]:
        """Return the score weight of each model, for reports."""
        theta = self.weights[cold]
        return {name: float(theta[i]) for i, name in enumerate(self.model_names)}
