"""Subcommands of the edge side."""

from __future__ import annotations

import argparse

from . import demo, synthesize


def register(sub: argparse._SubParsersAction) -> None:
    demo.register(sub)
    synthesize.register(sub)
