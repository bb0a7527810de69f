"""dueling (kvtier.pools.dueling): shadows pick the expert whose order the pool follows."""

from __future__ import annotations

import hashlib
import logging
import random
from typing import ClassVar

import pytest
from policy_cases import hits, make_trace, order_of_one_time_blocks

from kvtier.pools import BlockPool
from kvtier.pools.dueling import DuelingEviction, _KeySample, _Shadow
from kvtier.replay.simulator import CostModel, TierSpec, replay
from kvtier.replay.trace import Trace
from kvtier.tiers import Tier


def round_robin(users: int = 6, turns: int = 12) -> Trace:
    """Users take turns re-sending a growing history: prefix_reuse's case."""
    return make_trace([[u * 1000 + i for i in range(3 + t)]
                       for t in range(turns) for u in range(users)])


def hot_and_scans(rounds: int = 80, seed: int = 3) -> Trace:
    """A hot prefix between bursts of one-time prompts: LRU loses it, the others keep it."""
    rng = random.Random(seed)
    chains, fresh = [], 10_000
    for _ in range(rounds):
        chains.append([1, 2, 3, 4])
        for _ in range(rng.randint(4, 5)):
            chains.append(list(range(fresh, fresh + 3)))
            fresh += 3
    return make_trace(chains)


class RecordedDueling(DuelingEviction):
    """DuelingEviction that keeps its instances, to read the lead after a replay."""

    instances: ClassVar[list[DuelingEviction]] = []

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self.instances.append(self)


def lead_after(trace: Trace, capacity: int) -> str:
    RecordedDueling.instances.clear()
    hits(trace, f"{__name__}.RecordedDueling", capacity)
    (policy,) = RecordedDueling.instances
    return policy.lead


def test_follows_the_reuse_interval_expert_on_round_robin_conversations(caplog):
    trace, capacity = round_robin(), 24
    lru, reuse = hits(trace, "lru", capacity), hits(trace, "prefix_reuse", capacity)
    assert reuse > 3 * lru  # the control: the experts differ a lot here
    assert hits(trace, "dueling", capacity) >= 0.8 * reuse
    caplog.set_level(logging.INFO, logger="kvtier.pools.dueling")
    assert lead_after(trace, capacity) == "prefix_reuse"
    # The change of order is logged, once: a user can see which expert the tier follows.
    (line,) = [r.getMessage() for r in caplog.records if r.name == "kvtier.pools.dueling"]
    assert "24 blocks now evicts as prefix_reuse" in line and "for lru" in line


def test_leaves_lru_when_a_scan_resistant_expert_keeps_a_hot_prefix():
    trace, capacity = hot_and_scans(), 10
    assert hits(trace, "lru", capacity) == 0  # 12-15 one-time blocks between two uses
    best = max(hits(trace, p, capacity) for p in ("arc", "prefix_gdsf", "prefix_reuse"))
    assert hits(trace, "dueling", capacity) >= 0.8 * best
    assert lead_after(trace, capacity) != "lru"


def test_stays_lru_without_evidence():
    # Nothing is ever reused: no shadow hits, so the lead never leaves LRU and the order is
    # LRU's (oldest release first).
    assert order_of_one_time_blocks("dueling") == [b"a", b"b", b"c", b"d"]
    one_time = make_trace([[i * 10, i * 10 + 1] for i in range(40)])
    assert lead_after(one_time, 6) == "lru"


def lead_after_releases(*runs: tuple[int, list[int]]) -> str:
    """The lead after ``count`` releases with shadow hits ``got`` (per expert), for each
    ``(count, got)`` in order."""
    policy = DuelingEviction(8)
    for count, got in runs:
        for _ in range(count):
            policy.score_release(got)
    return policy.lead


