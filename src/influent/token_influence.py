"""Token-wise influence: each position's share of a training sequence's factored-influence score.

For a tracked linear module the per-example gradient is ``G_i = sum_t g_it a_it^T`` (output gradient times
input activation at position ``t``, :mod:`influent.curvature.linear_grads`), so the score
``sum_m <P_q,m, G_i,m>`` with the preconditioned query gradient ``P_q = (F + damping)^-1 g_q`` splits exactly
into per-position terms ``s_it = sum_m g_it,m^T P_q,m a_it,m`` that sum to the sequence score (the
decomposition of kronfluence's ``compute_per_token_scores``). Padded positions are masked out and score 0.

The preconditioned query gradients come from the protocol
(:meth:`FactoredInfluence.preconditioned_query_gradients`); the same function scores any subset of
training sequences (candidates) against factors fitted on the whole training set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from influent.curvature.linear_grads import LinearCapture, select_linear_modules
from influent.factored_influence import FactoredInfluence
from influent.influence import Queries
from influent.task import Batch


def token_scores(
    method: FactoredInfluence, queries: Queries, batches: Sequence[Batch]
) -> list[torch.Tensor]:
    """Per training example of ``batches`` (in order), its per-position scores ``[Q, T_b]`` (float64).

    ``T_b`` is the width of the example's batch (positions past its end are padding and score 0); the sum
    over positions is the example's :meth:`~FactoredInfluence.pairwise_scores` entry (same sign and
    units: positive = proponent; divide by ``n_train`` for the predicted loss change).
    """
    precond = method.preconditioned_query_gradients(queries)
    model, task = method.model, method.task
    linear = select_linear_modules(model, "all")
    modules = {name: linear[name] for name in precond}
    device = next(iter(modules.values())).weight.device
    out: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), LinearCapture(modules) as cap:
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                cap.set_mask(task.token_mask(batch))
                loss = task.per_example_loss(model, batch)
                total = None
                for name, a, g in cap.backward(loss):
                    with torch.no_grad():
                        p = precond[name].to(dtype=g.dtype)
                        # s[q, b, t] = sum_o,i g[b, t, o] P[q, o, i] a[b, t, i]
                        term = torch.einsum("bto,qoi,bti->qbt", g, p, a).double()
                    total = term if total is None else total + term
                out.extend(total[:, b].cpu() for b in range(total.shape[1]))
    finally:
        model.train(was_training)
    return out
