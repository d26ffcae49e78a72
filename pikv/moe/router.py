"""Routers: which experts see which tokens, and with what gate weight.

Shapes: T tokens, H hidden, E experts, K experts per token, C tokens per expert (expert choice).

Every router owns `gate` = nn.Linear(H, E, bias=False) (Mixtral's `gate.weight` [E, H]) and runs
its math in fp32 with autocast disabled: bf16 logits (8-bit mantissa) flip near-tied top-k
choices between otherwise identical runs and make softmax / z-loss noisy ("selective precision",
Switch Transformer sec. 2.4; ST-MoE). The gate is tiny (H x E), so fp32 costs nothing.

Token-choice routers (`expert_choice = False`) return
    (weights_TK fp32, expert_ids_TK int64, logits_TE fp32, probs_TE fp32)
and the expert-choice router (`expert_choice = True`) returns
    (weights_EC fp32, token_ids_EC int64, logits_TE fp32, probs_TE fp32).
probs_TE is a distribution over experts per token (rows sum to 1): it feeds the load-balancing
loss and the router-entropy metric. `deterministic=True` removes all noise and breaks ties
towards the lower expert index (token choice) / lower token index (expert choice): torch.topk
gives no tie-breaking guarantee, a stable sort does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pikv.config import OptionError

ROUTERS = ("softmax_topk", "sigmoid_topk", "noisy_topk", "expert_choice", "sinkhorn")
# Routers whose output for a token depends on that token alone (given the weights and, for
# sigmoid_topk, the bias); expert_choice and (in training) sinkhorn look at the whole batch.
PER_TOKEN_ROUTERS = ("softmax_topk", "sigmoid_topk", "noisy_topk")


def topk(scores: torch.Tensor, k: int, deterministic: bool):
    """Top-k along the last dim -> (values, indices); deterministic: ties -> lower index."""
    if deterministic:
        values, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        return values[..., :k], order[..., :k]
    return torch.topk(scores, k, dim=-1)


@torch.no_grad()
def sinkhorn(logits_TE: torch.Tensor, iterations: int, eps: float = 1e-8) -> torch.Tensor:
    """Megatron-LM `moe_utils.sinkhorn`: scale exp(logits) as diag(d0) exp(logits) diag(d1) so
    rows sum to 1/T and columns to 1/E (a balanced soft assignment, BASE layers).

    Megatron iterates `while error > tol`, reading the error back to the host every iteration
    (a GPU sync each time); a fixed iteration count keeps the forward sync-free. Subtracting the
    row max first only rescales rows, which d0 absorbs (identical iterates), and avoids exp
    overflow for large logits. No gradient: the result only chooses the experts.
    """
    cost_TE = torch.exp(logits_TE - logits_TE.amax(dim=-1, keepdim=True))
    T, E = cost_TE.shape
    d1_E = torch.ones(E, device=cost_TE.device, dtype=cost_TE.dtype)
    d0_T = torch.ones(T, device=cost_TE.device, dtype=cost_TE.dtype)
    for _ in range(iterations):
        d0_T = 1.0 / (T * (cost_TE @ d1_E + eps))
        d1_E = 1.0 / (E * (d0_T @ cost_TE + eps))
    return d0_T.unsqueeze(1) * cost_TE * d1_E


class TokenChoiceTopKRouter(nn.Module):
    """softmax over all E experts, keep the top K, optionally renormalise the K weights to sum 1
    (Mixtral / GShard), times `route_scale` (torchtitan; 1.0 = Mixtral)."""

    expert_choice = False
    # True: `update_bias(global tokens per expert, rate)` must run after every optimizer step
    # (the trainer's RouterHook, pikv/training/hooks.py).
    updates_bias_after_step = False

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 renormalize: bool = True, deterministic: bool = False, route_scale: float = 1.0):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.deterministic = deterministic
        self.route_scale = route_scale
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)

    def logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        """fp32 router logits [T, E]; call with autocast disabled."""
        return F.linear(x_TH.float(), self.gate.weight.float())

    def _finish(self, topk_TK: torch.Tensor) -> torch.Tensor:
        if self.renormalize:
            topk_TK = topk_TK / topk_TK.sum(dim=-1, keepdim=True)
        return topk_TK * self.route_scale if self.route_scale != 1.0 else topk_TK

    def forward(self, x_TH: torch.Tensor):
        """Returns (weights_TK fp32, expert_ids_TK int64, logits_TE fp32, probs_TE fp32)."""
        # fp32 under bf16 autocast: see the module docstring.
        with torch.autocast(device_type=x_TH.device.type, enabled=False):
            logits_TE = self.logits(x_TH)
            probs_TE = torch.softmax(logits_TE, dim=-1)
            topk_TK, expert_ids_TK = topk(probs_TE, self.top_k, self.deterministic)
            topk_TK = self._finish(topk_TK)
        return topk_TK, expert_ids_TK, logits_TE, probs_TE


class NoisyTopKRouter(TokenChoiceTopKRouter):
    """Noisy top-k gating (Shazeer et al. 2017, eq. 4): in training the logits get
    StandardNormal * softplus(x W_noise) (`noise` = nn.Linear(H, E), trained through the chosen
    experts' gate weights), then softmax top-k as `TokenChoiceTopKRouter` (renormalize=True is
    the paper's softmax over the kept K logits). No noise in eval or when deterministic.

    `generator`: an optional torch.Generator (on the input's device) for the noise draws.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, **kwargs):
        super().__init__(hidden_size, num_experts, top_k, **kwargs)
        self.noise = nn.Linear(hidden_size, num_experts, bias=False)
        self.generator: Optional[torch.Generator] = None

    def logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        logits_TE = super().logits(x_TH)
        if not self.training or self.deterministic:
            return logits_TE
        std_TE = F.softplus(F.linear(x_TH.float(), self.noise.weight.float()))
        eps_TE = torch.randn(logits_TE.shape, generator=self.generator, device=logits_TE.device,
                             dtype=logits_TE.dtype)
        return logits_TE + eps_TE * std_TE


class SigmoidTopKRouter(TokenChoiceTopKRouter):
    """DeepSeek-V3 (sec. 2.1.2): scores = sigmoid(logits); the top K of scores + expert_bias are
    chosen, their gate weights are the unbiased scores (normalised to sum 1 if `renormalize`)
    times `route_scale`. The bias is a buffer (saved in checkpoints, never touched by autograd
    or the optimizer), moved by `update_bias` (auxiliary-loss-free load balancing).

    probs_TE = scores / sum(scores) (Megatron's scores for the aux loss with sigmoid routing).
    """

    updates_bias_after_step = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, **kwargs):
        super().__init__(hidden_size, num_experts, top_k, **kwargs)
        self.register_buffer("expert_bias", torch.zeros(num_experts))

    def forward(self, x_TH: torch.Tensor):
        with torch.autocast(device_type=x_TH.device.type, enabled=False):
            logits_TE = self.logits(x_TH)
            scores_TE = torch.sigmoid(logits_TE)
            # The bias decides the choice only (fp32 even if the module was cast to bf16).
            _, expert_ids_TK = topk(scores_TE.detach() + self.expert_bias.float(), self.top_k,
                                    self.deterministic)
            topk_TK = self._finish(scores_TE.gather(1, expert_ids_TK))
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        return topk_TK, expert_ids_TK, logits_TE, probs_TE

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor, rate: float) -> None:
        """bias_e += rate * sign(mean load - load_e), in place (DeepSeek-V3 sec. 2.1.2, gamma =
        rate). Call after each optimizer step with the GLOBAL token counts of the step, so every
        rank applies the same update."""
        load_E = tokens_per_expert_E.detach().to(self.expert_bias.device, torch.float32)
        self.expert_bias.add_(torch.sign(load_E.mean() - load_E).to(self.expert_bias.dtype), alpha=rate)


