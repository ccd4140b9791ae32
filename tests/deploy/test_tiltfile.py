"""The Tiltfile, run in a Starlark interpreter with stub Tilt built-ins (tests/deploy/tilt.py)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import starlark as sl

from shared.natsauth import USERS
from shared.routes import MAIL_SMTP_PORT
from tests.deploy.k8s import REPO
from tests.deploy.tilt import TiltfileError, evaluate

TILTFILE = (REPO / "Tiltfile").read_text()
SERVICES = ("identity", "conversations", "webhooks", "messenger", "whatsapp", "telegram", "sms", "email", "web",
            "app", "handoff", "notifications", "desk")
WITH_DATABASE = ("identity", "conversations", "webhooks", "messenger", "notifications", "desk")
INFRA = ("nats", "postgres")


def test_tiltfile_builds_the_image_with_live_update() -> None:
    run = evaluate(TILTFILE, REPO)
    image = run.images["threadline"]
    assert image["dockerfile"] == "deploy/docker/Dockerfile"
    assert image["entrypoint"] == ["python", "-m"]
    steps = image["live_update"]
    synced = {s["local_path"]: s["remote_path"] for s in steps if s["step"] == "sync"}
    assert {"services", "shared"} <= set(synced)
    for local, remote in synced.items():
        assert remote == f"/opt/threadline/lib/python3.11/site-packages/{local}"
    # The process restarts after a sync (the restart_process extension wraps the entrypoint).
    assert steps[-1]["step"] in ("restart_process", "restart_container", "run")


def test_tiltfile_resources_match_the_dev_overlay() -> None:
    run = evaluate(TILTFILE, REPO)
    assert set(run.workloads) == {*INFRA, "sandbox", *SERVICES}
    # Every workload is configured (labels, deps); services start after NATS, and after
    # PostgreSQL when they use it.
    assert set(run.resources) == set(run.workloads)
    for name, resource in run.resources.items():
        assert resource["labels"], name
        if name not in INFRA:
            assert "nats" in resource["resource_deps"], name
        assert ("postgres" in resource["resource_deps"]) == (name in WITH_DATABASE), name
    local_ports = [f["local_port"] for r in run.resources.values() for f in r["port_forwards"]]
    assert len(local_ports) == len(set(local_ports))
    forwards = {f["local_port"]: f for r in run.resources.values() for f in r["port_forwards"]}
    assert forwards[8080]["name"] == "front door"
    # The e-mail channel's SMTP receiver is not behind the front door: forwarded on its own.
    assert forwards[MAIL_SMTP_PORT]["container_port"] == MAIL_SMTP_PORT
    assert forwards[MAIL_SMTP_PORT] in run.resources["email"]["port_forwards"]
    assert forwards[8086]["name"] == "sandbox"
    assert (forwards[15432]["name"], forwards[15432]["container_port"]) == ("postgres", 5432)
    assert "dev-secrets" in run.local_resources


# `kubectl` for the dev-secrets command: Secrets in a JSON file, only the calls the command makes.
FAKE_KUBECTL = r"""
import base64, json, sys
state_path, args = sys.argv[1], sys.argv[2:]
state = json.load(open(state_path))
namespace = None
if args[0] == "-n":
    namespace, args = args[1], args[2:]
verb, kind, name, rest = args[0], args[1], args[2], args[3:]
if kind == "namespace":
    if verb == "get":
        sys.exit(0 if name in state["namespaces"] else 1)
    state["namespaces"].append(name)
else:
    secrets = state["secrets"].setdefault(namespace, {})
    if verb == "get":
        if name not in secrets:
            sys.exit(1)
        if rest[:1] == ["-o"]:
            key = rest[1].removeprefix("jsonpath={.data.").removesuffix("}")
            value = secrets[name].get(key)
            print(base64.b64encode(value.encode()).decode() if value else "", end="")
        sys.exit(0)
    if verb == "create":
        assert kind == "secret" and name == "generic" and rest[0] not in secrets, args
        secrets[rest[0]] = dict(arg.removeprefix("--from-literal=").split("=", 1) for arg in rest[1:])
    elif verb == "patch":
        assert name in secrets and rest[:3] == ["--type", "merge", "-p"], args
        secrets[name].update(json.loads(rest[3])["stringData"])
    else:
        sys.exit(f"unexpected kubectl call: {args}")
