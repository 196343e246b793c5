"""R(2+1)D video encoders of the supplement's Table 5 (analysis network) and Table 6 (R(2+1)D-18).

Input: (B, 3, T, H, W) float clips. Output: (B, 8 * width) max-pooled features (512 at width 64).

Structure (one-to-one with the reference implementation, so that its checkpoints can be mapped
onto ours name by name; see `R2Plus1DBlock` and `VideoStem` for the names):

    conv1    stem: 3x7x7 conv, stride (1,2,2), padding (1,3,3) -> BN -> ReLU
             [table6 only: 1x3x3 max-pool, stride (1,2,2), padding (0,1,1)]
    block2   stage of R(2+1)D residual blocks, `width` channels, stride 1
    block3   2 * width channels, first block strides (2,2,2)
    block4   4 * width channels, first block strides (2,2,2)
    block5   8 * width channels, first block strides (2,2,2)
    pool     global max-pool over (T, H, W) -> (B, 8 * width)

table5 has one residual block per stage (each holds rows "blockN.1" and "blockN.2" of Table 5,
one row per (2+1)D conv); table6 two per stage (rows "blockN.M.1", "blockN.M.2").

Every padding is kernel // 2, which reproduces each activation size of Tables 5 and 6 exactly
(tests/test_models.py checks every row).
"""
from collections import OrderedDict
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from avidfast.models.init import init_conv_bn_

# preset -> (residual blocks per stage, max-pool in the stem, native input (T, H=W))
VIDEO_PRESETS: Dict[str, Tuple[int, bool, Tuple[int, int]]] = {
    "table5": (1, False, (16, 112)),
    "table6": (2, True, (8, 224)),
}
STAGES = ("block2", "block3", "block4", "block5")
MID_CHANNELS = ("out", "matched")
OUT_BN = ("after_sum", "before_sum")
STEMS = ("3d", "2plus1d")


def matched_mid_channels(in_channels: int, out_channels: int, k_t: int = 3, k_s: int = 3) -> int:
    """Mid channels M of a (2+1)D conv with as many weights as the k_t x k_s x k_s 3D conv it replaces.

    M = floor(k_t * k_s^2 * N_in * N_out / (k_s^2 * N_in + k_t * N_out))  (Tran et al., CVPR 2018),
    computed per (2+1)D conv from that conv's own N_in and N_out.
    """
    return (k_t * k_s * k_s * in_channels * out_channels) // (k_s * k_s * in_channels + k_t * out_channels)


def _mid(mode: str, in_channels: int, out_channels: int, k_t: int, k_s: int) -> int:
    return out_channels if mode == "out" else matched_mid_channels(in_channels, out_channels, k_t, k_s)


def _spatial(cin: int, cout: int, k: int, s: int) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, (1, k, k), stride=(1, s, s), padding=(0, k // 2, k // 2), bias=False)


def _temporal(cin: int, cout: int, k: int, s: int) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, (k, 1, 1), stride=(s, 1, 1), padding=(k // 2, 0, 0), bias=False)


class VideoStem(nn.Module):
    """conv1: (B, C_in, T, H, W) -> (B, width, T, ceil(H/2), ceil(W/2)) [/2 again with max_pool].

    stem="3d" (the reference's, both tables): `conv` 3x7x7 conv, stride (1,2,2), padding (1,3,3)
    -> `bn` -> ReLU. stem="2plus1d": the same receptive field factorised, `spt_conv` 1x7x7 stride
    (1,2,2) -> `spt_bn` -> ReLU -> `tmp_conv` 3x1x1 -> `bn` -> ReLU, with `mid_channels` between.
    max_pool adds `pool`, a 1x3x3 max-pool with stride (1,2,2) and padding (0,1,1) (table6).
    """

    def __init__(self, in_channels: int, out_channels: int, stem: str = "3d",
                 mid_channels: str = "out", max_pool: bool = False):
        super().__init__()
        self.kind = stem
        if stem == "3d":
            self.conv = nn.Conv3d(in_channels, out_channels, (3, 7, 7), stride=(1, 2, 2),
                                  padding=(1, 3, 3), bias=False)
        else:
            mid = _mid(mid_channels, in_channels, out_channels, 3, 7)
            self.spt_conv = _spatial(in_channels, mid, 7, 2)
            self.spt_bn = nn.BatchNorm3d(mid)
            self.tmp_conv = _temporal(mid, out_channels, 3, 1)
        self.bn = nn.BatchNorm3d(out_channels)
        self.pool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)) if max_pool else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "3d":
            x = self.conv(x)
        else:
            x = self.tmp_conv(F.relu(self.spt_bn(self.spt_conv(x)), inplace=True))
        x = F.relu(self.bn(x), inplace=True)
        return x if self.pool is None else self.pool(x)


