"""`avidfast bench`: the benchmark suites (ops, cma, loader, train), ours against the reference formulation."""
import argparse
import json
import sys

import torch

from avidfast.cli.common import UserError, check_device, non_negative_int, positive_int, read_manifest
from avidfast.data.audio import DALI_PRESETS
from avidfast.losses.memory_bank import STORAGE_DTYPES
from avidfast.models.av import PRESETS as MODEL_PRESETS
from avidfast.ops.cma import AGREEMENTS


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


def _run_ops_config_bench(args: argparse.Namespace, cases) -> None:
    """Runs ``cases`` (the ops or the migration suite) on the OpsBenchConfig of the shared options."""
    from avidfast.bench.ops_suite import OpsBenchConfig

    check_device(args.device)
    if args.negatives >= args.num_items - 1:
        raise UserError(f"--negatives {args.negatives} must be smaller than --num-items - 1 = {args.num_items - 1}")
    cfg = OpsBenchConfig(
        num_items=args.num_items, batch=args.batch, negatives=args.negatives, dim=args.dim,
        bank_dtype=STORAGE_DTYPES[args.bank_dtype], device=args.device, rounds=args.rounds,
        warmup=args.warmup, seed=args.seed,
    )
    _run_bench(args, cases, cfg)


def _bench_ops(args: argparse.Namespace) -> None:
    from avidfast.bench.ops_suite import CASES

    _run_ops_config_bench(args, CASES)


def _bench_migration(args: argparse.Namespace) -> None:
    from avidfast.bench.migration_suite import CASES

    _run_ops_config_bench(args, CASES)


def _bench_cma(args: argparse.Namespace) -> None:
    from avidfast.bench.cma_suite import CASES, CMABenchConfig

    check_device(args.device)
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
    parser.add_argument("--rounds", type=positive_int, default=rounds, help=rounds_help)
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of banks, batches and draws")
    parser.add_argument("--case", action="append", help="run only this case (repeatable)")
    parser.add_argument("--json", help="also write the results to this JSON file (atomically)")


def _bench_shards(args: argparse.Namespace) -> None:
    import logging
    import os

    from avidfast.bench.report import describe_machine
    from avidfast.bench.shard_suite import ShardBenchConfig, format_shard_table, run_shard_benchmark
    from avidfast.data.shards.index import ShardError, read_index
    from avidfast.data.video import VideoConfig

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    manifest = read_manifest(args.manifest)
    folder = args.shards or os.path.join(os.path.dirname(os.path.abspath(args.manifest)), "shards")
    try:
        index = read_index(folder)
    except ShardError as error:
        raise UserError(str(error)) from None
    cfg = ShardBenchConfig(video=VideoConfig(frames=args.frames, crop=args.crop), audio_preset=args.audio_preset,
                           batch_size=args.batch, workers=args.workers, rounds=args.rounds, seed=args.seed)
    try:
        results = run_shard_benchmark(manifest, index, cfg,
                                      progress=lambda message: print(message, file=sys.stderr, flush=True))
    except ValueError as error:
        raise UserError(str(error)) from None
    data = f"{args.manifest} ({len(manifest)} clips) and {folder} ({len(index.shards)} shards)"
    print(format_shard_table(results, cfg, describe_machine("cpu"), data))


def _bench_loader(args: argparse.Namespace) -> None:
    import logging

    from avidfast.bench.loader_suite import LoaderBenchConfig, format_loader_table, run_loader_benchmark
    from avidfast.bench.report import describe_machine
    from avidfast.data.video import VideoConfig
    from avidfast.files import atomic_write_text

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.dali_device is not None:
        check_device("cuda")
    from avidfast.bench.loader_stages import format_stage_table, profile_stages
    from avidfast.data.torchcodec_video import torchcodec_error

    decoders = args.decoder or (["pyav"] + (["torchcodec"] if torchcodec_error() is None else []))
    if "torchcodec" in decoders and torchcodec_error() is not None:
        raise UserError(f"--decoder torchcodec: {torchcodec_error()}")
    manifest = read_manifest(args.manifest)
    baseline_manifest = read_manifest(args.baseline_manifest) if args.baseline_manifest else None
    dali_manifest = read_manifest(args.dali_manifest) if args.dali_manifest else None
    cfg = LoaderBenchConfig(
        video=VideoConfig(frames=args.frames, crop=args.crop), audio_preset=args.audio_preset,
        batch_size=args.batch, workers=args.workers, clips=args.clips, rounds=args.rounds, seed=args.seed,
        decoders=tuple(dict.fromkeys(decoders)),
    )
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    results = run_loader_benchmark(
        manifest, cfg, dali_manifest=dali_manifest, dali_device=args.dali_device, baseline=not args.no_baseline,
        baseline_manifest=baseline_manifest, progress=say,
    )
    files = args.manifest + (f" (baseline: {args.baseline_manifest})" if args.baseline_manifest else "") \
        + (f" (DALI: {args.dali_manifest})" if args.dali_manifest else "")
    machine = describe_machine("cuda" if args.dali_device is not None else "cpu")
    print(format_loader_table(results, cfg, machine, files))
    stages = []
    if args.stages:
        say(f"timing the stages of {args.stages} clips per loader (one thread)")
        stages = [profile_stages(manifest, cfg.video, cfg.audio_preset, args.stages, seed=cfg.seed, decoder=decoder)
                  for decoder in cfg.decoders]
        if not args.no_baseline:
            stages.append(profile_stages(baseline_manifest or manifest, cfg.video, cfg.audio_preset, args.stages,
                                         seed=cfg.seed, reference_shaped=True))
        print(format_stage_table(stages))
    if args.json:
        payload = {"machine": machine, "files": files, "config": {k: str(v) for k, v in vars(cfg).items()},
                   "results": [{"variant": r.name, "description": r.description, "clips_per_s": r.rates,
                                "median": r.median} for r in results],
                   "stages_ms_per_clip": [{"loader": t.name, "clips": t.clips, **t.ms} for t in stages]}
        atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


