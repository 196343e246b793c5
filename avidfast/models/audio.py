"""Conv2D audio encoders of the supplement's Table 5 and Table 6.

Input: (B, 1, F, T) log-spectrogram (frequency x time). Output: (B, 8 * width) max-pooled features.

    conv1    7x7 conv, stride 2, padding 3 -> BN -> ReLU
    block2   two 3x3 convs, `width` channels; stride 1 (table5) or 2 (table6)
    block3   2 * width channels, stride 2
    block4   4 * width channels, stride 2
    block5   8 * width channels, stride 1
    pool     global max-pool over (F, T) -> (B, 8 * width)

Rows "blockN.1" and "blockN.2" of the tables are the two convs of one block (one block per stage
in both tables). Every padding is kernel // 2; this reproduces each size of both tables exactly,
the odd ones included (129 -> 65 and 100 -> 50 with the 7x7 stride-2 stem; 25 -> 13 with 3x3
stride 2): out = floor((n + 2 * (k // 2) - k) / s) + 1 = ceil(n / s).

The reference's blocks are plain (conv-BN-ReLU twice, no shortcut); that is the default, so that its
checkpoints map onto ours. residual=True adds a ResNet shortcut (see `AudioBlock`).
"""
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from avidfast.data.audio import PRESETS as SPECTROGRAM_PRESETS
from avidfast.data.audio import get_preset
from avidfast.models.init import init_conv_bn_


def _native(name: str) -> Tuple[int, int]:
    preset = SPECTROGRAM_PRESETS[name]
    return preset.bins, preset.frames


# preset -> (stride of block2, native input (F, T): the spectrogram preset of the same name)
AUDIO_PRESETS: Dict[str, Tuple[int, Tuple[int, int]]] = {
    "table5": (1, _native("table5")),  # 129 x 100
    "table6": (2, _native("table6")),  # 257 x 200
}
STAGES = ("block2", "block3", "block4", "block5")


