"""Imports go one way: the app wires the stages, the stages use the library, never back.

    app (pipeline.app: the ``deeper`` command, demo, UI, the local broker; pipeline.spark, the
         ``deeper backfill`` engine, which shares the app's Maven helper)
      -> stages (consumers, producers)
        -> library (the rest of pipeline, schemas)

A library module that imported a consumer or a producer would make the tree lie about the flow
(and pull Kafka workers into ``deeper predict``); a stage importing another stage would couple
two ends of the pipeline that only share topics.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ("consumers", "producers")


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _top(name: str) -> str:
    return name.split(".")[0]


#: Engine runners on the app's floor: they may use the app's helpers (pipeline.app.maven).
APP = (REPO / "pipeline" / "app", REPO / "pipeline" / "spark")


def _is_app(path: Path) -> bool:
    return any(folder in path.parents for folder in APP)


def test_the_library_imports_no_stage_and_no_app():
    offenders = []
    for package in ("pipeline", "schemas"):
        for path in _modules(package):
            if _is_app(path):
                continue
            bad = {name for name in _imports(path) if _top(name) in STAGES or name.startswith("pipeline.app")}
            if bad:
                offenders.append(f"{path.relative_to(REPO)}: {sorted(bad)}")
    assert not offenders, "library modules import stages or the app:\n" + "\n".join(offenders)


def test_stages_import_only_the_library():
    offenders = []
    for stage in STAGES:
        for path in _modules(stage):
            other = {name for name in _imports(path)
                     if (_top(name) in STAGES and _top(name) != stage) or name.startswith("pipeline.app")}
            if other:
                offenders.append(f"{path.relative_to(REPO)}: {sorted(other)}")
    assert not offenders, "stages import other stages or the app:\n" + "\n".join(offenders)


def test_the_app_exists_and_wires_the_stages():
    app = [p for p in _modules("pipeline") if _is_app(p)]
    assert app, "pipeline/app/ holds the command line, the demo and the UI"
    assert any(_top(name) in STAGES for p in app for name in _imports(p))
