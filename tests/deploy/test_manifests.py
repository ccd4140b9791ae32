"""The kustomize overlays render, validate strictly against the Kubernetes schemas (custom
resources against their vendored CRDs), and say what the deployment promises: probes, graceful
shutdown, every service replicated with a PDB and no volume of its own, the database by secret
reference, a replica id per pod, Prometheus scraping, PostgreSQL (CloudNativePG in prod, one
StatefulSet in dev) reachable only by the services that use it, secrets only by reference, an
Ingress routing exactly shared/routes.py, the e-mail service's SMTP receiver open to anyone and
its egress limited to what it needs."""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared.db import DEFAULT_POOL_SIZE
from shared.encryption import SERVICES_WITH_SECRETS
from shared.natsauth import SERVICE_ACCESS
from shared.routes import DEFAULT_PORTS, MAIL_SMTP_PORT, ROUTES
from shared.subjects import PARTITIONS
from tests.deploy import crd
from tests.deploy.k8s import DEPLOY, K8S_VERSION, OVERLAYS, REPO, containers, objects, one, render, workloads

# The services with a database (THREADLINE_DATABASE_URL), and those without.
STATEFUL = ("identity", "conversations", "webhooks", "messenger", "notifications", "desk")
STATELESS = ("whatsapp", "telegram", "sms", "email", "web", "app", "handoff")
SERVICES = STATEFUL + STATELESS
# Secrets each service reads (its config.py) and the Secret keys they come from.
SECRET_ENV = {
    "conversations": {"THREADLINE_ACCOUNT_KEY_ID": "account-key-id",
                      "THREADLINE_ACCOUNT_KEY_SECRET": "account-key-secret"},
    "web": {"THREADLINE_SDK_TOKEN_SECRET": "sdk-token-secret"},
    "app": {"THREADLINE_SDK_TOKEN_SECRET": "sdk-token-secret"},
    "notifications": {"THREADLINE_NOTIFY_SECRET": "notify-secret"},
}
CLUSTER = "threadline-postgres"
# What CloudNativePG writes for the database owner: `<cluster>-app`, key `uri` (postgresql://).
CNPG_APP_SECRET = (f"{CLUSTER}-app", "uri")
# The labels CloudNativePG gives an instance's pod (and its join/initdb Jobs' pods).
CNPG_POD_LABELS = {"cnpg.io/cluster": CLUSTER, "cnpg.io/podRole": "instance"}
CNPG_POD_PORTS = {"postgresql": 5432, "status": 8000, "metrics": 9187}
CNPG_OPERATOR = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "cnpg-system"}},
                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "cloudnative-pg"}}}
DATABASE_CLIENTS = {"podSelector": {"matchLabels": {"threadline.io/database-client": "true"}}}
# The peer of an ingress rule without `from`: every source, in the cluster or outside.
ANYONE: dict[str, Any] = {}


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def config_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("threadline-config")]
    assert len(maps) == 1
    data: dict[str, str] = maps[0]["data"]
    return data


def main_container(deployment: dict[str, Any]) -> dict[str, Any]:
    name = deployment["metadata"]["name"]
    return next(c for c in containers(deployment) if c["name"] == name)


def secret_ref(entry: dict[str, Any]) -> tuple[str, str]:
    """(Secret, key) of an env entry that must come from a Secret, never a literal."""
    assert set(entry) == {"name", "valueFrom"}, entry
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are understood here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def ingress_to(docs: list[dict[str, Any]], pod_labels: dict[str, str],
               pod_ports: dict[str, int]) -> list[tuple[dict[str, Any], set[int]]]:
    """(peer, port numbers) of every ingress rule of the NetworkPolicies that open a port of a pod
    with these labels and named container ports."""
    allowed = []
    for policy in objects(docs, "NetworkPolicy").values():
        if selects(policy["spec"]["podSelector"], pod_labels):
            for rule in policy["spec"].get("ingress", []):
                ports: set[int] = set()
                for entry in rule["ports"]:
                    assert entry.get("protocol") == "TCP"
                    # A named port the pod does not have opens nothing on it.
                    port = pod_ports.get(entry["port"]) if isinstance(entry["port"], str) else entry["port"]
                    if port is not None:
                        ports.add(port)
                # No `from` (or an empty one): every source.
                allowed += [(peer, ports) for peer in rule.get("from") or [ANYONE] if ports]
    return allowed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(overlay: str) -> None:
    docs = render(overlay)
    assert docs
    errors = []
    for doc in docs:
        try:
            if crd.is_custom(doc):
                crd.validate(doc)
            else:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except jsonschema.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert errors == []
    # The custom resources did go through their CRDs' schemas.
    assert {d["kind"] for d in docs if crd.is_custom(d)} == ({"Cluster"} if overlay == "prod" else set())


