"""vLLM's real OpenAI server with kvtier, driven by the real ``openai`` client.

Two servers (``python -m vllm.entrypoints.openai.api_server``), the same settings, float32,
greedy: one with kvtier's host tier (G2) and a device KV cache far smaller than the users'
working set, one without kvtier. Eight concurrent users hold multi-turn conversations
(streaming completions with logprobs); each turn's prompt extends the user's previous
conversation, so later turns need prefixes that other users' requests evicted from the device
and that come back from kvtier.

Checked: identical greedy tokens and logprobs within tolerance (``kvtier.cli.oracle``); kvtier
hits in vLLM's own metrics (``vllm:external_prefix_cache_hits``) and in kvtier's
(``kvtier_matched_blocks``); kvtier's start-up line in the server's log; and the KV events of
the real engine (kvtier's ``events_endpoint`` and vLLM's ``--kv-events-config``), from which a
subscriber rebuilds the prefix tree and checks it against the prompts' tokens. A negative
control shows the oracle comparison can fail.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
import time
import urllib.request
from collections import defaultdict

import pytest
from servers import LOOPBACK, VllmOpenAIServer, free_port

from kvtier.cli.demo import conversation_prompts
from kvtier.cli.oracle import LOGPROB_TOLERANCE, compare
from kvtier.cli.vllm_job import scrape_metrics
from need import need, need_module

pytestmark = pytest.mark.slow

BLOCK_SIZE = 32
NUM_USERS = 8
NUM_TURNS = 3
MAX_TOKENS = 12
# Device KV cache of 64 blocks (2048 tokens) against a working set of ~230 blocks (a shared
# 200-word system prompt, then ~30 blocks of history per user by the last turn).
DEVICE_BLOCKS = 64
MAX_MODEL_LEN = (DEVICE_BLOCKS - 1) * BLOCK_SIZE  # vLLM keeps one block back (its null block)


def server_args() -> list[str]:
    """What both servers share: float32, the same block size, device cache and batch limits."""
    return ["--dtype", "float32", "--block-size", str(BLOCK_SIZE),
            "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-batched-tokens", str(MAX_MODEL_LEN),
            "--num-gpu-blocks-override", str(DEVICE_BLOCKS),
            "--enable-prefix-caching", "--enforce-eager", "--seed", "0",
            "--disable-uvicorn-access-log"]


# -- KV events: SUB sockets bound on loopback (publishers with a non-wildcard tcp endpoint
# connect, in vLLM's rule and kvtier's), collected while the users run -----------------------

class EventCollector:
    """One thread draining SUB sockets, one per source, into lists of decoded events."""

    def __init__(self, sources: list[str]) -> None:
        import msgspec
        import zmq

        self._zmq = zmq
        self._decode = msgspec.msgpack.Decoder().decode
        self._context = zmq.Context()
        self.endpoints: dict[str, str] = {}
        self.events: dict[str, list[dict]] = {name: [] for name in sources}
        self.num_batches: dict[str, int] = dict.fromkeys(sources, 0)
        self._sockets = {}
        for name in sources:
            sock = self._context.socket(zmq.SUB)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.setsockopt(zmq.LINGER, 0)
            port = sock.bind_to_random_port(f"tcp://{LOOPBACK}")
            self.endpoints[name] = f"tcp://{LOOPBACK}:{port}"
            self._sockets[sock] = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = self._zmq.Poller()
        for sock in self._sockets:
            poller.register(sock, self._zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(100):
                name = self._sockets[sock]
                _topic, _seq, payload = sock.recv_multipart()
                _ts, events, *_ = self._decode(payload)  # vLLM's KVEventBatch, array-like
                self.num_batches[name] += 1
                self.events[name].extend(events)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self._sockets:
            sock.close(linger=0)
        self._context.term()


# -- the servers, side by side -------------------------------------------------------------

@pytest.fixture(scope="module")
def collector():
    need_module("zmq")
    need_module("msgspec")
    events = EventCollector(["kvtier", "vllm"])
    yield events
    events.close()


@pytest.fixture(scope="module")
def servers(tiny_model, collector, tmp_path_factory):
    # vLLM runs in the servers only: look for it without importing it here (~30 s).
    need(None if importlib.util.find_spec("vllm") else "Python package 'vllm' not installed")
    need_module("openai")
    metrics_port = free_port()
    extra = {"host_cache_blocks": 1024, "onboard_mode": "always",
             "metrics_port": metrics_port, "events_endpoint": collector.endpoints["kvtier"]}
    kv_transfer = {"kv_connector": "KvtierConnector",
                   "kv_connector_module_path": "kvtier.connectors.vllm",
                   "kv_role": "kv_both", "kv_connector_extra_config": extra}
    kv_events = {"enable_kv_cache_events": True, "publisher": "zmq",
                 "endpoint": collector.endpoints["vllm"], "topic": "vllm"}
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    kvtier = VllmOpenAIServer(tmp_path_factory.mktemp("kvtier-server"), model=tiny_model,
                              name="kvtier-server", env=env,
                              args=[*server_args(), "--kv-transfer-config",
                                    json.dumps(kv_transfer),
                                    "--kv-events-config", json.dumps(kv_events)])
    kvtier.metrics_port = metrics_port
    baseline = VllmOpenAIServer(tmp_path_factory.mktemp("baseline-server"), model=tiny_model,
                                name="baseline-server", env=env, args=server_args())
    started = time.monotonic()
    try:
        kvtier.launch()
        baseline.launch()
        kvtier.wait_ready()
        baseline.wait_ready()
        print(f"servers ready in {time.monotonic() - started:.0f} s")
        yield {"kvtier": kvtier, "baseline": baseline}
    finally:
        kvtier.stop()
        baseline.stop()


# -- the users -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompts():
    """prompts[turn][user]; the last turn ~900 tokens, ~230 blocks in all."""
    return conversation_prompts(num_users=NUM_USERS, num_turns=NUM_TURNS, system_words=200,
                                turn_words=[300, 200, 200], seed=12)


async def _complete(client, model: str, prompt: str) -> dict:
    """One streaming completion: its token ids, each token's logprob and lead over the
    runner-up (what ``kvtier.cli.oracle`` compares)."""
    tokens, logprobs, margins = [], [], []
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=2,
        stream=True, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    async for chunk in stream:
        for choice in chunk.choices:
            lp = choice.logprobs
            if lp is None or not lp.tokens:
                continue
            for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
                tokens.append(int(token.removeprefix("token_id:")))
                logprobs.append(float(logprob))
                ranked = sorted(top.values(), reverse=True)
                margins.append(ranked[0] - ranked[1] if len(ranked) > 1 else float("inf"))
    return {"tokens": tokens, "logprobs": logprobs, "margins": margins}


async def _drive(server: VllmOpenAIServer, prompts: list[list[str]]) -> list[list[dict]]:
    """All users at once, each user's turns one after the other; results[user][turn]."""
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused",
                                timeout=300, max_retries=0)

    async def user(u: int) -> list[dict]:
        return [await _complete(client, server.model_name, prompts[turn][u])
                for turn in range(len(prompts))]

    try:
        return await asyncio.gather(*(user(u) for u in range(len(prompts[0]))))
    finally:
        await client.close()


