"""kvtier: a tiered KV block manager for LLM inference (host RAM, local disk, remote stores)."""

from kvtier.config import KvtierConfig, load_config
from kvtier.errors import KvtierError
from kvtier.tiers import Tier

__version__ = "0.1.0"
__all__ = ["KvtierConfig", "KvtierError", "Tier", "__version__", "load_config"]
