"""The loader: diffusers folders, original single files, the hub cache, and every bad input."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from conftest import ROOT
from weights import WeightsError, load_stable_diffusion


# ---- an exporter to the original LDM names, written plainly here from the spec's tables ----

RESNET_TO_LDM = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def unet_to_ldm(key: str, n: int = 2) -> str:
    for ours, ldm in RESNET_TO_LDM:
        key = re.sub(rf"(resnets\.\d+)\.{ours}\.", rf"\1.{ldm}.", key)
    rules = [
        (r"^time_embedding\.linear_1\.", lambda m: "time_embed.0."),
        (r"^time_embedding\.linear_2\.", lambda m: "time_embed.2."),
        (r"^conv_in\.", lambda m: "input_blocks.0.0."),
        (r"^conv_norm_out\.", lambda m: "out.0."),
        (r"^conv_out\.", lambda m: "out.2."),
        (r"^down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"input_blocks.{(n + 1) * int(m[1]) + int(m[2]) + 1}.0."),
        (r"^down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"input_blocks.{(n + 1) * int(m[1]) + int(m[2]) + 1}.1."),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m: f"input_blocks.{(n + 1) * (int(m[1]) + 1)}.0.op."),
        (r"^mid_block\.resnets\.(\d+)\.", lambda m: f"middle_block.{2 * int(m[1])}."),
        (r"^mid_block\.attentions\.0\.", lambda m: "middle_block.1."),
        (r"^up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"output_blocks.{(n + 1) * int(m[1]) + int(m[2])}.0."),
        (r"^up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"output_blocks.{(n + 1) * int(m[1]) + int(m[2])}.1."),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
         lambda m: f"output_blocks.{(n + 1) * int(m[1]) + n}.{1 if m[1] == '0' else 2}.conv."),
    ]
    for pattern, repl in rules:
        key, count = re.subn(pattern, repl, key)
        if count:
            return key
    raise AssertionError(f"unmapped UNet key {key}")


def vae_to_ldm(key: str, levels: int = 4) -> str:
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    for ours, ldm in [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]:
        key = key.replace(f"mid_block.attentions.0.{ours}.", f"mid.attn_1.{ldm}.")
    return key


def ldm_checkpoint(unet, vae, text_encoder) -> dict:
    """The tiny models as one original-format state dict, with the extras real files carry."""
    out = {"model.diffusion_model." + unet_to_ldm(k): v for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        if ".attentions.0.to_" in k and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's 1x1 convs
        out["first_stage_model." + vae_to_ldm(k)] = v
    for k, v in text_encoder.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k
        out["cond_stage_model.transformer." + k] = v
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    out["model_ema.decay"] = torch.tensor(0.9999)
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def single_file(tmp_path_factory, tiny_reference):
    path = tmp_path_factory.mktemp("single") / "tiny-v1-5.safetensors"
    save_file(ldm_checkpoint(*tiny_reference), str(path))
    return path


def test_exporter_agrees_with_diffusers_converter(single_file, tiny_reference):
    """diffusers' own converter maps our test file back onto the diffusers names, tensor for tensor."""
    unet, vae, _ = tiny_reference
    checkpoint = load_file(str(single_file))
    for converted, model in [(convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)), unet),
                             (convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)), vae)]:
        expected = model.state_dict()
        assert sorted(converted) == sorted(expected)
        assert all(torch.equal(converted[k].reshape(expected[k].shape), expected[k]) for k in expected)


def assert_same_weights(a, b):
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_single_file_loads_the_same_models(single_file, tiny_sd_dir):
    from_file = load_stable_diffusion(single_file, config_dir=tiny_sd_dir)
    from_folder = load_stable_diffusion(tiny_sd_dir)
    assert_same_weights(from_file, from_folder)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert torch.equal(from_file.unet(x, 981, context), from_folder.unet(x, 981, context))
    assert torch.equal(from_file.tokenizer("a cat"), from_folder.tokenizer("a cat"))


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_single_file_prefers_the_ema_unet(tmp_path, tiny_reference, tiny_sd_dir):
    """The full v1-5-pruned file holds both: model.diffusion_model.* and model_ema.diffusion_model<no dots>."""
    checkpoint = ldm_checkpoint(*tiny_reference)
    unet_keys = [k for k in checkpoint if k.startswith("model.diffusion_model.")]
    for key in unet_keys:
        checkpoint["model_ema.diffusion_model" + key[len("model.diffusion_model."):].replace(".", "")] = checkpoint[key] + 1
    checkpoint["model_ema.num_updates"] = torch.tensor(1000)
    save_file(checkpoint, str(tmp_path / "pruned.safetensors"))
    ema = load_stable_diffusion(tmp_path / "pruned.safetensors", config_dir=tiny_sd_dir).unet.state_dict()
    expected = tiny_reference[0].state_dict()
    assert ema.keys() == expected.keys() and all(torch.equal(ema[k], expected[k] + 1) for k in expected)


