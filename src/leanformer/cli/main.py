"""`leanformer` entry point: parses arguments, dispatches to a subcommand, turns errors into one line.

Every user error (bad argument, missing file, bad config) and every error of the system (disk full, permission
denied) exits with code 2 and a single line on stderr, the latter naming the path; `--debug` shows the traceback
instead.
"""

from __future__ import annotations

import argparse
import sys

from .._io import describe_os_error
from . import bench, finetune, forward, generate, models, predictors, profile, sparsify, thresholds, train, tune


class UsageError(Exception):
    """An error in what the user asked for; reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leanformer",
        description="Cheaper Transformers and MLP vision models: backbones, activation compression, "
        "activation sparsity and rank-wise MoE adapters.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, models, profile, forward, sparsify, thresholds, finetune, predictors, generate, bench, tune):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, OSError, UsageError) as err:
        if args.debug:
            raise
        message = describe_os_error(err) if isinstance(err, OSError) else err
        print(f"leanformer {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
