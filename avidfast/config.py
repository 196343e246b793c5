"""Training configuration: nested dataclasses read from YAML, with dotted ``--set`` overrides.

Every key is checked: an unknown key or a value of the wrong type is a :class:`ConfigError`
naming the key and what is allowed. The resolved configuration is written into each run folder.
"""
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

from avidfast.data.audio import DALI_PRESETS
from avidfast.data.audio import PRESETS as AUDIO_PRESETS
from avidfast.errors import AvidfastError
from avidfast.losses.avid import MODES as AVID_MODES
from avidfast.losses.bank_pair import PARTITIONS
from avidfast.losses.memory_bank import STORAGE_DTYPES
from avidfast.models.audio import AUDIO_PRESETS as AUDIO_NETWORKS
from avidfast.models.av import PRESETS as MODEL_PRESETS
from avidfast.ops.cma import AGREEMENTS

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
NON_FINITE_STEPS = ("stop", "skip")
PIPELINES = ("cpu", "dali")
LOSS_KINDS = ("avid", "cma")

PACKAGE_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class ConfigError(AvidfastError, ValueError):
    """A configuration mistake: the message names the key and what to do."""


def check_values(choices: Dict[str, Tuple[Any, Sequence[Any]]], positive: Dict[str, int]) -> None:
    """ConfigError naming the first key whose value is not among its allowed ones (``choices``:
    key -> (value, allowed)) or is below 1 (``positive``: key -> value)."""
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}")
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be positive, got {value}")


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """ConfigError ``key must be <rule>, got <value>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_video_section(video: "VideoSection", prefix: str = "data.video") -> None:
    """The ranges of a video section's values (their types are already checked)."""
    require(_number(video.fps) and video.fps > 0, f"{prefix}.fps", video.fps, "a positive number (frames per second)")
    require(_number(video.min_area) and 0 < video.min_area <= 1, f"{prefix}.min_area", video.min_area,
            "in (0, 1] (the smallest crop, as a share of the frame's area)")
    require(_number(video.flip) and 0 <= video.flip <= 1, f"{prefix}.flip", video.flip, "a probability in [0, 1]")
    for name in ("brightness", "contrast", "saturation"):
        value = getattr(video, name)
        require(_number(value) and value >= 0, f"{prefix}.{name}", value, "0 or more (jitter factors 1 +- x)")
    require(_number(video.hue) and 0 <= video.hue <= 0.5, f"{prefix}.hue", video.hue,
            "in [0, 0.5] (a hue shift of +- x turns)")


def check_audio_section(audio: "AudioSection", prefix: str = "data.audio") -> None:
    """The ranges of an audio section's jitter values."""
    low, high = audio.volume
    require(_number(low) and _number(high) and 0 < low <= high, f"{prefix}.volume", list(audio.volume),
            "[low, high] gains with 0 < low <= high, e.g. [0.9, 1.1]")
    require(_number(audio.max_offset) and audio.max_offset >= 0, f"{prefix}.max_offset", audio.max_offset,
            "0 or more seconds")
    low, high = audio.duration
    require(_number(low) and _number(high) and 0 < low <= high, f"{prefix}.duration", list(audio.duration),
            "[shortest, longest] seconds with 0 < shortest <= longest, e.g. [1.4, 2.8]")


def check_optim_values(optim: Any, prefix: str = "optim") -> None:
    """The ranges of an optimisation section's shared values: lr, weight_decay, gamma,
    samples_per_epoch, milestones."""
    require(_number(optim.lr) and optim.lr > 0, f"{prefix}.lr", optim.lr, "a positive number")
    require(_number(optim.weight_decay) and optim.weight_decay >= 0, f"{prefix}.weight_decay", optim.weight_decay,
            "0 or more")
    require(_number(optim.gamma) and optim.gamma > 0, f"{prefix}.gamma", optim.gamma,
            "a positive number (the lr factor at each milestone)")
    require(optim.samples_per_epoch is None or optim.samples_per_epoch >= 1, f"{prefix}.samples_per_epoch",
            optim.samples_per_epoch, "a positive number of clips, or null (one pass over the manifest)")
    require(all(m >= 1 for m in optim.milestones), f"{prefix}.milestones", optim.milestones,
            "epochs from 1 on (the lr changes after that many epochs)")