class SinkhornRouter(TokenChoiceTopKRouter):
    """Megatron-LM's `sinkhorn_load_balancing` (BASE layers, Lewis et al. 2021): in training the
    top K experts of the Sinkhorn-balanced exp(logits) are chosen (no gradient through the
    balancing); in eval, the top K of the activation. Gate weights = activation(logits) of the
    chosen experts: sigmoid for K = 1, softmax over all E for K > 1, not renormalised (Megatron),
    times `route_scale`. probs_TE = softmax(logits).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 sinkhorn_iterations: int = 30, **kwargs):
        super().__init__(hidden_size, num_experts, top_k, **kwargs)
        self.sinkhorn_iterations = sinkhorn_iterations

    def forward(self, x_TH: torch.Tensor):
        with torch.autocast(device_type=x_TH.device.type, enabled=False):
            logits_TE = self.logits(x_TH)
            probs_TE = torch.softmax(logits_TE, dim=-1)
            act_TE = torch.sigmoid(logits_TE) if self.top_k == 1 else probs_TE
            choose_TE = (sinkhorn(logits_TE.detach(), self.sinkhorn_iterations) if self.training
                         else act_TE.detach())
            _, expert_ids_TK = topk(choose_TE, self.top_k, self.deterministic)
            topk_TK = act_TE.gather(1, expert_ids_TK)
            if self.route_scale != 1.0:
                topk_TK = topk_TK * self.route_scale
        return topk_TK, expert_ids_TK, logits_TE, probs_TE


class ExpertChoiceRouter(TokenChoiceTopKRouter):
    """Expert choice (Zhou et al. 2022): scores = softmax over experts per token; each expert
    takes its top C tokens, C = min(T, ceil(capacity_factor * T * K / E)); the gate weight of a
    (token, expert) pair is the token's score for that expert (times `route_scale`). A token may
    get 0..E experts; one picked by none passes through the residual only.
    """

    expert_choice = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 capacity_factor: Optional[float] = None, **kwargs):
        kwargs.pop("renormalize", None)  # per-token renormalisation has no meaning here
        super().__init__(hidden_size, num_experts, top_k, renormalize=False, **kwargs)
        self.capacity_factor = 1.0 if capacity_factor is None else capacity_factor

    def capacity(self, num_tokens: int) -> int:
        """Tokens per expert C."""
        return min(num_tokens, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x_TH: torch.Tensor):
        """Returns (weights_EC fp32, token_ids_EC int64, logits_TE fp32, probs_TE fp32)."""
        with torch.autocast(device_type=x_TH.device.type, enabled=False):
            logits_TE = self.logits(x_TH)
            probs_TE = torch.softmax(logits_TE, dim=-1)
            weights_EC, token_ids_EC = topk(probs_TE.t(), self.capacity(x_TH.shape[0]), self.deterministic)
            if self.route_scale != 1.0:
                weights_EC = weights_EC * self.route_scale
        return weights_EC, token_ids_EC, logits_TE, probs_TE


_ROUTER_CLASSES = {"softmax_topk": TokenChoiceTopKRouter, "sigmoid_topk": SigmoidTopKRouter,
                   "noisy_topk": NoisyTopKRouter, "expert_choice": ExpertChoiceRouter,
                   "sinkhorn": SinkhornRouter}


def check_router(name: str, *, route_scale: float = 1.0, sinkhorn_iterations: int = 30) -> None:
    """The rules of `build_router`'s arguments (OptionError, a ValueError naming the argument)."""
    if name not in _ROUTER_CLASSES:
        raise OptionError("router", name, f"is not supported; allowed routers: {', '.join(ROUTERS)}")
    if isinstance(route_scale, bool) or not isinstance(route_scale, (int, float)) \
            or not math.isfinite(route_scale) or route_scale <= 0:
        raise OptionError("route_scale", route_scale, "must be a finite number > 0")
    if isinstance(sinkhorn_iterations, bool) or not isinstance(sinkhorn_iterations, int) \
            or sinkhorn_iterations < 1:
        raise OptionError("sinkhorn_iterations", sinkhorn_iterations, "must be an integer >= 1")


def build_router(name: str, hidden_size: int, num_experts: int, top_k: int, *,
                 renormalize: bool = True, deterministic: bool = False, route_scale: float = 1.0,
                 capacity_factor: Optional[float] = None, sinkhorn_iterations: int = 30) -> nn.Module:
    """Router `name` (one of ROUTERS). `renormalize` applies to softmax_topk, noisy_topk and
    sigmoid_topk; `capacity_factor` sets C for expert_choice (None -> 1.0);
    `sinkhorn_iterations` is for sinkhorn. Bad values raise ValueError (`check_router`)."""
    check_router(name, route_scale=route_scale, sinkhorn_iterations=sinkhorn_iterations)
    kwargs = dict(renormalize=bool(renormalize), deterministic=bool(deterministic),
                  route_scale=float(route_scale))
    if name == "expert_choice":
        kwargs["capacity_factor"] = capacity_factor
    if name == "sinkhorn":
        kwargs["sinkhorn_iterations"] = sinkhorn_iterations
    return _ROUTER_CLASSES[name](hidden_size, num_experts, top_k, **kwargs)