def as_phase(results: list[list[dict]]) -> dict:
    """The users' completions as one ``vllm_job``-style phase, in (user, turn) order."""
    rows = [r for per_user in results for r in per_user]
    return {"outputs": [r["tokens"] for r in rows], "logprobs": [r["logprobs"] for r in rows],
            "margins": [r["margins"] for r in rows]}


def prometheus(text: str, name: str, **labels: str) -> float:
    """The sum of counter ``name``'s samples (``NAME_total``) whose labels include ``labels``;
    0 when it has none."""
    total = 0.0
    want = {f'{key}="{value}"' for key, value in labels.items()}
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        base, _, label_text = sample.partition("{")
        if base == f"{name}_total" and want <= set(label_text.rstrip("}").split(",")):
            total += float(value)
    return total


def tokenize(server: VllmOpenAIServer, prompt: str) -> list[int]:
    body = json.dumps({"model": server.model_name, "prompt": prompt}).encode()
    request = urllib.request.Request(server.url + "/tokenize", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())["tokens"]


@pytest.fixture(scope="module")
def run(servers, prompts, collector):
    """Both servers driven at once by their own eight users; then metrics, events, tokens."""
    started = time.monotonic()

    async def both():
        return await asyncio.gather(_drive(servers["kvtier"], prompts),
                                    _drive(servers["baseline"], prompts))

    kvtier_results, baseline_results = asyncio.run(both())
    wall_s = time.monotonic() - started
    time.sleep(2.0)  # the last steps' events and metrics
    kvtier = servers["kvtier"]
    out = {"kvtier": as_phase(kvtier_results), "baseline": as_phase(baseline_results),
           "wall_s": wall_s,
           "vllm_metrics": {name: s.get("/metrics") for name, s in servers.items()},
           "kvtier_metrics": scrape_metrics(kvtier.metrics_port),
           # Each request's tokens: its prompt (as the server tokenizes it), then its output.
           "sequences": [tokenize(kvtier, prompts[turn][u]) + kvtier_results[u][turn]["tokens"]
                         for u in range(NUM_USERS) for turn in range(NUM_TURNS)]}
    print(f"users done in {wall_s:.0f} s; kvtier metrics: "
          f"{ {k: v for k, v in out['kvtier_metrics'].items() if 'matched' in k} }")
    return out


