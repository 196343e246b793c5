"""Evaluation configuration: the transfer protocols of the supplement's Table 4 as typed YAML.

Same rules as the training configuration (:mod:`avidfast.config`): nested dataclasses,
every key and type checked, dotted ``--set key=value`` overrides. Shipped protocols live in
``avidfast/configs/eval/`` (``avidfast eval linear kinetics-linear ...``).
"""
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from avidfast.config import (PACKAGE_CONFIGS, AudioSection, ConfigError, VideoSection, build_typed,
                             check_audio_section, check_batch_fields, check_optim_values, check_values,
                             check_video_section, read_tree, shipped_configs, split_batch)

EVAL_CONFIGS = os.path.join(PACKAGE_CONFIGS, "eval")
PROTOCOLS = ("linear", "finetune")
LINEAR_VARIANTS = ("reference", "global_max")


def _no_jitter_video() -> VideoSection:
    """Table 4, Kinetics row: multi-scale crop and flip, no colour jitter."""
    return VideoSection(brightness=0.0, saturation=0.0, contrast=0.0, hue=0.0)


@dataclass
class EvalDataSection:
    """Labelled clips: a training and a test manifest, or one manifest split by video."""

    train_manifest: Optional[str] = None  # required: manifest with a label column
    test_manifest: Optional[str] = None  # None: a stratified split of train_manifest's videos
    test_fraction: float = 0.3  # share of each class's videos held out when test_manifest is None
    root: Optional[str] = None  # folder the manifests' relative paths start from (None: each manifest's)
    workers: int = 4  # DataLoader workers
    clips_per_video: int = 10  # evenly spaced test clips per video (video-level accuracy averages them)
    max_bad_fraction: float = 0.01  # training clips only: share of an epoch's reads replaced before stopping
    on_bad_test_video: str = "error"  # error (stop, naming it) or exclude (left out, listed in results.json)
    video: VideoSection = field(default_factory=_no_jitter_video)
    audio: AudioSection = field(default_factory=AudioSection)  # not read by linear / finetune (video only)


@dataclass
class EvalOptimSection:
    """Optimisation of Table 4 (bs, lr, wd, ep, es, gm, mls); Kinetics linear-probe defaults."""

    batch_size: Optional[int] = 32  # clips per step and process (null when global_batch_size is set)
    # clips per step over all processes: each of W processes takes global_batch_size / W (the paper's configs)
    global_batch_size: Optional[int] = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: int = 20
    samples_per_epoch: Optional[int] = 10_000  # "es" (None: one pass over the training videos)
    milestones: List[int] = field(default_factory=lambda: [8, 12, 15, 18])  # epochs where lr *= gamma
    gamma: float = 0.3
    optimizer: str = "adam"  # adam or sgd (momentum 0.9)


@dataclass
class LinearSection:
    """Linear probes on the frozen video encoder (supplement Table 1; avidfast.eval.linear_protocol)."""

    blocks: List[str] = field(default_factory=list)  # of conv1, block1..block4 (empty: block1..block4, Table 1)
    variant: str = "reference"  # reference (per-block grids, BatchNorm1d) or global_max (cheap: 1 value per channel)
    backbone_bn: str = "train"  # train (the reference: batch statistics while probing) or eval (running statistics)


@dataclass
class FinetuneSection:
    """Fine-tuning of the whole video encoder with a linear classifier (Table 4, UCF / HMDB rows)."""

    dropout: float = 0.5  # before the classifier
    freeze_bn: bool = False  # keep BatchNorm statistics from pre-training
    warmup_epochs: int = 0  # epochs training the classifier alone first (the reference's warm-up: 5)


@dataclass
class RunSection:
    """Execution: device, precision, progress."""

    device: str = "auto"  # auto (cuda if visible, else cpu), cpu, cuda, cuda:N
    precision: str = "auto"  # auto (GPU: bf16 where supported; CPU: fp32), bf16, fp32
    progress: bool = True
    log_every: int = 10  # steps between TensorBoard scalars


