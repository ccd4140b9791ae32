"""The NATS configs the StatefulSet mounts pass `nats-server -t`, are the ConfigMap's text
byte for byte, and route to every pod of the StatefulSet; cluster mode's node config too."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.deploy.k8s import K8S, one, render
from threadline.natsserver import cluster_node_config, find_nats_server

CONFIGS = {"prod": K8S / "base" / "nats" / "nats.conf", "dev": K8S / "overlays" / "dev" / "nats.conf"}


def nats_check(path: Path) -> subprocess.CompletedProcess[str]:
    # The pod provides SERVER_NAME (from its name); nats-server refuses an unresolved variable.
    env = {**os.environ, "SERVER_NAME": "nats-0", "POD_NAME": "nats-0"}
    return subprocess.run([find_nats_server(), "-t", "-c", str(path)], capture_output=True, text=True,
                          env=env, timeout=20, check=False)


@pytest.mark.parametrize("overlay", sorted(CONFIGS))
def test_nats_config_is_valid_and_is_the_configmap(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    # configMapGenerator appends a content hash to the name (so a config change rolls the pods).
    [configmap] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("nats-config-")]
    text = configmap["data"]["nats.conf"]
    assert text == CONFIGS[overlay].read_text()
    rendered = tmp_path / "nats.conf"
    rendered.write_text(text)
    result = nats_check(rendered)
    assert result.returncode == 0, result.stdout + result.stderr
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
                                        routes=[f"nats://127.0.0.1:{p}" for p in (16221, 16222, 16223)]))
    result = nats_check(path)
    assert result.returncode == 0, result.stdout + result.stderr
