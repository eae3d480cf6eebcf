"""deploy/kubernetes/: schema-valid for the Kubernetes API, and in agreement with the code.

Validated offline with `kubernetes-validate` (it ships the API's JSON schemas; nothing is fetched),
strict (unknown fields are errors). Beyond the schema: every variable is a setting, secrets only come
from Secrets, the probes hit the real endpoints on the ports the services listen on, the image's
sub-commands are real `watistream` sub-commands, selectors select the pods they mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from aiohttp import web

from services.cli import build_parser
from services.common import ops_http
from services.common.config import Settings
from services.ingest import app as ingest_app
from tests.unit.test_deploy_files import GENERATOR, SERVICE_PORT, webhook_paths

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the manifests must run on
DOCUMENTED = {name for name, _, _ in Settings.documented()}
SECRET_SETTINGS = {n for n in DOCUMENTED if GENERATOR.is_secret(n)} | {"KAFKA_SASL_PASSWORD"}
SERVICES = tuple(SERVICE_PORT)
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    (doc,) = load(KUBE / "kustomization.yaml")
    return doc


@pytest.fixture(scope="module")
def resources(kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object `kubectl apply -k` creates."""
    return [doc for name in kustomization["resources"] for doc in load(KUBE / name)]


def by_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def workloads(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """service name (ingest, context, ...) -> its Deployment or StatefulSet."""
    out = {}
    for r in resources:
        if r["kind"] in WORKLOAD_KINDS:
            (container,) = r["spec"]["template"]["spec"]["containers"]
            out[container["name"]] = r
    return out


def container_of(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture(scope="module")
def settings_data(resources: list[dict[str, Any]]) -> dict[str, str]:
    return dict(by_kind(resources, "ConfigMap")["watistream-settings"]["data"])


@pytest.fixture(scope="module")
def pod_settings(settings_data: dict[str, str]) -> Settings:
    """The Settings a pod builds from the ConfigMap (secrets filled in as the Secret would)."""
    secrets = {name: "x" * 16 for name in SECRET_SETTINGS}
    return Settings.from_env(environ={**settings_data, **secrets}, dotenv=Path("/nonexistent"))


def test_every_manifest_is_listed_and_schema_valid(kustomization: dict[str, Any]) -> None:
    files = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files - {"secret.example.yaml"}, "secrets are not applied"
    for name in sorted(files):
        for doc in load(KUBE / name):
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_the_validator_rejects_what_the_api_server_rejects() -> None:
    (_, deployment, _) = load(KUBE / "ingest.yaml")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_context_is_a_statefulset_with_a_volume_at_data_dir_and_a_standby(
    resources: list[dict[str, Any]], pod_settings: Settings
) -> None:
    kinds = {name: w["kind"] for name, w in workloads(resources).items()}
    assert kinds == {"context": "StatefulSet", "ingest": "Deployment", "responder": "Deployment",
                     "vision": "Deployment", "console": "StatefulSet"}
    context = workloads(resources)["context"]
    assert context["spec"]["replicas"] >= 2, "a second worker holds the standby table partitions"
    (claim,) = context["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container_of(context)["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == pod_settings.data_dir == "/data"
    assert pod_settings.context_store == "rocksdb"
    headless = by_kind(resources, "Service")[context["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    # with CONTEXT_WEB_HOST=0.0.0.0 a worker advertises socket.gethostname() to its peers
    assert pod_settings.context_web_host == "0.0.0.0"
    assert context["spec"]["template"]["spec"]["setHostnameAsFQDN"] is True, "a name peers can resolve"


def test_every_variable_is_a_setting_and_secrets_come_from_secrets(
    resources: list[dict[str, Any]], settings_data: dict[str, str]
) -> None:
    assert set(settings_data) <= DOCUMENTED, sorted(set(settings_data) - DOCUMENTED)
    assert not set(settings_data) & SECRET_SETTINGS, "no secret in a ConfigMap"
    secret_docs = {d["metadata"]["name"]: d for d in load(KUBE / "secret.example.yaml")}
    assert set(secret_docs["watistream-secrets"]["stringData"]) == SECRET_SETTINGS
    assert all(v == "" for v in secret_docs["watistream-secrets"]["stringData"].values())
    for name, workload in workloads(resources).items():
        container = container_of(workload)
        sources = container["envFrom"]
        assert {"configMapRef": {"name": "watistream-settings"}} in sources, name
        assert {"secretRef": {"name": "watistream-secrets"}} in sources, name
        assert {e["name"] for e in container.get("env", [])} <= DOCUMENTED, name


def test_tls_files_and_the_prompt_are_mounted_where_the_settings_say(
    resources: list[dict[str, Any]], pod_settings: Settings
) -> None:
    prompts = by_kind(resources, "ConfigMap")["watistream-system-prompt"]["data"]
    ca_secret = {d["metadata"]["name"]: d for d in load(KUBE / "secret.example.yaml")}["watistream-kafka-ca"]
    for name, workload in workloads(resources).items():
        pod = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container_of(workload)["volumeMounts"]}
        prompt = Path(pod_settings.system_prompt_file)
        source = volumes[mounts[str(prompt.parent)]]
        assert source["configMap"]["name"] == "watistream-system-prompt", name
        assert prompts[prompt.name].strip(), name
        ca = Path(pod_settings.kafka_ssl_ca_file)
        secret = volumes[mounts[str(ca.parent)]]["secret"]
        assert secret["secretName"] == "watistream-kafka-ca" and ca.name in ca_secret["stringData"], name
    assert pod_settings.kafka_security_protocol == "SASL_SSL"


def _routes(app: web.Application) -> set[str]:
    return {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource}


def real_probe_paths() -> dict[str, set[str]]:
    """The GET routes each service really serves for probes (context: its faust views' pages)."""
    ops = _routes(ops_http.build_app(lambda: (True, "")))
    views = (ROOT / "services" / "context" / "views.py").read_text(encoding="utf-8")
    context = {p for p in ("/healthz", "/readyz") if f'@app.page("{p}")' in views}
    source = Path(ingest_app.__file__).read_text(encoding="utf-8")  # routes registered by make_app
    ingest = {p for p in ("/healthz", "/readyz") if f'add_get("{p}"' in source}
    console_source = (ROOT / "services" / "console" / "app.py").read_text(encoding="utf-8")
    console = {p for p in ("/healthz", "/readyz") if f'add_get("{p}"' in console_source}
    return {"ingest": ingest, "context": context, "responder": ops, "vision": ops, "console": console}


def test_probes_hit_the_real_endpoints_on_the_port_the_service_listens_on(
    resources: list[dict[str, Any]], pod_settings: Settings
) -> None:
    served = real_probe_paths()
    services = by_kind(resources, "Service")
    for name, workload in workloads(resources).items():
        container = container_of(workload)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": getattr(pod_settings, SERVICE_PORT[name])}, name
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, name
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, name
        assert {"/readyz", "/healthz"} <= served[name], name
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(ports["http"]), name
        service = services[f"watistream-{name}"]
        assert service["spec"]["ports"][0]["targetPort"] == "http"
        assert service["spec"]["ports"][0]["port"] == ports["http"]
    assert pod_settings.ingest_host == pod_settings.context_web_host == pod_settings.ops_web_host == "0.0.0.0"


def test_each_container_runs_its_watistream_sub_command_from_the_one_image(
    resources: list[dict[str, Any]], kustomization: dict[str, Any]
) -> None:
    parser = build_parser()
    (image,) = kustomization["images"]
    assert set(workloads(resources)) == set(SERVICES)
    for name, workload in workloads(resources).items():
        container = container_of(workload)
        assert container["image"] == image["name"], name
        assert "command" not in container, "the image's ENTRYPOINT is watistream"
        assert container["args"] == [name] and parser.parse_args(container["args"]).command == name
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001, "the Dockerfile's user"


def test_selectors_select_their_pods_and_every_workload_has_a_disruption_budget(
    resources: list[dict[str, Any]],
) -> None:
    budgets = by_kind(resources, "PodDisruptionBudget")
    services = by_kind(resources, "Service")
    for name, workload in workloads(resources).items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        covering = [b["spec"] for b in budgets.values()
                    if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, f"{name}: one PodDisruptionBudget"
        budget, replicas = covering[0], workload["spec"]["replicas"]
        assert budget.get("maxUnavailable") == 1 or budget.get("minAvailable", 0) < replicas, name
        assert services[f"watistream-{name}"]["spec"]["selector"].items() <= labels.items(), name


def test_only_the_webhook_routes_are_exposed_over_https(resources: list[dict[str, Any]]) -> None:
    (ingress,) = by_kind(resources, "Ingress").values()
    assert ingress["spec"]["tls"] and ingress["spec"]["tls"][0]["secretName"]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] in ingress["spec"]["tls"][0]["hosts"]
    (path,) = rule["http"]["paths"]
    # the webhook routes, the `default` tenant's and every tenant's (docs/tenants.md), are ingest's
    # only routes under /webhooks; its ops routes are not under it
    assert (path["path"], path["pathType"]) == ("/webhooks", "Prefix")
    app = ingest_app.make_app(Settings(webhook_token="t"), cast(Any, None))
    for route in app.router.routes():
        under = route.resource is not None and route.resource.canonical.startswith("/webhooks/")
        assert under == (route.method == "POST"), route.resource
    assert all(route.startswith("/webhooks/") for route in webhook_paths())
    assert path["backend"]["service"] == {"name": "watistream-ingest", "port": {"name": "http"}}
    body_limit = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(body_limit.removesuffix("k")) * 1024 == Settings().max_body_bytes
