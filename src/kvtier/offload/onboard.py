"""Onboard-or-recompute: load a matched prefix only where that beats computing it.

A tier pays only if moving a block costs less than prefilling its tokens. Both sides are
measured while the engine runs: each tier's bandwidth from the workers' transfer timings,
the engine's prefill rate from the steps it runs. Until measured, conservative priors from
the reference machine apply (ENVIRONMENT.md section 9).
"""

from __future__ import annotations

import dataclasses

from kvtier.tiers import Tier

# Bytes/s priors, deliberately at the low end of what the reference machine measured.
_PRIOR_BANDWIDTH = {Tier.G2: 4e9, Tier.G3: 0.7e9, Tier.G4: 0.3e9}
# Fixed cost of an asynchronous load: planning, a thread hand-off, completion polling.
_LOAD_OVERHEAD_S = 0.001


class Ewma:
    """Exponentially weighted mean that starts at a prior and follows measurements."""

    __slots__ = ("alpha", "samples", "value")

    def __init__(self, prior: float, alpha: float = 0.2) -> None:
        self.value = prior
        self.alpha = alpha
        self.samples = 0

    def update(self, sample: float) -> None:
        # The first samples replace the prior quickly; later ones smooth noise.
        alpha = max(self.alpha, 1.0 / (self.samples + 1))
        self.value += alpha * (sample - self.value)
        self.samples += 1


@dataclasses.dataclass(frozen=True, slots=True)
class OnboardDecision:
    num_blocks: int          # leading matched blocks to load (the rest is recomputed)
    load_s: float            # estimated seconds to load them
    recompute_s: float       # estimated seconds to compute them instead


class OnboardPolicy:
    """Chooses how many leading matched blocks to load, per request.

    ``mode``: "auto" (cost model), "always" (load every match), "never" (no onboarding).
    """

    def __init__(self, mode: str = "auto", block_bytes: int = 0, block_tokens: int = 16,
                 prior_prefill_tokens_per_s: float = 0.0) -> None:
        self.mode = mode
        self.block_bytes = block_bytes
        self.block_tokens = block_tokens
        self.bandwidth = {tier: Ewma(bw) for tier, bw in _PRIOR_BANDWIDTH.items()}
        # 0 = unknown: until the engine's prefill rate is measured, a tier hit is assumed to
        # win (true on every machine measured, where a tier moves >= 0.3 GB/s).
        self.prefill_rate = Ewma(prior_prefill_tokens_per_s)

    # -- measurements -------------------------------------------------------------------
    def observe_transfer(self, tier: Tier, num_bytes: int, seconds: float) -> None:
        if num_bytes > 0 and seconds > 0:
            self.bandwidth[tier].update(num_bytes / seconds)

    def observe_step(self, num_prefill_tokens: int, seconds: float) -> None:
        """One engine step that computed ``num_prefill_tokens`` prompt tokens."""
        if seconds <= 0:
            return
        # Small steps are dominated by fixed costs and would understate the rate.
        if num_prefill_tokens >= 4 * self.block_tokens:
            self.prefill_rate.update(num_prefill_tokens / seconds)

    # -- decision -----------------------------------------------------------------------
    def decide(self, tiers_of_blocks: list[Tier]) -> OnboardDecision:
        """``tiers_of_blocks[i]`` is the fastest tier holding matched block ``i``."""
        n = len(tiers_of_blocks)
        if n == 0 or self.mode == "never":
            return OnboardDecision(0, 0.0, 0.0)
        rate = self.prefill_rate.value
        recompute_per_block = self.block_tokens / rate if rate > 0 else float("inf")
        if self.mode == "always" or recompute_per_block == float("inf"):
            return OnboardDecision(n, self._load_seconds(tiers_of_blocks),
                                   n * recompute_per_block)
        # Best cut k: load blocks [0, k), recompute [k, n). Loads are per block, so the total
        # is a prefix sum; one pass finds the cut with the lowest estimated time.
        best_k, best_cost, load_s = 0, n * recompute_per_block, 0.0
        per_block = {t: self.block_bytes / bw.value for t, bw in self.bandwidth.items()}
        for k, tier in enumerate(tiers_of_blocks, start=1):
            load_s += per_block[tier]
            cost = _LOAD_OVERHEAD_S + load_s + (n - k) * recompute_per_block
            if cost < best_cost:
                best_k, best_cost = k, cost
        return OnboardDecision(best_k, self._load_seconds(tiers_of_blocks[:best_k]),
                               best_k * recompute_per_block)

    def _load_seconds(self, tiers: list[Tier]) -> float:
        return sum(self.block_bytes / self.bandwidth[t].value for t in tiers)
