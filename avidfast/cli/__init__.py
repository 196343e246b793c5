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


def _close_progress_bars() -> None:
    """Closes the progress bars an error left open, so that they do not redraw after its message."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close is only cosmetic
            pass


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except AvidfastError as error:
        _close_progress_bars()
        # one write of the whole line: processes sharing a stream (torchrun's workers) cannot split it
        sys.stderr.write(f"avidfast: error: {error}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print("avidfast: interrupted", file=sys.stderr)
        return 130
    return 0


