"""Offline checks of everything in cluster/: `ray up` YAMLs through Ray's own autoscaler validation, the
Serve and KubeRay configs through Serve's schema, the Prometheus config, and the Grafana dashboard against
the metric names `Metrics` actually renders. Optionally runs Debian's prometheus against a live endpoint."""

from __future__ import annotations

import copy
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from expertray.metrics import DEFAULT_METRICS_PORT, Metrics

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
INGRESS = "ExpertRayIngress"
IMPORT_PATH = "expertray.serve:app"


def load_yaml(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_up_configs() -> list[str]:
    """Every YAML in cluster/ that `ray up` takes: the ones with a top-level `provider`."""
    return sorted(p.name for p in CLUSTER.glob("*.yaml")
                  if isinstance(data := yaml.safe_load(p.read_text()), dict) and "provider" in data)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any outgoing connection or DNS lookup, to prove a check runs offline."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# -- ray up ------------------------------------------------------------------------------------------


def test_ray_up_configs_are_discovered() -> None:
    assert ray_up_configs() == ["gpu-aws.yaml", "local.yaml"]


@pytest.mark.parametrize("name", ray_up_configs())
def test_ray_up_config_passes_ray_validation(name: str, no_network: None) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    # prepare_config merges the provider's defaults.yaml from the Ray package (for aws: a file read, no boto3,
    # no AWS call; those happen later, in `ray up`'s bootstrap), fills per-node-type min/max workers and
    # merges setup commands; validate_config then checks the result against Ray's ray-schema.json.
    # no_network turns any hidden network call into a failure.
    prepared = prepare_config(copy.deepcopy(load_yaml(name)))
    validate_config(prepared)
    for node_type in prepared["available_node_types"].values():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= prepared["max_workers"]


def test_local_cluster_runs_on_loopback_and_installs_the_checkout() -> None:
    config = load_yaml("local.yaml")
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert any("pip install torch==2.13.0 && pip install -e ." in c for c in config["setup_commands"])
    assert "." in config["file_mounts"].values()


def test_gpu_cluster_has_a_cpu_head_and_gpu_workers() -> None:
    config = load_yaml("gpu-aws.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 and "InstanceType" in t["node_config"] for t in workers)
    assert any(".[gpu]" in c for c in config["setup_commands"])


# -- Serve and KubeRay -------------------------------------------------------------------------------


def serve_schema(config: dict[str, Any]) -> Any:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH and app.route_prefix == "/"
    (ingress,) = [d for d in app.deployments if d.name == INGRESS]
    autoscaling = AutoscalingConfig.model_validate(ingress.autoscaling_config)
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 4)
    assert autoscaling.target_ongoing_requests is not None
    return schema


def test_serve_config_validates_and_listens_on_loopback() -> None:
    schema = serve_schema(load_yaml("serve.yaml"))
    assert (schema.http_options.host, schema.http_options.port) == ("127.0.0.1", 8000)


def test_model_serve_config_validates_and_builds_its_app() -> None:
    """cluster/serve-model.yaml: a valid Serve config whose args the app builder accepts (engine fields too)."""
    from expertray.serve.layers import APP_ARGS, ENGINE_ARGS

    doc = load_yaml("serve-model.yaml")
    schema = serve_schema(doc)
    assert set(schema.applications[0].args) <= set(APP_ARGS) | set(ENGINE_ARGS)
    assert {d["name"] for d in doc["applications"][0]["deployments"]} == {"ExpertRayIngress", "ExpertRayEngine"}
    assert (schema.http_options.host, schema.http_options.port) == ("127.0.0.1", 8000)


def test_rayservice_manifest_structure() -> None:
    manifest = load_yaml("kuberay-rayservice.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string, not a mapping"
    in_cluster = serve_schema(yaml.safe_load(spec["serveConfigV2"]))
    # One application definition: the manifest serves exactly what serve.yaml deploys.
    assert in_cluster.applications == serve_schema(load_yaml("serve.yaml")).applications

    cluster = spec["rayClusterConfig"]
    version = cluster["rayVersion"]
    head_containers = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert head_containers and all(c["name"] and c["image"] for c in head_containers)
    gpu_groups = []
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        containers = group["template"]["spec"]["containers"]
        gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in containers)
        gpu_groups += [group["groupName"]] if gpus >= 1 else []
        head_containers += containers
    assert gpu_groups
    # KubeRay requires rayVersion to match the Ray inside the images.
    assert all(c["image"].startswith(f"rayproject/ray:{version}") for c in head_containers)


# -- Prometheus and Grafana ----------------------------------------------------------------------------


def full_metrics() -> Metrics:
    """A Metrics with every metric observed at least once, so each one has samples to render."""
    m = Metrics()
    m.observe_batch(0, [3, 1], [1, 0], 0.7, 0.001, 0.001)
    m.observe_actor("actor-0", 0.002)
    m.set_queue_depth("router-0", 5)
    m.set_replicas(0, [2, 1])
    m.count_action("replicate")
    m.observe_request(0, 0.01, "ok")
    return m


def test_prometheus_config_scrapes_the_default_metrics_port_on_loopback() -> None:
    config = load_yaml("prometheus.yml")
    assert config["global"]["scrape_interval"] == "5s"
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "expertray"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"127.0.0.1:{DEFAULT_METRICS_PORT}"]


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed")
def test_promtool_accepts_the_prometheus_config() -> None:
    subprocess.run(["promtool", "check", "config", "--syntax-only", str(CLUSTER / "prometheus.yml")],
                   check=True, capture_output=True, timeout=30)


def dashboard_exprs(engine: bool = False) -> list[str]:
    """The dashboard's queries: of the cluster's own metrics, or (engine) of the engine replicas' Ray metrics."""
    dashboard = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return [e for e in exprs if ("ray_expertray_engine_" in e) == engine]