# -- the checks ----------------------------------------------------------------------------

def test_outputs_identical_to_vllm_alone(run):
    phase = run["kvtier"]
    assert len(phase["outputs"]) == NUM_USERS * NUM_TURNS
    assert all(len(o) == MAX_TOKENS for o in phase["outputs"]), phase["outputs"]
    verdict = compare(run["baseline"], phase)
    assert verdict.ok, verdict


def test_oracle_sees_a_shifted_logprob(run):
    """Negative control: the same comparison against a baseline with one logprob moved by
    10x the tolerance must fail, and name that output and token."""
    changed = {key: [list(row) for row in rows] for key, rows in run["baseline"].items()}
    i, j = NUM_USERS * NUM_TURNS - 1, MAX_TOKENS // 2  # last user, last turn
    changed["logprobs"][i][j] -= 10 * LOGPROB_TOLERANCE
    verdict = compare(changed, run["kvtier"])
    assert not verdict.ok
    assert verdict.problems == [verdict.problems[0]]
    assert verdict.problems[0].startswith(f"output {i}: token {j} logprob"), verdict
    assert verdict.max_logprob_diff > 9 * LOGPROB_TOLERANCE


def test_kvtier_hits_in_vllm_and_kvtier_metrics(run):
    hits = "vllm:external_prefix_cache_hits"  # tokens, counted at admission
    vllm_hits = prometheus(run["vllm_metrics"]["kvtier"], hits)
    assert vllm_hits > 0, "vLLM counted no external prefix-cache hits"
    # The baseline has no connector: it must have none.
    assert prometheus(run["vllm_metrics"]["baseline"], hits) == 0
    # kvtier told vLLM where they came from: its host tier.
    by_source = prometheus(run["vllm_metrics"]["kvtier"],
                           "vllm:prompt_tokens_cached_by_source", source="host")
    assert by_source == vllm_hits
    metrics = run["kvtier_metrics"]
    assert metrics.get('kvtier_matched_blocks_total{tier="G2"}', 0) > 0, metrics
    assert metrics.get("kvtier_load_errors_total", 0) == 0, metrics
    # vLLM's external hits are the tokens kvtier onboarded, except that vLLM leaves out the
    # hits of requests re-admitted after a preemption (PrefixCacheStats.preempted_hits).
    kvtier_tokens = metrics.get('kvtier_matched_tokens_total{tier="G2"}', 0)
    preemptions = prometheus(run["vllm_metrics"]["kvtier"], "vllm:num_preemptions")
    print(f"{hits}_total {vllm_hits:.0f} (source=host {by_source:.0f}); kvtier G2 tokens "
          f"{kvtier_tokens:.0f}; preemptions {preemptions:.0f}")
    if preemptions == 0:
        assert vllm_hits == kvtier_tokens, metrics
    else:
        assert 0 < vllm_hits <= kvtier_tokens, metrics


def test_kvtier_startup_line_in_the_server_log(servers, run):
    log = servers["kvtier"].log_path.read_text(errors="replace")
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "kvtier: tiers " in line]
    assert len(lines) == 1, lines
    summary = lines[0][lines[0].index("kvtier: tiers "):]
    assert summary.startswith("kvtier: tiers G2 host 0.13 GB (1024 blocks) eviction=dueling"), \
        summary   # the default policy, named where a user reads the tiers
    assert "onboard_mode=always" in summary
    assert "(EngineCore" in lines[0], lines[0]  # in vLLM's format, from the engine process
    assert "kvtier: tiers" not in servers["baseline"].log_path.read_text(errors="replace")


