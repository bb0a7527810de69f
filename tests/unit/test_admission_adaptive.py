"""kvtier.offload.admission.AdaptiveAdmission: hand-built offer/hit sequences with known
decisions, and the disk tier's hooks into it (occupancy on bind, hits on loads)."""

from __future__ import annotations

import pytest

from kvtier.errors import ConfigError
from kvtier.managers.disk import DiskManager
from kvtier.metrics import KvtierMetrics
from kvtier.offload.admission import AdaptiveAdmission, make_admission_policy
from kvtier.offload.tinylfu import key64

NO_EXPLORE = 1 << 62  # no key64 below 2**64 is a multiple of this except 0 and a few


def unexplored_keys(n: int, every: int = NO_EXPLORE) -> list[int]:
    return [k for k in range(1, 10 * n + 100) if key64(k) % every != 0][:n]


def policy_with(free: list[int], capacity: int = 8, **options) -> AdaptiveAdmission:
    policy = make_admission_policy("adaptive", **options)
    assert isinstance(policy, AdaptiveAdmission)
    policy.bind(capacity, lambda: free[0])
    return policy


def test_first_sightings_fill_free_slots_and_re_offers_are_always_admitted():
    free = [3]
    policy = policy_with(free, explore_every=NO_EXPLORE)
    a, b = unexplored_keys(2)
    assert policy.admit(a) is True            # a free slot: first sighting admitted
    free[0] = 0
    # Admitted first sightings never hit, re-offers do: first sightings stop paying.
    repeats = unexplored_keys(40)[20:]
    for key in repeats:
        policy.admit(key)
    for key in repeats:
        assert policy.admit(key) is True      # re-offer: always
        policy.on_hit(key)
    assert policy.first_sightings_pay() is False
    assert policy.admit(b) is False           # full tier, first sighting, not paying
    assert policy.admit(b) is True            # its second offer
    free[0] = 1
    assert policy.admit(unexplored_keys(41)[40]) is True  # a free slot again


def test_first_sightings_admitted_again_once_they_earn_hits():
    free = [0]
    policy = policy_with(free, explore_every=NO_EXPLORE, min_ratio=0.5)
    keys = unexplored_keys(200)
    firsts, repeats, later = keys[:40], keys[40:80], keys[80:]
    for key in repeats:
        policy.admit(key)
    for key in repeats:            # re-offered, admitted and hit once each
        policy.admit(key)
        policy.on_hit(key)
    # Their first offers were first sightings admitted while unmeasured that never hit (the
    # re-offer retagged them): hits count for re-offers only.
    assert policy.first_sightings_pay() is False
    assert policy.admit(firsts[0]) is False
    # Exploration keys are admitted on first sight whatever the measure says.
    explorer = next(k for k in range(1, 10_000) if key64(k) % 4 == 0)
    policy4 = policy_with([0], explore_every=4)
    for key in repeats:
        policy4.admit(key)
        policy4.admit(key)
        policy4.on_hit(key)
    assert policy4.admit(explorer) is True
    # Hits on first-sight admissions bring them back above min_ratio of re-offers' yield.
    free[0] = 1
    for key in later[:60]:
        assert policy.admit(key) is True      # free slots: admitted as first sightings
        policy.on_hit(key)
        policy.on_hit(key)
    free[0] = 0
    assert policy.first_sightings_pay() is True
    assert policy.admit(later[60]) is True


def test_hits_on_unknown_keys_do_not_count_and_memory_is_bounded():
    policy = policy_with([0], capacity=1, explore_every=1)   # bounds: 1024 (the floor)
    for key in range(5000):
        policy.admit(key)
    policy.on_hit("never-admitted")
    assert policy._hits == [0.0, 0.0]
    assert len(policy._seen) <= 1024 and len(policy._tagged) <= 1024
    assert policy.admit(0) is True          # forgotten: a first sighting again (explored)


def test_counts_halve_every_window():
    policy = policy_with([1], window=4)
    for key in range(4):
        policy.admit(key)
    assert policy._admits == [2.0, 0.0]


@pytest.mark.parametrize("options", [{"min_ratio": -1}, {"explore_every": 0}, {"window": 0},
                                     {"seen_factor": 0}, {"max_entries": 0}])
def test_rejects_bad_options(options):
    with pytest.raises(ConfigError):
        AdaptiveAdmission(**options)


def test_disk_tier_binds_its_occupancy_and_reports_loads_as_hits():
    disk = DiskManager(2, eviction="lru", admission="adaptive", events=None, block_tokens=16,
                       world_size=1, metrics=KvtierMetrics())
    disk.recovered = True
    policy = disk.admission
    policy.explore_every = NO_EXPLORE
    a, b, c = unexplored_keys(3)
    assert disk.wants(a) is True              # two free slots
    slot = disk.prepare_store(a)
    disk.complete_store(slot, a, ok=True, timed_out=False)
    assert disk.wants(b) is True
    disk.complete_store(disk.prepare_store(b), b, ok=True, timed_out=False)
    assert disk.pool.num_free == 0
    loaded = disk.pin(a)
    assert loaded is not None and policy._hits == [1.0, 0.0]
    disk.unpin([loaded])
    # Full; first sightings yield (1+1)/(2+2); make re-offers far better: first sight refused.
    policy._admits[1], policy._hits[1] = 10.0, 30.0
    assert disk.wants(c) is False
    assert disk.wants(c) is True              # its second offer
