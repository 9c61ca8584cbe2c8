"""The deployment material in infra/, checked against the code it deploys and against real tools.

KubeRay manifests and the cluster launcher config carry what their schemas need and agree with the
CLI, the Serve settings, the pinned versions and each other; the Grafana dashboard asks only for
series the code exports; Prometheus (Debian's binaries, from `make tools`) accepts the shipped
config and, run on 127.0.0.1 with it, scrapes the `ray_catversion_*` series of a real batch run; nginx
(Debian's, from `make tools`), configured from the Ingress's annotations as ingress-nginx does, refuses
bodies over the server's limit before the backend sees them and passes stream events on unbuffered.
"""

import copy
import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import ray
import requests
import yaml

from catversion import telemetry
from catversion.cli import build_parser
from conftest import free_port
from helpers import stop
from polling import wait_until
from serve.config import ServeSettings

ROOT = Path(__file__).parents[1]
INFRA = ROOT / "infra"
RAYJOB = INFRA / "kuberay" / "rayjob-batch.yaml"
RAYSERVICE = INFRA / "kuberay" / "rayservice.yaml"
SECRETS = INFRA / "kuberay" / "secret-example.yaml"
CLUSTER = INFRA / "cluster-aws.yaml"
PROMETHEUS_CONFIG = INFRA / "prometheus" / "prometheus.yml"
DASHBOARD = INFRA / "grafana" / "catversion-dashboard.json"
METRICS_PORT = 8080  # Ray's metrics endpoint on every pod / node (KubeRay's default too)

# A metric name inside a PromQL expression: not part of a longer identifier or a label value.
METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:\"])ray_[A-Za-z0-9_:]+")


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def only_document(path: Path) -> dict:
    docs = documents(path)
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


def pinned(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"constraints.txt pins no {package}")


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")  # nginx is in /usr/sbin
    if path is None:
        pytest.fail(f"`{name}` is not installed: run `make tools` (as root; installs Debian's prometheus and "
                    "nginx-light packages)")
    return path


# ---- KubeRay -------------------------------------------------------------------------------------


def pod_templates(cluster_spec: dict) -> list[tuple[str, dict]]:
    head = [("head", cluster_spec["headGroupSpec"]["template"])]
    return head + [(group["groupName"], group["template"]) for group in cluster_spec["workerGroupSpecs"]]


