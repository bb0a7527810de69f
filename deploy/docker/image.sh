#!/usr/bin/env bash
# Build kvtier's container image on this machine from scratch, and run it for real.
#
#   deploy/docker/image.sh [--cold] [--reuse] build [check]
#     build   (make image) the image $IMAGE from deploy/docker/Dockerfile; without $BASE_IMAGE
#             the base is a bare Debian bookworm made with debootstrap (no image registry needed)
#     check   (make image-check) start vLLM's OpenAI server with kvtier inside the container on
#             its own loopback (--network none), complete one request, find kvtier's start-up
#             line in the container's log, stop it; the last line printed is one JSON object
#             (CHECK_KV_TRANSFER replaces its --kv-transfer-config: host and disk tiers, metrics)
#     --cold  no cached layers: rebuild the base and every layer
#     --reuse skip the build when $IMAGE was built from the same inputs (the label
#             org.kvtier.inputs: a hash of the Dockerfile, pyproject.toml, setup.py, README.md, src/,
#             the wheels)
#
# Installs docker.io and debootstrap (Debian) when missing. Starts dockerd when none answers
# (without iptables or a bridge: nothing here needs container networking) and stops it, by its
# PID, on exit. Settings: IMAGE, BASE_IMAGE, TORCH_INDEX_URL (torch's CPU wheels from that index
# instead of the host's pip), DOCKER (the client).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DOCKERFILE=$ROOT/deploy/docker/Dockerfile
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml")
IMAGE=${IMAGE:-kvtier-vllm-cpu:$VERSION}
DEBIAN_BASE=kvtier-base:bookworm
DOCKER=${DOCKER:-docker}
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
STATE=$(mktemp -d /tmp/kvtier-image.XXXXXX)
DOCKERD_PID=""
CONTAINER=""
COLD=0
REUSE=0

