"""Leader block-pool cycle throughput: kvtier's BlockPool vs vLLM's own BlockPool.

The cycle, per request (as a leader runs it for one tier): match the request's prefix (a
shared system prompt, cached) taking references, allocate blocks for the rest (evicting
least recently used cached blocks once the pool is full), write and register them, touch
the shared prefix, then release every block tail first. vLLM's ``vllm.v1.core.block_pool
.BlockPool`` (constructed directly, prefix caching on) runs the same sequence through its
own API: ``get_cached_block`` + ``touch`` (its match), ``get_new_blocks``,
``cache_full_blocks``, ``free_blocks``; it has no separate touch, so kvtier does strictly
more work. Both use the same 32-byte block hashes (vLLM's key type).

Metrics (blocks/s, blocks = request blocks cycled; median of interleaved runs, CPU time of
this process so that other load on the machine does not skew the ratio):
  pool_cycle         events off on both pools
  pool_cycle_events  KV events on both pools (kvtier also records token ids, as vLLM does)
  pool_cycle_POLICY  events off, kvtier's pool running each other eviction policy of
                     ``kvtier replay --policies all`` (the tiers' options) instead of LRU
  pool_memory_POLICY bytes per pool block the pool and its policy hold once the pool has
                     turned over ten times (unique 8-block requests; ghost histories full),
                     traced by tracemalloc, against vLLM's BlockPool through the same cycle;
                     the keys themselves are not counted (allocated before tracing)
  pool_cycle_POLICY_N, pool_memory_POLICY_N
                     ``lru`` and ``dueling`` in a pool of N blocks, a host tier's size, where
                     dueling's shadows follow a sample of the keys
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import statistics
import time
import tracemalloc
from types import SimpleNamespace

import numpy as np

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
logging.getLogger("vllm").setLevel(logging.WARNING)

from kvtier.events import EventBuffer
from kvtier.pools import BlockPool
from kvtier.replay import ALL_POLICIES
from kvtier.tiers import Tier

BLOCK = 16


def make_workload(num_requests: int, num_prefixes: int, prefix_blocks: int,
                  unique_blocks: int, seed: int = 0) -> list[tuple[list[bytes], list[int]]]:
    """Per request: its chained block keys and tokens (a shared prefix + unique blocks)."""
    rng = random.Random(seed)
    token_rng = np.random.default_rng(seed)

    def key(*parts: object) -> bytes:
        return hashlib.sha256(repr(parts).encode()).digest()

    prefixes = [[key("p", p, i) for i in range(prefix_blocks)] for p in range(num_prefixes)]
    # Popular prompts are reused more (Zipf-like weights).
    weights = [1.0 / (rank + 1) for rank in range(num_prefixes)]
    requests = []
    for r in range(num_requests):
        prefix = rng.choices(prefixes, weights)[0]
        keys = prefix + [key("u", r, i) for i in range(unique_blocks)]
        tokens = token_rng.integers(0, 150_000, size=len(keys) * BLOCK).tolist()
        requests.append((keys, tokens))
    return requests


def run_kvtier(pool: BlockPool, requests, with_tokens: bool) -> float:
    start = time.process_time()
    for keys, tokens in requests:
        hit = pool.match(keys)
        num_hit = len(hit)
        new = pool.allocate(len(keys) - num_hit)
        if not new and num_hit < len(keys):
            raise SystemExit("kvtier pool ran out of blocks: enlarge it")
        pool.complete(new)
        new = pool.register(new, keys[num_hit:], parent=keys[num_hit - 1] if num_hit else None,
                            token_ids=tokens[num_hit * BLOCK:] if with_tokens else None)
        pool.touch(keys[:num_hit])
        blocks = hit + new
        blocks.reverse()
        pool.release(blocks)
        if pool._events is not None:
            pool._events.take_events()
    return time.process_time() - start


def run_vllm(pool, requests) -> float:
    reqs = [SimpleNamespace(block_hashes=keys, all_token_ids=tokens, num_tokens=len(tokens),
                            lora_request=None, mm_features=[], cache_salt=None,
                            prompt_embeds=None, session_id=None)
            for keys, tokens in requests]
    start = time.process_time()
    for request in reqs:
        keys = request.block_hashes
        hit = []
        for block_hash in keys:
            cached = pool.get_cached_block(block_hash, [0])
            if cached is None:
                break
            hit.append(cached[0])
        pool.touch(hit)
        num_hit = len(hit)
        new = pool.get_new_blocks(len(keys) - num_hit)
        blocks = hit + new
        pool.cache_full_blocks(request, blocks, num_hit, len(keys), BLOCK, 0)
        pool.free_blocks(reversed(blocks))
        pool.take_events()
    return time.process_time() - start


def traced_bytes(cycle) -> int:
    """Bytes still allocated after ``cycle()`` builds and runs a pool (kept alive by it)."""
    tracemalloc.start()
    try:
        kept = cycle()
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del kept
    return size


def memory_results(capacity: int, policies=ALL_POLICIES) -> list[dict]:
    """Per policy: the pool's bytes per block after ten turnovers, vLLM's pool beside it."""
    from vllm.v1.core.block_pool import BlockPool as VllmBlockPool

    requests = make_workload(10 * capacity // 8, 1, 0, 8, seed=1)   # all unique

    def vllm_cycle():
        pool = VllmBlockPool(capacity + 1, enable_caching=True, hash_block_size=BLOCK)
        run_vllm(pool, requests)
        return pool

    theirs = traced_bytes(vllm_cycle) / capacity
    out = []
    for policy in policies:
        def cycle(policy=policy):
            pool = BlockPool(Tier.G3, capacity, eviction=policy, block_size=BLOCK)
            run_kvtier(pool, requests, False)
            return pool
        ours = traced_bytes(cycle) / capacity
        metric = f"pool_memory_{policy}" + ("" if policies is ALL_POLICIES else f"_{capacity}")
        print(f"{metric:<22}{ours:>17,.0f}{theirs:>16,.0f}{ours / theirs:>8.2f}  bytes/block")
        out.append({"metric": metric, "value": round(ours), "unit": "bytes/block",
                    "baseline": "vllm.v1.core.block_pool.BlockPool", "baseline_value":
                    round(theirs), "ratio": round(ours / theirs, 2)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (< 40 s)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    num_requests = 800 if args.quick else 3000
    repeats = args.repeats or (7 if args.quick else 11)
    capacity, num_prefixes, prefix_blocks, unique_blocks = 4096, 16, 32, 24

    from vllm.v1.core.block_pool import BlockPool as VllmBlockPool

    requests = make_workload(num_requests, num_prefixes, prefix_blocks, unique_blocks)
    num_blocks = sum(len(keys) for keys, _ in requests)
    samples: dict[str, list[float]] = {k: [] for k in ("ours", "vllm", "ours_ev", "vllm_ev")}
    for _ in range(repeats):
        for events in (False, True):
            suffix = "_ev" if events else ""
            ours = BlockPool(Tier.G1, capacity, eviction="lru",
                             events=EventBuffer() if events else None, block_size=BLOCK)
            samples["ours" + suffix].append(num_blocks / run_kvtier(ours, requests, events))
            ours.check_invariants()
            # vLLM reserves block 0 as its null block: give it one more to hold as many.
            theirs = VllmBlockPool(capacity + 1, enable_caching=True, hash_block_size=BLOCK,
                                   enable_kv_cache_events=events)
            samples["vllm" + suffix].append(num_blocks / run_vllm(theirs, requests))

    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"{num_requests} requests x {prefix_blocks}+{unique_blocks} blocks, pool of "
          f"{capacity} blocks, {num_prefixes} shared prefixes; median of {repeats} runs")
    print(f"{'metric':<22}{'kvtier blocks/s':>17}{'vLLM blocks/s':>16}{'ratio':>8}")
    results = []
    for metric, ours, theirs, label in (
            ("pool_cycle", "ours", "vllm", "vllm.v1.core.block_pool.BlockPool"),
            ("pool_cycle_events", "ours_ev", "vllm_ev",
             "vllm.v1.core.block_pool.BlockPool (kv events on)")):
        ratio = med[ours] / med[theirs]
        print(f"{metric:<22}{med[ours]:>17,.0f}{med[theirs]:>16,.0f}{ratio:>8.2f}")
        results.append({"metric": metric, "value": round(med[ours]), "unit": "blocks/s",
                        "baseline": label, "baseline_value": round(med[theirs]),
                        "ratio": round(ratio, 2)})
    policy_repeats = max(1, repeats // 3)

    def policy_cycle(policy: str, size: int, metric: str, label: str) -> None:
        """``policy`` in a pool of ``size`` blocks, vLLM's pool of that size timed beside it."""
        ours_bps, theirs_bps = [], []
        for _ in range(policy_repeats):
            ours = BlockPool(Tier.G1, size, eviction=policy, block_size=BLOCK)
            ours_bps.append(num_blocks / run_kvtier(ours, requests, False))
            ours.check_invariants()
            theirs = VllmBlockPool(size + 1, enable_caching=True, hash_block_size=BLOCK)
            theirs_bps.append(num_blocks / run_vllm(theirs, requests))
        ours_med, theirs_med = statistics.median(ours_bps), statistics.median(theirs_bps)
        print(f"{metric:<22}{ours_med:>17,.0f}{theirs_med:>16,.0f}{ours_med / theirs_med:>8.2f}")
        results.append({"metric": metric, "value": round(ours_med), "unit": "blocks/s",
                        "baseline": label, "baseline_value": round(theirs_med),
                        "ratio": round(ours_med / theirs_med, 2)})

    # Every other eviction policy a tier can run, in the same cycle (events off).
    for policy in ALL_POLICIES:
        if policy != "lru":
            policy_cycle(policy, capacity, f"pool_cycle_{policy}",
                         "vllm.v1.core.block_pool.BlockPool")
    # A tier above dueling's SHADOW_BLOCKS shows its shadows a sample of its keys: its cost
    # at a host tier's size (32,768 blocks: 64 GiB of 2 MiB blocks), LRU's beside it.
    large = 2 * capacity if args.quick else 8 * capacity
    for policy in ("lru", "dueling"):
        policy_cycle(policy, large, f"pool_cycle_{policy}_{large}",
                     f"vllm.v1.core.block_pool.BlockPool of {large} blocks")
    results += memory_results(2000 if args.quick else 20000)
    results += memory_results(20000 if args.quick else 100000, ("lru", "dueling"))
    print(json.dumps({"bench": "pool", "results": results}))


if __name__ == "__main__":
    main()
