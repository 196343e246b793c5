"""Options shared by the `avidfast eval` protocols: the checkpoint, its baseline, config overrides."""
import argparse

from avidfast.cli.common import UserError


def add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    """--checkpoint (required), --random-init, --trust, --overwrite."""
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="avidfast checkpoint (runs/<name>/checkpoints/last.pt) or a released reference .pth.tar")
    parser.add_argument("--random-init", action="store_true",
                        help="same architecture, freshly initialised weights and random banks (the baseline; its "
                             "default run folder ends in -random)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the evaluation the run folder already holds (without it, such a folder is refused)")
    parser.add_argument("--trust", action="store_true",
                        help="allow a full unpickle of a reference checkpoint that weights_only=True cannot read "
                             "(only for files from a source you trust)")


def add_config_options(parser: argparse.ArgumentParser, shipped) -> None:
    """CONFIG (path or shipped name) and --set overrides."""
    parser.add_argument("config", metavar="CONFIG", help="YAML file, or a shipped protocol: " + ", ".join(shipped))
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="override a config value, e.g. --set data.train_manifest=ucf101/train1.csv")
    parser.add_argument("--folds", type=int, nargs="+", metavar="N", default=None,
                        help="run each fold N (UCF-101 / HMDB-51 official splits: 1 2 3): {fold} in "
                             "data.train_manifest / data.test_manifest becomes N, each run goes to "
                             "<run folder>/fold-N, and <run folder>/results.json gets every fold and mean +- std "
                             "(without it: one run on the manifests as given)")


def run_config_command(args: argparse.Namespace, protocol: str) -> None:
    """`avidfast eval linear | finetune`: reads CONFIG with its --set overrides, checks that it is a
    ``protocol`` config, and runs :func:`avidfast.eval.run.run_config_protocol` (with --folds:
    :func:`avidfast.eval.run.run_folds`)."""
    from avidfast.eval.config import load_eval_config
    from avidfast.eval.run import run_config_protocol, run_folds

    cfg = load_eval_config(args.config, args.set)
    if cfg.protocol != protocol:
        raise UserError(f"{args.config}: protocol is '{cfg.protocol}'; use `avidfast eval {cfg.protocol}`")
    if args.folds:
        run_folds(cfg, args.checkpoint, args.folds, random_init=args.random_init, trust=args.trust,
                  overwrite=args.overwrite)
        return
    run_config_protocol(cfg, args.checkpoint, random_init=args.random_init, trust=args.trust, overwrite=args.overwrite)
