"""kubellm.operator.spec and .crd: the typed LLMServer spec and the CRD generated from it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]

from kubellm.operator import crd, spec

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "llmserver.yaml"
CRD_FILE = REPO / crd.CRD_PATH
FORBIDDEN = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "title", "const"}


def manifest() -> dict[str, Any]:
    return crd.crd_manifest()


def version() -> dict[str, Any]:
    versions = manifest()["spec"]["versions"]
    assert len(versions) == 1
    return dict(versions[0])


def root_schema() -> dict[str, Any]:
    return dict(version()["schema"]["openAPIV3Schema"])


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node with its path."""
    out = [(path or ".", node)]
    for name, sub in (node.get("properties") or {}).items():
        out += walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += walk(node["additionalProperties"], f"{path}{{}}")
    return out


def example() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    servers = [d for d in docs if d.get("kind") == spec.KIND]
    assert len(servers) == 1
    return dict(servers[0])


# -- the committed file ----------------------------------------------------------------------------


def test_committed_crd_matches_the_models() -> None:
    assert CRD_FILE.read_text() == crd.crd_yaml(), (
        f"{crd.CRD_PATH} is stale: regenerate it with "
        f"`.venv/bin/python -m kubellm.operator.crd > {crd.CRD_PATH}` (or `kubellm-operator crd`)"
    )
    assert yaml.safe_load(CRD_FILE.read_text()) == manifest()


def test_spec_module_exposes_the_crd() -> None:
    assert spec.crd_manifest() == manifest()


# -- structural schema -----------------------------------------------------------------------------


def test_schema_is_structural() -> None:
    for path, node in walk(root_schema()):
        assert not FORBIDDEN & node.keys(), f"{path}: {sorted(FORBIDDEN & node.keys())}"
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        if "additionalProperties" in node:
            assert isinstance(node["additionalProperties"], dict), path
        if node.get("type") == "object" and "properties" not in node and path != ".metadata":
            free = node.get("x-kubernetes-preserve-unknown-fields")
            assert free or "additionalProperties" in node, f"{path}: untyped object"
        if "default" in node:
            assert node["default"] is not None, path
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert not isinstance(node.get(key), int | float) or isinstance(node[key], bool), path


def test_optional_fields_are_not_required_and_not_nullable() -> None:
    schema = root_schema()["properties"]["spec"]
    assert schema["required"] == ["model"]
    assert "nullable" not in schema["properties"]["image"]
    assert schema["properties"]["image"]["type"] == "string"
    assert "required" not in schema["properties"]["engine"]


