"""The Stable Diffusion v1.x UNet (diffusers' UNet2DConditionModel architecture), from scratch.

Module and parameter names follow diffusers, so the hub's `unet/diffusion_pytorch_model.safetensors`
loads with strict key matching. The network is built by loops over `UNetConfig`; nothing is spelt
out block by block.

Every attention layer knows its diffusers-style name (for instance
`up_blocks.1.attentions.2.transformer_blocks.0.attn2`) and calls the hook object handed to
`UNet.forward(..., hooks=...)`: this is how EmerDiff reads the 16x16 query features, records and
replays the attention maps, and adds its modulation. See `AttentionHooks`.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The 16x16 up block ("up16": feature maps 1/32 of the image side) holds three spatial
# transformers, each with one cross-attention layer. EmerDiff reads its low-resolution features
# from the first and modulates the third (paper Sec. 3.2 and 3.3; the authors' notebook names them).
FEATURE_LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
MODULATED_LAYER = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"


class AttentionHooks:
    """The hook protocol every attention layer calls; this base class changes nothing.

    A layer computes o = to_out[0](softmax(q k^T / sqrt(d)) v), q = to_q(x), k = to_k(context),
    v = to_v(context), and asks the hooks twice, by its diffusers-style `name`, each time handing
    over a function that computes what the hook may replace:

      out(name, attend) -> o        first. attend() computes the whole output o (after to_out[0],
                                    before the residual add). A hook returns attend(), changed or not,
                                    or a tensor of its own without calling attend: then the layer
                                    computes nothing at all.
      qk(name, project) -> (q, k)   inside attend(). project() computes q and k. A hook returns them
                                    (after reading them), or tensors of its own without calling
                                    project: then to_q and to_k are not computed.

    q, k and o are (B, tokens, channels) with all heads together. A hook may return batch 1 where
    the layer has B (broadcast). The samplers set `step` before each UNet call: the index of its
    denoising step, or a list with one index per sample when one call carries several steps (the
    batched inversion).
    """
    step: int | list[int] = 0

    def out(self, name: str, attend) -> torch.Tensor:
        return attend()

    def qk(self, name: str, project) -> tuple[torch.Tensor, torch.Tensor]:
        return project()


NO_HOOKS = AttentionHooks()


def is_cross_attention(name: str) -> bool:
    """attn2 of a transformer block attends to the prompt; attn1 (and the VAE's attention) to itself."""
    return name.endswith("attn2")


DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")  # diffusers' names: with / without attention
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def check_group_norm(groups: int, channels: tuple[int, ...]):
    """Every GroupNorm splits a block's channels into `groups` equal groups."""
    for width in channels:
        if width % groups:
            raise ValueError(f"norm_num_groups {groups} does not divide block_out_channels {width}")


@dataclass
class UNetConfig:
    """The fields of a diffusers `unet/config.json` that SD v1.x uses; defaults are SD v1.5's."""
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8  # diffusers' name; in SD v1 it is the number of heads
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5

    def __post_init__(self):
        """The rules between fields (weights.py checks each field's type and sign before)."""
        levels = len(self.block_out_channels)
        for field, known in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            block_types = getattr(self, field)
            if len(block_types) != levels:
                raise ValueError(f"{field} has {len(block_types)} entries for {levels} block_out_channels")
            if unknown := sorted(set(block_types) - set(known)):
                raise ValueError(f"{field}: unknown {unknown[0]!r} (known: {', '.join(known)})")
        if isinstance(self.attention_head_dim, tuple) and len(self.attention_head_dim) != levels:
            raise ValueError(f"attention_head_dim has {len(self.attention_head_dim)} entries for {levels} "
                             "block_out_channels")
        check_group_norm(self.norm_num_groups, self.block_out_channels)
        for level, width in enumerate(self.block_out_channels):
            if width % self.heads(level):
                raise ValueError(f"attention_head_dim {self.heads(level)} (heads) does not divide "
                                 f"block_out_channels {width}")

    def heads(self, level: int) -> int:
        """Attention heads at resolution level `level` (0 = full latent resolution)."""
        heads = self.attention_head_dim
        return heads[level] if isinstance(heads, (tuple, list)) else heads


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t (B,) -> (B, dim), cos half first (flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between (when there is one)."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch) if temb_ch else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head (self or cross) attention through SDPA, calling the hooks by its own name."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        self.heads = heads
        self.name = ""  # set by the model that owns the layer (its diffusers module name)
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None, hooks: AttentionHooks | None = None):
        hooks = NO_HOOKS if hooks is None else hooks
        return hooks.out(self.name, lambda: self.attend(x, x if context is None else context, hooks))

    def attend(self, x, context, hooks: AttentionHooks):
        """to_out[0](softmax(q k^T / sqrt(d)) v), (B, tokens, dim); q and k as the hooks give them."""
        q, k = hooks.qk(self.name, lambda: (self.to_q(x), self.to_k(context)))
        return self.to_out[0](self.attention(q, k, self.to_v(context)))

    def attention(self, q, k, v):
        """softmax(q k^T / sqrt(d)) v per head by SDPA: (b, tokens, dim) each, b = 1 or B -> (B, tokens, dim)."""
        batch = max(len(q), len(k), len(v))
        o = F.scaled_dot_product_attention(*(self._split_heads(a, batch) for a in (q, k, v)))
        return o.transpose(1, 2).flatten(2)

    def _split_heads(self, a, batch):
        """(b, tokens, dim) -> (batch, heads, tokens, dim / heads), repeating b = 1 over batch
        (materialised, not a stride-0 view, so that every fused attention kernel sees usual strides)."""
        a = a.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return a if a.shape[0] == batch else a.expand(batch, -1, -1, -1).contiguous()


class FeedForward(nn.Module):
    """GEGLU feed-forward: project to 2 x 4 x dim, value * gelu(gate), project back."""

    def __init__(self, dim: int):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, 8 * dim)
        # diffusers' indices: net.0 = GEGLU projection, net.1 = dropout, net.2 = output linear.
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        value, gate = self.net[0].proj(x).chunk(2, dim=-1)
        return self.net[2](value * F.gelu(gate))