def _stored(events: list[dict], medium: str | None = None) -> list[dict]:
    return [e for e in events if e.get("type") == "BlockStored"
            and (medium is None or e.get("medium") == medium)]


def check_lineage(events: list[dict], medium: str) -> dict:
    """Replay ``BlockStored`` events in order: each chain's parent must be None or a block
    stored before (in any medium of this stream), each block ``BLOCK_SIZE`` tokens. Returns
    the tree of ``medium``'s blocks: {hash: (parent, tokens)}."""
    seen: set = set()
    tree: dict = {}
    for event in _stored(events):
        hashes, parent, tokens = event["block_hashes"], event["parent_block_hash"], \
            event["token_ids"]
        if event["medium"] == medium:
            assert event["block_size"] == BLOCK_SIZE, event
            assert parent is None or parent in seen, f"parent never stored: {event}"
            assert len(tokens) == BLOCK_SIZE * len(hashes), event
            for k, key in enumerate(hashes):
                tree.setdefault(key, (parent if k == 0 else hashes[k - 1],
                                      tokens[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE]))
        seen.update(hashes)
    return tree


def paths(tree: dict) -> tuple[list[list[int]], int]:
    """Every root-to-leaf path's tokens, and the tree's depth in blocks."""
    children = defaultdict(list)
    for key, (parent, _) in tree.items():
        children[parent].append(key)

    def walk(key) -> list[int]:
        tokens, depth = [], 0
        while key is not None:
            parent, block = tree[key]
            tokens[:0] = block
            depth += 1
            key = parent if parent in tree else None
        return tokens, depth

    leaves = [key for key in tree if not children.get(key)]
    walked = [walk(leaf) for leaf in leaves]
    return [t for t, _ in walked], max((d for _, d in walked), default=0)


def test_kv_events_rebuild_the_prefix_tree(run, collector):
    """kvtier's own stream: every block offloaded to the host tier (medium CPU) extends a
    block stored before, and each root-to-leaf path of the tree they imply spells a prefix of
    a request's tokens (its prompt, then its output)."""
    events = collector.events["kvtier"]
    stored = _stored(events, "CPU")
    assert stored, f"no BlockStored(CPU) among {len(events)} kvtier events"
    tree = check_lineage(events, "CPU")
    leaf_paths, depth = paths(tree)
    print(f"kvtier events: {len(events)} ({len(stored)} BlockStored CPU, "
          f"{collector.num_batches['kvtier']} batches); tree: {len(tree)} blocks, "
          f"{len(leaf_paths)} leaves, {depth} levels")
    assert depth > 1
    # Roots must be first blocks of a request: a root path starts where a prompt starts.
    sequences = run["sequences"]
    for tokens in leaf_paths:
        assert any(seq[:len(tokens)] == tokens for seq in sequences), \
            f"a path of {len(tokens)} tokens is no request's prefix: {tokens[:8]}..."
    # The shared system prompt is one trunk: every user's first turn hangs below it.
    assert len({key for key, (parent, _) in tree.items() if parent is None}) == 1


def test_vllm_kv_events_carry_kvtier_and_device_blocks(run, collector):
    """vLLM's ``--kv-events-config`` stream: the device's blocks (medium GPU, vLLM's hashes)
    have consistent lineage too, and kvtier's host-tier blocks reach it through the
    connector's ``take_events`` with the same hashes as on kvtier's own stream."""
    events = collector.events["vllm"]
    gpu = _stored(events, "GPU")
    assert gpu, f"no BlockStored(GPU) among {len(events)} vLLM events"
    gpu_tree = check_lineage(events, "GPU")
    assert paths(gpu_tree)[1] > 1
    cpu_here = {key for e in _stored(events, "CPU") for key in e["block_hashes"]}
    cpu_kvtier = {key for e in _stored(collector.events["kvtier"], "CPU")
                  for key in e["block_hashes"]}
    print(f"vLLM events: {len(events)} ({len(gpu)} BlockStored GPU, "
          f"{len(cpu_here)} CPU blocks)")
    assert cpu_here == cpu_kvtier
