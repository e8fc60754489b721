"""One real SparkSession (local[2], Iceberg's JDBC catalog on SQLite) for every Spark test.

Starting Spark costs 5-15 s and its Python workers keep the loaded network between tasks, so
the whole test session shares one: its catalog and warehouse are fixed when it starts, so every
Spark test points ``DEEPER_DATA_DIR`` at :func:`spark_env`'s folder and uses tables of its own.

Its fixtures are registered in ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest


MODEL = "efficientnet_lite0"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"  # not from conftest: it imports this module


@dataclass
class SparkEnv:
    spark: object
    data_dir: Path
    cache_dir: Path
    catalog: str = "deeper"

    def settings(self):
        from pipeline.config import Settings

        return Settings.from_env()


@pytest.fixture(scope="session")
def _spark_session(tmp_path_factory, cache_dir):
    from pipeline.spark import session

    reason = session.unavailable_reason(cache_dir)
    if reason:
        pytest.skip(f"Spark cannot run here: {reason}")
    data_dir = tmp_path_factory.mktemp("spark-data")
    with pytest.MonkeyPatch.context() as env:
        _environment(env, data_dir, cache_dir)
        from pipeline.config import Settings

        started = session.spark_session(Settings.from_env(), "local[2]", app_name="deeper tests")
    yield SparkEnv(started.spark, data_dir, cache_dir)
    started.spark.stop()


def _environment(env: pytest.MonkeyPatch, data_dir: Path, cache_dir: Path) -> None:
    env.setenv("DEEPER_DATA_DIR", str(data_dir))
    env.setenv("DEEPER_CACHE_DIR", str(cache_dir))
    env.setenv("DEEPER_REGISTRY", str(data_dir / "registry"))
    env.setenv("DEEPER_OFFLINE", "1")
    env.setenv("DEEPER_MODEL", MODEL)
    for name in ("DEEPER_TABLE", "DEEPER_CATALOG", "DEEPER_WAREHOUSE", "PYICEBERG_HOME"):
        env.delenv(name, raising=False)
    for name in [n for n in os.environ if n.startswith("PYICEBERG_CATALOG__")]:
        env.delenv(name)


@pytest.fixture
def spark_env(_spark_session, monkeypatch) -> SparkEnv:
    """The shared session, with this test's environment pointing at its catalog."""
    _environment(monkeypatch, _spark_session.data_dir, _spark_session.cache_dir)
    return _spark_session


def lake(root: Path, photos: dict[str, bytes]) -> Path:
    """A folder of photos (``relative name -> bytes``)."""
    for name, data in photos.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def examples_copy(root: Path) -> Path:
    """The bundled example photos, copied (tests add files next to them)."""
    shutil.copytree(EXAMPLES, root, ignore=shutil.ignore_patterns("*.md", "*.csv"))
    return root