@dataclass
class EvalConfig:
    """One evaluation run."""

    name: str = "eval"
    protocol: str = "linear"  # linear or finetune
    seed: int = 0
    out_dir: Optional[str] = None  # None: runs/eval/<name> (runs/eval/<name>-random for --random-init)
    data: EvalDataSection = field(default_factory=EvalDataSection)
    optim: EvalOptimSection = field(default_factory=EvalOptimSection)
    linear: LinearSection = field(default_factory=LinearSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    run: RunSection = field(default_factory=RunSection)

    def per_process_batch(self, world_size: int = 1) -> int:
        """Clips per step on each of ``world_size`` processes: optim.batch_size, or
        optim.global_batch_size / world_size (ConfigError when it does not divide)."""
        return split_batch(self.optim, world_size)

    def validate(self) -> "EvalConfig":
        """Checks values that types alone do not; returns self."""
        choices = {
            "protocol": (self.protocol, PROTOCOLS),
            "optim.optimizer": (self.optim.optimizer, ("adam", "sgd")),
            "linear.variant": (self.linear.variant, LINEAR_VARIANTS),
            "linear.backbone_bn": (self.linear.backbone_bn, ("train", "eval")),
            "data.on_bad_test_video": (self.data.on_bad_test_video, ("error", "exclude")),
            "run.precision": (self.run.precision, ("auto", "bf16", "fp32")),
            "data.audio.preset": (self.data.audio.preset, ("table5", "table6", "reference")),
        }
        positive = {
            "optim.epochs": self.optim.epochs,
            "data.clips_per_video": self.data.clips_per_video, "data.video.frames": self.data.video.frames,
            "data.video.crop": self.data.video.crop, "run.log_every": self.run.log_every,
        }
        check_values(choices, positive)
        check_optim_values(self.optim)
        check_batch_fields(self.optim)
        if not 0 < self.data.test_fraction < 1:
            raise ConfigError(f"data.test_fraction must be between 0 and 1, got {self.data.test_fraction}")
        if not 0 <= self.finetune.dropout < 1:
            raise ConfigError(f"finetune.dropout must be in [0, 1), got {self.finetune.dropout}")
        check_video_section(self.data.video)
        check_audio_section(self.data.audio)
        if not 0 <= self.data.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {self.data.max_bad_fraction}")
        if self.finetune.warmup_epochs < 0:
            raise ConfigError(f"finetune.warmup_epochs must be 0 or more, got {self.finetune.warmup_epochs}")
        if self.data.workers < 0:
            raise ConfigError(f"data.workers must be 0 or more, got {self.data.workers}")
        if not self.data.train_manifest:
            raise ConfigError("data.train_manifest: required (a manifest with a label column), e.g. "
                              "--set data.train_manifest=ucf101/train1.csv")
        if not (self.run.device in ("auto", "cpu", "cuda") or self.run.device.startswith("cuda:")):
            raise ConfigError(f"run.device: '{self.run.device}' is not auto, cpu, cuda or cuda:N")
        return self

    @property
    def run_dir(self) -> str:
        """The trained network's run folder: out_dir, or runs/eval/<name> (a --random-init baseline
        defaults to runs/eval/<name>-random: avidfast.eval.run.default_run_dir)."""
        return self.out_dir or os.path.join("runs", "eval", self.name)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def shipped_eval_configs() -> List[str]:
    """Names of the evaluation protocols shipped in avidfast/configs/eval."""
    return shipped_configs(EVAL_CONFIGS)


def load_eval_config(path: str, overrides: Sequence[str] = ()) -> EvalConfig:
    """Reads an evaluation YAML (path or shipped name), applies ``key=value`` overrides, validates."""
    return build_typed(EvalConfig, read_tree(path, overrides, EVAL_CONFIGS)).validate()