def test_the_lead_changes_only_beyond_the_noise():
    assert DuelingEviction.EXPERTS[:3] == ("lru", "arc", "prefix_gdsf")
    # One request with a long match is one lucky event, however many blocks it matched (a
    # 47-block tier flipped on a 17-block match and fell to 0.42x LRU).
    assert lead_after_releases((1, [0, 17, 0, 0])) == "lru"
    assert lead_after_releases((4, [0, 17, 0, 0])) == "lru"      # 68 = 2 x sqrt(4 x 17^2)
    assert lead_after_releases((5, [0, 17, 0, 0])) == "arc"      # several agree: evidence
    assert lead_after_releases((2, [0, 2, 0, 0])) == "lru"
    assert lead_after_releases((3, [0, 2, 0, 0])) == "lru"       # 6 = 2 x sqrt(3 x 2^2)
    assert lead_after_releases((5, [0, 2, 0, 0])) == "arc"
    # Wins both ways: arc is 50 ahead on 550, well inside the noise of the differences.
    assert lead_after_releases(*[(1, [5, 0, 0, 0]), (1, [0, 6, 0, 0])] * 50) == "lru"
    # Where both hit alike, a small margin every release agrees on is still inside the noise
    # of the counts: 15 against 2 x sqrt(2 x 6,300) keeps the lead (behind a G1 tier such
    # margins were estimates worth less than the lead's own hits).
    assert lead_after_releases((1000, [10, 10, 0, 0]), (5, [0, 3, 0, 0])) == "lru"
    assert lead_after_releases((1000, [10, 10, 0, 0]), (400, [9, 10, 0, 0])) == "arc"
    assert lead_after_releases((10, [0, 3, 0, 0]), (10, [0, 0, 4, 0])) == "arc"  # 40 vs 30
    assert lead_after_releases((10, [0, 3, 0, 0]), (40, [0, 0, 4, 0])) == "prefix_gdsf"
    assert lead_after_releases((50, [5, 5, 5, 5])) == "lru"      # ties keep the lead


def test_shadows_hear_touches():
    # The host tier touches a block it already holds when the device offers it again; shadow
    # LRU must keep it as the real LRU does, or the shadows misjudge LRU.
    policy = DuelingEviction(2)
    pool = BlockPool(Tier.G2, 2, eviction=policy)
    for key in (b"a", b"b"):
        (slot,) = pool.allocate(1)
        pool.complete([slot])
        pool.release(pool.register([slot], [key]))
    pool.touch([b"a"])                       # b is now the least recently used
    (slot,) = pool.allocate(1)
    pool.complete([slot])
    pool.release(pool.register([slot], [b"c"]))
    assert b"a" in pool and b"b" not in pool
    shadow_lru = policy._shadows[0].registry
    assert b"a" in shadow_lru and b"b" not in shadow_lru


def concurrent_chats(pool_a: BlockPool, pool_b: BlockPool, steps: int = 600,
                     seed: int = 5) -> int:
    """Drive both pools with the same requests: users re-send growing histories while up to
    four requests hold blocks (so matches hit active blocks too). Asserts after every
    step that both hold the same keys; returns how many matched blocks another request held."""
    rng = random.Random(seed)
    turns = [0] * 8
    held: list[tuple[list[int], list[int]]] = []
    hits_on_held = 0
    for step in range(steps):
        user = rng.randrange(len(turns))
        turns[user] += 1
        chain = [user * 1000 + i for i in range(2 + 2 * turns[user])][-12:]
        chain = [-1, -2] + chain  # a system prompt every request shares
        taken = []
        for pool in (pool_a, pool_b):
            got = pool.match(chain)
            if pool is pool_a:
                held_ids = {block for blocks, _ in held for block in blocks}
                hits_on_held += sum(block in held_ids for block in got)
            room = min(len(chain) - len(got), pool.num_free + pool.num_inactive)
            fresh = pool.allocate(room)
            pool.complete(fresh)
            got += pool.register(fresh, chain[len(got):len(got) + room],
                                 parent=chain[len(got) - 1] if got else None)
            taken.append(got)
        held.append((taken[0], taken[1]))
        while len(held) > rng.randint(1, 4):
            a, b = held.pop(rng.randrange(len(held)))
            pool_a.release(a[::-1])
            pool_b.release(b[::-1])
        keys = range(-2, 9000)
        assert [k for k in keys if k in pool_a] == [k for k in keys if k in pool_b], step
    return hits_on_held


