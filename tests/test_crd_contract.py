"""The committed CRD YAML and the pydantic models are one contract (no cluster needed)."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from devharness import crdgen
from kubetriage.api import models
from tests.modelfill import full

CRDS = Path(__file__).resolve().parent.parent / "crds"


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CRDS / name).read_text())


def test_committed_crds_are_generated_from_models() -> None:
    for name, content in crdgen.files().items():
        assert (CRDS / name).read_text() == content, f"{name} is stale: run python -m devharness.crdgen"


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        inner = _submodel(arg)
        if inner:
            return inner
    return None


def _compare(model: type[BaseModel], schema: dict[str, Any], path: str) -> list[str]:
    """Every model field is in the schema, and every schema property is a model field."""
    problems = []
    wire = {info.alias or name: info for name, info in model.model_fields.items()}
    props = schema.get("properties", {})
    for missing in sorted(set(wire) - set(props)):
        problems.append(f"{path}.{missing}: in {model.__name__} but not in the CRD schema")
    for extra in sorted(set(props) - set(wire)):
        problems.append(f"{path}.{extra}: in the CRD schema but not in {model.__name__}")
    required = {a for a, info in wire.items() if info.is_required()}
    if set(schema.get("required", [])) != required:
        problems.append(f"{path}: required {sorted(schema.get('required', []))} != model {sorted(required)}")
    for alias, info in wire.items():
        sub = _submodel(info.annotation)
        prop = props.get(alias)
        if sub and prop:
            if prop.get("type") == "array":
                prop = prop["items"]
            problems += _compare(sub, prop, f"{path}.{alias}")
    return problems


@pytest.mark.parametrize(
    ("file", "spec", "status"),
    [
        ("kubetriage.io_triagejobs.yaml", models.TriageJobSpec, models.TriageJobStatus),
        ("kubetriage.io_triagepools.yaml", models.TriagePoolSpec, models.TriagePoolStatus),
    ],
)
def test_every_field_both_ways(file: str, spec: type[BaseModel], status: type[BaseModel]) -> None:
    schema = _load(file)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    problems = _compare(spec, schema["spec"], "spec") + _compare(status, schema["status"], "status")
    assert problems == []


def test_crd_names_and_columns() -> None:
    crd = _load("kubetriage.io_triagejobs.yaml")
    assert crd["spec"]["names"]["shortNames"] == ["tj"]
    assert "kubetriage" in crd["spec"]["names"]["categories"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"].upper() for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["SOURCE", "PRIORITY", "PHASE", "VERDICT", "CONFIDENCE", "AGE"]
    assert _load("kubetriage.io_triagepools.yaml")["spec"]["names"]["shortNames"] == ["tpool"]


def test_schema_keeps_limits_from_models() -> None:
    spec = _load("kubetriage.io_triagejobs.yaml")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    alert = spec["properties"]["spec"]["properties"]["alert"]
    assert alert["properties"]["labels"]["maxProperties"] == models.MAX_LABELS
    assert alert["properties"]["name"]["maxLength"] == models.MAX_NAME
    rules = [v["rule"] for v in spec["properties"]["spec"]["x-kubernetes-validations"]]
    assert any("self.source.type != 'alert'" in r for r in rules)


def test_full_status_round_trips_through_the_model() -> None:
    status = full(models.TriageJobStatus)
    assert models.TriageJobStatus.model_validate(status.wire()) == status


def test_converter_refuses_what_it_cannot_express() -> None:
    class Bad(BaseModel):
        x: int | str

    with pytest.raises(ValueError, match="union"):
        crdgen.openapi_schema(Bad)


def test_verdict_discard_follows_classification() -> None:
    assert models.verdict_from_classification("false_positive", "r", 0.9, "rules").discard is True
    assert models.verdict_from_classification("valid", "r", 0.9, "rules").discard is False
    assert models.verdict_from_classification("inconclusive", "r", 0.1, "rules").discard is False


def test_generated_crds_have_no_yaml_anchors() -> None:
    """Shared sub-schemas are written out in full: anchors/aliases confuse the tools that read CRDs."""
    for name, content in crdgen.files().items():
        assert "&id0" not in content and "*id0" not in content, name
