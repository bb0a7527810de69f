"""``dueling``: run several eviction policies side by side and follow the one that hits most.

No single policy wins everywhere (``benchmarks/replay.py``): frequency (``prefix_gdsf``) wins
where shared prompts recur at random, the reuse-interval estimate (``prefix_reuse``) where
conversations return after more traffic than the tier holds, ``arc`` in between, and each falls
below LRU somewhere. This policy keeps every expert's order over the pool's blocks at once and
evicts the block the current *lead* chooses (the others forget it as evicted, see
``EvictionPolicy.evict``). To know which expert would do best here, each expert also runs alone
in a *shadow*: a ``BlockPool`` of the same size that holds keys only and sees the same releases
and touches. A shadow counts the prefix hits its expert would have had; the counts decay by
``DECAY`` per release (a memory of about a thousand requests), and the lead changes only when
another expert's count beats it by more than ``Z`` standard deviations of noise, taking the
larger of two estimates of that noise. Poisson noise of the counts (``sqrt(sum)``) keeps a tier
where the experts hit alike on its default: behind a G1 tier, a paired test alone left LRU on
evidence worth 0.2-0.8 % of hits and lost that much. The noise of the release-by-release
differences (their decayed sum of squares; the shadows serve the same requests) catches what
counts miss: a prefix hit comes in runs, one request matching many blocks at once, so a single
lucky request never moves the lead on its own (a tier of 47 blocks flipped on one 17-block match
under the Poisson test alone and fell to 0.42x LRU). Over ``benchmarks/replay.py``'s 46 runs the
two together never fall below LRU; either alone does.

A release is taken as one request's chain, tail first (the pool's and vLLM's order), and a
shadow's hits are its prefix match. The connector's host and disk tiers release one block at a
time, so there the leader shows each request's lookup instead (``on_lookup``): an expert
scores how far the match would reach with its shadow as this tier and the *other* tier as it
is (a miss in both ends the match). A host block the disk holds too is then worth nothing,
and one the disk lacks is worth every disk block behind it it connects: in a G1 + host + disk
stack, scoring by the host tier's own hits made the lead leave LRU for experts that keep what
the disk keeps, and the stack lost up to 13 % of its hits to LRU's; scored by reach it never
falls below LRU there (``benchmarks/replay.py``). From the first lookup on, releases only feed
the shadows. Cost: every hook
runs in each expert and each shadow, about ``2 x len(EXPERTS)`` times one policy's work per
block.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from kvtier.pools.eviction import (
    EvictionPolicy,
    insert_batch_hook,
    make_eviction_policy,
    register_policy,
)
from kvtier.tiers import BlockKey

__all__ = ["DuelingEviction"]


class _Shadow:
    """One expert alone in a cache of ``num_blocks`` keys (no data): its prefix hits.

    It serves each release as the replay serves its device tier from a ``BlockPool`` (match
    the prefix, register the rest that fits, release tail first), calling the expert's hooks
    in the pool's order, but keeps only what a cache whose blocks are all inactive between
    requests needs: a key per block, a registry and a free list (the pool's states,
    references and checks cost 55 % of a host tier's time under ``dueling``)."""

    __slots__ = ("_free", "_hits_too", "_insert_batch", "_key", "_links", "_misses",
                 "_priority", "policy", "registry")

    def __init__(self, name: str, num_blocks: int) -> None:
        policy = self.policy = make_eviction_policy(name, num_blocks)
        cls = type(policy)
        self._hits_too = cls.on_hit is not EvictionPolicy.on_hit
        self._misses = cls.on_miss is not EvictionPolicy.on_miss
        self._links = cls.on_link is not EvictionPolicy.on_link
        self._insert_batch = insert_batch_hook(policy)
        self.registry: dict[BlockKey, int] = {}
        self._key: list[BlockKey | None] = [None] * num_blocks
        self._priority = [0] * num_blocks
        self._free = deque(range(num_blocks))   # taken from the head, freed to the tail

    def request(self, chain: Sequence[BlockKey], priorities: Sequence[int]) -> int:
        """Serve ``chain`` (head first); returns the prefix hits."""
        if len(chain) == 1:
            return self.one(chain[0], priorities[0])
        policy, registry = self.policy, self.registry
        hits_too = self._hits_too and policy.hits_while_active
        held: list[int] = []
        for key in chain:
            block_id = registry.get(key)
            if block_id is None:
                if self._misses:
                    policy.on_miss(key)
                break
            policy.on_remove(block_id)
            if hits_too:
                policy.on_hit(block_id, key)
            held.append(block_id)
        hits = len(held)
        room = min(len(chain) - hits, len(self._free) + len(registry) - hits)
        if room:
            free, keys, prio = self._free, self._key, self._priority
            fresh = [free.popleft() for _ in range(min(room, len(free)))]
            while len(fresh) < room:
                victim = policy.victim()
                del registry[keys[victim]]
                keys[victim] = None
                fresh.append(victim)
            on_link = policy.on_link if self._links else None
            parent = chain[hits - 1] if hits else None
            taken = set(held)
            for block_id, key, priority in zip(fresh, chain[hits:hits + room],
                                               priorities[hits:hits + room]):
                kept = registry.setdefault(key, block_id)
                if kept == block_id:
                    keys[block_id] = key
                    prio[block_id] = priority
                    if on_link is not None:
                        on_link(block_id, -1 if parent is None else registry.get(parent, -1))
                else:
                    # Registered already (a deeper block seen before its parent): the pool
                    # keeps that block, takes it out of the order and frees the new one.
                    if kept not in taken:
                        policy.on_remove(kept)
                    if hits_too:
                        policy.on_hit(kept, key)
                    free.append(block_id)
                    block_id = kept
                taken.add(block_id)
                held.append(block_id)
                parent = key
            if len(taken) < len(held):
                # A block held twice becomes evictable where the pool's release drops its
                # last reference: at its last place in the tail-first order.
                held = list(dict.fromkeys(held))
        held.reverse()
        self._insert_batch(held, self._key, self._priority)
        return hits

    def one(self, key: BlockKey, priority: int) -> int:
        """``request`` for a chain of one block, the host and disk tiers' every release (they
        release block by block): the same hooks in the same order, without the bookkeeping of
        a chain (a third of ``dueling``'s time in a host tier)."""
        policy, registry = self.policy, self.registry
        block_id = registry.get(key)
        if block_id is not None:
            policy.on_remove(block_id)
            if self._hits_too and policy.hits_while_active:
                policy.on_hit(block_id, key)
            policy.on_insert(block_id, key, self._priority[block_id])
            return 1
        if self._misses:
            policy.on_miss(key)
        free = self._free
        if free:
            block_id = free.popleft()
        elif registry:
            block_id = policy.victim()
            del registry[self._key[block_id]]
        else:
            return 0   # a cache of no blocks
        registry[key] = block_id
        self._key[block_id] = key
        self._priority[block_id] = priority
        if self._links:
            policy.on_link(block_id, -1)
        policy.on_insert(block_id, key, priority)
        return 0

    def touch(self, key: BlockKey) -> None:
        """A hit on an inactive block without a request (the host tier's re-offer)."""
        block_id = self.registry.get(key)
        if block_id is not None and self._hits_too:
            self.policy.on_hit(block_id, key)


@register_policy
class DuelingEviction(EvictionPolicy):
    """Evict as the expert whose shadow cache hits most lately (module doc)."""

    name = "dueling"
    # Hits on active blocks too: an expert that counts them (arc's clock) hears them; the
    # others hear only hits on inactive blocks, as the pool would tell them alone.
    hits_while_active = True
    EXPERTS = ("lru", "arc", "prefix_gdsf", "prefix_reuse")
    DECAY = 0.999  # per release
    Z = 2.0        # lead changes need a lead this many standard deviations of noise wide

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self._experts = [make_eviction_policy(name, num_blocks) for name in self.EXPERTS]
        self._shadows = [_Shadow(name, num_blocks) for name in self.EXPERTS]
        self._hits = [0.0] * len(self.EXPERTS)
        # _spread[i][j]: decayed sum over releases of (expert i's hits - expert j's)^2
        self._spread = [[0.0] * len(self.EXPERTS) for _ in self.EXPERTS]
        self._lead = 0
        self._active_hits = [expert for expert in self._experts if expert.hits_while_active]
        self._inactive = bytearray(num_blocks)  # 1 while the block is in the eviction order
        self._scores_lookups = False  # True once the leader reports lookups (on_lookup)

    @property
    def lead(self) -> str:
        """The expert whose order evicts now."""
        return self.EXPERTS[self._lead]

    def on_insert(self, block_id: int, key: BlockKey, priority: int) -> None:
        self.on_insert_batch((block_id,), {block_id: key}, {block_id: priority})

    def on_insert_batch(self, block_ids: Sequence[int], key_of: Sequence[BlockKey],
                        priority_of: Sequence[int]) -> None:
        if len(block_ids) == 1:
            # The host and disk tiers' release, block by block: the shortest path.
            block_id = block_ids[0]
            key, priority = key_of[block_id], priority_of[block_id]
            got = [shadow.one(key, priority) for shadow in self._shadows]
            if not self._scores_lookups:
                self.score_release(got)
            self._inactive[block_id] = 1
            for expert in self._experts:
                expert.on_insert(block_id, key, priority)
            return
        chain = [key_of[b] for b in reversed(block_ids)]
        priorities = [priority_of[b] for b in reversed(block_ids)]
        got = [shadow.request(chain, priorities) for shadow in self._shadows]
        if not self._scores_lookups:
            self.score_release(got)
        inactive = self._inactive
        for block_id in block_ids:
            inactive[block_id] = 1
        for expert in self._experts:
            expert.on_insert_batch(block_ids, key_of, priority_of)

    def score_release(self, got: Sequence[int]) -> None:
        """Count one release's shadow hits (``got[i]``: expert i's) and move the lead to the
        expert with the most decayed hits if its margin over the lead exceeds ``Z`` standard
        deviations of both the counts and the per-release differences (module doc)."""
        hits, spread, decay = self._hits, self._spread, self.DECAY
        for i, mine in enumerate(got):
            hits[i] = hits[i] * decay + mine
            row = spread[i]
            for j, theirs in enumerate(got):
                row[j] = row[j] * decay + (mine - theirs) ** 2
        best, lead = max(range(len(hits)), key=hits.__getitem__), self._lead
        noise = max(hits[best] + hits[lead], spread[best][lead]) ** 0.5
        if hits[best] - hits[lead] > self.Z * noise:
            self._lead = best

    def on_lookup(self, keys: Sequence[BlockKey],
                  served_elsewhere: Callable[[BlockKey], bool]) -> None:
        """Score each expert by how far this request's match would reach with its shadow as
        this tier (module doc); from the first lookup on, releases only feed the shadows."""
        self._scores_lookups = True
        elsewhere: list[bool] = []
        got = []
        for shadow in self._shadows:
            held = shadow.registry
            reach = 0
            for key in keys:
                if reach == len(elsewhere):
                    elsewhere.append(served_elsewhere(key))
                if not (elsewhere[reach] or key in held):
                    break
                reach += 1
            got.append(reach)
        self.score_release(got)

    def on_remove(self, block_id: int) -> None:
        self._inactive[block_id] = 0
        for expert in self._experts:
            expert.on_remove(block_id)

    def on_hit(self, block_id: int, key: BlockKey) -> None:
        if self._inactive[block_id]:
            # A touch (a match would have taken the block out of the order first): the host
            # tier's re-offer of a block it holds. The shadows hear it too, or shadow LRU
            # trails the real one (1,970 against 2,051 hits on one run) and the lead leaves it.
            for shadow in self._shadows:
                shadow.touch(key)
            for expert in self._experts:
                expert.on_hit(block_id, key)
        else:
            for expert in self._active_hits:
                expert.on_hit(block_id, key)

    def on_link(self, block_id: int, parent_id: int) -> None:
        for expert in self._experts:
            expert.on_link(block_id, parent_id)

    def on_unlink(self, block_id: int) -> None:
        for expert in self._experts:
            expert.on_unlink(block_id)

    def victim(self) -> int | None:
        block_id = self._experts[self._lead].victim()
        if block_id is not None:
            self._inactive[block_id] = 0
            for i, expert in enumerate(self._experts):
                if i != self._lead:
                    expert.evict(block_id)
        return block_id

    def evict(self, block_id: int) -> None:
        self._inactive[block_id] = 0
        for expert in self._experts:
            expert.evict(block_id)

    def __len__(self) -> int:
        return len(self._experts[self._lead])
