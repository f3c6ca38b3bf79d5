"""What influence numbers estimate: retraining ground truth (LOO cold/warm, PBRF, groups), LDS, validation."""

from influent.evaluation.cache import RetrainCache
from influent.evaluation.groundtruth import GroundTruth
from influent.evaluation.lds import lds, predicted_group_change, random_subsets
from influent.evaluation.metrics import correlations, relative_error
from influent.evaluation.pbrf import PBRF

__all__ = [
    "PBRF",
    "GroundTruth",
    "RetrainCache",
    "correlations",
    "lds",
    "predicted_group_change",
    "random_subsets",
    "relative_error",
]
