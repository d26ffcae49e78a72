"""Router auxiliary losses and routing metrics.

Shapes: T tokens, E experts, K experts per token. All inputs are the router's fp32 tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def expert_counts(expert_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, int64 [E]. scatter_add, not bincount: bincount on CUDA reads the
    max id back to the host to size its output, which would sync the GPU every layer."""
    flat = expert_ids_TK.reshape(-1)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts_E.scatter_add_(0, flat, torch.ones_like(flat))


def global_slot_fraction(expert_ids_TK: torch.Tensor, num_experts: int,
                         group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """f_e over the token-slots of every rank in `group` (no gradient: counts are constants)."""
    counts = torch.cat([expert_counts(expert_ids_TK, num_experts),
                        torch.tensor([expert_ids_TK.numel()], device=expert_ids_TK.device)])
    dist.all_reduce(counts, group=group)
    return counts[:num_experts].float() / counts[num_experts].clamp_min(1).float()


def load_balancing_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor,
                        f_E: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch Transformer / GShard loss E * sum_e f_e * P_e (1.0 when perfectly balanced).

    f_e: fraction of the T*K token-slots routed to e (before any capacity drop; no gradient),
    P_e: mean router probability of e over this rank's tokens (carries the gradient).
    Pass the global f_E (`global_slot_fraction`) under data/expert parallelism: with f_e from
    local tokens only, the loss and its gradient change with the number of ranks and the
    per-rank batch (the bugs of Megatron PR #5798 / DeepSpeed #5618). With global f_e, the
    average over ranks of this rank-local loss is exactly the loss of the global batch, and so
    is the averaged gradient.
    """
    num_experts = probs_TE.shape[-1]
    if f_E is None:
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
