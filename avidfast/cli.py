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


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _frame_size(text: str):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be WIDTHxHEIGHT, e.g. 128x128, got {text}") from None
    return width, height


def _prepare(args: argparse.Namespace) -> None:
    from avidfast.data.prepare import PrepareError, prepare

    try:
        summary = prepare(
            args.src, args.out, root=args.root, workers=args.workers, extract_audio=args.extract_audio,
            transcode=args.transcode, fps=args.fps, gop=args.gop, min_seconds=args.min_seconds,
            check=args.check, progress=not args.quiet,
        )
    except PrepareError as error:
        raise UserError(str(error)) from None
    except OSError as error:
        raise UserError(f"{error.filename or args.out}: {error.strerror or error}") from None
    print(summary.format())


def _synthetic(args: argparse.Namespace) -> None:
    from avidfast.data.synthetic import DatasetError, make_dataset

    try:
        path = make_dataset(
            args.out, args.videos, args.classes, args.seconds, args.seed, size=args.size, fps=args.fps,
            sample_rate=args.sample_rate, workers=args.workers or None, progress=not args.quiet,
        )
    except DatasetError as error:
        raise UserError(str(error)) from None
    except OSError as error:
        raise UserError(f"{error.filename or args.out}: {error.strerror or error}") from None
    print(f"{args.videos} clips of {args.classes} classes; manifest: {path}")


def _read_manifest(path: str, root: Optional[str] = None):
    from avidfast.data.manifest import ManifestError, read_manifest

    try:
        return read_manifest(path, root)
    except ManifestError as error:
        raise UserError(str(error)) from None


def _stats(args: argparse.Namespace) -> None:
    import logging

    from avidfast.data.audio import get_preset
    from avidfast.data.stats import compute_stats

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    manifest = _read_manifest(args.manifest, args.root)
    preset = get_preset(args.audio_preset)
    out = args.out or f"{args.manifest.rsplit('.', 1)[0]}.{preset.name}-stats.npz"
    try:
        stats, failed = compute_stats(manifest, preset, workers=args.workers, max_seconds=args.max_seconds,
                                      progress=not args.quiet)
    except ValueError as error:
        raise UserError(f"{args.manifest}: {error}") from None
    stats.save(out)
    print(f"{preset.name}: mean/std of {stats.count} spectrogram frames over {len(manifest) - failed} of "
          f"{len(manifest)} files ({failed} unreadable, see warnings); wrote {out}")


