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


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is visible; use --device cpu")


def _run_bench(args: argparse.Namespace, builders, cfg, scale: float = 1.0) -> None:
    """Runs the selected cases of a suite, prints the table and optionally writes JSON."""
    from avidfast.bench.report import describe_machine, format_table
    from avidfast.bench.suite import run_suite
    from avidfast.files import atomic_write_text

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.case or []:
        if name not in builders:
            raise UserError(f"--case {name}: unknown case; choose from {', '.join(builders)}")
    machine = describe_machine(args.device)
    results = run_suite(builders, cfg, args.case, progress=lambda message: print(message, file=sys.stderr, flush=True))
    print(format_table(results, machine, scale))
    if args.json:
        config = {key: str(value) if isinstance(value, torch.dtype) else value for key, value in vars(cfg).items()}
        payload = {"machine": machine, "config": config, "results": [r.as_dict() for r in results]}
        atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


def _bench_ops(args: argparse.Namespace) -> None:
    from avidfast.bench.ops_suite import CASES, OpsBenchConfig

    _check_device(args.device)
    if args.negatives >= args.num_items - 1:
        raise UserError(f"--negatives {args.negatives} must be smaller than --num-items - 1 = {args.num_items - 1}")
    cfg = OpsBenchConfig(
        num_items=args.num_items, batch=args.batch, negatives=args.negatives, dim=args.dim,
        bank_dtype=BANK_DTYPES[args.bank_dtype], device=args.device, rounds=args.rounds,
        warmup=args.warmup, seed=args.seed,
    )
    _run_bench(args, CASES, cfg)


def _bench_cma(args: argparse.Namespace) -> None:
    from avidfast.bench.cma_suite import CASES, CMABenchConfig

    _check_device(args.device)
    if args.k >= args.num_items - 1:
        raise UserError(f"--k {args.k} must be smaller than --num-items - 1 = {args.num_items - 1}")
    cfg = CMABenchConfig(
        num_items=args.num_items, dim=args.dim, k=args.k, mode=args.mode, queries=args.queries,
        device=args.device, rounds=args.rounds, warmup=args.warmup, seed=args.seed,
    )
    queries = args.queries if 0 < args.queries < args.num_items else args.num_items
    _run_bench(args, CASES, cfg, scale=args.num_items / queries)


def _add_common_bench_options(parser: argparse.ArgumentParser, rounds: int, rounds_help: str,
                              warmup: int) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--rounds", type=_positive_int, default=rounds, help=rounds_help)
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of banks, batches and draws")
    parser.add_argument("--case", action="append", help="run only this case (repeatable)")
    parser.add_argument("--json", help="also write the results to this JSON file (atomically)")


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
    ops.add_argument("--num-items", type=_positive_int, default=500_000, help="memory slots N")
    ops.add_argument("--batch", type=_positive_int, default=128, help="batch size B")
    ops.add_argument("--negatives", type=_positive_int, default=1024, help="negatives K per row")
    ops.add_argument("--dim", type=_positive_int, default=128, help="embedding size D")
    ops.add_argument("--bank-dtype", choices=sorted(BANK_DTYPES), default="float32", help="bank storage dtype")
    _add_common_bench_options(ops, 15, "timed rounds of the step case (x4 for the short cases)", 3)
    ops.set_defaults(handler=_bench_ops)
    cma = suites.add_parser(
        "cma", help="CMA positive mining: cma_topk vs the 16-query method and a bare matrix-product pass",
        description="Times positive mining with float32 and bfloat16 banks against the reference's "
                    "16-queries-at-a-time method and a pass of the matrix products alone (both on "
                    "float32 banks), interleaved, on a slice of the queries (every variant scales "
                    "linearly with them), and prints medians, the time extrapolated to all N "
                    "queries, speed-ups and peak extra (resident) memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cma.add_argument("--num-items", type=_positive_int, default=50_000, help="instances N")
    cma.add_argument("--dim", type=_positive_int, default=128, help="embedding size D")
    cma.add_argument("--k", type=_positive_int, default=32, help="positives per query")
    cma.add_argument("--mode", choices=["consensus", "union", "video", "audio"], default="consensus", help="agreement")
    cma.add_argument("--queries", type=int, default=4096, help="queries mined per round (0: all N)")
    _add_common_bench_options(cma, 3, "timed rounds", 1)
    cma.set_defaults(handler=_bench_cma)
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
