"""The Combine step as pure functions: ``w_k = sum_l A[l, k] * phi_l`` over agent k's neighbourhood."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from dif_maml_dist.graphs.weights import CombinePlan


def combine(plan: CombinePlan, own: Tensor, received: Mapping[int, Tensor]) -> Tensor:
    """Agent ``plan.agent``'s combined state from its own ``phi`` and its neighbours' (keyed by agent id).

    Terms are added in ascending agent id (own state at its own position), a fixed order that any other
    implementation (the simulator) can reproduce exactly, so results can be compared bit for bit.
    """
    missing = set(plan.neighbors) - set(received)
    assert not missing, f"agent {plan.agent}: no state received from neighbours {sorted(missing)}"
    terms = [(plan.agent, plan.self_weight, own)]
    terms += [(l, w, received[l]) for l, w in zip(plan.neighbors, plan.neighbor_weights)]
    terms.sort(key=lambda term: term[0])
    out = torch.zeros_like(own)
    for _, weight, state in terms:
        out.add_(state, alpha=weight)
    return out

