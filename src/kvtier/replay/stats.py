"""Hit counters for one replay, in blocks and in tokens."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class HitStats:
    """Prefix hits over a replay: ``hit`` counts the leading blocks (tokens) found cached."""

    num_requests: int = 0
    blocks_total: int = 0
    blocks_hit: int = 0
    tokens_total: int = 0
    tokens_hit: int = 0

    def add(self, num_blocks: int, hit_blocks: int, input_length: int, block_tokens: int) -> None:
        self.num_requests += 1
        self.blocks_total += num_blocks
        self.blocks_hit += hit_blocks
        self.tokens_total += input_length
        # Replays hit full blocks only (TraceRequest.cacheable_ids); min() keeps a caller that
        # counts a partial last block from claiming tokens the prompt does not have.
        self.tokens_hit += min(hit_blocks * block_tokens, input_length)

    @property
    def block_hit_ratio(self) -> float:
        return self.blocks_hit / self.blocks_total if self.blocks_total else 0.0

    @property
    def token_hit_ratio(self) -> float:
        return self.tokens_hit / self.tokens_total if self.tokens_total else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {"num_requests": self.num_requests, "blocks_total": self.blocks_total,
                "blocks_hit": self.blocks_hit, "tokens_total": self.tokens_total,
                "tokens_hit": self.tokens_hit, "block_hit_ratio": self.block_hit_ratio,
                "token_hit_ratio": self.token_hit_ratio}
