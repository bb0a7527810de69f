"""Synthetic multi-round QA workloads, in the style of LMCache's multi-round-qa benchmark.

Users hold conversations of several rounds. Every prompt starts with one system prompt shared by
all users, then the user's own context (a document or chat history), then the rounds so far
(question, answer, question, answer, ...) and the new question: each round re-sends the whole
history plus a bit more, so a cache that keeps a user's blocks between rounds saves nearly the
whole prefill. ``concurrent_users`` users are active at once and take turns (round robin); when a
user finishes its rounds a new user takes its place, until ``num_users`` have been served. The
number of other requests between two rounds of one user is therefore about ``concurrent_users``,
which is the knob that sets cache pressure.

The output is a :class:`~kvtier.replay.trace.Trace` in the Mooncake record form: chained
prefix-block ids with ``block_tokens`` tokens per block, the last block partial, so the same
replay code serves real and synthetic traffic.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Hashable

from kvtier.errors import ConfigError
from kvtier.replay.trace import MOONCAKE_BLOCK_TOKENS, Trace, TraceRequest

_SYSTEM = ("system",)


@dataclasses.dataclass(frozen=True)
class MultiRoundQASpec:
    """Shape of a synthetic multi-round QA workload (lengths in tokens)."""

    num_users: int = 40
    num_rounds: int = 8
    concurrent_users: int = 10
    qps: float = 2.0
    system_prompt_tokens: int = 1000
    history_tokens: int = 8000       # per-user context before the first question
    question_tokens: int = 150
    answer_tokens: int = 250
    min_rounds: int | None = None    # each user's rounds drawn from [min_rounds, num_rounds]
    jitter: float = 0.0              # relative +- noise on per-user and per-round lengths
    poisson: bool = False            # exponential inter-arrival times instead of a fixed 1/qps
    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_users", "num_rounds", "concurrent_users", "block_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} is not allowed: must be >= 1")
        for name in ("system_prompt_tokens", "history_tokens", "question_tokens",
                     "answer_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} is not allowed: must be >= 0")
        if self.question_tokens + self.system_prompt_tokens + self.history_tokens == 0:
            raise ConfigError("a prompt needs tokens: system_prompt_tokens, history_tokens and "
                              "question_tokens are all 0")
        if not self.qps > 0:
            raise ConfigError(f"qps={self.qps} is not allowed: must be > 0")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"jitter={self.jitter} is not allowed: use 0 <= jitter < 1")
        if self.min_rounds is not None and not 1 <= self.min_rounds <= self.num_rounds:
            raise ConfigError(f"min_rounds={self.min_rounds} is not allowed: use 1.."
                              f"{self.num_rounds} (num_rounds)")


class _User:
    """One conversation: its token segments and the ids of its full blocks so far."""

    __slots__ = (
        "answer_lens",
        "full_ids",
        "num_tokens",
        "question_lens",
        "round_idx",
        "rounds",
        "segments",
        "uid",
    )

    def __init__(self, uid: int, rounds: int, history: int, question_lens: list[int],
                 answer_lens: list[int], system_tokens: int) -> None:
        self.uid = uid
        self.rounds = rounds
        self.round_idx = 0
        # (segment identity, length); the system segment is the same object for all users.
        self.segments: list[tuple[Hashable, int]] = []
        if system_tokens:
            self.segments.append((_SYSTEM, system_tokens))
        if history:
            self.segments.append((("history", uid), history))
        self.num_tokens = system_tokens + history
        self.full_ids: list[int] = []
        self.question_lens = question_lens
        self.answer_lens = answer_lens

    def append(self, segment: Hashable, length: int) -> None:
        if length:
            self.segments.append((segment, length))
            self.num_tokens += length


class _BlockIds:
    """Interns (parent id, block content) -> a dense int id, giving chained prefix ids."""

    def __init__(self, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self._ids: dict[tuple[int, tuple], int] = {}

    def prompt_ids(self, user: _User) -> list[int]:
        bt = self.block_tokens
        num_full = user.num_tokens // bt
        while len(user.full_ids) < num_full:
            idx = len(user.full_ids)
            user.full_ids.append(self._intern(user, idx * bt, (idx + 1) * bt))
        ids = list(user.full_ids)
        if user.num_tokens % bt:
            ids.append(self._intern(user, num_full * bt, user.num_tokens))
        return ids

    def _intern(self, user: _User, start: int, end: int) -> int:
        parent = user.full_ids[start // self.block_tokens - 1] if start else -1
        content = tuple(_pieces(user.segments, start, end))
        return self._ids.setdefault((parent, content), len(self._ids))


def _pieces(segments: list[tuple[Hashable, int]], start: int, end: int):
    """(segment, offset from, offset to) pieces covering tokens [start, end) of a stream."""
    pos = 0
    for segment, length in segments:
        seg_end = pos + length
        if seg_end > start and pos < end:
            yield segment, max(start, pos) - pos, min(end, seg_end) - pos
        if seg_end >= end:
            return
        pos = seg_end


def generate_multi_round_qa(spec: MultiRoundQASpec) -> Trace:
    """Build the trace for ``spec``; the same spec (and seed) always gives the same trace."""
    rng = random.Random(spec.seed)
    ids = _BlockIds(spec.block_tokens)

    def vary(length: int) -> int:
        if not spec.jitter or not length:
            return length
        return max(1, round(length * rng.uniform(1 - spec.jitter, 1 + spec.jitter)))

    def new_user(uid: int) -> _User:
        rounds = spec.num_rounds
        if spec.min_rounds is not None:
            rounds = rng.randint(spec.min_rounds, spec.num_rounds)
        return _User(uid, rounds, vary(spec.history_tokens),
                     [vary(spec.question_tokens) for _ in range(rounds)],
                     [vary(spec.answer_tokens) for _ in range(rounds)],
                     spec.system_prompt_tokens)

    next_uid = 0
    active: list[_User] = []
    while next_uid < min(spec.concurrent_users, spec.num_users):
        active.append(new_user(next_uid))
        next_uid += 1

    requests: list[TraceRequest] = []
    now_s = 0.0
    turn = 0
    while active:
        slot = turn % len(active)
        user = active[slot]
        r = user.round_idx
        user.append(("question", user.uid, r), user.question_lens[r])
        requests.append(TraceRequest(timestamp_ms=float(round(now_s * 1000)),
                                     input_length=user.num_tokens,
                                     output_length=user.answer_lens[r],
                                     hash_ids=tuple(ids.prompt_ids(user))))
        user.append(("answer", user.uid, r), user.answer_lens[r])
        user.round_idx += 1
        if user.round_idx < user.rounds:
            turn = slot + 1
        elif next_uid < spec.num_users:
            active[slot] = new_user(next_uid)
            next_uid += 1
            turn = slot + 1
        else:
            del active[slot]
            turn = slot
        now_s += rng.expovariate(spec.qps) if spec.poisson else 1.0 / spec.qps

    source = (f"synthetic multi-round QA: {spec.num_users} users x {spec.num_rounds} rounds, "
              f"{spec.concurrent_users} concurrent, seed {spec.seed}")
    return Trace(requests=tuple(requests), block_tokens=spec.block_tokens, source=source)
