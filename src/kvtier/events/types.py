"""KV event types and the buffer pools append them to. No I/O here (see ``publisher``).

A consumer that applies the events of one tier in order (Stored adds its hashes, Removed drops
them, AllBlocksCleared empties the set) holds exactly the keys that tier's pool has registered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kvtier.tiers import BlockKey, Tier


@dataclasses.dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks ``block_hashes`` (a chain, in order) became matchable in ``tier``."""

    block_hashes: list[BlockKey]
    parent_block_hash: BlockKey | None  # key of the block before the first one, if known
    block_size: int
    tier: Tier
    token_ids: list[int] | None = None  # block_size tokens per block, when the caller gave them
    lora_name: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class BlockOrigin:
    """What a Stored event tells a KV-aware router about one block besides its key: the key
    before it in its request's chain, its tokens and its LoRA, so the router can build the
    prefix tree."""

    parent: BlockKey | None
    token_ids: Sequence[int] | None = None
    lora_name: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks ``block_hashes`` are no longer held by ``tier``."""

    block_hashes: list[BlockKey]
    tier: Tier


@dataclasses.dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Every block of ``tier`` (of every tier when None) was dropped."""

    tier: Tier | None = None


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class EventBuffer:
    """Events in the order they happened, handed over in batches by ``take_events``.

    Not locked: one thread appends and takes (the leader's), as in vLLM's block pool.
    """

    __slots__ = ("_events",)

    def __init__(self) -> None:
        self._events: list[KvEvent] = []

    def add(self, event: KvEvent) -> None:
        self._events.append(event)

    def take_events(self) -> list[KvEvent]:
        """All events since the last call, oldest first; the buffer is left empty."""
        events, self._events = self._events, []
        return events

    def __len__(self) -> int:
        return len(self._events)
