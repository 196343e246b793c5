"""Loading a pre-trained model for evaluation: an avidfast checkpoint or a reference one.

:func:`load_pretrained` returns the :class:`AVModel`, the memory banks and, for avidfast
checkpoints, the training configuration. ``random_init=True`` gives the same architecture with
freshly initialised weights and banks: the baseline every protocol is compared against.
:func:`locate_training_manifest` finds the manifest an avidfast checkpoint was trained on (its
rows are the memory slots) from what the checkpoint records, wherever the command runs.
"""
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from avidfast.checkpoints.shared import read_on_every_rank
from avidfast.checkpoints.store import CheckpointError, load_checkpoint
from avidfast.distributed import is_distributed


class PretrainedError(CheckpointError):
    """A checkpoint that cannot be used for evaluation: the message names the file."""


@dataclass
class Pretrained:
    """A model ready for evaluation.

    ``model``: the AVModel (CPU, eval mode); ``video_bank`` / ``audio_bank``: (N, D) memory rows
    (``None`` when the checkpoint has none); ``train_config``: the avidfast training Config (``None``
    for reference checkpoints); ``source``: ``"avidfast"`` or ``"reference"``; ``info``: what was
    inferred or loaded (architecture, epoch, path); ``manifest``: what an avidfast checkpoint
    records of its training manifest (avidfast.checkpoints.store.manifest_record; ``None`` for
    reference checkpoints and avidfast checkpoints written before it was recorded).
    """

    model: torch.nn.Module
    video_bank: Optional[torch.Tensor]
    audio_bank: Optional[torch.Tensor]
    train_config: Optional[object]
    source: str
    info: Dict[str, object] = field(default_factory=dict)
    manifest: Optional[Dict[str, Any]] = None


