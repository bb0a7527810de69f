"""``dueling``: run several eviction policies side by side and follow the one that hits most.

No single policy wins everywhere (``benchmarks/replay.py``): frequency (``prefix_gdsf``) wins where
shared prompts recur at random, the reuse-interval estimate (``prefix_reuse``) where conversations
return after more traffic than the tier holds, ``arc`` in between, and each falls below LRU
somewhere. To know which expert would do best here, each runs alone in a *shadow*: a ``BlockPool``
of the same size that holds keys only and sees the same releases and touches. The tier evicts as
the current *lead*, the only expert that keeps an order over the tier's own blocks; a new lead is
built from its shadow when it takes over (``EvictionPolicy.adopt``: the shadow's order, ghosts,
counts and intervals for the blocks both hold, so it goes on exactly as if it had run all along
wherever the tier holds what its shadow holds). Keeping all four experts in step instead took
1.4-1.9x the time (4.4-4.9x LRU's time against 3.1-3.5x in the G1 + host replay of
``benchmarks/replay.py``, 30x against 17x in ``benchmarks/pool.py``) and was never below LRU there
either. A shadow counts the prefix hits its expert would have had; the counts decay by ``DECAY``
per release (a memory of about a thousand requests), and the lead changes only when another
expert's count beats it by more than ``Z`` standard deviations of noise, taking the larger of two
estimates of that noise. Poisson noise of the counts (``sqrt(sum)``) keeps a tier where the experts
hit alike on its default: behind a G1 tier, a paired test alone left LRU on evidence worth 0.2-0.8
% of hits and lost that much. The noise of the release-by-release differences (their decayed sum of
squares; the shadows serve the same requests) catches what counts miss: a prefix hit comes in runs,
one request matching many blocks at once, so a single lucky request never moves the lead on its own
(a tier of 47 blocks flipped on one 17-block match under the Poisson test alone and fell to 0.42x
LRU). Over ``benchmarks/replay.py``'s 46 runs the two together never fall below LRU; either alone
does.

A release is taken as one request's chain, tail first (the pool's and vLLM's order), and a
shadow's hits are its prefix match. The connector's host and disk tiers release one block at a
time, so there the leader shows each request's lookup instead (``on_lookup``): an expert
scores how far the match would reach with its shadow as this tier and the *other* tier as it
is (a miss in both ends the match). A host block the disk holds too is then worth nothing,
and one the disk lacks is worth every disk block behind it it connects: in a G1 + host + disk
stack, scoring by the host tier's own hits made the lead leave LRU for experts that keep what
the disk keeps, and the stack lost up to 13 % of its hits to LRU's; scored by reach it never
falls below LRU there (``benchmarks/replay.py``). From the first lookup on, releases only feed
the shadows.

Cost: a shadow does one policy's work per block it sees, and holds one policy's state (its ghost
histories are up to 8x its size). A tier of at most ``SHADOW_BLOCKS`` blocks shows its shadows
every key, which costs ``len(EXPERTS) + 1`` times one policy's work per block and, at that size,
about 5 MiB. A larger tier shows them a fixed sample of its keys (``_KeySample``) and gives each
shadow ``SHADOW_BLOCKS`` blocks, the tier scaled by the sample's rate, as miniature simulations
do (Waldspurger et al., USENIX ATC 2017: a cache of a sample of the keys, scaled by the same
rate, hits the same fraction). A chain's sampled blocks form a chain of their own, so a sampled
miss still ends the shadow's match. Above ``SHADOW_BLOCKS`` the shadows' memory stays where it
is, and their time per block falls with the rate. All experts see the same sample, so they are
compared on the same requests; the noise rule sees the smaller counts, and a lead then needs
more evidence to change. A new lead adopts exactly what its shadow knows of the sampled blocks;
it knows nothing of the others, so those go first (in the tier's LRU order, leaves first for a
prefix-aware expert). ``benchmarks/replay.py`` chose the size: wherever shadows of 1,024 blocks
sample (the Mooncake trace's tiers of 1,709 to 51,270 blocks, alone or behind G1), they hit
within 3.5 % of shadows of 4,096 blocks and of unsampled ones, either way, and never below LRU,
in 0.6-0.8x the time of 4,096; shadows of 512 fell to 1.57x LRU where the others got 1.90x.
"""

from __future__ import annotations

import logging
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

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