class TransformerBlock(nn.Module):
    """LayerNorm -> self-attention (attn1) -> LayerNorm -> cross-attention (attn2) -> LayerNorm -> FF."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context, hooks):
        x = x + self.attn1(self.norm1(x), hooks=hooks)
        x = x + self.attn2(self.norm2(x), context, hooks)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm -> 1x1 conv -> transformer block over the h*w tokens -> 1x1 conv -> + input.

    The 1x1 convolutions run as matrix products on the tokens (the same arithmetic): the tokens are
    laid out contiguously once, on the way in, and the image once, on the way out."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context, hooks):
        _, c, h, w = x.shape
        tokens = pointwise(self.proj_in, self.norm(x).flatten(2).transpose(1, 2))  # (B, h*w, C)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, hooks)
        return x + pointwise(self.proj_out, tokens).transpose(1, 2).reshape(len(tokens), c, h, w)  # a hook may batch


def pointwise(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied to tokens (B, n, C_in) -> (B, n, C_out): a linear layer."""
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


class Downsample2D(nn.Module):
    """3x3 conv with stride 2. padding=0 pads right and bottom by one first (the VAE's variant)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (x2, or to `size`) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            size = (2 * x.shape[-2], 2 * x.shape[-1])
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownBlock(nn.Module):
    """One resolution level on the way down: resnets (each followed by a transformer when
    `heads` is set), then an optional stride-2 downsample. Returns every output for the skips."""

    def __init__(self, in_ch, out_ch, layers, *, temb_ch, groups, eps, heads=None, context_dim=None,
                 downsample=True, down_padding=1):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb_ch, groups, eps) for j in range(layers))
        self.attentions = nn.ModuleList(
            SpatialTransformer(out_ch, heads, context_dim, groups) for _ in range(layers if heads else 0))
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, down_padding)] if downsample else [])

    def forward(self, h, temb=None, context=None, hooks=None):
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions:
                h = self.attentions[j](h, context, hooks)
            skips.append(h)
        for downsampler in self.downsamplers:
            h = downsampler(h)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    """One resolution level on the way up: resnets (each fed the next skip, when given, and followed
    by a transformer when `heads` is set), then an optional x2 upsample."""

    def __init__(self, in_chs, out_ch, *, temb_ch, groups, eps, heads=None, context_dim=None, upsample=True):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(c, out_ch, temb_ch, groups, eps) for c in in_chs)
        self.attentions = nn.ModuleList(
            SpatialTransformer(out_ch, heads, context_dim, groups) for _ in range(len(in_chs) if heads else 0))
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if upsample else [])

    def forward(self, h, skips=None, temb=None, context=None, hooks=None):
        for j, resnet in enumerate(self.resnets):
            if skips is not None:  # a skip taken before a hook made the batch may still have batch 1
                h = torch.cat([h, skips.pop().expand(len(h), -1, -1, -1)], dim=1)
            h = resnet(h, temb)
            if self.attentions:
                h = self.attentions[j](h, context, hooks)
        for upsampler in self.upsamplers:
            # Upsample to the next skip's size: odd sides were rounded up on the way down.
            h = upsampler(h, skips[-1].shape[-2:] if skips else None)
        return h


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution (UNet and VAE alike)."""

    def __init__(self, channels: int, attention: nn.Module, *, temb_ch, groups, eps):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, temb_ch, groups, eps) for _ in range(2))
        self.attentions = nn.ModuleList([attention])

    def forward(self, h, temb=None, context=None, hooks=None):
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context, hooks)
        return self.resnets[1](h, temb)


