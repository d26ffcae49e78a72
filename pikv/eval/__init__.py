"""Evaluation: held-out perplexity and bits-per-byte (the KV-cache decoding evaluation builds on it)."""

from pikv.eval.lm import LMEvalResult, evaluate_lm

__all__ = ["LMEvalResult", "evaluate_lm"]
