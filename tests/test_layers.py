"""Floors you can name: every product module sits on one floor, and imports only go down.

Bottom to top (README, Architecture):

    0 core      pipeline/{errors,config,logs,metrics,cli_help,identity}.py, schemas/
    1 library   pipeline/storage/, pipeline/model/, pipeline/kafka/ (the Kafka client only)
    2 learning  pipeline/learning/
    3 stream    consumers/, producers/
    4 app       pipeline/app/ (the ``deeper`` command, UI, demo, report; broker/: the local broker
                manager, local S3; maven.py), pipeline/spark/ (the ``deeper backfill`` engine)

A module may import its own floor and the floors below, never above: a library module that
imported a consumer would make the tree lie about the flow (and pull Kafka workers into
``deeper predict``). Inside a floor, today's edges are the allowed ones (:data:`SAME_FLOOR`):
the model uses storage's atomic writes, feature cache and Parquet writer; storage names Kafka
positions (``TopicPartition``) through the client module; claim checks read ``s3://`` through
storage. The two stages never import each other (they only share topics).

Besides the floors: kafka-python is imported only in ``pipeline/kafka/`` (the one seam to the
client library, ``client.py`` for its public names, ``internals.py`` for its private state),
and no product module imports ``tests`` or the development rig (``devrig/``, outside the
installed package).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CORE, LIBRARY, LEARNING, STREAM, APP = range(5)
FLOOR_NAMES = ("core", "library", "learning", "stream", "app")

#: Where each product module lives: the longest matching prefix of its dotted name wins.
FLOORS: dict[str, int] = {
    "schemas": CORE,
    "pipeline": CORE,  # pipeline/__init__.py
    "pipeline.errors": CORE,
    "pipeline.config": CORE,
    "pipeline.logs": CORE,
    "pipeline.metrics": CORE,
    "pipeline.cli_help": CORE,
    "pipeline.identity": CORE,
    "pipeline.storage": LIBRARY,
    "pipeline.model": LIBRARY,
    "pipeline.kafka": LIBRARY,
    "pipeline.learning": LEARNING,
    "consumers": STREAM,
    "producers": STREAM,
    "pipeline.app": APP,
    "pipeline.spark": APP,  # the ``deeper backfill`` engine: shares the app's Maven helper
}

#: Imports inside one floor that are allowed (importer's area -> imported area); anything else
#: on the same floor is a new edge to discuss. The core's modules use each other freely, and so
#: do the app's (the command line wires the backfill, the broker manager, the demo).
SAME_FLOOR: set[tuple[str, str]] = {
    ("pipeline.model", "pipeline.storage"),  # atomic writes, file hashes, feature cache, Parquet rows
    ("pipeline.storage", "pipeline.kafka.client"),  # TopicPartition: the position a row came from
    ("pipeline.kafka", "pipeline.storage"),  # claim checks read s3:// through storage
}

#: The development rig: tests, the fault suite and the bench use it; the product never does.
RIG = ("devrig", "pipeline.app.devrig")
PACKAGES = ("pipeline", "consumers", "producers", "schemas")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _show(path: Path) -> str:
    return str(path.relative_to(REPO)) if REPO in path.parents else str(path)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _is_rig(name: str) -> bool:
    return any(_within(name, rig) for rig in RIG)


def _product_modules() -> dict[str, Path]:
    """Every module of the installed packages, by dotted name (the rig excluded)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = _module_name(path)
            if not _is_rig(name):
                found[name] = path
    return found


