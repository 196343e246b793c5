"""`avidfast eval finetune`: the whole video encoder fine-tuned on UCF-101 / HMDB-51 (Table 4)."""
import argparse

from avidfast.cli.eval.options import add_checkpoint_options, add_config_options, run_config_command


def _finetune(args: argparse.Namespace) -> None:
    run_config_command(args, "finetune")


def register(protocols) -> None:
    """Adds `eval finetune`."""
    from avidfast.eval.config import shipped_eval_configs

    parser = protocols.add_parser(
        "finetune", help="fine-tune the whole video encoder with a linear classifier (Table 4, UCF / HMDB rows)",
        description="Copies the checkpoint's video encoder, adds dropout and a linear classifier on its pooled "
                    "output and trains the whole network on augmented clips of the training manifest (Adam, "
                    "lr x gamma at the milestones); tests on evenly spaced centre-cropped clips of the test "
                    "manifest: clip top-1 and video top-1 (softmax averaged over a video's clips), each test video "
                    "once. Writes "
                    "results.json and finetuned.pt. The shipped ucf101-8x224, ucf101-32x224, hmdb51-8x224 and "
                    "hmdb51-32x224 are Table 4's rows (with the reference's 5 classifier-only warm-up epochs). "
                    "Video only: files without sound are fine. Folds: write each fold's lists with `avidfast "
                    "manifest ucf101 LIST_DIR train1.csv --fold N --split train` (and --split test; hmdb51 "
                    "likewise), then --folds 1 2 3 --set data.train_manifest=train{fold}.csv --set "
                    "data.test_manifest=test{fold}.csv --set data.root=VIDEO_DIR: each fold in "
                    "<run folder>/fold-N, every fold and mean +- std in <run folder>/results.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_options(parser, shipped_eval_configs())
    add_checkpoint_options(parser)
    parser.set_defaults(handler=_finetune)
