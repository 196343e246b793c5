"""`avidfast eval retrieval`: cross-modal recall@k and k-NN classification from the embeddings."""
import argparse
import dataclasses
import os
from typing import List, Optional

from avidfast.cli.common import UserError, check_device, non_negative_int, positive_int, read_manifest
from avidfast.cli.eval.options import add_checkpoint_options, load_pretrained_or_exit
from avidfast.data.audio import PRESETS as AUDIO_PRESETS


def k_list(text: str) -> List[int]:
    """``"1,5,10"`` -> [1, 5, 10] (sorted, distinct, each positive)."""
    try:
        ks = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, e.g. 1,5,10, "
                                         f"got {text!r}") from None
    if ks[0] < 1:
        raise argparse.ArgumentTypeError(f"every k must be a positive integer, got {text!r}")
    return ks


def positive_float(text: str) -> float:
    """A float option that must be above 0 (argparse type)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _data_section(args: argparse.Namespace, pretrained):
    """The EvalDataSection of the run: clip shape and audio preset / stats from the checkpoint's
    training config, each overridable by an option (required for reference checkpoints)."""
    from avidfast.eval.config import EvalDataSection
    from avidfast.config import AudioSection

    data = EvalDataSection(train_manifest=args.train_manifest, test_manifest=args.manifest, root=args.root,
                           workers=args.workers, clips_per_video=args.clips_per_video)
    trained = pretrained.train_config
    if trained is None:
        missing = [name for name, value in (("--frames", args.frames), ("--crop", args.crop),
                                            ("--audio-preset", args.audio_preset)) if value is None]
        if missing:
            raise UserError(f"--checkpoint {args.checkpoint}: a reference checkpoint holds no training config to "
                            f"take the clip shape from; pass {', '.join(missing)} (Table 5 networks: --frames 16 "
                            "--crop 112 --audio-preset table5; Table 6: --frames 8 --crop 224 --audio-preset table6)")
        video, audio = data.video, AudioSection()
    else:
        video, audio = trained.data.video, trained.data.audio
    data.video = dataclasses.replace(data.video, frames=args.frames or video.frames, fps=args.fps or video.fps,
                                     crop=args.crop or video.crop)
    stats, stats_from = audio.stats, "the checkpoint's training config (data.audio.stats)"
    if args.audio_stats is not None:
        stats, stats_from = (None if args.audio_stats.lower() == "none" else args.audio_stats), "--audio-stats"
    if stats is not None and not os.path.isfile(stats):
        raise UserError(f"{stats_from}: spectrogram statistics {stats}: no such file; pass --audio-stats PATH "
                        "(or --audio-stats none to skip the normalisation)")
    data.audio = AudioSection(preset=args.audio_preset or audio.preset, stats=stats)
    return data


def _check_audio(manifest, option: str, path: str) -> None:
    """Refuses a manifest whose first video has no readable audio stream (retrieval needs both)."""
    from avidfast.data.probe import probe

    found = probe(manifest.audio_path(0), check="header")
    if found.error or not found.has_audio:
        reason = found.error or "no audio stream"
        raise UserError(f"{option} {path}: row 1 ({manifest.rows[0]['path']}): {reason}; retrieval needs the sound "
                        "of every video (`avidfast prepare` rejects files without audio)")


def _labels(train, test, args: argparse.Namespace) -> Optional[List[str]]:
    """The class list of k-NN (the training manifest's), after checking both manifests' labels."""
    from avidfast.data.manifest import ManifestError

    if train is None:
        return None
    for manifest, option, path in ((train, "--train-manifest", args.train_manifest),
                                   (test, "--manifest", args.manifest)):
        if not manifest.has_labels:
            raise UserError(f"{option} {path}: k-NN needs a 'label' on every row (leave out --train-manifest "
                            "for retrieval only)")
    try:
        test.label_indices(train.classes)
    except ManifestError as error:
        raise UserError(f"--manifest {args.manifest}: {error}") from None
    return train.classes


def _retrieval(args: argparse.Namespace) -> None:
    from avidfast.data.cpu_pipeline import SampleFailed, TooManyBadSamples
    from avidfast.eval.config import EvalConfig, EvalOptimSection
    from avidfast.eval.data import test_loader
    from avidfast.eval.retrieval import embed_clips, evaluate_retrieval, gather_to_rank0
    from avidfast.eval.run import start_run

    test = read_manifest(args.manifest, args.root)
    train = read_manifest(args.train_manifest, args.root) if args.train_manifest else None
    classes = _labels(train, test, args)
    _check_audio(test, "--manifest", args.manifest)
    if train is not None:
        _check_audio(train, "--train-manifest", args.train_manifest)
    check_device(args.device)
    pretrained = load_pretrained_or_exit(args, args.seed)
    name = args.name or "retrieval"
    cfg = EvalConfig(name=name, seed=args.seed, out_dir=args.out, data=_data_section(args, pretrained),
                     optim=EvalOptimSection(batch_size=args.batch))
    settings = {"protocol": "retrieval", "checkpoint": args.checkpoint, "random_init": args.random_init,
                "ks": args.k, "knn_k": args.knn_k, "temperature": args.knn_temperature, "batch": args.batch,
                "seed": args.seed, "data": dataclasses.asdict(cfg.data)}
    run = start_run(cfg.run_dir, settings, args.device, "fp32",
                    {"checkpoint": pretrained.info, "protocol": "retrieval"}, args.seed)
    model = pretrained.model.to(run.device)
    progress = not args.no_progress and run.rank == 0
    try:
        embedded = {}
        for key, manifest in (("test", test), ("train", train)):
            if manifest is not None:
                loader = test_loader(cfg, manifest, classes, run.rank, run.world)
                embedded[key] = gather_to_rank0(embed_clips(model, loader, run.device, progress))
        if run.rank != 0:
            return
        result = evaluate_retrieval(embedded["test"], embedded.get("train"), args.k, args.knn_k, args.knn_temperature,
                                    len(classes) if classes else None, run.device)
    except (ValueError, TooManyBadSamples, SampleFailed) as error:
        raise UserError(str(error).strip().splitlines()[-1]) from None  # a worker's error ends with its message
    what = "random-init" if args.random_init else "trained"
    table = f"retrieval ({what} {args.checkpoint})\n{result.format()}"
    run.finish({"protocol": "retrieval", "checkpoint": pretrained.info, "classes": classes, **result.to_dict()}, table)


def register(protocols) -> None:
    """Adds `eval retrieval`."""
    parser = protocols.add_parser(
        "retrieval", help="video-to-audio / audio-to-video recall@k and k-NN classification from the embeddings",
        description="Embeds evenly spaced centre-cropped clips of every held-out video (--manifest) with the "
                    "checkpoint's video and audio networks, averages each video's clips per modality, and ranks "
                    "every video's audio for each video (and the reverse) by cosine similarity: recall@k (ties "
                    "counted against the query) and median rank, with chance k/N. With --train-manifest (both "
                    "manifests labelled) also weighted k-NN top-1 of the held-out videos from the training ones "
                    "(weights exp(s/T)), for video, audio and concatenated embeddings. Clip shape and audio "
                    "preset come from the checkpoint's training config unless overridden.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_checkpoint_options(parser)
    parser.add_argument("--manifest", required=True, metavar="HELD_OUT",
                        help="held-out videos (queries and candidates)")
    parser.add_argument("--train-manifest", metavar="LABELLED",
                        help="labelled videos the k-NN classifier searches (None: retrieval only)")
    parser.add_argument("--root", help="folder the manifests' relative paths start from (None: each manifest's)")
    parser.add_argument("--clips-per-video", type=positive_int, default=1, help="evenly spaced clips per video")
    parser.add_argument("--batch", type=positive_int, default=32, help="clips per batch and process")
    parser.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader workers per process")
    parser.add_argument("--k", type=k_list, default=[1, 5, 10], metavar="K,K,...", help="the k of recall@k")
    parser.add_argument("--knn-k", type=positive_int, default=20, help="neighbours of the k-NN classifier")
    parser.add_argument("--knn-temperature", type=positive_float, default=0.07,
                        help="k-NN vote weights exp(similarity / T)")
    parser.add_argument("--frames", type=positive_int, help="frames per clip (None: the checkpoint's training config)")
    parser.add_argument("--fps", type=positive_float, help="frame rate of the clips (None: the training config's)")
    parser.add_argument("--crop", type=positive_int, help="square crop in pixels (None: the training config's)")
    parser.add_argument("--audio-preset", choices=list(AUDIO_PRESETS),
                        help="spectrogram preset (None: the training config's)")
    parser.add_argument("--audio-stats", metavar="NPZ",
                        help="spectrogram statistics of `avidfast stats`, or none (None: the training config's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--name", help="run name (None: retrieval)")
    parser.add_argument("--out", help="run folder (None: runs/eval/NAME)")
    parser.set_defaults(handler=_retrieval)