def _bench_loader(args: argparse.Namespace) -> None:
    import logging

    from avidfast.bench.loader_suite import LoaderBenchConfig, format_loader_table, run_loader_benchmark
    from avidfast.bench.report import describe_machine
    from avidfast.data.video import VideoConfig
    from avidfast.files import atomic_write_text

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.dali_device is not None:
        _check_device("cuda")
    manifest = _read_manifest(args.manifest)
    dali_manifest = _read_manifest(args.dali_manifest) if args.dali_manifest else None
    cfg = LoaderBenchConfig(
        video=VideoConfig(frames=args.frames, crop=args.crop), audio_preset=args.audio_preset,
        batch_size=args.batch, workers=args.workers, clips=args.clips, rounds=args.rounds, seed=args.seed,
    )
    results = run_loader_benchmark(
        manifest, cfg, dali_manifest=dali_manifest, dali_device=args.dali_device, baseline=not args.no_baseline,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    files = args.manifest + (f" (DALI: {args.dali_manifest})" if args.dali_manifest else "")
    machine = describe_machine("cuda" if args.dali_device is not None else "cpu")
    print(format_loader_table(results, cfg, machine, files))
    if args.json:
        payload = {"machine": machine, "files": files, "config": {k: str(v) for k, v in vars(cfg).items()},
                   "results": [{"variant": r.name, "description": r.description, "clips_per_s": r.rates,
                                "median": r.median} for r in results]}
        atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


def _train(args: argparse.Namespace) -> None:
    from avidfast.data.manifest import ManifestError
    from avidfast.train.config import ConfigError, load_config
    from avidfast.train.loop import TrainingError, train

    try:
        cfg = load_config(args.config, args.set or [])
        result = train(cfg, resume=args.resume)
    except (ConfigError, TrainingError, ManifestError) as error:
        raise UserError(str(error)) from None
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    if result.interrupted:
        raise SystemExit(143)


def _demo(args: argparse.Namespace) -> None:
    from avidfast.train.config import ConfigError
    from avidfast.train.demo import DemoSettings, run_demo
    from avidfast.train.loop import TrainingError

    settings = DemoSettings(out_dir=args.out, videos=args.videos, classes=args.classes, seconds=args.seconds,
                            seed=args.seed, epochs=args.epochs, progress=not args.quiet)
    try:
        run_demo(settings)
    except (ConfigError, TrainingError) as error:
        raise UserError(str(error)) from None


def _bench_train(args: argparse.Namespace) -> None:
    from avidfast.bench.train_suite import CASES, TrainBenchConfig

    _check_device(args.device)
    cfg = TrainBenchConfig(preset=args.preset, width=args.width, batch=args.batch, num_items=args.num_items,
                           negatives=args.negatives, device=args.device, rounds=args.rounds, warmup=args.warmup,
                           seed=args.seed)
    _run_bench(args, CASES, cfg)


def _add_data_commands(commands) -> None:
    prep = commands.add_parser(
        "prepare", help="probe videos, keep the usable ones, optionally extract audio / re-encode",
        description="Probes every video of SRC (a manifest CSV, or a folder searched for "
                    ".mp4/.mkv/.webm/.avi/.mov/.m4v) in worker processes and writes OUT/manifest.csv "
                    "(usable clips with duration, fps, size, audio rate and channels; paths relative "
                    "to OUT) and OUT/rejected.csv (path, reason). Optionally extracts 24 kHz mono "
                    "audio and re-encodes video at a constant frame rate with a short GOP. Sources "
                    "are never modified; rerunning skips work already done.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    prep.add_argument("src", metavar="SRC", help="manifest CSV (column 'path', optional 'label') or folder")
    prep.add_argument("out", metavar="OUT", help="output folder (not the source folder)")
    prep.add_argument("--root", help="folder the manifest's relative paths start from (None: the manifest's folder)")
    prep.add_argument("--workers", type=_non_negative_int, default=2, help="worker processes (0: in this process)")
    prep.add_argument("--extract-audio", choices=["wav", "flac"], help="write 24 kHz mono audio under OUT/audio")
    prep.add_argument("--transcode", choices=["h264", "vp9"],
                      help="re-encode under OUT/videos: h264 (MP4, for GPU decoding) or vp9 (WebM, decodable by DALI on CPU)")
    prep.add_argument("--min-seconds", type=_non_negative_float, default=2.0, help="reject shorter clips")
    prep.add_argument("--fps", type=_positive_int, default=16, help="frame rate of re-encoded video")
    prep.add_argument("--gop", type=_positive_int, default=16, help="keyframe interval of re-encoded video, in frames")
    prep.add_argument("--check", choices=["header", "fast", "full"], default="fast",
                      help="how hard to probe: headers only; all packets + all audio + video start and last "
                           "second; or decode every frame")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    prep.set_defaults(handler=_prepare)

    syn = commands.add_parser(
        "synthetic", help="write a synthetic labelled audio-visual data set (real MP4 files)",
        description="Writes deterministic clips (H.264 + AAC) whose picture (shape, motion, colour) and "
                    "sound (pitch, rhythm, timbre) share a hidden class, with per-clip nuisance, plus "
                    "OUT/manifest.csv (path,label). Refuses a folder holding a different data set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    syn.add_argument("out", metavar="OUT", help="output folder")
    syn.add_argument("--videos", type=_positive_int, default=200, help="number of clips")
    syn.add_argument("--classes", type=_positive_int, default=10, help="number of classes")
    syn.add_argument("--seconds", type=float, default=4.0, help="clip length")
    syn.add_argument("--seed", type=int, default=0, help="same seed, same clips")
    syn.add_argument("--size", type=_frame_size, default=(128, 128), help="frame WIDTHxHEIGHT (even)")
    syn.add_argument("--fps", type=_positive_int, default=16, help="frames per second")
    syn.add_argument("--sample-rate", type=_positive_int, default=24000, help="audio sample rate, Hz")
    syn.add_argument("--workers", type=_non_negative_int, default=0, help="encoding processes (0: automatic)")
    syn.add_argument("--quiet", action="store_true", help="no progress bar")
    syn.set_defaults(handler=_synthetic)

    stats = commands.add_parser(
        "stats", help="per-frequency mean/std of the log-spectrogram over a training set (.npz)",
        description="Decodes the first --max-seconds of every row's audio (the extracted file when the "
                    "manifest has audio_path), computes the dB power spectrogram of the preset and writes "
                    "the mean and std of each frequency bin over all frames, for Z-normalisation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    stats.add_argument("manifest", metavar="MANIFEST", help="training manifest CSV")
    stats.add_argument("--root", help="folder the manifest's relative paths start from (None: its folder)")
    stats.add_argument("--audio-preset", choices=["table5", "table6"], default="table5", help="spectrogram preset")
    stats.add_argument("--out", help="output .npz (None: MANIFEST without .csv + .PRESET-stats.npz)")
    stats.add_argument("--workers", type=_non_negative_int, default=2, help="worker processes (0: in this process)")
    stats.add_argument("--max-seconds", type=_non_negative_float, default=30.0, help="audio read per file")
    stats.add_argument("--quiet", action="store_true", help="no progress bar")
    stats.set_defaults(handler=_stats)


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
    loader.add_argument("--dali-manifest", help="manifest for the DALI pipeline (None: DALI is not timed)")
    loader.add_argument("--dali-device", type=int, help="GPU for DALI (None: DALI's CPU mode)")
    loader.add_argument("--no-baseline", action="store_true", help="skip the reference-shaped loader")
    loader.add_argument("--workers", type=_positive_int, default=2, help="DataLoader workers (DALI: threads)")
    loader.add_argument("--batch", type=_positive_int, default=8, help="batch size")
    loader.add_argument("--clips", type=_positive_int, default=64, help="timed clips per round")
    loader.add_argument("--rounds", type=_positive_int, default=3, help="rounds (the median is reported)")
    loader.add_argument("--frames", type=_positive_int, default=16, help="frames per clip (16 fps)")
    loader.add_argument("--crop", type=_positive_int, default=112, help="crop size, pixels")
    loader.add_argument("--audio-preset", choices=["table5", "table6"], default="table5", help="spectrogram preset")
    loader.add_argument("--seed", type=int, default=0, help="seed of the clip choice and augmentation")
    loader.add_argument("--json", help="also write the results to this JSON file (atomically)")
    loader.set_defaults(handler=_bench_loader)
    step = suites.add_parser(
        "train", help="training-step throughput: ours (fused loss, channels_last, bf16) vs a reference-shaped step",
        description="Times one training step (encoders + heads forward, loss, backward, Adam, bank update) on "
                    "random clips: ours with the fused AVIDLoss in fp32, with channels_last_3d, and with "
                    "bf16 autocast, each interleaved with a reference-shaped step (fp32, contiguous, "
                    "gather/bmm/unfused NCE loss) on a copy of the same model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    step.add_argument("--preset", choices=["table5", "table6"], default="table5", help="networks and input sizes")
    step.add_argument("--width", type=_positive_int, default=64, help="channels of the first stage")
    step.add_argument("--batch", type=_positive_int, default=8, help="clips per step")
    step.add_argument("--num-items", type=_positive_int, default=100_000, help="memory slots N")
    step.add_argument("--negatives", type=_positive_int, default=1024, help="negatives K")
    _add_common_bench_options(step, 5, "timed rounds", 1)
    step.set_defaults(handler=_bench_train)
    _add_data_commands(commands)

    train = commands.add_parser(
        "train", help="pre-train AVID or CMA from a YAML config",
        description="Trains the encoders with the AVID or CMA loss as the config says (the shipped configs "
                    "are the rows of the paper's Table 3 and `demo`). Run under torchrun for several "
                    "GPUs or nodes. Writes runs/<name>/ (config.yaml, meta.json, train.log, metrics.csv, "
                    "tb/, checkpoints/); SIGTERM or Ctrl-C saves a checkpoint and exits; --resume "
                    "continues exactly where the last checkpoint stopped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("config", metavar="CONFIG",
                       help="YAML file, or a shipped config name: " + ", ".join(_shipped_configs()))
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set data.manifest=prep/manifest.csv --set optim.lr=1e-4")
    train.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    train.set_defaults(handler=_train)

    demo = commands.add_parser(
        "demo", help="the whole method on this CPU: synthetic data, Cross-AVID training, probes",
        description="Writes a synthetic labelled set (real H.264 + AAC clips), computes spectrogram "
                    "statistics, trains Cross-AVID with the `demo` config (Table 5 shapes, narrow), then "
                    "trains linear probes on frozen video features (per block) and on the memory banks, "
                    "and compares them with chance and with the same probes before training. Writes "
                    "OUT/loss_curve.png, OUT/results.json and a TensorBoard run; reruns reuse finished steps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--videos", type=_positive_int, default=240, help="synthetic clips")
    demo.add_argument("--classes", type=_positive_int, default=6, help="synthetic classes")
    demo.add_argument("--seconds", type=float, default=4.0, help="clip length")
    demo.add_argument("--epochs", type=_positive_int, help="training epochs (None: the demo config's)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the probes")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo)
    return parser


def _shipped_configs() -> List[str]:
    from avidfast.train.config import shipped_configs

    return shipped_configs()


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
