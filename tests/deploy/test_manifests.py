"""The kustomize overlays render, validate strictly against the Kubernetes schemas, and say
what the deployment promises: probes, graceful shutdown, PVCs for the SQLite services, PDBs for
the replicated ones, secrets only by reference, an Ingress routing exactly shared/routes.py."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from shared.encryption import SERVICES_WITH_SECRETS
from shared.natsauth import SERVICE_ACCESS
from shared.routes import DEFAULT_PORTS, ROUTES
from tests.deploy.k8s import DEPLOY, OVERLAYS, REPO, containers, objects, one, render

STATEFUL = ("identity", "conversations", "webhooks", "messenger", "notifications")
STATELESS = ("whatsapp", "telegram", "sms", "web", "app", "handoff")
# Secrets each service reads (its config.py) and the Secret keys they come from.
SECRET_ENV = {
    "conversations": {"THREADLINE_ACCOUNT_KEY_ID": "account-key-id",
                      "THREADLINE_ACCOUNT_KEY_SECRET": "account-key-secret"},
    "web": {"THREADLINE_SDK_TOKEN_SECRET": "sdk-token-secret"},
    "app": {"THREADLINE_SDK_TOKEN_SECRET": "sdk-token-secret"},
    "notifications": {"THREADLINE_NOTIFY_SECRET": "notify-secret"},
}
K8S_VERSION = "1.37.0"


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def config_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("threadline-config")]
    assert len(maps) == 1
    data: dict[str, str] = maps[0]["data"]
    return data


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(overlay: str) -> None:
    docs = render(overlay)
    assert docs
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert errors == []


def test_strict_validation_rejects_an_unknown_field() -> None:
    deployment = one(render("prod"), "Deployment", "whatsapp")
    deployment["spec"]["replicaCount"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_routes_exactly_the_front_door_routes(overlay: str) -> None:
    docs = render(overlay)
    ingress = one(docs, "Ingress")
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    routed = {r.prefix: r.service for r in ROUTES if overlay == "dev" or r.service != "sandbox"}
    assert sorted(p["path"] for p in paths) == sorted(routed)
    services = objects(docs, "Service")
    for path in paths:
        assert path["pathType"] == "Prefix"
        backend = path["backend"]["service"]
        assert backend["name"] == routed[path["path"]]
        assert backend["port"]["number"] == DEFAULT_PORTS[backend["name"]]
        # The backend Service exists and exposes that port to a container port named http.
        ports = {p["port"]: p for p in services[backend["name"]]["spec"]["ports"]}
        assert ports[backend["port"]["number"]]["targetPort"] == "http"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_runs_with_probes_graceful_stop_and_limits(overlay: str) -> None:
    docs = render(overlay)
    deployments = objects(docs, "Deployment")
    expected = set(STATEFUL + STATELESS) | ({"sandbox"} if overlay == "dev" else set())
    assert set(deployments) == expected
    # A new services/<name> package needs its manifest (and a place in STATEFUL/STATELESS).
    packages = {path.parent.name for path in (REPO / "services").glob("*/__main__.py")}
    assert packages - ({"sandbox"} if overlay == "prod" else set()) == expected
    config = config_of(docs)
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        main = next(c for c in containers(deployment) if c["name"] == name)
        assert main["args"] == [f"services.{name}"]
        assert main["image"].split(":")[0].endswith("threadline")
        port = {p["name"]: p["containerPort"] for p in main["ports"]}["http"]
        assert port == DEFAULT_PORTS[name]
        assert env_of(main)["THREADLINE_HTTP_PORT"]["value"] == str(port)
        assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert {"requests", "limits"} <= set(main["resources"])
        # Endpoints are removed during the preStop sleep; SIGTERM then drains (HTTP 10 s + NATS 5 s).
        pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + 15
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert main["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"] for m in main["volumeMounts"]}
        assert "/tmp" in mounts
        if overlay == "prod":
            assert main["securityContext"]["readOnlyRootFilesystem"] is True
            assert main["image"] != "threadline"
        assert any(ref.get("configMapRef", {}).get("name", "").startswith("threadline-config")
                   for ref in main["envFrom"])
    assert config["THREADLINE_DATA_DIR"] == "/data"
    # Production's clients reach NATS over TLS (the 3-node cluster); dev's single node is plain.
    assert config["THREADLINE_NATS_URL"] == ("nats://nats:4222" if overlay == "dev" else "tls://nats:4222")
    assert config["THREADLINE_SANDBOX"] == ("1" if overlay == "dev" else "0")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stateful_services_keep_one_replica_on_a_volume(overlay: str) -> None:
    docs = render(overlay)
    deployments = objects(docs, "Deployment")
    claims = objects(docs, "PersistentVolumeClaim")
    budgets = objects(docs, "PodDisruptionBudget")
    for name in STATEFUL:
        deployment = deployments[name]
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteOnce"]
        main = next(containers(deployment))
        assert {"name": "data", "mountPath": "/data"} in main["volumeMounts"]
        assert name not in budgets
    for name in STATELESS:
        assert "data" not in {v["name"] for v in deployments[name]["spec"]["template"]["spec"]["volumes"]}
        if overlay == "prod":
            assert deployments[name]["spec"]["replicas"] == 2
            budget = budgets[name]
            assert budget["spec"]["minAvailable"] == 1
            assert budget["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_only_by_reference(overlay: str) -> None:
    docs = render(overlay)
    assert objects(docs, "Secret") == {}
    for name, deployment in objects(docs, "Deployment").items():
        for container in containers(deployment):
            for var, entry in env_of(container).items():
                if "SECRET" in var or "TOKEN" in var or "KEY" in var:
                    assert "value" not in entry, f"{name}: {var} has a literal value"
        main = next(c for c in containers(deployment) if c["name"] == name)
        for var, key in SECRET_ENV.get(name, {}).items():
            ref = env_of(main)[var]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == ("threadline-secrets", key)
        # Each service is its own NATS user; only those that keep or use secrets get the key.
        env = env_of(main)
        assert env["THREADLINE_NATS_USER"]["value"] == name and name in SERVICE_ACCESS
        ref = env["THREADLINE_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("threadline-nats", name)
        if name in SERVICES_WITH_SECRETS:
            ref = env["THREADLINE_SECRETS_KEY"]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == ("threadline-secrets", "secrets-key")
        else:
            assert "THREADLINE_SECRETS_KEY" not in env
    for key, value in config_of(docs).items():
        assert "SECRET" not in key, f"{key}={value} in the ConfigMap"
    example = (DEPLOY / "k8s" / "secret.example.yaml").read_text()
    assert "kind: Secret" in example and "threadline-secrets" in example
    for kustomization in (DEPLOY / "k8s").rglob("kustomization.yaml"):
        listed = yaml.safe_load(kustomization.read_text()).get("resources", [])
        assert not any("secret" in entry for entry in listed), kustomization


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_statefulset_has_the_helm_chart_shape(overlay: str) -> None:
    docs = render(overlay)
    nats = one(docs, "StatefulSet", "nats")
    replicas = nats["spec"]["replicas"]
    assert replicas == (1 if overlay == "dev" else 3)
    headless = one(docs, "Service", "nats-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert nats["spec"]["serviceName"] == "nats-headless"
    assert {p["port"] for p in one(docs, "Service", "nats")["spec"]["ports"]} == {4222}
    container = next(containers(nats))
    assert "--signal" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"]) or \
        "-sl=ldm" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz?js-enabled-only=true", "port": "monitor"}
    assert container["livenessProbe"]["httpGet"]["path"].startswith("/healthz")
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"client": 4222, "cluster": 6222,
                                                                           "monitor": 8222}
    claim = nats["spec"]["volumeClaimTemplates"][0]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert claim["metadata"]["name"] == "data"
    assert nats["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30  # > lame_duck_duration
    # Streams get as many replicas as there are NATS nodes (1 in dev, 3 in prod).
    assert config_of(docs)["THREADLINE_STREAM_REPLICAS"] == str(replicas)


def test_network_policies_isolate_http_and_nats() -> None:
    docs = render("prod")
    policies = objects(docs, "NetworkPolicy")
    deny = policies["default-deny-ingress"]
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    http = policies["ingress-controller-to-http"]["spec"]
    assert http["ingress"][0]["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "ingress-nginx"}}}]
    exposed = {name for name, d in objects(docs, "Deployment").items()
               if d["spec"]["template"]["metadata"]["labels"].get("threadline.io/ingress") == "true"}
    assert exposed == {r.service for r in ROUTES if r.service != "sandbox"}
    nats = policies["services-to-nats"]["spec"]
    assert nats["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "nats"}
    assert nats["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 4222}]
    clients = nats["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    for deployment in objects(docs, "Deployment").values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in clients.items())
    routes = policies["nats-routes"]["spec"]
    assert routes["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 6222}]
    assert routes["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "nats"}


def test_overlays_use_their_own_namespace() -> None:
    for overlay, namespace in (("dev", "threadline-dev"), ("prod", "threadline")):
        docs = render(overlay)
        assert one(docs, "Namespace")["metadata"]["name"] == namespace
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {namespace}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_tls_certificate_is_mounted_and_services_get_only_its_ca(overlay: str) -> None:
    docs = render(overlay)
    nats = one(docs, "StatefulSet", "nats")
    volumes = {v["name"]: v for v in nats["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "nats-tls"
    assert {"name": "tls", "mountPath": "/etc/nats-tls", "readOnly": True} in next(containers(nats))["volumeMounts"]
    ca_file = config_of(docs)["THREADLINE_NATS_TLS_CA_FILE"]
    assert ca_file == ("" if overlay == "dev" else "/etc/nats-tls/ca.crt")
    for name, deployment in objects(docs, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        if name == "sandbox":
            continue
        # The CA, never the NATS server's private key.
        assert volumes["nats-ca"]["secret"]["secretName"] == "nats-tls"
        assert volumes["nats-ca"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
        main = next(c for c in containers(deployment) if c["name"] == name)
        assert {"name": "nats-ca", "mountPath": "/etc/nats-tls", "readOnly": True} in main["volumeMounts"]


def test_prod_nats_requires_tls_for_clients_and_mutual_tls_for_routes() -> None:
    text = (DEPLOY / "k8s" / "base" / "nats" / "nats.conf").read_text()
    client_tls, cluster = text.split("jetstream {")[0], text.split("cluster {")[1]
    for block in (client_tls, cluster):
        assert 'cert_file: "/etc/nats-tls/tls.crt"' in block and 'ca_file: "/etc/nats-tls/ca.crt"' in block
    assert "verify: true" in cluster and "no_advertise: true" in cluster
    # The example certificate covers what clients and routes dial.
    example = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "nats-tls.example.yaml").read_text()) if d]
    [certificate] = [d for d in example if d["kind"] == "Certificate" and d["spec"]["secretName"] == "nats-tls"]
    names = certificate["spec"]["dnsNames"]
    assert "nats" in names and "*.nats-headless" in names
    assert set(certificate["spec"]["usages"]) == {"server auth", "client auth"}
