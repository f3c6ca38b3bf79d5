"""The Task contract's declared hooks and the one batch-pytree walker, against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from influent.errors import UserError
from influent.task import Task, batch_leaves, batch_to, map_batch, slice_batch


class LogitsTask(Task):
    def model_output(self, model, batch):
        return model(batch["x"])


class LossOnlyTask(Task):
    def per_example_loss(self, model, batch):
        return batch.sum(1)


def nested():
    return {"b": (torch.arange(6).view(3, 2), [torch.ones(3)]), "a": torch.zeros(3, 1), "name": "kept"}


def test_walker_keeps_structure_and_order():
    batch = nested()
    doubled = map_batch(lambda t: t * 2, batch, other=lambda leaf: leaf)
    assert list(doubled) == ["b", "a", "name"] and isinstance(doubled["b"], tuple)
    assert isinstance(doubled["b"][1], list) and doubled["name"] == "kept"
    assert torch.equal(doubled["b"][0], torch.arange(6).view(3, 2) * 2)
    assert [t.shape for t in batch_leaves(batch)] == [(3, 2), (3,), (3, 1)]  # insertion order, str skipped
    assert [t.shape for t in batch_leaves(batch, sort_keys=True)] == [(3, 1), (3, 2), (3,)]
    with pytest.raises(TypeError, match="str"):
        slice_batch(batch, slice(0, 1))  # slicing a non-tensor leaf is refused
    rows = slice_batch({"x": torch.arange(5), "y": (torch.arange(5) * 10,)}, torch.tensor([4, 1]))
    assert rows["x"].tolist() == [4, 1] and rows["y"][0].tolist() == [40, 10]
    moved = batch_to(batch, "cpu")
    assert moved["name"] == "kept" and moved["a"].device.type == "cpu"
    assert Task().batch_size(batch) == 3


def test_token_mask_default_is_the_attention_mask():
    mask = torch.tensor([[1, 1, 0]])
    assert Task().token_mask({"input_ids": torch.ones(1, 3), "attention_mask": mask}) is mask
    assert Task().token_mask((torch.ones(1, 3), torch.ones(1))) is None
    assert Task().token_mask({"input_ids": torch.ones(1, 3)}) is None


def test_sampled_loss_default_draws_by_inverse_cdf():
    """p = softmax(logits) = (0.2, 0.8): u < 0.2 draws class 0, u >= 0.2 class 1; loss = -log p_y."""
    model = nn.Identity()
    logits = torch.log(torch.tensor([[0.2, 0.8]] * 3, dtype=torch.float64))
    loss = LogitsTask().sampled_loss(model, {"x": logits}, torch.tensor([0.1, 0.25, 0.99], dtype=torch.float64))
    torch.testing.assert_close(loss, torch.tensor([-math.log(0.2), -math.log(0.8), -math.log(0.8)], dtype=torch.float64))


def test_sampled_loss_needs_logits():
    with pytest.raises(UserError) as err:
        LossOnlyTask().sampled_loss(nn.Identity(), torch.ones(2, 2), torch.rand(2))
    assert err.value.field == "fisher"
