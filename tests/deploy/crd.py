"""Strict offline validation of custom resources against the CRDs vendored in deploy/k8s/crds.

kubernetes-validate knows only the built-in kinds (a CloudNativePG `Cluster` raises its
SchemaNotFoundError) and takes no schema of ours. The API server checks a custom resource
against its CRD's `openAPIV3Schema` and prunes the fields that schema does not declare (or
rejects them, with `kubectl apply --validate=strict`); here every object schema that declares
its properties gets `additionalProperties: false`, as kubernetes-validate's strict schemas do,
unless it keeps unknown fields (`x-kubernetes-preserve-unknown-fields`) or already says what
extra keys may hold (a map). The `allOf`/`anyOf`/`oneOf`/`not` branches stay as they are: in a
structural schema they only narrow values the surrounding properties already declare.

Not checked offline: CEL rules (`x-kubernetes-validations`) and `format`s. `metadata`, which
the CRD leaves to the API server (`type: object`), is checked as any object's ObjectMeta.
"""

from __future__ import annotations

import functools
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from tests.deploy.k8s import K8S, K8S_VERSION

CRDS = K8S / "crds"
# libyaml's loader: the vendored CRDs are large (pure-Python parsing takes seconds).
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of an OpenAPI v3 schema in which objects accept only the properties they declare."""
    tightened = dict(schema)
    if "properties" in tightened:
        tightened["properties"] = {name: strict(sub) for name, sub in tightened["properties"].items()}
        if "additionalProperties" not in tightened and not tightened.get("x-kubernetes-preserve-unknown-fields"):
            tightened["additionalProperties"] = False
    if isinstance(tightened.get("additionalProperties"), dict):
        tightened["additionalProperties"] = strict(tightened["additionalProperties"])
    if isinstance(tightened.get("items"), dict):
        tightened["items"] = strict(tightened["items"])
    return tightened


@functools.cache
def validators() -> dict[tuple[str, str], jsonschema.Draft4Validator]:
    """(apiVersion, kind) → a validator of each served version of every vendored CRD."""
    found: dict[tuple[str, str], jsonschema.Draft4Validator] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=LOADER):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                if not version.get("served"):
                    continue
                schema = strict(version["schema"]["openAPIV3Schema"])
                # OpenAPI 3.0 schemas are JSON Schema draft 4 with extensions (`x-kubernetes-*`,
                # `nullable`) that a draft 4 validator ignores.
                jsonschema.Draft4Validator.check_schema(schema)
                api_version = f"{spec['group']}/{version['name']}"
                found[(api_version, spec["names"]["kind"])] = jsonschema.Draft4Validator(schema)
    return found


def is_custom(doc: dict[str, Any]) -> bool:
    """Whether `doc` is of a kind a vendored CRD defines."""
    return (doc["apiVersion"], doc["kind"]) in validators()


def validate(doc: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError unless `doc` is valid, strictly, against its CRD."""
    validators()[(doc["apiVersion"], doc["kind"])].validate(doc)
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                 K8S_VERSION, strict=True)