@pytest.mark.parametrize("expert", DuelingEviction.EXPERTS)
def test_one_expert_alone_evicts_exactly_as_that_policy(expert):
    # The experts hear every hook as a pool would tell them alone: hits on blocks another
    # request holds included (arc's clock counts them; dueling once dropped them).
    alone = type("OneExpert", (DuelingEviction,), {"EXPERTS": (expert,)})
    assert concurrent_chats(BlockPool(Tier.G2, 20, eviction=expert),
                            BlockPool(Tier.G2, 20, eviction=alone(20))) > 100


def serve(pool: BlockPool, chain: list, priorities: list[int]) -> int:
    """Serve ``chain`` from ``pool`` as the replay serves its device tier: match the prefix,
    register the rest that fits, release tail first. Returns the prefix hits."""
    held = pool.match(chain)
    hits = len(held)
    room = min(len(chain) - hits, pool.num_free + pool.num_inactive)
    if room:
        fresh = pool.allocate(room)
        pool.complete(fresh)
        held += pool.register(fresh, chain[hits:hits + room],
                              parent=chain[hits - 1] if hits else None,
                              priority=priorities[hits:hits + room])
    pool.release(held[::-1])
    return hits


@pytest.mark.parametrize("expert", DuelingEviction.EXPERTS)
def test_a_shadow_hits_and_keeps_exactly_what_a_block_pool_would(expert):
    # The shadow is a lean copy of the pool's bookkeeping: same hooks, same order, no states.
    rng = random.Random(11)
    shadow, pool = _Shadow(expert, 24), BlockPool(Tier.G2, 24, eviction=expert)
    turns = [0] * 9
    for _ in range(700):
        user = rng.randrange(len(turns))
        turns[user] += 1
        chain = [-1, -2] + [user * 1000 + i for i in range(1 + 2 * turns[user])][-10:]
        if rng.random() < 0.3:
            chain = chain[rng.randrange(len(chain)):][:1]     # a host tier's single release
        priorities = [rng.choice((10, 50, 100)) for _ in chain]
        assert shadow.request(chain, priorities) == serve(pool, chain, priorities)
        if rng.random() < 0.2:
            touched = rng.choice(chain)
            shadow.touch(touched)
            pool.touch([touched])
        assert set(shadow.registry) == {k for k in range(-2, 9000) if k in pool}


def lead_with_lookups(trace: Trace, capacity: int, served_elsewhere,
                      dueling: type[DuelingEviction] = DuelingEviction) -> str:
    """The lead after serving ``trace`` from one pool whose requests are first shown to the
    policy as lookups (as the leader shows its host and disk tiers')."""
    policy = dueling(capacity)
    pool = BlockPool(Tier.G2, capacity, eviction=policy)
    for request in trace.requests:
        chain = list(request.hash_ids)
        policy.on_lookup(chain, served_elsewhere)
        serve(pool, chain, [0] * len(chain))
    return policy.lead


def test_lookups_score_the_whole_stack_s_reach():
    trace, capacity = hot_and_scans(), 10
    nowhere = frozenset().__contains__
    # The control: alone, the scan-resistant experts win by keeping the hot prefix 1-4.
    assert lead_with_lookups(trace, capacity, nowhere) != "lru"
    # Another tier holds the whole hot prefix: keeping it here adds nothing, and the hits
    # the shadows have at release time no longer count either.
    assert lead_with_lookups(trace, capacity, frozenset({1, 2, 3, 4}).__contains__) == "lru"
    # It holds all but the head: a match reaches the rest only through this tier's copy of
    # block 1, so keeping it is worth the whole prefix.
    assert lead_with_lookups(trace, capacity, frozenset({2, 3, 4}).__contains__) != "lru"


