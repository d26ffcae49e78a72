"""MoE variants registered with `create_moe`: 'flex' (Flex-MoE) and 'time' (Time-MoE)."""

from pikv.moe.variants.flex import FlexMoELayer, FlexRouter
from pikv.moe.variants.time import TimeMoELayer

__all__ = ["FlexMoELayer", "FlexRouter", "TimeMoELayer"]
