"""`avidfast eval memory`: the memory probe of a checkpoint, from its path to results.json (Table 2).

:func:`run_memory_probe` loads the checkpoint's memory banks, labels their slots from a manifest
(row i = slot i; by default the checkpoint's training manifest, found from what the checkpoint
records: avidfast.checkpoints.pretrained.locate_training_manifest), starts the run folder
``runs/eval/<name>/``, runs :func:`~avidfast.eval.memory_probe.memory_probe` and writes
results.json. Class indices are positions in ``Manifest.classes``, as in every other protocol;
rows without a label are left out of the probe.

Errors name the settings as the command line's options (``--labels``, ``--device``), since the
command passes them through unchanged.
"""
import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from avidfast.data.manifest import Manifest
from avidfast.errors import EvalError
from avidfast.eval.memory_probe import MemoryProbeResult

log = logging.getLogger(__name__)


@dataclass
class MemoryProbeSettings:
    """What `avidfast eval memory` runs (its options, one field each)."""

    checkpoint: str  # avidfast checkpoint or a released reference one
    labels: Optional[str] = None  # manifest whose row i is memory slot i (None: the checkpoint's training manifest)
    root: Optional[str] = None  # folder the manifest's relative paths start from (None: its folder)
    random_init: bool = False  # random unit-norm banks of the same size (the baseline)
    trust: bool = False  # allow a full unpickle of a reference checkpoint
    repeats: int = 5  # random splits
    train_fraction: float = 0.7  # share of the labelled rows for training
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0  # seed of the splits (and of random_init)
    device: str = "auto"  # auto, cpu or cuda[:N]
    name: Optional[str] = None  # run name (None: memory)
    out: Optional[str] = None  # run folder (None: runs/eval/NAME, runs/eval/NAME-random for random_init)
    overwrite: bool = False  # replace the evaluation a run folder already holds (else refused)

    @property
    def run_dir(self) -> str:
        from avidfast.eval.run import default_run_dir

        return self.out or default_run_dir(self.name or "memory", self.random_init)


def memory_labels(manifest: Manifest, source: str = "--labels") -> Tuple[List[str], List[int]]:
    """(classes, label of every row): ``Manifest.classes`` and each row's position in it, -1 for a
    row without a label. EvalError (naming ``source``) without a label column or with fewer than 2
    classes."""
    if "label" not in manifest.columns:
        raise EvalError(f"{source}: no 'label' column")
    classes = manifest.classes
    if len(classes) < 2:
        raise EvalError(f"{source}: needs at least 2 classes, has {len(classes)}")
    return classes, manifest.label_indices(classes, unlabelled=-1)


def run_memory_probe(settings: MemoryProbeSettings) -> MemoryProbeResult:
    """The memory probe of ``settings.checkpoint``: linear classifiers on its video, audio and
    concatenated memory rows, ``repeats`` random splits; writes the run folder and results.json and
    prints the table (Table 2 layout). Returns the :class:`MemoryProbeResult`.

    Raises PretrainedError (checkpoint), ManifestError (labels manifest) or EvalError (no banks,
    labels that do not fit the banks, device, split fraction), each naming the input.
    """
    from avidfast.data.manifest import manifest_fingerprint, read_manifest
    from avidfast.eval.memory_probe import memory_probe
    from avidfast.checkpoints.pretrained import load_pretrained, locate_training_manifest
    from avidfast.eval.run import start_run

    s = settings
    pretrained = load_pretrained(s.checkpoint, random_init=s.random_init, seed=s.seed, trust=s.trust)
    if pretrained.video_bank is None or pretrained.audio_bank is None:
        raise EvalError(f"{s.checkpoint}: holds no memory banks")
    labels_path, root = s.labels, s.root
    if labels_path is None:
        cfg = pretrained.train_config
        if cfg is None or not (cfg.data.manifest or pretrained.manifest):
            raise EvalError("--labels: required (the training manifest, with labels, whose rows are the bank's slots)")
        labels_path, found_root = locate_training_manifest(pretrained, "--labels")
        root = root if root is not None else found_root
    manifest = read_manifest(labels_path, root)
    recorded = (pretrained.manifest or {}).get("fingerprint")
    if s.labels is not None and recorded and not s.random_init and manifest_fingerprint(manifest) != recorded:
        log.warning("--labels %s does not list the videos %s was trained on in the same order (rows fingerprint "
                    "differs): slot i may not be row i", s.labels, s.checkpoint)
    n = pretrained.video_bank.shape[0]
    if len(manifest) != n:
        raise EvalError(f"--labels {labels_path}: {len(manifest)} rows, but the banks have {n} slots; "
                        "pass the manifest the model was trained on")
    classes, labels = memory_labels(manifest, f"--labels {labels_path}")
    if not 0 < s.train_fraction < 1:
        raise EvalError(f"--train-fraction {s.train_fraction}: must lie between 0 and 1")
    if not (math.isfinite(s.lr) and s.lr > 0) or not (math.isfinite(s.weight_decay) and s.weight_decay >= 0):
        raise EvalError(f"--lr {s.lr} / --weight-decay {s.weight_decay}: the lr must be positive, the weight decay "
                        "0 or more")
    settings_dict = {"repeats": s.repeats, "train_fraction": s.train_fraction, "epochs": s.epochs, "lr": s.lr,
                     "weight_decay": s.weight_decay, "seed": s.seed, "labels": labels_path}
    run = start_run(s.run_dir, settings_dict, s.device, "fp32", {"checkpoint": pretrained.info, "protocol": "memory"},
                    s.seed, device_option="--device", overwrite=s.overwrite, elsewhere="--name or --out")
    result = memory_probe(pretrained.video_bank.float(), pretrained.audio_bank.float(), labels,
                          num_classes=len(classes), repeats=s.repeats, train_fraction=s.train_fraction,
                          seed=s.seed, epochs=s.epochs, lr=s.lr, weight_decay=s.weight_decay, device=run.device)
    what = "random banks" if s.random_init else "trained banks"
    table = f"memory probe ({what}, {s.checkpoint})\n{result.format()}"
    run.finish({"protocol": "memory", "checkpoint": pretrained.info, **result.to_dict()}, table)
    return result
