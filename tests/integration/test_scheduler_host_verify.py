"""A G2 block corrupted in host RAM between store and load, under vLLM's real v1 Scheduler:
verification turns it into a load error, vLLM recomputes it, and the bytes that come back
afterwards are right (the harness checks every onboarded block byte for byte)."""

from __future__ import annotations

import random

from sched_harness import BLOCK, make_harness

from kvtier.storage import faults


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 1000) for _ in range(n)]


def test_flipped_host_block_is_a_load_error_and_the_request_recomputes_it(tiny_model):
    h = make_harness(tiny_model, {"host_cache_blocks": 512, "onboard_mode": "always"})
    p = prompt(21, 8 * BLOCK + 5)
    h.add("r0", p)
    h.run()
    h.drain()
    assert h.scheduler.reset_prefix_cache()
    with faults.armed("host.load", "flip", times=1) as rule:
        h.add("r1", p)
        h.run()
    assert rule.fired == 1
    assert len(h.load_errors_seen) == 1, "the flipped block (and only it) is a load error"
    assert h.leader.metrics.value("kvtier_checksum_failures") == 1
    assert h.verified_loads == 7, "the other 7 blocks were onboarded intact"
    assert h.outputs["r1"] == h.outputs["r0"]
    # The recomputed block went back to G2: a third request loads all 8, each byte checked.
    h.drain()
    assert h.scheduler.reset_prefix_cache()
    h.add("r2", p)
    h.run()
    assert h.verified_loads == 7 + 8
    assert len(h.load_errors_seen) == 1
    h.assert_no_leaks()
