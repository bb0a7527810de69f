"""kvtier.pools.policies (lru_freq, s3fifo, arc, tinylfu, prefix_lru, prefix_gdsf),
kvtier.pools.reuse_policy (prefix_reuse) and kvtier.offload.tinylfu."""

from __future__ import annotations

import random
import textwrap
import zlib

import pytest
from policy_cases import hits, make_trace

from kvtier.errors import ConfigError
from kvtier.offload.admission import make_admission_policy
from kvtier.offload.tinylfu import FrequencySketch, TinyLfuAdmission
from kvtier.pools import BlockPool, eviction_policy_names, make_eviction_policy
from kvtier.pools.policies import (
    ArcEviction,
    LruFreqEviction,
    PrefixGdsfEviction,
    PrefixLruEviction,
    S3FifoEviction,
    TinyLfuEviction,
)
from kvtier.replay.simulator import CostModel, TierSpec, replay
from kvtier.replay.trace import Trace
from kvtier.tiers import Tier

NEW_POLICIES = ["lru_freq", "s3fifo", "arc", "tinylfu", "prefix_lru", "prefix_gdsf",
                "prefix_learned", "prefix_reuse", "dueling"]
ALL_NAMES = ["lru", "fifo", *NEW_POLICIES]


# -- selection --------------------------------------------------------------------------------
def test_names_are_registered():
    assert set(NEW_POLICIES) <= set(eviction_policy_names())
    classes = {"lru_freq": LruFreqEviction, "s3fifo": S3FifoEviction, "arc": ArcEviction,
               "prefix_lru": PrefixLruEviction, "prefix_gdsf": PrefixGdsfEviction,
               "tinylfu": TinyLfuEviction}
    for name, cls in classes.items():
        assert type(BlockPool(Tier.G2, 4, eviction=name).eviction) is cls


def test_select_by_dotted_path():
    pool = BlockPool(Tier.G3, 4, eviction="kvtier.pools.policies.S3FifoEviction")
    assert isinstance(pool.eviction, S3FifoEviction)


def test_user_policy_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_policies.py").write_text(textwrap.dedent("""
        from kvtier.pools.eviction import EvictionPolicy

        class NewestFirst(EvictionPolicy):
            name = "newest_first_test"

            def __init__(self, num_blocks):
                super().__init__(num_blocks)
                self.stack = []

            def on_insert(self, block_id, key, priority):
                self.stack.append(block_id)

            def on_remove(self, block_id):
                self.stack.remove(block_id)

            def victim(self):
                return self.stack.pop() if self.stack else None

            def __len__(self):
                return len(self.stack)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    pool = BlockPool(Tier.G2, 2, eviction="my_policies.NewestFirst")
    ids = pool.allocate(2)
    pool.complete(ids)
    pool.register(ids, [b"a", b"b"])
    pool.release(ids)  # a then b become evictable; the user policy evicts b first
    pool.allocate(1)
    assert b"a" in pool and b"b" not in pool
    # The replay accepts the same path.
    assert hits(make_trace([[1, 2], [1, 2]]), "my_policies.NewestFirst", 4) == 2


def test_unknown_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="not known"):
        make_eviction_policy("mru_please", 4)
    with pytest.raises(ConfigError, match="could not be imported"):
        make_eviction_policy("no.such.module.Policy", 4)


