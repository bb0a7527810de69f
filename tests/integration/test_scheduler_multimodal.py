"""Multimodal and prompt-embeds requests under vLLM's real v1 Scheduler with kvtier's connector.

Two requests whose prompts hold the same placeholder tokens for different images must never
share KV. The harness's stand-in forward pass writes, for positions covered by an image (or
by a prompt embedding), a pattern that depends on that image's identifier (or the embedding
row) rather than on the placeholder token, as a real model's KV would; so a block wrongly
shared between images is caught by the byte check of every load, not only by the counts.
"""

from __future__ import annotations

import dataclasses
import random
import zlib

import pytest
import sched_harness
import torch
from sched_harness import BLOCK, EOS, LAYERS, Harness, make_harness, token_pattern
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItem, PlaceholderRange
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.encoder_cache_manager import EncoderCacheManager
from vllm.v1.core.kv_cache_utils import get_request_block_hasher
from vllm.v1.request import Request

PLACEHOLDER = 999
HIDDEN = 8


class MmHarness(Harness):
    """The harness, with the KV of image and embedding positions depending on their input."""

    def _forward(self, so) -> None:
        for req_id, n in so.num_scheduled_tokens.items():
            req = self.scheduler.requests[req_id]
            block_ids = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
            start = req.num_computed_tokens - n
            positions = torch.arange(start, start + n)
            toks = torch.tensor(effective_tokens(req)[start:start + n])
            blocks = torch.tensor(block_ids)[positions // BLOCK]
            offsets = positions % BLOCK
            for layer, name in enumerate(LAYERS):
                self.kv[name][blocks, :, offsets, :] = token_pattern(toks, positions, layer)

    @staticmethod
    def _tokens_of(req) -> list[int]:
        return effective_tokens(req)


def effective_tokens(req: Request) -> list[int]:
    """What the KV of each position depends on, as a token-like int."""
    toks = list(req.all_token_ids)
    for f in req.mm_features:
        salt = zlib.crc32(str(f.identifier).encode())
        for pos in range(f.mm_position.offset, f.mm_position.offset + f.mm_position.length):
            toks[pos] = 3 + (salt + pos) % 997
    if req.prompt_embeds is not None:
        for pos, row in enumerate(req.prompt_embeds):
            toks[pos] = 3 + zlib.crc32(row.numpy().tobytes()) % 997
    return toks


def mm_harness(model_dir: str, monkeypatch=None, **extra) -> MmHarness:
    """The harness with kvtier on the host tier; with ``monkeypatch``, vLLM's own prefix
    cache is off (then vLLM does not hash requests itself)."""
    if monkeypatch is not None:
        config = sched_harness.CacheConfig
        monkeypatch.setattr(sched_harness, "CacheConfig", lambda **kw: config(
            **{**kw, "enable_prefix_caching": False}))
    h = make_harness(model_dir, {"host_cache_blocks": 512, "onboard_mode": "always", **extra})
    h = MmHarness(**{f.name: getattr(h, f.name) for f in dataclasses.fields(h)})
    # The tiny model is text-only, so vLLM gives it no encoder budget and would never
    # schedule an image's tokens; the harness's forward pass stands in for the encoder too.
    h.scheduler.max_num_encoder_input_tokens = 1 << 14
    h.scheduler.encoder_cache_manager = EncoderCacheManager(cache_size=1 << 14)
    return h


def add(h: Harness, req_id: str, prompt: list[int] | None, images=(), *, embeds=None,
        prefix_caching: bool = True) -> Request:
    features = [MultiModalFeatureSpec(data=MultiModalKwargsItem.dummy(), modality="image",
                                      identifier=ident,
                                      mm_position=PlaceholderRange(offset=off, length=length))
                for ident, off, length in images]
    sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    sp.update_from_generation_config({}, EOS)
    req = Request(req_id, prompt, sp, pooling_params=None, mm_features=features or None,
                  prompt_embeds=embeds,
                  block_hasher=get_request_block_hasher(BLOCK, sha256) if prefix_caching
                  else None)
    h.scheduler.add_request(req)
    return req


def text(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 900) for _ in range(n)]


# 3 text blocks and 5 tokens, an image's 40 placeholder tokens (blocks 3..5), more text.
IMAGE_AT, IMAGE_LEN = 3 * BLOCK + 5, 40
PROMPT = text(1, IMAGE_AT) + [PLACEHOLDER] * IMAGE_LEN + text(2, 4 * BLOCK + 6)
NUM_FULL = len(PROMPT) // BLOCK   # 10 full blocks, all loadable (3 tokens are computed)


