"""kvtier.pools: block states, registry, free list, eviction order, events, error paths."""

from __future__ import annotations

import pytest

from kvtier.errors import BlockStateError, ConfigError
from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBuffer
from kvtier.pools import (
    BlockPool,
    BlockState,
    EvictionPolicy,
    FifoEviction,
    LruEviction,
    eviction_policy_names,
    make_eviction_policy,
    register_policy,
)
from kvtier.tiers import Tier


def make_pool(num_blocks: int = 8, eviction="lru", events: bool = True) -> BlockPool:
    return BlockPool(Tier.G2, num_blocks, eviction=eviction,
                     events=EventBuffer() if events else None, block_size=4)


def free_order(pool: BlockPool) -> list[int]:
    order, block_id = [], pool._next[pool._sentinel]
    while block_id != pool._sentinel:
        order.append(block_id)
        block_id = pool._next[block_id]
    return order


def eviction_order(pool: BlockPool) -> list[int]:
    """The policy's victims, in order, without disturbing the pool (on a copy)."""
    import copy
    policy = copy.deepcopy(pool.eviction)
    order = []
    while (victim := policy.victim()) is not None:
        order.append(victim)
    return order


def snapshot(pool: BlockPool) -> tuple:
    n = pool.num_blocks
    return (
        [pool.state_of(b) for b in range(n)], [pool.ref_count(b) for b in range(n)],
        [pool.key_of(b) for b in range(n)], dict(pool._registry), free_order(pool),
        eviction_order(pool), pool.num_free, pool.num_inactive, pool.num_active,
        len(pool._events) if pool._events is not None else None)


def stored_blocks(pool: BlockPool, keys: list, release: bool = True) -> list[int]:
    """Allocate, complete and register one block per key; optionally release them."""
    ids = pool.allocate(len(keys))
    assert len(ids) == len(keys)
    pool.complete(ids)
    ids = pool.register(ids, keys)
    if release:
        pool.release(ids)
    return ids


# -- construction and counts ----------------------------------------------------------------
def test_fresh_pool():
    pool = make_pool(5)
    assert (pool.num_free, pool.num_inactive, pool.num_active) == (5, 0, 0)
    assert pool.usage == 0.0
    assert all(pool.state_of(b) is BlockState.RESET for b in range(5))
    assert free_order(pool) == [0, 1, 2, 3, 4]
    pool.check_invariants()


def test_bad_construction():
    with pytest.raises(BlockStateError):
        BlockPool(Tier.G2, 0)
    with pytest.raises(ConfigError, match="lru"):
        BlockPool(Tier.G2, 4, eviction="no-such-policy")


# -- allocate -------------------------------------------------------------------------------
def test_allocate_takes_free_blocks_in_order():
    pool = make_pool(4)
    ids = pool.allocate(3)
    assert ids == [0, 1, 2]
    assert all(pool.state_of(b) is BlockState.PARTIAL and pool.ref_count(b) == 1 for b in ids)
    assert (pool.num_free, pool.num_inactive, pool.num_active) == (1, 0, 3)
    assert pool.usage == 0.75
    assert pool.allocate(0) == []
    pool.check_invariants()


def test_allocate_negative_raises():
    pool = make_pool(4)
    before = snapshot(pool)
    with pytest.raises(BlockStateError):
        pool.allocate(-1)
    assert snapshot(pool) == before


def test_allocate_is_all_or_nothing():
    pool = make_pool(4)
    held = pool.allocate(2)
    stored_blocks(pool, [b"k"])
    assert (pool.num_free, pool.num_inactive, pool.num_active) == (1, 1, 2)
    before = snapshot(pool)
    assert pool.allocate(3) == []
    assert snapshot(pool) == before
    assert pool.allocate(2) != []
    pool.release(held)
    pool.check_invariants()


def test_allocate_evicts_inactive_blocks_lru_and_emits_removed():
    pool = make_pool(3)
    ids = stored_blocks(pool, [b"a", b"b", b"c"])  # released in order a, b, c
    pool._events.take_events()
    new = pool.allocate(2)
    assert new == [ids[0], ids[1]]  # least recently released first
    assert pool.lookup([b"a"]) == 0 and pool.lookup([b"b"]) == 0 and pool.lookup([b"c"]) == 1
    assert pool.key_of(new[0]) is None and pool.state_of(new[0]) is BlockState.PARTIAL
    events = pool._events.take_events()
    assert events == [BlockRemoved([b"a", b"b"], Tier.G2)]
    pool.check_invariants()