class R2Plus1DBlock(nn.Module):
    """Residual block of two (2+1)D convs: (B, C_in, T, H, W) -> (B, C_out, T/s_t, H/s_s, W/s_s).

    Module names are the reference's (`BasicR2P1DBlock`), one parameter tensor for one:

        spt_conv1 1x3x3 stride (1,s_s,s_s) -> spt_bn1 -> ReLU -> tmp_conv1 3x1x1 stride (s_t,1,1)
        -> tmp_bn1 -> ReLU -> spt_conv2 1x3x3 -> spt_bn2 -> ReLU -> tmp_conv2 3x1x1 -> main
        shortcut: x, or res_conv (1x1x1 conv, stride (s_t,s_s,s_s), no BN) when the shape changes

    out_bn="after_sum" (default; the reference and docs/method.md): out = ReLU(out_bn(main + shortcut)).
    out_bn="before_sum" (standard ResNet): out = ReLU(out_bn(main) + shortcut), and the projection
    shortcut gets its own BN, `res_bn`, then.

    Mid channels (output of spt_convK, input of tmp_convK): "out" = the block's output channels
    (the reference's choice), "matched" = `matched_mid_channels` of that (2+1)D conv.

    zero_init_last_bn zeroes the scale of the last BN on the residual branch, so that the block
    starts as (BN, ReLU of) its shortcut: out_bn for "before_sum", spt_bn2 for "after_sum" (where
    out_bn sits after the sum, and zeroing it would zero the whole block).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 mid_channels: str = "out", out_bn: str = "after_sum"):
        super().__init__()
        self.out_bn_after_sum = out_bn == "after_sum"
        mid1 = _mid(mid_channels, in_channels, out_channels, 3, 3)
        mid2 = _mid(mid_channels, out_channels, out_channels, 3, 3)
        self.spt_conv1 = _spatial(in_channels, mid1, 3, stride)
        self.spt_bn1 = nn.BatchNorm3d(mid1)
        self.tmp_conv1 = _temporal(mid1, out_channels, 3, stride)
        self.tmp_bn1 = nn.BatchNorm3d(out_channels)
        self.spt_conv2 = _spatial(out_channels, mid2, 3, 1)
        self.spt_bn2 = nn.BatchNorm3d(mid2)
        self.tmp_conv2 = _temporal(mid2, out_channels, 3, 1)
        self.out_bn = nn.BatchNorm3d(out_channels)
        self.res_conv = None
        self.res_bn = None
        if in_channels != out_channels or stride != 1:
            self.res_conv = nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False)
            if not self.out_bn_after_sum:
                self.res_bn = nn.BatchNorm3d(out_channels)

    def last_bn(self) -> nn.BatchNorm3d:
        """The BN that zero_init_last_bn zeroes (see the class docstring)."""
        return self.spt_bn2 if self.out_bn_after_sum else self.out_bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.spt_bn1(self.spt_conv1(x)), inplace=True)
        y = F.relu(self.tmp_bn1(self.tmp_conv1(y)), inplace=True)
        y = F.relu(self.spt_bn2(self.spt_conv2(y)), inplace=True)
        y = self.tmp_conv2(y)
        shortcut = x
        if self.res_conv is not None:
            shortcut = self.res_conv(x)
            if self.res_bn is not None:
                shortcut = self.res_bn(shortcut)
        if self.out_bn_after_sum:
            return F.relu(self.out_bn(y + shortcut), inplace=True)
        return F.relu(self.out_bn(y) + shortcut, inplace=True)


class VideoEncoder(nn.Module):
    """R(2+1)D encoder: (B, in_channels, T, H, W) -> (B, out_dim), out_dim = 8 * width.

    Args:
        depth: "table5" (analysis network: 16x112^2 input, no stem max-pool, one residual block
            per stage) or "table6" (R(2+1)D-18: 8x224^2 input, stem max-pool, two blocks per stage).
        width: channels of conv1/block2; block3..block5 have 2x, 4x, 8x (64 -> 64,128,256,512).
        mid_channels: "out" (default, the reference's: a (2+1)D conv's mid channels equal its
            output channels) or "matched" (as many weights as the 3x3x3 conv; `matched_mid_channels`).
        stem: "3d" (default, the reference's single 3x7x7 conv) or "2plus1d" (1x7x7 then 3x1x1).
        out_bn: "after_sum" (default, the reference's) or "before_sum"; see `R2Plus1DBlock`.
        zero_init_last_bn: start every residual branch at zero (off by default, as the reference);
            see `R2Plus1DBlock`.
        in_channels: input channels (3).

    Any T, H, W work; the sizes of Tables 5 and 6 come out at the presets' native inputs
    (`VIDEO_PRESETS`). Modules: conv1 (`VideoStem`), block2..block5 (nn.Sequential of
    `R2Plus1DBlock`, named "<stage>.<i>"), pool. Layout-agnostic: runs in channels_last_3d.
    Init: convs kaiming-normal (fan_out, relu), BN weight 1 and bias 0.
    """

    def __init__(self, depth: str = "table5", width: int = 64, *, mid_channels: str = "out",
                 stem: str = "3d", out_bn: str = "after_sum", zero_init_last_bn: bool = False,
                 in_channels: int = 3):
        super().__init__()
        choices = (("depth", depth, VIDEO_PRESETS), ("mid_channels", mid_channels, MID_CHANNELS),
                   ("stem", stem, STEMS), ("out_bn", out_bn, OUT_BN))
        for name, value, allowed in choices:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")
        if int(width) != width or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        blocks, max_pool, _ = VIDEO_PRESETS[depth]
        self.depth = depth
        self.width = width
        self.in_channels = in_channels
        self.zero_init_last_bn = zero_init_last_bn
        channels = [width, 2 * width, 4 * width, 8 * width]
        self.out_dim = channels[-1]
        self.conv1 = VideoStem(in_channels, width, stem, mid_channels, max_pool)
        cin = width
        for i, (name, cout) in enumerate(zip(STAGES, channels)):
            stride = 1 if i == 0 else 2
            stage = [R2Plus1DBlock(cin, cout, stride, mid_channels, out_bn)]
            stage += [R2Plus1DBlock(cout, cout, 1, mid_channels, out_bn) for _ in range(blocks - 1)]
            self.add_module(name, nn.Sequential(*stage))
            cin = cout
        self.pool = nn.AdaptiveMaxPool3d(1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, relu) convs, unit/zero BNs, zeroed last BNs if asked."""
        init_conv_bn_(self)
        if self.zero_init_last_bn:
            for m in self.modules():
                if isinstance(m, R2Plus1DBlock):
                    nn.init.zeros_(m.last_bn().weight)

    def _check(self, x: torch.Tensor) -> None:
        """Shape checks only (dims and channels; no frame count: any T works)."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(self._layout_error(tuple(x.shape)))

    def _layout_error(self, shape: Tuple[int, ...]) -> str:
        c = self.in_channels
        got = f"video: expected (B, {c}, T, H, W) clips (channels on dim 1), got shape {shape}"
        if len(shape) == 5 and shape[2] == c:
            return f"{got}: channels are on dim 2, it looks like (B, T, {c}, H, W); pass video.transpose(1, 2)"
        if len(shape) == 5 and shape[4] == c:
            return f"{got}: channels are on dim 4, it looks like (B, T, H, W, {c}); pass video.permute(0, 4, 1, 2, 3)"
        if len(shape) == 4 and shape[0] == c:
            return f"{got}: the batch dim is missing; pass video.unsqueeze(0)"
        return got

    def features(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Per-block activations for linear probes.

        Returns an OrderedDict: conv1 (B, width, T, H/2, W/2; table6: after the stem max-pool,
        H/4, W/4), block2 (B, w, ...), block3 (B, 2w, T/2, ...), block4 (B, 4w, T/4, ...),
        block5 (B, 8w, T/8, ...) and pool (B, 8w), the encoder's output.
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
        """(B, in_channels, T, H, W) -> (B, out_dim) globally max-pooled features."""
        self._check(x)
        h = self.conv1(x)
        for name in STAGES:
            h = getattr(self, name)(h)
        return self.pool(h).flatten(1)
