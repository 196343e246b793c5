"""`avidfast eval retrieval`: cross-modal recall@k and k-NN classification from the embeddings."""
import argparse
from typing import List

from avidfast.cli.common import non_negative_int, positive_float, positive_int
from avidfast.cli.eval.options import add_checkpoint_options
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


def _retrieval(args: argparse.Namespace) -> None:
    from avidfast.eval.retrieval_protocol import RetrievalSettings, run_retrieval

    run_retrieval(RetrievalSettings(
        checkpoint=args.checkpoint, manifest=args.manifest, train_manifest=args.train_manifest, root=args.root,
        random_init=args.random_init, trust=args.trust, clips_per_video=args.clips_per_video, batch=args.batch,
        workers=args.workers, ks=args.k, knn_k=args.knn_k, knn_temperature=args.knn_temperature, frames=args.frames,
        fps=args.fps, crop=args.crop, audio_preset=args.audio_preset, audio_stats=args.audio_stats, seed=args.seed,
        device=args.device, progress=not args.no_progress, name=args.name, out=args.out, video_only=args.video_only,
        overwrite=args.overwrite))


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
                    "preset come from the checkpoint's training config unless overridden. --video-only reads no "
                    "sound at all (files without an audio stream are fine) and reports the video k-NN only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_checkpoint_options(parser)
    parser.add_argument("--manifest", required=True, metavar="HELD_OUT",
                        help="held-out videos (queries and candidates)")
    parser.add_argument("--train-manifest", metavar="LABELLED",
                        help="labelled videos the k-NN classifier searches (None: retrieval only)")
    parser.add_argument("--video-only", action="store_true",
                        help="read no sound (sets with silent videos): only the video k-NN, which needs "
                             "--train-manifest")
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
    parser.add_argument("--out", help="run folder (None: runs/eval/NAME, or runs/eval/NAME-random with --random-init)")
    parser.set_defaults(handler=_retrieval)
