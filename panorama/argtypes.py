"""argparse types shared by the command lines: a bad number is refused with the option's
own name (argparse adds it), not the name of the parameter it feeds deep inside."""

from __future__ import annotations

import argparse
import math


def positive(text: str) -> float:
    """A finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value
