"""The package's layers and their import rule, read from the source (AST), not from a running import.

    api          pydantic models, the worker contract, keys, fingerprint, summary, time: no I/O
    infra        Kubernetes client, Redis queue, metrics, SQL sinks, settings
    analyzers    pure analysis engines
    controller   kopf handlers and everything only the operator does
    worker       the worker process
    ingest       the HTTP ingest server and the job builders it shares with the CLI
    cli          the user commands
    main         the entry point: the only module that may import controller and worker, and only lazily

Also: every ``kubetriage.*`` import resolves to a file by its name under one of the two source roots
(``operator/`` and ``analyzers/``), nothing in the package imports the dev harness, tests or bench, and
no module but ``kubetriage.infra.queue`` sends Redis a command (the queue owns every key).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = (REPO / "operator", REPO / "analyzers")

ALLOWED: dict[str, set[str]] = {
    "api": {"api"},
    "infra": {"api", "infra"},
    "analyzers": {"api", "analyzers"},
    "controller": {"api", "infra", "controller", "ingest"},  # the operator process hosts the ingest server
    "worker": {"api", "infra", "analyzers", "worker"},
    "ingest": {"api", "infra", "ingest"},
    "cli": {"api", "infra", "ingest", "cli", "analyzers"},  # `rule test` replays rules with the analyzers
    "main": {"api", "infra", "cli", "controller", "worker", "main"},
}
LAZY_ONLY = {"main": {"controller", "worker"}}
# I/O libraries the api layer must not touch (it is imported by analyzers, which run on plain data).
IO_MODULES = {"redis", "httpx", "aiohttp", "psycopg", "sqlite3", "kopf", "socket", "subprocess", "urllib.request"}
FOREIGN = ("devharness", "tests", "bench")


@dataclass(frozen=True)
class Import:
    module: str
    line: int
    lazy: bool  # inside a function: imported when the command runs, not when the module loads


def module_name(path: Path) -> str:
    for root in ROOTS:
        if path.is_relative_to(root):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join(parts)
    raise AssertionError(path)


def layer_of(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "kubetriage", module
    if len(parts) == 1 or parts[1] in ("main", "__main__"):
        return "main"
    return parts[1]


def package_files() -> list[Path]:
    return sorted(p for root in ROOTS for p in (root / "kubetriage").rglob("*.py"))


def imports_of(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend(Import(a.name, child.lineno, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{path}:{child.lineno}: relative import; use the absolute name"
                base = child.module or ""
                # `from kubetriage.infra import metrics` imports the module kubetriage.infra.metrics
                found.extend(Import(f"{base}.{a.name}" if resolve(f"{base}.{a.name}") else base, child.lineno, lazy)
                             for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def resolve(module: str) -> Path | None:
    """The file a module name points at under the source roots: the path is the import name."""
    rel = Path(*module.split("."))
    for root in ROOTS:
        for candidate in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
            if candidate.is_file():
                return candidate
        if (root / rel).is_dir() and module == "kubetriage":
            return root / rel
    return None


def test_the_layers_exist_as_folders() -> None:
    layers = {p.name for p in (REPO / "operator" / "kubetriage").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert layers == {"api", "infra", "controller", "worker", "ingest", "cli"}
    assert (REPO / "analyzers" / "kubetriage" / "analyzers" / "__init__.py").is_file()
    assert not (REPO / "operator" / "kubetriage" / "__init__.py").exists(), "kubetriage spans two roots"


@pytest.mark.parametrize("path", package_files(), ids=lambda p: module_name(p))
def test_imports_follow_the_layer_rule(path: Path) -> None:
    layer = layer_of(module_name(path))
    problems = []
    for imp in imports_of(path):
        top = imp.module.split(".")[0]
        if top in FOREIGN:
            problems.append(f"line {imp.line}: imports {imp.module}, which is not part of the product")
        if layer == "api" and (imp.module in IO_MODULES or top in IO_MODULES):
            problems.append(f"line {imp.line}: the api layer does no I/O, but imports {imp.module}")
        if top != "kubetriage":
            continue
        assert resolve(imp.module), f"{path}:{imp.line}: {imp.module} does not resolve to a file by its name"
        target = layer_of(imp.module)
        if target not in ALLOWED[layer]:
            problems.append(f"line {imp.line}: {layer} may not import {target} ({imp.module})")
        elif target in LAZY_ONLY.get(layer, set()) and not imp.lazy:
            problems.append(f"line {imp.line}: {imp.module} must be imported inside the command that needs it")
    assert not problems, f"{module_name(path)}:\n  " + "\n  ".join(problems)


def test_the_rule_catches_a_forbidden_import(tmp_path: Path) -> None:
    """The checker itself: a worker module importing the controller is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from kubetriage.controller import admission\n\ndef f():\n    import kubetriage.worker.runner\n")
    found = imports_of(bad)
    assert [(i.module, i.lazy) for i in found] == [("kubetriage.controller.admission", False),
                                                  ("kubetriage.worker.runner", True)]
    assert "controller" not in ALLOWED["worker"] and "controller" not in ALLOWED["ingest"]
    assert "controller" not in ALLOWED["cli"] and ALLOWED["analyzers"] == {"api", "analyzers"}


