"""The `avidfast` command line."""
import argparse
import json
import sys
from typing import List, Optional

import torch

from avidfast import __version__

BANK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, without a traceback."""


def _bench_ops(args: argparse.Namespace) -> None:
    from avidfast.bench.ops_suite import CASES, OpsBenchConfig, run_suite
    from avidfast.bench.report import describe_machine, format_table
    from avidfast.files import atomic_write_text

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is visible; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.case or []:
        if name not in CASES:
            raise UserError(f"--case {name}: unknown case; choose from {', '.join(CASES)}")
    cfg = OpsBenchConfig(
        num_items=args.num_items, batch=args.batch, negatives=args.negatives, dim=args.dim,
        bank_dtype=BANK_DTYPES[args.bank_dtype], device=args.device, rounds=args.rounds,
        warmup=args.warmup, seed=args.seed,
    )
    if cfg.negatives >= cfg.num_items - 1:
        raise UserError(f"--negatives {cfg.negatives} must be smaller than --num-items - 1 = {cfg.num_items - 1}")
    machine = describe_machine(args.device)
    results = run_suite(cfg, args.case, progress=lambda message: print(message, file=sys.stderr, flush=True))
    print(format_table(results, machine))
    if args.json:
        payload = {"machine": machine, "config": {**vars(cfg), "bank_dtype": args.bank_dtype},
                   "results": [r.as_dict() for r in results]}
        atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avidfast", description="Fast AVID / CMA audio-visual self-supervised learning.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"avidfast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = commands.add_parser("bench", help="benchmarks against the reference formulation")
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    ops = suites.add_parser(
        "ops", help="memory-bank operators: ours vs the reference formulation, in one run",
        description="Times each case (ours and the reference implementation's formulation, "
                    "interleaved rounds), then measures peak extra memory, and prints median ms, "
                    "speed-up and memory ratio.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ops.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ops.add_argument("--num-items", type=_positive_int, default=500_000, help="memory slots N")
    ops.add_argument("--batch", type=_positive_int, default=128, help="batch size B")
    ops.add_argument("--negatives", type=_positive_int, default=1024, help="negatives K per row")
    ops.add_argument("--dim", type=_positive_int, default=128, help="embedding size D")
    ops.add_argument("--bank-dtype", choices=sorted(BANK_DTYPES), default="float32", help="bank storage dtype")
    ops.add_argument("--rounds", type=_positive_int, default=15, help="timed rounds of the step case (x4 for the small cases)")
    ops.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ops.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ops.add_argument("--seed", type=int, default=0, help="seed of banks, batches and draws")
    ops.add_argument("--case", action="append", help="run only this case (repeatable)")
    ops.add_argument("--json", help="also write the results to this JSON file (atomically)")
    ops.set_defaults(handler=_bench_ops)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except UserError as error:
        print(f"avidfast: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("avidfast: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
