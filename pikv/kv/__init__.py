"""KV caches for incremental decoding (eviction/compression policies build on KVCache)."""

from pikv.kv.cache import KVCache

__all__ = ["KVCache"]