def _rig_modules() -> dict[str, Path]:
    roots = [REPO / "devrig", REPO / "pipeline" / "app" / "devrig"]
    return {_module_name(p): p for root in roots if root.is_dir() for p in sorted(root.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Every absolute import in the file, lazy ones and ``TYPE_CHECKING`` ones included;
    ``from pipeline import storage`` counts as ``pipeline.storage``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def _area(name: str) -> str | None:
    """The longest :data:`FLOORS` prefix of ``name`` (None: not a product module)."""
    best = None
    for prefix in FLOORS:
        if _within(name, prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    return best


def _resolve(imported: str, modules: dict[str, Path]) -> str | None:
    """The product module (or package) an import names; ``from x import name`` may name an
    attribute, so fall back to the longest module prefix."""
    parts = imported.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _allowed_same_floor(importer: str, imported: str) -> bool:
    if FLOORS[_area(importer)] in (CORE, APP):
        return True
    return any(_within(importer, a) and _within(imported, b) for a, b in SAME_FLOOR)


def floor_violations(modules: dict[str, Path]) -> list[str]:
    out = []
    for name, path in modules.items():
        mine = FLOORS[_area(name)]
        for target in sorted({_resolve(imported, modules) for imported in _imports(path)} - {None}):
            if target == name or _within(name, target):
                continue  # not ours, itself, or its own package's __init__
            theirs = FLOORS[_area(target)]
            if _area(target) == _area(name) or theirs < mine:
                continue
            if theirs == mine and _allowed_same_floor(name, target):
                continue
            out.append(f"{_show(path)} ({FLOOR_NAMES[mine]}) imports {target} ({FLOOR_NAMES[theirs]})")
    return out


def kafka_python_outside_the_client(modules: dict[str, Path]) -> list[str]:
    return [f"{_show(path)}: {sorted(bad)}" for name, path in modules.items()
            if not _within(name, "pipeline.kafka")
            for bad in [{i for i in _imports(path) if _within(i, "kafka")}] if bad]


def rig_or_tests_imported(modules: dict[str, Path]) -> list[str]:
    return [f"{_show(path)}: {sorted(bad)}" for path in modules.values()
            for bad in [{i for i in _imports(path) if _within(i, "tests") or _is_rig(i)}] if bad]


def test_every_product_module_has_a_floor():
    homeless = [name for name in _product_modules() if _area(name) is None]
    assert not homeless, f"modules on no floor (add them to FLOORS and the README): {homeless}"


def test_imports_only_go_down():
    offenders = floor_violations(_product_modules())
    assert not offenders, "imports going up or sideways:\n" + "\n".join(offenders)


def test_the_stages_do_not_import_each_other():
    modules = _product_modules()
    offenders = [f"{_show(path)}: {sorted(bad)}" for name, path in modules.items()
                 for stage, other in (("consumers", "producers"), ("producers", "consumers")) if _within(name, stage)
                 for bad in [{i for i in _imports(path) if _within(i, other)}] if bad]
    assert not offenders, "a stage imports the other:\n" + "\n".join(offenders)


def test_kafka_python_is_imported_only_in_pipeline_kafka():
    offenders = kafka_python_outside_the_client({**_product_modules(), **_rig_modules()})
    assert not offenders, "kafka-python imported outside pipeline/kafka/ (use pipeline.kafka.client):\n" + \
        "\n".join(offenders)


def test_no_product_module_imports_tests_or_the_rig():
    offenders = rig_or_tests_imported(_product_modules())
    assert not offenders, "product modules import tests or the development rig:\n" + "\n".join(offenders)


def test_the_app_exists_and_wires_the_stages():
    app = [p for n, p in _product_modules().items() if FLOORS[_area(n)] == APP]
    assert app, "pipeline/app/ holds the command line, the demo and the UI"
    assert any(_within(i, s) for p in app for i in _imports(p) for s in ("consumers", "producers"))


@pytest.mark.parametrize("line, found", [
    ("from consumers.worker import StreamWorker", "imports consumers.worker (stream)"),  # library -> stream
    ("from pipeline.learning.scoring import score", "imports pipeline.learning"),  # library -> learning
    ("from pipeline.model.decode import decode_image", "imports pipeline.model"),  # storage -> model
    ("from kafka import TopicPartition", "kafka-python"),
    ("import tests.invariant", "tests"),
    ("from pipeline.app.devrig import photos", "development rig"),
])
def test_the_checks_catch_a_violation(line, found, tmp_path):
    """Each check fails when one import breaks its rule (a test that cannot fail is a defect)."""
    modules = _product_modules()
    victim = tmp_path / "pipeline" / "storage" / "victim.py"
    victim.parent.mkdir(parents=True)
    victim.write_text(f"def f():\n    {line}\n")
    trial = {**modules, "pipeline.storage.victim": victim}
    report = "\n".join(floor_violations(trial) + kafka_python_outside_the_client(trial) + rig_or_tests_imported(trial))
    assert "victim.py" in report, f"{line!r} went unnoticed"
    if found in ("kafka-python", "tests", "development rig"):
        return
    assert found in report