def test_allocate_uses_free_list_before_evicting():
    pool = make_pool(3)
    stored_blocks(pool, [b"a"])
    assert pool.allocate(2) == [1, 2]
    assert pool.lookup([b"a"]) == 1
    assert pool.allocate(1) == [0]
    assert pool.lookup([b"a"]) == 0


class _BrokenPolicy(LruEviction):
    name = "test-broken"

    def victim(self):
        return None


def test_a_policy_that_breaks_its_contract_is_reported():
    pool = make_pool(2, eviction=_BrokenPolicy(2))
    stored_blocks(pool, [b"a"])
    with pytest.raises(BlockStateError, match="test-broken"):
        pool.allocate(2)
    pool.check_invariants()
    assert pool.num_active == 0


# -- complete -------------------------------------------------------------------------------
def test_complete_moves_partial_to_complete():
    pool = make_pool(4)
    ids = pool.allocate(2)
    pool.complete(ids)
    assert [pool.state_of(b) for b in ids] == [BlockState.COMPLETE] * 2
    pool.check_invariants()


@pytest.mark.parametrize("setup", ["reset", "complete", "registered"])
def test_complete_of_a_non_partial_block_raises_and_changes_nothing(setup):
    pool = make_pool(4)
    ids = pool.allocate(2)
    if setup == "complete":
        pool.complete([ids[1]])
    elif setup == "registered":
        pool.complete([ids[1]])
        pool.register([ids[1]], [b"k"])
    target = 3 if setup == "reset" else ids[1]
    before = snapshot(pool)
    with pytest.raises(BlockStateError, match=f"block {target} in state"):
        pool.complete([ids[0], target])
    assert snapshot(pool) == before


@pytest.mark.parametrize("bad_id", [-1, 4, 100])
def test_unknown_block_ids_raise_everywhere(bad_id):
    pool = make_pool(4)
    ids = pool.allocate(1)
    before = snapshot(pool)
    for call in (lambda: pool.complete([ids[0], bad_id]), lambda: pool.release([bad_id]),
                 lambda: pool.register([bad_id], [b"k"]), lambda: pool.restore([(bad_id, b"k")]),
                 lambda: pool.key_of(bad_id), lambda: pool.state_of(bad_id),
                 lambda: pool.ref_count(bad_id)):
        with pytest.raises(BlockStateError, match="block id"):
            call()
    assert snapshot(pool) == before


# -- register -------------------------------------------------------------------------------
def test_register_makes_blocks_matchable_and_emits_one_stored_event():
    pool = make_pool(4)
    ids = pool.allocate(2)
    pool.complete(ids)
    out = pool.register(ids, [11, 12], parent=10, token_ids=list(range(8)), lora_name="ad")
    assert out == ids
    assert [pool.state_of(b) for b in ids] == [BlockState.REGISTERED] * 2
    assert [pool.key_of(b) for b in ids] == [11, 12]
    assert pool.block_of(11) == ids[0] and 12 in pool and 13 not in pool
    assert pool._events.take_events() == [
        BlockStored([11, 12], 10, 4, Tier.G2, list(range(8)), "ad")]
    assert pool.num_active == 2  # registration keeps the caller's reference
    pool.release(out)
    assert (pool.num_inactive, pool.num_active) == (2, 0)
    pool.check_invariants()


@pytest.mark.parametrize("state", ["partial", "reset", "registered"])
def test_register_of_a_non_complete_block_raises_and_changes_nothing(state):
    pool = make_pool(4)
    ids = pool.allocate(2)
    pool.complete([ids[0]])
    if state == "partial":
        bad = ids[1]
    elif state == "reset":
        bad = 3
    else:
        pool.complete([ids[1]])
        pool.register([ids[1]], [b"x"])
        bad = ids[1]
    before = snapshot(pool)
    with pytest.raises(BlockStateError, match=f"register of block {bad}"):
        pool.register([ids[0], bad], [b"a", b"b"])
    assert snapshot(pool) == before


