"""Model definitions: the decoder-only transformer and its decoding loop."""

from pikv.models.generation import generate, sample_next
from pikv.models.transformer import (Attention, Block, FeedForward, RMSNorm, RotaryEmbedding,
                                     Transformer, rotate_half)

__all__ = ["Transformer", "Block", "Attention", "FeedForward", "RMSNorm", "RotaryEmbedding",
           "rotate_half", "generate", "sample_next"]
