"""KV events: what each tier stored, removed or cleared, batched for routers and consoles."""

from kvtier.events.types import AllBlocksCleared, BlockRemoved, BlockStored, EventBuffer, KvEvent

__all__ = ["AllBlocksCleared", "BlockRemoved", "BlockStored", "EventBuffer", "KvEvent"]