def _reinitialise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with fresh weights drawn from ``seed``: every layer's own
    ``reset_parameters`` (PyTorch's defaults, as the heads use), then the encoders' conv / BN
    initialisation (:func:`avidfast.models.init.init_conv_bn_`)."""
    import copy

    from avidfast.models.init import init_conv_bn_

    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    init_conv_bn_(fresh)
    return fresh


def _random_banks(n: int, dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    banks = [torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1) for _ in range(2)]
    return banks[0], banks[1]


def load_pretrained(path: str, *, random_init: bool = False, seed: int = 0, trust: bool = False) -> Pretrained:
    """Loads ``path`` (an avidfast checkpoint, or a reference ``.pth.tar``) for evaluation.

    Args:
        path: checkpoint file (``runs/<name>/checkpoints/last.pt`` or ``epoch_XXXX.pt``; or one of
            the paper's released checkpoints).
        random_init: keep the architecture (and bank sizes) but re-initialise the weights from
            ``seed`` and draw random unit-norm banks: the untrained baseline.
        trust: for checkpoints that ``weights_only=True`` refuses for the Python objects they hold
            (reference ones), allow a full unpickle (only for files from a source you trust); see
            avidfast.checkpoints.store.read_checkpoint.
    """
    from avidfast.config import ConfigError, config_from_dict

    if os.path.isdir(path):
        raise PretrainedError(f"--checkpoint {path}: is a folder; pass a checkpoint file, e.g. "
                              f"{os.path.join(path, 'checkpoints', 'last.pt')}")
    if not is_distributed() and not os.path.isfile(path):
        raise PretrainedError(f"--checkpoint {path}: no such file")
    try:  # under torchrun: rank 0's file, sent to the ranks whose node has no copy of it
        state = read_on_every_rank(path, lambda data: load_checkpoint(path, trust=trust, trust_option="--trust",
                                                                      data=data), "--checkpoint")
    except CheckpointError as error:
        raise PretrainedError(str(error)) from None
    if isinstance(state, dict) and "config" in state and "model" in state and "criterion" in state:
        try:
            cfg = config_from_dict(state["config"])
        except ConfigError as error:
            raise PretrainedError(f"{path}: its saved training config is not valid ({error})") from None
        from avidfast.checkpoints.build import build_model, load_weights

        model = build_model(cfg)
        load_weights(model, state["model"], path, target="the AVModel of its own saved config", error=PretrainedError)
        banks = state["criterion"]
        video_bank = banks.get("video_memory.memory")
        audio_bank = banks.get("audio_memory.memory")
        info = {"path": path, "epoch": state.get("epoch"), "preset": cfg.model.preset, "width": cfg.model.width,
                "embed_dim": cfg.model.embed_dim, "loss": cfg.loss.kind}
        source, train_config = "avidfast", cfg
        manifest = (state.get("meta") or {}).get("manifest")
    else:
        from avidfast.checkpoints import reference

        if not (isinstance(state, dict) and reference.is_reference_checkpoint(state)):
            raise PretrainedError(f"{path}: neither an avidfast checkpoint (model, criterion, config) nor a "
                                  "reference one (model, train_criterion)")
        try:
            model, loss_state, info = reference.from_reference_state(state)
        except reference.ReferenceCheckpointError as error:
            raise PretrainedError(f"{path}: {error}") from None
        loss_state = loss_state or {}
        video_bank, audio_bank = loss_state.get("video_memory.memory"), loss_state.get("audio_memory.memory")
        info = dict(info, path=path)
        source, train_config, manifest = "reference", None, None
    if random_init:
        model = _reinitialise(model, seed)
        if video_bank is not None:
            video_bank, audio_bank = _random_banks(video_bank.shape[0], video_bank.shape[1], seed)
        info = dict(info, random_init=True, seed=seed)
    model.eval()
    return Pretrained(model, video_bank, audio_bank, train_config, source, info, manifest)


def locate_training_manifest(pretrained: Pretrained, option: str = "--labels") -> Tuple[str, Optional[str]]:
    """(path, root) of the manifest an avidfast checkpoint was trained on, for reading its rows.

    Looks, in order, at the path recorded relative to the run folder (the checkpoint's
    ``<run>/checkpoints/`` parent: runs and data moved together), the recorded absolute path and
    the config's data.manifest as given (relative to where training ran); the first file whose
    rows have the recorded fingerprint is it (any existing file, for checkpoints without a
    record). root: the run's data.root when it was set and still exists, else None (the CSV's
    folder). PretrainedError naming ``option`` (how the caller's user passes a manifest) when none
    is found or none has the recorded rows.
    """
    from avidfast.data.manifest import manifest_fingerprint, read_manifest

    cfg, record = pretrained.train_config, pretrained.manifest or {}
    checkpoint = str(pretrained.info.get("path", "the checkpoint"))
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    candidates: List[str] = []
    if record.get("from_run_dir"):
        candidates.append(os.path.normpath(os.path.join(run_dir, record["from_run_dir"])))
    if record.get("path"):
        candidates.append(record["path"])
    if cfg is not None and cfg.data.manifest:
        candidates.append(cfg.data.manifest)
    candidates = list(dict.fromkeys(candidates))
    if not candidates:
        raise PretrainedError(f"{checkpoint}: records no training manifest; pass {option} PATH (the manifest the "
                              "model was trained on: row i is memory slot i)")
    root = cfg.data.root if cfg is not None and cfg.data.root and os.path.isdir(cfg.data.root) else None
    expected, differing = record.get("fingerprint"), []
    for path in candidates:
        if not os.path.isfile(path):
            continue
        if expected is None or manifest_fingerprint(read_manifest(path, root)) == expected:
            return path, root
        differing.append(path)
    if differing:
        raise PretrainedError(f"{checkpoint}: {', '.join(differing)} does not list the videos it was trained on (its "
                              f"rows differ from the recorded ones, fingerprint {expected[:12]}); pass {option} PATH "
                              "(the manifest the model was trained on: row i is memory slot i)")
    raise PretrainedError(f"{checkpoint}: the manifest it was trained on is not found (looked for "
                          f"{', '.join(candidates)}); pass {option} PATH (that manifest: row i is memory slot i)")

