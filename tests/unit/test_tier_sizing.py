"""Tier sizes: ``host_cache_gb`` / ``disk_cache_gb`` are the whole engine's, split across ranks.

As vLLM's ``--kv-offloading-size``: with ``world_size`` ranks each holding its shard of every
block, a rank gets ``GB / world_size`` bytes, so a tier holds ``GB // (shard bytes x
world_size)`` slots, the same on every rank and in the leader's pools. Explicit
``*_cache_blocks`` are slot counts and do not depend on the world size.
"""

from __future__ import annotations

import pytest

from kvtier.config import KvtierConfig
from kvtier.leader import Leader, plan_tier_layout

SHARD = 65536  # bytes of one rank's shard of a block


@pytest.mark.parametrize("world_size", [1, 2])
def test_gb_is_the_whole_engines(world_size):
    config = KvtierConfig(host_cache_gb=1.0, disk_cache_gb=4.0, disk_dir="/nonexistent")
    layout = plan_tier_layout(config, SHARD, 128, world_size)
    assert layout.num_g2_slots == 10**9 // (SHARD * world_size)
    assert layout.num_g3_slots == 4 * 10**9 // (SHARD * world_size)
    assert layout.block_bytes == SHARD
    # Every rank's share of the bytes stays within its 1 / world_size of the setting.
    assert layout.num_g2_slots * SHARD * world_size <= 10**9


def test_two_ranks_get_half_the_slots_of_one():
    config = KvtierConfig(host_cache_gb=0.5, disk_cache_gb=2.0, disk_dir="/nonexistent")
    one = plan_tier_layout(config, SHARD, 128, 1)
    two = plan_tier_layout(config, SHARD, 128, 2)
    assert two.num_g2_slots == one.num_g2_slots // 2
    assert two.num_g3_slots == one.num_g3_slots // 2


def test_world_size_defaults_to_one():
    config = KvtierConfig(host_cache_gb=0.25)
    assert plan_tier_layout(config, SHARD, 128) == plan_tier_layout(config, SHARD, 128, 1)


@pytest.mark.parametrize("world_size", [1, 2])
def test_block_counts_are_slot_counts(world_size):
    config = KvtierConfig(host_cache_gb=1.0, host_cache_blocks=300, disk_cache_blocks=700,
                          disk_dir="/nonexistent")
    layout = plan_tier_layout(config, SHARD, 128, world_size)
    assert (layout.num_g2_slots, layout.num_g3_slots) == (300, 700)


def test_disk_only_staging_window_does_not_depend_on_world_size():
    # Without a host cache G2 is only a staging window for one long request, per rank.
    config = KvtierConfig(disk_cache_gb=1.0, disk_dir="/nonexistent")
    assert (plan_tier_layout(config, SHARD, 128, 1).num_g2_slots
            == plan_tier_layout(config, SHARD, 128, 2).num_g2_slots == 128 + 64)


@pytest.mark.parametrize("world_size", [1, 2])
def test_leader_pools_follow_the_layout(world_size):
    config = KvtierConfig(host_cache_gb=0.1, disk_cache_gb=0.2, disk_dir="/nonexistent",
                          onboard_mode="always")
    leader = Leader(config, block_tokens=32, block_bytes=SHARD, max_blocks_per_request=128,
                    world_size=world_size)
    assert leader.layout == plan_tier_layout(config, SHARD, 128, world_size)
    assert leader.layout.num_g2_slots == 10**8 // (SHARD * world_size)
    assert leader.g2.num_blocks == leader.layout.num_g2_slots
    assert leader.g3.num_blocks == leader.layout.num_g3_slots
