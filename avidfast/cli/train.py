"""`avidfast train` and `avidfast demo`."""
import argparse
import json
import signal
from typing import List

from avidfast.cli.common import UserError, positive_int


def _train(args: argparse.Namespace) -> None:
    from avidfast.config import load_config
    from avidfast.train.loop import train

    overrides = list(args.set or [])
    if args.init_from_reference:  # replaces a CMA config's loss.init_from; JSON quoting keeps the path a string
        overrides += ["loss.init_from=null", "loss.init_from_reference=" + json.dumps(args.init_from_reference)]
    try:
        cfg = load_config(args.config, overrides)
        result = train(cfg, resume={"no": False, "yes": True, "auto": "auto"}[args.resume],
                       trust_reference=args.trust_reference)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    if result.interrupted:  # the shell's convention: 128 + the signal (Ctrl-C: 130, SIGTERM: 143)
        raise SystemExit(128 + int(result.signal or signal.SIGTERM))


def _demo(args: argparse.Namespace) -> None:
    from avidfast.demo import DemoSettings, run_demo

    settings = DemoSettings(out_dir=args.out, videos=args.videos, classes=args.classes, seconds=args.seconds,
                            colour_cue=args.colour_cue, held_out_videos=args.held_out_videos,
                            seed=args.seed, epochs=args.epochs, progress=not args.quiet,
                            overrides=args.set or [])
    run_demo(settings)


def _shipped_configs() -> List[str]:
    from avidfast.config import shipped_configs

    return shipped_configs()


def register(commands) -> None:
    """Adds train and demo to the top-level subparsers."""
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
    train.add_argument("--resume", nargs="?", const="yes", default="no", choices=("no", "yes", "auto"),
                       help="continue the run from its last checkpoint: --resume (or --resume yes) refuses a folder "
                            "without one; --resume auto continues when there is one and starts otherwise (for "
                            "torchrun --max-restarts)")
    train.add_argument("--init-from-reference", metavar="PATH",
                       help="start the model, memory banks and Z from a checkpoint of the paper's code (a released "
                            ".pth.tar); replaces loss.init_from of CMA configs")
    train.add_argument("--trust-reference", action="store_true",
                       help="read --init-from-reference fully when weights_only loading fails (unpickling can run "
                            "code: only for files from a source you trust)")
    train.set_defaults(handler=_train)

    demo = commands.add_parser(
        "demo", help="the whole method on this CPU: synthetic data, Cross-AVID training, probes",
        description="Writes two synthetic labelled sets (real H.264 + AAC clips), one to train on and a "
                    "held-out one, computes spectrogram statistics, trains Cross-AVID with the `demo` config "
                    "(Table 5 shapes, narrow), then measures on the held-out clips, for the trained network and "
                    "the same network at initialisation: video->audio and audio->video recall@1/5/10 of a "
                    "clip's own sound, class-level cross-modal precision@1 and a linear probe on the video "
                    "features, each with a 95%% interval, against the demo's goals. Writes OUT/results.json, "
                    "OUT/loss_curve.png, OUT/retrieval_grid.png, OUT/similarity_matrix.png and a TensorBoard "
                    "run; reruns reuse finished steps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--videos", type=positive_int, default=240, help="synthetic clips")
    demo.add_argument("--classes", type=positive_int, default=6, help="synthetic classes")
    demo.add_argument("--seconds", type=float, default=4.0, help="clip length")
    from avidfast.demo.run import DEMO_COLOUR_CUE

    demo.add_argument("--colour-cue", type=float, default=DEMO_COLOUR_CUE,
                      help="share of synthetic clips painted in their class's hue (others: random hue)")
    demo.add_argument("--held-out-videos", type=positive_int, default=180,
                      help="clips of a second synthetic set (seed + 1) that every measurement is made on")
    demo.add_argument("--epochs", type=positive_int, help="training epochs (None: the demo config's)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the probes")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE",
                      help="override a value of the demo training config, e.g. --set optim.lr=1e-3")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo)
