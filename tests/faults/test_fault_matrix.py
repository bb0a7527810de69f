"""The fault matrix: kvtier under vLLM's real scheduler with one fault at a time.

Every case asserts what users need from a cache that meets a fault: outputs identical to the
right ones (the harness's model reads the KV bytes, so a wrong onboarded byte changes them),
every onboarded block byte-exact, no request hung, no block leaked in vLLM's pool or kvtier's
tiers, and the fault visible in kvtier's metrics or disk stats.
"""

from __future__ import annotations

import pytest
from fault_scenarios import (
    Spec,
    disk_bytes_flipped,
    disk_dir_removed,
    disk_file_truncated,
    drive,
    engine_abort_mid_load,
    engine_preemption_storm,
    engine_reset_during_transfers,
    expected_tokens,
    host_evicted_before_pin,
    host_g2_exhausted,
    host_staging_exhausted,
    make_fault_harness,
    prompt,
    run_scenario,
)
from sched_harness import BLOCK

from kvtier.storage.host import HostArena


def assert_survived(out):
    assert out.survived, out.explain()


# name, disk stats counter that must show the fault, and the errno / reason label in it.
HOOKED = [
    ("disk_enospc_write", "write_errors", "ENOSPC"),
    ("disk_eio_write", "write_errors", "EIO"),
    ("disk_short_write", "write_errors", "short_write"),
    ("disk_fsync_eio", "write_errors", "EIO"),
    ("disk_eio_read", "failed_reads", "EIO"),
    ("disk_short_read", "failed_reads", "short_read"),
    ("disk_flip_in_transit", "failed_reads", "checksum"),
]


@pytest.mark.parametrize("name,counter,label", HOOKED)
def test_injected_disk_fault_is_survived_and_counted(tiny_model, tmp_path, name, counter, label):
    out = run_scenario(name, tiny_model, tmp_path)
    assert_survived(out)
    assert out.details["injected"] > 0, "the fault never fired: the case tested nothing"
    assert out.fault_count > 0, "kvtier's metrics do not show the fault"
    assert out.details["disk_stats"][counter].get(label, 0) > 0, out.details["disk_stats"]
    # Some I/O calls failed, not all: the tier still served the rest, verified.
    assert out.verified_loads > 0 and out.details["g3_hits"] == out.verified_loads


def test_bytes_flipped_in_the_data_file_are_misses(tiny_model, tmp_path):
    out = disk_bytes_flipped(tiny_model, tmp_path)
    assert_survived(out)
    # Each damaged block is caught at most once (then dropped from the tier); a damaged block
    # behind an earlier one in its prefix is never read at all.
    assert 0 < out.fault_count <= out.details["damaged_blocks"]
    assert out.verified_loads > 0


def test_truncated_data_file_gives_short_reads_then_heals(tiny_model, tmp_path):
    out = disk_file_truncated(tiny_model, tmp_path)
    assert_survived(out)
    assert out.details["failed_reads"].get("short_read", 0) > 0
    assert out.fault_count > 0


def test_directory_removed_while_running(tiny_model, tmp_path):
    out = disk_dir_removed(tiny_model, tmp_path)
    assert_survived(out)
    # The open files keep serving the running engine; a restart starts the tier empty.
    assert out.details["recovered_after_restart"] == 0
    assert out.details["g3_hits_after_restart"] == 0


def test_host_tier_exhausted_drops_offloads_without_stalling(tiny_model, tmp_path):
    out = host_g2_exhausted(tiny_model, tmp_path)
    assert_survived(out)
    assert out.details["dropped_under_load"] > 0
    assert out.details["g2_hits_after_load"] > 0, "the host tier stayed wedged after the load"


def test_no_staging_slot_for_a_while_fails_loads_then_heals(tiny_model, tmp_path):
    out = host_staging_exhausted(tiny_model, tmp_path)
    assert_survived(out)
    # Loads planned without a staging slot (if any) fail cleanly; none is served. Either way
    # the blocks not loaded show in the metrics (load errors or skipped onboards).
    assert out.details["load_errors"] >= out.details["planned_blocks"]
    assert out.fault_count > 0
    assert out.details["g3_hits_after"] > 0, "disk hits never came back with the slots"


def test_requests_progress_while_staging_stays_exhausted(tiny_model, tmp_path):
    """No staging slot ever comes back: requests must recompute rather than retry loads
    forever (a livelock this suite found; fixed in the leader)."""
    out = host_staging_exhausted(tiny_model, tmp_path, hold_steps=10**9, max_steps=600)
    assert_survived(out)


def test_blocks_gone_before_pinning_are_recomputed(tiny_model, tmp_path):
    out = host_evicted_before_pin(tiny_model, tmp_path)
    assert_survived(out)
    assert out.details["planned_blocks"] > 0 and out.verified_loads == 0
    assert out.details["load_errors"] >= out.details["planned_blocks"]


def test_each_failed_block_is_counted_once(tiny_model, tmp_path):
    """Found by this suite: blocks that failed to pin were counted twice (now fixed)."""
    out = host_evicted_before_pin(tiny_model, tmp_path)
    assert out.details["load_errors"] == out.details["planned_blocks"]


def test_requests_aborted_mid_load(tiny_model, tmp_path):
    out = engine_abort_mid_load(tiny_model, tmp_path)
    assert_survived(out)
    assert out.details["aborted"] >= 2
    assert out.details["aborted_while_loading"] >= 1, "no abort landed while a load ran"


def test_preemption_storm(tiny_model, tmp_path):
    out = engine_preemption_storm(tiny_model, tmp_path)
    assert_survived(out)
    assert out.details["preemptions"] >= 8
    assert out.details["tier_hits"] > 0, "preempted requests never came back through kvtier"


def test_reset_cache_during_transfers(tiny_model, tmp_path):
    out = engine_reset_during_transfers(tiny_model, tmp_path)
    assert_survived(out)
    assert out.details["resets_while_busy"] >= 2


# -- the checks themselves can fail ---------------------------------------------------------------


def test_a_verifier_that_accepts_everything_is_caught(tiny_model, tmp_path, monkeypatch):
    """Mutation check: with block verification switched off, flipped disk bytes reach the
    model, and the matrix reports wrong tokens. Proves the matrix would see the real bug."""
    monkeypatch.setattr(HostArena, "check", lambda self, slot, key, fingerprint: None)
    out = disk_bytes_flipped(tiny_model, tmp_path)
    assert not out.survived
    assert out.wrong_tokens > 0 and out.wrong_blocks > 0


def test_reference_outputs_are_those_of_vllm_alone(tiny_model):
    """``expected_tokens`` (the right outputs, from the tokens alone) equals what the harness
    produces with vLLM and no kvtier, so the matrix compares against a real baseline."""
    h = make_fault_harness(tiny_model, None, num_blocks=64)
    specs = [Spec(f"r{i}", prompt(40 + i, 3 * BLOCK + 5 * i), max_tokens=6) for i in range(4)]
    assert drive(h, specs) == []
    for s in specs:
        assert h.outputs[s.req_id] == expected_tokens(s.prompt, s.max_tokens)