def test_a_clip_file_without_the_text_model_prefix(tmp_path, tiny_sd_dir):
    """transformers >= 5 saves CLIPTextModel without `text_model.`; the hub's files have it."""
    folder = copy_folder(tiny_sd_dir, tmp_path / "v5")
    clip_file = folder / "text_encoder" / "model.safetensors"
    hub_names = load_file(str(clip_file))
    assert all(k.startswith("text_model.") for k in hub_names)
    save_file({k.removeprefix("text_model."): v for k, v in hub_names.items()}, str(clip_file))
    assert_same_weights(load_stable_diffusion(folder), load_stable_diffusion(tiny_sd_dir))


def test_legacy_vae_attention_names_and_position_ids(tmp_path, tiny_sd_dir):
    folder = copy_folder(tiny_sd_dir, tmp_path / "legacy")
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for k, v in load_file(str(vae_file)).items():
        for new, old in legacy.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        tensors[k] = v
    assert any(".query." in k for k in tensors)
    save_file(tensors, str(vae_file))
    clip_file = folder / "text_encoder" / "model.safetensors"
    save_file(load_file(str(clip_file)) | {"text_model.embeddings.position_ids": torch.arange(77)[None]}, str(clip_file))
    assert_same_weights(load_stable_diffusion(folder), load_stable_diffusion(tiny_sd_dir))


def test_fp16_variant_and_dtype(tmp_path, tiny_sd_dir):
    folder = copy_folder(tiny_sd_dir, tmp_path / "fp16")
    for sub, name in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")]:
        half = {k: v.half() for k, v in load_file(str(folder / sub / f"{name}.safetensors")).items()}
        (folder / sub / f"{name}.safetensors").unlink()  # only the variant is left: it must be the one read
        save_file(half, str(folder / sub / f"{name}.fp16.safetensors"))
    sd = load_stable_diffusion(folder, variant="fp16", dtype=torch.bfloat16)
    assert {p.dtype for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters()} == {torch.bfloat16}
    full = load_stable_diffusion(tiny_sd_dir)
    for name in ("unet", "vae", "text_encoder"):
        ours, fp32 = getattr(sd, name).state_dict(), getattr(full, name).state_dict()
        assert all(torch.allclose(ours[k].float(), fp32[k], rtol=1e-2, atol=1e-3) for k in fp32), name


# ---- the hub path, through huggingface_hub's real cache look-up, offline ----

def fake_hub_cache(home, repo_id, folder):
    """Lay `folder` out as huggingface_hub caches a repo: models--org--name/{refs/main, snapshots/<rev>/}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


LOAD_AND_RUN = """
import sys, torch
sys.path.insert(0, {root!r})
from weights import load_stable_diffusion, WeightsError
try:
    sd = load_stable_diffusion({repo!r})
except WeightsError as e:
    print("WeightsError:", e); raise SystemExit(2)
torch.manual_seed(0)
x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
with torch.no_grad():
    torch.save(sd.unet(x, 1, c), {out!r})