def test_only_the_entry_point_imports_controller_and_worker() -> None:
    importers = {module_name(p) for p in package_files()
                 if any(i.module.startswith(("kubetriage.controller", "kubetriage.worker")) for i in imports_of(p))
                 and layer_of(module_name(p)) not in ("controller", "worker")}
    assert importers == {"kubetriage.main"}


# ---------------------------------------------------------------- Redis: one owner of every key

REDIS_OWNER = "kubetriage.infra.queue"
# What a holder of the client may still do with it: shut it down and check it is alive; no key is touched.
CLIENT_LIFECYCLE = {"aclose", "close", "ping"}


def redis_command_calls(path: Path) -> list[str]:
    """Calls of a Redis command on a client, as ``line: expression``.

    A client is anything named ``redis`` or ``_redis`` (the Runtime field, the Worker attribute and the
    Queue's own), anything annotated as ``Redis``, and anything assigned from ``from_url(...)``, ``Redis(...)``
    or ``.pipeline(...)``; module names bound by an import (``import redis.asyncio as aioredis``) are not.
    """
    tree = ast.parse(path.read_text(), str(path))
    clients = {"redis", "_redis"}
    modules: set[str] = set()

    def name_of(node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            return node.attr
        return None

    def makes_client(value: ast.AST | None) -> bool:
        return value is not None and any(
            isinstance(n, ast.Call) and name_of(n.func) in ("from_url", "Redis", "pipeline") for n in ast.walk(value))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign) and makes_client(node.value):
            clients.update(n for t in node.targets if (n := name_of(t)))
        elif isinstance(node, ast.AnnAssign) and ("Redis" in ast.unparse(node.annotation) or makes_client(node.value)):
            clients.update(n for n in [name_of(node.target)] if n)
        elif isinstance(node, ast.arg) and node.annotation is not None and "Redis" in ast.unparse(node.annotation):
            clients.add(node.arg)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        receiver = node.func.value
        if node.func.attr in CLIENT_LIFECYCLE or (isinstance(receiver, ast.Name) and receiver.id in modules):
            continue
        if name_of(receiver) in clients:
            found.append((node.lineno, f"{node.lineno}: {ast.unparse(node.func)}"))
    return [text for _, text in sorted(found)]


@pytest.mark.parametrize("path", [p for p in package_files() if module_name(p) != REDIS_OWNER],
                         ids=lambda p: module_name(p))
def test_only_the_queue_sends_redis_commands(path: Path) -> None:
    calls = redis_command_calls(path)
    assert not calls, (f"{module_name(path)} talks to Redis directly; add a method to {REDIS_OWNER}.Queue, "
                       "which owns every key:\n  " + "\n  ".join(calls))


def test_the_redis_rule_catches_raw_commands(tmp_path: Path) -> None:
    """The checker itself: commands on a Runtime's client, a fresh client, a pipeline or the queue's own
    client are reported; closing and pinging a client, and using the redis module, are not."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import redis.asyncio as aioredis\n"
        "async def f(rt, url, c: aioredis.Redis):\n"
        "    await rt.redis.sadd('k', 'v')\n"
        "    client = aioredis.from_url(url)\n"
        "    await client.lrange('k', 0, -1)\n"
        "    pipe = c.pipeline()\n"
        "    pipe.set('k', 'v')\n"
        "    await rt.queue._redis.get('k')\n"
        "    await rt.redis.ping()\n"
        "    await client.aclose()\n"
        "    raise aioredis.RedisError('x')\n"
    )
    assert [c.split(":")[0] for c in redis_command_calls(bad)] == ["3", "5", "6", "7", "8"]
    owner = resolve(REDIS_OWNER)
    assert owner is not None and redis_command_calls(owner), "the checker must see the queue's own commands"
