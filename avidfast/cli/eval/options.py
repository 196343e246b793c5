"""Options shared by the `avidfast eval` protocols: the checkpoint, its baseline, config overrides."""
import argparse

from avidfast.cli.common import UserError


def add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    """--checkpoint (required), --random-init, --trust."""
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="avidfast checkpoint (runs/<name>/checkpoints/last.pt) or a released reference .pth.tar")
    parser.add_argument("--random-init", action="store_true",
                        help="same architecture, freshly initialised weights and random banks (the baseline)")
    parser.add_argument("--trust", action="store_true",
                        help="allow a full unpickle of a reference checkpoint that weights_only=True cannot read "
                             "(only for files from a source you trust)")


def add_config_options(parser: argparse.ArgumentParser, shipped) -> None:
    """CONFIG (path or shipped name) and --set overrides."""
    parser.add_argument("config", metavar="CONFIG", help="YAML file, or a shipped protocol: " + ", ".join(shipped))
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="override a config value, e.g. --set data.train_manifest=ucf101/train1.csv")


def load_pretrained_or_exit(args: argparse.Namespace, seed: int = 0):
    """The checkpoint of --checkpoint, as avidfast.eval.pretrained.Pretrained (UserError when unusable)."""
    from avidfast.eval.pretrained import PretrainedError, load_pretrained

    try:
        return load_pretrained(args.checkpoint, random_init=args.random_init, seed=seed, trust=args.trust)
    except PretrainedError as error:
        raise UserError(str(error)) from None


def load_eval_config_or_exit(args: argparse.Namespace, extra_overrides=()):
    """The EvalConfig of CONFIG and --set (UserError on a config mistake)."""
    from avidfast.eval.config import load_eval_config
    from avidfast.train.config import ConfigError

    try:
        return load_eval_config(args.config, list(args.set) + list(extra_overrides))
    except ConfigError as error:
        raise UserError(str(error)) from None
