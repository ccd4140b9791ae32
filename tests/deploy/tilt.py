"""Stub Tilt built-ins for running a Tiltfile in a Starlark interpreter (starlark-pyo3).

Each stub has Tilt's own signature (tilt.dev/api.html), so an unknown keyword argument is a
TypeError that fails the evaluation. Stubs record what the Tiltfile asked for; `TiltRun.check`
then refuses sync paths that do not exist, resources that name no workload of the kustomize
output, dependencies on unknown resources, and images built that no workload uses (or used and
never built).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import starlark as sl
import yaml

from tests.deploy.k8s import WORKLOAD_KINDS, kustomize_text

TRIGGER_MODE_AUTO = 0
TRIGGER_MODE_MANUAL = 1


class TiltfileError(AssertionError):
    """The Tiltfile asks for something Tilt would refuse (or that cannot work)."""


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


@dataclass
class TiltRun:
    """What one evaluation of a Tiltfile asked for."""

    root: Path
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    objects: list[dict[str, Any]] = field(default_factory=list)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    local_resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    # ---- helpers -------------------------------------------------------------------------
    def _path(self, relative: str, what: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.exists():
            raise TiltfileError(f"{what}: {relative} does not exist")
        return path

    @property
    def workloads(self) -> dict[str, dict[str, Any]]:
        return {o["metadata"]["name"]: o for o in self.objects if o.get("kind") in WORKLOAD_KINDS}

    # ---- built-ins -----------------------------------------------------------------------
    def docker_build(self, ref: str, context: str, build_args: dict[str, str] | None = None,
                     dockerfile: str = "Dockerfile", dockerfile_contents: str = "",
                     live_update: list[Any] | None = None, match_in_env_vars: bool = False,
                     ignore: list[str] | None = None, only: list[str] | None = None,
                     entrypoint: list[str] | str | None = None, target: str = "", ssh: str = "",
                     network: str = "", secret: str = "", extra_tag: str = "",
                     container_args: list[str] | None = None, cache_from: list[str] | None = None,
                     pull: bool = False, platform: str = "", extra_hosts: list[str] | None = None) -> None:
        context_dir = self._path(context, f"docker_build({ref}) context")
        # Tilt resolves `dockerfile` against the Tiltfile's directory, not the context.
        dockerfile_path = self._path(dockerfile, f"docker_build({ref}) dockerfile")
        if target:
            stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile_path.read_text(), re.M | re.I)
            if target not in stages:
                raise TiltfileError(f"docker_build({ref}): target {target!r} is not a stage of {dockerfile}")
        for entry in _list(only):
            self._path(str(Path(context) / entry), f"docker_build({ref}) only")
        steps = _list(live_update)
        for step in steps:
            if not isinstance(step, dict) or "step" not in step:
                raise TiltfileError(f"docker_build({ref}): live_update takes sync()/run()/… steps, got {step!r}")
            if step["step"] == "sync":
                local = (self.root / step["local_path"]).resolve()
                if context_dir not in (local, *local.parents):
                    raise TiltfileError(f"sync({step['local_path']}) is outside the build context")
                if only and not any(step["local_path"] == o or step["local_path"].startswith(o.rstrip("/") + "/")
                                    for o in only):
                    raise TiltfileError(f"sync({step['local_path']}) is not in the image (`only`)")
        kinds = [s["step"] for s in steps]
        if "fall_back_on" in kinds and kinds.index("fall_back_on") != 0:
            raise TiltfileError("fall_back_on must be the first live_update step")
        if ref in self.images:
            raise TiltfileError(f"image {ref} built twice")
        self.images[ref] = {"context": context, "dockerfile": dockerfile, "target": target,
                            "live_update": steps, "entrypoint": entrypoint}

    def docker_build_with_restart(self, ref: str, context: str, entrypoint: list[str] | str,
                                  live_update: list[Any], base_suffix: str = "-tilt_restart_proc_base",
                                  restart_file: str = "/tmp/.restart-proc", trigger: list[str] | None = None,
                                  exit_policy: str = "restart", **kwargs: Any) -> None:
        """ext://restart_process: builds the image, then wraps the entrypoint to restart on sync."""
        if exit_policy not in ("restart", "continue"):
            raise TiltfileError(f"exit_policy {exit_policy!r}")
        if not entrypoint:
            raise TiltfileError("docker_build_with_restart needs the entrypoint to wrap")
        self.docker_build(ref, context, live_update=[*live_update, {"step": "restart_process"}],
                          entrypoint=entrypoint, **kwargs)

    def sync(self, local_path: str, remote_path: str) -> dict[str, Any]:
        self._path(local_path, "sync")
        if not remote_path.startswith("/"):
            raise TiltfileError(f"sync remote path {remote_path} must be absolute")
        return {"step": "sync", "local_path": local_path, "remote_path": remote_path}

    def run(self, cmd: str | list[str], trigger: list[str] | str | None = None,
            echo_off: bool = False) -> dict[str, Any]:
        for path in _list(trigger):
            self._path(path, "run trigger")
        return {"step": "run", "cmd": cmd}

    def fall_back_on(self, files: list[str] | str) -> dict[str, Any]:
        for path in _list(files):
            self._path(path, "fall_back_on")
        return {"step": "fall_back_on", "files": _list(files)}

    def restart_container(self) -> dict[str, Any]:
        return {"step": "restart_container"}

    def kustomize(self, pathToDir: str, kustomize_bin: str | None = None,  # Tilt's argument names
                  flags: list[str] | None = None) -> str:
        return kustomize_text(str(self._path(pathToDir, "kustomize")))

    def k8s_yaml(self, yaml_: Any, allow_duplicates: bool = False) -> None:
        texts = [yaml_] if isinstance(yaml_, str) else _list(yaml_)
        for text in texts:
            if not isinstance(text, str):
                raise TiltfileError(f"k8s_yaml takes YAML text or paths, got {text!r}")
            if "\n" not in text:  # a path
                text = self._path(text, "k8s_yaml").read_text()
            self.objects.extend(doc for doc in yaml.safe_load_all(text) if doc)

    def port_forward(self, local_port: int, container_port: int | None = None, name: str | None = None,
                     link_path: str | None = None, host: str | None = None) -> dict[str, Any]:
        if not 0 < local_port < 65536:
            raise TiltfileError(f"port_forward local port {local_port}")
        return {"local_port": local_port, "container_port": container_port or local_port, "name": name,
                "link_path": link_path}

    def k8s_resource(self, workload: str = "", new_name: str = "", port_forwards: Any = None,
                     extra_pod_selectors: Any = None, trigger_mode: int = TRIGGER_MODE_AUTO,
                     resource_deps: list[str] | None = None, objects: list[str] | None = None,
                     auto_init: bool = True, pod_readiness: str = "", links: Any = None,
                     labels: list[str] | str | None = None, discovery_strategy: str = "") -> None:
        if workload and workload not in self.workloads:
            raise TiltfileError(f"k8s_resource({workload!r}): no workload of that name in the YAML "
                                f"(have: {sorted(self.workloads)})")
        if not workload and not (new_name and objects):
            raise TiltfileError("k8s_resource needs a workload (or new_name with objects)")
        name = new_name or workload
        if name in self.resources:
            raise TiltfileError(f"k8s_resource({name!r}) configured twice")
        forwards = []
        for forward in _list(port_forwards):
            forwards.append(forward if isinstance(forward, dict) else self.port_forward(int(forward)))
        self.resources[name] = {"workload": workload, "port_forwards": forwards,
                                "resource_deps": _list(resource_deps), "labels": _list(labels)}

    def local_resource(self, name: str, cmd: str | list[str] = "", deps: list[str] | str | None = None,
                       trigger_mode: int = TRIGGER_MODE_AUTO, resource_deps: list[str] | None = None,
                       ignore: list[str] | None = None, auto_init: bool = True, serve_cmd: str = "",
                       cmd_bat: str = "", serve_cmd_bat: str = "", allow_parallel: bool = False,
                       links: Any = None, tags: list[str] | None = None, env: dict[str, str] | None = None,
                       serve_env: dict[str, str] | None = None, readiness_probe: Any = None, dir: str = "",
                       serve_dir: str = "", labels: list[str] | str | None = None) -> None:
        if not (cmd or serve_cmd):
            raise TiltfileError(f"local_resource({name}) has nothing to run")
        for path in _list(deps):
            self._path(path, f"local_resource({name}) deps")
        self.local_resources[name] = {"cmd": cmd, "serve_cmd": serve_cmd, "resource_deps": _list(resource_deps),
                                      "labels": _list(labels)}

    def allow_k8s_contexts(self, contexts: list[str] | str) -> None:
        pass

    def update_settings(self, max_parallel_updates: int = 3, k8s_upsert_timeout_secs: int = 30,
                        suppress_unused_image_warnings: Any = None) -> None:
        pass

    def watch_settings(self, ignore: list[str] | str | None = None) -> None:
        pass

    # ---- after the evaluation ------------------------------------------------------------
    def check(self) -> None:
        """Cross-checks Tilt would do at `tilt up` (or that decide whether the loop works)."""
        known = set(self.workloads) | set(self.local_resources) | set(self.resources)
        for name, resource in {**self.resources, **self.local_resources}.items():
            for dep in resource["resource_deps"]:
                if dep not in known:
                    raise TiltfileError(f"{name}: resource_deps names unknown resource {dep!r}")
        used = {c["image"].split(":")[0] for w in self.workloads.values()
                for c in w["spec"]["template"]["spec"].get("containers", [])}
        for ref in self.images:
            if ref not in used:
                raise TiltfileError(f"image {ref} is built but no workload uses it")


