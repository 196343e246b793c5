"""`avidfast eval memory`: linear classifiers on the memory-bank rows (Table 2)."""
import argparse

from avidfast.cli.common import non_negative_float, positive_float, positive_int
from avidfast.cli.eval.options import add_checkpoint_options


def _memory(args: argparse.Namespace) -> None:
    from avidfast.eval.memory_protocol import MemoryProbeSettings, run_memory_probe

    run_memory_probe(MemoryProbeSettings(
        checkpoint=args.checkpoint, labels=args.labels, root=args.root, random_init=args.random_init,
        trust=args.trust, repeats=args.repeats, train_fraction=args.train_fraction, epochs=args.epochs, lr=args.lr,
        weight_decay=args.weight_decay, seed=args.seed, device=args.device, name=args.name, out=args.out,
        overwrite=args.overwrite))


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
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="Adam weight decay")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits (and of --random-init)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--name", help="run name (None: memory)")
    parser.add_argument("--out", help="run folder (None: runs/eval/NAME, or runs/eval/NAME-random with --random-init)")
    parser.set_defaults(handler=_memory)
