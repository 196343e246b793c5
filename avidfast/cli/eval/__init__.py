"""`avidfast eval`: the evaluation protocols, one module each (linear, memory, finetune, retrieval)."""
from avidfast.cli.eval import finetune, linear, memory, retrieval


def register(commands) -> None:
    """Adds `eval` and its protocols to the top-level subparsers."""
    evaluate = commands.add_parser(
        "eval", help="evaluate a pre-trained checkpoint: linear probes, memory probe, fine-tuning, retrieval",
        description="Every protocol reads an avidfast checkpoint (or one of the paper's released ones), "
                    "writes runs/eval/<name>/ (config.yaml, meta.json, eval.log, tb/, results.json) and "
                    "prints a table. --random-init runs the same protocol on the same architecture with "
                    "fresh weights: the baseline to compare with, in runs/eval/<name>-random/. A folder that "
                    "already holds an evaluation is refused unless --overwrite.",
    )
    protocols = evaluate.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    for module in (linear, memory, finetune, retrieval):
        module.register(protocols)
