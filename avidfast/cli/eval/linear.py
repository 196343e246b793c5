"""`avidfast eval linear`: linear probes per block on the frozen video encoder (Table 1)."""
import argparse

from avidfast.cli.eval.options import add_checkpoint_options, add_config_options, run_config_command


def _linear(args: argparse.Namespace) -> None:
    run_config_command(args, "linear")


def register(protocols) -> None:
    """Adds `eval linear`."""
    from avidfast.eval.config import shipped_eval_configs

    parser = protocols.add_parser(
        "linear", help="linear probes per block on the frozen video encoder (Table 1 protocol)",
        description="Freezes the checkpoint's video encoder and trains one linear classifier per block "
                    "(Table 1's conv1, block1..block4; default block1..block4) on augmented clips of the training "
                    "manifest, all together. linear.variant=reference (default): the reference's probe, each "
                    "block max-pooled to its spatial grid (12x12, 8x8, 6x6, 4x4), BatchNorm1d, Linear; "
                    "linear.variant=global_max: one maximum per channel (cheap). linear.backbone_bn=train "
                    "(default, as the reference): the encoder's BatchNorm uses batch statistics while the probes "
                    "train. Video only. Tests on evenly spaced centre-cropped clips of the test manifest, each "
                    "test video once: clip and video top-1 per block and the best block. The shipped "
                    "`kinetics-linear` is Table 4's Kinetics row, `kinetics-linear-8x224` the reference's "
                    "Kinetics linear config.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_options(parser, shipped_eval_configs())
    add_checkpoint_options(parser)
    parser.set_defaults(handler=_linear)
