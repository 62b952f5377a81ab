"""Regenerate README.md's configuration and metrics tables from the code (``python hack/readme_tables.py``).

tests/test_docs.py fails when the tables and the code disagree; this script is
how to make them agree again.
"""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from kubetriage.infra import metrics
from kubetriage.infra.config import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def config_table() -> str:
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = "(empty)" if field.default == "" else field.default
        rows.append(f"| `KUBETRIAGE_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(rows)


def metrics_table() -> str:
    rows = ["| Metric | Type | Labels | Meaning |", "| --- | --- | --- | --- |"]
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            suffix = {"counter": "_total", "info": "_info"}.get(value._type, "")
            labels = ", ".join(value._labelnames) or "-"
            rows.append(f"| `{value._name}{suffix}` | {value._type} | {labels} | {value._documentation} |")
    return "\n".join(rows)


def main() -> None:
    text = README.read_text()
    for marker, table in (("config-table", config_table()), ("metrics-table", metrics_table())):
        text, n = re.subn(rf"(<!-- {marker} -->\n).*?(\n<!-- /{marker} -->)", rf"\g<1>{table}\g<2>", text,
                          flags=re.S)
        if n != 1:
            raise SystemExit(f"README.md has no <!-- {marker} --> ... <!-- /{marker} --> block")
    README.write_text(text)


if __name__ == "__main__":
    main()
