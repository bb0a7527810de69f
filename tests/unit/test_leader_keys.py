"""The leader keys requests by everything their KV depends on: multimodal items and prompt
embeddings as well as tokens, salt and LoRA; requests it cannot key are served without it."""

import logging

import numpy as np
import pytest

from kvtier.config import KvtierConfig
from kvtier.hashing import MmItem, RequestKeys
from kvtier.leader import Leader
from kvtier.protocol import WorkerReport

BT = 16
# Text, then an image's 40 placeholder tokens (all the same id) over blocks 3..5, then text.
TOKENS = list(range(3, 3 + 3 * BT + 5)) + [999] * 40 + list(range(500, 500 + 4 * BT))
IMAGE_AT, IMAGE_LEN = 3 * BT + 5, 40
NUM_FULL = len(TOKENS) // BT


def image(identifier: str | None) -> RequestKeys:
    return RequestKeys(mm_items=(MmItem(identifier, IMAGE_AT, IMAGE_LEN),))


def make(mode: str) -> Leader:
    cfg = KvtierConfig(onboard_mode="always", host_cache_blocks=64, hash_mode=mode)
    return Leader(cfg, block_tokens=BT, block_bytes=4096, max_blocks_per_request=64)


def offload(leader: Leader, req_id: str, keys: RequestKeys) -> int:
    """Run a request's prefill through the leader; the number of blocks it stored."""
    assert leader.match(req_id, TOKENS, 0, keys=keys) is not None
    leader.progress(req_id, TOKENS, len(TOKENS), list(range(100, 100 + NUM_FULL)))
    plan = leader.take_plan()
    leader.on_report(WorkerReport(ops_ok=list(plan.stores.op_ids)))
    leader.finish(req_id)
    return len(plan.stores)


MODES = ["xxh3", "kvbm", "sha256_cbor"]


@pytest.mark.parametrize("mode", MODES)
def test_a_different_image_over_the_same_placeholders_matches_only_the_text_before_it(mode):
    leader = make(mode)
    assert offload(leader, "a", image("img-a")) == NUM_FULL
    # Blocks 0..2 end before the image starts; block 3 holds its first placeholder tokens.
    assert leader.match("b", TOKENS, 0, keys=image("img-b")) == 3 * BT
    assert leader.match("b2", TOKENS, 0) == 3 * BT, "no image at all is not image a either"
    assert leader.match("c", TOKENS, 0, keys=image("img-a")) == (len(TOKENS) - 1) // BT * BT


@pytest.mark.parametrize("mode", MODES)
def test_different_prompt_embeddings_share_only_the_blocks_before_they_differ(mode):
    leader = make(mode)
    rows = np.random.default_rng(3).integers(0, 256, size=(len(TOKENS), 64), dtype=np.uint8)
    assert offload(leader, "a", RequestKeys(prompt_embeds=rows)) == NUM_FULL
    changed = rows.copy()
    changed[5 * BT + 2, 0] ^= 0x80
    assert leader.match("b", TOKENS, 0, keys=RequestKeys(prompt_embeds=changed)) == 5 * BT
    assert leader.match("c", TOKENS, 0, keys=RequestKeys(prompt_embeds=rows.copy())) == (
        (len(TOKENS) - 1) // BT * BT)


@pytest.mark.parametrize("reason,keys", [
    ("mm_no_identifier", image(None)),
    ("mm_positions", RequestKeys(mm_items=(MmItem("x", 40, 8), MmItem("y", 20, 8)))),
    ("prompt_embeds", RequestKeys(unkeyable="prompt_embeds")),
])
def test_unkeyable_request_is_neither_matched_nor_offloaded_and_is_counted(reason, keys,
                                                                          caplog):
    leader = make("xxh3")
    offload(leader, "plain", RequestKeys())   # its text would otherwise match
    registered = leader.g2.num_registered
    with caplog.at_level(logging.DEBUG, logger="kvtier.leader"):
        for req_id in ("u1", "u2"):
            assert leader.match(req_id, TOKENS, 0, keys=keys) == 0
            assert leader.match(req_id, TOKENS, 0, keys=keys) == 0   # asked again: same
            leader.progress(req_id, TOKENS, len(TOKENS), list(range(100, 100 + NUM_FULL)))
            assert len(leader.take_plan().stores) == 0
            assert not leader.finish(req_id)
    assert leader.g2.num_registered == registered
    assert leader.metrics.value("kvtier_unkeyable_requests", reason=reason) == 2
    infos = [r for r in caplog.records if "cannot be keyed" in r.getMessage()]
    assert [r.levelno for r in infos] == [logging.INFO, logging.DEBUG], "logged once"
    leader.check_invariants()
    assert leader.g2.num_active == 0


def test_keys_and_their_short_form_agree_and_do_not_mix():
    leader = make("xxh3")
    offload(leader, "a", RequestKeys(cache_salt="t"))
    assert leader.match("b", TOKENS, 0, cache_salt="t") == (len(TOKENS) - 1) // BT * BT
    assert leader.match("c", TOKENS, 0) == 0
    with pytest.raises(ValueError, match="inside keys"):
        leader.match("d", TOKENS, 0, cache_salt="t", keys=RequestKeys())
