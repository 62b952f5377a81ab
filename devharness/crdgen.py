"""Generate the CRD manifests in ``crds/`` from the pydantic models.

Run ``python -m devharness.crdgen`` after changing ``models.py``;
``tests/test_crd_contract.py`` fails while the committed YAML differs from
what this prints, so the two can never drift.

Pydantic emits JSON Schema 2020-12; the API server wants a *structural*
OpenAPI v3 schema: no ``$ref``, no ``anyOf`` with ``null``, boolean
``exclusiveMinimum``. The conversion is small and total: an unknown keyword
raises instead of being silently dropped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubetriage.api import models

_PASS = {
    "type", "description", "enum", "format", "pattern", "minLength", "maxLength",
    "minimum", "maximum", "minItems", "maxItems", "minProperties", "maxProperties",
    "default", "required",
}
_DROP = {"title"}


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _convert(merged, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {node}")
        rest = {k: v for k, v in node.items() if k != "anyOf" and k != "default"}
        if node.get("default") is not None:
            rest["default"] = node["default"]
        return _convert({**options[0], **rest}, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out["properties"] = {name: _convert(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out["items"] = _convert(value, defs)
        elif key == "additionalProperties":
            if value is False:
                continue  # structural schemas prune unknown fields anyway
            out["additionalProperties"] = _convert(value, defs)
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key in _PASS:
            out[key] = value
        else:
            raise ValueError(f"schema keyword {key!r} has no structural equivalent (in {node})")
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            out[key] = value
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one model, by its wire (camelCase) names."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _convert(raw, defs)


def _crd(
    *,
    kind: str,
    plural: str,
    short_names: list[str],
    spec: type[BaseModel],
    status: type[BaseModel],
    columns: list[dict[str, Any]],
    description: str,
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{models.GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetriage", "app.kubernetes.io/part-of": "kubetriage"},
        },
        "spec": {
            "group": models.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["kubetriage"],
            },
            "versions": [
                {
                    "name": models.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": openapi_schema(spec),
                                "status": openapi_schema(status),
                            },
                        }
                    },
                }
            ],
        },
    }


def triagejob_crd() -> dict[str, Any]:
    return _crd(
        kind="TriageJob",
        plural="triagejobs",
        short_names=["tj"],
        spec=models.TriageJobSpec,
        status=models.TriageJobStatus,
        description="A monitoring alert or failed script run to be triaged as false positive or valid.",
        columns=[
            {"name": "Source", "type": "string", "jsonPath": ".spec.source.type"},
            {"name": "Priority", "type": "string", "jsonPath": ".status.priorityClassName"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Verdict", "type": "string", "jsonPath": ".status.verdict.classification"},
            {"name": "Confidence", "type": "number", "jsonPath": ".status.verdict.confidence"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            {"name": "Reason", "type": "string", "jsonPath": ".status.verdict.reason", "priority": 1},
            {"name": "Pool", "type": "string", "jsonPath": ".status.pool", "priority": 1},
        ],
    )


def triagepool_crd() -> dict[str, Any]:
    return _crd(
        kind="TriagePool",
        plural="triagepools",
        short_names=["tpool"],
        spec=models.TriagePoolSpec,
        status=models.TriagePoolStatus,
        description="Worker capacity for TriageJobs: one Deployment of analyzer workers, scaled on backlog.",
        columns=[
            {"name": "Priority", "type": "string", "jsonPath": ".spec.priorityClassName"},
            {"name": "Min", "type": "integer", "jsonPath": ".spec.replicas.min"},
            {"name": "Max", "type": "integer", "jsonPath": ".spec.replicas.max"},
            {"name": "Concurrency", "type": "integer", "jsonPath": ".spec.concurrency"},
            {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
            {"name": "Backlog", "type": "integer", "jsonPath": ".status.backlog"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def triagerule_crd() -> dict[str, Any]:
    return _crd(
        kind="TriageRule",
        plural="triagerules",
        short_names=["trule"],
        spec=models.TriageRuleSpec,
        status=models.TriageRuleStatus,
        description="A team's own triage rule: a classification, or a guard that a human must decide, "
        "for the jobs it matches in its namespace.",
        columns=[
            {"name": "Source", "type": "string", "jsonPath": ".spec.match.sourceType"},
            {"name": "Never-Discard", "type": "boolean", "jsonPath": ".spec.action.neverDiscard"},
            {"name": "Classification", "type": "string", "jsonPath": ".spec.action.classification"},
            {"name": "Confidence", "type": "number", "jsonPath": ".spec.action.confidence"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            {"name": "Description", "type": "string", "jsonPath": ".spec.description", "priority": 1},
        ],
    )


def triagepolicy_crd() -> dict[str, Any]:
    return _crd(
        kind="TriagePolicy",
        plural="triagepolicies",
        short_names=["tpol"],
        spec=models.TriagePolicySpec,
        status=models.TriagePolicyStatus,
        description="What the operator does with the verdicts of the jobs it matches in its namespace: "
        "Alertmanager silences and notifications, in shadow mode until enforced.",
        columns=[
            {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
            {"name": "Min-Confidence", "type": "number", "jsonPath": ".spec.minConfidence"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            {"name": "Description", "type": "string", "jsonPath": ".spec.description", "priority": 1},
        ],
    )


HEADER = "# Generated by `python -m devharness.crdgen` from operator/kubetriage/api/models.py. Do not edit by hand.\n"


class _NoAliases(yaml.SafeDumper):
    """Shared sub-schemas (the same ``required`` list twice) must not become YAML anchors: tools that read
    CRDs (kubectl diff, helm, some GitOps controllers) handle them badly, and a reader cannot follow them."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(crd: dict[str, Any]) -> str:
    return HEADER + yaml.dump(crd, Dumper=_NoAliases, sort_keys=False, width=120)


def files() -> dict[str, str]:
    """File name -> content for every generated manifest."""
    return {
        "kubetriage.io_triagejobs.yaml": render(triagejob_crd()),
        "kubetriage.io_triagepools.yaml": render(triagepool_crd()),
        "kubetriage.io_triagerules.yaml": render(triagerule_crd()),
        "kubetriage.io_triagepolicies.yaml": render(triagepolicy_crd()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="crds", help="folder to write into (default: crds)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the folder differs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    stale = []
    for name, content in files().items():
        path = out / name
        if args.check:
            if not path.exists() or path.read_text() != content:
                stale.append(str(path))
        else:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    if stale:
        print("out of date (run python -m devharness.crdgen):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