def test_engine_panels_name_the_engine_replicas_metrics_and_show_them_all() -> None:
    """Engine replicas export through Ray's metrics (prefix ray_; counters _total, histograms _bucket)."""
    from expertray.serve.engines import ENGINE_METRICS

    used: set[str] = set()
    for expr in dashboard_exprs(engine=True):
        for name in re.findall(r"\bray_(expertray_engine_\w+)", expr):
            base = re.sub(r"_(total|bucket)$", "", name)
            kind = ENGINE_METRICS.get(base)
            assert kind is not None, f"{expr} names {name}, which no engine replica exports"
            assert name == base + {"counter": "_total", "histogram": "_bucket", "gauge": ""}[kind], expr
            if kind != "gauge":
                assert re.search(r"\b(rate|increase)\(", expr), expr
            used.add(base)
    assert used == set(ENGINE_METRICS), f"engine metrics without a panel: {set(ENGINE_METRICS) - used}"


def test_dashboard_structure_and_datasource_variable() -> None:
    dashboard = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]


def test_dashboard_queries_name_only_rendered_metrics_and_show_them_all() -> None:
    metrics = full_metrics()
    sample_names = {s.name for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    defined = {f.name for f in metrics.registry.collect()}  # e.g. expertray_tokens_routed, without _total
    used: set[str] = set()
    for expr in dashboard_exprs():
        names = set(re.findall(r"\bexpertray_\w+", expr))
        assert names, f"query names no expertray metric: {expr}"
        assert names <= sample_names, f"{expr} names {names - sample_names}, not rendered by Metrics"
        # Counters only make sense as rates and histograms only through their buckets' quantiles.
        if any(n.endswith("_total") for n in names):
            assert re.search(r"\b(rate|increase)\(", expr), expr
        if any(n.endswith("_bucket") for n in names):
            assert "histogram_quantile(" in expr, expr
        used |= names
    unshown = {name for name in defined if not any(n.startswith(name) for n in used)}
    assert not unshown, f"metrics without a dashboard panel: {unshown}"


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed")
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # Grafana fills in its variables before querying; substitute plausible values, then let promtool parse.
    rules = [{"record": f"expertray:check:{i}",
              "expr": expr.replace("$__rate_interval", "1m").replace("$layer", ".*")}
             for i, expr in enumerate(dashboard_exprs())]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    subprocess.run(["promtool", "check", "rules", str(path)], check=True, capture_output=True, timeout=30)


def free_loopback_port() -> int:
    # prometheus is another process: bind, read the port, release it for prometheus to take.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query_prometheus(port: int, query: str) -> list[Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with opener.open(url, timeout=2) as resp:
        return json.load(resp)["data"]["result"]


@pytest.mark.skipif(not shutil.which("prometheus"), reason="prometheus not installed")
def test_prometheus_scrapes_a_live_metrics_endpoint(tmp_path: Path) -> None:
    metrics = full_metrics()
    metrics_port = metrics.serve(0)
    config = {"global": {"scrape_interval": "1s"},
              "scrape_configs": [{"job_name": "expertray",
                                  "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    web_port = free_loopback_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        result: list[Any] = []
        deadline = time.monotonic() + 30
        while not result and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "prometheus exited"
            try:
                result = query_prometheus(web_port, "expertray_tokens_routed_total")
            except OSError:
                pass  # not listening yet
            if not result:
                time.sleep(0.5)
        assert result, "prometheus scraped no expertray_tokens_routed_total within 30 s"
        by_expert = {r["metric"]["expert"]: float(r["value"][1]) for r in result}
        assert by_expert == {"0": 3.0, "1": 1.0}
        assert all(r["metric"]["job"] == "expertray" for r in result)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        metrics.stop()


# -- multi-node placement: expert actors and routers on GPU workers, controller and ingress on the head ------


def test_ray_up_workers_offer_one_expert_slot_per_gpu_and_the_head_none() -> None:
    from expertray.config import ClusterConfig, from_dict

    config = load_yaml("gpu-aws.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["resources"]
    assert head.get("CPU", 0) > 0 and head.get("GPU", 0) == 0 and head.get("expert_slot", 0) == 0
    workers = [t["resources"] for name, t in types.items() if name != config["head_node_type"]]
    assert all(w["expert_slot"] == w["GPU"] >= 1 for w in workers)
    cfg = from_dict(ClusterConfig, load_yaml("expertray-gpu.yaml"), "cluster")
    assert cfg.actor_resources == {"expert_slot": 1} and cfg.router_num_gpus > 0  # routers beside actors
    assert any("-v /mnt/models:/mnt/models" in o for o in config["docker"]["run_options"])


def _mounts(pod_spec: dict[str, Any]) -> dict[str, str]:
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod_spec.get("volumes", [])
              if "persistentVolumeClaim" in v}
    return {m["mountPath"]: claims[m["name"]] for c in pod_spec["containers"] for m in c.get("volumeMounts", [])
            if m["name"] in claims}


def test_kuberay_head_runs_cpu_work_and_gpu_workers_offer_expert_slots_and_share_the_models() -> None:
    cluster = load_yaml("kuberay-rayservice.yaml")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert float(head["rayStartParams"]["num-cpus"]) > 0 and "resources" not in head["rayStartParams"]
    head_mounts = _mounts(head["template"]["spec"])
    assert head_mounts == {"/mnt/models": "expertray-models"}
    for group in cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in spec["containers"])
        slots = json.loads(yaml.safe_load(group["rayStartParams"]["resources"]))  # a quoted JSON string
        assert slots == {"expert_slot": gpus}, group["groupName"]
        assert _mounts(spec) == head_mounts, group["groupName"]  # every node reads the same checkpoint path
