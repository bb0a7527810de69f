"""Chained block hashing throughput: kvtier's BlockHasher vs vLLM's default block hasher.

Workload: requests of int32 token arrays (16-token blocks), hashed from scratch, as a leader
does for each new prompt. kvtier hashes the int32 arrays directly; vLLM's hasher
(``get_request_block_hasher`` with its default ``sha256`` algorithm, as the engine builds it)
gets the Python token list its ``Request`` keeps (the list conversion is not timed).

Metrics (blocks/s, median of interleaved repeated runs in the same process, timed in CPU time
of this process so that other load on a shared machine does not skew them):
  hash_rate         kvtier "xxh3" mode    vs vLLM default (sha256)
  hash_rate_kvbm    kvtier "kvbm" mode    vs vLLM default (sha256)
  hash_rate_list    kvtier "xxh3" on Python lists vs vLLM default (sha256)
  hash_rate_engine  kvtier "sha256_cbor" (identical keys to vLLM's) vs vLLM sha256_cbor
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from types import SimpleNamespace

import numpy as np

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
logging.getLogger("vllm").setLevel(logging.WARNING)

from kvtier.hashing import BlockHasher, salt_hash

BLOCK = 16


def make_requests(num_requests: int, tokens_per_request: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 150_000, size=tokens_per_request, dtype=np.int32)
            for _ in range(num_requests)]


def time_kvtier(hasher: BlockHasher, requests, salt: int) -> float:
    start = time.process_time()
    for tokens in requests:
        hasher.hash_blocks(tokens, salt=salt)
    return time.process_time() - start


def time_vllm(hasher_fn, token_lists) -> float:
    requests = [SimpleNamespace(block_hashes=[], num_tokens=len(t), all_token_ids=t,
                                mm_features=[], lora_request=None, cache_salt=None,
                                prompt_embeds=None) for t in token_lists]
    start = time.process_time()
    for request in requests:
        request.block_hashes = hasher_fn(request)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (< 40 s)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    num_requests, tokens = (24, 2048) if args.quick else (64, 4096)
    repeats = args.repeats or (5 if args.quick else 9)
    baseline_share = 0.25  # vLLM is slow: hash a quarter of the requests, report blocks/s

    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils

    requests = make_requests(num_requests, tokens)
    lists = [r.tolist() for r in requests]
    num_blocks = num_requests * (tokens // BLOCK)
    base_requests = max(1, int(num_requests * baseline_share))
    base_blocks = base_requests * (tokens // BLOCK)
    salt = salt_hash("tenant-a")

    def vllm_hasher(algo: str):
        fn = get_hash_fn_by_name(algo)
        kv_cache_utils.init_none_hash(fn)
        return kv_cache_utils.get_request_block_hasher(BLOCK, fn)

    fast, kvbm, engine = BlockHasher(BLOCK, "xxh3"), BlockHasher(BLOCK, "kvbm"), None
    samples: dict[str, list[float]] = {k: [] for k in (
        "xxh3", "kvbm", "xxh3_list", "sha256_cbor", "vllm_sha256", "vllm_sha256_cbor")}
    # Interleave the contenders so machine noise hits them alike.
    for _ in range(repeats):
        samples["xxh3"].append(num_blocks / time_kvtier(fast, requests, salt))
        samples["kvbm"].append(num_blocks / time_kvtier(kvbm, requests, salt))
        samples["xxh3_list"].append(num_blocks / time_kvtier(fast, lists, salt))
        samples["vllm_sha256"].append(
            base_blocks / time_vllm(vllm_hasher("sha256"), lists[:base_requests]))
        hasher = vllm_hasher("sha256_cbor")
        engine = engine or BlockHasher(BLOCK, "sha256_cbor",
                                       none_hash=kv_cache_utils.NONE_HASH)
        samples["vllm_sha256_cbor"].append(
            base_blocks / time_vllm(hasher, lists[:base_requests]))
        samples["sha256_cbor"].append(
            base_blocks / time_kvtier(engine, requests[:base_requests], 0))

    # The engine mode must reproduce vLLM's keys exactly, or its speed means nothing.
    check = SimpleNamespace(block_hashes=[], num_tokens=tokens, all_token_ids=lists[0],
                            mm_features=[], lora_request=None, cache_salt=None,
                            prompt_embeds=None)
    if vllm_hasher("sha256_cbor")(check) != engine.hash_blocks(requests[0]):
        raise SystemExit("sha256_cbor mode disagrees with vLLM")

    med = {k: statistics.median(v) for k, v in samples.items()}
    rows = [
        ("hash_rate", "xxh3", "vllm_sha256", "vllm default hasher (sha256)"),
        ("hash_rate_kvbm", "kvbm", "vllm_sha256", "vllm default hasher (sha256)"),
        ("hash_rate_list", "xxh3_list", "vllm_sha256", "vllm default hasher (sha256)"),
        ("hash_rate_engine", "sha256_cbor", "vllm_sha256_cbor", "vllm sha256_cbor hasher"),
    ]
    print(f"{num_requests} requests x {tokens} tokens ({num_blocks} blocks of {BLOCK}), "
          f"median of {repeats} runs")
    print(f"{'metric':<18}{'kvtier blocks/s':>18}{'baseline blocks/s':>20}{'ratio':>9}  baseline")
    results = []
    for metric, ours, base, label in rows:
        ratio = med[ours] / med[base]
        print(f"{metric:<18}{med[ours]:>18,.0f}{med[base]:>20,.0f}{ratio:>9.1f}  {label}")
        results.append({"metric": metric, "value": round(med[ours]), "unit": "blocks/s",
                        "baseline": label, "baseline_value": round(med[base]),
                        "ratio": round(ratio, 2)})
    print(json.dumps({"bench": "hashing", "results": results}))


if __name__ == "__main__":
    main()
