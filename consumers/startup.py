"""What a consumer checks before its expensive start-up: the cheap things that can fail.

Loading a backbone takes seconds (TensorFlow's import alone is ~2 s); finding out afterwards
that no broker answers, or that a topic option is wrong, wastes them every time. So consumers
first check the broker (saying at once, in the log, that they are waiting for it and for how
long), create their topics and read the registry, and only then load what is slow.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.cli_help import from_setting
from pipeline.config import Settings
from pipeline.logs import event

log = logging.getLogger(__name__)


def await_broker(settings: Settings, timeout: float) -> None:
    """Return once a broker answers; log that it waits (and how long) if the first try fails."""
    from pipeline.kafka.kafka_io import broker_answers, wait_for_broker

    if broker_answers(settings, timeout_s=min(2.0, max(0.2, timeout))):
        return
    event(log, "waiting for the broker", logging.WARNING, bootstrap_servers=settings.bootstrap_servers,
          wait_s=timeout, hint="start one with `deeper broker start` or set KAFKA_BOOTSTRAP_SERVERS; --wait")
    wait_for_broker(settings, timeout=timeout)


def add_topic_option(p: argparse.ArgumentParser, setting: str, role: str, *aliases: str) -> None:
    """``--images-topic`` and friends: one option per topic a command reads or writes."""
    flag = "--" + setting.replace("_", "-")
    p.add_argument(flag, *aliases, dest=setting, default=None, metavar="TOPIC",
                   help=f"{role} {from_setting(setting)}")


def add_stage_options(p: argparse.ArgumentParser, topics: dict[str, str], group_setting: str) -> None:
    """A consumer stage's topics (setting -> role) and its consumer group: the same for every stage."""
    for setting, role in topics.items():
        add_topic_option(p, setting, role)
    p.add_argument("--group", default=None, help="consumer group id " + from_setting(group_setting))


def add_wait_option(p: argparse.ArgumentParser, default: float) -> None:
    p.add_argument("--wait", type=float, default=default, metavar="SECONDS",
                   help="how long to wait for the broker to answer before giving up")
