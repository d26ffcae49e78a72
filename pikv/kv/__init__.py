"""KV caches for incremental decoding: the plain cache, policy caches with exact byte accounting
(pikv/kv/policies.py) and the jointly trained latent compressor (pikv/kv/learned.py)."""

from pikv.kv.budgets import check_latent_budgets
from pikv.kv.cache import KVCache
from pikv.kv.fit import calibrate_svd
from pikv.kv.learned import KVTrainState, LatentKVCompressor
from pikv.kv.policies import ALIASES, POLICIES, RETIRED, PolicyCache, make_cache, resolve_policy

__all__ = ["KVCache", "KVTrainState", "LatentKVCompressor", "ALIASES", "POLICIES", "RETIRED", "PolicyCache",
           "calibrate_svd", "check_latent_budgets", "make_cache", "resolve_policy"]
