"""The Helm chart (deploy/helm/kvtier) and the Grafana dashboard, checked offline.

No cluster runs here, so the chart is checked as far as schemas go: ``helm lint --strict``,
``helm template`` of every profile, and every rendered document against the Kubernetes OpenAPI
schemas bundled with ``kubernetes-validate`` (strict: unknown fields fail) for two Kubernetes
versions. The Prometheus Operator kinds (ServiceMonitor, PodMonitor) are CRDs, for which
kubernetes-validate has no schema (it raises ``SchemaNotFoundError``): they are checked by hand
against the objects they select. The dashboard's PromQL may name only metrics that
``KvtierMetrics`` registers.

helm comes from the Makefile's set-up (``.tools/helm``); without it these tests skip, or fail
under ``REQUIRE_TEST_SERVERS=1``.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from kvtier.config import load_config
from kvtier.metrics import KvtierMetrics
from need import ROOT, need, need_module

CHART = ROOT / "deploy" / "helm" / "kvtier"
PROFILES = sorted((CHART / "profiles").glob("*.yaml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "kvtier.json"
HELM = ROOT / ".tools" / "helm"
KUBE_VERSIONS = ("1.29.0", "1.33.0")
CRD_GROUP = "monitoring.coreos.com/"


@pytest.fixture(scope="module")
def helm() -> Path:
    need(None if HELM.is_file() else f"helm not installed at {HELM} (the Makefile's set-up "
                                      "unpacks it there)")
    return HELM


@pytest.fixture(scope="module")
def kv():
    """kubernetes_validate, with its schema files parsed once: it re-reads and parses the
    multi-MB definitions file on every ``validate`` call (10x the validation itself). The
    schemas and the validation are unchanged."""
    module = need_module("kubernetes_validate")
    utils = importlib.import_module("kubernetes_validate.utils")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, "schema_contents", cache(utils.schema_contents))
        yield module


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60,
                          check=False)


def render(helm: Path, *args: str, chart: Path = CHART) -> list[dict]:
    out = run_helm(helm, "template", "t", str(chart), "--namespace", "llm", *args)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@cache
def _render_profile(helm: Path, profile: Path) -> tuple[dict, ...]:
    return tuple(render(helm, "-f", str(profile)))


def validate_all(kv, docs: list[dict] | tuple[dict, ...], version: str) -> list[dict]:
    """Validate every document strictly; returns the CRD documents (no schema), which must
    be exactly the monitoring.coreos.com ones."""
    crds = []
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError:
            assert doc["apiVersion"].startswith(CRD_GROUP), f"no schema for {doc['kind']}"
            crds.append(doc)
    return crds


def by_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def engine(docs) -> dict:
    (workload,) = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                   and d["metadata"]["labels"].get("app.kubernetes.io/component") == "engine"]
    return workload


def transfer_config(workload: dict) -> dict:
    args = workload["spec"]["template"]["spec"]["containers"][0]["args"]
    return json.loads(args[args.index("--kv-transfer-config") + 1])


# -- the chart ---------------------------------------------------------------------------------

def test_lint_strict(helm):
    out = run_helm(helm, "lint", "--strict", str(CHART))
    assert out.returncode == 0, out.stdout + out.stderr
    for profile in PROFILES:
        out = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(profile))
        assert out.returncode == 0, f"{profile.name}: {out.stdout}{out.stderr}"


def test_profiles_exist():
    names = {p.stem for p in PROFILES}
    assert {"single-node", "shared-redis-cluster", "shared-s3"} <= names


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_profile_renders_valid_manifests(helm, kv, profile, version):
    docs = _render_profile(helm, profile)
    crds = validate_all(kv, docs, version)
    values = yaml.safe_load(profile.read_text())
    wanted_crds = {kind for key, kind in (("serviceMonitor", "ServiceMonitor"),
                                          ("podMonitor", "PodMonitor"))
                   if values.get("metrics", {}).get(key, {}).get("enabled")}
    assert {d["kind"] for d in crds} == wanted_crds


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_profile_engine_settings(helm, profile):
    """The connector config is one kvtier accepts; memory follows the host tier; the disk tier
    sits on a real volume; the metrics port is served and selected."""
    docs = _render_profile(helm, profile)
    values = yaml.safe_load(profile.read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    settings = {**defaults["kvtier"], **values.get("kvtier", {})}
    workload = engine(docs)
    pod = workload["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]

    cfg = transfer_config(workload)
    assert cfg["kv_connector"] == "KvtierConnector"
    assert cfg["kv_connector_module_path"] == "kvtier.connectors.vllm"
    extra = cfg["kv_connector_extra_config"]
    config = load_config(extra, env={})  # kvtier's own checks: unknown keys, bad values
    assert config.host_cache_gb == settings["host_cache_gb"]

    # memory = base + host tier + shm, request == limit
    memory = defaults["memory"]["baseGi"] + settings["host_cache_gb"] + defaults["shm"]["sizeGi"]
    want = f"{-(-memory // 1):.0f}Gi"
    assert container["resources"]["requests"]["memory"] == want
    assert container["resources"]["limits"]["memory"] == want

    if config.has_disk:
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == config.disk_dir]
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in pod["volumes"]}
        if mount["name"] in claims:
            assert workload["kind"] == "StatefulSet"
        else:
            volume = volumes[mount["name"]]
            assert "hostPath" in volume or "emptyDir" in volume, volume
            assert volume.get("emptyDir", {}).get("medium") != "Memory"
            if "emptyDir" in volume:
                size = int(volume["emptyDir"]["sizeLimit"].removesuffix("Gi"))
                assert size >= config.disk_cache_gb
                assert "ephemeral-storage" in container["resources"]["limits"]
            else:
                assert mount["subPathExpr"] == "$(POD_NAME)"  # one engine per directory
    else:
        assert "disk_dir" not in extra

    port = {p["name"]: p["containerPort"] for p in container["ports"]}["kvtier-metrics"]
    assert port == config.metrics_port
    (service,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "t-kvtier"]
    assert "kvtier-metrics" in {p["name"] for p in service["spec"]["ports"]}
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    for monitor in by_kind(docs, "ServiceMonitor") + by_kind(docs, "PodMonitor"):
        # No schema for these CRDs: check what they point at by hand.
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        endpoints = monitor["spec"].get("endpoints") or monitor["spec"]["podMetricsEndpoints"]
        assert [e["port"] for e in endpoints] == ["kvtier-metrics"]
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["llm"]


def test_shared_tiers(helm):
    """Each shared tier brings its servers, and the engine's remote_url points at them."""
    cluster = _render_profile(helm, CHART / "profiles" / "shared-redis-cluster.yaml")
    url = transfer_config(engine(cluster))["kv_connector_extra_config"]["remote_url"]
    assert url == ("redis+cluster://" + ",".join(
        f"t-kvtier-redis-cluster-{i}.t-kvtier-redis-cluster:6379" for i in range(3)) + "/")
    (nodes,) = [d for d in by_kind(cluster, "StatefulSet")
                if d["metadata"]["name"] == "t-kvtier-redis-cluster"]
    assert nodes["spec"]["replicas"] == 6  # 3 masters, one replica each
    (create,) = by_kind(cluster, "Job")
    assert "--cluster-replicas 1" in create["spec"]["template"]["spec"]["containers"][0]["args"][0]

    s3 = _render_profile(helm, CHART / "profiles" / "shared-s3.yaml")
    url = transfer_config(engine(s3))["kv_connector_extra_config"]["remote_url"]
    assert url.startswith("s3://") and "endpoint=http://" in url
    env = {e["name"]: e for e in engine(s3)["spec"]["template"]["spec"]["containers"][0]["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "kvtier-s3"
        assert "value" not in env[name]
    assert "AWS_SECRET_ACCESS_KEY" not in url

    mooncake = _render_profile(helm, CHART / "profiles" / "shared-mooncake.yaml")
    url = transfer_config(engine(mooncake))["kv_connector_extra_config"]["remote_url"]
    assert url == ("mooncake://t-kvtier-mooncake:50051?"
                   "metadata=http://t-kvtier-mooncake:8080/metadata&protocol=tcp")
    commands = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["command"]
                for d in by_kind(mooncake, "Deployment")}
    assert commands["t-kvtier-mooncake"] == ["mooncake_master"]
    assert commands["t-kvtier-mooncake-storage"] == ["mooncake_client"]  # who lends memory


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "disk.type=tmpfs"], 'disk.type="tmpfs" is not allowed'),
    (["--set", "kvtier.host_cache_gb=-1"], "kvtier.host_cache_gb=-1 is not allowed"),
    (["--set", "kvtier.disk_cache_gb=-5"], "kvtier.disk_cache_gb=-5 is not allowed"),
    (["--set", "disk.type=pvc"], "disk.type=pvc needs workload=StatefulSet"),
    (["--set", "shared.type=s3"], "shared.s3.url is required"),
    (["--set", "shared.type=s3", "--set", "shared.s3.url=http://x"], "is not allowed: use s3://"),
    (["--set", "shared.type=etcd"], 'shared.type="etcd" is not allowed'),
    (["--set", "kvtier.host_cache_blocks=1000"], "set kvtier.host_cache_gb, or memory"),
    (["--set", "kvtier.metrics_port=0", "--set", "metrics.podMonitor.enabled=true"],
     "needs kvtier.metrics_port > 0"),
    (["--set", "shared.type=redisCluster", "--set", "shared.redisCluster.masters=2"],
     "at least 3 masters"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_values_fail_at_template_time(helm, args, message):
    out = run_helm(helm, "template", "t", str(CHART), *args)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def test_validation_catches_a_wrong_field_from_values(helm, kv):
    """A value that renders a field the schema does not have fails strict validation (and
    passes without strict: what strict adds)."""
    docs = render(helm, "--set-json", 'extraEnv=[{"name":"X","vaule":"typo"}]')
    workload = engine(docs)
    for version in KUBE_VERSIONS:
        with pytest.raises(kv.ValidationError, match="vaule"):
            kv.validate(workload, version, strict=True)
        kv.validate(workload, version, strict=False)


def test_validation_catches_a_broken_template(helm, kv, tmp_path):
    """A copy of the chart with a wrong field injected into the engine's template (a misspelt
    containerPort, a field at the wrong level) renders, but fails validation."""
    chart = tmp_path / "kvtier"
    shutil.copytree(CHART, chart)
    template = chart / "templates" / "engine.yaml"
    text = template.read_text()
    broken = text.replace("containerPort: {{ .Values.port | int }}",
                          "containerPortt: {{ .Values.port | int }}", 1)
    assert broken != text
    template.write_text(broken)
    docs = render(helm, chart=chart)
    for version in KUBE_VERSIONS:
        with pytest.raises(kv.ValidationError, match="containerPortt"):
            validate_all(kv, docs, version)

    # A field of the container moved up into the pod spec.
    broken = text.replace("      terminationGracePeriodSeconds: 60",
                          "      terminationGracePeriodSeconds: 60\n      imagePullPolicy: Always",
                          1)
    assert broken != text
    template.write_text(broken)
    docs = render(helm, chart=chart)
    with pytest.raises(kv.ValidationError, match="imagePullPolicy"):
        validate_all(kv, docs, KUBE_VERSIONS[-1])


def test_crds_have_no_schema(kv):
    """Why the monitors are checked by hand: kubernetes-validate knows no CRD schema."""
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
               "metadata": {"name": "x"}, "spec": {}}
    with pytest.raises(kv.SchemaNotFoundError):
        kv.validate(monitor, KUBE_VERSIONS[-1], strict=True)