# -- pool invariants under random traffic -----------------------------------------------------
@pytest.mark.parametrize("name", ALL_NAMES)
def test_policy_keeps_pool_invariants(name):
    rng = random.Random(zlib.crc32(name.encode()) & 0xFFFF)  # fixed: hash() varies per process
    pool = BlockPool(Tier.G2, 12, eviction=name)
    held: list[int] = []
    for step in range(1500):
        op = rng.random()
        if op < 0.35:  # a request: match a prefix, compute the rest
            root = rng.randrange(6)
            chain = [root * 100 + depth for depth in range(rng.randint(1, 6))]
            got = pool.match(chain)
            room = min(len(chain) - len(got), pool.num_free + pool.num_inactive)
            fresh = pool.allocate(room)
            pool.complete(fresh)
            got += pool.register(fresh, chain[len(got):len(got) + room],
                                 priority=rng.choice([0, 0, 0, 5]))
            if rng.random() < 0.5:
                got.reverse()
                pool.release(got)
            else:
                held += got
        elif op < 0.6 and held:
            rng.shuffle(held)
            cut = rng.randint(1, len(held))
            pool.release(held[:cut])
            del held[:cut]
        elif op < 0.75:
            pool.touch([rng.randrange(6) * 100 + d for d in range(rng.randint(1, 4))])
        elif op < 0.85:
            pool.discard([rng.randrange(6) * 100 + rng.randrange(6)])
        elif op < 0.87:
            pool.clear()
        else:
            pool.lookup([rng.randrange(6) * 100])
        pool.check_invariants()
    pool.release(held)
    pool.check_invariants()
    # Everything registered is evictable now: the policy hands every block back exactly once.
    victims = pool.allocate(pool.num_free + pool.num_inactive)
    assert len(victims) == len(set(victims)) == pool.num_blocks
    pool.check_invariants()


@pytest.mark.parametrize("name", NEW_POLICIES)
def test_priority_blocks_go_last(name):
    pool = BlockPool(Tier.G2, 6, eviction=name)
    ids = pool.allocate(6)
    pool.complete(ids)
    pool.register(ids[:3], [b"p1", b"p2", b"p3"], priority=50)
    pool.register(ids[3:], [b"d1", b"d2", b"d3"])
    pool.release(ids)
    pool.allocate(3)
    assert all(key in pool for key in (b"p1", b"p2", b"p3"))
    assert not any(key in pool for key in (b"d1", b"d2", b"d3"))


# -- behaviour: scan resistance ---------------------------------------------------------------
def hot_and_scan_trace(rounds: int = 60, scan_requests: int = 4, scan_len: int = 3,
                       seed: int = 1) -> Trace:
    """A hot 4-block conversation prefix re-sent between bursts of one-time prompts."""
    rng = random.Random(seed)
    next_id = 1000
    chains = []
    for _ in range(rounds):
        chains.append([1, 2, 3, 4])
        for _ in range(scan_requests):
            chains.append(list(range(next_id, next_id + scan_len)))
            next_id += scan_len
        rng.shuffle(chains[-scan_requests:])
    return make_trace(chains)


# prefix_lru is LRU's recency order (leaf-first only), so it is not scan resistant.
@pytest.mark.parametrize("name", [n for n in NEW_POLICIES if n != "prefix_lru"])
def test_scan_resistant_policies_beat_lru(name):
    # 12 one-time blocks pass between two uses of the hot prefix; the pool holds 10, so LRU
    # always loses the prefix and the scan-resistant policies keep it.
    trace = hot_and_scan_trace()
    lru = hits(trace, "lru", 10)
    assert lru == 0
    assert hits(trace, name, 10) >= 4 * 40  # the prefix hits in most rounds


def test_lru_freq_evicts_first_offers_first():
    policy = LruFreqEviction(4)
    policy.on_insert(0, b"old", 0)
    policy.on_remove(0)  # a match takes it...
    policy.on_hit(0, b"old")
    policy.on_insert(0, b"old", 0)  # ...and returns it: a hit, kept at the recent end
    policy.on_insert(1, b"new", 0)  # first offer to the frequency filter: rejected
    assert policy.victim() == 1
    assert policy.victim() == 0
    assert policy.victim() is None


def test_s3fifo_ghost_sends_returning_keys_to_main():
    policy = S3FifoEviction(10)  # small queue target: 1 block
    for block_id in range(3):
        policy.on_insert(block_id, block_id, 0)
    assert policy.victim() == 0  # oldest of the small queue, never hit: evicted, key in ghost
    policy.on_insert(0, 0, 0)  # key 0 again (recomputed): goes straight to main
    # Small queue holds 1, 2 (over target): they go before main's block 0.
    assert [policy.victim(), policy.victim()] == [1, 2]
    assert policy.victim() == 0