def check_ray_cluster_spec(cluster_spec: dict, where: str) -> None:
    """The RayCluster fields KubeRay's CRD requires, plus what these deployments rely on."""
    assert cluster_spec["rayVersion"] == ray.__version__, f"{where}: rayVersion must match the pinned ray"
    assert cluster_spec["enableInTreeAutoscaling"] is True, f"{where}: GPU workers scale with the autoscaler"
    head = cluster_spec["headGroupSpec"]
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), f"{where}: rayStartParams values are strings"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_ports = {p["containerPort"] for p in head_container["ports"]}
    assert {8265, METRICS_PORT} <= head_ports

    groups = cluster_spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker group"
    for group in groups:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["maxReplicas"], f"{where}: group {group['groupName']} min > max"
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == head_container["image"], f"{where}: every node runs the same image"
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, f"{where}: {group['groupName']} has no GPU limit"

    for name, template in pod_templates(cluster_spec):
        spec = template["spec"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(METRICS_PORT), f"{where}/{name}: metrics port annotation"
        group = cluster_spec["headGroupSpec"] if name == "head" else next(g for g in groups if g["groupName"] == name)
        assert group["rayStartParams"]["metrics-export-port"] == str(METRICS_PORT)
        container = spec["containers"][0]
        assert {"name": "metrics", "containerPort": METRICS_PORT} in container["ports"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        env = {e["name"]: e for e in container["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key, f"{where}/{name}: {key} from the Secret"
        assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True, "AWS S3 needs no endpoint"
        assert env["AWS_DEFAULT_REGION"]["value"]


def test_rayjob_asks_an_autoscaling_gpu_cluster_to_run_a_batch_command_line_the_cli_accepts():
    job = only_document(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob")

    # The entrypoint is a command line the real CLI accepts, with the flags a GPU run needs.
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["catversion", "batch"]
    args = build_parser().parse_args(words[1:])
    assert all(uri.startswith("s3://") for uri in args.manifest) and args.output.startswith("s3://")
    assert args.gpus_per_worker == 1 and args.pack == 8
    assert args.storage_path.startswith("s3://"), "Ray Train state must be reachable from every node"
    gpu_pods = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                   for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert args.workers * args.gpus_per_worker <= gpu_pods, "more Ray Train workers than the cluster can ever hold"


def test_rayservice_serves_the_documented_serve_config(tmp_path):
    service = only_document(RAYSERVICE)
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert service["metadata"]["name"]
    cluster = service["spec"]["rayClusterConfig"]
    check_ray_cluster_spec(cluster, "RayService")
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {8000, 8265, METRICS_PORT} <= {p["containerPort"] for p in head["ports"]}

    config_text = service["spec"]["serveConfigV2"]
    assert isinstance(config_text, str), "serveConfigV2 is a YAML string, not a mapping"
    config = yaml.safe_load(config_text)
    documented = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())

    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # Ray's own schema for a Serve config
    app = config["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    settings = {f.name for f in dataclasses.fields(ServeSettings)}
    assert set(app["args"]) <= settings, f"unknown serve settings {sorted(set(app['args']) - settings)}"
    ServeSettings.from_dict(app["args"])  # valid values, not only known keys
    assert [d["name"] for d in app["deployments"]] == ["Generator", "Ingress"]
    for deployment in app["deployments"]:
        autoscaling = deployment["autoscaling_config"]
        assert set(autoscaling) <= set(AutoscalingConfig.model_fields), f"{deployment['name']}: unknown autoscaling keys"
        AutoscalingConfig(**autoscaling)

    # Same shape as serve/config.yaml: the cluster copy changes values, never drops a knob.
    documented_app = documented["applications"][0]
    assert set(config) == set(documented) and set(app) == set(documented_app)
    assert set(documented_app["args"]) <= set(app["args"])
    assert {d["name"]: set(d) for d in app["deployments"]} == {d["name"]: set(d) for d in documented_app["deployments"]}
    assert config["http_options"]["port"] == 8000

    # The application builds the way `catversion serve --config` builds it.
    from serve.app import build_app
    from serve.cli import load_config

    path = tmp_path / "serve-config.yaml"
    path.write_text(config_text)
    args, _, _ = load_config(str(path))
    build_app(args)

    # Every pod that may run an Ingress replica has the API key file the settings point at.
    key_file = Path(app["args"]["api_key_file"])
    for name, template in pod_templates(cluster):
        spec = template["spec"]
        secret_volumes = {v["name"] for v in spec["volumes"] if "secret" in v}
        mounts = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] in secret_volumes]
        assert any(key_file.parent == Path(m["mountPath"]) for m in mounts), f"{name}: {key_file} is not mounted"


def test_rayservice_pods_are_ready_only_while_the_server_says_so():
    """The serving pods' readiness probe asks the application's own /readyz (200 only while a generator
    replica is warm; tests/test_serve.py asks it over HTTP), on the port Serve's proxy listens on, without
    an API key (probes send none)."""
    from serve.app import _Guard

    service = only_document(RAYSERVICE)
    cluster = service["spec"]["rayClusterConfig"]
    port = yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"]
    for group in cluster["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        probe = container["readinessProbe"]["httpGet"]
        assert probe["path"] == "/readyz", f"{group['groupName']}: probe {probe}"
        assert probe["port"] == port and {"name": "serve", "containerPort": port} in container["ports"]
        assert probe["path"].startswith(_Guard.OPEN), "the probe would need an API key"
        assert "livenessProbe" not in container, "an application check must not restart the Ray node's pod"


def secret_references(node, found=None) -> set[tuple[str, str | None]]:
    """(secret name, key or None for the whole secret) for every Secret a manifest reads."""
    found = set() if found is None else found
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            found.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
        if "secretRef" in node:
            found.add((node["secretRef"]["name"], None))
        if "secret" in node and isinstance(node["secret"], dict):
            secret = node["secret"]
            keys = [item["key"] for item in secret.get("items", [])] or [None]
            found.update((secret["secretName"], key) for key in keys)
        for value in node.values():
            secret_references(value, found)
    elif isinstance(node, list):
        for value in node:
            secret_references(value, found)
    return found


def test_every_secret_the_manifests_read_is_in_the_example():
    examples = {doc["metadata"]["name"]: doc for doc in documents(SECRETS)}
    assert all(doc["apiVersion"] == "v1" and doc["kind"] == "Secret" for doc in examples.values())
    for manifest in (RAYJOB, RAYSERVICE):
        references = secret_references(only_document(manifest))
        assert references, f"{manifest.name} reads no Secret"
        for name, key in references:
            assert name in examples, f"{manifest.name} reads Secret {name!r}, which secret-example.yaml lacks"
            if key is not None:
                assert key in examples[name]["stringData"], f"{manifest.name} reads {name}/{key}, missing from the example"
    for name, doc in examples.items():
        for key, value in doc["stringData"].items():
            assert "REPLACE_ME" in value, f"secret-example.yaml {name}/{key} must be a marked placeholder"
    key_file = yaml.safe_load(only_document(RAYSERVICE)["spec"]["serveConfigV2"])["applications"][0]["args"]["api_key_file"]
    assert Path(key_file).name in examples["catversion-api-keys"]["stringData"]


def test_the_image_is_the_same_everywhere_and_built_from_the_pinned_versions():
    job, service, cluster = only_document(RAYJOB), only_document(RAYSERVICE), only_document(CLUSTER)
    images = {template["spec"]["containers"][0]["image"]
              for cluster_spec in (job["spec"]["rayClusterSpec"], service["spec"]["rayClusterConfig"])
              for _, template in pod_templates(cluster_spec)}
    images.add(cluster["docker"]["image"])
    assert len(images) == 1, f"one service image for every deployment, found {sorted(images)}"

    dockerfile = (INFRA / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    assert args["RAY_IMAGE"].startswith(f"rayproject/ray:{pinned('ray')}-"), "base image Ray must be the pinned ray"
    assert args["TORCH_VERSION"] == pinned("torch"), "the CUDA torch must be the pinned torch version"
    assert "pip install --no-cache-dir -c /tmp/constraints-image.txt ." in dockerfile
    assert re.search(r"^USER ray$", dockerfile, re.M) and re.search(r"^ENV HF_HOME=", dockerfile, re.M)
    assert not re.search(r"^(ENTRYPOINT|CMD)\b", dockerfile, re.M), "Ray starts the container's processes"


def test_cluster_launcher_config_is_valid_for_ray_up():
    from catversion.cluster.ray_internals import validate_cluster_launcher_config

    config = only_document(CLUSTER)
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    instance_types = {t["node_config"]["InstanceType"].split(".")[0] for t in workers.values()}
    assert {"g5", "p4d"} <= instance_types
    for name, node_type in workers.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
    for node_type in types.values():
        assert "IamInstanceProfile" in node_type["node_config"], "S3 access comes from instance profiles"
    validate_cluster_launcher_config(copy.deepcopy(config))  # the offline half of `ray up`


# ---- Grafana -------------------------------------------------------------------------------------


def allowed_catversion_series() -> set[str]:
    names = set()
    for spec in telemetry.ALL_METRICS:
        if spec.kind == "histogram":
            names.update(spec.prometheus_name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(spec.prometheus_name)
    return names


def dashboard_queries(dashboard: dict) -> list[str]:
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries += [variable["definition"], variable["query"]["query"]]
    return queries


def ray_source_mentions(names: set[str]) -> set[str]:
    """The names that appear verbatim in the installed ray package's Python source."""
    left = set(names)
    for path in Path(ray.__file__).parent.rglob("*.py"):
        text = path.read_text(errors="ignore")
        left -= {name for name in left if name in text}
        if not left:
            break
    return set(names) - left


def test_dashboard_queries_only_series_the_code_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    datasource = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert datasource["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"]), "panel ids are unique"
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == f"${{{datasource['name']}}}", f"{panel['title']}: use the datasource variable"

    used = {name for query in dashboard_queries(dashboard) for name in METRIC_NAME.findall(query)}
    catversion_names = {n for n in used if n.startswith("ray_catversion_")}
    serve_names = {n for n in used if n.startswith("ray_serve_")}
    assert used == catversion_names | serve_names, f"unexpected series {sorted(used - catversion_names - serve_names)}"
    unknown = catversion_names - allowed_catversion_series()
    assert not unknown, f"the dashboard asks for series catversion.telemetry does not define: {sorted(unknown)}"
    covered = {spec.name for spec in telemetry.ALL_METRICS if any(n.startswith(spec.prometheus_name) for n in used)}
    assert covered == {spec.name for spec in telemetry.ALL_METRICS}, "every catversion metric has a panel"
    assert serve_names, "the dashboard shows Ray Serve's own series too"
    missing = serve_names - ray_source_mentions(serve_names)
    assert not missing, f"ray {ray.__version__} never mentions {sorted(missing)}"


# ---- Prometheus ----------------------------------------------------------------------------------


def test_promtool_accepts_the_prometheus_config():
    result = subprocess.run([tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = only_document(PROMETHEUS_CONFIG)["scrape_configs"]
    files = [f for job in jobs for sd in job.get("file_sd_configs", []) for f in sd["files"]]
    assert files == ["/tmp/ray/prom_metrics_service_discovery.json"]


def grafana_to_promql(query: str, run_id: str) -> str:
    """A dashboard query with Grafana's variables replaced as Grafana would for one run."""
    for variable, value in (("$__rate_interval", "1m"), ("$__range", "1h"), ("$run_id", run_id)):
        query = query.replace(variable, value)
    return query


@pytest.fixture(scope="session")
def prometheus_tools() -> tuple[str, str]:
    """(prometheus, promtool); session-scoped so a missing tool fails before the batch run starts."""
    return tool("prometheus"), tool("promtool")


@pytest.fixture
def prometheus(prometheus_tools, ray_session, tmp_path):
    """Prometheus on 127.0.0.1 with infra/prometheus/prometheus.yml, its service discovery file
    written as Ray writes it but naming this session's Ray metrics endpoint, every second."""
    binary, promtool = prometheus_tools
    target = ray_session.split("//", 1)[1].split("/", 1)[0]
    discovery = tmp_path / "prom_metrics_service_discovery.json"
    discovery.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [target]}]))
    config = only_document(PROMETHEUS_CONFIG)
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    for job in config["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd.update(files=[str(discovery)], refresh_interval="1s")
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    check = subprocess.run([promtool, "check", "config", str(config_path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [binary, f"--config.file={config_path}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={tmp_path / 'data'}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield {"url": f"http://127.0.0.1:{port}", "process": process, "log": tmp_path / "prometheus.log"}
    finally:
        stop(process)
        log.close()


def instant_query(server: dict, query: str) -> list[dict]:
    response = requests.get(f"{server['url']}/api/v1/query", params={"query": query}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{query}: {body.get('error', body)}"
    return body["data"]["result"]


def test_prometheus_scrapes_catversion_series_from_ray(prometheus_tools, batch_run, prometheus):
    _, _, _, summary = batch_run
    deadline = time.monotonic() + 60
    series: list[dict] = []
    while time.monotonic() < deadline:
        if prometheus["process"].poll() is not None:
            pytest.fail(f"prometheus exited ({prometheus['process'].returncode}):\n{prometheus['log'].read_text()[-3000:]}")
        try:
            series = instant_query(prometheus, '{__name__=~"ray_catversion_.*"}')
        except requests.ConnectionError:
            series = []  # not listening yet
        if series:
            break
        time.sleep(1)
    assert series, f"no ray_catversion_* series scraped in 60 s:\n{prometheus['log'].read_text()[-3000:]}"

    # What Ray really exports is exactly what catversion.telemetry says it does.
    scraped = {s["metric"]["__name__"] for s in series}
    assert scraped <= allowed_catversion_series(), f"unexpected names {sorted(scraped - allowed_catversion_series())}"
    assert {"ray_catversion_concepts_done_total", "ray_catversion_train_steps_total"} <= scraped
    assert all(s["metric"]["job"] == "ray" for s in series), "the job label comes from Ray's discovery file"

    # Every dashboard query is valid PromQL on a real server, and the run totals add up.
    dashboard = json.loads(DASHBOARD.read_text())
    for query in dashboard_queries(dashboard):
        if not query.startswith("label_values("):
            instant_query(prometheus, grafana_to_promql(query, summary.run_id))
    totals = next(p for p in dashboard["panels"] if p["title"] == "Concepts in the selected runs")
    for legend, status in (("done", "ok"), ("failed", "failed")):  # failed includes manifest-rejected concepts
        expr = next(t["expr"] for t in totals["targets"] if t["legendFormat"] == legend)
        deadline = time.monotonic() + 30
        while True:
            result = instant_query(prometheus, grafana_to_promql(expr, summary.run_id))
            value = float(result[0]["value"][1]) if result else None
            if value == summary.counts[status] or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert value == summary.counts[status], f"{legend}: {value} != {summary.counts[status]}"


# ---- the front proxy (ingress-nginx) ---------------------------------------------------------------

# What ingress-nginx writes into its nginx.conf for each annotation infra/kuberay/ingress.yaml uses.
INGRESS_NGINX_DIRECTIVES = {
    "nginx.ingress.kubernetes.io/proxy-body-size": "client_max_body_size {}",
    "nginx.ingress.kubernetes.io/proxy-request-buffering": "proxy_request_buffering {}",
    "nginx.ingress.kubernetes.io/proxy-buffering": "proxy_buffering {}",
    "nginx.ingress.kubernetes.io/proxy-read-timeout": "proxy_read_timeout {}s",
}


def test_the_ingress_routes_to_the_rayservice_with_the_servers_body_limit():
    ingress = only_document(INFRA / "kuberay" / "ingress.yaml")
    assert ingress["apiVersion"] == "networking.k8s.io/v1" and ingress["kind"] == "Ingress"
    annotations = ingress["metadata"]["annotations"]
    limit = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert limit.endswith("k") and int(limit[:-1]) * 1024 == ServeSettings.__dataclass_fields__["max_body_bytes"].default
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off", "stream=true events must not be held back"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = only_document(RAYSERVICE)
    assert backend["name"] == f"{service['metadata']['name']}-serve-svc"
    assert backend["port"]["number"] == yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"]


class _Backend(BaseHTTPRequestHandler):
    """Stands where Ray Serve's proxy would: records every body that reaches it; /stream sends one event,
    then waits until the client has it (``release``) before sending the last one."""

    bodies: list[int]
    release: threading.Event
    released_in_time: list[bool]

    def do_POST(self):
        self.bodies.append(len(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0, no Content-Length: the body ends when the connection closes
        self.wfile.write(b"event: image_generation.partial_image\ndata: {}\n\n")
        self.wfile.flush()
        self.released_in_time.append(self.release.wait(10))
        self.wfile.write(b"event: image_generation.completed\ndata: {}\n\n")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def front_proxy(tmp_path_factory):
    """nginx (Debian's, from `make tools`) on 127.0.0.1 configured as ingress-nginx configures itself from
    infra/kuberay/ingress.yaml's annotations, in front of a small local backend."""
    binary = tool("nginx")
    annotations = only_document(INFRA / "kuberay" / "ingress.yaml")["metadata"]["annotations"]
    unknown = sorted(set(annotations) - set(INGRESS_NGINX_DIRECTIVES))
    assert not unknown, f"annotations this test does not translate to nginx directives: {unknown}"
    directives = "".join(f"      {INGRESS_NGINX_DIRECTIVES[name].format(value)};\n" for name, value in annotations.items())

    handler = type("Backend", (_Backend,), {"bodies": [], "release": threading.Event(), "released_in_time": []})
    backend = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=backend.serve_forever, name="front-proxy-backend", daemon=True).start()
    root, port = tmp_path_factory.mktemp("nginx"), free_port()
    temp_paths = "".join(f"  {kind}_temp_path {root / kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (root / "nginx.conf").write_text(f"""daemon off;
master_process off;
pid {root / 'nginx.pid'};
error_log {root / 'error.log'} info;
events {{ worker_connections 64; }}
http {{
  access_log off;
{temp_paths}  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://127.0.0.1:{backend.server_address[1]};
      proxy_http_version 1.1;
{directives}    }}
  }}
}}
""")
    command = [binary, "-p", str(root), "-e", str(root / "error.log"), "-c", str(root / "nginx.conf")]
    check = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def listening() -> bool:
        if process.poll() is not None:
            pytest.fail(f"nginx exited ({process.returncode}):\n{(root / 'error.log').read_text()[-3000:]}")
        try:
            return requests.post(url, data=b"", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_until(listening, 30, "nginx answering on 127.0.0.1")
        yield {"url": url, "backend": handler}
    finally:
        stop(process)
        backend.shutdown()
        backend.server_close()


def test_nginx_with_the_ingress_annotations_refuses_bodies_over_the_servers_limit_before_the_backend_sees_them(
        front_proxy):
    limit = ServeSettings.__dataclass_fields__["max_body_bytes"].default
    url, seen = f"{front_proxy['url']}/v1/images/generations", front_proxy["backend"].bodies
    seen.clear()
    assert requests.post(url, data=b"x" * limit, timeout=30).status_code == 200
    assert seen == [limit], "a body at the limit passes"

    assert requests.post(url, data=b"x" * (limit + 1), timeout=30).status_code == 413

    def chunks():  # no Content-Length: counted as it arrives, as the server does
        for _ in range(4):
            yield b"x" * (limit // 2)

    assert requests.post(url, data=chunks(), timeout=30).status_code == 413
    assert seen == [limit], "the backend never saw a body over the limit"


def test_nginx_with_the_ingress_annotations_passes_each_stream_event_on_as_it_is_sent(front_proxy):
    backend = front_proxy["backend"]
    backend.release.clear()
    backend.released_in_time.clear()
    with requests.get(f"{front_proxy['url']}/stream", stream=True, timeout=30) as response:
        assert response.status_code == 200
        received = b""
        for chunk in response.iter_content(chunk_size=None):
            received += chunk
            if b"\n\n" in received:
                backend.release.set()  # the first event arrived while the backend still held the stream open
        assert received.count(b"event: ") == 2
    assert backend.released_in_time == [True], "nginx held the first event back until the stream ended"