def run_fresh(h: Harness, req_id: str, *args, **kw) -> int:
    """Run one request with vLLM's device cache emptied first; the blocks kvtier loaded."""
    h.scheduler.reset_prefix_cache()
    before = h.verified_loads
    add(h, req_id, *args, **kw)
    h.run()
    h.drain()
    return h.verified_loads - before


@pytest.mark.parametrize("hash_mode", ["xxh3", "sha256_cbor"])
def test_different_images_over_the_same_placeholders_never_share_a_block(tiny_model,
                                                                        hash_mode):
    h = mm_harness(tiny_model, hash_mode=hash_mode)
    assert run_fresh(h, "cat", PROMPT, [("sha-cat", IMAGE_AT, IMAGE_LEN)]) == 0
    assert h.leader.g2.num_registered == NUM_FULL
    # Only the 3 blocks that end before the image are the same KV.
    assert run_fresh(h, "dog", PROMPT, [("sha-dog", IMAGE_AT, IMAGE_LEN)]) == 3
    assert h.leader.metrics.value("kvtier_matched_blocks", tier="G2") == 3
    # Each image's blocks are stored under its own keys: both are found again in full.
    assert run_fresh(h, "cat2", PROMPT, [("sha-cat", IMAGE_AT, IMAGE_LEN)]) == NUM_FULL
    assert run_fresh(h, "dog2", PROMPT, [("sha-dog", IMAGE_AT, IMAGE_LEN)]) == NUM_FULL
    assert h.outputs["cat2"] == h.outputs["cat"] and h.outputs["dog2"] == h.outputs["dog"]
    assert not h.load_errors_seen
    h.assert_no_leaks()


def test_same_image_at_another_offset_shares_only_the_text_before_it(tiny_model):
    h = mm_harness(tiny_model)
    # One placeholder token more than the image needs: it fits at two offsets.
    prompt = PROMPT[:IMAGE_AT + IMAGE_LEN] + [PLACEHOLDER] + PROMPT[IMAGE_AT + IMAGE_LEN:]
    assert run_fresh(h, "a", prompt, [("sha-cat", IMAGE_AT, IMAGE_LEN)]) == 0
    # Same tokens, same image, one position later: other KV from the image's first block.
    assert run_fresh(h, "b", prompt, [("sha-cat", IMAGE_AT + 1, IMAGE_LEN)]) == 3
    assert run_fresh(h, "c", prompt, [("sha-cat", IMAGE_AT, IMAGE_LEN)]) == NUM_FULL
    h.assert_no_leaks()


def test_two_images_a_change_in_the_second_keeps_the_first(tiny_model):
    h = mm_harness(tiny_model)
    prompt = text(3, 20) + [PLACEHOLDER] * 30 + text(4, 30) + [PLACEHOLDER] * 30 + text(5, 50)
    first, second = ("img-1", 20, 30), ("img-2", 80, 30)
    assert run_fresh(h, "a", prompt, [first, second]) == 0
    # The second image starts in block 5 (80 // 16): blocks 0..4 are shared.
    assert run_fresh(h, "b", prompt, [first, ("img-3", 80, 30)]) == 5
    assert run_fresh(h, "c", prompt, [first, second]) == (len(prompt) - 1) // BLOCK
    h.assert_no_leaks()


def test_prompt_embeddings_are_keyed(tiny_model):
    h = mm_harness(tiny_model)
    embeds = torch.randn(6 * BLOCK + 3, HIDDEN, generator=torch.Generator().manual_seed(0))
    assert run_fresh(h, "a", None, embeds=embeds) == 0
    other = embeds.clone()
    other[2 * BLOCK + 7, 0] += 1.0
    assert run_fresh(h, "b", None, embeds=other) == 2, "only the blocks before the change"
    assert run_fresh(h, "c", None, embeds=embeds.clone()) == 6
    h.assert_no_leaks()


def test_image_without_identifier_is_served_without_kvtier(tiny_model, monkeypatch):
    # Without its prefix cache vLLM does not hash the request, so nothing stops an item
    # without an identifier before kvtier: it must neither match nor offload, and not fail.
    h = mm_harness(tiny_model, monkeypatch)
    assert run_fresh(h, "a", PROMPT, [("sha-cat", IMAGE_AT, IMAGE_LEN)]) == 0
    stored = h.leader.g2.num_registered
    assert run_fresh(h, "anon", PROMPT, [(None, IMAGE_AT, IMAGE_LEN)],
                     prefix_caching=False) == 0
    assert len(h.outputs["anon"]) == 3
    assert h.leader.g2.num_registered == stored, "nothing of it was offloaded"
    assert h.leader.metrics.value("kvtier_unkeyable_requests", reason="mm_no_identifier") == 1
    h.assert_no_leaks()
