"""Spark for go-deeper: the pinned jars, and one SparkSession that sees the feature table.

pyspark comes from PyPI (pinned in pyproject.toml); Iceberg's Spark runtime, its AWS bundle (for
an ``s3://`` warehouse) and the SQLite JDBC driver are installed from Maven Central into
``$DEEPER_CACHE_DIR/spark/<iceberg version>/jars`` by :mod:`pipeline.app.maven`, exactly as Apache
Kafka's jars are (``python -m pipeline.spark.session install`` in CI). Java 17.

:func:`spark_session` configures Iceberg's ``SparkCatalog`` under the name of the pyiceberg
catalog (``DEEPER_CATALOG``, default ``deeper``) from the same resolved properties
(``catalog_properties(settings)``): pyiceberg's SQL catalog on SQLite becomes Iceberg's
``JdbcCatalog`` on the same file (both use the tables ``iceberg_tables`` and
``iceberg_namespace_properties``, rows keyed by the catalog's name, so the name must be the same),
with the same warehouse; a REST (or Hive, Glue) catalog's properties are passed through. Tables
are then ``<catalog>.<namespace>.<table>`` in Spark SQL.

Masters: ``local[*]`` by default; ``--master URL`` for a cluster. Or ``spark-submit``: the
session that spark-submit made is used as it is, and this module only adds the catalog
(``docs/backfill.md`` has the command line).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.app import maven
from pipeline.config import Settings
from pipeline.errors import DeeperError
from pipeline.storage import s3_options, write_bytes_atomic
from pipeline.storage import table

#: The pins. pyspark's own pin (4.1.x) is in pyproject.toml; the runtime must match its Spark
#: minor version and Scala 2.13.
ICEBERG_VERSION = "1.12.0"
SPARK_MINOR = "4.1"
SQLITE_JDBC_VERSION = "3.51.3.0"
ICEBERG_RUNTIME = f"org.apache.iceberg:iceberg-spark-runtime-{SPARK_MINOR}_2.13:{ICEBERG_VERSION}"
MAVEN_ARTIFACTS = (ICEBERG_RUNTIME, f"org.apache.iceberg:iceberg-aws-bundle:{ICEBERG_VERSION}",
                   f"org.xerial:sqlite-jdbc:{SQLITE_JDBC_VERSION}")
DEFAULT_MASTER = "local[*]"

#: Spark's own log4j2 chatter at start (native-hadoop, default profile) kept off the terminal.
_LOG4J2 = """status = error
appender.err.type = Console
appender.err.name = err
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n
rootLogger.level = warn
rootLogger.appenderRef.err.ref = err
logger.hadoop.name = org.apache.hadoop
logger.hadoop.level = error
logger.spark.name = org.apache.spark
logger.spark.level = warn
logger.blockmgr.name = org.apache.spark.storage.BlockManager
logger.blockmgr.level = error
logger.cache.name = org.apache.spark.sql.execution.CacheManager
logger.cache.level = error
# a failed task's Python traceback: the command says its reason in one line instead
logger.executor.name = org.apache.spark.executor.Executor
logger.executor.level = fatal
logger.tasks.name = org.apache.spark.scheduler.TaskSetManager
logger.tasks.level = fatal
"""


class SparkUnavailable(maven.MavenError):
    """Spark cannot start here: pyspark, Java or the jars are missing; the message says which."""


def jars_dir(cache_dir: str | Path | None = None) -> Path:
    base = Path(cache_dir or Settings.from_env().cache_dir)
    return base / "spark" / f"iceberg-{ICEBERG_VERSION}-spark-{SPARK_MINOR}" / "jars"


def install(cache_dir: str | Path | None = None, announce=None) -> list[Path]:
    """Install the pinned jars once (concurrent-safe) and return their paths."""
    libs = maven.install(jars_dir(cache_dir), MAVEN_ARTIFACTS, f"iceberg-spark-runtime-{SPARK_MINOR}_2.13-*.jar",
                         f"Iceberg {ICEBERG_VERSION} for Spark {SPARK_MINOR}", announce, SparkUnavailable,
                         transitive=False)
    return sorted(libs.glob("*.jar"))


def unavailable_reason(cache_dir: str | Path | None = None) -> str | None:
    """None if Spark can run here (pyspark importable, Java, jars installed or installable)."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark is not installed: pip install -e . (pyproject.toml pins it)"
    try:
        maven.java_binary("Spark", SparkUnavailable)
    except SparkUnavailable as exc:
        return str(exc)
    if not maven.is_installed(jars_dir(cache_dir)) and shutil.which("mvn") is None:
        return "the Iceberg jars for Spark are not installed and `mvn` is missing to install them"
    return None


def catalog_conf(settings: Settings) -> dict[str, str]:
    """``spark.sql.catalog.<name>.*`` for the feature table's catalog (see the module doc)."""
    name = settings.catalog
    props = table.catalog_properties(settings)
    prefix = f"spark.sql.catalog.{name}"
    conf = {prefix: "org.apache.iceberg.spark.SparkCatalog"}
    kind = str(props.get("type", "")).lower()
    if kind == "sql":
        uri = str(props["uri"])
        if not uri.startswith("sqlite:///"):
            raise DeeperError(f"catalog {name}: Spark reaches a SQL catalog through JDBC; only SQLite is mapped "
                              f"(uri {uri.split('://')[0]}://...). Configure Spark's catalog with --conf "
                              f"{prefix}.type=jdbc, {prefix}.uri=jdbc:... and the driver's jar")
        conf.update({f"{prefix}.type": "jdbc", f"{prefix}.uri": "jdbc:sqlite:" + uri[len("sqlite:///"):],
                     # pyiceberg's SqlCatalog writes the V1 layout (iceberg_type column, views)
                     f"{prefix}.jdbc.schema-version": "V1"})
        rest = {k: v for k, v in props.items() if k not in ("type", "uri")}
    else:
        rest = dict(props)
    for key, value in rest.items():
        conf[f"{prefix}.{key}"] = str(value)
    warehouse = str(props.get("warehouse", ""))
    if warehouse.startswith("s3://") or warehouse.startswith("s3a://"):
        conf.update(_s3_conf(prefix))
    return conf


