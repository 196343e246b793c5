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
        description="Freezes the checkpoint's video encoder, max-pools every block's features, and trains one "
                    "linear classifier per block (BatchNorm without affine, then Linear) on augmented clips of "
                    "the training manifest, all together; tests on evenly spaced centre-cropped clips of the "
                    "test manifest: clip and video top-1 per block and the best block. The shipped "
                    "`kinetics-linear` is Table 4's Kinetics row.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_options(parser, shipped_eval_configs())
    add_checkpoint_options(parser)
    parser.set_defaults(handler=_linear)
