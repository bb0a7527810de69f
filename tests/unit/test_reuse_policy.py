"""prefix_reuse (kvtier.pools.reuse_policy): predicted next use, overdue blocks first."""

from __future__ import annotations

from policy_cases import hits, make_trace, order_of_one_time_blocks

from kvtier.pools import BlockPool
from kvtier.replay.belady import BeladyOracle
from kvtier.replay.trace import Trace
from kvtier.tiers import Tier


def round_robin_trace(users: int = 5, turns: int = 10) -> Trace:
    """Users take turns; each turn re-sends the user's history and adds one block, so a user
    comes back after every other user has been served (a cycle, LRU's worst case)."""
    chains = []
    for turn in range(turns):
        for user in range(users):
            chains.append([user * 1000 + i for i in range(3 + turn)])
    return make_trace(chains)


def test_keeps_conversations_that_lru_evicts_just_before_they_return():
    trace = round_robin_trace()
    capacity = 20  # about half of one cycle's blocks
    lru = hits(trace, "lru", capacity)
    reuse = hits(trace, "prefix_reuse", capacity)
    best = BeladyOracle(trace).replay(capacity, prefix=True).blocks_hit
    assert reuse >= 4 * lru   # LRU hits only while the histories are short (25 of 375)
    assert reuse >= best // 2  # a stable subset of the users keeps hitting (135 of 175)
    assert reuse <= best


def test_without_history_it_is_lru():
    # Nothing was ever seen twice: every block is overdue at once, oldest release first.
    assert order_of_one_time_blocks("prefix_reuse") == [b"a", b"b", b"c", b"d"]


def test_one_time_prompts_go_before_a_block_that_is_due_back():
    # "hot" came back once after 2 releases, so it is expected again; the prompts released
    # since were never seen before and go first, although they are more recent.
    pool = BlockPool(Tier.G2, 4, eviction="prefix_reuse")

    def request(key: bytes) -> None:
        got = pool.match([key])
        if not got:
            got = pool.allocate(1)
            pool.complete(got)
            got = pool.register(got, [key])
        pool.release(got)

    for key in (b"hot", b"x1", b"hot", b"x2", b"x3"):
        request(key)
    pool.allocate(1)
    assert b"hot" in pool
    assert b"x1" not in pool
