"""README.md stays true: every setting and metric is documented, and nothing documented is gone."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from kubetriage.infra import metrics
from kubetriage.infra.config import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    documented = set(re.findall(r"^\| `(KUBETRIAGE_[A-Z0-9_]+)` \|", README, re.M))
    actual = {f"KUBETRIAGE_{name.upper()}" for name in Settings.model_fields}
    assert documented == actual


def test_every_metric_is_in_the_metrics_table() -> None:
    documented = set(re.findall(r"^\| `(kubetriage_[a-z0-9_]+)` \|", README, re.M))
    actual = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            suffix = {"counter": "_total", "info": "_info"}.get(value._type, "")
            actual.add(value._name + suffix)
    assert documented == actual


def test_readme_names_the_two_commands_and_pinned_versions() -> None:
    assert "make demo" in README and "make test" in README
    script = (Path(__file__).resolve().parent.parent / "hack" / "control-plane.sh").read_text()
    k8s = re.search(r'K8S_VERSION="\$\{KUBETRIAGE_K8S_VERSION:-(v[0-9.]+)\}"', script).group(1)
    etcd = re.search(r'ETCD_VERSION="\$\{KUBETRIAGE_ETCD_VERSION:-(v[0-9.]+)\}"', script).group(1)
    assert f"**{k8s}**" in README and f"**{etcd}**" in README


def test_bad_setting_names_the_variable() -> None:
    import pytest

    with pytest.raises(SystemExit, match="KUBETRIAGE_LEASE_SECONDS"):
        Settings.from_env({"KUBETRIAGE_LEASE_SECONDS": "soon"})
