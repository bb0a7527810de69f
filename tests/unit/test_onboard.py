from kvtier.offload.onboard import OnboardPolicy
from kvtier.tiers import Tier

MB = 1 << 20


def test_unknown_prefill_rate_loads_everything():
    policy = OnboardPolicy("auto", block_bytes=MB, block_tokens=16)
    assert policy.decide([Tier.G2, Tier.G3]).num_blocks == 2


def test_fast_engine_recomputes_instead_of_slow_tier():
    policy = OnboardPolicy("auto", block_bytes=64 * MB, block_tokens=16)
    policy.observe_step(num_prefill_tokens=100_000, seconds=1.0)     # 100k tok/s prefill
    policy.observe_transfer(Tier.G3, 64 * MB, 1.0)                   # 64 MB/s disk
    # A 16-token block: recompute 0.16 ms, load from disk 1 s: never load it.
    assert policy.decide([Tier.G3] * 4).num_blocks == 0


def test_cut_point_loads_fast_prefix_and_recomputes_slow_rest():
    policy = OnboardPolicy("auto", block_bytes=MB, block_tokens=1024)
    policy.observe_step(num_prefill_tokens=50_000, seconds=1.0)      # 20 ms per block
    policy.observe_transfer(Tier.G2, 10 * 1024 * MB, 1.0)            # G2: 0.1 ms per block
    policy.observe_transfer(Tier.G3, 10 * MB, 1.0)                   # G3: 100 ms per block
    decision = policy.decide([Tier.G2] * 3 + [Tier.G3] * 3)
    assert decision.num_blocks == 3
    assert decision.load_s < decision.recompute_s


def test_modes_override_the_model():
    always = OnboardPolicy("always", block_bytes=64 * MB, block_tokens=16)
    always.observe_step(1_000_000, 1.0)
    assert always.decide([Tier.G3] * 5).num_blocks == 5
    never = OnboardPolicy("never", block_bytes=MB, block_tokens=16)
    assert never.decide([Tier.G2] * 5).num_blocks == 0


def test_small_steps_do_not_set_the_prefill_rate():
    policy = OnboardPolicy("auto", block_bytes=MB, block_tokens=16)
    policy.observe_step(num_prefill_tokens=8, seconds=0.5)  # decode-ish step
    assert policy.prefill_rate.samples == 0
