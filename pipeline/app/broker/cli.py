"""``deeper broker start|stop|status|restart``: the local development broker (see pipeline.app.broker.local)."""

from __future__ import annotations

import argparse


def cmd_broker(args: argparse.Namespace) -> int:
    from pipeline.app.broker import local as broker

    return broker.run(args)


def add_parser(sub) -> None:
    from pipeline.app.broker import local as broker  # stdlib only at import time: cheap for every `deeper` command

    p = sub.add_parser("broker", help="start/stop a local Kafka broker (Tansu, or Apache Kafka with --kafka) "
                       "on 127.0.0.1", description=broker.DESCRIPTION,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    broker.add_arguments(p)
    p.set_defaults(func=cmd_broker)
