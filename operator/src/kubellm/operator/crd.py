"""Generate the LLMServer CustomResourceDefinition from the pydantic models in `spec`.

Kubernetes wants a *structural* OpenAPI v3 schema: every node typed, no `$ref`, no
`anyOf`/`oneOf` except in value validations, `additionalProperties` only for maps. The pydantic
JSON schema is turned into one here: references are inlined, `Optional[X]` becomes X left out of
`required`, free-form objects keep their content with `x-kubernetes-preserve-unknown-fields`,
titles are dropped and docstrings stay as descriptions.

`python -m kubellm.operator.crd > crds/serving.kubellm.io_llmservers.yaml` regenerates the
committed file (so does `kubellm-operator crd`).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml  # type: ignore[import-untyped, unused-ignore]

from kubellm.operator import spec

CRD_NAME = f"{spec.PLURAL}.{spec.GROUP}"
CRD_PATH = "crds/serving.kubellm.io_llmservers.yaml"

_DROP = {"title", "additionalProperties"}
_NAME_RULE = {
    "rule": "self.metadata.name.size() <= 45 && "
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
    "message": "metadata.name must be at most 45 characters of lowercase letters, digits and '-', "
    "starting with a letter (it names the Services and the engine StatefulSet)",
}


class SchemaError(ValueError):
    """The pydantic schema has a shape the CRD generator does not handle."""


def structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One pydantic JSON-schema node → a Kubernetes structural schema node."""
    node = _inline(node, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or (key == "default" and value is None):
            continue
        if key == "properties":
            out[key] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = structural(value, defs)
        elif key == "description":
            out[key] = " ".join(str(value).split())
        elif key in ("anyOf", "oneOf", "allOf", "$ref", "exclusiveMinimum", "exclusiveMaximum"):
            raise SchemaError(f"unsupported schema keyword {key!r} in {node!r}")
        else:
            out[key] = copy.deepcopy(value)
    extra = node.get("additionalProperties")
    if node.get("type") == "object" and "properties" not in node:
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = structural(extra, defs)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _inline(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Resolve `$ref` / `allOf: [$ref]` and collapse `anyOf: [X, null]` into X."""
    node = dict(node)
    if "allOf" in node and len(node["allOf"]) == 1:
        node.update(node.pop("allOf")[0])
    ref = node.pop("$ref", None)
    if ref is not None:
        target = _inline(defs[ref.rsplit("/", 1)[-1]], defs)
        node = {**target, **node}  # the field's own description and default win
    options = node.get("anyOf")
    if options is not None:
        kept = [o for o in options if o.get("type") != "null"]
        if len(kept) != 1:
            raise SchemaError(f"only Optional[X] unions are supported, got {options!r}")
        del node["anyOf"]
        node = {**_inline(kept[0], defs), **node}
    return node


def spec_schema() -> dict[str, Any]:
    """The structural schema of `.spec`."""
    raw = spec.LLMServerSpec.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return structural(raw, defs)


def status_schema() -> dict[str, Any]:
    """The structural schema of `.status`.

    Unknown fields are kept, so that what kopf itself may record there is not pruned.
    """
    raw = spec.LLMServerStatus.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = structural(raw, defs)
    schema.pop("required", None)
    schema["x-kubernetes-preserve-unknown-fields"] = True
    return schema


def _served_name_rule(schema: dict[str, Any]) -> None:
    """Check servedModelName with CEL (readable message) instead of a bare pattern."""
    field = schema["properties"]["servedModelName"]
    pattern = field.pop("pattern")
    field["x-kubernetes-validations"] = [
        {"rule": f"self.matches('{pattern}')", "message": spec.SERVED_NAME_MESSAGE}
    ]


def _printer_columns() -> list[dict[str, Any]]:
    return [
        {
            "name": "Ready",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        },
        {"name": "Model", "type": "string", "jsonPath": ".spec.servedModelName"},
        {"name": "Engines", "type": "integer", "jsonPath": ".status.engine.ready"},
        {"name": "URL", "type": "string", "jsonPath": ".status.url"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def crd_manifest() -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition of LLMServer."""
    spec_part = spec_schema()
    _served_name_rule(spec_part)
    root = {
        "type": "object",
        "description": "LLMServer: an OpenAI-compatible endpoint served by kubellm, one head "
        "Deployment and a StatefulSet of data-parallel engines.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_part,
            "status": status_schema(),
        },
        "x-kubernetes-validations": [dict(_NAME_RULE)],
    }
    version = {
        "name": spec.VERSION,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": root},
        "subresources": {
            "status": {},
            "scale": {
                "specReplicasPath": ".spec.engine.replicas",
                "statusReplicasPath": ".status.engine.ready",
                "labelSelectorPath": ".status.selector",
            },
        },
        "additionalPrinterColumns": _printer_columns(),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": spec.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": spec.KIND,
                "listKind": f"{spec.KIND}List",
                "plural": spec.PLURAL,
                "singular": spec.SINGULAR,
                "shortNames": list(spec.SHORT_NAMES),
            },
            "versions": [version],
        },
    }


def crd_yaml() -> str:
    """The CRD as YAML, keys sorted: the exact text of the committed crds/ file."""
    header = (
        "# Generated by `python -m kubellm.operator.crd` (or `kubellm-operator crd`) from\n"
        "# kubellm.operator.spec: do not edit by hand.\n"
    )
    body = yaml.safe_dump(crd_manifest(), sort_keys=True, default_flow_style=False, width=100)
    return header + body


def main() -> int:
    """Print the CRD to stdout."""
    sys.stdout.write(crd_yaml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
