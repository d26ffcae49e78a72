"""KV caches for incremental decoding: a storage format (exact, KIVI quantization, SVD low rank, the
jointly trained latent) x a selection rule (all, window, StreamingLLM, H2O, SnapKV, PyramidKV, LRU,
Quest) under one byte budget (pikv/kv/registry.py), with exact byte accounting (pikv/kv/cache.py)."""

from pikv.kv.budgets import KVOptions, check_latent_budgets
from pikv.kv.cache import KVCache
from pikv.kv.fit import calibrate_svd
from pikv.kv.learned import KVTrainState, LatentKVCompressor
from pikv.kv.registry import (ALIASES, POLICIES, RETIRED, SELECTION_NAMES, STORAGES, Method, make_cache,
                              parse_method, resolve_policy)

__all__ = ["KVCache", "KVOptions", "KVTrainState", "LatentKVCompressor", "ALIASES", "POLICIES", "RETIRED",
           "SELECTION_NAMES", "STORAGES", "Method", "calibrate_svd", "check_latent_budgets", "make_cache",
           "parse_method", "resolve_policy"]