def _bench_train(args: argparse.Namespace) -> None:
    from avidfast.bench.train_suite import CASES, TrainBenchConfig

    check_device(args.device)
    cfg = TrainBenchConfig(preset=args.preset, width=args.width, batch=args.batch, num_items=args.num_items,
                           negatives=args.negatives, device=args.device, rounds=args.rounds, warmup=args.warmup,
                           seed=args.seed)
    _run_bench(args, CASES, cfg)


def _add_bank_options(parser: argparse.ArgumentParser) -> None:
    """The memory-bank shape of `bench ops` and `bench migration` (OpsBenchConfig's fields)."""
    parser.add_argument("--num-items", type=positive_int, default=500_000, help="memory slots N")
    parser.add_argument("--batch", type=positive_int, default=128, help="batch size B")
    parser.add_argument("--negatives", type=positive_int, default=1024, help="negatives K per row")
    parser.add_argument("--dim", type=positive_int, default=128, help="embedding size D")
    parser.add_argument("--bank-dtype", choices=list(STORAGE_DTYPES), default="float32", help="bank storage dtype")


def register(commands) -> None:
    """Adds `bench` and its suites to the top-level subparsers."""
    bench = commands.add_parser("bench", help="benchmarks against the reference formulation")
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    ops = suites.add_parser(
        "ops", help="memory-bank operators: ours vs the reference formulation, in one run",
        description="Times each case (ours and the reference implementation's formulation, "
                    "interleaved rounds), then measures peak extra memory, and prints median ms, "
                    "speed-up and memory ratio.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_bank_options(ops)
    _add_common_bench_options(ops, 15, "timed rounds of the step case (x4 for the short cases)", 3)
    ops.set_defaults(handler=_bench_ops)
    migration = suites.add_parser(
        "migration", help="peers' memory-bank steps (lemniscate, CMC, mmselfsup NPID) vs avidfast's drop-ins, in one run",
        description="Times each peer's loss step (their equations in their shape: alias draws, gather, bmm, "
                    "unfused criterion, autograd, index_copy_ update; avidfast/bench/peers.py) against the "
                    "avidfast module that replaces it (docs/migration.md), interleaved rounds, then peak "
                    "extra memory; prints median ms, speed-up and memory ratio.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_bank_options(migration)
    _add_common_bench_options(migration, 15, "timed rounds", 3)
    migration.set_defaults(handler=_bench_migration)
    cma = suites.add_parser(
        "cma", help="CMA positive mining: cma_topk vs the 16-query method and a bare matrix-product pass",
        description="Times positive mining with float32 and bfloat16 banks against the reference's "
                    "16-queries-at-a-time method and a pass of the matrix products alone (both on "
                    "float32 banks), interleaved, on a slice of the queries (every variant scales "
                    "linearly with them), and prints medians, the time extrapolated to all N "
                    "queries, speed-ups and peak extra (resident) memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cma.add_argument("--num-items", type=positive_int, default=50_000, help="instances N")
    cma.add_argument("--dim", type=positive_int, default=128, help="embedding size D")
    cma.add_argument("--k", type=positive_int, default=32, help="positives per query")
    cma.add_argument("--mode", choices=AGREEMENTS, default="consensus", help="agreement")
    cma.add_argument("--queries", type=int, default=4096, help="queries mined per round (0: all N)")
    _add_common_bench_options(cma, 3, "timed rounds", 1)
    cma.set_defaults(handler=_bench_cma)
    loader = suites.add_parser(
        "loader", help="data pipeline: avidfast CPU pipeline vs a reference-shaped loader (and DALI)",
        description="Reads training clips (random clip, crop, flip, colour and audio jitter) with our CPU "
                    "pipeline and with a loader shaped like the reference implementation's (PyAV -> PIL "
                    "per frame -> PIL transforms -> numpy STFT), same files and worker count, "
                    "interleaved rounds; optionally the DALI pipeline on --dali-manifest (CPU mode "
                    "needs VP9 video + WAV/FLAC audio: avidfast prepare --transcode vp9 --extract-audio wav).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    loader.add_argument("manifest", metavar="MANIFEST", help="manifest CSV of the clips both CPU loaders read")
    loader.add_argument("--baseline-manifest",
                        help="manifest the reference-shaped loader reads, e.g. the originals of MANIFEST's "
                             "--short-side copies (None: MANIFEST)")
    loader.add_argument("--decoder", action="append", choices=["pyav", "torchcodec"],
                        help="our frame decoder to time, repeatable (None: pyav, and torchcodec when it loads)")
    loader.add_argument("--stages", type=non_negative_int, default=4,
                        help="also time decode / augment / audio read / spectrogram of this many clips per "
                             "loader, in one thread (0: skip)")
    loader.add_argument("--dali-manifest", help="manifest for the DALI pipeline (None: DALI is not timed)")
    loader.add_argument("--dali-device", type=int, help="GPU for DALI (None: DALI's CPU mode)")
    loader.add_argument("--no-baseline", action="store_true", help="skip the reference-shaped loader")
    loader.add_argument("--workers", type=positive_int, default=2, help="DataLoader workers (DALI: threads)")
    loader.add_argument("--batch", type=positive_int, default=8, help="batch size")
    loader.add_argument("--clips", type=positive_int, default=64, help="timed clips per round")
    loader.add_argument("--rounds", type=positive_int, default=3, help="rounds (the median is reported)")
    loader.add_argument("--frames", type=positive_int, default=16, help="frames per clip (16 fps)")
    loader.add_argument("--crop", type=positive_int, default=112, help="crop size, pixels")
    loader.add_argument("--audio-preset", choices=DALI_PRESETS, default="table5", help="spectrogram preset")
    loader.add_argument("--seed", type=int, default=0, help="seed of the clip choice and augmentation")
    loader.add_argument("--json", help="also write the results to this JSON file (atomically)")
    loader.set_defaults(handler=_bench_loader)
    shards = suites.add_parser(
        "shards", help="CPU pipeline reading tar shards vs the same clips file by file (clips/s, file opens)",
        description="Reads one training epoch of a prepared manifest's clips per round file by file and from "
                    "its shards (avidfast prepare --shards), alternating, and reports the median clips/s of each, "
                    "their ratio and the files each opens in an epoch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    shards.add_argument("manifest", metavar="MANIFEST", help="manifest.csv written by avidfast prepare --shards")
    shards.add_argument("--shards", help="shard folder (None: the shards folder beside MANIFEST)")
    shards.add_argument("--workers", type=positive_int, default=2, help="DataLoader workers")
    shards.add_argument("--batch", type=positive_int, default=8, help="batch size")
    shards.add_argument("--rounds", type=positive_int, default=3, help="rounds (the median is reported)")
    shards.add_argument("--frames", type=positive_int, default=16, help="frames per clip (16 fps)")
    shards.add_argument("--crop", type=positive_int, default=112, help="crop size, pixels")
    shards.add_argument("--audio-preset", choices=DALI_PRESETS, default="table5", help="spectrogram preset")
    shards.add_argument("--seed", type=int, default=0, help="seed of the order and augmentation")
    shards.set_defaults(handler=_bench_shards)
    step = suites.add_parser(
        "train", help="training-step throughput: ours (fused loss, channels_last, bf16) vs a reference-shaped step",
        description="Times one training step (encoders + heads forward, loss, backward, Adam, bank update) on "
                    "random clips: ours with the fused AVIDLoss in fp32, with channels_last_3d, and with "
                    "bf16 autocast, each interleaved with a reference-shaped step (fp32, contiguous, "
                    "gather/bmm/unfused NCE loss) on a copy of the same model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    step.add_argument("--preset", choices=MODEL_PRESETS, default="table5", help="networks and input sizes")
    step.add_argument("--width", type=positive_int, default=64, help="channels of the first stage")
    step.add_argument("--batch", type=positive_int, default=8, help="clips per step")
    step.add_argument("--num-items", type=positive_int, default=100_000, help="memory slots N")
    step.add_argument("--negatives", type=positive_int, default=1024, help="negatives K")
    _add_common_bench_options(step, 5, "timed rounds", 1)
    step.set_defaults(handler=_bench_train)
