"""Hypothesis: pool invariants under random operation sequences, and salt isolation."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvtier.errors import BlockStateError
from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBuffer
from kvtier.hashing import BlockHasher, salt_hash
from kvtier.pools import BlockPool, BlockState
from kvtier.tiers import Tier

CAPACITY = 6
KEYS = st.integers(0, 9)  # a small key space, so duplicates and hits are common


def snapshot(pool: BlockPool) -> tuple:
    n = pool.num_blocks
    return ([pool.state_of(b) for b in range(n)], [pool.ref_count(b) for b in range(n)],
            [pool.key_of(b) for b in range(n)], dict(pool._registry), list(pool._next),
            list(pool._prev), pool.num_free, pool.num_inactive, pool.num_active)


class PoolMachine(RuleBasedStateMachine):
    eviction = "lru"

    def __init__(self) -> None:
        super().__init__()
        self.events = EventBuffer()
        self.pool = BlockPool(Tier.G3, CAPACITY, eviction=self.eviction, events=self.events,
                              block_size=4)
        self.held: Counter[int] = Counter()  # references this test holds, per block
        self.replayed: set[int] = set()  # the registry as told by the events

    def _held_in(self, state: BlockState) -> list[int]:
        return sorted(b for b, n in self.held.items() if n and self.pool.state_of(b) is state)

    @rule(count=st.integers(0, CAPACITY + 1))
    def allocate(self, count):
        available = self.pool.num_free + self.pool.num_inactive
        ids = self.pool.allocate(count)
        if count > available:
            assert ids == []
            return
        assert len(ids) == count == len(set(ids))
        for block_id in ids:
            assert self.held[block_id] == 0
            assert self.pool.state_of(block_id) is BlockState.PARTIAL
            self.held[block_id] += 1

    @rule(data=st.data())
    def complete(self, data):
        partial = self._held_in(BlockState.PARTIAL)
        chosen = data.draw(st.lists(st.sampled_from(partial), min_size=1, unique=True)
                           if partial else st.just([]))
        self.pool.complete(chosen)

    @rule(data=st.data())
    def register(self, data):
        complete = self._held_in(BlockState.COMPLETE)
        chosen = data.draw(st.lists(st.sampled_from(complete), min_size=1, unique=True)
                           if complete else st.just([]))
        keys = data.draw(st.lists(KEYS, min_size=len(chosen), max_size=len(chosen)))
        priority = data.draw(st.integers(0, 100))
        self._register(chosen, keys, priority)

    @rule(keys=st.lists(KEYS, min_size=1, max_size=4), priority=st.integers(0, 100),
          keep=st.booleans())
    def store(self, keys, priority, keep):
        """The common path in one step: allocate, write, register, usually release."""
        ids = self.pool.allocate(len(keys))
        if not ids:
            return
        self.held.update(ids)
        self.pool.complete(ids)
        canonical = self._register(ids, keys, priority)
        if not keep:
            self.pool.release(canonical[::-1])
            self.held.subtract(canonical)

    def _register(self, chosen, keys, priority):
        canonical = self.pool.register(chosen, keys, priority=priority)
        for block_id, key, kept in zip(chosen, keys, canonical):
            assert self.pool.key_of(kept) == key
            if kept != block_id:  # duplicate: our reference moved to the kept block
                self.held[block_id] -= 1
                self.held[kept] += 1
        return canonical

    @rule(keys=st.lists(KEYS, max_size=6))
    def match(self, keys):
        expected = self.pool.lookup(keys)
        ids = self.pool.match(keys)
        assert len(ids) == expected
        assert [self.pool.key_of(b) for b in ids] == keys[:expected]
        self.held.update(ids)

    @rule(keys=st.lists(KEYS, max_size=6))
    def touch(self, keys):
        before = (self.pool.num_free, self.pool.num_inactive, self.pool.num_active)
        assert self.pool.touch(keys) == self.pool.lookup(keys)
        assert (self.pool.num_free, self.pool.num_inactive, self.pool.num_active) == before

    @rule(data=st.data())
    def release(self, data):
        held = sorted(self.held.elements())
        chosen = data.draw(st.lists(st.sampled_from(held), max_size=len(held)) if held
                           else st.just([]))
        chosen = list((Counter(chosen) & self.held).elements())  # never more than we hold
        chosen = data.draw(st.permutations(chosen))
        self.pool.release(chosen)
        self.held.subtract(chosen)

    @rule(keys=st.lists(KEYS, max_size=4))
    def discard(self, keys):
        self.pool.discard(keys)
        assert all(key not in self.pool for key in keys)

    @rule()
    def clear(self):
        self.pool.clear()
        assert self.pool.num_registered == 0 and self.pool.num_inactive == 0

    @rule(data=st.data())
    def restore(self, data):
        free = [b for b in range(CAPACITY) if self.pool.state_of(b) is BlockState.RESET]
        unused = [k for k in range(10) if k not in self.pool]
        if not free or not unused:
            return
        blocks = data.draw(st.lists(st.sampled_from(free), unique=True, max_size=3))
        keys = data.draw(st.lists(st.sampled_from(unused), unique=True,
                                  min_size=len(blocks), max_size=len(blocks)))
        if len(keys) < len(blocks):
            return
        self.pool.restore(zip(blocks, keys))

    @rule(data=st.data())
    def broken_release_changes_nothing(self, data):
        unheld = [b for b in range(CAPACITY) if not self.held[b]]
        if not unheld:
            return
        bad = data.draw(st.sampled_from(unheld))
        good = data.draw(st.lists(st.sampled_from(sorted(self.held.elements())), max_size=1)
                         if self.held.total() else st.just([]))
        before = snapshot(self.pool)
        with pytest.raises(BlockStateError):
            self.pool.release(good + [bad])
        assert snapshot(self.pool) == before

    @rule(data=st.data())
    def broken_register_changes_nothing(self, data):
        not_complete = [b for b in range(CAPACITY)
                        if self.pool.state_of(b) is not BlockState.COMPLETE]
        if not not_complete:
            return
        bad = data.draw(st.sampled_from(not_complete))
        before = snapshot(self.pool)
        with pytest.raises(BlockStateError):
            self.pool.register(self._held_in(BlockState.COMPLETE)[:1] + [bad],
                               data.draw(st.lists(KEYS, min_size=2, max_size=2))
                               if self._held_in(BlockState.COMPLETE) else [0])
        assert snapshot(self.pool) == before

    @invariant()
    def blocks_are_accounted_for(self):
        pool = self.pool
        pool.check_invariants()
        assert pool.num_free + pool.num_inactive + pool.num_active == CAPACITY
        free = {b for b in range(CAPACITY) if pool.state_of(b) is BlockState.RESET}
        inactive = {b for b in range(CAPACITY) if pool.state_of(b) is BlockState.REGISTERED
                    and pool.ref_count(b) == 0}
        active = {b for b in range(CAPACITY) if pool.ref_count(b) > 0}
        assert not (free & inactive or free & active or inactive & active)
        assert len(free) == pool.num_free and len(inactive) == pool.num_inactive
        assert len(active) == pool.num_active

    @invariant()
    def references_match_what_we_hold(self):
        # No double free and no leak: the pool's counts are exactly our references.
        for block_id in range(CAPACITY):
            assert self.pool.ref_count(block_id) == self.held[block_id]

    @invariant()
    def one_block_per_registered_key(self):
        keys = [self.pool.key_of(b) for b in range(CAPACITY)
                if self.pool.state_of(b) is BlockState.REGISTERED]
        assert len(keys) == len(set(keys)) == self.pool.num_registered
        for key in keys:
            assert self.pool.key_of(self.pool.block_of(key)) == key

    @invariant()
    def events_replayed_in_order_reconstruct_the_registry(self):
        for event in self.events.take_events():
            if isinstance(event, BlockStored):
                assert event.tier is Tier.G3 and event.block_size == 4
                self.replayed.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                assert self.replayed.issuperset(event.block_hashes)
                self.replayed.difference_update(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self.replayed.clear()
        assert self.replayed == set(self.pool._registry)


class FifoPoolMachine(PoolMachine):
    eviction = "fifo"


TestLruPool = PoolMachine.TestCase
TestLruPool.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestFifoPool = FifoPoolMachine.TestCase
TestFifoPool.settings = settings(max_examples=30, stateful_step_count=40, deadline=None)


tokens_strategy = st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=24)


@settings(max_examples=100, deadline=None)
@given(tokens=tokens_strategy, salts=st.lists(st.one_of(st.none(), st.text(max_size=4)),
                                              min_size=2, max_size=2, unique=True),
       parent=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
       mode=st.sampled_from(["xxh3", "kvbm"]))
def test_a_hash_made_with_one_salt_never_matches_another_salt(tokens, salts, parent, mode):
    hasher = BlockHasher(4, mode)
    one = hasher.hash_blocks(tokens, salt=salt_hash(salts[0]), parent=parent)
    two = hasher.hash_blocks(tokens, salt=salt_hash(salts[1]), parent=parent)
    assert len(one) == len(two) == len(tokens) // 4
    assert not set(one) & set(two)


@settings(max_examples=100, deadline=None)
@given(tokens=st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=40),
       cut=st.integers(0, 10), mode=st.sampled_from(["xxh3", "kvbm", "sha256_cbor"]))
def test_hashing_in_pieces_equals_hashing_whole(tokens, cut, mode):
    hasher = BlockHasher(4, mode)
    whole = hasher.hash_blocks(tokens)
    head = hasher.hash_blocks(tokens[:4 * cut])
    tail = hasher.hash_blocks(tokens[4 * len(head):], parent=head[-1] if head else None)
    assert head + tail == whole
