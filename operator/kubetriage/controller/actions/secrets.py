"""Secrets TriagePolicies name, read from files the chart mounts into the operator.

The operator has no RBAC on Secrets (the README says so and tests/test_chart.py proves it), so a webhook's
signing key, a Slack URL or an Alertmanager token reaches it only as a file: the chart's ``actions.secrets``
mounts each listed Secret at ``<actions_secrets_dir>/<secret name>/<key>``, and says which namespaces'
policies may use it (``KUBETRIAGE_ACTIONS_SECRET_NAMESPACES``). A policy in another namespace is refused,
so one team cannot sign with, or post to, another team's endpoint. Files are read at each use: the kubelet
updates a mounted Secret in place when it is rotated.
"""

from __future__ import annotations

from pathlib import Path

from kubetriage.api.models import MountedSecretRef
from kubetriage.infra.config import Settings

MAX_SECRET_BYTES = 64 * 1024


class SecretUnavailable(Exception):
    """The named Secret key cannot be used by this policy; the message says what to do."""


def problem(settings: Settings, namespace: str, ref: MountedSecretRef) -> str | None:
    """Why ``ref`` cannot be used by a policy of ``namespace`` (None: it can)."""
    allowed = settings.secret_namespaces.get(ref.name)
    if allowed is None:
        return (f"Secret {ref.name} is not mounted into the operator: list it in the chart's actions.secrets "
                f"(with namespaces: [{namespace}])")
    if namespace not in allowed and "*" not in allowed:
        return f"Secret {ref.name} may not be used by TriagePolicies of namespace {namespace} (actions.secrets)"
    path = Path(settings.actions_secrets_dir) / ref.name / ref.key
    if not path.is_file():
        return f"Secret {ref.name} has no key {ref.key} mounted at {path}"
    return None


def read(settings: Settings, namespace: str, ref: MountedSecretRef) -> str:
    """The key's value (trailing newline stripped); ``SecretUnavailable`` saying why not."""
    why = problem(settings, namespace, ref)
    if why is not None:
        raise SecretUnavailable(why)
    path = Path(settings.actions_secrets_dir) / ref.name / ref.key
    data = path.read_bytes()[:MAX_SECRET_BYTES]
    return data.decode(errors="replace").rstrip("\r\n")
