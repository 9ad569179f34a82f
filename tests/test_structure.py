"""The architecture as a test: which room may import which (pipeline/__init__.py states the rules),
data_prep independent of pipeline and used only through its package, no import cycle (imports inside
functions count), no module over 400 lines."""
import ast
from pathlib import Path

from tests.helpers.runs import ROOT

SHARED = {"config", "cli"}  # any room may use these top-level modules of pipeline
MAY_IMPORT = {
    "data": {"data_prep"},
    "models": set(),
    "objectives": set(),
    "evaluation": set(),
    "training": {"data_prep", "data", "models", "objectives", "evaluation"},
    "inference": {"data_prep", "data", "models", "objectives", "evaluation", "training"},
    "comparison": {"data_prep", "data", "models", "objectives", "evaluation", "training", "inference"},
    "cluster": {"data_prep"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in ("pipeline", "data_prep"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path) -> list[str]:
    """Every module this one imports, at any depth of the file (function-level imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")[: -node.level + (1 if path.name == "__init__.py" else 0) or None]
                if node.module:
                    found.append(".".join(base + [node.module]))
                else:  # from . import card: the submodule
                    found += [".".join(base + [a.name]) for a in node.names]
            else:
                found.append(node.module)
    return [m for m in found if m and m.split(".")[0] in ("pipeline", "data_prep")]


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "data_prep":
        return "data_prep"
    return parts[1] if len(parts) > 1 else None


def test_rooms_import_only_what_they_may():
    wrong = []
    for name, path in _modules().items():
        room = _room(name)
        for target in _imports(name, path):
            there = _room(target)
            if room == "data_prep":
                ok = there == "data_prep"
            elif there == "data_prep":  # data_prep's published contract only: its package, not its modules
                ok = target == "data_prep" and (room in MAY_IMPORT and "data_prep" in MAY_IMPORT[room]
                                                or room not in MAY_IMPORT)
            elif room not in MAY_IMPORT:  # the top level: config, cli and the thin entry modules
                ok = True
            else:
                ok = there in SHARED or there == room or there in MAY_IMPORT[room]
            if not ok:
                wrong.append(f"{name} -> {target}")
    assert not wrong, wrong


def test_no_import_cycle_and_no_long_module():
    modules = _modules()
    graph = {name: {t for t in _imports(name, path) if t in modules and t != name} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(trail[trail.index(nxt):] + [nxt])}")
            if not state.get(nxt):
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if not state.get(name):
            visit(name, [name])
    long = {n: len(p.read_text().splitlines()) for n, p in modules.items() if len(p.read_text().splitlines()) > 400}
    assert not long, long
