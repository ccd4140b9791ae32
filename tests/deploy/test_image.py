"""The image (deploy/docker/Dockerfile) cannot be built here; check what it promises statically,
and that every container's `python -m <module>` names a module this checkout has."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from shared.routes import DEFAULT_PORTS, ROUTES
from tests.deploy.k8s import DEPLOY, OVERLAYS, REPO, containers, render, workloads
from threadline.cluster import kubernetes_upstreams

DOCKERFILE = (DEPLOY / "docker" / "Dockerfile").read_text()


def stages() -> list[tuple[str, str, str]]:
    """(base, name, body) of each FROM stage."""
    parts = re.split(r"^FROM\s+", DOCKERFILE, flags=re.M)[1:]
    out = []
    for part in parts:
        header, _, body = part.partition("\n")
        base, _, name = header.partition(" AS ")
        out.append((base.strip(), name.strip(), body))
    return out


def test_image_is_slim_non_root_and_runs_a_module() -> None:
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE
    _base, name, body = stages()[-1]  # `docker build` without --target builds the last stage
    assert name == "runtime"
    user = re.findall(r"^USER\s+(\S+)", body, re.M)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    entrypoint = re.findall(r"^ENTRYPOINT\s+(.+)$", DOCKERFILE, re.M)
    assert json.loads(entrypoint[-1]) == ["python", "-m"]
    installs = re.findall(r"pip install[^\n]*", DOCKERFILE)
    assert installs and all("--no-cache-dir" in line and "[dev]" not in line for line in installs)
    assert "PYTHONSAFEPATH=1" in DOCKERFILE and "TMPDIR=/tmp" in DOCKERFILE


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".threadline", "tests", ".git"} <= ignored


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_a_module_of_this_checkout(overlay: str) -> None:
    for name, workload in workloads(render(overlay)).items():
        if name in ("nats", "postgres"):  # upstream images
            continue
        for container in containers(workload):
            module = container["args"][0]
            assert importlib.util.find_spec(module) is not None, f"{name}/{container['name']}: {module}"


def test_dev_front_door_routes_to_the_kubernetes_services() -> None:
    upstreams = kubernetes_upstreams({})
    assert upstreams == {r.service: f"http://{r.service}:{DEFAULT_PORTS[r.service]}" for r in ROUTES}
    assert kubernetes_upstreams({"THREADLINE_UPSTREAM_WEB": "http://web.other:80"})["web"] == "http://web.other:80"
