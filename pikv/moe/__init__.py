"""Mixture-of-Experts layers: router -> dispatcher -> grouped experts -> combine."""

from pikv.moe.dispatch import DispatchState, LocalDispatcher
from pikv.moe.experts import GroupedExperts
from pikv.moe.layer import MOE_BUILDERS, MoELayer, create_moe
from pikv.moe.router import ROUTERS, TokenChoiceTopKRouter

__all__ = ["create_moe", "MoELayer", "GroupedExperts", "LocalDispatcher", "DispatchState",
           "TokenChoiceTopKRouter", "MOE_BUILDERS", "ROUTERS"]
