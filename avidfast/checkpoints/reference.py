"""The reference-format reader: the paper's released checkpoints (facebookresearch/AVID-CMA) into
avidfast objects.

The four released files (AVID and AVID+CMA, Kinetics and AudioSet, ``*.pth.tar``) are dicts saved
by the reference's ``CheckpointManager.save`` (utils/main_utils.py): ``epoch`` (int), ``model``
(state dict of its ``AV_Wrapper``, saved through DataParallel / DistributedDataParallel, so every
key starts with ``module.``), ``optimizer`` and ``train_criterion`` (state dict of its ``AVID`` or
``AVID_CMA`` criterion, not wrapped, so without the prefix).

Names in ``model`` (after ``module.``) and the avidfast names they load into (`model_name_map`):

    video_model.conv1.0.*  (Conv3d 3x7x7)           -> video.conv1.conv.*
    video_model.conv1.1.*  (BatchNorm3d)            -> video.conv1.bn.*
    video_model.conv{2..5}x.{0,1}.<block>.*         -> video.block{2..5}.{0,1}.<block>.*
    audio_model.conv1.0.* / .1.*                    -> audio.conv1.conv.* / audio.conv1.bn.*
    audio_model.block{1..4}.{conv1,bn1,conv2,bn2}.* -> audio.block{2..5}.0.<same>.*
    {video,audio}_proj.projection.{0,2,4}.*         -> {video,audio}_head.fc{1,2,3}.*

<block> is one of spt_conv1, spt_bn1, tmp_conv1, tmp_bn1, spt_conv2, spt_bn2, tmp_conv2, out_bn,
res_conv: avidfast's `R2Plus1DBlock` keeps the reference's names. The stem's ReLU and max-pool
(Sequential slots 2 and 3) and the heads' ReLUs (odd slots) hold no tensors. The reference's
audio network reads (B, 1, T, F) spectrograms and avidfast's (B, 1, F, T); every kernel is square
with equal strides and paddings on both axes, so the audio conv weights are loaded transposed in
their last two axes and give the transposed activations (the same pooled features).

Names in ``train_criterion`` (criterions/avid.py, avid_cma.py, nce.py):

    nce_average.view1_mem (N, D)   video memory bank  -> video_memory.memory
    nce_average.view2_mem (N, D)   audio memory bank  -> audio_memory.memory
    *avg_exp_score (scalar)        the NCE partition constant; the reference uses one for every
                                   pair, so its mean (of the positive ones, when several) is
                                   written to all four entries of avidfast's Z
    nce_average.positive_set       AVID+CMA's mined positives: not loaded (CMALoss re-mines its
                                   positive sets from the banks at the start of training)

The loss state has avidfast's `BankPairLoss` layout (video_memory.memory, audio_memory.memory,
Z, step = 0): ``AVIDLoss.load_state_dict(loss_state)`` and ``CMALoss.from_avid(loss_state, ...)``
take it as it is. Memory slot i is row i of the reference's own training list, so continuing
training needs a manifest of the same videos in the same order.

What is inferred from tensor shapes (reported in ``info``): width (channels of video_model.conv1),
embed_dim (rows of the last projection), head_layers and hidden (number and width of the
projection Linears). Assumption: two residual blocks per video stage means the released
R(2+1)D-18 + Conv2D pair, avidfast's ``table6`` preset (stem max-pool, audio block1 stride 2);
the reference's smaller analysis networks (R2Plus1D_Small / Conv2D_Small) differ from it only in
layers without tensors, so their files cannot be told apart from its and are refused when their
blocks are not in a Sequential (one block per stage).
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from avidfast.checkpoints.store import CheckpointError, read_checkpoint, strip_module_prefix
from avidfast.models.av import AVModel

PRESET = "table6"  # the released networks: R(2+1)D-18 (two blocks per stage) + Conv2D
_BANK_KEYS = ("nce_average.view1_mem", "nce_average.view2_mem")
_PARTITION_SUFFIX = "avg_exp_score"
_SKIPPED_CRITERION_KEYS = ("nce_average.positive_set",)
_STAGE_BLOCKS = 2  # residual blocks per video stage in R(2+1)D-18


class ReferenceCheckpointError(CheckpointError):
    """A reference checkpoint that cannot be mapped; the message names the keys and what to do."""


def model_name_map(head_layers: int = 3) -> List[Tuple[str, str]]:
    """(avidfast prefix, reference prefix) pairs that rename every tensor of the model.

    A key is renamed by the pair whose avidfast prefix starts it (prefixes do not overlap).
    head_layers: Linear layers per projection head (the reference's projection Sequential has
    a ReLU between them, so Linear i sits at slot 2 * (i - 1)).
    """
    pairs = [("video.conv1.conv.", "video_model.conv1.0."), ("video.conv1.bn.", "video_model.conv1.1.")]
    pairs += [(f"video.block{stage}.", f"video_model.conv{stage}x.") for stage in (2, 3, 4, 5)]
    pairs += [("audio.conv1.conv.", "audio_model.conv1.0."), ("audio.conv1.bn.", "audio_model.conv1.1.")]
    pairs += [(f"audio.block{stage}.0.", f"audio_model.block{stage - 1}.") for stage in (2, 3, 4, 5)]
    for modality in ("video", "audio"):
        pairs += [(f"{modality}_head.fc{i}.", f"{modality}_proj.projection.{2 * (i - 1)}.")
                  for i in range(1, head_layers + 1)]
    return pairs


def reference_name(avidfast_key: str, name_map: List[Tuple[str, str]]) -> str:
    """The reference's name (without ``module.``) of an avidfast model state-dict key."""
    for ours, theirs in name_map:
        if avidfast_key.startswith(ours):
            return theirs + avidfast_key[len(ours):]
    raise KeyError(f"{avidfast_key}: no entry of the name map covers it")


