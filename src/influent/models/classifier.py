"""What the classifiers in :mod:`influent.models` share: the accuracy of predicted classes.

Each model kind has its own ``accuracy`` (the head on features, the fine-tuned classifier on token batches,
the suffix classifier on cached hidden states); all of them count through :func:`fraction_correct`.
"""

from __future__ import annotations

import numpy as np
import torch


def fraction_correct(predicted: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Share of positions where ``predicted`` equals ``labels`` (both ``[n]`` class indices); NaN when empty."""
    predicted, labels = torch.as_tensor(predicted), torch.as_tensor(labels)
    if predicted.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predicted.shape)} and labels {tuple(labels.shape)} differ in shape")
    return float((predicted == labels).double().mean())