@pytest.mark.parametrize("kwargs, match", [
    ({"keys": [b"a"]}, "2 block ids and 1 keys"),
    ({"keys": [b"a", None]}, "None of type NoneType; keys are int or bytes"),
    ({"keys": [b"a", "text"]}, "type str"),
    ({"keys": [b"a", [1]]}, "type list"),
    ({"keys": [b"a", b"b"], "priority": 101}, "priority"),
    ({"keys": [b"a", b"b"], "priority": -1}, "priority"),
    ({"keys": [b"a", b"b"], "priority": [1]}, "priorities"),
    ({"keys": [b"a", b"b"], "priority": [1, 200]}, "priority"),
])
def test_register_rejects_bad_batches(kwargs, match):
    pool = make_pool(4)
    ids = pool.allocate(2)
    pool.complete(ids)
    before = snapshot(pool)
    keys = kwargs.pop("keys")
    with pytest.raises(BlockStateError, match=match):
        pool.register(ids, keys, **kwargs)
    assert snapshot(pool) == before


def test_register_rejects_a_block_listed_twice():
    pool = make_pool(4)
    ids = pool.allocate(1)
    pool.complete(ids)
    before = snapshot(pool)
    with pytest.raises(BlockStateError, match="twice"):
        pool.register([ids[0], ids[0]], [b"a", b"b"])
    assert snapshot(pool) == before


def test_duplicate_key_keeps_the_inactive_block_and_frees_the_new_one():
    pool = make_pool(4)
    (old,) = stored_blocks(pool, [b"k"])
    pool._events.take_events()
    (new,) = pool.allocate(1)
    pool.complete([new])
    assert pool.register([new], [b"k"]) == [old]
    assert pool.ref_count(old) == 1 and pool.state_of(old) is BlockState.REGISTERED
    assert pool.state_of(new) is BlockState.RESET and pool.ref_count(new) == 0
    assert (pool.num_free, pool.num_inactive, pool.num_active) == (3, 0, 1)
    assert pool._events.take_events() == [BlockStored([b"k"], None, 4, Tier.G2)]
    pool.check_invariants()
    pool.release([old])
    assert pool.num_inactive == 1


def test_duplicate_key_of_an_active_block_adds_a_reference():
    pool = make_pool(4)
    (old,) = stored_blocks(pool, [b"k"], release=False)
    (new,) = pool.allocate(1)
    pool.complete([new])
    assert pool.register([new], [b"k"]) == [old]
    assert pool.ref_count(old) == 2
    pool.release([old, old])
    assert pool.num_inactive == 1 and pool.num_free == 3
    pool.check_invariants()


def test_duplicate_keys_within_one_call():
    pool = make_pool(4)
    ids = pool.allocate(3)
    pool.complete(ids)
    out = pool.register(ids, [b"a", b"b", b"a"])
    assert out == [ids[0], ids[1], ids[0]]
    assert pool.ref_count(ids[0]) == 2 and pool.state_of(ids[2]) is BlockState.RESET
    pool.check_invariants()
    pool.release(out)
    assert (pool.num_free, pool.num_inactive, pool.num_active) == (2, 2, 0)


def test_duplicate_of_a_block_with_other_holders_drops_only_the_callers_reference():
    pool = make_pool(4)
    (a,) = stored_blocks(pool, [b"k"], release=False)
    assert pool.match([b"k"]) == [a]  # two references on a
    pool.discard([b"k"])  # a stays held, unmatchable
    assert pool.state_of(a) is BlockState.COMPLETE
    (b,) = stored_blocks(pool, [b"k"], release=False)
    assert pool.register([a], [b"k"]) == [b]
    assert pool.ref_count(a) == 1 and pool.state_of(a) is BlockState.COMPLETE
    assert pool.ref_count(b) == 2
    pool.check_invariants()
    pool.release([a, b, b])
    assert (pool.num_free, pool.num_inactive, pool.num_active) == (3, 1, 0)


# -- match / lookup / touch -----------------------------------------------------------------
def test_match_takes_references_on_the_longest_prefix():
    pool = make_pool(6)
    ids = stored_blocks(pool, [b"a", b"b", b"c"])
    assert pool.match([b"a", b"b", b"x", b"c"]) == ids[:2]
    assert [pool.ref_count(b) for b in ids] == [1, 1, 0]
    assert (pool.num_free, pool.num_inactive, pool.num_active) == (3, 1, 2)
    assert pool.match([b"a"]) == ids[:1]
    assert pool.ref_count(ids[0]) == 2
    assert pool.match([b"x", b"a"]) == []
    assert pool.match([]) == []
    pool.check_invariants()
    # Active blocks are never evicted.
    assert pool.allocate(4) == [3, 4, 5, ids[2]]
    assert pool.allocate(1) == []


