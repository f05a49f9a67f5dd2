"""Our UNet, VAE and CLIP text encoder against diffusers/transformers with the same weights."""
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig as RefCLIPConfig
from transformers import CLIPTextModel as RefCLIPTextModel

from clip_text import CLIPTextConfig, CLIPTextModel
from tiny_models import SD15_CLIP, SD15_UNET, SD15_VAE, TINY_CLIP, TINY_UNET, TINY_VAE
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig
from weights import WeightsError, config_from_dict


def assert_close(ours, ref, rel=1e-4):
    """max |ours - ref| <= rel * max |ref| (fp32 parity relative to the output's scale)."""
    assert ours.shape == ref.shape
    error, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert scale > 0 and error <= rel * scale, f"max abs error {error:.3g} at output scale {scale:.3g}"


@pytest.mark.parametrize("latent_hw", [(8, 12), (9, 13)])  # non-square; odd sides round up on the way down
def test_unet_matches_diffusers(sd, tiny_reference, latent_hw):
    ref = tiny_reference[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, *latent_hw, generator=g)
    t = torch.tensor([981, 281, 1])
    context = torch.randn(3, 77, TINY_UNET["cross_attention_dim"], generator=g)
    with torch.no_grad():
        assert_close(sd.unet(x, t, context), ref(x, t, context).sample)
        assert_close(sd.unet(x, 21, context), ref(x, 21, context).sample)  # an int timestep


def test_vae_matches_diffusers(sd, tiny_reference):
    ref = tiny_reference[1]
    image = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref_latent = ref.encode(image).latent_dist.mean * ref.config.scaling_factor
        latent = sd.vae.encode(image)
        assert_close(latent, ref_latent)
        assert_close(sd.vae.decode(ref_latent), ref.decode(ref_latent / ref.config.scaling_factor).sample)



def test_compiled_models_match_diffusers(tiny_sd_dir, tiny_reference):
    """--compile (torch.compile of the UNet's resnets and feed-forwards and of the VAE decoder, the
    decoder in the channels_last layout that CUDA gives it) computes what diffusers computes, hooks
    included."""
    import devices
    from sampler import AttentionRecord
    from weights import load_stable_diffusion
    compiled = load_stable_diffusion(tiny_sd_dir)
    for module in (compiled.vae.post_quant_conv, compiled.vae.decoder):
        module.to(memory_format=torch.channels_last)
    ref_unet, ref_vae = tiny_reference[:2]
    g = torch.Generator().manual_seed(4)
    x, context = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 77, TINY_UNET["cross_attention_dim"], generator=g)
    t = torch.tensor([281, 1])
    with torch.no_grad(), devices.compiled(compiled):
        assert_close(compiled.unet(x, t, context, AttentionRecord()), ref_unet(x, t, context).sample)
        assert_close(compiled.vae.decode(x), ref_vae.decode(x / ref_vae.config.scaling_factor).sample)

def test_the_cuda_layout_computes_what_diffusers_computes(tiny_sd_dir, tiny_reference):
    """On CUDA the UNet runs in the channels_last layout (devices.channels_last): in it, the
    attention record's pass and a modulated step (zero offsets: 3 runs made from one sample by the
    hooks, every layer replayed) compute what diffusers computes on the default layout."""
    from sampler import AttentionRecord, Modulation, predict_noise
    from weights import load_stable_diffusion
    unet = load_stable_diffusion(tiny_sd_dir).unet.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(1, 4, 8, 12, generator=g), torch.randn(1, 77, TINY_UNET["cross_attention_dim"], generator=g)
    t, record = torch.tensor([281]), AttentionRecord()
    with torch.no_grad():
        ref = tiny_reference[0](x, t, context).sample
        assert_close(predict_noise(unet, x, t, context, record, step=0), ref)
        runs = predict_noise(unet, x, t, context, Modulation(torch.zeros(3, 6), record), step=0)
    assert_close(runs, ref.expand(3, -1, -1, -1))


