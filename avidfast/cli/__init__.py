"""The `avidfast` command line: one module per command group, each with a `register(commands)`."""
import argparse
import sys

import torch
from typing import List, Optional

from avidfast import __version__
from avidfast.cli import bench, data, info, manifest, train
from avidfast.cli import eval as eval_commands
from avidfast.errors import AvidfastError


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command registered."""
    parser = argparse.ArgumentParser(
        prog="avidfast", description="Fast AVID / CMA audio-visual self-supervised learning.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"avidfast {__version__} (torch {torch.__version__})")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench.register(commands)
    data.register(commands)
    train.register(commands)
    manifest.register(commands)
    eval_commands.register(commands)
    info.register(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except AvidfastError as error:
        print(f"avidfast: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("avidfast: interrupted", file=sys.stderr)
        return 130
    return 0