def test_lookup_is_side_effect_free():
    pool = make_pool(4)
    stored_blocks(pool, [b"a", b"b", b"c"])
    before = snapshot(pool)
    assert pool.lookup([b"a", b"b", b"z", b"c"]) == 2
    assert pool.lookup([b"c"]) == 1
    assert pool.lookup([]) == 0
    assert snapshot(pool) == before


def test_touch_makes_an_inactive_block_most_recently_used():
    pool = make_pool(3)
    a, b, c = stored_blocks(pool, [b"a", b"b", b"c"])
    assert pool.touch([b"a", b"zz", b"b"]) == 1
    assert pool.allocate(1) == [b]
    assert pool.allocate(1) == [c]
    assert pool.allocate(1) == [a]


def test_match_of_an_active_block_then_release_refreshes_recency():
    pool = make_pool(2)
    _, b = stored_blocks(pool, [b"a", b"b"])
    pool.release(pool.match([b"a"]))
    assert pool.allocate(1) == [b]


def test_touch_and_lookup_do_not_take_references():
    pool = make_pool(2)
    stored_blocks(pool, [b"a"])
    pool.touch([b"a"])
    assert pool.num_active == 0 and pool.num_inactive == 1


class _CountingPolicy(LruEviction):
    name = "test-counting"
    hits_while_active = True  # hear every hit, like a frequency-counting policy

    def __init__(self, num_blocks):
        super().__init__(num_blocks)
        self.misses = []
        self.hits = []

    def on_hit(self, block_id, key):
        super().on_hit(block_id, key)
        self.hits.append(key)

    def on_miss(self, key):
        self.misses.append(key)


def test_policy_hooks_see_hits_and_misses():
    policy = _CountingPolicy(4)
    pool = make_pool(4, eviction=policy)
    stored_blocks(pool, [b"a", b"b"])
    pool.match([b"a", b"b", b"c", b"d"])
    pool.touch([b"b", b"q"])
    pool.lookup([b"a", b"zz"])
    assert policy.hits == [b"a", b"b", b"b"]
    assert policy.misses == [b"c"]


class _InactiveHitsPolicy(_CountingPolicy):
    name = "test-inactive-hits"
    hits_while_active = False


def test_policies_that_only_order_evictable_blocks_hear_only_their_hits():
    policy = _InactiveHitsPolicy(4)
    pool = make_pool(4, eviction=policy)
    stored_blocks(pool, [b"a", b"b"])
    pool.match([b"a"])  # a becomes active: no hit to report to such a policy
    pool.touch([b"a", b"b"])  # only b is evictable
    assert policy.hits == [b"b"]


# -- release --------------------------------------------------------------------------------
def test_release_of_unregistered_blocks_frees_them():
    pool = make_pool(4)
    ids = pool.allocate(2)
    pool.complete([ids[1]])
    pool.release(ids)
    assert all(pool.state_of(b) is BlockState.RESET for b in ids)
    assert pool.num_free == 4
    assert free_order(pool) == [2, 3, 0, 1]  # freed blocks go to the tail
    pool.check_invariants()


def test_double_release_raises_and_changes_nothing():
    pool = make_pool(4)
    (a,) = stored_blocks(pool, [b"a"])
    ids = pool.allocate(1)
    before = snapshot(pool)
    with pytest.raises(BlockStateError, match=f"release of block {a} in state REGISTERED"):
        pool.release([ids[0], a])
    assert snapshot(pool) == before
    with pytest.raises(BlockStateError, match="release of block 3 in state RESET"):
        pool.release([3])
    assert snapshot(pool) == before


def test_release_of_a_block_listed_more_often_than_it_is_held():
    pool = make_pool(4)
    (a,) = stored_blocks(pool, [b"a"], release=False)
    pool.match([b"a"])
    before = snapshot(pool)
    with pytest.raises(BlockStateError, match="3 times"):
        pool.release([a, a, a])
    assert snapshot(pool) == before
    pool.release([a, a])
    assert pool.ref_count(a) == 0 and pool.num_inactive == 1


def test_release_order_is_eviction_order():
    pool = make_pool(3)
    ids = stored_blocks(pool, [b"a", b"b", b"c"], release=False)
    pool.release(list(reversed(ids)))  # tail first, as vLLM frees a request
    assert pool.allocate(1) == [ids[2]]


