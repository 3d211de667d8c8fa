"""docs/ARCHITECTURE.md stays true: every module of pretrain/ and model/ is named, every file it names exists,
and what it says of imports holds (no import cycle among our modules, imports inside functions included)."""

from __future__ import annotations

import re

from conftest import ROOT

from pretrain.plan.ship_estimates import file_imports

DOC = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
FILES = sorted(p for d in ("pretrain", "model") for p in (ROOT / d).rglob("*.py"))


def _module(path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


MODULES = {_module(p): p for p in FILES}


def _imports(name: str) -> set[str]:
    """Our modules that `name` imports anywhere in its file (module level or inside functions)."""
    return {_module(ROOT / f) for f in file_imports(str(MODULES[name].relative_to(ROOT)))}


def test_architecture_names_every_module_and_only_files_that_exist() -> None:
    unnamed = [str(p.relative_to(ROOT)) for p in FILES
               if p.name != "__init__.py" and not re.search(rf"(?<![\w/]){re.escape(p.name)}\b", DOC)
               and f"{p.parent.name}/{p.name}" not in DOC]
    assert not unnamed, f"docs/ARCHITECTURE.md does not name {unnamed}"
    tracked = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if ".venv" not in p.parts]
    missing = [n for n in set(re.findall(r"[\w/]+\.py\b", DOC)) if not any(t.endswith(n) for t in tracked)]
    assert not missing, f"docs/ARCHITECTURE.md names files that do not exist: {missing}"


def test_no_import_cycle_among_our_modules() -> None:
    graph = {m: _imports(m) for m in MODULES}
    assert graph["pretrain.plan.launch"] and not any(t.startswith("pretrain") for t in graph["model.gpt"])
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            assert state.get(t) != 1, f"import cycle: {' -> '.join([*path[path.index(t):], t])}"
            if t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