def test_s3fifo_ghost_learns_a_victim_another_policy_chose():
    policy = S3FifoEviction(10)  # small queue target: 1 block
    for block_id in range(3):
        policy.on_insert(block_id, block_id, 0)
    assert policy.victim() == 0
    policy.on_insert(0, 0, 0)  # a ghost hit: main holds block 0, small holds 1, 2
    policy.evict(1)  # a combining policy evicted block 1 (key 1) from the small queue
    policy.on_insert(3, 1, 0)  # key 1 comes back in block 3: to main, behind block 0
    assert [policy.victim(), policy.victim(), policy.victim()] == [2, 0, 3]


def test_arc_touch_moves_block_to_frequent_list():
    policy = ArcEviction(10)  # T1's target p starts at half the pool
    for block_id in range(10):
        policy.on_insert(block_id, block_id, 0)
    policy.on_hit(0, 0)  # touch of the oldest evictable block: used again -> T2
    # T1 (9 blocks) is over its target: its oldest go first; block 0 is protected in T2.
    assert [policy.victim() for _ in range(4)] == [1, 2, 3, 4]


def test_tinylfu_keeps_frequent_over_new():
    policy = TinyLfuEviction(100)  # window of 1 block
    for _ in range(5):
        policy._sketch.increment(b"hot")
    policy.on_insert(0, b"hot", 0)
    policy.on_insert(1, b"cold", 0)  # window over target: hot moves to main (room)
    for block_id in range(2, 100):
        policy.on_insert(block_id, block_id, 0)
    # The pool is full; the window's oldest candidates (seen once) lose to nothing colder in
    # main than themselves, and the hot block is never the one chosen.
    victims = [policy.victim() for _ in range(60)]
    assert 0 not in victims


# -- TinyLFU sketch and admission -------------------------------------------------------------
def test_sketch_counts_never_under_and_cap():
    sketch = FrequencySketch(width_hint=256, sample_size=10_000)
    rng = random.Random(3)
    truth: dict[int, int] = {}
    for _ in range(2000):
        key = rng.randrange(300)
        truth[key] = truth.get(key, 0) + 1
        sketch.increment(key)
    for key, count in truth.items():
        assert sketch.estimate(key) >= min(count, 15)
    assert max(sketch.estimate(k) for k in truth) == 15


def test_sketch_halves_after_sample():
    sketch = FrequencySketch(width_hint=64, sample_size=20)
    for _ in range(8):
        sketch.increment(b"k")
    before = sketch.estimate(b"k")
    for key in range(12):
        sketch.increment(key)  # reaches 20 additions: every counter halves
    assert sketch.estimate(b"k") == before // 2


def test_tinylfu_admission_second_offer():
    admission = make_admission_policy("tinylfu")
    assert isinstance(admission, TinyLfuAdmission)
    assert admission.admit(b"a") is False
    assert admission.admit(b"b") is False
    assert admission.admit(b"a") is True
    assert make_admission_policy("tinylfu", min_count=1).admit(b"x") is True
    with pytest.raises(ConfigError):
        make_admission_policy("tinylfu", min_count=0)


def test_tinylfu_admission_forgets_old_offers():
    admission = TinyLfuAdmission(sample_size=64, width=64)
    admission.admit(b"once")
    for key in range(200):  # several halvings
        admission.admit(key + 10_000)
    assert admission.admit(b"once") is False


def eviction_order(name: str, priority: int, trace: Trace, capacity: int) -> list:
    """Keys in the order a pool of ``capacity`` evicts them while serving ``trace``, every
    block registered with ``priority``."""
    pool = BlockPool(Tier.G2, capacity, eviction=name)
    order = []
    for request in trace.requests:
        chain = list(request.hash_ids)
        held = pool.match(chain)
        before = {pool.key_of(b) for b in range(capacity)} - {None}
        fresh = pool.allocate(len(chain) - len(held))
        order += sorted(before - ({pool.key_of(b) for b in range(capacity)} - {None}))
        pool.complete(fresh)
        held += pool.register(fresh, chain[len(held):], priority=priority)
        pool.release(held[::-1])
    return order


