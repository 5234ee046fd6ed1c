"""The network registry: MONAI networks in 2-D, created by name.

``create_network(name, **overrides)`` builds any registered network with
``in_channels=1`` and one output channel per structure (independent sigmoids).
Presets (network + arguments + training defaults) live in ``models/presets.toml``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline import one_of

NETWORKS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in NETWORKS:
            raise ValueError(f"network {name!r} registered twice")
        NETWORKS[name] = fn
        return fn
    return wrap


def create_network(name: str, out_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a registered network (input ``(B, 1, H, W)``, output ``(B, out_channels, H, W)`` logits).

    An unknown name raises a ValueError that suggests the closest names (:func:`pipeline.one_of`).
    """
    return one_of(name, NETWORKS, "network")(out_channels=out_channels, **kwargs)


@register("unet")
def unet(out_channels: int = 3, channels: tuple[int, ...] = (16, 32, 64, 128, 256),
         strides: tuple[int, ...] | None = None, num_res_units: int = 0, dropout: float = 0.0,
         norm: str = "instance") -> nn.Module:
    from monai.networks.nets import UNet
    channels = tuple(channels)
    if len(channels) < 2:
        raise ValueError(f"unet needs at least 2 levels of channels, got {channels}")
    strides = tuple(strides) if strides else (2,) * (len(channels) - 1)
    if len(strides) != len(channels) - 1:
        raise ValueError(f"unet: {len(channels)} channel levels need {len(channels) - 1} strides")
    return UNet(2, 1, out_channels, channels, strides, num_res_units=num_res_units,
                dropout=dropout, norm=norm)


@register("segresnet")
def segresnet(out_channels: int = 3, init_filters: int = 16,
              blocks_down: tuple[int, ...] = (1, 2, 2, 4), blocks_up: tuple[int, ...] = (1, 1, 1),
              dropout_prob: float | None = None) -> nn.Module:
    from monai.networks.nets import SegResNet
    return SegResNet(spatial_dims=2, in_channels=1, out_channels=out_channels,
                     init_filters=init_filters, blocks_down=tuple(blocks_down),
                     blocks_up=tuple(blocks_up), dropout_prob=dropout_prob)


@register("segresnetvae")
def segresnetvae(out_channels: int = 3, input_image_size: tuple[int, int] = (256, 256),
                 init_filters: int = 8, blocks_down: tuple[int, ...] = (1, 2, 2, 4),
                 blocks_up: tuple[int, ...] = (1, 1, 1)) -> nn.Module:
    """SegResNet with the VAE branch; forward returns ``(logits, vae_loss)`` in training."""
    from monai.networks.nets import SegResNetVAE
    return SegResNetVAE(input_image_size=tuple(input_image_size), spatial_dims=2, in_channels=1,
                        out_channels=out_channels, init_filters=init_filters,
                        blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up))


@register("dynunet")
def dynunet(out_channels: int = 3, filters: tuple[int, ...] = (16, 32, 64, 128, 256),
            res_block: bool = True) -> nn.Module:
    from monai.networks.nets import DynUNet
    n = len(filters)
    return DynUNet(2, 1, out_channels, kernel_size=[3] * n, strides=[1] + [2] * (n - 1),
                   upsample_kernel_size=[2] * (n - 1), filters=list(filters),
                   res_block=res_block, norm_name="instance")


@register("vnet")
def vnet(out_channels: int = 3, dropout_prob: float = 0.0) -> nn.Module:
    """MONAI's VNet (16 channels at the top, 4 downsamplings); input side divisible by 16."""
    from monai.networks.nets import VNet
    return VNet(spatial_dims=2, in_channels=1, out_channels=out_channels,
                dropout_prob_down=dropout_prob, dropout_prob_up=(dropout_prob, dropout_prob))


@register("regunet")
def regunet(out_channels: int = 3, num_channel_initial: int = 16, depth: int = 4) -> nn.Module:
    from monai.networks.nets import RegUNet
    return RegUNet(spatial_dims=2, in_channels=1, num_channel_initial=num_channel_initial,
                   depth=depth, out_channels=out_channels, out_activation=None)


class AsppSegmenter(nn.Module):
    """Encoder -> MONAI ``SimpleASPP`` head -> upsampling: the paper's "SimpleASPP" network.

    MONAI ships SimpleASPP as a block, not a network. This wraps it DeepLab-style: a
    4-stage strided residual encoder (output stride 16), the ASPP block (four parallel
    dilated convolutions, rates 1/2/4/6 at stride 16) on the deepest features, fused with
    the stride-4 features, then bilinear upsampling to the input size.
    """

    def __init__(self, out_channels: int = 3, base: int = 16, aspp_channels: int = 32) -> None:
        super().__init__()
        from monai.networks.blocks import ResidualUnit, SimpleASPP
        chans = [base, base * 2, base * 4, base * 8]
        layers, cin = [], 1
        for c in chans:
            layers.append(ResidualUnit(2, cin, c, strides=2, subunits=2, norm="instance"))
            cin = c
        self.encoder = nn.ModuleList(layers)
        self.aspp = SimpleASPP(2, chans[-1], aspp_channels, kernel_sizes=(1, 3, 3, 3),
                               dilations=(1, 2, 4, 6), norm_type="instance")
        self.low = nn.Conv2d(chans[1], aspp_channels, 1)
        self.head = nn.Sequential(
            nn.Conv2d(aspp_channels * 5, aspp_channels * 2, 3, padding=1),
            nn.InstanceNorm2d(aspp_channels * 2), nn.PReLU(),
            nn.Conv2d(aspp_channels * 2, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = []
        for layer in self.encoder:
            x = layer(x)
            feats.append(x)
        deep = self.aspp(feats[-1])
        low = self.low(feats[1])
        deep = nn.functional.interpolate(deep, size=low.shape[-2:], mode="bilinear",
                                         align_corners=False)
        out = self.head(torch.cat([deep, low], dim=1))
        return nn.functional.interpolate(out, size=size, mode="bilinear", align_corners=False)


@register("simple_aspp")
def simple_aspp(out_channels: int = 3, base: int = 16, aspp_channels: int = 32) -> nn.Module:
    return AsppSegmenter(out_channels, base, aspp_channels)
