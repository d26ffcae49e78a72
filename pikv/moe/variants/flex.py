"""Flex-MoE's sparse MoE layer (Yun et al., NeurIPS 2024, sec. 3.3): one router, two modes.

G-Router: tokens of samples with every modality are routed by the plain softmax top-k gate (and
train the experts in a balanced way through the load-balancing loss).
S-Router: tokens of a sample with modality combination c get expert c as their top-1 expert
(fixed, "the expert of the observed modality combination"); the other K-1 are the gate's best
remaining experts. Gate weights are the router probabilities of the chosen experts,
renormalised like the G-Router's, so the gate still learns from S-routed tokens.

Everything after the router (dispatch, expert parallelism, combine, losses, metrics) is
MoELayer's, so the layer shards and runs under EP exactly like the base layer.

Shapes: T tokens, E experts, K experts per token, C = 2^M - 1 modality combinations.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from pikv.config import OptionError
from pikv.moe.layer import (_BASE_OPTIONS, MOE_BUILDERS, MOE_CHECKS, MOE_OPTIONS, MoELayer, _build_base,
                             _check_base, positive_int)
from pikv.moe.router import TokenChoiceTopKRouter, topk


class FlexRouter(TokenChoiceTopKRouter):
    """Softmax top-k (G-Router) plus the S-Router override for tokens whose `combo_T` is not the
    full combination. `combo_T` is set by FlexMoELayer right before each forward."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, full_combo: int,
                 specialized: bool, **options: Any):
        super().__init__(hidden_size, num_experts, top_k, **options)
        self.full_combo, self.specialized = full_combo, specialized
        self.combo_T: Optional[torch.Tensor] = None

    def forward(self, x_TH: torch.Tensor):
        weights_TK, expert_ids_TK, logits_TE, probs_TE = super().forward(x_TH)
        combo_T, self.combo_T = self.combo_T, None  # consumed by this forward only
        if combo_T is None or not self.specialized:
            return weights_TK, expert_ids_TK, logits_TE, probs_TE
        with torch.autocast(device_type=x_TH.device.type, enabled=False):
            fixed_T1 = combo_T.unsqueeze(1)
            # The fixed expert is taken out of the race for the remaining K-1 slots.
            _, rest_TK1 = topk(probs_TE.scatter(1, fixed_T1, -1.0), self.top_k - 1, self.deterministic)
            s_ids_TK = torch.cat([fixed_T1, rest_TK1], dim=1)
            s_weights_TK = self._finish(probs_TE.gather(1, s_ids_TK))
            special_T1 = (combo_T != self.full_combo).unsqueeze(1)
            expert_ids_TK = torch.where(special_T1, s_ids_TK, expert_ids_TK)
            weights_TK = torch.where(special_T1, s_weights_TK, weights_TK)
        return weights_TK, expert_ids_TK, logits_TE, probs_TE


class FlexMoELayer(MoELayer):
    """MoELayer whose forward also takes each token's modality-combination index."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int, *,
                 num_modalities: int, specialized_routing: bool, router: str = "softmax_topk",
                 renormalize: bool = True, deterministic: bool = False, route_scale: float = 1.0,
                 **options: Any):
        super().__init__(hidden_size, num_experts, top_k, ffn_hidden_size, router=router,
                         renormalize=renormalize, deterministic=deterministic, route_scale=route_scale,
                         **options)
        self.num_combos = 2 ** num_modalities - 1
        gate = self.router.gate
        self.router = FlexRouter(hidden_size, num_experts, top_k, full_combo=self.num_combos - 1,
                                 specialized=specialized_routing, renormalize=renormalize,
                                 deterministic=deterministic, route_scale=route_scale)
        self.router.gate = gate  # same initial weights as the base layer built from this seed

    def forward(self, x: torch.Tensor, combo: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [..., H]; combo int64 [...] (x's leading shape): modality-combination index of each
        token (pikv.data.multimodal.combo_index), None = all full (G-Router only)."""
        if combo is not None:
            if combo.shape != x.shape[:-1]:
                raise ValueError(f"combo shape {tuple(combo.shape)} must equal the token shape {tuple(x.shape[:-1])}")
            self.router.combo_T = combo.reshape(-1)
        return super().forward(x)


def _check_flex(hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int,
                num_modalities: int = 3, specialized_routing: bool = True, router: str = "softmax_topk",
                **base_options: Any) -> None:
    positive_int("num_modalities", num_modalities)
    combos = 2 ** num_modalities - 1
    if specialized_routing and num_experts < combos:
        raise OptionError("num_experts", num_experts, f"is too few for specialized_routing: the S-Router gives "
                          f"each of the {combos} modality combinations of {num_modalities} modalities its own "
                          f"expert, need >= {combos}")
    if router != "softmax_topk":
        raise OptionError("router", router, "is not supported by Flex-MoE, whose G-/S-Router is a softmax "
                          "top-k gate; allowed routers: softmax_topk")
    if base_options.get("capacity_factor") is not None:
        raise OptionError("capacity_factor", base_options["capacity_factor"], "must be None for kind 'flex' "
                          "(dropless: a dropped token would lose its modality-combination expert)")
    _check_base(hidden_size, num_experts, top_k, ffn_hidden_size, router=router, **base_options)


def _build_flex(hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int,
                num_modalities: int = 3, specialized_routing: bool = True, router: str = "softmax_topk",
                **base_options: Any) -> FlexMoELayer:
    return _build_base(hidden_size, num_experts, top_k, ffn_hidden_size, router=router, **base_options,
                       layer_cls=FlexMoELayer, num_modalities=num_modalities,
                       specialized_routing=bool(specialized_routing))


MOE_BUILDERS["flex"] = _build_flex
MOE_CHECKS["flex"] = _check_flex
MOE_OPTIONS["flex"] = ("num_modalities", "specialized_routing") + _BASE_OPTIONS