def check_batch_fields(optim: Any, prefix: str = "optim") -> None:
    """Exactly one of ``batch_size`` (clips per process) and ``global_batch_size`` (clips over all
    processes) of an optimisation section is set, and it is positive (ConfigError naming it)."""
    per_process, total = optim.batch_size, optim.global_batch_size
    if (per_process is None) == (total is None):
        raise ConfigError(
            f"set exactly one of {prefix}.batch_size (clips per process) and {prefix}.global_batch_size (clips over "
            f"all processes), got batch_size={per_process} and global_batch_size={total}; e.g. --set "
            f"{prefix}.batch_size=null to keep the global batch")
    key, value = (f"{prefix}.batch_size", per_process) if total is None else (f"{prefix}.global_batch_size", total)
    if value < 1:
        raise ConfigError(f"{key} must be positive, got {value}")


def split_batch(optim: Any, world_size: int, prefix: str = "optim") -> int:
    """Clips per step and process: ``optim.batch_size``, or ``optim.global_batch_size / world_size``
    (ConfigError naming the launch sizes that divide it when it does not)."""
    if optim.global_batch_size is None:
        return optim.batch_size
    total = optim.global_batch_size
    if total % world_size:
        fits = [w for w in range(1, min(total, 64) + 1) if total % w == 0]
        raise ConfigError(f"{prefix}.global_batch_size={total} does not divide over {world_size} processes: launch "
                          f"{', '.join(map(str, fits[-6:]))} processes, or --set {prefix}.global_batch_size="
                          f"{max(world_size, total - total % world_size)} (a multiple of {world_size})")
    return total // world_size


@dataclass
class VideoSection:
    """Video clips and their training augmentation (Table 3; sizes of Table 5 / 6)."""

    frames: int = 16
    fps: float = 16.0
    crop: int = 112
    min_area: float = 0.08  # multi-scale crop ("msc"): area fraction range [min_area, 1]
    flip: float = 0.5  # "hf"
    brightness: float = 0.4  # "bj"
    saturation: float = 0.4  # "sj"
    contrast: float = 0.4  # "cj"
    hue: float = 0.2  # "hj"

    def to_video_config(self):
        """The :class:`avidfast.data.video.VideoConfig` of this section."""
        from avidfast.data.video import VideoConfig

        return VideoConfig(frames=self.frames, fps=self.fps, crop=self.crop, min_area=self.min_area, flip=self.flip,
                           brightness=self.brightness, contrast=self.contrast, saturation=self.saturation,
                           hue=self.hue)


@dataclass
class AudioSection:
    """Audio spectrogram preset and its training jitter (supplement A)."""

    # table5: 129 x 100, table6: 257 x 200, reference: the released checkpoints' 257 x 200; its
    # frequency bins must be those of model.preset's audio network (validate checks)
    preset: str = "table5"
    # .npz of `avidfast stats`; None: training computes them (TrainingAudioSection), evaluation
    # does not normalise
    stats: Optional[str] = None
    volume: Tuple[float, float] = (0.9, 1.1)
    max_offset: float = 0.5  # seconds between audio and video starts
    duration: Tuple[float, float] = (1.4, 2.8)  # seconds, resized back to the preset's frames


@dataclass
class TrainingAudioSection(AudioSection):
    """The audio section of a training config: AudioSection, and whether to normalise."""

    # true: Z-normalise each frequency bin with data.audio.stats; with stats null, the statistics are
    # computed on first use and cached beside the manifest (MANIFEST.<preset>-stats.npz, reused after).
    # false: train on un-normalised dB values
    normalize: bool = True


@dataclass
class DataSection:
    """Where the clips are and how they are read."""

    manifest: Optional[str] = None  # required: CSV of `avidfast prepare`
    root: Optional[str] = None  # paths in the manifest are relative to this (None: its folder)
    pipeline: str = "cpu"  # cpu (DataLoader workers) or dali (GPU decode)
    shards: Optional[str] = None  # read the clips from these tar shards (`avidfast prepare --shards`: OUT/shards)
    workers: int = 4  # DataLoader workers per process (DALI: threads)
    max_bad_fraction: float = 0.01  # stop when more samples of an epoch fail
    video: VideoSection = field(default_factory=VideoSection)
    audio: TrainingAudioSection = field(default_factory=TrainingAudioSection)


