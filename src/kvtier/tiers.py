"""The vocabulary every layer shares: the storage tiers (one enum, never strings like "cpu")
and the key that names a block's contents in all of them."""

import enum

# A block's chained content hash: an int (vLLM's builtin hashes, kvtier's xxh3 mode) or up to
# 32 bytes (sha256 modes). It names the same bytes in every tier and every process.
BlockKey = int | bytes


class Tier(enum.IntEnum):
    G1 = 1  # engine device KV tensors (owned by the engine)
    G2 = 2  # host RAM arena
    G3 = 3  # local disk
    G4 = 4  # remote shared store

    @property
    def medium(self) -> str:
        """vLLM KV-event medium name for this tier."""
        return _MEDIUM[self]


# vLLM's medium names where it has one (GPU, CPU, STORAGE).
_MEDIUM = {Tier.G1: "GPU", Tier.G2: "CPU", Tier.G3: "STORAGE", Tier.G4: "REMOTE"}
