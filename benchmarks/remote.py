"""G2 <-> G4 throughput through kvtier's remote backends vs the raw store clients.

A batch of blocks (default 64 x 1 MiB, each with its 64-byte header, in one numpy array standing
for the G2 arena) is stored and read back through ``kvtier.storage.remote`` and, in the same run
against the same server, through the store's own client doing the same batch of bytes:

  redis     raw: redis-py pipeline of SET / GET (GET leaves the bytes in redis-py's reply)
            ours: pipeline of SET NX / GET, copy into the arena, verify header + checksum
  redis_cluster  a 3-master Redis Cluster on loopback
            raw: redis-py's RedisCluster pipeline of SET / GET (it writes every node's
                 commands, then reads every node's replies)
            ours: SET NX / GET pipelines per master, run concurrently, then as for redis
  mooncake  raw: MooncakeDistributedStore.batch_put_from / batch_get_into on the arena
            ours: the same calls on a deadline thread, then verify header + checksum
  s3        raw: boto3 put_object(Body=bytes(row)) / get_object().read(), one object per
                 block, on a pool of as many threads as kvtier uses (8), same client Config
                 (timeouts, one attempt, no extra body CRC: kvtier checksums blocks itself)
            ours: conditional put_object (If-None-Match) / get_object on kvtier's own threads,
                 copy into the arena, verify header + checksum

Each repetition removes its keys afterwards (a put of a held key costs nothing on either store),
the order of ours/raw alternates, and medians are quoted. The script starts and stops its own servers
(redis-server; mooncake_master + a mooncake_client storage process; SeaweedFS ``weed server
-s3``) on loopback.

Metrics (GB/s, ratio = ours / raw): redis_put, redis_get, redis_cluster_put, redis_cluster_get,
mooncake_put, mooncake_get, s3_put, s3_get.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests" / "integration"),
                str(Path(__file__).resolve().parents[1] / "tests")]

from servers import MooncakeServer, RedisClusterServers, RedisServer, SeaweedS3Server

from kvtier.storage import block_format
from kvtier.storage.remote import make_backend, make_namespace, remote_key
from need import missing_servers, require_or_note

FINGERPRINT = 0xBE7C_0000_0000_0001
S3_THREADS = 8  # kvtier's default for s3 URLs; the raw baseline uses as many


def make_arena(num_blocks: int, block_bytes: int, seed: int) -> tuple[list[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = [int(k) for k in rng.integers(1, 2**63, size=num_blocks)]
    arena = rng.integers(0, 256, size=(num_blocks, block_bytes), dtype=np.uint8)
    for idx, key in enumerate(keys):
        header = block_format.pack_header(key, FINGERPRINT, arena[idx, 64:])
        arena[idx, :64] = np.frombuffer(header, dtype=np.uint8)
    return keys, arena


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def bench_store(kind: str, server, num_blocks: int, block_bytes: int, reps: int,
                timeout_s: float) -> dict[str, tuple[float, float]]:
    """{"put": (ours GB/s, raw GB/s), "get": (...)} medians over ``reps``."""
    nbytes = num_blocks * block_bytes
    src_keys, src = make_arena(num_blocks, block_bytes, seed=1)
    dst = np.zeros_like(src)
    src_views = [memoryview(row) for row in src]
    dst_views = [memoryview(row) for row in dst]
    src_ptrs = [row.ctypes.data for row in src]
    dst_ptrs = [row.ctypes.data for row in dst]
    sizes = [block_bytes] * num_blocks
    if kind == "s3":
        raw = server.raw_client(timeout_s=timeout_s, max_pool_connections=S3_THREADS,
                                request_checksum_calculation="when_required",
                                response_checksum_validation="when_required")
        url = server.url("bench")
    else:
        raw = server.raw_client()
        url = server.url
    # One client each, warmed up by repetition 0; keys are removed after every repetition, so
    # every timed put writes (both stores keep the first write of a key and skip later ones).
    ours = make_backend(url, namespace=make_namespace("bench/kvtier", FINGERPRINT),
                        timeout_s=timeout_s)
    ours_names = [remote_key(ours.namespace, key) for key in src_keys]
    raw_names = [remote_key(make_namespace("bench/raw", FINGERPRINT), key) for key in src_keys]

    def ours_put():
        return all(ours.batch_put(src_keys, src_views))

    def ours_get():
        return all(ours.batch_get_into(src_keys, dst_views))

    if kind in ("redis", "redis_cluster"):
        def raw_put():
            pipe = raw.pipeline(transaction=False)
            for name, view in zip(raw_names, src_views):
                pipe.set(name, view)
            return all(pipe.execute())

        def raw_get():
            pipe = raw.pipeline(transaction=False)
            for name in raw_names:
                pipe.get(name)
            return all(len(value) == block_bytes for value in pipe.execute())

        def clear():
            if kind == "redis":
                raw.flushdb()
                return raw.dbsize() == 0
            raw.delete(*ours_names, *raw_names)  # the client splits it by slot
            return raw.exists(*ours_names, *raw_names) == 0
    elif kind == "s3":
        pool = ThreadPoolExecutor(S3_THREADS)
        bucket = server.bucket

        def put_one(idx):
            raw.put_object(Bucket=bucket, Key=raw_names[idx], Body=bytes(src_views[idx]))
            return True

        def get_one(idx):
            return len(raw.get_object(Bucket=bucket, Key=raw_names[idx])["Body"].read())

        def raw_put():
            return all(pool.map(put_one, range(num_blocks)))

        def raw_get():
            return all(size == block_bytes for size in pool.map(get_one, range(num_blocks)))

        def clear():
            names = [f"bench/{name}" for name in ours_names] + raw_names
            for start in range(0, len(names), 1000):
                raw.delete_objects(Bucket=bucket, Delete={
                    "Objects": [{"Key": name} for name in names[start:start + 1000]],
                    "Quiet": True})
            return raw.list_objects_v2(Bucket=bucket, Prefix="bench/").get("KeyCount") == 0 \
                and raw.list_objects_v2(Bucket=bucket, Prefix="kvtier/").get("KeyCount") == 0
    else:
        def raw_put():
            return all(rc == 0 for rc in raw.batch_put_from(raw_names, src_ptrs, sizes))

        def raw_get():
            return all(rc == block_bytes for rc in raw.batch_get_into(raw_names, dst_ptrs, sizes))

        def clear():
            raw.batch_remove(ours_names + raw_names, True)
            return not any(raw.batch_is_exist(ours_names + raw_names))

    times = {"ours_put": [], "raw_put": [], "ours_get": [], "raw_get": []}
    try:
        for rep in range(reps + 1):  # rep 0 warms both paths up and is not counted
            pairs = [("ours", ours_put, ours_get), ("raw", raw_put, raw_get)]
            if rep % 2:
                pairs.reverse()
            for who, put, get in pairs:
                seconds, ok = timed(put)
                if not ok:
                    raise RuntimeError(f"{kind} {who} put failed (rep {rep})")
                if rep:
                    times[f"{who}_put"].append(seconds)
                dst[:] = 0
                seconds, ok = timed(get)
                if not ok:
                    raise RuntimeError(f"{kind} {who} get failed (rep {rep})")
                if who == "ours" and not np.array_equal(dst, src):
                    raise RuntimeError(f"{kind}: bytes read back differ from bytes stored")
                if rep:
                    times[f"{who}_get"].append(seconds)
            if not clear():
                raise RuntimeError(f"{kind}: keys still held after removal")
    finally:
        ours.close()
        raw.close()
        if kind == "s3":
            pool.shutdown()
    gbps = {name: nbytes / statistics.median(values) / 1e9 for name, values in times.items()}
    return {"put": (gbps["ours_put"], gbps["raw_put"]), "get": (gbps["ours_get"],
                                                                gbps["raw_get"])}


BASELINES = {
    ("redis", "put"): "redis-py pipeline SET",
    ("redis", "get"): "redis-py pipeline GET",
    ("redis_cluster", "put"): "redis-py RedisCluster pipeline SET",
    ("redis_cluster", "get"): "redis-py RedisCluster pipeline GET",
    ("mooncake", "put"): "MooncakeDistributedStore.batch_put_from",
    ("mooncake", "get"): "MooncakeDistributedStore.batch_get_into",
    ("s3", "put"): f"boto3 put_object x{S3_THREADS} threads",
    ("s3", "get"): f"boto3 get_object x{S3_THREADS} threads",
}


def make_server(kind: str, store_mb: int):
    if kind == "redis":
        return RedisServer()
    if kind == "redis_cluster":
        return RedisClusterServers(masters=3)
    if kind == "mooncake":
        return MooncakeServer(segment_mb=store_mb)
    server = SeaweedS3Server()
    # kvtier finds the credentials through the standard AWS chain, as in production.
    os.environ.update(server.credentials_env())
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    return server


def missing_store(kind: str) -> str | None:
    if kind == "s3":
        return "; ".join(SeaweedS3Server.missing()) or None
    return missing_servers("redis" if kind == "redis_cluster" else kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 60 s)")
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--block-mib", type=float, default=1.0,
                        help="stored block size, header included")
    parser.add_argument("--reps", type=int, default=0, help="default 9, or 3 with --quick")
    parser.add_argument("--stores", default="redis,redis_cluster,mooncake,s3")
    parser.add_argument("--timeout-s", type=float, default=10.0)
    args = parser.parse_args()
    reps = args.reps or (3 if args.quick else 9)
    block_bytes = int(args.block_mib * (1 << 20))
    # Each repetition writes two batches (ours, raw), removed before the next one.
    store_mb = max(256, 3 * 2 * args.blocks * block_bytes // (1 << 20))

    kinds = args.stores.split(",")
    # A missing store is skipped (said on stderr), or with REQUIRE_TEST_SERVERS=1 (CI) the
    # benchmark exits non-zero, before measuring anything, naming what is missing.
    missing = {kind: missing_store(kind) for kind in kinds}
    if not require_or_note(list(missing.values()),
                           "remote.py: the runs against the missing store(s)"):
        kinds = [kind for kind in kinds if not missing[kind]]

    results = []
    print(f"{args.blocks} blocks x {block_bytes} B, {reps} repetitions, median GB/s")
    print(f"{'metric':<18} {'kvtier':>8} {'raw':>8} {'ratio':>6}  baseline")
    for kind in kinds:
        with make_server(kind, store_mb) as server:
            measured = bench_store(kind, server, args.blocks, block_bytes, reps, args.timeout_s)
        for op in ("put", "get"):
            ours, raw = measured[op]
            metric = f"{kind}_{op}"
            baseline = BASELINES[(kind, op)]
            print(f"{metric:<18} {ours:8.3f} {raw:8.3f} {ours / raw:6.2f}  {baseline}")
            results.append({"metric": metric, "value": round(ours, 4), "unit": "GB/s",
                            "baseline": baseline, "baseline_value": round(raw, 4),
                            "ratio": round(ours / raw, 3)})
    print(json.dumps({"bench": "remote", "results": results}))


if __name__ == "__main__":
    main()
