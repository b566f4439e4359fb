"""The ``panorama`` command: one entry point, subcommands registered by each part.

This module sits above the packages (it imports training/, edge/, export/ and deploy/); the shared
core ``panorama`` never imports it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from panorama.errors import PanoramaError
from panorama.files import file_in_the_way


def build_parser() -> argparse.ArgumentParser:
    from deploy import cli as deploy_cli
    from edge import cli as edge_cli
    from export import cli as export_cli
    from training import bench as training_bench
    from training import cli as training_cli

    parser = argparse.ArgumentParser(
        prog="panorama",
        description="Synthesise ECG views that were never recorded, from a few recorded leads "
        "and their viewing angles (NEF-NET v2).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for part in (edge_cli, training_cli, training_bench, export_cli, deploy_cli):
        part.register(sub)
    return parser


def _said(exc: Exception) -> str:
    """The error in a user's words: a folder asked for where a file lies (an --out naming a
    file) says so, rather than [Errno 17] File exists."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and exc.filename:
        if (file := file_in_the_way(exc.filename)) is not None:
            return f"{file} is a file, where a folder is wanted"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    # wfdb 4.3 calls pandas with inplace=, which pandas 3 deprecates: noise for our users
    warnings.filterwarnings("ignore", message="The inplace keyword")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except (PanoramaError, ValueError, OSError) as exc:
        # bad input is the user's to fix: one clear line, no traceback
        print(f"panorama {args.command}: error: {_said(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
