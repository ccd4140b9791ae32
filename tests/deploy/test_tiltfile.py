"""The Tiltfile, run in a Starlark interpreter with stub Tilt built-ins (tests/deploy/tilt.py)."""

from __future__ import annotations

import pytest
import starlark as sl

from tests.deploy.k8s import REPO
from tests.deploy.tilt import TiltfileError, evaluate

TILTFILE = (REPO / "Tiltfile").read_text()
SERVICES = ("identity", "conversations", "webhooks", "messenger", "whatsapp", "telegram", "sms", "web", "app",
            "handoff", "notifications")
WITH_DATABASE = ("identity", "conversations", "webhooks", "messenger", "notifications")
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
    forwards = {f["local_port"]: f for r in run.resources.values() for f in r["port_forwards"]}
    assert forwards[8080]["name"] == "front door"
    assert forwards[8086]["name"] == "sandbox"
    assert (forwards[15432]["name"], forwards[15432]["container_port"]) == ("postgres", 5432)
    assert "dev-secrets" in run.local_resources


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