def test_priorities_evict_lowest_first_then_lru():
    pool = make_pool(4)
    ids = pool.allocate(4)
    pool.complete(ids)
    pool.register(ids, [b"p50", b"p0-old", b"p100", b"p0-new"], priority=[50, 0, 100, 0])
    pool.release(ids)
    pool.touch([b"p100"])
    assert [pool.allocate(1)[0] for _ in range(4)] == [ids[1], ids[3], ids[0], ids[2]]


def test_fifo_ignores_touch_and_priority():
    pool = make_pool(3, eviction="fifo")
    ids = pool.allocate(3)
    pool.complete(ids)
    pool.register(ids, [b"a", b"b", b"c"], priority=[100, 50, 0])
    pool.release(ids)
    pool.touch([b"a"])
    assert [pool.allocate(1)[0] for _ in range(3)] == ids


# -- discard --------------------------------------------------------------------------------
def test_discard_frees_inactive_and_unregisters_active_blocks():
    pool = make_pool(4)
    a, b = stored_blocks(pool, [b"a", b"b"])
    pool.match([b"a"])
    pool._events.take_events()
    assert pool.discard([b"a", b"b", b"unknown"]) == 2
    assert pool._events.take_events() == [BlockRemoved([b"a", b"b"], Tier.G2)]
    assert pool.lookup([b"a"]) == 0 and pool.lookup([b"b"]) == 0
    assert pool.state_of(b) is BlockState.RESET
    assert pool.state_of(a) is BlockState.COMPLETE and pool.ref_count(a) == 1
    assert (pool.num_free, pool.num_inactive, pool.num_active) == (3, 0, 1)
    pool.check_invariants()
    pool.release([a])
    assert pool.state_of(a) is BlockState.RESET and pool.num_free == 4
    assert pool.discard([b"a"]) == 0
    assert pool._events.take_events() == []


# -- restore --------------------------------------------------------------------------------
def test_restore_registers_free_blocks_as_inactive():
    pool = make_pool(4)
    pool.restore([(2, b"x"), (0, b"y")])
    assert pool.state_of(2) is BlockState.REGISTERED and pool.key_of(0) == b"y"
    assert (pool.num_free, pool.num_inactive, pool.num_active) == (2, 2, 0)
    assert free_order(pool) == [1, 3]
    assert pool._events.take_events() == [BlockStored([b"x"], None, 4, Tier.G2),
                                          BlockStored([b"y"], None, 4, Tier.G2)]
    pool.check_invariants()
    assert pool.match([b"x"]) == [2]
    assert pool.allocate(3) == [1, 3, 0]  # restored blocks are evictable, first restored first


def test_restore_without_events():
    pool = make_pool(4)
    pool.restore([(1, b"x")], emit_events=False)
    assert pool._events.take_events() == []


@pytest.mark.parametrize("entries, match", [
    ([(2, b"a"), (2, b"b")], "twice"),
    ([(2, b"a"), (3, b"a")], "already registered"),
    ([(2, b"held")], "already registered"),
    ([(3, b"z"), (2, None)], "keys are int or bytes"),
    ([(3, b"z"), (2, [1])], "keys are int or bytes"),
    ([(2, b"z"), (0, b"y")], "restore of block 0 in state PARTIAL"),
    ([(1, b"z")], "restore of block 1 in state REGISTERED"),
])
def test_restore_rejects_bad_entries(entries, match):
    pool = make_pool(4)
    assert pool.allocate(1) == [0]  # block 0: PARTIAL
    assert stored_blocks(pool, [b"held"]) == [1]  # block 1: inactive; 2 and 3 free
    before = snapshot(pool)
    with pytest.raises(BlockStateError, match=match):
        pool.restore(entries)
    assert snapshot(pool) == before


# -- clear ----------------------------------------------------------------------------------
def test_clear_drops_every_registration():
    pool = make_pool(4)
    a, b = stored_blocks(pool, [b"a", b"b"])
    pool.match([b"b"])
    pool._events.take_events()
    pool.clear()
    assert pool._events.take_events() == [AllBlocksCleared(Tier.G2)]
    assert pool.num_registered == 0 and pool.lookup([b"a"]) == 0 and pool.lookup([b"b"]) == 0
    assert pool.state_of(a) is BlockState.RESET
    assert pool.state_of(b) is BlockState.COMPLETE and pool.ref_count(b) == 1
    assert (pool.num_free, pool.num_inactive, pool.num_active) == (3, 0, 1)
    pool.check_invariants()
    pool.release([b])
    assert pool.num_free == 4
    pool.check_invariants()