class LookupRecorder(DuelingEviction):
    """dueling that keeps what each lookup was told."""

    lookups: ClassVar[list[list[bool]]] = []

    def on_lookup(self, keys, served_elsewhere) -> None:
        self.lookups.append([served_elsewhere(key) for key in keys])
        super().on_lookup(keys, served_elsewhere)


def test_the_leader_shows_each_lookup_to_the_host_tier_with_what_the_disk_holds():
    # 30 users send the same 6-block prompt three times; the disk (admitting from the second
    # offer) holds the third round's prompts, the host tier (40 blocks) few of them.
    trace = make_trace([[u * 100 + i for i in range(6)] for _ in range(3) for u in range(30)])
    LookupRecorder.lookups.clear()
    replay(trace, [TierSpec(Tier.G1, 8),
                   TierSpec(Tier.G2, 40, eviction=f"{__name__}.LookupRecorder"),
                   TierSpec(Tier.G3, 200)], cost=CostModel(bytes_per_token=1))
    lookups = LookupRecorder.lookups
    assert 60 <= len(lookups) <= len(trace.requests)   # one per request past G1's prefix
    on_disk = [held for lookup in lookups for held in lookup]
    assert any(on_disk) and not all(on_disk)


# prefix_learned is no expert of dueling's, but its adopt is the same contract (a user's
# dueling subclass may run it).
@pytest.mark.parametrize("expert", [*DuelingEviction.EXPERTS, "prefix_learned"])
def test_a_new_lead_evicts_exactly_as_it_would_have_alone(expert):
    # Only the lead keeps an order over the tier's blocks; a new lead adopts what its shadow
    # learned. With the shadow as this pool (one expert twice, the same traffic), the adopted
    # lead must go on exactly as the expert alone: a lead rebuilt from the blocks only (the
    # default ``adopt``) forgets counts, intervals and ghosts and fails this for all but LRU.
    twice = type("Twice", (DuelingEviction,), {"EXPERTS": (expert, expert)})
    policy = twice(24)
    pool, alone = BlockPool(Tier.G2, 24, eviction=policy), BlockPool(Tier.G2, 24, eviction=expert)
    rng = random.Random(7)
    turns = [0] * 9
    for step in range(900):
        if step % 150 == 149:
            policy._take_lead(1 - policy._lead)   # rebuilt from the other shadow
        user = rng.randrange(len(turns))
        turns[user] += 1
        chain = [-1, -2] + [user * 1000 + i for i in range(1 + 2 * turns[user])][-10:]
        if rng.random() < 0.3:
            chain = chain[rng.randrange(len(chain)):][:1]     # a host tier's single release
        priorities = [rng.choice((50, 100, 100, 100)) for _ in chain]
        assert serve(pool, chain, priorities) == serve(alone, chain, priorities), step
        if rng.random() < 0.2:
            touched = rng.choice(chain)
            pool.touch([touched])
            alone.touch([touched])
        assert [k for k in range(-2, 9000) if k in pool] == \
            [k for k in range(-2, 9000) if k in alone], step


def test_decay_owed_over_releases_without_hits_is_paid_before_the_next_score():
    # Releases no shadow hits on only age the counts: 10,000 of them leave arc's 30 hits
    # worth nothing, so prefix_gdsf's 40 after them take the lead. Were the owed decay
    # dropped, arc would keep its 30 and the lead (10 ahead is inside the noise).
    assert lead_after_releases((10, [0, 3, 0, 0])) == "arc"
    assert lead_after_releases((10, [0, 3, 0, 0]), (10_000, [0, 0, 0, 0]),
                               (10, [0, 0, 4, 0])) == "prefix_gdsf"
    assert lead_after_releases((10, [0, 3, 0, 0]), (10, [0, 0, 4, 0])) == "arc"


