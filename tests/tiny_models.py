"""Tiny random-weight Stable Diffusion models built by the reference libraries (diffusers,
transformers) with SD v1.5's architecture at toy width, and saved in the hub's layouts."""
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

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