def test_strict_validation_rejects_an_unknown_field() -> None:
    deployment = one(render("prod"), "Deployment", "whatsapp")
    deployment["spec"]["replicaCount"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize(("path", "value"), [
    pytest.param(("spec", "instancess"), 3, id="unknown-field-in-spec"),
    pytest.param(("spec", "storage", "sizee"), "20Gi", id="unknown-field-nested"),
    pytest.param(("spec", "bootstrap", "initdb", "databse"), "threadline", id="unknown-field-deeper"),
    pytest.param(("spec", "affinity", "topologySpreadConstraints"), [], id="field-of-another-object"),
    pytest.param(("metadata", "lables"), {}, id="unknown-field-in-metadata"),
    pytest.param(("spec", "instances"), "3", id="wrong-type"),
    pytest.param(("spec", "affinity", "podAntiAffinityType"), 1, id="wrong-type-nested"),
])
def test_crd_validation_rejects_unknown_fields_and_wrong_types(path: tuple[str, ...], value: Any) -> None:
    cluster = one(render("prod"), "Cluster", CLUSTER)
    crd.validate(cluster)
    parent = cluster
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        crd.validate(cluster)


def test_crd_validation_keeps_maps_open() -> None:
    # `postgresql.parameters` is a map of PostgreSQL settings: any name is a valid key.
    cluster = one(render("prod"), "Cluster", CLUSTER)
    cluster["spec"]["postgresql"]["parameters"]["work_mem"] = "8MB"
    crd.validate(cluster)
    cluster["spec"]["postgresql"]["parameters"]["work_mem"] = 8
    with pytest.raises(jsonschema.ValidationError):
        crd.validate(cluster)


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
        if name != "sandbox":
            assert "/data" not in mounts
        if overlay == "prod":
            assert main["securityContext"]["readOnlyRootFilesystem"] is True
            assert main["image"] != "threadline"
        assert any(ref.get("configMapRef", {}).get("name", "").startswith("threadline-config")
                   for ref in main["envFrom"])
    # No service keeps files (SQLite is for `make up`); only the dev sandbox has a data directory.
    assert "THREADLINE_DATA_DIR" not in config
    # Production's clients reach NATS over TLS (the 3-node cluster); dev's single node is plain.
    assert config["THREADLINE_NATS_URL"] == ("nats://nats:4222" if overlay == "dev" else "tls://nats:4222")
    assert config["THREADLINE_SANDBOX"] == ("1" if overlay == "dev" else "0")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_rolls_replicated_without_volumes(overlay: str) -> None:
    docs = render(overlay)
    deployments = objects(docs, "Deployment")
    budgets = objects(docs, "PodDisruptionBudget")
    for name in SERVICES:
        spec = deployments[name]["spec"]
        # Prod: two replicas per service; dev: one each, and no PDB to block node drains.
        if overlay == "prod":
            assert spec["replicas"] == 2, name
            budget = budgets[name]
            assert budget["spec"]["minAvailable"] == 1
            assert budget["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        else:
            assert spec["replicas"] == 1, name
            assert name not in budgets
        # A new pod is ready before an old one stops; replicas prefer different nodes.
        assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
        [spread] = spec["template"]["spec"]["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname"
        assert spread["labelSelector"] == {"matchLabels": {"app.kubernetes.io/name": name}}
        # Nothing a second replica could not share: no claim, only the CA and a scratch /tmp.
        volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
        assert set(volumes) == {"nats-ca", "tmp"}, name
        assert "emptyDir" in volumes["tmp"]
    claims = set(objects(docs, "PersistentVolumeClaim"))
    assert claims == ({"sandbox-data"} if overlay == "dev" else set())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_get_the_database_by_secret_and_a_replica_id_from_the_pod_name(overlay: str) -> None:
    docs = render(overlay)
    deployments = objects(docs, "Deployment")
    expected_ref = CNPG_APP_SECRET if overlay == "prod" else ("threadline-database", "url")
    for name in SERVICES:
        deployment = deployments[name]
        env = env_of(main_container(deployment))
        # The pod name: unique per replica, kept across container restarts (partition leases).
        assert env["THREADLINE_REPLICA_ID"] == {"name": "THREADLINE_REPLICA_ID", "valueFrom": {
            "fieldRef": {"fieldPath": "metadata.name"}}}, name
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if name in STATEFUL:
            assert secret_ref(env["THREADLINE_DATABASE_URL"]) == expected_ref, name
            # The label the PostgreSQL NetworkPolicies admit (and prod's secret patch selects).
            assert labels["threadline.io/database-client"] == "true"
            assert deployment["metadata"]["labels"]["threadline.io/database-client"] == "true"
        else:
            assert "THREADLINE_DATABASE_URL" not in env, name
            assert "threadline.io/database-client" not in labels
            assert "threadline.io/database-client" not in deployment["metadata"]["labels"]
    sandbox = deployments.get("sandbox")
    if sandbox is not None:
        assert all("THREADLINE_DATABASE_URL" not in env_of(c) for c in containers(sandbox))


# The object store (shared/config.py ObjectStoreSettings): the optional keys of `threadline-secrets`.
OBJECT_STORE_ENV = {"THREADLINE_OBJECT_STORE_URL": "object-store-url", "THREADLINE_S3_ENDPOINT_URL": "s3-endpoint-url",
                    "THREADLINE_S3_REGION": "s3-region", "THREADLINE_S3_ADDRESSING": "s3-addressing",
                    "THREADLINE_S3_ACCESS_KEY_ID": "s3-access-key-id",
                    "THREADLINE_S3_SECRET_ACCESS_KEY": "s3-secret-access-key"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_services_with_files_share_one_object_store(overlay: str) -> None:
    """What customers upload to `web` and `app`, and the media the channel services copy, is
    served by `conversations`: they all read the same bucket settings, optional (unset: the pod's
    disk, for a deployment without files)."""
    deployments = objects(render(overlay), "Deployment")
    for name in ("conversations", "web", "app", "whatsapp", "messenger", "telegram", "sms", "email"):
        env = env_of(main_container(deployments[name]))
        for var, key in OBJECT_STORE_ENV.items():
            assert env[var] == {"name": var, "valueFrom": {"secretKeyRef": {
                "name": "threadline-secrets", "key": key, "optional": True}}}, (name, var)
    example = (DEPLOY / "k8s" / "secret.example.yaml").read_text()
    assert all(f"# {key}:" in example for key in OBJECT_STORE_ENV.values())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_carry_prometheus_scrape_annotations(overlay: str) -> None:
    deployments = objects(render(overlay), "Deployment")
    for name in SERVICES:
        template = deployments[name]["spec"]["template"]
        port = {p["name"]: p["containerPort"] for p in main_container(deployments[name])["ports"]}["http"]
        assert port == DEFAULT_PORTS[name]
        assert template["metadata"]["annotations"] == {
            "prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}, name


def test_prod_runs_postgres_on_cloudnativepg() -> None:
    docs = render("prod")
    cluster = one(docs, "Cluster", CLUSTER)
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    spec = cluster["spec"]
    assert spec["instances"] == 3
    assert spec["bootstrap"] == {"initdb": {"database": "threadline", "owner": "threadline"}}
    assert spec["storage"]["size"]
    assert spec["imageName"].startswith("ghcr.io/cloudnative-pg/postgresql:")
    assert {"requests", "limits"} <= set(spec["resources"])
    assert spec["resources"]["requests"]["memory"] == spec["resources"]["limits"]["memory"]
    assert spec["monitoring"] == {"enablePodMonitor": False}
    # Instances on different nodes (one node lost = one replica lost), spread over zones.
    assert spec["affinity"]["enablePodAntiAffinity"] is True
    assert spec["affinity"]["topologyKey"] == "kubernetes.io/hostname"
    assert all(selects(c["labelSelector"], CNPG_POD_LABELS) for c in spec["topologySpreadConstraints"])
    # Every process of every stateful service may hold a full pool, during a rollout too, next to
    # the superuser's reserved connections and the operator's own.
    deployments = objects(docs, "Deployment")
    processes = sum(deployments[name]["spec"]["replicas"] + deployments[name]["spec"]["strategy"]["rollingUpdate"][
        "maxSurge"] for name in STATEFUL)
    reserved = 10
    assert int(spec["postgresql"]["parameters"]["max_connections"]) >= processes * DEFAULT_POOL_SIZE + reserved
    # The services read the Secret CloudNativePG creates; nothing in the overlay stands in for it.
    assert "postgres" not in objects(docs, "StatefulSet")
    assert objects(docs, "Secret") == {}


def test_dev_runs_one_postgres_statefulset() -> None:
    docs = render("dev")
    assert objects(docs, "Cluster") == {}
    postgres = one(docs, "StatefulSet", "postgres")
    assert postgres["spec"]["replicas"] == 1
    pod = postgres["spec"]["template"]["spec"]
    [container] = containers(postgres)
    assert container["image"].startswith("postgres:")
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"requests", "limits"} <= set(container["resources"])
    assert container["readinessProbe"]["exec"]["command"][0] == "pg_isready"
    [claim] = postgres["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/var/lib/postgresql"} in container["volumeMounts"]
    service = one(docs, "Service", "postgres")
    assert postgres["spec"]["serviceName"] == "postgres"
    assert service["spec"]["selector"] == postgres["spec"]["selector"]["matchLabels"]
    assert [p["port"] for p in service["spec"]["ports"]] == [5432]
    # The URL the services read names this Service, and the role and password initdb creates.
    secret = one(docs, "Secret", "threadline-database")
    data = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    url = urlsplit(data["url"])
    env = env_of(container)
    assert (url.scheme, url.hostname, url.port) == ("postgresql", "postgres", 5432)
    assert (url.username, url.password) == (env["POSTGRES_USER"]["value"], data["password"])
    assert url.path == "/" + env["POSTGRES_DB"]["value"]
    assert secret_ref(env["POSTGRES_PASSWORD"]) == ("threadline-database", "password")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_database_clients_reach_postgres(overlay: str) -> None:
    docs = render(overlay)
    if overlay == "dev":
        postgres = one(docs, "StatefulSet", "postgres")
        pod_labels = postgres["spec"]["template"]["metadata"]["labels"]
        pod_ports = {p["name"]: p["containerPort"] for c in containers(postgres) for p in c["ports"]}
        expected = [(DATABASE_CLIENTS, {5432})]
    else:
        pod_labels, pod_ports = CNPG_POD_LABELS, CNPG_POD_PORTS
        # The operator manages the instances; instances replicate from and check on each other.
        instances = {"podSelector": {"matchLabels": {"cnpg.io/cluster": CLUSTER}}}
        expected = [(DATABASE_CLIENTS, {5432}), (instances, {5432, 8000}), (CNPG_OPERATOR, {5432, 8000})]
    allowed = ingress_to(docs, pod_labels, pod_ports)
    assert sorted(map(repr, allowed)) == sorted(map(repr, expected))
    # The peer label names exactly the services with a database.
    clients = {name for name, d in objects(docs, "Deployment").items()
               if selects(DATABASE_CLIENTS["podSelector"], d["spec"]["template"]["metadata"]["labels"])}
    assert clients == set(STATEFUL)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_only_by_reference(overlay: str) -> None:
    docs = render(overlay)
    # Only dev's throwaway database credentials are generated, and they say so.
    secrets = objects(docs, "Secret")
    assert set(secrets) == ({"threadline-database"} if overlay == "dev" else set())
    assert all(s["metadata"]["labels"]["threadline.io/dev-only"] == "true" for s in secrets.values())
    for name, workload in workloads(docs).items():
        for container in containers(workload):
            for var, entry in env_of(container).items():
                if any(word in var for word in ("SECRET", "TOKEN", "KEY", "PASSWORD", "DATABASE_URL")):
                    assert "value" not in entry, f"{name}: {var} has a literal value"
    for name, deployment in objects(docs, "Deployment").items():
        main = main_container(deployment)
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
    example = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "secret.example.yaml").read_text()) if d]
    assert {d["metadata"]["name"] for d in example if d["kind"] == "Secret"} == {
        "threadline-secrets", "threadline-nats", "threadline-database"}
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_email_receives_smtp_from_anyone_on_port_25(overlay: str) -> None:
    """The SMTP receiver listens on the pod's addresses (not its loopback default) at the port the
    Service forwards port 25 to; that port, and no other of any pod, is open to every source."""
    docs = render(overlay)
    email = objects(docs, "Deployment")["email"]
    main = main_container(email)
    env = env_of(main)
    assert env["THREADLINE_MAIL_SMTP_HOST"]["value"] in ("0.0.0.0", "::")
    assert env["THREADLINE_MAIL_SMTP_PORT"]["value"] == str(MAIL_SMTP_PORT)
    pod_ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert pod_ports["smtp"] == MAIL_SMTP_PORT
    smtp = objects(docs, "Service")["email-smtp"]["spec"]
    assert smtp["selector"] == email["spec"]["selector"]["matchLabels"]
    assert smtp["ports"] == [{"name": "smtp", "protocol": "TCP", "port": 25, "targetPort": "smtp"}]
    # The HTTP Service stays the Ingress's (and the front door's) backend, on HTTP only.
    assert [p["targetPort"] for p in objects(docs, "Service")["email"]["spec"]["ports"]] == ["http"]
    for name, workload in workloads(docs).items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        ports = {p["name"]: p["containerPort"] for c in containers(workload) for p in c.get("ports", [])}
        open_to_anyone = {port for peer, found in ingress_to(docs, labels, ports) if peer == ANYONE
                          for port in found}
        assert open_to_anyone == ({MAIL_SMTP_PORT} if name == "email" else set()), name
    # The dev sandbox's mail box sends the customers' replies to that Service.
    sandbox = objects(docs, "Deployment").get("sandbox")
    if sandbox is not None:
        sandbox_env = env_of(main_container(sandbox))
        receiver = objects(docs, "Service")[sandbox_env["THREADLINE_MAIL_SMTP_HOST"]["value"]]["spec"]
        assert int(sandbox_env["THREADLINE_MAIL_SMTP_PORT"]["value"]) in [p["port"] for p in receiver["ports"]]
        assert receiver["selector"] == email["spec"]["selector"]["matchLabels"]
    # Whom the receiver believes about SPF/DKIM/DMARC is the operator's to say: nothing is trusted
    # out of the box (a placeholder authserv-id would let any sender claim a pass).
    config = config_of(docs)
    assert config["THREADLINE_MAIL_TRUSTED_AUTHSERV_IDS"] == ""
    assert config["THREADLINE_MAIL_HOSTNAME"]


def egress_of(docs: list[dict[str, Any]], pod_labels: dict[str, str]) -> list[tuple[tuple[str, int], list[Any]]]:
    """((protocol, port), destinations) of every egress rule of the NetworkPolicies that limit the
    egress of a pod with these labels ([] destinations: anywhere)."""
    allowed = []
    for policy in objects(docs, "NetworkPolicy").values():
        if "Egress" in policy["spec"]["policyTypes"] and selects(policy["spec"]["podSelector"], pod_labels):
            for rule in policy["spec"].get("egress", []):
                for entry in rule.get("ports") or [{"protocol": "any", "port": 0}]:
                    allowed.append(((entry.get("protocol", "TCP"), entry["port"]), rule.get("to", [])))
    return allowed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_email_has_its_egress_limited(overlay: str) -> None:
    """The e-mail service takes mail from anyone: it reaches NATS, DNS (DKIM keys, SMTP hosts),
    SMTP servers (25, 465, 587) and HTTPS (the object store), nothing else; in dev also the sandbox
    pod (its SMTP sink and fake platforms). Every other pod keeps open egress."""
    docs = render(overlay)
    nats = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "nats"}}}
    sandbox = {"podSelector": {"matchLabels": {"threadline.io/frontdoor": "true"}}}
    expected = {(("TCP", 4222), repr([nats]))} | {
        ((protocol, port), "[]") for protocol, port in (("UDP", 53), ("TCP", 53), ("TCP", 25), ("TCP", 465),
                                                        ("TCP", 587), ("TCP", 443))}
    if overlay == "dev":
        expected.add((("any", 0), repr([sandbox])))
    for name, workload in workloads(docs).items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        allowed = {(port, repr(to)) for port, to in egress_of(docs, labels)}
        assert allowed == (expected if name == "email" else set()), name
    # The destinations named are what they mean: the NATS pods, the dev front door's pod.
    assert selects(nats["podSelector"], one(docs, "StatefulSet", "nats")["spec"]["template"]["metadata"]["labels"])
    if overlay == "dev":
        assert selects(sandbox["podSelector"], objects(docs, "Deployment")["sandbox"]["spec"]["template"]["metadata"][
            "labels"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_reaches_the_metrics_ports_only(overlay: str) -> None:
    docs = render(overlay)
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    for name, workload in workloads(docs).items():
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        pod_ports = {p["name"]: p["containerPort"] for c in containers(workload) for p in c.get("ports", [])}
        scraped = {port for peer, ports in ingress_to(docs, pod_labels, pod_ports) if peer == monitoring
                   for port in ports}
        if name in SERVICES:
            annotations = workload["spec"]["template"]["metadata"]["annotations"]
            assert scraped == {int(annotations["prometheus.io/port"])}, name
        elif name != "sandbox":
            assert scraped == set(), name


def test_docs_name_the_vendored_operator_release_and_the_partitions() -> None:
    vendored = re.findall(r"cnpg-(\d+\.\d+\.\d+)\.yaml", (DEPLOY / "k8s" / "crds" / "README.md").read_text())
    readme = (DEPLOY / "README.md").read_text()
    installed = re.findall(r"releases/cnpg-(\d+\.\d+\.\d+)\.yaml", readme)
    assert len(set(vendored)) == 1 and set(installed) == set(vendored)
    # Replicas beyond the partition count only add HTTP capacity.
    assert f"Up to {PARTITIONS} replicas" in readme and f"({PARTITIONS} partitions" in readme


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