def _s3_conf(prefix: str) -> dict[str, str]:
    """Iceberg's S3FileIO from the same AWS variables pyarrow uses (pipeline.storage.s3_options)."""
    options = s3_options()
    conf = {f"{prefix}.io-impl": "org.apache.iceberg.aws.s3.S3FileIO"}
    if "endpoint_override" in options:
        conf[f"{prefix}.s3.endpoint"] = f"{options['scheme']}://{options['endpoint_override']}"
        conf[f"{prefix}.s3.path-style-access"] = "true"
    if "region" in options:
        conf[f"{prefix}.client.region"] = str(options["region"])
    return conf


@dataclass
class Started:
    """A session and what starting it cost (reported apart from the job's own time)."""

    spark: Any
    seconds: float
    catalog: str


def spark_session(settings: Settings, master: str | None = None, conf: Mapping[str, str] | None = None,
                  app_name: str = "deeper", announce=None) -> Started:
    """The SparkSession with the feature table's catalog; ``master`` defaults to ``local[*]``.

    Under ``spark-submit`` (its gateway is in the environment), or when this process already
    runs a session, that session is used as it is and only the catalog is added (catalogs load
    lazily, so runtime configuration suffices); spark-submit must then be given the jars
    (``--jars "$(python -m pipeline.spark.session jars)"``).
    """
    try:
        from pyspark import SparkContext
        from pyspark.sql import SparkSession
    except ImportError:
        raise SparkUnavailable("pyspark is not installed: pip install -e . (pyproject.toml pins it)") from None
    # py4j says "Closing down clientserver connection" at INFO when the session ends: not the user's news
    logging.getLogger("py4j").setLevel(logging.WARNING)
    started = time.perf_counter()
    catalog = catalog_conf(settings)
    running = SparkContext._active_spark_context
    submitted = running is None and master is None and "PYSPARK_GATEWAY_PORT" in os.environ
    if running is not None or submitted:  # one this process started before, or spark-submit's
        if running is not None and master and master != running.master:
            raise DeeperError(f"a Spark session with master {running.master} is already running in this process; "
                              f"--master {master} cannot apply")
        # under spark-submit: its master, --jars and --conf, as given
        active = SparkSession.builder.appName(app_name).getOrCreate()
        for key, value in {**catalog, **(conf or {})}.items():
            now = active.conf.get(key, None)
            if key in catalog and now is not None and now != value:  # a loaded catalog keeps its settings
                raise DeeperError(f"this process's Spark session has {key}={now}, not {value}: "
                                  "run the command in a new process")
            active.conf.set(key, value)
        return Started(active, time.perf_counter() - started, settings.catalog)
    maven.java_binary("Spark", SparkUnavailable)
    jars = install(settings.cache_dir, announce)
    master = master or DEFAULT_MASTER
    if master.startswith("local"):  # everything on this machine: loopback only, no LAN address
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        # Python workers run this interpreter (go-deeper and TensorFlow are installed in it);
        # pyspark reads the variable, not spark.pyspark.python, when it starts them
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name).master(master)
    for key, value in {**base_conf(jars, settings), **catalog, **(conf or {})}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return Started(spark, time.perf_counter() - started, settings.catalog)


def base_conf(jars: Sequence[Path], settings: Settings) -> dict[str, str]:
    """Jars, Python, quiet logs, and small-job defaults of a session this module starts."""
    log_config = jars_dir(settings.cache_dir).parent / "log4j2.properties"
    if not log_config.is_file() or log_config.read_text() != _LOG4J2:
        write_bytes_atomic(log_config, _LOG4J2.encode())  # concurrent runs never read half a file
    java_options = f"-Dlog4j2.configurationFile={log_config.as_uri()}"
    return {
        "spark.jars": ",".join(str(j) for j in jars),
        "spark.sql.extensions": "org.apache.iceberg.spark.extensions.IcebergSparkSessionExtensions",
        "spark.driver.extraJavaOptions": java_options,
        "spark.executor.extraJavaOptions": java_options,
        "spark.executorEnv.TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        # no web UI on a fixed port unless asked for (--conf spark.ui.enabled=true)
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": "8",
        "spark.sql.session.timeZone": "UTC",
    }


def parse_conf(pairs: Sequence[str]) -> dict[str, str]:
    """``--conf KEY=VALUE`` pairs (spark-submit's syntax)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise DeeperError(f"--conf {pair!r}: expected KEY=VALUE, e.g. spark.executor.memory=4g")
        out[key.strip()] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.spark.session install|jars|conf``: for CI and for spark-submit."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.spark.session",
                                     description="Iceberg for Spark: install the jars, print them or the catalog "
                                                 "configuration (for spark-submit --jars / --conf).")
    parser.add_argument("command", choices=["install", "jars", "conf"])
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    try:
        jars = install(settings.cache_dir, announce=lambda m: print(m, file=sys.stderr, flush=True))
        if args.command == "jars":
            print(",".join(str(j) for j in jars))
        elif args.command == "conf":
            for key, value in catalog_conf(settings).items():
                print(f"--conf {key}={value}")
        else:
            print(jars_dir(settings.cache_dir))
    except DeeperError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
