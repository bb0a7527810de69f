"""A real crash: a child process running the harness is SIGKILLed mid-offload; a new engine
on the same disk directory recovers only intact blocks and serves them byte-exact."""

from __future__ import annotations

import pytest
from fault_scenarios import disk_crash_restart


@pytest.mark.slow  # the child imports vLLM (~20 s on a small machine)
def test_sigkill_mid_offload_then_restart_serves_only_intact_blocks(tiny_model, tmp_path):
    out = disk_crash_restart(tiny_model, tmp_path)
    assert out.survived, out.explain()
    details = out.details
    # Everything the killed engine had recorded as durable came back, and nothing that fails
    # its checksum was recovered (the journal names only blocks whose bytes are on disk).
    assert details["recovered"] >= details["durable_before_kill"] > 0
    assert details["checksum_failures"] == 0
    # The restarted engine really onboarded the survivors, each verified byte for byte.
    assert out.verified_loads > 0 and details["g3_hits"] == out.verified_loads
