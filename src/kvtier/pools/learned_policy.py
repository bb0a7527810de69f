"""``prefix_learned``: a small online model of which blocks come back, leaves of the prefix tree
first.

Each time a block becomes evictable it falls into a *class* of three features a cache sees
online: how often its key was used (1, 2, 3, 4-7, 8-15, 16+; an evicted key's count lives on in a
bounded ghost history), how deep it sits in its request's prefix (same buckets), and whether
anything cached hangs below it (a leaf: the end of a request, or a branch no later request took).
The model counts, per class, the blocks that entered it and those that were used again
afterwards (hit in the tier, or back from the ghost history); its estimate of a class's chance of
reuse is ``(reused + 0.5) / (entered + 1)``. Both counts halve every ``4 x the pool`` insertions,
so the model follows a workload that changes.

A block's score is ``L + its class's estimate`` (GreedyDual: ``L`` is the score of the last
victim, so a likely block stays only while the cache turns over slowly enough; no clock). The
lowest-scored leaf goes first (``_LeafFirstPolicy``).

Why these features: a cache sees them without knowing the workload (time since use is left to
GreedyDual's aging). Over the full blocks of the traces it was not tuned on, sightings carry most
of the signal (on the Azure-derived conversation sessions a block seen once came back 22 % of the
time, one seen four times or more 96 %) and being a leaf less (40 % against 49 % there, no
difference on the others), but the leaf feature tells apart what counts cannot (a request's end
from a block with a future, both seen once: the unit tests). Its gain over LRU and
``prefix_gdsf`` is small; ``benchmarks/replay.py`` shows where. It is not one of ``dueling``'s
experts: in its place of ``prefix_gdsf`` the G1 + host and three-tier replays lost up to 11 %.
An earlier replay cached prompts' partial last blocks, which never come back; there the leaf
feature learned to drop them first and looked 2-7 % better than it is.
"""

from __future__ import annotations

from collections import OrderedDict

from kvtier.pools.eviction import register_policy
from kvtier.pools.policies import _LeafFirstPolicy
from kvtier.tiers import BlockKey

__all__ = ["PrefixLearnedEviction"]

_BUCKETS = 6   # 1, 2, 3, 4-7, 8-15, 16+ (0 shares the first)
_BUCKET_OF = (0, 0, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4)   # counts below 16


def _bucket(count: int) -> int:
    return _BUCKET_OF[count] if count < 16 else _BUCKETS - 1


@register_policy
class PrefixLearnedEviction(_LeafFirstPolicy):
    """Leaf-first GreedyDual over an online per-class estimate of reuse (module doc)."""

    name = "prefix_learned"
    HISTORY_FACTOR = 8
    MAX_HISTORY = 1_000_000
    NUM_CLASSES = _BUCKETS * _BUCKETS * 2

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self._uses = [0] * num_blocks
        self._depth = [0] * num_blocks
        self._class = [0] * num_blocks     # the class the block entered at its last insert
        self._entered = [0.0] * self.NUM_CLASSES
        self._reused = [0.0] * self.NUM_CLASSES
        self._halve_every = max(1000, 4 * num_blocks)
        self._until_halving = self._halve_every
        self._inflation = 0.0
        self._ghost: OrderedDict[BlockKey, tuple[int, int]] = OrderedDict()  # (uses, class)
        self._ghost_max = max(num_blocks, min(self.HISTORY_FACTOR * num_blocks,
                                              self.MAX_HISTORY))

    def on_link(self, block_id: int, parent_id: int) -> None:
        super().on_link(block_id, parent_id)
        self._depth[block_id] = self._depth[parent_id] + 1 if parent_id >= 0 else 0

    def reuse_estimate(self, klass: int) -> float:
        """The model's chance that a block of class ``klass`` is used again."""
        return (self._reused[klass] + 0.5) / (self._entered[klass] + 1.0)

    def _classify(self, block_id: int) -> int:
        return self.class_of(self._uses[block_id], self._depth[block_id],
                                 self._children[block_id] == 0)

    @staticmethod
    def class_of(uses: int, depth: int, leaf: bool) -> int:
        """The class of a block whose key was used ``uses`` times, ``depth`` blocks below its
        request's first (0: the first), with nothing cached below it (``leaf``)."""
        return (_bucket(uses) * _BUCKETS + _bucket(depth + 1)) * 2 + leaf

    # -- _LeafFirstPolicy hooks -----------------------------------------------------------------
    def _access(self, block_id: int, key: BlockKey, is_hit: bool) -> float:
        if is_hit:
            self._reused[self._class[block_id]] += 1.0
            uses = self._uses[block_id] + 1
        else:
            remembered = self._ghost.pop(key, None)
            if remembered is None:
                uses = 1
            else:
                self._reused[remembered[1]] += 1.0
                uses = remembered[0] + 1
        self._uses[block_id] = uses
        depth = self._depth[block_id] + 1
        # _classify, inlined: this runs for every block the tier takes back.
        klass = (((_BUCKET_OF[uses] if uses < 16 else 5) * _BUCKETS
                  + (_BUCKET_OF[depth] if depth < 16 else 5)) * 2
                 + (self._children[block_id] == 0))
        self._class[block_id] = klass
        self._entered[klass] += 1.0
        self._until_halving -= 1
        if not self._until_halving:
            self._until_halving = self._halve_every
            self._entered = [count * 0.5 for count in self._entered]
            self._reused = [count * 0.5 for count in self._reused]
        return self._inflation + (self._reused[klass] + 0.5) / (self._entered[klass] + 1.0)

    def _evicted(self, block_id: int, score: float) -> None:
        self._inflation = max(self._inflation, score)
        ghost = self._ghost
        ghost[self._keys[block_id]] = (self._uses[block_id], self._class[block_id])
        if len(ghost) > self._ghost_max:
            ghost.popitem(last=False)

    def _adopt_history(self, source: _LeafFirstPolicy) -> None:
        assert isinstance(source, PrefixLearnedEviction)
        self._inflation = source._inflation
        self._ghost = OrderedDict(source._ghost)
        self._entered, self._reused = list(source._entered), list(source._reused)
        self._until_halving = source._until_halving

    def _adopted(self, block_id: int, key: BlockKey, source: _LeafFirstPolicy,
                 theirs: int) -> float:
        assert isinstance(source, PrefixLearnedEviction)
        if theirs >= 0:
            self._uses[block_id] = source._uses[theirs]
            self._class[block_id] = source._class[theirs]
            self._depth[block_id] = source._depth[theirs]   # as linked then
            return source._score[theirs]
        # Evicted by source (its ghost keeps its count and class) or never seen: below every
        # block source holds (their scores include the inflation), the likelier last.
        uses, klass = self._ghost.pop(key, (0, -1))
        self._uses[block_id] = uses + 1
        if klass < 0:
            self._class[block_id] = self._classify(block_id)
            return 0.0
        self._class[block_id] = klass
        return self.reuse_estimate(klass)