def test_a_key_sample_holds_its_rate_of_any_keys_the_same_in_every_run():
    sample = _KeySample(0.1)
    counting = sum(map(sample.holds, range(100_000)))          # the replay's trace ids
    digests = sum(sample.holds(hashlib.sha256(b"%d" % i).digest()) for i in range(100_000))
    assert 9_500 < counting < 10_500 and 9_500 < digests < 10_500
    assert [k for k in range(500) if _KeySample(0.1).holds(k)] == \
        [k for k in range(500) if sample.holds(k)]
    assert _KeySample(1.0).everything and not sample.everything


class SmallShadows(RecordedDueling):
    """dueling whose shadows sample any tier above 48 blocks."""

    SHADOW_BLOCKS = 48


def test_a_large_tier_s_shadows_follow_a_sample_of_its_keys_at_a_fixed_size():
    trace, capacity = round_robin(users=48, turns=12), 192     # the shadows see a quarter
    lru, reuse = hits(trace, "lru", capacity), hits(trace, "prefix_reuse", capacity)
    assert reuse > 3 * lru  # the control: the experts differ a lot here
    RecordedDueling.instances.clear()
    assert hits(trace, f"{__name__}.SmallShadows", capacity) >= 0.8 * reuse
    (policy,) = RecordedDueling.instances
    assert policy.lead == "prefix_reuse"
    for shadow in policy._shadows:
        assert len(shadow._key) == 48 and len(shadow.registry) == 48
        assert all(map(policy._sampled, shadow.registry))
    nowhere = frozenset().__contains__
    assert lead_with_lookups(trace, capacity, nowhere, SmallShadows) == "prefix_reuse"


def test_a_sampled_tier_s_lookup_reaches_as_far_as_its_sampled_blocks_match():
    policy = SmallShadows(192)
    pool = BlockPool(Tier.G2, 192, eviction=policy)
    chain = list(range(100, 140))
    serve(pool, chain, [0] * len(chain))
    sampled = [key for key in chain if policy._sampled(key)]
    assert 4 < len(sampled) < 30
    policy.on_lookup(chain + [999], frozenset().__contains__)   # every shadow holds them all
    assert policy._hits == [len(sampled)] * len(policy.EXPERTS)
    policy.on_lookup([sampled[0], 5, 6, 7], frozenset({5, 6, 7}).__contains__)   # 1 + 3 others
    assert policy._hits[0] == len(sampled) * policy.DECAY + 1 + sum(map(policy._sampled, [5, 6, 7]))


def test_a_new_lead_of_a_sampled_tier_evicts_the_blocks_it_never_saw_first_oldest_first():
    # arc orders blocks it knows nothing of as LRU (the prefix-aware experts would too, but
    # must take a block's sampled descendants before it: leaves first).
    policy = SmallShadows(192)
    pool = BlockPool(Tier.G2, 192, eviction=policy)
    rng = random.Random(3)
    for _ in range(400):
        user = rng.randrange(40)
        serve(pool, [user * 1000 + i for i in range(rng.randint(2, 8))], [0] * 8)
    unseen = [block for block in policy._inactive if not policy._sampled(policy._key[block])]
    assert 100 < len(unseen) < len(policy._inactive)
    policy._take_lead(DuelingEviction.EXPERTS.index("arc"))
    assert [policy.victim() for _ in unseen] == unseen


def test_the_host_tier_by_default_leaves_lru_where_lru_loses():
    # The host tier's default policy (what a user gets without choosing) follows the evidence:
    # behind a G1 tier, conversations taking turns beat LRU 5x in the host tier.
    def host_hits(eviction: str | None) -> int:
        return replay(round_robin(), [TierSpec(Tier.G1, 6), TierSpec(Tier.G2, 24, eviction=eviction)],
                      cost=CostModel(bytes_per_token=1)).total.blocks_hit

    assert host_hits(None) > 4 * host_hits("lru")
