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
    """The checkpoint of --checkpoint, as avidfast.checkpoints.pretrained.Pretrained (UserError when unusable)."""
    from avidfast.checkpoints.pretrained import PretrainedError, load_pretrained

    try:
        return load_pretrained(args.checkpoint, random_init=args.random_init, seed=seed, trust=args.trust)
    except PretrainedError as error:
        raise UserError(str(error)) from None


def load_eval_config_or_exit(args: argparse.Namespace, extra_overrides=()):
    """The EvalConfig of CONFIG and --set (UserError on a config mistake)."""
    from avidfast.eval.config import load_eval_config
    from avidfast.config import ConfigError

    try:
        return load_eval_config(args.config, list(args.set) + list(extra_overrides))
    except ConfigError as error:
        raise UserError(str(error)) from None


def run_config_protocol(args: argparse.Namespace, protocol: str, runner) -> None:
    """Runs a config-driven protocol (`linear` or `finetune`): reads CONFIG and the checkpoint,
    starts the run folder, calls ``runner(cfg, video_encoder, run)`` (its result has ``format()`` and
    ``to_dict()``), then writes results.json and prints the table. User mistakes become UserError."""
    from avidfast.data.cpu_pipeline import TooManyBadSamples
    from avidfast.data.manifest import ManifestError
    from avidfast.eval.run import start_run

    cfg = load_eval_config_or_exit(args)
    if cfg.protocol != protocol:
        raise UserError(f"{args.config}: protocol is '{cfg.protocol}'; use `avidfast eval {cfg.protocol}`")
    pretrained = load_pretrained_or_exit(args, cfg.seed)
    try:
        run = start_run(cfg.run_dir, cfg.to_dict(), cfg.run.device, cfg.run.precision,
                        {"checkpoint": pretrained.info, "protocol": protocol}, cfg.seed)
        result = runner(cfg, pretrained.model.video, run)
    except (ManifestError, ValueError, TooManyBadSamples) as error:
        raise UserError(str(error)) from None
    what = "random-init" if args.random_init else "trained"
    table = f"{cfg.name} ({what} {args.checkpoint})\n{result.format()}"
    run.finish({"protocol": protocol, "checkpoint": pretrained.info, **result.to_dict()}, table)
