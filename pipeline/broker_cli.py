"""``deeper broker start|stop|status|restart``: the local development broker (see pipeline.broker)."""

from __future__ import annotations

import argparse


def cmd_broker(args: argparse.Namespace) -> int:
    from pipeline import broker

    return broker.main(args.broker_args)


def add_parser(sub) -> None:
    p = sub.add_parser("broker", help="start/stop a local Kafka-protocol broker (Tansu) on 127.0.0.1",
                       add_help=False)
    p.add_argument("broker_args", nargs=argparse.REMAINDER, help="start [--port N] [--durable] | stop | status")
    p.set_defaults(func=cmd_broker)