def name_attention_layers(model: nn.Module) -> None:
    """Give every Attention layer its diffusers-style module name, the name hooks receive."""
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            module.name = name


class UNet(nn.Module):
    """eps = unet(x, t, context): the noise prediction of SD v1.x."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        chs, n = cfg.block_out_channels, cfg.layers_per_block
        temb_ch = 4 * chs[0]
        common = dict(temb_ch=temb_ch, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                      context_dim=cfg.cross_attention_dim)
        levels = range(len(chs))

        def block_heads(level, block_type):  # None: a block without attention
            return cfg.heads(level) if block_type.startswith("CrossAttn") else None

        self.time_embedding = TimestepEmbedding(chs[0], temb_ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(chs[max(i - 1, 0)], chs[i], n, heads=block_heads(i, cfg.down_block_types[i]),
                      downsample=i < len(chs) - 1, **common) for i in levels)
        self.mid_block = MidBlock(chs[-1], SpatialTransformer(chs[-1], cfg.heads(len(chs) - 1),
                                                              cfg.cross_attention_dim, cfg.norm_num_groups),
                                  temb_ch=temb_ch, groups=cfg.norm_num_groups, eps=cfg.norm_eps)
        # Up block i works at level L = last - i; its j-th resnet takes the previous output and the
        # skip of the matching down resnet (the last one takes the skip from the level below).
        self.up_blocks = nn.ModuleList()
        for i in levels:
            level = len(chs) - 1 - i
            prev_out = chs[min(level + 1, len(chs) - 1)]
            skip_chs = [chs[level]] * n + [chs[max(level - 1, 0)]]
            in_chs = [(prev_out if j == 0 else chs[level]) + skip for j, skip in enumerate(skip_chs)]
            self.up_blocks.append(UpBlock(in_chs, chs[level], heads=block_heads(level, cfg.up_block_types[i]),
                                          upsample=level > 0, **common))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)
        name_attention_layers(self)

    def forward(self, x, t, context, hooks: AttentionHooks | None = None):
        """x (B, 4, h, w), t an int or a (1,) or (B,) tensor, context (B or 1, 77, 768) -> eps (B, 4, h, w).
        (On a GPU, give t as a tensor on the device: an int is copied over, which waits for the GPU.)"""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context, hooks)
            skips += block_skips
        h = self.mid_block(h, temb, context, hooks)
        for block in self.up_blocks:
            h = block(h, skips, temb, context, hooks)
        return self.conv_out(F.silu(self.conv_norm_out(h)))