def test_maps_and_free_form_fields() -> None:
    props = root_schema()["properties"]["spec"]["properties"]
    scheduling = props["scheduling"]["properties"]
    assert scheduling["nodeSelector"]["additionalProperties"] == {"type": "string"}
    assert scheduling["tolerations"]["items"]["x-kubernetes-preserve-unknown-fields"] is True
    assert scheduling["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
    quantity = props["engine"]["properties"]["resources"]["properties"]["requests"]
    assert quantity["additionalProperties"] == {"x-kubernetes-int-or-string": True}


def test_descriptions_come_from_docstrings() -> None:
    props = root_schema()["properties"]["spec"]["properties"]
    assert props["engine"]["properties"]["gpusPerPod"]["description"].startswith("nvidia.com/gpu")
    missing = [
        path
        for path, node in walk(root_schema()["properties"]["spec"])
        if path.count(".") and "[]" not in path and "{}" not in path and not node.get("description")
    ]
    assert missing == []


def test_defaults_in_the_schema_match_the_model() -> None:
    props = root_schema()["properties"]["spec"]["properties"]
    assert props["startupTimeoutSeconds"]["default"] == 900
    assert props["shutdownTimeoutSeconds"]["default"] == 30
    assert props["engine"]["default"] == {}  # so the API server fills in nested defaults
    engine = props["engine"]["properties"]
    defaults = {
        key: sub["default"]
        for key, sub in engine.items()
        if "default" in sub and sub["type"] != "object"
    }
    assert engine["resources"]["default"] == {}
    model = spec.EngineSpec().model_dump(by_alias=True)
    assert defaults == {key: model[key] for key in defaults}
    assert {"replicas", "tensorParallelSize", "gpusPerPod"} <= defaults.keys()


# -- CEL rules -------------------------------------------------------------------------------------


def rules() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    out = []
    for path, node in walk(root_schema()):
        for rule in node.get("x-kubernetes-validations", []):
            out.append((path, node, rule))
    return out


def test_cel_rules_have_messages_and_name_real_fields() -> None:
    found = rules()
    assert len(found) >= 6
    for path, node, rule in found:
        assert len(rule["message"]) > 20, rule  # says what to do, not just "invalid"
        for chain in re.findall(r"self((?:\.[A-Za-z]+)+)(?!\w|\()", rule["rule"]):
            here = node
            for part in chain.strip(".").split("."):
                if path == "." and part == "metadata":
                    break  # metadata.name is always there at the root
                assert part in here.get("properties", {}), f"{path}: {rule['rule']} ({part})"
                here = here["properties"][part]


@pytest.mark.parametrize(
    ("message", "where"),
    [
        (spec.MODEL_MESSAGE, ".spec.model"),
        (spec.TP_MESSAGE, ".spec.engine.tensorParallelSize"),
        (spec.HEAD_MESSAGE, ".spec"),
        (spec.MAX_REPLICAS_MESSAGE, ".spec.engine"),
        (spec.TIMEOUT_MESSAGE, ".spec"),
        (spec.SERVED_NAME_MESSAGE, ".spec.servedModelName"),
    ],
)
def test_cel_rule_present(message: str, where: str) -> None:
    assert any(path == where and rule["message"] == message for path, _, rule in rules())


def test_served_model_name_rule_is_the_pydantic_pattern() -> None:
    field = root_schema()["properties"]["spec"]["properties"]["servedModelName"]
    assert "pattern" not in field  # CEL gives a readable message instead
    assert field["x-kubernetes-validations"][0]["rule"] == (
        f"self.matches('{spec.SERVED_MODEL_NAME_PATTERN}')"
    )
    assert field["maxLength"] <= 256  # bounds the rule's CEL cost


def test_name_rule_at_the_root() -> None:
    (rule,) = root_schema()["x-kubernetes-validations"]
    assert "self.metadata.name.size() <= 45" in rule["rule"]


# -- subresources, columns, names ------------------------------------------------------------------


def test_subresources() -> None:
    sub = version()["subresources"]
    assert sub["status"] == {}
    assert sub["scale"] == {
        "specReplicasPath": ".spec.engine.replicas",
        "statusReplicasPath": ".status.engine.ready",
        "labelSelectorPath": ".status.selector",
    }
    status = root_schema()["properties"]["status"]["properties"]
    assert status["selector"]["type"] == "string"
    assert status["engine"]["properties"]["ready"]["type"] == "integer"


def test_printer_columns() -> None:
    columns = {c["name"]: c for c in version()["additionalPrinterColumns"]}
    assert list(columns) == ["Ready", "Model", "Engines", "URL", "Age"]
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Engines"]["type"] == "integer"
    assert columns["Age"]["type"] == "date"


def test_names_and_scope() -> None:
    body = manifest()
    assert body["metadata"]["name"] == "llmservers.serving.kubellm.io"
    names = body["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "LLMServer",
        "llmservers",
        ["llms"],
    )
    assert "categories" not in names  # not in `kubectl get all`
    assert body["spec"]["scope"] == "Namespaced"
    assert version()["name"] == spec.VERSION and version()["storage"] is True


# -- the pydantic models ---------------------------------------------------------------------------


def test_example_round_trips_through_the_model_and_the_schema() -> None:
    raw = example()
    assert raw["apiVersion"] == spec.API_VERSION
    parsed = spec.LLMServerSpec.model_validate(raw["spec"])
    assert spec.LLMServerSpec.model_validate(parsed.model_dump(by_alias=True)) == parsed
    schema = root_schema()["properties"]["spec"]

    def known(value: Any, node: dict[str, Any], path: str) -> None:
        if isinstance(value, dict) and "properties" in node:
            for key, sub in value.items():
                assert key in node["properties"], f"{path}.{key} would be pruned"
                known(sub, node["properties"][key], f"{path}.{key}")

    known(raw["spec"], schema, "spec")


def test_both_field_names_are_accepted_and_camel_case_is_emitted() -> None:
    by_alias = spec.LLMServerSpec.model_validate(
        {"model": {"path": "/m"}, "servedModelName": "m", "engine": {"gpusPerPod": 0}}
    )
    by_name = spec.LLMServerSpec.model_validate(
        {"model": {"path": "/m"}, "served_model_name": "m", "engine": {"gpus_per_pod": 0}}
    )
    assert by_alias == by_name
    dumped = by_alias.model_dump(by_alias=True, exclude_none=True)
    assert dumped["servedModelName"] == "m" and dumped["engine"]["gpusPerPod"] == 0


def test_quantities_may_be_numbers() -> None:
    parsed = spec.Resources.model_validate({"requests": {"cpu": 4, "memory": "1Gi"}})
    assert parsed.requests == {"cpu": "4", "memory": "1Gi"}
    with pytest.raises(pydantic.ValidationError, match="not a boolean"):
        spec.Resources.model_validate({"requests": {"cpu": True}})


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"model": {}}, spec.MODEL_MESSAGE),
        ({"model": {"path": "/a", "pvc": {"claimName": "c"}}}, spec.MODEL_MESSAGE),
        ({"engine": {"tensorParallelSize": 2}}, "tensor parallelism is not supported yet"),
        ({"engine": {"replicas": 2}, "head": {"replicas": 2}}, spec.HEAD_MESSAGE),
        ({"engine": {"replicas": 9}}, spec.MAX_REPLICAS_MESSAGE),  # default maxReplicas 8
        ({"engine": {"replicas": 3, "maxReplicas": 2}}, spec.MAX_REPLICAS_MESSAGE),
        ({"model": {"huggingFace": {"id": "a/b", "endpoint": "ftp://x"}}}, "should match"),
        ({"startupTimeoutSeconds": 60, "shutdownTimeoutSeconds": 60}, spec.TIMEOUT_MESSAGE),
        ({"servedModelName": "has space"}, "should match pattern"),
        ({"engine": {"replicas": -1}}, "greater than or equal to 0"),
        ({"engine": {"gpus": 1}}, "Extra inputs are not permitted"),
        ({"head": {"apiServersPerPod": 65}}, "less than or equal to 64"),
    ],
)
def test_invalid_specs_are_refused(patch: dict[str, Any], message: str) -> None:
    raw = {"model": {"path": "/models/m"}, **patch}
    with pytest.raises(pydantic.ValidationError) as info:
        spec.LLMServerSpec.model_validate(raw)
    assert message in str(info.value)


def test_head_replicas_may_exceed_one_without_engines() -> None:
    parsed = spec.LLMServerSpec.model_validate(
        {"model": {"path": "/m"}, "engine": {"replicas": 0}, "head": {"replicas": 3}}
    )
    assert parsed.head.replicas == 3


def test_models_are_frozen() -> None:
    parsed = spec.LLMServerSpec.model_validate({"model": {"path": "/m"}})
    with pytest.raises(pydantic.ValidationError):
        parsed.image = "x"  # type: ignore[misc]


def test_status_model_round_trips() -> None:
    status = spec.LLMServerStatus.model_validate(
        {
            "observedGeneration": 2,
            "conditions": [{"type": "Ready", "status": "True", "reason": "AllReady"}],
            "engine": {"ready": 2, "desired": 2},
            "specHash": "abc",
        }
    )
    dumped = status.model_dump(by_alias=True, exclude_none=True)
    assert dumped["engine"] == {"ready": 2, "desired": 2} and dumped["specHash"] == "abc"
    assert dumped["conditions"][0]["type"] == "Ready"