def _is_transposed(avidfast_key: str, tensor: torch.Tensor) -> bool:
    """Audio conv weights are (out, in, T, F) in the reference and (out, in, F, T) here."""
    return avidfast_key.startswith("audio.") and tensor.dim() == 4


def is_reference_checkpoint(state: Any) -> bool:
    """True when ``state`` (the dict torch.load returned) is a checkpoint of the paper's code:
    a ``model`` state dict whose keys, without ``module.``, start with video_model. / audio_model."""
    if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
        return False
    keys = strip_module_prefix(dict(state["model"])).keys()
    return any(str(key).startswith(("video_model.", "audio_model.")) for key in keys)


def _linear_slots(model_state: Mapping[str, torch.Tensor], prefix: str) -> List[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.weight$")
    return sorted(int(m.group(1)) for m in map(pattern.match, model_state) if m)


def _infer_architecture(model_state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """width, embed_dim, hidden and head_layers from tensor shapes (see the module docstring)."""
    needed = ["video_model.conv1.0.weight", "audio_model.conv1.0.weight"]
    absent = [key for key in needed if key not in model_state]
    if absent:
        raise ReferenceCheckpointError(f"missing {absent}: not the reference's AV_Wrapper layout "
                                       "(video_model / audio_model / video_proj / audio_proj)")
    width = int(model_state["video_model.conv1.0.weight"].shape[0])
    audio_width = int(model_state["audio_model.conv1.0.weight"].shape[0])
    if audio_width != width:
        raise ReferenceCheckpointError(f"video_model.conv1 has {width} channels but audio_model.conv1 has "
                                       f"{audio_width}: avidfast's AVModel uses one width for both")
    blocks = {key.split(".")[2] for key in model_state if key.startswith("video_model.conv2x.")}
    if blocks != {str(i) for i in range(_STAGE_BLOCKS)}:
        found = (f"{len(blocks)} block(s)" if all(b.isdigit() for b in blocks)
                 else "one block, not in a Sequential (a depth-10 or small analysis network)")
        raise ReferenceCheckpointError(
            f"video_model.conv2x holds {found}, not the {_STAGE_BLOCKS} residual blocks of the released "
            "R(2+1)D-18; only the released R2Plus1D(depth=18) + Conv2D networks can be mapped")
    slots = {m: _linear_slots(model_state, f"{m}_proj.projection.") for m in ("video", "audio")}
    if not slots["video"] or not slots["audio"]:
        raise ReferenceCheckpointError("no projection heads (video_proj / audio_proj.projection): the model was "
                                       "trained with proj_dim=None; avidfast's AVModel needs heads")
    if slots["video"] != slots["audio"] or slots["video"] != list(range(0, 2 * len(slots["video"]), 2)):
        raise ReferenceCheckpointError(f"projection Linears at slots {slots}: expected Linear/ReLU alternating "
                                       "(slots 0, 2, 4, ...) in both heads")
    head_layers = len(slots["video"])
    last = model_state[f"video_proj.projection.{slots['video'][-1]}.weight"]
    hidden = int(model_state["video_proj.projection.0.weight"].shape[0]) if head_layers > 1 else None
    return {"preset": PRESET, "width": width, "embed_dim": int(last.shape[0]), "hidden": hidden,
            "head_layers": head_layers}


def _map_model(model_state: Mapping[str, torch.Tensor], arch: Dict[str, Any]) -> Tuple[AVModel, List[str]]:
    """Builds the AVModel of ``arch`` and loads the renamed tensors; every mismatch is an error.

    Returns (model, avidfast keys filled because the file lacks them): only BatchNorm's
    num_batches_tracked may be absent (files of PyTorch < 0.4.1); it is set to 0.
    """
    model = AVModel.from_preset(arch["preset"], width=arch["width"], embed_dim=arch["embed_dim"],
                                hidden=arch["hidden"], head_layers=arch["head_layers"])
    name_map = model_name_map(arch["head_layers"])
    own = model.state_dict()
    expected = {reference_name(key, name_map): key for key in own}
    unmatched = sorted(set(model_state) - set(expected))
    missing = sorted(name for name in set(expected) - set(model_state) if not name.endswith("num_batches_tracked"))
    wrong_shape = []
    for theirs, ours in expected.items():
        if theirs not in model_state:
            continue
        tensor = model_state[theirs]
        shape = tuple(tensor.shape)
        if _is_transposed(ours, tensor):
            shape = shape[:-2] + shape[-2:][::-1]
        if shape != tuple(own[ours].shape):
            wrong_shape.append(f"{theirs}: {tuple(tensor.shape)} in the file, {tuple(own[ours].shape)} expected")
    if unmatched or missing or wrong_shape:
        lines = [f"the model state does not match the reference's R(2+1)D-18 + Conv2D layout at width "
                 f"{arch['width']} (names without 'module.'):"]
        if unmatched:
            lines.append(f"  {len(unmatched)} key(s) in the file with no avidfast counterpart: {', '.join(unmatched)}")
        if missing:
            lines.append(f"  {len(missing)} key(s) missing from the file: {', '.join(missing)}")
        if wrong_shape:
            lines.append(f"  {len(wrong_shape)} tensor(s) of the wrong shape: {'; '.join(wrong_shape)}")
        lines.append("nothing was loaded; if the file is from a modified copy of the reference, correct "
                     "avidfast.checkpoints.reference.model_name_map")
        raise ReferenceCheckpointError("\n".join(lines))
    mapped, filled = {}, []
    for theirs, ours in expected.items():
        if theirs not in model_state:
            mapped[ours] = torch.zeros_like(own[ours])
            filled.append(ours)
            continue
        tensor = model_state[theirs]
        mapped[ours] = tensor.transpose(-1, -2).contiguous() if _is_transposed(ours, tensor) else tensor
    model.load_state_dict(mapped, strict=True)
    return model, filled


def _map_criterion(criterion_state: Mapping[str, torch.Tensor],
                   embed_dim: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The avidfast loss state (BankPairLoss layout) of the reference's train_criterion."""
    state = strip_module_prefix(dict(criterion_state))
    partition_keys = sorted(key for key in state if key.endswith(_PARTITION_SUFFIX))
    known = set(_BANK_KEYS) | set(partition_keys) | set(_SKIPPED_CRITERION_KEYS)
    unknown = sorted(set(state) - known)
    missing = [key for key in _BANK_KEYS if key not in state]
    if unknown or missing or not partition_keys:
        parts = []
        if unknown:
            parts.append(f"unknown key(s) {', '.join(unknown)}")
        if missing:
            parts.append(f"missing memory bank(s) {', '.join(missing)}")
        if not partition_keys:
            parts.append(f"no partition constant (a key ending in {_PARTITION_SUFFIX})")
        raise ReferenceCheckpointError(f"train_criterion: {'; '.join(parts)}; expected the state of the reference's "
                                       "AVID / AVID_CMA criterion, nothing was loaded")
    video, audio = state[_BANK_KEYS[0]], state[_BANK_KEYS[1]]
    for key, bank in zip(_BANK_KEYS, (video, audio)):
        if bank.dim() != 2 or not bank.is_floating_point() or bank.shape[1] != embed_dim:
            raise ReferenceCheckpointError(f"train_criterion.{key}: expected a float (N, {embed_dim}) memory bank, "
                                           f"got {bank.dtype} {tuple(bank.shape)}")
    if video.shape != audio.shape:
        raise ReferenceCheckpointError(f"train_criterion: video bank {tuple(video.shape)} and audio bank "
                                       f"{tuple(audio.shape)} differ in size")
    values = [float(state[key]) for key in partition_keys]
    estimated = [z for z in values if z > 0]
    partition = sum(estimated) / len(estimated) if estimated else -1.0  # -1: estimated at the first step
    loss_state = {
        "video_memory.memory": video.float().contiguous(),
        "audio_memory.memory": audio.float().contiguous(),
        "Z": torch.full((4,), partition, dtype=torch.float32, device=video.device),
        "step": torch.zeros((), dtype=torch.int64, device=video.device),
    }
    info = {"num_items": int(video.shape[0]), "partition": partition if estimated else None,
            "partition_keys": partition_keys, "kind": "AVID_CMA" if _SKIPPED_CRITERION_KEYS[0] in state else "AVID",
            "not_loaded": [f"train_criterion.{key}" for key in _SKIPPED_CRITERION_KEYS if key in state]}
    return loss_state, info


def from_reference_state(state: Mapping[str, Any]) -> Tuple[AVModel, Optional[Dict[str, torch.Tensor]], Dict[str, Any]]:
    """(model, loss_state, info) from a reference checkpoint dict already loaded with torch.load.

    model: an `AVModel` (on the CPU, eval mode not set) holding the file's weights.
    loss_state: the banks and partition constant in avidfast's BankPairLoss layout, or None when
        the file has no ``train_criterion``.
    info: what was inferred and what was skipped: preset, width, embed_dim, hidden, head_layers,
        epoch, num_items / partition / partition_keys / kind (when the criterion is present),
        filled (num_batches_tracked entries set to 0), not_loaded (entries deliberately ignored).
    Raises ReferenceCheckpointError listing every unmatched, missing or mis-shaped key.
    """
    if not is_reference_checkpoint(state):
        raise ReferenceCheckpointError("not a checkpoint of the paper's code: expected a dict with a 'model' state "
                                       "dict whose keys start with (module.)video_model. / audio_model.")
    model_state = strip_module_prefix(dict(state["model"]))
    arch = _infer_architecture(model_state)
    model, filled = _map_model(model_state, arch)
    info: Dict[str, Any] = dict(arch, epoch=state.get("epoch"), filled=filled)
    info["not_loaded"] = [key for key in state if key not in ("model", "train_criterion", "epoch")]
    loss_state = None
    if isinstance(state.get("train_criterion"), Mapping):
        loss_state, loss_info = _map_criterion(state["train_criterion"], arch["embed_dim"])
        info["not_loaded"] += loss_info.pop("not_loaded")
        info.update(loss_info)
    return model, loss_state, info


def load_reference_checkpoint(
    path: str, map_location: Any = "cpu", trust: bool = False
) -> Tuple[AVModel, Optional[Dict[str, torch.Tensor]], Dict[str, Any]]:
    """Reads a checkpoint of the paper's code into (model, loss_state, info); see `from_reference_state`.

    path: a ``.pth.tar`` file saved by facebookresearch/AVID-CMA (e.g. the released
        AVID_Kinetics_Cross-N1024_checkpoint.pth.tar).
    map_location: torch.load's argument; the model is moved there too when it names a device.
    trust: the file is first read with ``weights_only=True`` (tensors and plain containers only;
        see avidfast.checkpoints.store.read_checkpoint). When that refuses the file for the
        Python objects it holds, unpickling those can run code: it is then read fully only with
        trust=True (pass it only for files from a source you trust). A damaged file is reported
        as such either way. info["weights_only"] says which way it was read.
    """
    try:
        state, weights_only = read_checkpoint(path, map_location, trust=trust, label="reference checkpoint",
                                              trust_option="trust=True (avidfast train: --trust-reference)")
    except CheckpointError as error:
        raise ReferenceCheckpointError(str(error)) from None
    try:
        model, loss_state, info = from_reference_state(state)
    except ReferenceCheckpointError as error:
        raise ReferenceCheckpointError(f"reference checkpoint {path}: {error}") from None
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    info.update(path=path, weights_only=weights_only)
    return model, loss_state, info
