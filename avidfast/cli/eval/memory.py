"""`avidfast eval memory`: linear classifiers on the memory-bank rows (Table 2)."""
import argparse
import os

from avidfast.cli.common import UserError, positive_int, read_manifest
from avidfast.cli.eval.options import add_checkpoint_options, load_pretrained_or_exit


def _memory(args: argparse.Namespace) -> None:
    from avidfast.eval.memory_probe import memory_probe
    from avidfast.eval.run import start_run

    pretrained = load_pretrained_or_exit(args, args.seed)
    if pretrained.video_bank is None or pretrained.audio_bank is None:
        raise UserError(f"{args.checkpoint}: holds no memory banks")
    labels_path = args.labels
    if labels_path is None:
        cfg = pretrained.train_config
        if cfg is None or not cfg.data.manifest:
            raise UserError("--labels: required (the training manifest, with labels, whose rows are the bank's slots)")
        labels_path = cfg.data.manifest
    manifest = read_manifest(labels_path, args.root)
    n = pretrained.video_bank.shape[0]
    if len(manifest) != n:
        raise UserError(f"--labels {labels_path}: {len(manifest)} rows, but the banks have {n} slots; "
                        "pass the manifest the model was trained on")
    if "label" not in manifest.columns:
        raise UserError(f"--labels {labels_path}: no 'label' column")
    classes = sorted({str(r["label"]) for r in manifest.rows if r.get("label") not in (None, "")})
    lookup = {c: i for i, c in enumerate(classes)}
    labels = [lookup[str(r["label"])] if r.get("label") not in (None, "") else -1 for r in manifest.rows]
    if len(classes) < 2:
        raise UserError(f"--labels {labels_path}: needs at least 2 classes, has {len(classes)}")
    name = args.name or "memory"
    out = args.out or os.path.join("runs", "eval", name)
    settings = {"repeats": args.repeats, "train_fraction": args.train_fraction, "epochs": args.epochs, "lr": args.lr,
                "weight_decay": args.weight_decay, "seed": args.seed, "labels": labels_path}
    try:
        run = start_run(out, settings, args.device, "fp32", {"checkpoint": pretrained.info, "protocol": "memory"},
                        args.seed)
    except (ValueError, RuntimeError) as error:
        raise UserError(f"--device {args.device}: {error}") from None
    result = memory_probe(pretrained.video_bank.float(), pretrained.audio_bank.float(), labels,
                          repeats=args.repeats, train_fraction=args.train_fraction, seed=args.seed,
                          epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, device=run.device)
    what = "random banks" if args.random_init else "trained banks"
    table = f"memory probe ({what}, {args.checkpoint})\n{result.format()}"
    run.finish({"protocol": "memory", "checkpoint": pretrained.info, **result.to_dict()}, table)


def register(protocols) -> None:
    """Adds `eval memory`."""
    parser = protocols.add_parser(
        "memory", help="linear classifiers on the memory banks: video, audio, combined (Table 2 protocol)",
        description="Trains a linear classifier on the checkpoint's memory rows (video, audio, and both "
                    "concatenated), the network untouched: random 70/30 splits of the labelled rows, repeated, "
                    "mean +- std of top-1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_checkpoint_options(parser)
    parser.add_argument("--labels", metavar="MANIFEST",
                        help="manifest with labels whose row i is memory slot i (None: the checkpoint's training manifest)")
    parser.add_argument("--root", help="folder the manifest's relative paths start from (None: its folder)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="random splits")
    parser.add_argument("--train-fraction", type=float, default=0.7, help="share of labelled rows for training")
    parser.add_argument("--epochs", type=positive_int, default=30, help="passes over the training rows")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits (and of --random-init)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--name", help="run name (None: memory)")
    parser.add_argument("--out", help="run folder (None: runs/eval/NAME)")
    parser.set_defaults(handler=_memory)
