"""Q-Diffusion's split shortcut (METHODS.md §2).

A UNet decoder ResBlock's skip-connection 1x1 conv sees ``X = [h || skip]`` (channel concatenation of the
upsampled features and the encoder skip), two tensors with very different ranges. Quantizing ``X`` and ``W``
in one piece wastes range on one half; Q-Diffusion quantizes ``X[:, :C1]`` and ``X[:, C1:]`` (and the matching
weight columns) separately.

Here the conv is rewritten as two float 1x1 convs on the two halves whose outputs add (the bias stays on the first):
``conv(X, W) = conv(X1, W[:, :C1]) + conv(X2, W[:, C1:])``, exact in float. ``quantize_model`` then quantizes each
part on its own (its own weight scales, its own static or dynamic activation scale), which is the split shortcut.

The rewrite changes the module tree: apply :func:`split_shortcuts` to the float model again before
``load_quantized(path, model=...)`` reads a checkpoint of a split model.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from vqsuite.errors import UserError

logger = logging.getLogger(__name__)


class SplitConv2d(nn.Module):
    """A 1x1 conv over ``[x1 || x2]`` (channels ``C1 + C2``) as two convs that add: ``part1(x1) + part2(x2)``.

    x: ``[B, C1 + C2, H, W]`` -> ``[B, O, H, W]``.
    """

    def __init__(self, conv: nn.Conv2d, split: int) -> None:
        super().__init__()
        if tuple(conv.kernel_size) != (1, 1) or conv.groups != 1:
            raise UserError(f"only 1x1 convs with groups=1 split, got kernel {conv.kernel_size}, groups {conv.groups}")
        if not 0 < split < conv.in_channels:
            raise UserError(f"split={split} must lie in (0, in_channels={conv.in_channels})")
        self.split = int(split)
        kw = dict(kernel_size=1, stride=conv.stride, padding=conv.padding, device=conv.weight.device)
        self.part1 = nn.Conv2d(split, conv.out_channels, bias=conv.bias is not None, dtype=conv.weight.dtype, **kw)
        self.part2 = nn.Conv2d(conv.in_channels - split, conv.out_channels, bias=False, dtype=conv.weight.dtype, **kw)
        with torch.no_grad():
            self.part1.weight.copy_(conv.weight[:, :split])
            self.part2.weight.copy_(conv.weight[:, split:])
            if conv.bias is not None:
                self.part1.bias.copy_(conv.bias)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.train(conv.training)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Conv2d's own parameter name
        return self.part1(input[:, : self.split]) + self.part2(input[:, self.split :])


def shortcut_splits(unet: nn.Module) -> dict[str, int]:
    """``{name: C1}`` for every decoder ResBlock skip conv of a diffusers ``UNet2D(Condition)Model``-style UNet:
    ``up_blocks[i].resnets[j]`` concatenates the previous output (``C1`` channels: the mid block's, then each
    resnet's ``out_channels``) with an encoder skip."""
    up_blocks = getattr(unet, "up_blocks", None)
    mid = getattr(unet, "mid_block", None)
    if up_blocks is None:
        return {}
    prev = None
    if mid is not None and getattr(mid, "resnets", None):
        prev = mid.resnets[-1].out_channels
    out: dict[str, int] = {}
    for i, block in enumerate(up_blocks):
        for j, res in enumerate(getattr(block, "resnets", [])):
            conv = getattr(res, "conv_shortcut", None)
            c_in = getattr(res, "in_channels", None)
            if prev is not None and isinstance(conv, nn.Conv2d) and c_in is not None and 0 < prev < c_in:
                if tuple(conv.kernel_size) == (1, 1):
                    out[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = prev
            prev = getattr(res, "out_channels", prev)
    return out


@torch.no_grad()
def split_shortcuts(unet: nn.Module, splits: dict[str, int] | None = None) -> list[str]:
    """Replace the decoder skip convs (``splits``: name -> C1, default :func:`shortcut_splits`) with
    :class:`SplitConv2d`, in place. Returns the names split. Call it on the float model before quantizing."""
    splits = shortcut_splits(unet) if splits is None else splits
    done = []
    for name, c1 in splits.items():
        conv = unet.get_submodule(name)
        if isinstance(conv, SplitConv2d):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name) if parent_name else unet, child, SplitConv2d(conv, c1))
        done.append(name)
    logger.info("split shortcut: %d decoder skip conv(s) split", len(done))
    return done
