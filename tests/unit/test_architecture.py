"""The package's import graph, built from the code: printed by subpackage, no cycle, every arrow allowed.

Every ``import`` of a worker module counts, also one inside a function (a deferred import is still a
dependency); only ``if TYPE_CHECKING:`` blocks are left out. Run with ``-s`` to see the graph.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "worker"

#: Each module's role, by its name (first match wins).
ROLES = [
    ("worker.dev", "dev"), ("worker.sandbox", "dev"), ("worker.demo", "dev"), ("worker.devstack", "dev"),
    ("worker.ops", "ops"), ("worker.__main__", "ops"),
    ("worker.broker", "broker"),
    ("worker.delivery", "delivery"),
    ("worker.metrics", "metrics"),
    ("worker.limits", "limits"),
    ("worker.retries", "retries"),
    ("worker.vendors", "vendors"),
    ("worker.producer", "producer"), ("worker.aio", "producer"), ("worker.oncommit", "producer"),
    ("worker.testing", "producer"),
    ("worker.errors", "core"), ("worker.settings", "core"), ("worker.redisconf", "core"),
    ("worker.events", "core"), ("worker.scrub", "core"), ("worker.keys", "core"), ("worker.envelope", "core"),
    ("worker.clients", "core"), ("worker.http11", "core"), ("worker.slots", "core"), ("worker.scripts", "core"),
    ("worker.observability", "core"),
    ("worker", "producer"),  # the package itself: the producer API
]

#: What each role may import besides itself. The arrows run producer -> vendors -> core and
#: broker -> delivery -> {vendors, limits, retries, metrics} -> core; ops and dev tooling sit on top, and
#: nothing of the product imports dev tooling.
ALLOWED = {
    "core": set(),
    "vendors": {"core"},
    "producer": {"vendors", "core"},
    "limits": {"core"},
    "retries": {"core"},
    "metrics": {"vendors", "core"},
    "delivery": {"limits", "retries", "metrics", "vendors", "core"},
    "broker": {"delivery", "limits", "retries", "metrics", "vendors", "core"},
    "ops": {"producer", "broker", "delivery", "limits", "retries", "metrics", "vendors", "core"},
    "dev": {"ops", "producer", "broker", "delivery", "limits", "retries", "metrics", "vendors", "core"},
}


def role(module: str) -> str:
    for prefix, name in ROLES:
        if module == prefix or module.startswith(prefix + "."):
            return name
    raise AssertionError(f"{module} has no role in ROLES: give it one")


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The worker modules ``module`` imports (the longest known name of each import)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "worker":
                    found.add(resolve(alias.name) or alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "worker":
                return
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else (resolve(target) or target))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(module)
    return found


def third_party(path: Path) -> set[str]:
    """The absolute imports of the file at ``path``, outside ``if TYPE_CHECKING:`` blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module or "")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def test_every_module_has_a_role_and_every_arrow_is_allowed():
    g = graph()
    by_role: dict[tuple[str, str], set[str]] = defaultdict(set)
    wrong = []
    for module, targets in sorted(g.items()):
        for target in sorted(targets):
            a, b = role(module), role(target)
            if a != b:
                by_role[(a, b)].add(f"{module} -> {target}")
            if b != a and b not in ALLOWED[a]:
                wrong.append(f"{module} ({a}) -> {target} ({b})")
    print("\nimports between roles:")
    for (a, b), arrows in sorted(by_role.items()):
        print(f"  {a:9} -> {b:9} {len(arrows):3} import(s)")
    assert not wrong, "imports against the allowed direction:\n" + "\n".join(wrong)


def test_no_import_cycle():
    g = graph()
    cycles, state, stack = [], {}, []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt in g and nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            walk(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_nothing_of_the_product_imports_dev_tooling():
    g = graph()
    wrong = [f"{m} -> {t}" for m, ts in g.items() for t in ts if role(t) == "dev" and role(m) != "dev"]
    assert not wrong, wrong


def test_the_checks_see_a_deferred_upward_import(tmp_path):
    """The graph counts an import inside a function: a deferred import is no way around the rules."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from ..broker import tasks\n")
    assert imports("worker.delivery.m", path, {"worker.broker.tasks", "worker.broker"}) == {"worker.broker.tasks"}
    assert "broker" not in ALLOWED[role("worker.delivery.m")]


@pytest.mark.parametrize("layer", ["core", "limits", "retries", "delivery", "vendors", "producer", "metrics"])
def test_lower_layers_import_no_celery(layer):
    """Celery and kombu are the broker's: no module below it imports them (the producer's message is built
    without Celery: worker.envelope)."""
    offenders = []
    for module, path in modules().items():
        if role(module) != layer:
            continue
        for name in third_party(path):
            if name.split(".")[0] in {"celery", "kombu", "billiard"}:
                offenders.append(f"{module}: {name}")
    assert not offenders, offenders


def test_key_names_shared_with_kombu_are_kombus():
    """worker.keys names kombu's record of held messages without importing kombu: the names must match."""
    from kombu.transport import redis as kombu_redis

    from worker.keys import UNACKED, UNACKED_INDEX

    assert (UNACKED, UNACKED_INDEX) == (kombu_redis.Channel.unacked_key, kombu_redis.Channel.unacked_index_key)


def test_the_docs_architecture_page_matches_the_tree():
    """docs/architecture.md's package block names every module of every subpackage (on the subpackage's line)
    and every top-level module; a module added or moved without the page fails here."""
    page = (ROOT.parent / "docs" / "architecture.md").read_text()
    block = page.split("## The package", 1)[1].split("```", 2)[1]
    lines = [line for line in block.splitlines() if line.strip()]
    missing = []
    for pkg in sorted(p for p in ROOT.iterdir() if (p / "__init__.py").exists()):
        line = next((x for x in lines if x.startswith(f"worker/{pkg.name}/")), None)
        if line is None:
            missing.append(f"worker/{pkg.name}/ has no line")
            continue
        if pkg.name == "sandbox":
            continue
        for mod in sorted(m.stem for m in pkg.glob("*.py") if m.stem != "__init__"):
            if not re.search(rf"\b{mod}\b", line):
                missing.append(f"worker/{pkg.name}/{mod}.py not on its line")
    top = [line for line in lines if line.startswith("worker/ ") or line.startswith("worker/__init__")]
    for mod in sorted(m.stem for m in ROOT.glob("*.py") if m.stem != "__init__"):
        if not any(re.search(rf"\b{re.escape(mod)}\b", line) for line in top):
            missing.append(f"worker/{mod}.py not on a worker/ line")
    assert not missing, missing
