"""`avidfast prepare`, `avidfast synthetic` and `avidfast stats`: data preparation commands."""
import argparse

from avidfast.cli.common import (UserError, frame_size, non_negative_float, non_negative_int, positive_int,
                                 read_manifest)
from avidfast.data.audio import PRESETS as AUDIO_PRESETS


def _prepare(args: argparse.Namespace) -> None:
    import sys

    from avidfast.data.prepare import prepare

    try:
        summary = prepare(
            args.src, args.out, root=args.root, workers=args.workers, extract_audio=args.extract_audio,
            transcode=args.transcode, fps=args.fps, gop=args.gop, short_side=args.short_side,
            min_seconds=args.min_seconds, check=args.check, shards=args.shards, shard_bytes=args.shard_mb * 2**20,
            progress=not args.quiet, video_only=args.video_only,
            log=lambda note: print(f"avidfast: {note}", file=sys.stderr, flush=True),  # warnings even with --quiet
        )
    except OSError as error:
        raise UserError(f"{error.filename or args.out}: {error.strerror or error}") from None
    print(summary.format())


def _synthetic(args: argparse.Namespace) -> None:
    from avidfast.data.synthetic import make_dataset

    try:
        path = make_dataset(
            args.out, args.videos, args.classes, args.seconds, args.seed, size=args.size, fps=args.fps,
            sample_rate=args.sample_rate, silent_fraction=args.silent_fraction, workers=args.workers or None,
            progress=not args.quiet,
        )
    except OSError as error:
        raise UserError(f"{error.filename or args.out}: {error.strerror or error}") from None
    print(f"{args.videos} clips of {args.classes} classes; manifest: {path}")


def _stats(args: argparse.Namespace) -> None:
    import logging

    from avidfast.data.audio import get_preset
    from avidfast.data.stats import compute_stats, default_stats_path

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    manifest = read_manifest(args.manifest, args.root)
    preset = get_preset(args.audio_preset)
    out = args.out or default_stats_path(args.manifest, preset.name)
    _check_output_file(out, "--out" if args.out else "the statistics file")  # before the long part
    try:
        stats, failed = compute_stats(manifest, preset, workers=args.workers, max_seconds=args.max_seconds,
                                      progress=not args.quiet)
    except ValueError as error:
        raise UserError(f"{args.manifest}: {error}") from None
    try:
        stats.save(out)
    except OSError as error:
        raise UserError(f"{out}: cannot be written ({error.strerror or error})") from None
    print(f"{preset.name}: mean/std of {stats.count} spectrogram frames over {len(manifest) - failed} of "
          f"{len(manifest)} files ({failed} unreadable, see warnings); wrote {out}")


def _check_output_file(path: str, option: str) -> None:
    """UserError unless ``path`` can be written as a file (its folder is created when missing)."""
    import os

    from avidfast.errors import RunFolderError
    from avidfast.train.run_folder import check_writable_folder

    if os.path.isdir(path):
        raise UserError(f"{option} {path}: is a folder; give a file name, e.g. {os.path.join(path, 'stats.npz')}")
    try:
        check_writable_folder(os.path.dirname(os.path.abspath(path)), f"{option} {path}: its folder")
    except RunFolderError as error:
        raise UserError(str(error)) from None


def register(commands) -> None:
    """Adds prepare, synthetic and stats to the top-level subparsers."""
    prep = commands.add_parser(
        "prepare", help="probe videos, keep the usable ones, optionally extract audio / re-encode",
        description="Probes every file of SRC (a manifest CSV, or a folder: every file in it, hidden "
                    "ones left out) in worker processes and writes OUT/manifest.csv "
                    "(usable clips with duration, fps, size, audio rate and channels; paths relative "
                    "to OUT) and OUT/rejected.csv (path, reason: 'not a media file', 'audio only', "
                    "'truncated: ...', ...): every file is in one of them. Optionally extracts 24 kHz mono "
                    "audio and re-encodes video at a constant frame rate with a short GOP. Sources "
                    "are never modified; rerunning skips work already done.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    prep.add_argument("src", metavar="SRC", help="manifest CSV (column 'path', optional 'label') or folder")
    prep.add_argument("out", metavar="OUT", help="output folder (not the source folder)")
    prep.add_argument("--root", help="folder the manifest's relative paths start from (None: the manifest's folder)")
    prep.add_argument("--workers", type=non_negative_int, default=2, help="worker processes (0: in this process)")
    prep.add_argument("--extract-audio", choices=["wav", "flac"], help="write 24 kHz mono audio under OUT/audio")
    prep.add_argument("--transcode", choices=["h264", "vp9"],
                      help="re-encode under OUT/videos: h264 (MP4, for GPU decoding) or vp9 (WebM, decodable by DALI on CPU)")
    prep.add_argument("--short-side", type=positive_int,
                      help="with --transcode: scale the copies so their short side is this many pixels (never "
                           "enlarged; e.g. 128 for 112x112 crops, 256 for 224x224); None: the source's size")
    prep.add_argument("--min-seconds", type=non_negative_float, default=2.0, help="reject shorter clips")
    prep.add_argument("--fps", type=positive_int, default=16, help="frame rate of re-encoded video")
    prep.add_argument("--gop", type=positive_int, default=16, help="keyframe interval of re-encoded video, in frames")
    prep.add_argument("--check", choices=["header", "fast", "full"], default="fast",
                      help="how hard to probe: headers only; all packets + all audio + video start and last "
                           "second; or decode every frame")
    prep.add_argument("--video-only", action="store_true",
                      help="keep files without an audio stream (evaluation sets for the video-only protocols: "
                           "eval linear / finetune); the manifest's has_audio column says which rows have sound")
    prep.add_argument("--shards", action="store_true",
                      help="also write OUT/shards: the kept clips (video, extracted audio, JSON with memory slot, "
                           "label, metadata) as WebDataset-style tar shards plus index.npz")
    prep.add_argument("--shard-mb", type=positive_int, default=1024, help="largest shard size in MiB (with --shards)")
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
    syn.add_argument("--videos", type=positive_int, default=200, help="number of clips")
    syn.add_argument("--classes", type=positive_int, default=10, help="number of classes")
    syn.add_argument("--seconds", type=float, default=4.0, help="clip length")
    syn.add_argument("--seed", type=int, default=0, help="same seed, same clips")
    syn.add_argument("--size", type=frame_size, default=(128, 128), help="frame WIDTHxHEIGHT (even)")
    syn.add_argument("--fps", type=positive_int, default=16, help="frames per second")
    syn.add_argument("--sample-rate", type=positive_int, default=24000, help="audio sample rate, Hz")
    syn.add_argument("--silent-fraction", type=non_negative_float, default=0.0,
                     help="share of clips written without an audio stream (0..1), for video-only evaluation sets")
    syn.add_argument("--workers", type=non_negative_int, default=0, help="encoding processes (0: automatic)")
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
    stats.add_argument("--audio-preset", choices=list(AUDIO_PRESETS), default="table5",
                       help="spectrogram preset (reference: the paper's released checkpoints' spectrogram)")
    stats.add_argument("--out", help="output .npz (None: MANIFEST without .csv + .PRESET-stats.npz)")
    stats.add_argument("--workers", type=non_negative_int, default=2, help="worker processes (0: in this process)")
    stats.add_argument("--max-seconds", type=non_negative_float, default=30.0, help="audio read per file")
    stats.add_argument("--quiet", action="store_true", help="no progress bar")
    stats.set_defaults(handler=_stats)