@dataclass
class ModelSection:
    """Encoders (Table 5 or 6) and heads."""

    preset: str = "table5"  # table5: analysis network 16x112^2; table6: R(2+1)D-18 8x224^2
    width: int = 64  # channels of the first stage (64 in the paper; smaller for CPU demos)
    embed_dim: int = 128
    head_layers: int = 3  # Linear layers per projection head (3: fc1..fc3 of the tables; 1: a linear projection)
    head_input_norm: bool = False  # BatchNorm1d before each head (not in the paper; against small-data collapse)


@dataclass
class LossSection:
    """AVID or CMA criterion (docs/method.md)."""

    kind: str = "avid"  # avid or cma
    mode: str = "cross"  # AVID: cross, self or joint
    num_negatives: int = 1024
    temperature: float = 0.07
    momentum: float = 0.5
    bank_dtype: str = "float32"
    # shared: one partition constant Z for every term (the reference code's); per_pair: one per pair
    partition: str = "shared"
    # a checkpoint of the paper's code (avidfast.checkpoints.reference): model, banks and Z start from it
    init_from_reference: Optional[str] = None
    # CMA only
    init_from: Optional[str] = None  # AVID checkpoint to start from (Table 3: epoch 200)
    num_positives: int = 32
    num_negatives_within: int = 64
    agreement: str = "consensus"
    # positive sets are re-mined every resample_every *reference epochs*; a reference epoch is
    # reference_epoch_passes passes over the manifest (the reference code's clips_per_video: 5 on
    # AudioSet, 10 on Kinetics). Mapped onto avidfast epochs by Config.resample_period_epochs.
    resample_every: int = 10
    reference_epoch_passes: int = 1


@dataclass
class OptimSection:
    """Adam and the epoch structure of Table 3 (bs, lr, wd, ep, es)."""

    batch_size: Optional[int] = 32  # clips per step and process (null when global_batch_size is set)
    # clips per optimiser step over all processes: each of W processes takes global_batch_size / W
    global_batch_size: Optional[int] = None
    lr: float = 5e-4
    weight_decay: float = 1e-5
    epochs: int = 400
    samples_per_epoch: Optional[int] = None  # "es" (None: one pass over the manifest)
    milestones: List[int] = field(default_factory=list)  # epochs where lr is multiplied by gamma
    gamma: float = 0.1


@dataclass
class TrainSection:
    """Execution: precision, compilation, checkpoints, logging."""

    precision: str = "auto"  # auto (GPU: bf16 if supported else fp16; CPU: fp32), bf16, fp16, fp32
    compile: bool = False
    channels_last: bool = True
    sync_bn: bool = False
    cudnn_benchmark: bool = True
    keep_epochs: List[int] = field(default_factory=list)  # epochs whose checkpoints are kept
    # a mid-epoch checkpoint (step_NNNNNNNNN.pt, also last.pt) every this many optimiser steps, so that
    # a lost worker or node costs at most that many steps; 0: at the end of each epoch only
    checkpoint_every: int = 0
    keep_step_checkpoints: int = 2  # the newest step checkpoints kept; older ones are deleted
    # seconds a rank waits in a collective for its peers before it fails (torch's default: 1800)
    collective_timeout: float = 1800.0
    log_every: int = 10  # steps between TensorBoard scalars
    progress: bool = True
    # a step whose loss or gradients are NaN / inf is never applied; stop: end the run with an error
    # (default), skip: drop the step, count it and go on (at most max_skipped_steps in a row)
    non_finite: str = "stop"
    max_skipped_steps: int = 10
    # --resume and loss.init_from refuse a checkpoint trained on other manifest rows (memory slot i is
    # row i); true continues anyway
    allow_manifest_change: bool = False