def test_pool_without_events_works():
    pool = make_pool(2, events=False)
    stored_blocks(pool, [b"a", b"b"])
    pool.allocate(1)
    pool.discard([b"b"])
    pool.clear()
    pool.check_invariants()


# -- check_invariants -----------------------------------------------------------------------
@pytest.mark.parametrize("corrupt, match", [
    (lambda p: p._ref.__setitem__(0, 0), "without references"),
    (lambda p: p._ref.__setitem__(3, 1), "RESET but referenced"),
    (lambda p: p._registry.__setitem__(b"ghost", 1), "registry maps"),
    (lambda p: p._next.__setitem__(p._sentinel, 3), "free list"),
    (lambda p: setattr(p, "_num_free", 9), "counters"),
    (lambda p: p._key.__setitem__(0, b"stray"), "holds a key"),
    (lambda p: p._eviction.on_remove(1), "eviction policy holds"),
])
def test_check_invariants_detects_corruption(corrupt, match):
    pool = make_pool(4)
    pool.allocate(1)
    stored_blocks(pool, [b"k"])
    pool.check_invariants()
    corrupt(pool)
    with pytest.raises(BlockStateError, match=match):
        pool.check_invariants()


# -- eviction registry ----------------------------------------------------------------------
def test_eviction_registry():
    assert {"lru", "fifo"} <= set(eviction_policy_names())
    assert isinstance(make_eviction_policy("lru", 4), LruEviction)
    assert isinstance(make_eviction_policy("fifo", 4), FifoEviction)
    with pytest.raises(ConfigError, match="'nope' is not known: use one of .*lru"):
        make_eviction_policy("nope", 4)
    policy = make_eviction_policy("kvtier.pools.eviction.FifoEviction", 4)
    assert isinstance(policy, FifoEviction) and policy.num_blocks == 4
    with pytest.raises(ConfigError, match="could not be imported"):
        make_eviction_policy("no_such_module.Policy", 4)
    with pytest.raises(ConfigError, match="not an EvictionPolicy"):
        make_eviction_policy("collections.OrderedDict", 4)


def test_register_policy():
    @register_policy
    class Mine(FifoEviction):
        name = "test-mine"

    assert make_eviction_policy("test-mine", 3).__class__ is Mine
    with pytest.raises(ValueError, match="taken"):
        @register_policy
        class Other(FifoEviction):
            name = "test-mine"
    with pytest.raises(TypeError):
        register_policy(dict)

    class Nameless(FifoEviction):
        name = ""
    with pytest.raises(TypeError):
        register_policy(Nameless)


def test_lru_policy_alone():
    policy = LruEviction(6)
    assert policy.victim() is None and len(policy) == 0
    for block_id, priority in [(0, 5), (1, 0), (2, 5), (3, 0)]:
        policy.on_insert(block_id, block_id, priority)
    policy.on_hit(1, 1)
    policy.on_remove(2)
    policy.on_remove(2)  # not held: ignored
    policy.on_hit(4, 4)  # not held: ignored
    assert len(policy) == 3
    assert [policy.victim() for _ in range(4)] == [3, 1, 0, None]
    assert isinstance(policy, EvictionPolicy)


class _InsertLoggingPolicy(LruEviction):
    """Overrides on_insert only: the pool must not bypass it through LRU's batch form."""

    name = "test-insert-logging"

    def __init__(self, num_blocks):
        super().__init__(num_blocks)
        self.inserted = []

    def on_insert(self, block_id, key, priority):
        super().on_insert(block_id, key, priority)
        self.inserted.append((block_id, key, priority))


@pytest.mark.parametrize("eviction", ["lru", "fifo", "logging"])
def test_release_hands_blocks_to_the_policy_in_order(eviction):
    policy = _InsertLoggingPolicy(4) if eviction == "logging" else eviction
    pool = make_pool(4, eviction=policy)
    ids = pool.allocate(3)
    pool.complete(ids)
    pool.register(ids, [b"a", b"b", b"c"], priority=[0, 7, 0])
    pool.release([ids[1], ids[2], ids[0]])
    if eviction == "logging":
        assert policy.inserted == [(ids[1], b"b", 7), (ids[2], b"c", 0), (ids[0], b"a", 0)]
    order = [pool.allocate(1)[0] for _ in range(2)]  # 1 free block, then the first victim
    assert order[1] == (ids[1] if eviction == "fifo" else ids[2])
    pool.check_invariants()
