"""prefix_learned: the online per-class reuse model (kvtier.pools.learned_policy)."""

from __future__ import annotations

from policy_cases import hits, make_trace

from kvtier.pools import BlockPool
from kvtier.pools.learned_policy import PrefixLearnedEviction
from kvtier.tiers import Tier


def two_turn_conversations(num: int, gap: int):
    """Conversation k is a root block k with a new tail block per turn; it has two turns,
    ``gap`` steps apart (each step: a new conversation's first turn, an older one's second).
    A tail never comes back; a root comes back exactly once, after its first sighting."""
    chains, tail = [], 10_000
    for step in range(num + gap):
        for k in (step, step - gap):
            if 0 <= k < num:
                tail += 1
                chains.append([k, tail])
    return make_trace(chains)


def test_learns_that_first_seen_roots_come_back_and_tails_do_not():
    # 16 blocks hold 6-8 pending roots but not their tails as well. Recency and frequency
    # see a first-seen root and a first-seen tail alike (both new, used once) and lose the
    # root before it returns; the model learns from the returns it saw (ghost hits) that
    # roots of that class come back and leaves do not.
    for gap in (6, 8):
        trace = two_turn_conversations(300, gap)
        learned = hits(trace, "prefix_learned", 16)
        assert learned >= 0.95 * 300
        for other in ("lru", "prefix_lru", "prefix_gdsf", "arc", "prefix_reuse"):
            assert hits(trace, other, 16) < 0.1 * learned, other


def conversations_among_one_off_requests(num: int, gap: int):
    """Per step: a new conversation's first turn (root, middle block, tail), an older one's
    second turn ``gap`` steps later (same root and middle, a new tail), and a one-off request
    of two blocks. The conversations' middle blocks and the one-offs' last blocks sit at the
    same depth, seen once; only whether anything hangs below them tells them apart."""
    chains, new = [], 10_000

    def fresh() -> int:
        nonlocal new
        new += 1
        return new

    for step in range(num + gap):
        if step < num:
            chains.append([2 * step, 2 * step + 1, fresh()])
        if 0 <= step - gap < num:
            chains.append([2 * (step - gap), 2 * (step - gap) + 1, fresh()])
        chains.append([fresh(), fresh()])
    return make_trace(chains)


def test_tells_a_request_s_end_from_a_block_with_a_future():
    # Without the leaf feature (or without learning from ghost hits, the returns of keys
    # it had evicted) it keeps 2-10 of the 600 reusable blocks; so do the others.
    trace = conversations_among_one_off_requests(300, 6)
    assert hits(trace, "prefix_learned", 20) >= 0.9 * 600
    for other in ("lru", "prefix_gdsf", "arc"):
        assert hits(trace, other, 20) < 10, other


def test_the_estimates_are_the_classes_reuse_rates():
    pool = BlockPool(Tier.G1, 16, eviction="prefix_learned")
    policy = pool.eviction
    assert isinstance(policy, PrefixLearnedEviction)
    for request in two_turn_conversations(300, 6).requests:
        chain = list(request.hash_ids)
        held = pool.match(chain)
        fresh = pool.allocate(len(chain) - len(held))
        pool.complete(fresh)
        held += pool.register(fresh, chain[len(held):],
                              parent=chain[len(held) - 1] if held else None)
        pool.release(held[::-1])
    # (uses, depth, leaf) -> class, as the policy files them: a root seen once with its tail
    # below it, a tail seen once, a root seen twice (never back after its second turn).
    root_once = policy.class_of(uses=1, depth=0, leaf=False)
    tail_once = policy.class_of(uses=1, depth=1, leaf=True)
    root_twice = policy.class_of(uses=2, depth=0, leaf=False)
    assert policy.reuse_estimate(root_once) > 0.9
    assert policy.reuse_estimate(tail_once) < 0.05
    assert policy.reuse_estimate(root_twice) < 0.05
