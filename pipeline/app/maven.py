"""Java jars from Maven Central, installed once into a cache folder: the one Maven helper.

Apache Kafka's broker (:mod:`pipeline.app.broker.apache_kafka`) and Spark's Iceberg runtime
(:mod:`pipeline.spark.session`) are Java; both are installed the same way, without tarballs or
Docker: a throw-away ``pom.xml`` naming the pinned artifacts, ``mvn dependency:copy-dependencies``
into a temporary folder, renamed into place only when Maven succeeded and the expected jar is
there, with a ``.complete`` marker written last. A file lock makes concurrent installs (parallel
tests, two commands) wait for one another; an interrupted install leaves no marker and is never
mistaken for a complete one. Maven keeps its own download cache in ``~/.m2``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from pipeline.errors import DeeperError

COMPLETE = ".complete"  # written last: a folder without it is an interrupted install

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.go-deeper</groupId><artifactId>{name}</artifactId><version>1</version>
  <dependencies>
{dependencies}
  </dependencies>
</project>
"""


class MavenError(DeeperError):
    """Jars cannot be installed here; the message says what is missing."""


def is_installed(libs: Path) -> bool:
    return (Path(libs) / COMPLETE).is_file()


def install(libs: Path, coordinates: Sequence[str], expect: str, what: str,
            announce: Callable[[str], None] | None = None, error: type[MavenError] = MavenError,
            transitive: bool = True) -> Path:
    """Install ``coordinates`` (``group:artifact:version``) and their runtime dependencies into
    ``libs`` once, and return it. ``expect`` is a jar name (glob) that must be among them; ``what``
    names the software in messages; ``error`` is the exception type the caller's users expect.
    ``transitive=False`` takes the named jars alone (for a runtime that brings the rest, as
    Spark brings slf4j)."""
    libs = Path(libs)
    if is_installed(libs):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise error(f"installing {what} needs Maven: `apt-get install maven` (or any Maven 3) and Java 17+")
    java_binary(what, error)
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_installed(libs):
            return libs
        if announce:
            announce(f"installing {what} from Maven Central into {libs}")
        _copy_dependencies(mvn, libs, coordinates, expect, what, error, transitive)
    return libs


def _copy_dependencies(mvn: str, libs: Path, coordinates: Sequence[str], expect: str, what: str,
                       error: type[MavenError], transitive: bool) -> None:
    with tempfile.TemporaryDirectory(dir=libs.parent, prefix=".install-") as work:
        pom, out = Path(work) / "pom.xml", Path(work) / "libs"
        pom.write_text(pom_text(libs.parent.name, coordinates))
        command = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={out}",
                   "-DincludeScope=runtime", f"-DexcludeTransitive={str(not transitive).lower()}"]
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0 or not any(out.glob(expect)):
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
            raise error(f"Maven could not fetch {what} (exit {result.returncode}):\n{tail}")
        (out / COMPLETE).write_text("\n".join(coordinates) + "\n")
        shutil.rmtree(libs, ignore_errors=True)  # a leftover without the marker
        os.replace(out, libs)


def pom_text(name: str, coordinates: Sequence[str]) -> str:
    """A pom whose only job is to name ``coordinates`` as dependencies."""
    lines = []
    for coordinate in coordinates:
        group, artifact, version = coordinate.split(":")
        lines.append(f"    <dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
                     f"<version>{version}</version></dependency>")
    safe = "".join(c if c.isalnum() or c in "-._" else "-" for c in name) or "runtime"
    return _POM.format(name=safe, dependencies="\n".join(lines))


def java_binary(what: str = "Java", error: type[MavenError] = MavenError) -> str:
    """``$JAVA_HOME/bin/java`` or ``java`` on PATH (Kafka 4 and Spark 4 need Java 17 or newer)."""
    home = os.environ.get("JAVA_HOME")
    candidate = Path(home) / "bin" / "java" if home else None
    if candidate is not None and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise error(f"{what} needs Java 17+: `apt-get install openjdk-17-jre-headless` (or set JAVA_HOME)")
    return found
