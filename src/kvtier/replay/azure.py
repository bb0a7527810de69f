"""Azure LLM inference traces (2023) turned into prefix workloads, deterministically.

The Azure CSVs (``TIMESTAMP,ContextTokens,GeneratedTokens``, Patel et al., ISCA 2024) give
arrival times and sizes but no prefix information, so a cache cannot be replayed over them as
they are. :func:`load_azure_trace` adds the prefix structure by a fixed, documented model and
keeps every arrival time and every context length of the file:

* **Sessions.** A request continues a conversation when a session is open (its last request
  was at most ``session_timeout_s`` ago) whose history fits in the request's context: history
  = that request's context + its generated tokens. Of those, the one with the longest history
  is taken (the tightest fit; the most recent on ties), with probability ``follow_up``; the
  request's prompt is then the session's whole history followed by ``context - history`` new
  tokens (the next user turn). Otherwise it starts a session.
* **Shared prompts.** A new session starts with one of ``num_system_prompts`` system prompts,
  drawn with Zipf(1) weights (a few popular applications, many rare ones); prompt ``k`` is
  ``system_tokens[k]`` tokens long, drawn once, uniformly in ``system_prompt_tokens``. A
  request shorter than its system prompt holds that prompt's first ``context`` tokens. The rest
  of the context is the session's own.
* **Blocks.** Block ids are interned from (parent id, content) as in the synthetic generator,
  so they are chained and identical prefixes have identical ids.

Randomness comes only from ``random.Random(seed)``: the same file and spec always give the same
trace, and other seeds give other sharing patterns over the same arrivals.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import random
from collections.abc import Hashable, Iterator

from kvtier.errors import ConfigError, TraceError
from kvtier.replay.synthetic import _BlockIds
from kvtier.replay.trace import MOONCAKE_BLOCK_TOKENS, Trace, TraceRequest

_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclasses.dataclass(frozen=True)
class AzurePrefixSpec:
    """The session and shared-prompt model of :func:`load_azure_trace` (see the module doc)."""

    follow_up: float = 0.5
    session_timeout_s: float = 600.0
    num_system_prompts: int = 16
    system_prompt_tokens: tuple[int, int] = (200, 1500)
    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.follow_up <= 1:
            raise ConfigError(f"follow_up={self.follow_up} is not allowed: use 0..1")
        if not self.session_timeout_s > 0:
            raise ConfigError(f"session_timeout_s={self.session_timeout_s} must be > 0")
        low, high = self.system_prompt_tokens
        if self.num_system_prompts < 1 or not 0 <= low <= high:
            raise ConfigError(f"num_system_prompts={self.num_system_prompts}, "
                              f"system_prompt_tokens={self.system_prompt_tokens}: need >= 1 "
                              "prompts and 0 <= low <= high tokens")
        if self.block_tokens < 1:
            raise ConfigError(f"block_tokens={self.block_tokens} must be >= 1")


class _Session:
    """One conversation's token stream, in the form the block interner reads."""

    __slots__ = ("full_ids", "history", "last_s", "num_tokens", "segments")

    def __init__(self) -> None:
        self.segments: list[tuple[Hashable, int]] = []
        self.full_ids: list[int] = []
        self.num_tokens = 0
        self.history = 0   # tokens the next turn re-sends: last context + its answer
        self.last_s = 0.0

    def append(self, segment: Hashable, length: int) -> None:
        if length > 0:
            self.segments.append((segment, length))
            self.num_tokens += length


def _parse_time(text: str, where: str) -> float:
    """Seconds since the epoch from ``2023-11-16 18:17:03.9799600`` (7 fraction digits)."""
    stamp, _, fraction = text.strip().partition(".")
    try:
        whole = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S")
        frac = float("0." + fraction) if fraction else 0.0
    except ValueError as exc:
        raise TraceError(f"{where}: TIMESTAMP {text!r} is not 'YYYY-MM-DD HH:MM:SS.f'") from exc
    return whole.replace(tzinfo=datetime.timezone.utc).timestamp() + frac


def _read_rows(path: str | os.PathLike[str], limit: int | None) -> list[tuple[float, int, int]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return _parse_rows(csv.reader(handle), path, limit)
    except OSError as exc:
        raise TraceError(f"cannot read Azure trace {path}: {exc.strerror or exc}") from exc


def _parse_rows(reader: Iterator[list[str]], path: str | os.PathLike[str],
                limit: int | None) -> list[tuple[float, int, int]]:
    rows: list[tuple[float, int, int]] = []
    header = next(reader, None)
    if header is None or tuple(col.strip() for col in header) != _COLUMNS:
        raise TraceError(f"{path}: line 1 is {header!r}, expected the header "
                         f"{','.join(_COLUMNS)}")
    for line_no, row in enumerate(reader, start=2):
        if not row:
            continue
        where = f"{path}:{line_no}"
        if len(row) != 3:
            raise TraceError(f"{where}: {len(row)} columns, expected 3")
        try:
            context, generated = int(row[1]), int(row[2])
        except ValueError as exc:
            raise TraceError(f"{where}: token counts {row[1:]!r} are not integers") from exc
        if context < 1 or generated < 0:
            raise TraceError(f"{where}: ContextTokens {context} must be >= 1 and "
                             f"GeneratedTokens {generated} >= 0")
        rows.append((_parse_time(row[0], where), context, generated))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise TraceError(f"{path}: no requests")
    return rows


def load_azure_trace(path: str | os.PathLike[str], spec: AzurePrefixSpec | None = None, *,
                     limit: int | None = None) -> Trace:
    """The Azure CSV at ``path`` as a chained prefix trace (see the module doc)."""
    spec = spec or AzurePrefixSpec()
    rows = _read_rows(path, limit)
    rng = random.Random(spec.seed)
    low, high = spec.system_prompt_tokens
    system_tokens = [rng.randint(low, high) for _ in range(spec.num_system_prompts)]
    zipf = [1.0 / (k + 1) for k in range(spec.num_system_prompts)]
    ids = _BlockIds(spec.block_tokens)
    start_s = rows[0][0]
    open_sessions: list[_Session] = []
    requests: list[TraceRequest] = []
    for number, (time_s, context, generated) in enumerate(rows):
        now_s = time_s - start_s
        open_sessions = [s for s in open_sessions if now_s - s.last_s <= spec.session_timeout_s]
        fits = [s for s in open_sessions if 0 < s.history <= context]
        if fits and rng.random() < spec.follow_up:
            # The longest fitting history; max keeps the first of equals, so list newest first.
            session = max(reversed(fits), key=lambda s: s.history)
            session.append(("turn", number), context - session.history)
        else:
            session = _Session()
            prompt = rng.choices(range(spec.num_system_prompts), weights=zipf)[0]
            shared = min(context, system_tokens[prompt])
            session.append(("system", prompt), shared)
            session.append(("turn", number), context - shared)
            open_sessions.append(session)
        requests.append(TraceRequest(timestamp_ms=round(now_s * 1000.0, 3),
                                     input_length=context, output_length=generated,
                                     hash_ids=tuple(ids.prompt_ids(session))))
        session.append(("answer", number), generated)
        session.history = session.num_tokens
        session.last_s = now_s
    source = (f"{os.path.basename(os.fspath(path))} as prefix sessions (follow-up "
              f"{spec.follow_up}, {spec.num_system_prompts} system prompts, seed {spec.seed})")
    return Trace(requests=tuple(requests), block_tokens=spec.block_tokens, source=source)