json.dump(state, open(state_path, "w"))
"""


def run_dev_secrets(tmp_path: Path, secrets: dict[str, dict[str, str]] | None) -> dict[str, dict[str, str]]:
    """The dev-secrets command against a fake kubectl; the namespace's Secrets afterwards."""
    cmd = evaluate(TILTFILE, REPO).local_resources["dev-secrets"]["cmd"]
    namespace = re.search(r"create namespace (\S+);", cmd)
    assert namespace is not None
    state_path = tmp_path / "state.json"
    state: dict[str, Any] = {"namespaces": [namespace[1]] if secrets is not None else [],
                             "secrets": {namespace[1]: secrets or {}}}
    state_path.write_text(json.dumps(state))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "fake_kubectl.py").write_text(FAKE_KUBECTL)
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{bin_dir / "fake_kubectl.py"}" "{state_path}" "$@"\n')
    kubectl.chmod(0o755)
    # `python3` in the command: this interpreter's.
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    after: dict[str, dict[str, str]] = json.loads(state_path.read_text())["secrets"][namespace[1]]
    return after


def test_dev_secrets_give_every_nats_user_a_password(tmp_path: Path) -> None:
    secrets = run_dev_secrets(tmp_path, None)
    # Every NATS user of deploy/k8s/base/nats/auth.conf (shared/natsauth.py) has a random password.
    nats = secrets["threadline-nats"]
    assert set(nats) == set(USERS)
    assert all(re.fullmatch(r"[0-9a-f]{48}", password) for password in nats.values())
    assert len(set(nats.values())) == len(nats)
    assert {"account-key-id", "account-key-secret", "sdk-token-secret", "notify-secret",
            "secrets-key"} <= set(secrets["threadline-secrets"])
    key_id, _, key = secrets["threadline-secrets"]["secrets-key"].partition(":")
    assert key_id == "k1" and len(base64.b64decode(key)) == 32


def test_dev_secrets_add_the_password_of_a_new_nats_user(tmp_path: Path) -> None:
    # A dev namespace from before the e-mail service (and before secrets at rest): the NATS pods
    # would not start without NATS_PASSWORD_EMAIL. What was there stays as it was.
    old_nats = {user: f"old-{user}" for user in USERS if user != "email"}
    old_secrets = {"account-key-id": "act_old", "account-key-secret": "old-secret"}
    secrets = run_dev_secrets(tmp_path, {"threadline-nats": dict(old_nats),
                                         "threadline-secrets": dict(old_secrets)})
    nats = secrets["threadline-nats"]
    assert set(nats) == set(USERS)
    assert {user: nats[user] for user in old_nats} == old_nats
    assert re.fullmatch(r"[0-9a-f]{48}", nats["email"])
    assert {key: secrets["threadline-secrets"][key] for key in old_secrets} == old_secrets
    assert secrets["threadline-secrets"]["secrets-key"].startswith("k1:")


@pytest.mark.parametrize(("mutation", "message"), [
    (("target = \"dev\",", "target = \"dev\", tagret = \"x\","), "unexpected keyword"),
    (("sync(\"shared\",", "sync(\"shraed\","), "shraed does not exist"),
    (("k8s_resource(\n    \"sandbox\",", "k8s_resource(\n    \"sandbox-ui\","), "no workload of that name"),
    (("resource_deps = [\"nats\", \"dev-secrets\"], labels = [\"sdk\"]",
      "resource_deps = [\"nats\", \"secrets\"], labels = [\"sdk\"]"), "unknown resource 'secrets'"),
    (("port_forward(8086, 8086, name = \"sandbox\")", "port_forward(8086, 8086, nmae = \"sandbox\")"),
     "unexpected keyword"),
    (("target = \"dev\",", "target = \"debug\","), "not a stage"),
    (("load(\"ext://restart_process\"", "load(\"ext://restart_proces\""), "not a known extension"),
])
def test_stubs_refuse_what_tilt_would_refuse(mutation: tuple[str, str], message: str) -> None:
    old, new = mutation
    assert old in TILTFILE
    with pytest.raises((TiltfileError, sl.StarlarkError), match=message):
        evaluate(TILTFILE.replace(old, new, 1), REPO)
