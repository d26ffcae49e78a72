"""Mixture-of-Experts layers: router -> dispatcher -> grouped experts -> combine."""

from pikv.moe.dispatch import DispatchState, LocalDispatcher
from pikv.moe.ep_dispatch import AllToAllDispatcher
from pikv.moe.experts import FeedForward, GroupedExperts
from pikv.moe.layer import MOE_BUILDERS, MoELayer, check_moe, create_moe
from pikv.moe.lora import LoRAGroupedExperts, LoRAMoELayer, merge_adapters  # registers kind 'pikv'
from pikv.moe.router import PER_TOKEN_ROUTERS, ROUTERS, build_router, check_router
from pikv.moe.variants import FlexMoELayer, TimeMoELayer  # registers kinds 'flex' and 'time'

__all__ = ["create_moe", "check_moe", "check_router", "MoELayer", "FeedForward", "GroupedExperts", "LocalDispatcher",
           "AllToAllDispatcher", "DispatchState", "build_router", "MOE_BUILDERS", "ROUTERS",
           "PER_TOKEN_ROUTERS", "LoRAGroupedExperts", "LoRAMoELayer", "merge_adapters", "FlexMoELayer", "TimeMoELayer"]
