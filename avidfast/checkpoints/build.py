"""Building the model and the criterion of a training config, and starting them from a checkpoint.

:func:`build_model` and :func:`build_criterion` give the same networks and banks on every rank for
the same config (training, evaluation of an avidfast checkpoint, the demo);
:func:`load_reference_init` fills them from a checkpoint of the paper's code (reference.py).
"""
from typing import Any, Dict, List, Optional

import torch

from avidfast.checkpoints.store import CheckpointError
from avidfast.config import Config
from avidfast.errors import TrainingError

SHOWN_DIFFERENCES = 3  # differing tensors named in a mismatch message


def build_model(cfg: Config):
    """The AV model of cfg.model (identical on every rank for the same seed); its audio encoder
    checks that spectrograms hold cfg.data.audio.preset's frequency bins on dim 2."""
    from avidfast.models import AVModel

    torch.manual_seed(cfg.seed)
    return AVModel.from_preset(cfg.model.preset, width=cfg.model.width, embed_dim=cfg.model.embed_dim,
                               head_layers=cfg.model.head_layers, head_input_norm=cfg.model.head_input_norm,
                               audio_preset=cfg.data.audio.preset)


def build_criterion(cfg: Config, num_items: int, init: Optional[Dict] = None):
    """AVIDLoss, or CMALoss started from ``init`` (an AVID checkpoint dict)."""
    from avidfast.losses import AVIDLoss, CMALoss
    from avidfast.losses.memory_bank import STORAGE_DTYPES

    cfg.check_num_items(num_items)
    dtype = STORAGE_DTYPES[cfg.loss.bank_dtype]
    if cfg.loss.kind == "avid":
        return AVIDLoss(num_items, dim=cfg.model.embed_dim, num_negatives=cfg.loss.num_negatives,
                        temperature=cfg.loss.temperature, momentum=cfg.loss.momentum, mode=cfg.loss.mode,
                        bank_dtype=dtype, seed=cfg.seed, partition=cfg.loss.partition)
    if init is None:
        raise TrainingError("a CMA criterion needs the AVID checkpoint of loss.init_from")
    banks = init["criterion"]["video_memory.memory"]
    if banks.shape[0] != num_items:
        raise TrainingError(f"loss.init_from has banks of {banks.shape[0]} slots but the manifest has "
                            f"{num_items} rows: CMA must use the AVID run's manifest")
    return CMALoss.from_avid(
        init["criterion"], num_negatives=cfg.loss.num_negatives, num_negatives_within=cfg.loss.num_negatives_within,
        num_positives=cfg.loss.num_positives, agreement=cfg.loss.agreement,
        resample_every=cfg.resample_period_epochs(num_items),
        temperature=cfg.loss.temperature, momentum=cfg.loss.momentum, bank_dtype=dtype, seed=cfg.seed,
        partition=cfg.loss.partition,
    )


def _shape(tensor: Any) -> str:
    return str(tuple(tensor.shape)) if hasattr(tensor, "shape") else type(tensor).__name__


def state_mismatch(module: torch.nn.Module, state_dict: Dict[str, Any]) -> str:
    """How ``state_dict`` fails to fit ``module``, in one line: the tensors whose shapes differ (the
    first few, file vs here) and the counts of missing and unexpected keys (the first of each)."""
    own = module.state_dict()
    differ = [k for k in own if k in state_dict and _shape(state_dict[k]) != _shape(own[k])]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    parts: List[str] = []
    if differ:
        shown = "; ".join(f"{k}: {_shape(state_dict[k])} in the file, {_shape(own[k])} here"
                          for k in differ[:SHOWN_DIFFERENCES])
        parts.append(f"{len(differ)} tensor(s) differ in shape ({shown}{'; ...' if len(differ) > SHOWN_DIFFERENCES else ''})")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    return ", ".join(parts) or "the tensors do not fit"


