"""The verdict of an end-to-end check: do outputs with kvtier match vLLM alone?

Two runs match when every output has the same greedy tokens and the logprob of every generated
token is within ``LOGPROB_TOLERANCE`` of the baseline's. Greedy tokens alone prove little: a
small model's argmax survives whole wrong blocks of KV; the logprobs do not.

Why a tolerance at all: prefilling on top of loaded KV is not the same float computation as
prefilling the whole prompt (other chunking, other reduction order), so a correct kvtier run
differs from recompute by float32 rounding (measured on the CPU build with the test model of
``kvtier.cli.tiny_model``: at most ~2e-5 over 1k..8k-token prompts). One wrong block in an 8k
prefix (zeroed, from another prompt, or one position off) moves the logprobs by 1e-2 or more on
that model (``tests/integration/test_vllm_e2e.py`` keeps those negative controls).
``LOGPROB_TOLERANCE`` sits between the two, far from both.

A near-tie is not a wrong token: if the runs pick different tokens at a step where the
baseline's choice led the runner-up by less than the tolerance, either pick is right; the rest
of that output continues from another token and is not compared. The logprobs up to that step
still are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

LOGPROB_TOLERANCE = 1e-3


@dataclasses.dataclass
class Verdict:
    num_outputs: int
    max_logprob_diff: float
    num_ties: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = (f"{self.num_outputs} outputs, max |logprob diff| {self.max_logprob_diff:.2e} "
                f"(tolerance {LOGPROB_TOLERANCE:.0e}), {self.num_ties} near-ties")
        return head if self.ok else head + ": " + "; ".join(self.problems[:5])


def join(phases: Iterable[dict]) -> dict:
    """One phase of a ``vllm_job`` result made of several, in order."""
    joined: dict = {"outputs": [], "logprobs": [], "margins": []}
    for phase in phases:
        for key, values in joined.items():
            values.extend(phase[key])
    return joined


def compare(baseline: dict, candidate: dict, tolerance: float = LOGPROB_TOLERANCE) -> Verdict:
    """Compare two ``vllm_job`` phases (``outputs``, ``logprobs``, ``margins``) output by
    output."""
    problems: list[str] = []
    worst, ties = 0.0, 0
    if len(baseline["outputs"]) != len(candidate["outputs"]):
        problems.append(f"{len(candidate['outputs'])} outputs, expected "
                        f"{len(baseline['outputs'])}")
    rows = zip(baseline["outputs"], baseline["logprobs"], baseline["margins"],
               candidate["outputs"], candidate["logprobs"])
    for i, (want, want_lp, margins, got, got_lp) in enumerate(rows):
        if len(want) != len(got):
            problems.append(f"output {i}: {len(got)} tokens, expected {len(want)}")
        for j, (a, b) in enumerate(zip(want, got)):
            diff = abs(want_lp[j] - got_lp[j])
            worst = max(worst, diff)
            if a != b:
                if margins[j] < tolerance:
                    ties += 1
                else:
                    problems.append(f"output {i}: token {j} is {b}, expected {a} "
                                    f"(which led by {margins[j]:.3g})")
                break  # the texts continue from different tokens
            if diff > tolerance:
                problems.append(f"output {i}: token {j} logprob {got_lp[j]:.6f}, expected "
                                f"{want_lp[j]:.6f} (diff {diff:.2e})")
                break
    return Verdict(len(baseline["outputs"]), worst, ties, problems)
