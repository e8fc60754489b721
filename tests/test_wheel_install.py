"""The installed package is the product: build the wheel, install it into a fresh venv and run
``deeper`` from a folder outside the checkout.

What this catches: a module that finds a file through the checkout (``Path(__file__).parents[N]``),
package data missing from the wheel (class names, the UI page, the local S3 script), a product
import of the rig (``devrig/``), ``tests`` or ``bench`` (none of them are installed).

The fresh venv has no pip and no dependencies of its own: installing TensorFlow, pyarrow, pyspark
... again would take minutes and need the network. So the wheel goes in with ``--no-deps`` and a
``.pth`` file lists this project's venv's site-packages. A ``.pth`` line is appended to
``sys.path`` *after* the venv's own site-packages, so ``pipeline`` (and ``consumers``, ...) come
from the wheel, and only the third-party dependencies from the project's venv. The ``.pth`` files
*inside* that directory (the editable install's path to the checkout) are not processed, because
a listed directory is added as is, not as a site dir: the checkout stays out of reach, which the
test checks before anything else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from pipeline.config import Settings
from tests.conftest import EXAMPLES, REPO, shared_path
from tests.stream_helpers import train_model

MODEL = "efficientnet_lite0"
CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}
#: What the wheel is built from: the installed folders and what pyproject.toml reads.
SOURCES = ("pyproject.toml", "README.md", "pipeline", "consumers", "producers", "schemas")
NOT_INSTALLED = ("devrig", "tests", "bench", "examples")


def _build_wheel(out: Path) -> Path:
    """``pip wheel`` from a copy of the sources (building in the checkout would leave build/ and
    egg-info there, and parallel runs would share them)."""
    src = out / "src"
    src.mkdir(parents=True)
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"pip wheel failed:\n{done.stdout}\n{done.stderr}"
    (wheel,) = (out / "dist").glob("go_deeper-*.whl")
    return wheel


def _venv_with(wheel: Path, venv: Path) -> Path:
    """A fresh venv holding the wheel; dependencies from this project's venv through a .pth."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"installing the wheel failed:\n{done.stdout}\n{done.stderr}"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    Path(purelib, "zz_project_dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    return venv / "bin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(the venv's bin folder, a working folder outside the checkout, the environment to run in)."""
    root = tmp_path_factory.mktemp("wheel")
    assert REPO not in root.parents, "the temporary folder must lie outside the checkout"
    wheel = _build_wheel(root / "build")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.split("/")[0] in NOT_INSTALLED], "the wheel holds the rig, tests or bench"
    bin_dir = _venv_with(wheel, root / "venv")
    work = root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "DEEPER_EXAMPLES") and not k.startswith("DEEPER_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1", TF_CPP_MIN_LOG_LEVEL="2")
    return bin_dir, work, env


def _run(installed, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    bin_dir, work, env = installed
    done = subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=work, env={**env, **extra_env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done


def test_the_package_comes_from_the_wheel_not_the_checkout(installed):
    probe = ("import importlib.util, pipeline, consumers, producers, schemas\n"
             "print(pipeline.__file__)\n"
             "print([n for n in ('devrig', 'tests', 'bench') if importlib.util.find_spec(n)])\n")
    lines = _run(installed, "python", "-c", probe).stdout.splitlines()
    assert Path(lines[0]).is_relative_to(installed[0].parent), f"pipeline imported from {lines[0]}"
    assert lines[1] == "[]", f"not installed, yet importable: {lines[1]}"


def test_version(installed):
    assert _run(installed, "deeper", "--version").stdout.strip() == "deeper 0.1.0"


def test_imagenet_on_one_photo(installed, cache_dir):
    photo = shared_path("imagenet-samples", "chelsea.png")
    out = _run(installed, "deeper", "imagenet", str(photo), "--model", MODEL, "--format", "json", "-q",
               DEEPER_CACHE_DIR=str(cache_dir)).stdout
    (item,) = [json.loads(line) for line in out.splitlines()]
    assert {t["class"] for t in item["top"]} & CAT_CLASSES, item["top"]


def test_predict_with_a_trained_model(installed, cache_dir, effnet, tmp_path):
    settings = Settings(registry_dir=str(tmp_path / "registry"), cache_dir=str(cache_dir))
    version = train_model(settings, effnet, EXAMPLES / "train")
    photos = sorted((EXAMPLES / "test").glob("*.jpg"))[:2]
    out = _run(installed, "deeper", "predict", *map(str, photos), "--format", "json", "-q",
               "--registry", settings.registry_dir, DEEPER_CACHE_DIR=str(cache_dir)).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(rows) == len(photos) and all(row["model_version"] == version for row in rows), rows


def test_the_demo_says_where_the_examples_are(installed):
    bin_dir, work, env = installed
    done = subprocess.run([str(bin_dir / "deeper"), "demo", "--batch"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "DEEPER_EXAMPLES" in done.stderr, done.stderr[-2000:]


def test_broker_starts_and_stops(installed, tmp_path):
    from pipeline.app.broker.local import free_port

    state = str(tmp_path / "broker")
    started = _run(installed, "deeper", "broker", "--state-dir", state, "start", "--port", str(free_port()))
    try:
        assert started.stdout.startswith("KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:"), started.stdout
    finally:
        assert _run(installed, "deeper", "broker", "--state-dir", state, "stop").stdout.strip() == "stopped"