# -- the dashboard -----------------------------------------------------------------------------

def metric_names() -> set[str]:
    """The sample names Prometheus sees from kvtier: counters get ``_total`` (and
    ``_created``), histograms ``_bucket``/``_sum``/``_count``."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created")}
    return {family.name + suffix for family in KvtierMetrics().registry.collect()
            for suffix in suffixes[family.type]}


_METRIC = re.compile(r"\bkvtier_[a-zA-Z0-9_]+")


def unknown_metrics(expr: str, known: set[str]) -> set[str]:
    return set(_METRIC.findall(expr)) - known


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def test_dashboard_names_only_kvtier_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    known = metric_names()
    exprs = dashboard_exprs(dashboard)
    assert exprs
    used = set()
    for expr in exprs:
        assert not unknown_metrics(expr, known), expr
        used |= set(_METRIC.findall(expr))
    # what the dashboard is for: hit ratio per tier, bytes per direction, latency, dropped
    # offloads, checksum failures, remote health
    assert {"kvtier_matched_blocks_total", "kvtier_queried_blocks_total",
            "kvtier_transfer_bytes_total", "kvtier_transfer_seconds_bucket",
            "kvtier_dropped_offloads_total", "kvtier_checksum_failures_total",
            "kvtier_remote_healthy", "kvtier_remote_events_total"} <= used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_metric_check_rejects_wrong_names():
    known = metric_names()
    assert "kvtier_transfer_seconds_bucket" in known and "kvtier_remote_healthy" in known
    assert unknown_metrics("rate(kvtier_transfer_bytes[5m])", known) == {"kvtier_transfer_bytes"}
    assert unknown_metrics("kvtier_remote_healthy_total", known) == {"kvtier_remote_healthy_total"}


def test_dashboard_in_chart_is_the_same(helm):
    assert (CHART / "dashboards" / "kvtier.json").read_bytes() == DASHBOARD.read_bytes()
    (config_map,) = [d for d in render(helm) if d["kind"] == "ConfigMap"
                     and d["metadata"]["name"] == "t-kvtier-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["kvtier.json"]) == json.loads(DASHBOARD.read_text())


# -- the image ---------------------------------------------------------------------------------

def test_dockerfile_follows_the_makefile():
    """The image installs what `make` installs, in the same order: torch's CPU build, then
    vLLM's CPU build, then kvtier (built for real by ``make image``; tested with
    RUN_IMAGE_TEST=1 in tests/integration/test_container_image.py)."""
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    for name in ("TORCH", "VLLM"):
        (pin,) = re.findall(rf"^{name} := (\S+)$", makefile, re.MULTILINE)
        assert f"ARG {name}={pin}\n" in dockerfile
    steps = [dockerfile.index(s) for s in ('"${TORCH}"', '"${VLLM}"', 'install -q ".[')]
    assert steps == sorted(steps)
