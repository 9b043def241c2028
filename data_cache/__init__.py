"""data_cache: build, extend and read latent caches (latent, text embedding, rewards per record).

Build with ``build_cache(BuildCacheConfig(...))`` or ``lrm cache build``; read with ``LatentCache.open(dir)``.
"""

from data_cache.build import build_cache, finalize_cache
from data_cache.config import AddRewardConfig, BuildCacheConfig, SourceConfig, StatsConfig, VerifyConfig
from data_cache.ops import add_reward, cache_stats, verify_cache
from data_cache.reader import LatentCache
from data_cache.sources import DatasetSource, FolderSource, GeneratorSource, ShapesSource
from data_cache.storage import CacheError, TextEncoderMismatchError
from lrm.latent_space import LatentSpaceMismatchError

__all__ = [
    "AddRewardConfig", "BuildCacheConfig", "CacheError", "DatasetSource", "FolderSource", "GeneratorSource",
    "LatentCache", "LatentSpaceMismatchError", "ShapesSource", "SourceConfig", "StatsConfig",
    "TextEncoderMismatchError", "VerifyConfig", "add_reward", "build_cache", "cache_stats", "finalize_cache",
    "verify_cache",
]
