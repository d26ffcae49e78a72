"""Router auxiliary losses and routing metrics.

Shapes: T tokens, E experts, K experts per token. All inputs are the router's fp32 tensors.
"""

from __future__ import annotations

import torch


def expert_counts(expert_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, int64 [E]. scatter_add, not bincount: bincount on CUDA reads the
    max id back to the host to size its output, which would sync the GPU every layer."""
    flat = expert_ids_TK.reshape(-1)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts_E.scatter_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch Transformer / GShard loss E * sum_e f_e * P_e (1.0 when perfectly balanced).

    f_e: fraction of the T*K token-slots routed to e (before any capacity drop; no gradient),
    P_e: mean router probability of e (carries the gradient).
    """
    num_experts = probs_TE.shape[-1]
    f_E = expert_counts(expert_ids_TK, num_experts).to(probs_TE.dtype) / expert_ids_TK.numel()
    p_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(f_E * p_E)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean_t logsumexp(logits_t)^2."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy (nats) of the router softmax; log(E) = uniform, 0 = one-hot."""
    # xlogy gives 0 * log(0) = 0 for probabilities that underflowed to zero.
    return -torch.special.xlogy(probs_TE, probs_TE).sum(dim=-1).mean()
