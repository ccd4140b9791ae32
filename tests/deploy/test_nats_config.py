"""The NATS configs the StatefulSet mounts pass `nats-server -t`, are the ConfigMap's text
byte for byte, and route to every pod of the StatefulSet; their users are shared/natsauth.py's,
each with a password in the example Secret; cluster mode's node config too."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.natsauth import USERS, kubernetes_auth_config, password_env
from tests.deploy.k8s import DEPLOY, K8S, one, render
from threadline.natsserver import cluster_node_config, find_nats_server

CONFIGS = {"prod": K8S / "base" / "nats" / "nats.conf", "dev": K8S / "overlays" / "dev" / "nats.conf"}
TLS_DIR = "/etc/nats-tls/"


def nats_check(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # The pod provides SERVER_NAME (from its name) and the users' passwords (Secret threadline-nats);
    # nats-server refuses an unresolved variable.
    env = {**os.environ, "SERVER_NAME": "nats-0", "POD_NAME": "nats-0",
           **{password_env(user): f"password-of-{user}" for user in USERS}, **(env or {})}
    return subprocess.run([find_nats_server(), "-t", "-c", str(path)], capture_output=True, text=True,
                          env=env, timeout=20, check=False)


def write_tls_files(directory: Path) -> None:
    """A self-signed certificate as Secret `nats-tls` holds it (tls.crt, tls.key, ca.crt)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nats")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("nats")]), critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    directory.mkdir()
    (directory / "tls.crt").write_bytes(pem)
    (directory / "ca.crt").write_bytes(pem)
    (directory / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))


def write_configmap(data: dict[str, str], directory: Path) -> Path:
    """The ConfigMap's files as the pod sees them, the TLS files where the Secret would be."""
    write_tls_files(directory / "tls")
    for name, text in data.items():
        (directory / name).write_text(text.replace(TLS_DIR, f"{directory / 'tls'}/"))
    return directory / "nats.conf"


@pytest.mark.parametrize("overlay", sorted(CONFIGS))
def test_nats_config_is_valid_and_is_the_configmap(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    # configMapGenerator appends a content hash to the name (so a config change rolls the pods).
    [configmap] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("nats-config-")]
    text = configmap["data"]["nats.conf"]
    assert text == CONFIGS[overlay].read_text()
    # The users and their permissions are shared/natsauth.py's (regenerate: python -m shared.natsauth).
    assert "include ./auth.conf" in text
    assert configmap["data"]["auth.conf"] == kubernetes_auth_config()
    rendered = write_configmap(configmap["data"], tmp_path)
    result = nats_check(rendered)
    assert result.returncode == 0, result.stdout + result.stderr
    # A password the pod does not get is an unresolved variable: the server refuses to start.
    without_web = {k: v for k, v in os.environ.items() if k != password_env("web")}
    check = subprocess.run([find_nats_server(), "-t", "-c", str(rendered)], capture_output=True, text=True,
                           env={**without_web, "SERVER_NAME": "nats-0",
                                **{password_env(u): "x" for u in USERS if u != "web"}},
                           timeout=20, check=False)
    assert check.returncode != 0 and password_env("web") in check.stdout + check.stderr
    # Every user's password comes into the NATS pods from Secret threadline-nats.
    container = one(docs, "StatefulSet", "nats")["spec"]["template"]["spec"]["containers"][0]
    env_refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in container["env"]}
    for user in USERS:
        assert env_refs[password_env(user)] == {"name": "threadline-nats", "key": user}
    # The StatefulSet mounts exactly this ConfigMap and starts nats-server with it.
    nats = one(docs, "StatefulSet", "nats")
    volumes = {v["name"]: v for v in nats["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    container = nats["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["--config", "/etc/nats-config/nats.conf"]
    assert "lame_duck_duration" in text
    assert 'store_dir: "/data/jetstream"' in text
    # Routes: one per StatefulSet pod through the headless Service (none for a single node).
    routes = re.findall(r"nats://([\w.-]+):6222", text)
    replicas = nats["spec"]["replicas"]
    expected = [f"nats-{i}.nats-headless" for i in range(replicas)] if replicas > 1 else []
    assert routes == expected


def test_nats_check_rejects_a_broken_config(tmp_path: Path) -> None:
    broken = tmp_path / "nats.conf"
    broken.write_text(CONFIGS["prod"].read_text().replace('lame_duck_duration: "30s"', 'lame_duck_duration: "5s"'))
    assert nats_check(broken).returncode != 0


def test_cluster_mode_node_config_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "node.conf"
    path.write_text(cluster_node_config(server_name="nats-1", host="127.0.0.1", client_port=14222,
                                        cluster_port=16222, monitor_port=18222, store_dir=str(tmp_path / "js"),
                                        routes=[f"nats://127.0.0.1:{p}" for p in (16221, 16222, 16223)],
                                        passwords={user: f"pw-{user}" for user in USERS},
                                        route_password="route-secret"))
    assert 'user: "conversations"' in path.read_text() and "nats://route:route-secret@" in path.read_text()
    result = nats_check(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_secret_examples_give_every_user_a_password() -> None:
    """A user without a password in Secret `threadline-nats` stops the NATS pods (an unresolved
    variable): the example Secret and the commands that create it name every user."""
    path = K8S / "secret.example.yaml"
    [nats] = [d for d in yaml.safe_load_all(path.read_text()) if d and d["metadata"]["name"] == "threadline-nats"]
    assert sorted(nats["stringData"]) == sorted(USERS)
    for document in (path, DEPLOY / "README.md"):
        # `for user in a b \<newline># c d; do …`: the shell loop, continuation lines joined.
        text = re.sub(r"\\\n[#\s]*", " ", document.read_text())
        loops = re.findall(r"for user in ([\w\s]+?); do", text)
        assert loops, document
        assert all(sorted(loop.split()) == sorted(USERS) for loop in loops), document
