"""CLIP ViT-B/16 (Radford et al. 2021): its image tower written here, its text tower from clip_text.py,
and MaskCLIP's dense features (Zhou, Loy and Dai, "Extract Free Dense Labels from CLIP", ECCV 2022).

The image tower is a ViT (Dosovitskiy et al. 2021): the image cut into 16x16 patches, each embedded
linearly, a learned class token in front, learned position embeddings added, a LayerNorm, then
pre-LN transformer blocks over all tokens; the class token's output, LayerNormed and projected, is
the image embedding. The text tower's state at the end-of-text token, projected, is the text embedding.
Both projections land in one space where matching images and texts have a high cosine.

Pixels are (B, 3, H, W) in [-1, 1] (EmerDiff's convention), normalised inside as CLIP was trained;
H and W may be any multiples of the patch size: the position embeddings, trained for a 14x14 grid
(224x224), are resized bicubically to the input's grid. Parameter names match transformers' CLIPModel
and the hub's `openai/clip-vit-base-patch16` files (weights.load_clip loads them with strict checks).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clip_text import (CLIPEncoder, CLIPEncoderConfig, CLIPTextConfig, CLIPTextTransformer, CLIPTokenizer,
                       end_of_text_states)

# CLIP's input normalisation (OpenAI's preprocessing), per RGB channel of an image in [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPVisionConfig(CLIPEncoderConfig):
    """The image tower: the transformer's fields, the training image side and the patch side, named like
    transformers' `vision_config`; defaults are ViT-B/16's."""

    image_size: int = 224  # the position embeddings form an (image_size // patch_size)^2 grid
    patch_size: int = 16


def vit_b_16_text() -> CLIPTextConfig:
    """ViT-B/16's text tower: 12 causal blocks of width 512 with 8 heads (Radford et al. 2021, Sec. 2.4)."""
    return CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_attention_heads=8)


@dataclass
class CLIPConfig:
    """Both towers and the width of the shared embedding space, as transformers' CLIPModel `config.json`
    names them; defaults are ViT-B/16's."""

    text_config: CLIPTextConfig = field(default_factory=vit_b_16_text)
    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512


class CLIPVisionEmbeddings(nn.Module):
    """Image -> tokens: non-overlapping patches embedded by one strided convolution (no bias), the
    class token in front, position embeddings added."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        C, p = config.hidden_size, config.patch_size
        self.trained_grid = config.image_size // p  # 14 for ViT-B/16
        # Same order as transformers; OpenAI's initialisation of the class token.
        self.class_embedding = nn.Parameter(torch.randn(C) * C ** -0.5)
        self.patch_embedding = nn.Conv2d(3, C, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding(self.trained_grid ** 2 + 1, C)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, 1 + h*w, C) tokens, the class token first, h = H / patch."""
        patches = self.patch_embedding(pixel_values)  # (B, C, h, w)
        B, C, h, w = patches.shape
        tokens = torch.cat([self.class_embedding.expand(B, 1, C), patches.flatten(2).transpose(1, 2)], dim=1)
        return tokens + self.positions(h, w)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """(1 + h*w, C): the class token's position embedding, then the trained grid's, resized bicubically
        (align_corners=False) to h x w where that grid differs (transformers' interpolate_pos_encoding,
        MaskCLIP's resize_pos_embed)."""
        table, g = self.position_embedding.weight, self.trained_grid  # (1 + g*g, C)
        if (h, w) == (g, g):
            return table
        grid = table[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)  # (1, C, h, w)
        return torch.cat([table[:1], grid.flatten(2)[0].T])  # (1 + h*w, C), patches row by row


class CLIPVisionTransformer(nn.Module):
    """CLIP's image tower: embeddings, pre_layrnorm (transformers' spelling), the blocks, and the
    post_layernorm that the towers' users apply to the tokens they read."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        C = config.hidden_size
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config, causal=False)
        self.post_layernorm = nn.LayerNorm(C, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, 1 + h*w, C) tokens after the first `num_layers` blocks
        (all by default), before post_layernorm."""
        return self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)), num_layers)