def load_module(name: str, run: TiltRun) -> sl.FrozenModule:
    """`load("ext://…")`: the Tilt extensions the Tiltfile may use, stubbed."""
    module = sl.Module()
    if name == "ext://restart_process":
        module.add_callable("docker_build_with_restart", run.docker_build_with_restart)
    else:
        raise TiltfileError(f"load({name!r}): not a known extension")
    return module.freeze()


BUILTINS = ("docker_build", "sync", "run", "fall_back_on", "restart_container", "kustomize", "k8s_yaml",
            "port_forward", "k8s_resource", "local_resource", "allow_k8s_contexts", "update_settings",
            "watch_settings")


def evaluate(source: str, root: Path) -> TiltRun:
    """Run a Tiltfile's text with the stubs and the cross-checks; raise on anything wrong."""
    run = TiltRun(root=root)
    module = sl.Module()
    for name in BUILTINS:
        module.add_callable(name, getattr(run, name))
    module["TRIGGER_MODE_AUTO"] = TRIGGER_MODE_AUTO
    module["TRIGGER_MODE_MANUAL"] = TRIGGER_MODE_MANUAL
    ast = sl.parse("Tiltfile", source, sl.Dialect.extended())
    sl.eval(module, ast, sl.Globals.standard(), sl.FileLoader(lambda name: load_module(name, run)))
    run.check()
    return run
