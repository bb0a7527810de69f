"""TinyLFU: a count-min sketch of recent key frequencies, and the admission policy built on it.

``FrequencySketch`` is shared with the ``tinylfu`` eviction policy (W-TinyLFU, in
``kvtier.pools.policies``). ``TinyLfuAdmission`` (admission name ``tinylfu``) admits a block to a
tier once its key has been offered ``min_count`` times recently: like KVBM's frequency filter
(a block seen once never reaches disk) but with bounded memory (a fixed sketch, not one dict
entry per key) and aging by halving every ``sample_size`` offers instead of by wall clock, so it
behaves the same in a replay and in a server. KVBM v2's ``presence_lfu`` policy is the same idea.
No torch, no I/O.
"""

from __future__ import annotations

from kvtier.errors import ConfigError
from kvtier.offload.admission import AdmissionPolicy, register_admission_policy
from kvtier.tiers import BlockKey

__all__ = ["FrequencySketch", "TinyLfuAdmission", "key64"]

_MASK64 = (1 << 64) - 1


def key64(key: BlockKey) -> int:
    """A well-mixed 64-bit value for a block key (int ids may be dense: 0, 1, 2, ...)."""
    if isinstance(key, int):
        x = key & _MASK64
    else:
        x = int.from_bytes(key[:8], "little")
    # splitmix64's finaliser
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class FrequencySketch:
    """Count-min sketch: 4 rows of byte counters capped at 15 (TinyLFU's 4-bit counters).

    Every ``sample_size`` increments all counters are halved, so old popularity fades
    (TinyLFU's reset). Memory: ``4 * width`` bytes, ``width`` the power of two >= ``width_hint``.
    """

    _HALVE = bytes(v >> 1 for v in range(256))
    MAX_COUNT = 15

    def __init__(self, width_hint: int, sample_size: int) -> None:
        if width_hint < 1 or sample_size < 1:
            raise ConfigError(f"frequency sketch: width_hint={width_hint} and "
                              f"sample_size={sample_size} must be >= 1")
        width = 16
        while width < width_hint:
            width <<= 1
        self._width = width
        self._table = bytearray(4 * width)
        self.sample_size = sample_size
        self._additions = 0

    def _slots(self, key: BlockKey) -> tuple[int, int, int, int]:
        h = key64(key)
        width = self._width
        mask = width - 1
        return (h & mask, width + ((h >> 16) & mask), 2 * width + ((h >> 32) & mask),
                3 * width + ((h >> 48) & mask))

    def increment(self, key: BlockKey) -> None:
        table = self._table
        for idx in self._slots(key):
            if table[idx] < 15:
                table[idx] += 1
        self._additions += 1
        if self._additions >= self.sample_size:
            self._table = bytearray(table.translate(self._HALVE))
            self._additions //= 2

    def estimate(self, key: BlockKey) -> int:
        table = self._table
        a, b, c, d = self._slots(key)
        return min(table[a], table[b], table[c], table[d])


@register_admission_policy
class TinyLfuAdmission(AdmissionPolicy):
    """Admit a key once it has been offered ``min_count`` times within the sketch's memory.

    Options: ``min_count`` (default 2), ``sample_size`` (offers between halvings, default
    1,000,000: as many keys as KVBM's filter tracks) and ``width`` (counters per row, default
    ``sample_size``; 4 bytes per counter column).
    """

    name = "tinylfu"

    def __init__(self, min_count: int = 2, sample_size: int = 1_000_000,
                 width: int | None = None) -> None:
        if not 1 <= min_count <= FrequencySketch.MAX_COUNT:
            raise ConfigError(f"tinylfu admission: min_count={min_count} must be in "
                              f"1..{FrequencySketch.MAX_COUNT}")
        self.min_count = min_count
        self._sketch = FrequencySketch(width or sample_size, sample_size)

    def admit(self, key: BlockKey) -> bool:
        self._sketch.increment(key)
        return self._sketch.estimate(key) >= self.min_count

    def estimate(self, key: BlockKey) -> int:
        """The key's recent offer count as the sketch sees it (no offer)."""
        return self._sketch.estimate(key)