class _KeySample:
    """A fixed pseudo-random ``rate`` of all block keys, the same in every process and run:
    a key is in it when the top 32 bits of its first 8 bytes (or its int value) times a
    Fibonacci-hashing constant fall below ``rate`` x 2^32. Keys are content hashes, but the
    replay's trace ids count up from 0; the multiplication spreads both."""

    __slots__ = ("_below", "everything", "rate")

    def __init__(self, rate: float) -> None:
        self._below = round(rate * (1 << 32))
        self.rate = self._below / (1 << 32)
        self.everything = self._below >= 1 << 32

    def holds(self, key: BlockKey) -> bool:
        value = key if isinstance(key, int) else int.from_bytes(key[:8], "little")
        return (value * 0x9E3779B97F4A7C15 & _MASK64) >> 32 < self._below


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
    # Hits on active blocks too: a lead that counts them (arc's clock) hears them; the
    # others hear only hits on inactive blocks, as the pool would tell them alone.
    hits_while_active = True
    EXPERTS = ("lru", "arc", "prefix_gdsf", "prefix_reuse")
    DECAY = 0.999  # per release
    Z = 2.0        # lead changes need a lead this many standard deviations of noise wide
    # Shadows of a larger tier follow a sample of its keys in a cache this size (module doc).
    SHADOW_BLOCKS = 1024

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        sample = _KeySample(min(1.0, self.SHADOW_BLOCKS / num_blocks) if num_blocks else 1.0)
        self._sampled = None if sample.everything else sample.holds
        shadow_blocks = round(num_blocks * sample.rate)
        self._shadows = [_Shadow(name, shadow_blocks) for name in self.EXPERTS]
        self._hits = [0.0] * len(self.EXPERTS)
        # _spread[i][j]: decayed sum over releases of (expert i's hits - expert j's)^2
        self._spread = [[0.0] * len(self.EXPERTS) for _ in self.EXPERTS]
        self._quiet = 0   # releases since the last with any shadow hit (decay owed; see score)
        self._lead = 0
        self._expert = make_eviction_policy(self.EXPERTS[0], num_blocks)
        self._expert_batch = insert_batch_hook(self._expert)
        # What a new lead is shown of the tier when it takes over (``_take_lead``):
        self._links: dict[int, tuple[int, int]] = {}  # linked block -> (parent, its link no.)
        self._link_no = [0] * num_blocks                # bumped whenever a block is linked
        self._key: list[BlockKey | None] = [None] * num_blocks
        self._priority = [0] * num_blocks
        self._inactive: dict[int, None] = {}   # evictable blocks, least recently used first
        self._scores_lookups = False  # True once the leader reports lookups (on_lookup)

    @property
    def lead(self) -> str:
        """The expert whose order evicts now."""
        return self.EXPERTS[self._lead]

    def on_insert(self, block_id: int, key: BlockKey, priority: int) -> None:
        # The host and disk tiers' release, block by block: the shortest path.
        if self._sampled is None or self._sampled(key):
            got = [shadow.one(key, priority) for shadow in self._shadows]
        else:
            got = ()   # no shadow saw it
        self._key[block_id] = key
        self._priority[block_id] = priority
        self._inactive[block_id] = None
        self._expert.on_insert(block_id, key, priority)
        if not self._scores_lookups:
            self.score_release(got)

    def on_insert_batch(self, block_ids: Sequence[int], key_of: Sequence[BlockKey],
                        priority_of: Sequence[int]) -> None:
        if len(block_ids) == 1:
            block_id = block_ids[0]
            self.on_insert(block_id, key_of[block_id], priority_of[block_id])
            return
        sampled, head_first = self._sampled, block_ids[::-1]
        if sampled is not None:
            # The shadows see the sampled blocks of the chain, each linked to its nearest
            # sampled ancestor: a miss on any of them ends the shadow's match.
            head_first = [b for b in head_first if sampled(key_of[b])]
        if head_first:
            chain = [key_of[b] for b in head_first]
            priorities = [priority_of[b] for b in head_first]
            got = [shadow.request(chain, priorities) for shadow in self._shadows]
        else:
            got = ()   # no shadow saw it
        keys, prio, inactive = self._key, self._priority, self._inactive
        for block_id in block_ids:
            keys[block_id] = key_of[block_id]
            prio[block_id] = priority_of[block_id]
            inactive[block_id] = None
        self._expert_batch(block_ids, key_of, priority_of)
        if not self._scores_lookups:
            self.score_release(got)

    def score_release(self, got: Sequence[int]) -> None:
        """Count one release's shadow hits (``got[i]``: expert i's) and move the lead to the
        expert with the most decayed hits if its margin over the lead exceeds ``Z`` standard
        deviations of both the counts and the per-release differences (module doc)."""
        if not any(got):
            # Decay alone cannot move the lead (the margin shrinks by DECAY, its noise by
            # the root of it), so it is owed until the next release with a hit: most releases
            # of a sampled or small tier have none.
            self._quiet += 1
            return
        hits, spread, decay = self._hits, self._spread, self.DECAY
        if self._quiet:
            owed, self._quiet = decay ** self._quiet, 0
            hits[:] = [h * owed for h in hits]
            for row in spread:
                row[:] = [d * owed for d in row]
        for i, mine in enumerate(got):
            hits[i] = hits[i] * decay + mine
            row = spread[i]
            for j, theirs in enumerate(got):
                row[j] = row[j] * decay + (mine - theirs) ** 2
        best, lead = max(range(len(hits)), key=hits.__getitem__), self._lead
        noise = max(hits[best] + hits[lead], spread[best][lead]) ** 0.5
        if hits[best] - hits[lead] > self.Z * noise:
            # Rare (once or never in a replay) and worth knowing: which order the tier follows.
            logger.info("dueling: a pool of %d blocks now evicts as %s, whose shadow hit %.0f "
                        "lately against %.0f for %s", self.num_blocks, self.EXPERTS[best],
                        hits[best], hits[lead], self.EXPERTS[lead])
            self._take_lead(best)

    def _take_lead(self, lead: int) -> None:
        """Hand the order to expert ``lead``, built now from its shadow: it hears every linked
        block's link, then adopts what the shadow's policy learned (its order, ghosts, counts,
        intervals; ``EvictionPolicy.adopt``) for the tier's evictable blocks. The shadow heard
        the same traffic, so the new lead goes on as if it had run all along; only the blocks
        the tier holds and the shadow does not (or, above ``SHADOW_BLOCKS``, does not sample)
        are new to it: they go first."""
        expert = make_eviction_policy(self.EXPERTS[lead], self.num_blocks)
        link_no = self._link_no
        for block_id, (parent, parent_no) in self._links.items():
            # A parent that lost its key since (and may hold another now) no longer counts.
            alive = parent >= 0 and parent in self._links and link_no[parent] == parent_no
            expert.on_link(block_id, parent if alive else -1)
        shadow = self._shadows[lead]
        held, keys = shadow.registry, self._key
        expert.adopt(shadow.policy, [(b, keys[b], self._priority[b], held.get(keys[b], -1))
                                     for b in self._inactive])
        self._expert, self._lead = expert, lead
        self._expert_batch = insert_batch_hook(expert)

    def on_lookup(self, keys: Sequence[BlockKey],
                  served_elsewhere: Callable[[BlockKey], bool]) -> None:
        """Score each expert by how far this request's match would reach with its shadow as
        this tier (module doc); from the first lookup on, releases only feed the shadows."""
        self._scores_lookups = True
        if self._sampled is not None:
            keys = [key for key in keys if self._sampled(key)]
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
        self._inactive.pop(block_id, None)
        self._expert.on_remove(block_id)

    def on_hit(self, block_id: int, key: BlockKey) -> None:
        inactive = self._inactive
        if block_id in inactive:
            # A touch (a match would have taken the block out of the order first): the host
            # tier's re-offer of a block it holds. The shadows hear it too, or shadow LRU
            # trails the real one (1,970 against 2,051 hits on one run) and the lead leaves it.
            if self._sampled is None or self._sampled(key):
                for shadow in self._shadows:
                    shadow.touch(key)
            del inactive[block_id]
            inactive[block_id] = None   # most recently used now
            self._expert.on_hit(block_id, key)
        elif self._expert.hits_while_active:
            self._expert.on_hit(block_id, key)

    def on_link(self, block_id: int, parent_id: int) -> None:
        self._link_no[block_id] += 1
        self._links.pop(block_id, None)   # a new link goes last: parents before children
        self._links[block_id] = (parent_id, self._link_no[parent_id] if parent_id >= 0 else 0)
        self._expert.on_link(block_id, parent_id)

    def on_unlink(self, block_id: int) -> None:
        self._links.pop(block_id, None)
        self._expert.on_unlink(block_id)

    def victim(self) -> int | None:
        block_id = self._expert.victim()
        if block_id is not None:
            self._inactive.pop(block_id, None)
            self._links.pop(block_id, None)
        return block_id

    def evict(self, block_id: int) -> None:
        self._inactive.pop(block_id, None)
        self._links.pop(block_id, None)
        self._expert.evict(block_id)

    def __len__(self) -> int:
        return len(self._expert)
