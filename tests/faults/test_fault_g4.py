"""G4 faults through the engine: two harness instances (vLLM's scheduler + kvtier) share a
real Redis; the second meets a fault while loading what the first offloaded.

Each case: right tokens in both instances (the harness model reads the KV bytes), no hang,
no leak, the fault counted in the second instance's metrics, and the remote tier serving
again once the fault is gone. Complements tests/integration/test_scheduler_remote.py (single
requests, one fault each) with whole batches and the injection hook.
"""

from __future__ import annotations

import pytest
from fault_scenarios import g4_corrupt_first_block, run_scenario

from need import need_servers


@pytest.fixture(autouse=True)
def _redis_installed():
    """No redis-server: skipped, or failed with REQUIRE_TEST_SERVERS=1 (CI)."""
    need_servers("redis")


@pytest.mark.parametrize("name,hooked", [
    ("g4_store_down_at_start", False), ("g4_store_killed", False), ("g4_store_slow", True),
    ("g4_partial_batch", True), ("g4_corrupt_stored", False)])
def test_g4_fault_is_survived_counted_and_healed(tiny_model, tmp_path, name, hooked):
    out = run_scenario(name, tiny_model, tmp_path)
    assert out.survived, out.explain()
    assert out.fault_count > 0, "the second instance's metrics do not show the fault"
    assert out.details["g4_hits_after"] > 0
    if hooked:
        assert out.details["injected"] > 0


def test_corrupt_first_g4_block_is_recomputed_not_reloaded_forever(tiny_model, tmp_path):
    """Found by this suite: a corrupt FIRST block of a prefix in G4 made the request reload
    and fail forever (the request's probe answer still counted it); now fixed."""
    out = g4_corrupt_first_block(tiny_model, tmp_path)
    assert out.survived, out.explain()
    assert out.fault_count > 0