class AudioStem(nn.Module):
    """conv1: (B, C_in, F, T) -> (B, width, ceil(F/2), ceil(T/2)); `conv` 7x7 stride 2 -> `bn` -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class AudioBlock(nn.Module):
    """Two 3x3 convs: (B, C_in, F, T) -> (B, C_out, ceil(F/s), ceil(T/s)).

    residual=False (default; the reference's `Basic2DBlock`):
        out = ReLU(bn2(conv2(ReLU(bn1(conv1(x))))))
    residual=True (ResNet basic block):
        out = ReLU(bn2(conv2(ReLU(bn1(conv1(x))))) + shortcut), shortcut = x, or
        res_bn(res_conv(x)) (1x1 conv with stride s, then BN) when the shape changes.
    conv1 carries the stride s. zero_init_last_bn (residual only) zeroes bn2's scale.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, residual: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.residual = residual
        self.res_conv = None
        self.res_bn = None
        if residual and (in_channels != out_channels or stride != 1):
            self.res_conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.res_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        if self.residual:
            y = y + (x if self.res_conv is None else self.res_bn(self.res_conv(x)))
        return F.relu(y, inplace=True)


class AudioEncoder(nn.Module):
    """Conv2D encoder: (B, in_channels, F, T) -> (B, out_dim), out_dim = 8 * width.

    Args:
        depth: "table5" (129x100 spectrogram, block2 stride 1) or "table6" (257x200, block2
            stride 2); block3, block4 stride 2 and block5 stride 1 in both.
        width: channels of conv1/block2; block3..block5 have 2x, 4x, 8x (64 -> 64,128,256,512).
        residual: add ResNet shortcuts (off by default: the reference's blocks are plain).
        zero_init_last_bn: zero every block's bn2 scale; needs residual=True (a plain block
            would output zeros).
        in_channels: input channels (1).
        audio_preset: the spectrogram preset the input comes from (a name of
            `avidfast.data.audio.PRESETS`: table5, table6 or reference), or None. When set, forward
            and features check that dim 2 holds that preset's frequency bins and raise a ValueError
            naming the expected layout otherwise (a (B, 1, T, F) spectrogram is caught). None (the
            default) checks only dims and channels. It is independent of `depth`: a table6 network
            can read reference spectrograms (both 257 bins). Settable later (`enc.audio_preset = None`
            turns the check off).

    Any F, T work; the sizes of Tables 5 and 6 come out at the presets' native inputs
    (`AUDIO_PRESETS`). Modules: conv1 (`AudioStem`), block2..block5 (nn.Sequential of one
    `AudioBlock`, named "<stage>.0"), pool. Layout-agnostic: runs in channels_last.
    Init: convs kaiming-normal (fan_out, relu), BN weight 1 and bias 0.

    The reference fed (B, 1, T, F) spectrograms; its kernels are square and its strides and
    paddings equal on both axes, so its weights apply to our (F, T) layout transposed
    (`weight.transpose(-1, -2)`) and give the transposed activations.
    """

    def __init__(self, depth: str = "table5", width: int = 64, *, residual: bool = False,
                 zero_init_last_bn: bool = False, in_channels: int = 1, audio_preset: Optional[str] = None):
        super().__init__()
        if depth not in AUDIO_PRESETS:
            raise ValueError(f"depth must be one of {sorted(AUDIO_PRESETS)}, got {depth!r}")
        if int(width) != width or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        if zero_init_last_bn and not residual:
            raise ValueError("zero_init_last_bn needs residual=True (a plain block would output zeros)")
        first_stride, _ = AUDIO_PRESETS[depth]
        self.depth = depth
        self.width = width
        self.in_channels = in_channels
        self.audio_preset = audio_preset  # sets freq_bins (None: no frequency check)
        self.zero_init_last_bn = zero_init_last_bn
        channels = [width, 2 * width, 4 * width, 8 * width]
        strides = [first_stride, 2, 2, 1]
        self.out_dim = channels[-1]
        self.conv1 = AudioStem(in_channels, width)
        cin = width
        for name, cout, stride in zip(STAGES, channels, strides):
            self.add_module(name, nn.Sequential(AudioBlock(cin, cout, stride, residual)))
            cin = cout
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, relu) convs, unit/zero BNs, zeroed bn2 if asked."""
        init_conv_bn_(self)
        if self.zero_init_last_bn:
            for m in self.modules():
                if isinstance(m, AudioBlock):
                    nn.init.zeros_(m.bn2.weight)

    @property
    def audio_preset(self) -> Optional[str]:
        """The spectrogram preset whose frequency bins forward checks (None: no check)."""
        return self._audio_preset

    @audio_preset.setter
    def audio_preset(self, name: Optional[str]) -> None:
        # A plain int, so that the check in forward is a Python comparison of shapes (cheap,
        # no host sync, traced by torch.compile without a graph break).
        self.freq_bins: Optional[int] = None if name is None else get_preset(name).bins
        self._audio_preset = name

    def _check(self, x: torch.Tensor) -> None:
        """Shape checks only: dims, channels, and the frequency bins on dim 2 when the preset is known."""
        c, bins = self.in_channels, self.freq_bins
        if x.dim() != 4 or x.shape[1] != c or (bins is not None and x.shape[2] != bins):
            raise ValueError(self._layout_error(tuple(x.shape)))

    def _layout_error(self, shape: Tuple[int, ...]) -> str:
        c, bins = self.in_channels, self.freq_bins
        if bins is None:
            expected = f"audio: expected (B, {c}, F, T) log-spectrogram (frequency bins on dim 2)"
        else:
            expected = (f"audio: expected (B, {c}, F={bins}, T) log-spectrogram (frequency bins on dim 2) for "
                        f"preset {self.audio_preset}")
        got = f"{expected}, got shape {shape}"
        if len(shape) == 3 and (bins is None or shape[1] == bins):
            return f"{got}: the channel dim is missing; pass spec.unsqueeze(1)"
        if len(shape) != 4 or shape[1] != c:
            return got
        if shape[3] == bins:
            return f"{got}: it looks transposed; pass spec.transpose(2, 3)"
        return (f"{got}: {shape[2]} frequency bins, not {bins}; compute the spectrograms with preset "
                f"{self.audio_preset} (or build the model for the preset they come from)")

    def features(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Per-block activations for linear probes.

        Returns an OrderedDict: conv1 (B, w, F/2, T/2), block2 (B, w, ...), block3 (B, 2w, ...),
        block4 (B, 4w, ...), block5 (B, 8w, ...) and pool (B, 8w), the encoder's output.
        """
        self._check(x)
        out = OrderedDict(conv1=self.conv1(x))
        h = out["conv1"]
        for name in STAGES:
            h = getattr(self, name)(h)
            out[name] = h
        out["pool"] = self.pool(h).flatten(1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, F, T) -> (B, out_dim) globally max-pooled features."""
        self._check(x)
        h = self.conv1(x)
        for name in STAGES:
            h = getattr(self, name)(h)
        return self.pool(h).flatten(1)
