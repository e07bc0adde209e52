from atom_jax.cache.layout import CacheLayout, init_cache
from atom_jax.cache.batch import PackedBatch, pack_chunks

__all__ = ["CacheLayout", "init_cache", "PackedBatch", "pack_chunks"]