def test_text_encoder_matches_transformers(sd, tiny_reference):
    tokens = sd.tokenizer(["", "a photograph of an astronaut riding a horse", "two cats, 3 dogs!"])
    with torch.no_grad():
        assert_close(sd.text_encoder(tokens), tiny_reference[2](tokens).last_hidden_state)


def layout(model):
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


@pytest.mark.parametrize("ref_build, ours_build", [
    (lambda: UNet2DConditionModel(**SD15_UNET), lambda: UNet(config_from_dict(UNetConfig, SD15_UNET))),
    (lambda: AutoencoderKL(**SD15_VAE), lambda: VAE(config_from_dict(VAEConfig, SD15_VAE))),
    (lambda: RefCLIPTextModel(RefCLIPConfig(**SD15_CLIP)), lambda: CLIPTextModel(CLIPTextConfig(**SD15_CLIP))),
], ids=["unet", "vae", "text_encoder"])
def test_sd15_layout_is_exactly_the_references(ref_build, ours_build):
    """At full SD v1.5 size (on the meta device: no memory, no time): same names, same shapes."""
    with torch.device("meta"):
        ref, ours = layout(ref_build()), layout(ours_build())
    ref.pop("text_model.embeddings.position_ids", None)  # a buffer, never in the hub's files
    if "embeddings.token_embedding.weight" in ref:  # transformers >= 5 drops the hub files' `text_model.`
        ref = {"text_model." + k: v for k, v in ref.items()}
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}


def test_sd15_defaults_are_the_hub_configs():
    assert UNetConfig() == config_from_dict(UNetConfig, SD15_UNET)
    assert VAEConfig() == config_from_dict(VAEConfig, SD15_VAE)
    assert CLIPTextConfig() == CLIPTextConfig(**SD15_CLIP)


def ref_clip(**config):
    return RefCLIPTextModel(RefCLIPConfig(**config))


REFUSED = {  # configs the references refuse to build: (reference, our config class, config)
    "down_block_types-length": (UNet2DConditionModel, UNetConfig,
                                TINY_UNET | dict(down_block_types=TINY_UNET["down_block_types"][:3])),
    "up_block_types-name": (UNet2DConditionModel, UNetConfig,
                            TINY_UNET | dict(up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2 + ("Fancy",))),
    "unet-groups": (UNet2DConditionModel, UNetConfig, TINY_UNET | dict(norm_num_groups=7)),
    "heads-length": (UNet2DConditionModel, UNetConfig, TINY_UNET | dict(attention_head_dim=(4, 4))),
    "vae-groups": (AutoencoderKL, VAEConfig, TINY_VAE | dict(norm_num_groups=5)),
    "clip-heads": (ref_clip, CLIPTextConfig, TINY_CLIP | dict(num_attention_heads=5)),
}


@pytest.mark.parametrize("reference, config_cls, config", REFUSED.values(), ids=REFUSED.keys())
def test_configs_the_references_refuse_are_refused_before_any_tensor(reference, config_cls, config):
    with pytest.raises(Exception), torch.device("meta"):
        reference(**config)
    with pytest.raises(WeightsError):
        config_from_dict(config_cls, config)


def test_the_random_tiny_model_has_the_tests_tiny_configuration():
    """--random-weights builds weights.TINY_CONFIGS, documented as the tests' tiny model's shape."""
    from weights import TINY_CONFIGS, random_stable_diffusion
    assert TINY_CONFIGS["unet"] == config_from_dict(UNetConfig, TINY_UNET)
    assert TINY_CONFIGS["vae"] == config_from_dict(VAEConfig, TINY_VAE)
    assert TINY_CONFIGS["text_encoder"] == CLIPTextConfig(**TINY_CLIP)
    state = torch.random.get_rng_state()
    sd = random_stable_diffusion("tiny")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left alone
    assert sd.unet.config == TINY_CONFIGS["unet"] and sd.text_encoder(sd.tokenizer("")).shape == (1, 77, 32)