@pytest.mark.parametrize("name", ["lru_freq", "s3fifo", "arc", "tinylfu"])
def test_policy_orders_the_connectors_uniform_priority_blocks_itself(name):
    # The connector's tiers register every block of a default-priority request at priority
    # 100: the policy's own order must apply to them as it does at 0, not fall back to LRU.
    trace = hot_and_scan_trace(rounds=20)
    at_zero = eviction_order(name, 0, trace, 10)
    assert at_zero != eviction_order("lru", 0, trace, 10)  # the control: it differs from LRU
    assert eviction_order(name, 100, trace, 10) == at_zero


@pytest.mark.parametrize("name", NEW_POLICIES)
def test_blocks_above_the_main_priority_go_last(name):
    pool = BlockPool(Tier.G2, 6, eviction=name)
    ids = pool.allocate(6)
    pool.complete(ids)
    pool.register(ids[:3], [b"d1", b"d2", b"d3"], priority=100)
    pool.register(ids[3:], [b"k1", b"k2", b"k3"], priority=100)
    pool.release(ids)
    more = pool.allocate(1)
    pool.complete(more)
    pool.release(pool.register(more, [b"low"], priority=20))   # below: the next to go
    pool.allocate(1)
    assert b"low" not in pool
    assert sum(key in pool for key in (b"d1", b"d2", b"d3", b"k1", b"k2", b"k3")) == 5


@pytest.mark.parametrize("name", ["s3fifo", "arc", "prefix_gdsf", "prefix_learned",
                                  "prefix_reuse"])
def test_host_tier_policy_works_through_the_connectors_leader(name):
    # G1 holds one request; the host tier, run by the real Leader, holds 10 blocks: LRU there
    # loses the hot prefix to the scans, a scan-resistant host policy keeps it.
    trace = hot_and_scan_trace()

    def g2_hits(policy: str) -> int:
        result = replay(trace, [TierSpec(Tier.G1, 4), TierSpec(Tier.G2, 10, eviction=policy)],
                        cost=CostModel(bytes_per_token=1))
        return result.tiers[1].blocks_hit

    assert g2_hits("lru") == 0
    assert g2_hits(name) >= 4 * 30


# s3fifo's and tinylfu's victim search moves other blocks (promotions), which a victim chosen
# elsewhere skips, so their state cannot match exactly (s3fifo's ghost is tested above).
@pytest.mark.parametrize("name", [n for n in ALL_NAMES if n not in ("s3fifo", "tinylfu")])
def test_a_victim_evicted_by_another_policy_teaches_as_one_of_its_own(name):
    # ``evict(b)`` (a combining policy, e.g. dueling, chose b) must leave the policy as its
    # own ``victim()`` returning b would: ghost histories included, else keys evicted while
    # another expert leads never earn their way back.
    own, told = make_eviction_policy(name, 16), make_eviction_policy(name, 16)
    rng = random.Random(11)
    key_of = {b: b"k%d" % b for b in range(16)}
    evicted: list[bytes] = []
    for block, key in key_of.items():
        for policy in (own, told):
            policy.on_insert(block, key, 0)
    for step in range(400):
        if rng.random() < 0.4:  # a hit: matched (taken out), then released again
            block = rng.randrange(16)
            for policy in (own, told):
                policy.on_remove(block)
                policy.on_hit(block, key_of[block])
                policy.on_insert(block, key_of[block], 0)
            continue
        block = own.victim()
        if step % 2:
            told.evict(block)
        else:
            assert told.victim() == block, step
        evicted.append(key_of[block])
        # Half the new keys are evicted ones coming back (ghost hits), half are new.
        key = evicted.pop(rng.randrange(len(evicted))) if rng.random() < 0.5 else b"n%d" % step
        key_of[block] = key
        for policy in (own, told):
            policy.on_insert(block, key, 0)