class CLIP(nn.Module):
    """CLIP's two towers and projections (transformers' CLIPModel names), with the tokenizer.

    encode_image (B, 3, H, W) -> (B, D) and encode_text (n texts) -> (n, D) give CLIP's embeddings (not
    normalised); dense_features gives MaskCLIP's per-patch features (B, D, h, w) in the same space."""

    def __init__(self, config: CLIPConfig, tokenizer: CLIPTokenizer):
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        text, vision, D = config.text_config, config.vision_config, config.projection_dim
        self.text_model = CLIPTextTransformer(text)
        self.vision_model = CLIPVisionTransformer(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, D, bias=False)
        self.text_projection = nn.Linear(text.hidden_size, D, bias=False)
        # The contrastive loss's learned temperature (Sec. 2.5), initialised to 1 / 0.07: in the checkpoint,
        # for a user that turns cosines into probabilities as CLIP's training did.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def patch_size(self) -> int:
        return self.config.vision_config.patch_size

    def normalised(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> CLIP's input: in [0, 1], normalised by CLIP's mean and std, in the
        model's dtype."""
        p = self.patch_size
        if pixels.shape[-2] % p or pixels.shape[-1] % p:
            raise ValueError(f"CLIP needs an image whose height and width are multiples of its patch size {p}, "
                             f"got {pixels.shape[-2]}x{pixels.shape[-1]}")
        mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(CLIP_STD, device=pixels.device).view(3, 1, 1)
        return (((pixels + 1) / 2 - mean) / std).to(self.visual_projection.weight.dtype)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, D): the class token's output, post_layernorm, projected."""
        tokens = self.vision_model(self.normalised(pixels))  # (B, 1 + h*w, C)
        return self.visual_projection(self.vision_model.post_layernorm(tokens[:, 0]))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """n texts -> (n, D): the text tower's state at each text's end-of-text token, projected. The ids are
        cut after the longest text's end-of-text token: the attention is causal, so no state up to that token
        sees the padding after it, and a short prompt costs its length, not 77 tokens."""
        ids = self.tokenizer(texts).to(self.text_projection.weight.device)  # (n, 77)
        ids = ids[:, :int((ids == self.tokenizer.end_id).int().argmax(1).max()) + 1]  # (n, longest + 2)
        return self.text_projection(end_of_text_states(self.text_model(ids), ids, self.tokenizer.end_id))

    def dense_features(self, pixels: torch.Tensor, with_keys: bool = False):
        """MaskCLIP's dense features (Zhou et al. 2022, Sec. 3): (B, 3, H, W) in [-1, 1] -> (B, D, h, w),
        h = H / patch, w = W / patch, one embedding per patch in the space of encode_text's, not normalised.

        The first blocks run as usual. In the last, MaskCLIP drops the attention for the patch tokens:
        each token keeps its own value, the value path of that block alone (as the official code's
        TransformerEncoderLayer.forward with return_qkv computes it), with y = layer_norm1(x):
            v = out_proj(v_proj(y)) + x;  v = v + mlp(layer_norm2(v))
        then post_layernorm and visual_projection per patch token (the class token dropped).
        with_keys=True also returns the last block's keys as that code makes them for key smoothing,
        out_proj(k_proj(y)) of the patch tokens: (B, h*w, C), C the image tower's width."""
        tower = self.vision_model
        last = tower.encoder.layers[-1]
        B, _, H, W = pixels.shape
        x = tower(self.normalised(pixels), num_layers=len(tower.encoder.layers) - 1)  # (B, 1 + h*w, C)
        y = last.layer_norm1(x)
        v = last.self_attn.out_proj(last.self_attn.v_proj(y)) + x
        v = v + last.mlp(last.layer_norm2(v))
        patches = self.visual_projection(tower.post_layernorm(v[:, 1:]))  # (B, h*w, D)
        features = patches.transpose(1, 2).reshape(B, -1, H // self.patch_size, W // self.patch_size)
        if not with_keys:
            return features
        return features, last.self_attn.out_proj(last.self_attn.k_proj(y[:, 1:]))  # keys (B, h*w, C)