"""


def run_offline(tmp_path, home, repo):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {
        "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    script = LOAD_AND_RUN.format(root=str(ROOT), repo=repo, out=str(tmp_path / "eps.pt"))
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


def test_hub_repo_from_offline_cache(tmp_path, tiny_sd_dir, tiny_reference):
    fake_hub_cache(tmp_path / "hf", "someone/tiny-sd", tiny_sd_dir)
    result = run_offline(tmp_path, tmp_path / "hf", "someone/tiny-sd")
    assert result.returncode == 0, result.stderr + result.stdout
    torch.manual_seed(0)
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = tiny_reference[0](x, 1, c).sample
    assert (torch.load(tmp_path / "eps.pt") - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_no_network_and_no_cache(tmp_path):
    result = run_offline(tmp_path, tmp_path / "empty", "someone/not-cached")
    assert result.returncode == 2
    assert "not in the local cache" in result.stdout and len(result.stdout.strip().splitlines()) == 1


# ---- bad input: one clear line naming the file and what is wrong ----

def expect_error(pattern, source, **kwargs):
    with pytest.raises(WeightsError) as e:
        load_stable_diffusion(source, **kwargs)
    message = str(e.value)
    assert "\n" not in message and re.search(pattern, message), message
    return message


def test_missing_path():
    expect_error(r"no-such-dir: no such file or folder", "./no-such-dir")


def test_folder_without_a_component(tmp_path, tiny_sd_dir):
    folder = copy_folder(tiny_sd_dir, tmp_path / "novae")
    shutil.rmtree(folder / "vae")
    expect_error(r"novae/vae: missing", folder)


def test_truncated_and_foreign_files(tmp_path, single_file):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(single_file.read_bytes()[:5000])
    expect_error(r"truncated\.safetensors: not a valid safetensors file", truncated)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"PK\x03\x04 this is a zip/pickle checkpoint")
    expect_error(r"model\.ckpt: not a valid safetensors file", pickle)


@pytest.mark.parametrize("extra, what", [
    ({"conditioner.embedders.1.model.ln_final.weight": torch.ones(4)}, "SDXL"),
    ({"cond_stage_model.model.ln_final.weight": torch.ones(4)}, "Stable Diffusion 2"),
])
def test_single_file_of_another_family(tmp_path, extra, what):
    path = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)} | extra, str(path))
    assert what in expect_error(r"other\.safetensors: this is an? ", path)


@pytest.mark.parametrize("change, what", [
    ({"use_linear_projection": True, "cross_attention_dim": 1024}, "Stable Diffusion 2"),
    ({"addition_embed_type": "text_time"}, "SDXL"),
])
def test_folder_of_another_family(tmp_path, tiny_sd_dir, change, what):
    folder = copy_folder(tiny_sd_dir, tmp_path / "other")
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | change))
    assert what in expect_error(r"unet/config\.json: this is", folder)


def edit_unet(folder, edit):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("edit, pattern", [
    (lambda t: t.pop("conv_out.bias"), r"1 missing \(conv_out\.bias\)"),
    (lambda t: t.update({"extra.weight": torch.zeros(2)}), r"1 unexpected \(extra\.weight\)"),
    (lambda t: t.update({"conv_in.bias": torch.zeros(7)}), r"1 wrongly shaped \(conv_in\.bias \(7,\) != \(32,\)\)"),
], ids=["missing", "unexpected", "shape"])
def test_wrong_tensors_are_listed(tmp_path, tiny_sd_dir, edit, pattern):
    folder = copy_folder(tiny_sd_dir, tmp_path / "edited")
    edit_unet(folder, edit)
    expect_error(r"diffusion_pytorch_model\.safetensors: not a UNet of this configuration: " + pattern, folder)


@pytest.mark.parametrize("config, pattern", [
    ([1, 2], r"config\.json: a config must be a JSON object, not list"),
    ({"hidden_act": "gelu_new"}, r"config\.json: hidden_act must be one of"),
], ids=["list", "activation"])
def test_bad_configs(tmp_path, tiny_sd_dir, config, pattern):
    folder = copy_folder(tiny_sd_dir, tmp_path / "config")
    path = folder / "text_encoder" / "config.json"
    path.write_text(json.dumps(config if isinstance(config, list) else json.loads(path.read_text()) | config))
    expect_error(pattern, folder)


def test_inpainting_unet(tmp_path, tiny_sd_dir):
    folder = copy_folder(tiny_sd_dir, tmp_path / "inpaint")
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"in_channels": 9}))
    expect_error(r"unet/config\.json: a UNet with 9 input channels \(inpainting", folder)


def test_missing_config_folder(tmp_path, single_file):
    expect_error(r"nowhere: no such folder", single_file, config_dir=tmp_path / "nowhere")


def test_tokenizer_folder_without_vocab(tmp_path, tiny_sd_dir, single_file):
    folder = copy_folder(tiny_sd_dir, tmp_path / "novocab")
    (folder / "tokenizer" / "vocab.json").unlink()
    expect_error(r"vocab\.json: tokenizer file not found", folder)
    expect_error(r"vocab\.json: tokenizer file not found", single_file, config_dir=folder)


def test_unknown_variant(tiny_sd_dir):
    expect_error(r"unknown variant 'fp8'", tiny_sd_dir, variant="fp8")
