"""Tiny random-weight Stable Diffusion models built by the reference libraries (diffusers,
transformers) with SD v1.5's architecture at toy width, and saved in the hub's layouts; CLIP models
(transformers' CLIPModel) at ViT-B/16's size and at toy width, likewise."""
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

# SD v1.5's structure (4 levels, 2 resnets per down block, cross-attention in the first three
# levels, so up_blocks[1] works at 1/32 of the image side) at toy width.
TINY_UNET = dict(sample_size=16, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
                 attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY_VAE = dict(sample_size=64, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
TINY_CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_hidden_layers=2, max_position_embeddings=77, hidden_act="quick_gelu")

# The real SD v1.5 configurations (the hub's config.json files, the fields that matter).
SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5,
                 down_block_types=TINY_UNET["down_block_types"], up_block_types=TINY_UNET["up_block_types"])
SD15_VAE = dict(sample_size=512, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                scaling_factor=0.18215,
                down_block_types=TINY_VAE["down_block_types"], up_block_types=TINY_VAE["up_block_types"])
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)

# CLIP ViT-B/16 as the hub's openai/clip-vit-base-patch16 configures it (its text_config keeps the legacy
# eos_token_id 2, for which transformers pools at each row's largest id), and its structure at toy width
# (weights.TINY_CLIP_CONFIG; transformers' newer eos_token_id 49407: pooled at the first end token).
VIT_B_16_CLIP = dict(text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                                      num_hidden_layers=12, bos_token_id=0, eos_token_id=2, pad_token_id=1),
                     vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, image_size=224, patch_size=16),
                     projection_dim=512)
TINY_CLIP_MODEL = dict(text_config=TINY_CLIP,
                       vision_config=dict(hidden_size=48, intermediate_size=96, num_attention_heads=4,
                                          num_hidden_layers=2, image_size=32, patch_size=16, hidden_act="quick_gelu"),
                       projection_dim=24)


def randomise(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter (norm weights and zero biases included) so all of them matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model.eval()


def tiny_reference_models(seed: int = 0):
    """(unet, vae, text_encoder) from diffusers/transformers with random weights."""
    torch.manual_seed(seed)
    unet = randomise(UNet2DConditionModel(**TINY_UNET), seed)
    vae = randomise(AutoencoderKL(**TINY_VAE), seed + 1)
    text_encoder = randomise(CLIPTextModel(CLIPTextConfig(**TINY_CLIP)), seed + 2)
    return unet, vae, text_encoder


def save_diffusers_folder(folder: Path, vocab_dir: Path, models) -> Path:
    """Lay the models out as the hub's SD v1.5 repo does: unet/, vae/, text_encoder/, tokenizer/."""
    unet, vae, text_encoder = models
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    clip_file = folder / "text_encoder" / "model.safetensors"  # the hub's (transformers 4) names: text_model.*
    save_file({k if k.startswith("text_model.") else "text_model." + k: v for k, v in load_file(clip_file).items()},
              clip_file, metadata={"format": "pt"})
    (folder / "tokenizer").mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_dir / name, folder / "tokenizer" / name)
    return folder


def clip_reference(config: dict, seed: int = 0) -> CLIPModel:
    """transformers' CLIPModel for `config` with random weights."""
    torch.manual_seed(seed)
    return randomise(CLIPModel(CLIPConfig(**config)), seed)


def save_clip_folder(folder: Path, vocab_dir: Path, model: CLIPModel) -> Path:
    """Lay the model out as the hub's openai/clip-vit-base-patch16 repo does: config.json, model.safetensors,
    vocab.json and merges.txt side by side."""
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_dir / name, folder / name)
    return folder