say() { echo "image.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

cleanup() {
  local rc=$?
  if [ -n "$CONTAINER" ]; then
    "$DOCKER" rm -f -v "$CONTAINER" >/dev/null 2>&1 || true
  fi
  if [ -n "$DOCKERD_PID" ]; then
    kill -TERM "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$DOCKERD_PID" 2>/dev/null || true
    say "dockerd (pid $DOCKERD_PID) stopped"
  fi
  rm -rf "$STATE"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

install_missing() {
  local packages=()
  command -v dockerd >/dev/null || packages+=(docker.io)
  command -v debootstrap >/dev/null || [ -n "${BASE_IMAGE:-}" ] || packages+=(debootstrap)
  command -v "$DOCKER" >/dev/null || packages+=(docker.io)
  [ ${#packages[@]} = 0 ] && return
  say "installing ${packages[*]} (Debian)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}"
}

ensure_dockerd() {
  "$DOCKER" info >/dev/null 2>&1 && return
  say "starting dockerd (log: $STATE/dockerd.log)"
  # No registry and no container networking here: no iptables rules, no bridge, no proxy.
  $SUDO dockerd --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
    --userland-proxy=false --pidfile "$STATE/dockerd.pid" >"$STATE/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 120); do
    "$DOCKER" info >/dev/null 2>&1 && return
    kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$STATE/dockerd.log" >&2; die "dockerd exited"; }
    sleep 0.5
  done
  tail -20 "$STATE/dockerd.log" >&2
  die "dockerd did not answer within 60 s"
}

# The base image: $BASE_IMAGE as given, else a bare bookworm from debootstrap, imported once.
ensure_base() {
  if [ -n "${BASE_IMAGE:-}" ]; then
    "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 || "$DOCKER" pull "$BASE_IMAGE"
    return
  fi
  BASE_IMAGE=$DEBIAN_BASE
  if [ "$COLD" = 0 ] && "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return; fi
  local started; started=$(now)
  say "debootstrap bookworm (minbase) for $BASE_IMAGE"
  $SUDO debootstrap --variant=minbase bookworm "$STATE/rootfs" >"$STATE/debootstrap.log" 2>&1 \
    || { tail -20 "$STATE/debootstrap.log" >&2; die "debootstrap failed"; }
  $SUDO tar -C "$STATE/rootfs" -c . | "$DOCKER" import - "$BASE_IMAGE" >/dev/null
  $SUDO rm -rf "$STATE/rootfs"
  say "base $BASE_IMAGE in $(since "$started") s"
}

# The host's pip, which knows where this machine keeps torch's CPU build (its config).
host_pip() {
  if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python -m pip"; return; fi
  python3 -m pip --version >/dev/null 2>&1 || die "no pip on this machine to fetch torch's wheel"
  echo "python3 -m pip"
}

# The build context, assembled outside the repository: nothing here is ever committed.
assemble_context() {
  local ctx=$STATE/context pip torch ca
  mkdir -p "$ctx/wheels"
  cp "$DOCKERFILE" "$ctx/Dockerfile"
  tar -C "$ROOT" --exclude=__pycache__ --exclude='*.egg-info' --exclude='*.so' \
    -cf - pyproject.toml setup.py README.md src \
    | tar -C "$ctx" -xf -
  pip=$(host_pip)
  ca=${PIP_CERT:-$($pip config get global.cert 2>/dev/null || true)}
  ca=${ca:-/etc/ssl/certs/ca-certificates.crt}
  [ -f "$ca" ] || die "no CA bundle for pip at $ca"
  cp "$ca" "$ctx/build-ca.crt"
  if [ -z "${TORCH_INDEX_URL:-}" ]; then
    torch=$(sed -n 's/^ARG TORCH=//p' "$DOCKERFILE")
    # The wheel the host's pip installs (find-links or local indexes from its config).
    $pip download -q --no-deps --only-binary=:all: -d "$ctx/wheels" "$torch"
    compgen -G "$ctx/wheels/torch-*+cpu-*.whl" >/dev/null || die "the host's pip finds no CPU \
build of $torch (got: $(ls "$ctx/wheels")); set TORCH_INDEX_URL to PyTorch's CPU wheel index"
  fi
}

inputs_hash() {
  (cd "$STATE/context" && find . -type f ! -name build-ca.crt -print0 | sort -z \
    | xargs -0 sha256sum) | sha256sum | cut -c1-16
}

build() {
  local started; started=$(now)
  assemble_context
  local inputs; inputs=$(inputs_hash)
  if [ "$REUSE" = 1 ] && [ "$COLD" = 0 ] && [ "$("$DOCKER" image inspect -f \
      '{{index .Config.Labels "org.kvtier.inputs"}}' "$IMAGE" 2>/dev/null)" = "$inputs" ]; then
    say "$IMAGE is built from these inputs ($inputs): reused"
    return
  fi
  ensure_base
  local args=(--network host --build-arg "BASE_IMAGE=$BASE_IMAGE" --label "org.kvtier.inputs=$inputs"
              -t "$IMAGE")
  [ "$COLD" = 1 ] && args+=(--no-cache)
  [ -n "${TORCH_INDEX_URL:-}" ] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
  local previous; previous=$("$DOCKER" image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
  say "docker build $IMAGE (inputs $inputs)"
  DOCKER_BUILDKIT=0 "$DOCKER" build "${args[@]}" "$STATE/context" >&2
  # The image this tag replaced; never a prune: the build stage's untagged layers are the cache.
  if [ -n "$previous" ] && [ "$previous" != "$("$DOCKER" image inspect -f '{{.Id}}' "$IMAGE")" ]; then
    "$DOCKER" rmi "$previous" >/dev/null 2>&1 || true
  fi
  say "built $IMAGE in $(since "$started") s ($("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" \
    | awk '{ printf "%.2f GB", $1 / 1e9 }'))"
}

# In the container: the tiny local model (kvtier.cli.tiny_model), then the server on loopback.
SERVE='python -c "from kvtier.cli.tiny_model import make_tiny_llama; make_tiny_llama(\"/models/tiny\")" &&
exec python -m vllm.entrypoints.openai.api_server --model /models/tiny --served-model-name tiny \
  --host 127.0.0.1 --port 8000 --dtype float32 --block-size 32 --max-model-len 2048 \
  --enable-prefix-caching --enforce-eager --seed 0 --disable-uvicorn-access-log \
  --kv-transfer-config "$KV_TRANSFER"'
DEFAULT_KV_TRANSFER='{"kv_connector":"KvtierConnector","kv_connector_module_path":"kvtier.connectors.vllm","kv_role":"kv_both","kv_connector_extra_config":{"host_cache_blocks":256,"disk_cache_blocks":512,"disk_dir":"/var/cache/kvtier","metrics_port":9400}}'
KV_TRANSFER=${CHECK_KV_TRANSFER:-$DEFAULT_KV_TRANSFER}
MAX_TOKENS=8

# Runs inside the container (python, no client library): one greedy completion.
REQUEST="import json, urllib.request
body = json.dumps({'model': 'tiny', 'prompt': ' '.join(f'w{5 + 7 * i % 1000}' for i in range(100)),
                   'max_tokens': $MAX_TOKENS, 'temperature': 0, 'ignore_eos': True}).encode()
req = urllib.request.Request('http://127.0.0.1:8000/v1/completions', body,
                             {'Content-Type': 'application/json'})
print(urllib.request.urlopen(req, timeout=120).read().decode())"
HEALTHY="import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"
METRICS="import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9400/metrics', timeout=5).read().decode())"

# The container's log tail, and its exceptions first (a start-up error is far above the tail).
show_log() {
  say "exceptions in the container's log:"
  "$DOCKER" logs "$CONTAINER" 2>&1 | grep -E '(Error|Exception)(: |$)' | sort -u | tail -20 >&2 || true
  say "the log's last lines:"
  "$DOCKER" logs --tail 40 "$CONTAINER" >&2 2>&1 || true
}

check() {
  "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1 || die "no image $IMAGE: run make image first"
  local started ready_s response tokens text metrics line stopped_s exit_code
  started=$(now)
  CONTAINER=$("$DOCKER" run -d --network none --shm-size 1g \
    -e HF_HUB_OFFLINE=1 -e VLLM_CPU_KVCACHE_SPACE=1 -e KV_TRANSFER="$KV_TRANSFER" \
    "$IMAGE" sh -c "$SERVE")
  say "container ${CONTAINER:0:12} started; waiting for the server"
  for _ in $(seq 300); do
    "$DOCKER" exec "$CONTAINER" python -c "$HEALTHY" >/dev/null 2>&1 && break
    [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$CONTAINER")" = true ] \
      || { show_log; die "the server exited before it was ready"; }
    sleep 2
  done
  "$DOCKER" exec "$CONTAINER" python -c "$HEALTHY" \
    || { show_log; die "the server was not ready within 600 s"; }
  ready_s=$(since "$started")
  response=$("$DOCKER" exec "$CONTAINER" python -c "$REQUEST")
  tokens=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["usage"]["completion_tokens"])' "$response")
  text=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["choices"][0]["text"])' "$response")
  [ "$tokens" = "$MAX_TOKENS" ] || die "completion has $tokens tokens, not $MAX_TOKENS: $response"
  [ -n "${text// /}" ] || die "empty completion: $response"
  # Read whole, then searched: grep -q closing the pipe early would fail the pipeline.
  metrics=$("$DOCKER" exec "$CONTAINER" python -c "$METRICS")
  grep -q '^kvtier_' <<<"$metrics" || die "no kvtier_ metrics on the container's port 9400"
  line=$("$DOCKER" logs "$CONTAINER" 2>&1 | grep -o 'kvtier: tiers .*' | head -1 || true)
  case $line in
    "kvtier: tiers G2 host "*", G3 disk "*" in /var/cache/kvtier;"*) ;;
    *) show_log; die "no kvtier start-up line with G2 and G3 in the log (got: '$line')" ;;
  esac
  local stop_started; stop_started=$(now)
  "$DOCKER" stop -t 30 "$CONTAINER" >/dev/null
  exit_code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$CONTAINER")
  stopped_s=$(since "$stop_started")
  "$DOCKER" rm -v "$CONTAINER" >/dev/null
  CONTAINER=""
  say "check passed in $(since "$started") s"
  python3 -c 'import json, sys
image, ready, stopped, total, tokens, text, line, code = sys.argv[1:]
print(json.dumps({"image": image, "ready_s": float(ready), "stop_s": float(stopped),
                  "check_s": float(total), "completion_tokens": int(tokens),
                  "completion_text": text, "startup_line": line, "exit_code": int(code)}))' \
    "$IMAGE" "$ready_s" "$stopped_s" "$(since "$started")" "$tokens" "$text" "$line" "$exit_code"
}

main() {
  local actions=() arg action
  for arg in "$@"; do
    case $arg in
      --cold) COLD=1 ;;
      --reuse) REUSE=1 ;;
      build|check) actions+=("$arg") ;;
      *) die "unknown argument '$arg' (usage: image.sh [--cold] [--reuse] build [check])" ;;
    esac
  done
  [ ${#actions[@]} -gt 0 ] || die "usage: image.sh [--cold] [--reuse] build [check]"
  install_missing
  ensure_dockerd
  for action in "${actions[@]}"; do "$action"; done
}

# One line, read whole before it runs: an edit of this file during a build changes nothing.
main "$@"; exit
