"""`avidfast eval linear`: linear probes per block on the frozen video encoder (Table 1)."""
import argparse

from avidfast.cli.common import UserError
from avidfast.cli.eval.options import (add_checkpoint_options, add_config_options, load_eval_config_or_exit,
                                       load_pretrained_or_exit)


def _linear(args: argparse.Namespace) -> None:
    from avidfast.data.cpu_pipeline import TooManyBadSamples
    from avidfast.data.manifest import ManifestError
    from avidfast.eval.linear_protocol import run_linear_eval
    from avidfast.eval.run import start_run

    cfg = load_eval_config_or_exit(args)
    if cfg.protocol != "linear":
        raise UserError(f"{args.config}: protocol is '{cfg.protocol}'; use `avidfast eval {cfg.protocol}`")
    pretrained = load_pretrained_or_exit(args, cfg.seed)
    try:
        run = start_run(cfg.run_dir, cfg.to_dict(), cfg.run.device, cfg.run.precision,
                        {"checkpoint": pretrained.info, "protocol": "linear"}, cfg.seed)
        result = run_linear_eval(cfg, pretrained.model.video, run)
    except (ManifestError, ValueError, TooManyBadSamples) as error:
        raise UserError(str(error)) from None
    what = "random-init" if args.random_init else "trained"
    table = f"{cfg.name} ({what} {args.checkpoint})\n{result.format()}"
    run.finish({"protocol": "linear", "checkpoint": pretrained.info, **result.to_dict()}, table)


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
