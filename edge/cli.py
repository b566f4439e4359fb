"""Subcommands of the edge side."""

from __future__ import annotations

import argparse

from . import demo, listen, monitor, serve, synthesize


def register(sub: argparse._SubParsersAction) -> None:
    demo.register(sub)
    listen.register(sub)
    monitor.register(sub)
    serve.register(sub)
    synthesize.register(sub)