@dataclass
class Config:
    """A whole training run."""

    name: str = "run"
    seed: int = 0
    out_dir: Optional[str] = None  # None: runs/<name>
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def validate(self) -> "Config":
        """Checks values that types alone do not; returns self."""
        choices = {
            "data.pipeline": (self.data.pipeline, PIPELINES),
            "data.audio.preset": (self.data.audio.preset, tuple(AUDIO_PRESETS)),
            "model.preset": (self.model.preset, MODEL_PRESETS),
            "loss.kind": (self.loss.kind, LOSS_KINDS),
            "loss.mode": (self.loss.mode, tuple(AVID_MODES)),
            "loss.bank_dtype": (self.loss.bank_dtype, tuple(STORAGE_DTYPES)),
            "loss.partition": (self.loss.partition, PARTITIONS),
            "loss.agreement": (self.loss.agreement, AGREEMENTS),
            "train.precision": (self.train.precision, PRECISIONS),
            "train.non_finite": (self.train.non_finite, NON_FINITE_STEPS),
        }
        positive = {
            "optim.epochs": self.optim.epochs,
            "data.video.frames": self.data.video.frames, "data.video.crop": self.data.video.crop,
            "model.width": self.model.width, "model.head_layers": self.model.head_layers,
            "loss.num_negatives": self.loss.num_negatives,
            "train.log_every": self.train.log_every, "train.max_skipped_steps": self.train.max_skipped_steps,
        }
        check_values(choices, positive)
        self._check_batch_size()
        if self.optim.samples_per_epoch is not None and self.optim.samples_per_epoch < 1:
            raise ConfigError(f"optim.samples_per_epoch must be positive (or null: one pass over the manifest), got "
                              f"{self.optim.samples_per_epoch}; an epoch of no clips makes no step")
        if self.data.workers < 0:
            raise ConfigError(f"data.workers must be 0 or more, got {self.data.workers}")
        require(_number(self.data.max_bad_fraction) and 0 <= self.data.max_bad_fraction <= 1,
                "data.max_bad_fraction", self.data.max_bad_fraction, "in [0, 1]")
        check_video_section(self.data.video)
        check_audio_section(self.data.audio)
        if not self.data.audio.normalize and self.data.audio.stats:
            raise ConfigError(f"data.audio.normalize is false but data.audio.stats={self.data.audio.stats} is set: "
                              "drop one (--set data.audio.stats=null to train on un-normalised dB values)")
        check_optim_values(self.optim)
        require(_number(self.loss.temperature) and self.loss.temperature > 0, "loss.temperature",
                self.loss.temperature, "a positive number (the paper's: 0.07)")
        require(_number(self.loss.momentum) and 0 <= self.loss.momentum <= 1, "loss.momentum", self.loss.momentum,
                "in [0, 1] (the share of a memory row kept at an update; the paper's: 0.5)")
        require(all(e >= 1 for e in self.train.keep_epochs), "train.keep_epochs", self.train.keep_epochs,
                "epochs from 1 on")
        require(self.train.checkpoint_every >= 0, "train.checkpoint_every", self.train.checkpoint_every,
                "0 (end of each epoch only) or a number of optimiser steps")
        require(self.train.keep_step_checkpoints >= 1, "train.keep_step_checkpoints",
                self.train.keep_step_checkpoints, "1 or more")
        require(_number(self.train.collective_timeout) and 0 < self.train.collective_timeout < float("inf"),
                "train.collective_timeout", self.train.collective_timeout, "a positive number of seconds")
        if self.loss.kind == "cma":
            require(self.loss.num_positives >= 1, "loss.num_positives", self.loss.num_positives, "positive")
            require(self.loss.resample_every >= 1, "loss.resample_every", self.loss.resample_every,
                    "positive (reference epochs between minings)")
            require(self.loss.reference_epoch_passes >= 1, "loss.reference_epoch_passes",
                    self.loss.reference_epoch_passes, "positive (passes over the manifest per reference epoch)")
        self._check_audio_preset()
        if self.loss.kind == "cma" and not 1 <= self.loss.num_negatives_within <= self.loss.num_negatives:
            raise ConfigError(f"loss.num_negatives_within={self.loss.num_negatives_within} must lie in [1, "
                              f"loss.num_negatives = {self.loss.num_negatives}] (the within-modal terms use a prefix "
                              f"of the negatives); --set loss.num_negatives_within="
                              f"{max(1, min(self.loss.num_negatives_within, self.loss.num_negatives))}")
        if self.loss.init_from and self.loss.init_from_reference:
            raise ConfigError("loss.init_from and loss.init_from_reference are both set; keep one")
        if self.loss.kind == "cma" and not (self.loss.init_from or self.loss.init_from_reference):
            raise ConfigError("loss.init_from: CMA starts from an AVID checkpoint; set it, e.g. "
                              "--set loss.init_from=runs/avid/checkpoints/epoch_0200.pt (or, for a checkpoint "
                              "of the paper's code, loss.init_from_reference / --init-from-reference)")
        return self

    def _check_batch_size(self) -> None:
        """Exactly one of optim.batch_size (per process) and optim.global_batch_size, positive."""
        check_batch_fields(self.optim)
        if self.optim.batch_size is not None:
            self._check_batch_statistics(self.optim.batch_size)

    def _check_batch_statistics(self, per_process: int) -> None:
        if self.model.head_input_norm and per_process < 2:
            raise ConfigError("model.head_input_norm needs batch statistics: a batch of 2 or more clips per process "
                              f"(got {per_process}; optim.batch_size or optim.global_batch_size), or "
                              "model.head_input_norm=false")

    def per_process_batch(self, world_size: int = 1) -> int:
        """Clips per step on each of ``world_size`` processes: optim.batch_size, or
        optim.global_batch_size / world_size (ConfigError when it does not divide)."""
        per_process = split_batch(self.optim, world_size)
        self._check_batch_statistics(per_process)
        return per_process

    def _check_audio_preset(self) -> None:
        """The spectrogram preset (data.audio.preset) must feed the network (model.preset) and the pipeline."""
        spectrogram = AUDIO_PRESETS[self.data.audio.preset]
        network_bins = AUDIO_NETWORKS[self.model.preset][1][0]
        if spectrogram.bins != network_bins:
            fitting = [name for name, preset in AUDIO_PRESETS.items() if preset.bins == network_bins]
            raise ConfigError(
                f"data.audio.preset={self.data.audio.preset} gives {spectrogram.bins} frequency bins, but "
                f"model.preset={self.model.preset} is built for {network_bins}; --set data.audio.preset="
                f"{' or '.join(fitting)} (or choose the model.preset of your spectrograms)")
        if self.data.pipeline == "dali" and self.data.audio.preset not in DALI_PRESETS:
            raise ConfigError(f"data.audio.preset={self.data.audio.preset} is computed by the CPU pipeline only; "
                              "set data.pipeline=cpu")

    def check_num_items(self, num_items: int) -> None:
        """ConfigError when the loss cannot draw its samples from a manifest of ``num_items`` rows.

        The negative sampler (:func:`avidfast.ops.sample_negatives`) needs K < N - P - 1: each clip's
        K negatives come from the N rows minus itself and its P excluded ones (CMA: its
        loss.num_positives positives; AVID: none), so K <= N - P - 2.
        """
        cma = self.loss.kind == "cma"
        positives = self.loss.num_positives if cma else 0
        most = num_items - positives - 2
        if self.loss.num_negatives <= most:
            return
        where = f"the manifest {self.data.manifest}" if self.data.manifest else "the manifest"
        pool = f"the rows other than itself and its loss.num_positives={positives} positives" if cma else "the other rows"
        if most >= 1:
            rule = f"at most rows - loss.num_positives - 2 = {most}" if cma else f"at most rows - 2 = {most}"
            fix = (f"--set loss.num_negatives={most} or less" + (" (or fewer loss.num_positives)" if cma else "")
                   + ", or use a larger manifest")
        else:
            rule = "none are left"
            fix = f"use a manifest of at least {positives + 3} rows"
            if cma and num_items >= 4:
                fix += f", or --set loss.num_positives={num_items - 3} or less"
        raise ConfigError(f"loss.num_negatives={self.loss.num_negatives} does not fit {where}: it has {num_items} "
                          f"rows, and a clip's negatives are drawn from {pool} ({rule}); {fix}")

    def resample_period_epochs(self, num_items: int) -> int:
        """avidfast epochs between two minings of the CMA positive sets.

        loss.resample_every counts the reference's epochs, each loss.reference_epoch_passes passes
        over the ``num_items`` rows; an avidfast epoch reads optim.samples_per_epoch clips (default:
        one pass). The period is the nearest whole number of avidfast epochs to the same number of
        clips, at least 1: resample_every x reference_epoch_passes x num_items / clips per epoch.
        """
        clips = self.optim.samples_per_epoch if self.optim.samples_per_epoch is not None else num_items
        return max(1, round(self.loss.resample_every * self.loss.reference_epoch_passes * num_items / clips))

    def check_epoch_size(self, num_items: int, world_size: int = 1) -> int:
        """Optimiser steps per epoch on every rank; ConfigError when an epoch would make none.

        An epoch reads optim.samples_per_epoch clips (default: the manifest's ``num_items`` rows),
        spread over ``world_size`` processes and padded so that each reads
        ceil(clips / world_size) (avidfast.data.sampling.ShardedEpochSampler); each process cuts
        them into batches of :meth:`per_process_batch` and drops the incomplete last one.
        """
        clips = self.optim.samples_per_epoch if self.optim.samples_per_epoch is not None else num_items
        per_rank = -(-clips // world_size)
        batch = self.per_process_batch(world_size)
        steps = per_rank // batch
        if steps >= 1:
            return steps
        source = (f"optim.samples_per_epoch={clips}" if self.optim.samples_per_epoch is not None
                  else f"the {num_items} rows of the manifest (optim.samples_per_epoch is unset)")
        spread = (f" over {world_size} processes ({per_rank} each)" if world_size > 1 else "")
        need = batch * world_size
        if self.optim.global_batch_size is None:
            batch_text, fix = f"optim.batch_size={batch} per process", f"optim.batch_size={per_rank}"
        else:
            batch_text = f"{batch} clips per process (optim.global_batch_size={self.optim.global_batch_size})"
            fix = f"optim.global_batch_size={per_rank * world_size}"
        raise ConfigError(f"an epoch makes no training step: it reads {source}{spread}, fewer than one batch of "
                          f"{batch_text} (the incomplete last batch is "
                          f"dropped); --set {fix} or less, or --set "
                          f"optim.samples_per_epoch={need} or more")

    @property
    def run_dir(self) -> str:
        return self.out_dir or os.path.join("runs", self.name)

    def to_dict(self) -> Dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return build_typed(hint, value, key + ".")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (isinstance(value, float) and not math.isfinite(value)) or int(value) != value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def build_typed(cls, values: Dict[str, Any], prefix: str = ""):
    """An instance of dataclass ``cls`` from a plain dict, every key and type checked (ConfigError)."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}'; {prefix.rstrip('.') or 'the top level'} "
                          f"has: {', '.join(names)}")
    return cls(**{k: _convert(v, hints[k], prefix + k) for k, v in values.items()})


def _set_dotted(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: Sequence[str]) -> List[Tuple[str, Any]]:
    """``key.sub=value`` strings -> (key, YAML-parsed value) pairs."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set optim.lr=1e-4")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError:
            value = text
        out.append((key.strip(), value))
    return out


def resolve_config_path(name_or_path: str, folder: str = PACKAGE_CONFIGS) -> str:
    """A YAML path, or the name of a configuration shipped in ``folder`` (e.g. demo)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = os.path.join(folder, name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if os.path.isfile(shipped):
        return shipped
    raise ConfigError(f"config {name_or_path}: no such file, and not one of the shipped configs "
                      f"({', '.join(shipped_configs(folder))})")


def shipped_configs(folder: str = PACKAGE_CONFIGS) -> List[str]:
    """Names of the YAML configurations shipped in ``folder`` (default: the training ones)."""
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def read_tree(path: str, overrides: Sequence[str] = (), folder: str = PACKAGE_CONFIGS) -> Dict[str, Any]:
    """The YAML mapping of a config (path, or name shipped in ``folder``) with ``key=value`` overrides."""
    path = resolve_config_path(path, folder)
    try:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path}: not valid YAML ({error})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level")
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    return tree


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML config (path or shipped name), applies ``key=value`` overrides, validates."""
    return build_typed(Config, read_tree(path, overrides)).validate()


def config_from_dict(tree: Dict[str, Any]) -> Config:
    """A validated Config from a plain dict (e.g. the one saved in a checkpoint)."""
    return build_typed(Config, tree).validate()
