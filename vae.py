"""The Stable Diffusion v1.x autoencoder (diffusers' AutoencoderKL architecture), from scratch.

Images in [-1, 1] (B, 3, H, W) <-> latents (B, 4, H/8, W/8) already multiplied by the scaling
factor 0.18215, the space the UNet works in. Parameter names follow diffusers, so the hub's
`vae/diffusion_pytorch_model.safetensors` loads with strict key matching. The building blocks
are the UNet's (unet.py), used without time embedding.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unet import Attention, DownBlock, MidBlock, UpBlock, check_group_norm, name_attention_layers


@dataclass
class VAEConfig:
    """The fields of a diffusers `vae/config.json` that SD v1.x uses; defaults are SD v1.5's."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    def __post_init__(self):
        check_group_norm(self.norm_num_groups, self.block_out_channels)


EPS = 1e-6  # every GroupNorm of the autoencoder


class PixelAttention(Attention):
    """Single-head self-attention over all pixels, with its own GroupNorm and residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)

    def forward(self, x, context=None, hooks=None):
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, h*w, C)
        return x + super().forward(tokens, hooks=hooks).transpose(1, 2).unflatten(2, (h, w))


def mid_block(channels: int, groups: int) -> MidBlock:
    return MidBlock(channels, PixelAttention(channels, groups), temb_ch=None, groups=groups, eps=EPS)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block, temb_ch=None, groups=groups, eps=EPS,
                      downsample=i < len(chs) - 1, down_padding=0) for i in range(len(chs)))
        self.mid_block = mid_block(chs[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = mid_block(chs[0], groups)
        n = cfg.layers_per_block + 1
        self.up_blocks = nn.ModuleList(
            UpBlock([chs[max(i - 1, 0)]] + [chs[i]] * (n - 1), chs[i], temb_ch=None, groups=groups, eps=EPS,
                    upsample=i < len(chs) - 1) for i in range(len(chs)))
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class VAE(nn.Module):
    """`encode(img) -> latent` (posterior mean x scaling factor); `decode(latent) -> img`."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        name_attention_layers(self)

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W) in [-1, 1] -> latent (B, 4, H/8, W/8), the mean of the posterior, scaled."""
        mean, _logvar = self.quant_conv(self.encoder(img)).chunk(2, dim=1)
        return mean * self.config.scaling_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (B, 4, h, w) -> image (B, 3, 8h, 8w) in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(latent / self.config.scaling_factor))