def _config_hint(saved: Any, cfg: Optional[Config], sections=("model",)) -> str:
    """'; the file was written with model.width=4 (here 8): --set model.width=4' for the values of
    ``sections`` that differ between the checkpoint's saved config and ``cfg``."""
    if not isinstance(saved, dict) or cfg is None:
        return ""
    here = cfg.to_dict()
    differ = []
    for section in sections:
        old, new = saved.get(section), here.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            differ += [(f"{section}.{k}", old[k], new[k]) for k in new if k in old and old[k] != new[k]]
    if not differ:
        return ""
    was = ", ".join(f"{key}={old} (here {new})" for key, old, new in differ)
    fix = " ".join(f"--set {key}={str(old).lower() if isinstance(old, bool) else old}" for key, old, _ in differ)
    return f"; the file was written with {was}: {fix}"


def load_weights(module: torch.nn.Module, state_dict: Dict[str, Any], source: str, *, what: str = "weights",
                 target: Optional[str] = None, saved_config: Any = None, config: Optional[Config] = None,
                 error: type = CheckpointError) -> None:
    """``module.load_state_dict(state_dict)``; where the tensors do not fit, ``error`` (a CheckpointError by
    default) in one line naming ``source`` (e.g. ``"--resume runs/x/checkpoints/last.pt"``), the first
    differing shapes and, given the checkpoint's ``saved_config`` and this ``config``, the model settings
    that differ, instead of torch's RuntimeError listing every tensor. ``what``: what the file holds
    ("weights", "memory banks"); ``target``: what they are loaded into (default: the module's class
    "of this config")."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError:
        target = target or f"the {type(module).__name__} of this config"
        raise error(f"{source}: its {what} do not fit {target}: "
                    f"{state_mismatch(module, state_dict)}{_config_hint(saved_config, config)}") from None


def load_reference_init(cfg: Config, model, num_items: int, trust: bool = False) -> Optional[Dict]:
    """Loads cfg.loss.init_from_reference (a checkpoint of the paper's code) into ``model``.

    Returns {"criterion": loss state} (banks (num_items, D), Z; see avidfast.checkpoints.reference)
    for build_criterion / AVIDLoss.load_state_dict, or None when the file holds no criterion (AVID
    then starts with fresh banks; CMA cannot start). trust: see load_reference_checkpoint.
    """
    from avidfast.checkpoints.reference import ReferenceCheckpointError, load_reference_checkpoint

    path = cfg.loss.init_from_reference
    try:
        reference, loss_state, info = load_reference_checkpoint(path, trust=trust)
    except ReferenceCheckpointError as error:
        raise TrainingError(f"loss.init_from_reference: {error}") from None
    try:
        model.load_state_dict(reference.state_dict())
    except RuntimeError:
        norm = ", with a head input norm" if cfg.model.head_input_norm else ""
        raise TrainingError(
            f"loss.init_from_reference {path}: its networks are {info['preset']} at width {info['width']} with "
            f"embed_dim {info['embed_dim']} and {info['head_layers']}-layer heads (no head input norm), but the "
            f"config builds model.preset={cfg.model.preset}, model.width={cfg.model.width}, "
            f"model.embed_dim={cfg.model.embed_dim} ({cfg.model.head_layers}-layer heads{norm}); "
            f"--set model.preset={info['preset']} --set model.width={info['width']} --set model.embed_dim={info['embed_dim']} "
            f"--set model.head_layers={info['head_layers']} --set model.head_input_norm=false") from None
    if loss_state is None:
        if cfg.loss.kind == "cma":
            raise TrainingError(f"loss.init_from_reference {path}: no train_criterion (memory banks) in the file; "
                                "CMA starts from the AVID banks")
        return None
    if info["num_items"] != num_items:
        raise TrainingError(f"loss.init_from_reference {path}: its banks have {info['num_items']} slots but the "
                            f"manifest has {num_items} rows; slot i is row i of the reference's own training list, "
                            "so use a manifest of the same videos in the same order")
    return {"criterion": loss_state}
