"""The loader: diffusers folders, original single files, the hub cache, and every bad input."""
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

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


# ---- the hub path, through huggingface_hub's real cache and download code ----

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the one revision of the test repos


def fake_hub_cache(home, repo_id, folder):
    """Lay `folder` out as huggingface_hub caches a repo: models--org--name/{refs/main, snapshots/<rev>/}."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, repo / "snapshots" / COMMIT)


class StandInHub(http.server.ThreadingHTTPServer):
    """A local stand-in for the hub's file endpoint, `HEAD|GET /<owner>/<name>/resolve/<revision>/<path>`,
    with the headers huggingface_hub reads (X-Repo-Commit, ETag, Content-Length). It serves `folder`
    under every repo id and records each request."""

    def __init__(self, folder):
        self.folder, self.requests = folder, []
        super().__init__(("127.0.0.1", 0), StandInHubHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fetched(self) -> set[str]:
        """The files downloaded (GET) since the last `requests.clear()`."""
        return {path for method, path in self.requests if method == "GET" and "/resolve/" in path}


class StandInHubHandler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self, send_body=False):
        self.server.requests.append((self.command, self.path))
        match = re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", self.path)
        file = self.server.folder / match[1] if match else None
        if file is None or not file.is_file():
            self.send_response(404)
            self.end_headers()
            return
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def do_GET(self):
        self.do_HEAD(send_body=True)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in_hub(tiny_sd_dir):
    hub = StandInHub(tiny_sd_dir)
    yield hub
    hub.shutdown()
    hub.server_close()


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


def run_loader(tmp_path, repo, **hf_settings):
    """LOAD_AND_RUN in a fresh interpreter whose only HF_* settings are `hf_settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | hf_settings
    script = LOAD_AND_RUN.format(root=str(ROOT), repo=repo, out=str(tmp_path / "eps.pt"))
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


def assert_eps_of_the_reference(tmp_path, tiny_reference):
    torch.manual_seed(0)
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = tiny_reference[0](x, 1, c).sample
    assert (torch.load(tmp_path / "eps.pt") - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_hub_repo_from_offline_cache(tmp_path, tiny_sd_dir, tiny_reference):
    fake_hub_cache(tmp_path / "hf", "someone/tiny-sd", tiny_sd_dir)
    result = run_loader(tmp_path, "someone/tiny-sd", HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "Downloading" not in result.stderr
    assert_eps_of_the_reference(tmp_path, tiny_reference)


def test_no_network_and_no_cache(tmp_path):
    result = run_loader(tmp_path, "someone/not-cached", HF_HOME=str(tmp_path / "empty"), HF_HUB_OFFLINE="1")
    assert result.returncode == 2 and len(result.stdout.strip().splitlines()) == 1
    assert re.search(r"not-cached/tokenizer/vocab\.json is not in the local cache \(.*empty/hub\) and "
                     r"HF_HUB_OFFLINE is set: .*weights\.md", result.stdout), result.stdout


DOWNLOAD_LINE = re.compile(r"Downloading (\d+) files? of someone/tiny-sd \(([\d.]+) (MB|GB)\) into (\S+) ")


def announced_download(stderr: str) -> tuple[int, float, Path]:
    """(files, bytes, cache folder) of the one download line among the hub's progress bars."""
    lines = [line for line in stderr.splitlines() if line.startswith("Downloading")]
    assert len(lines) == 1, stderr
    count, size, unit, cache = DOWNLOAD_LINE.match(lines[0]).groups()
    return int(count), float(size) * {"MB": 1e6, "GB": 1e9}[unit], Path(cache)


def test_a_download_is_announced_and_later_runs_stay_local(tmp_path, tiny_sd_dir, tiny_reference, stand_in_hub):
    """Through huggingface_hub's own download code, against a stand-in hub on this machine."""
    home = tmp_path / "hf"
    settings = dict(HF_HOME=str(home), HF_ENDPOINT=stand_in_hub.url)
    files = sorted(str(p.relative_to(tiny_sd_dir)) for p in tiny_sd_dir.rglob("*") if p.is_file())
    first = run_loader(tmp_path, "someone/tiny-sd", **settings)
    assert first.returncode == 0, first.stderr + first.stdout
    count, size, cache = announced_download(first.stderr)
    assert count == len(files) == 8 and cache == home / "hub"
    assert abs(size - sum((tiny_sd_dir / f).stat().st_size for f in files)) <= 0.05e6  # printed to 0.1 MB
    assert stand_in_hub.fetched() == {f"/someone/tiny-sd/resolve/main/{f}" for f in files}
    assert_eps_of_the_reference(tmp_path, tiny_reference)

    stand_in_hub.requests.clear()  # all cached: no line and not one request to the hub
    second = run_loader(tmp_path, "someone/tiny-sd", **settings)
    assert second.returncode == 0 and "Downloading" not in second.stderr, second.stderr
    assert stand_in_hub.requests == []

    lost = "vae/diffusion_pytorch_model.safetensors"  # one file gone from the cache: only it is fetched
    link = next((home / "hub").glob(f"models--someone--tiny-sd/snapshots/*/{lost}"))
    link.resolve().unlink()  # the blob and its link in the snapshot
    link.unlink()
    third = run_loader(tmp_path, "someone/tiny-sd", **settings)
    assert third.returncode == 0, third.stderr + third.stdout
    count, size, _ = announced_download(third.stderr)
    assert count == 1 and abs(size - (tiny_sd_dir / lost).stat().st_size) <= 0.05e6
    assert stand_in_hub.fetched() == {f"/someone/tiny-sd/resolve/main/{lost}"}


def closed_port() -> int:
    """A local port nothing listens on: a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_cli_with_the_hub_unreachable_fails_at_once_in_one_line(tmp_path):
    """HF_HUB_OFFLINE unset, nothing cached, the hub unreachable: one line pointing to weights.md, exit 2,
    none of huggingface_hub's retry messages (it took 25 s through five retries, each saying so on stderr:
    the one line shows that none was made; the timeout only bounds a hang, generously for a busy machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {
        "HF_HOME": str(tmp_path / "empty"), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    command = [sys.executable, str(ROOT / "emerdiff.py"), "--image", str(ROOT / "examples" / "chelsea.jpg"),
               "--weights", "someone/not-cached", "--out", str(tmp_path / "out")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert re.fullmatch(r"emerdiff: error: someone/not-cached/tokenizer/vocab\.json is not in the local cache "
                        r"\(.*empty/hub\) and fetching it from http://127\.0\.0\.1:\d+ failed "
                        r"\(.*Connection refused\): "
                        r"connect once, .*weights\.md.*\n",
                        result.stderr), result.stderr


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
    (lambda t: t.update({"conv_in.bias": t["conv_in.bias"].long()}), r"1 not floating point \(conv_in\.bias int64\)$"),
    (lambda t: t.update({"conv_out.weight": t["conv_out.weight"] > 0}),
     r"1 not floating point \(conv_out\.weight bool\)$"),
], ids=["missing", "unexpected", "shape", "integer", "bool"])
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


@pytest.fixture
def configs_only(tmp_path, tiny_sd_dir):
    """The tiny folder without its weights files: an error about a config must come before any tensor is read."""
    folder = tmp_path / "configs"
    shutil.copytree(tiny_sd_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    return folder


def edit_config(folder, component, change):
    path = folder / component / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))


def test_sound_configs_get_as_far_as_the_tensors(configs_only):
    """The control for the table below: the tiny folder's own configs pass every check."""
    expect_error(r"configs/unet/diffusion_pytorch_model\.safetensors: file not found", configs_only)


# Each value a config.json may hold wrongly, and each rule between fields (the tiny models: UNet
# block_out_channels 32, 32, 64, 64 with 4 heads and 8 groups; VAE 16, 32, 32, 32 with 8 groups;
# CLIP hidden_size 32 with 4 heads).
FIELD_TYPE = [
    ("unet", {"layers_per_block": "2"}, r'layers_per_block must be a positive integer up to 65536, not "2"$'),
    ("unet", {"layers_per_block": 2.5}, r"layers_per_block must be a positive integer up to 65536, not 2\.5$"),
    ("unet", {"layers_per_block": "abc"}, r'layers_per_block must be a positive integer up to 65536, not "abc"$'),
    ("unet", {"layers_per_block": True}, r"layers_per_block must be a positive integer up to 65536, not true$"),
    ("unet", {"layers_per_block": 0}, r"layers_per_block must be a positive integer up to 65536, not 0$"),
    ("unet", {"cross_attention_dim": -32}, r"cross_attention_dim must be a positive integer up to 65536, not -32$"),
    ("unet", {"cross_attention_dim": None}, r"cross_attention_dim must be a positive integer up to 65536, not null$"),
    ("text_encoder", {"vocab_size": 10 ** 20}, r"vocab_size must be a positive integer up to 65536, not 1000000000"),
    ("unet", {"block_out_channels": []},
     r"block_out_channels must be a non-empty list of positive integers up to 65536, not \[\]$"),
    ("unet", {"block_out_channels": [32, "32", 64, 64]}, r"block_out_channels must be a non-empty list of positive"),
    ("unet", {"attention_head_dim": [4, 4.0, 4, 4]},
     r"attention_head_dim must be a positive integer up to 65536 or a non-empty list of positive integers up to "
     r"65536, not \[4, 4\.0"),
    ("unet", {"norm_eps": "1e-5"}, r'norm_eps must be a positive finite number, not "1e-5"$'),
    ("unet", {"down_block_types": "CrossAttnDownBlock2D"}, r"down_block_types must be a non-empty list of strings"),
    ("vae", {"scaling_factor": "x"}, r'scaling_factor must be a positive finite number, not "x"$'),
    ("vae", {"scaling_factor": float("nan")}, r"scaling_factor must be a positive finite number, not NaN$"),
    ("vae", {"scaling_factor": float("inf")}, r"scaling_factor must be a positive finite number, not Infinity$"),
    ("vae", {"scaling_factor": -0.18215}, r"scaling_factor must be a positive finite number, not -0\.18215$"),
    ("vae", {"scaling_factor": 0}, r"scaling_factor must be a positive finite number, not 0$"),
    ("text_encoder", {"hidden_size": "32"}, r'hidden_size must be a positive integer up to 65536, not "32"$'),
    ("text_encoder", {"hidden_act": 3}, r"hidden_act must be a string, not 3$"),
    ("text_encoder", {"layer_norm_eps": False}, r"layer_norm_eps must be a positive finite number, not false$"),
]
FIELD_RULES = [
    ("unet", {"norm_num_groups": 7}, r"norm_num_groups 7 does not divide block_out_channels 32$"),
    ("unet", {"attention_head_dim": 5}, r"attention_head_dim 5 \(heads\) does not divide block_out_channels 32$"),
    ("unet", {"attention_head_dim": [4, 4]}, r"attention_head_dim has 2 entries for 4 block_out_channels$"),
    ("unet", {"down_block_types": ["CrossAttnDownBlock2D"] * 3}, r"down_block_types has 3 entries for 4 block_out"),
    ("unet", {"up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "FancyUpBlock2D"]},
     r"up_block_types: unknown 'FancyUpBlock2D' \(known: CrossAttnUpBlock2D, UpBlock2D\)$"),
    ("vae", {"norm_num_groups": 5}, r"norm_num_groups 5 does not divide block_out_channels 16$"),
    ("text_encoder", {"num_attention_heads": 5}, r"num_attention_heads 5 does not divide hidden_size 32$"),
    ("text_encoder", {"hidden_act": "gelu_new"},
     r"hidden_act must be one of \['gelu', 'quick_gelu'\], got 'gelu_new'$"),
]


@pytest.mark.parametrize("component, change, pattern", FIELD_TYPE + FIELD_RULES,
                         ids=[f"{c}-{json.dumps(change)}" for c, change, _ in FIELD_TYPE + FIELD_RULES])
def test_a_bad_config_field_names_the_file_and_the_field(configs_only, component, change, pattern):
    edit_config(configs_only, component, change)
    expect_error(rf"^{re.escape(str(configs_only / component / 'config.json'))}: {pattern}", configs_only)


# Configs each sound alone that do not fit together.
MISMATCHES = [
    ("unet", {"cross_attention_dim": 64}, r"unet cross_attention_dim 64 != text_encoder hidden_size 32$"),
    ("vae", {"latent_channels": 8}, r"unet in/out_channels 4/4 != vae latent_channels 8$"),
    ("vae", {"in_channels": 4}, r"vae in/out_channels 4/3 != 3 \(RGB\)$"),
    ("text_encoder", {"max_position_embeddings": 64}, r"text_encoder max_position_embeddings 64 < 77 prompt tokens$"),
    ("text_encoder", {"vocab_size": 1000}, r"text_encoder vocab_size 1000 <= the tokenizer's id 49407$"),
    ("unet", {"layers_per_block": 1}, r"the unet has no up_blocks\.1\.attentions\.2\.transformer_blocks\.0\.attn2, "),
    ("unet", {"up_block_types": ["UpBlock2D"] * 4}, r"the unet has no up_blocks\.1\.attentions\.0\.\S+ or "),
]


@pytest.mark.parametrize("component, change, pattern", MISMATCHES, ids=[json.dumps(c) for _, c, _ in MISMATCHES])
def test_configs_that_do_not_fit_together(configs_only, component, change, pattern):
    edit_config(configs_only, component, change)
    expect_error(rf"^{re.escape(str(configs_only))}: config\.json files that do not fit together: {pattern}",
                 configs_only)


def test_a_bad_config_beside_a_single_file(tmp_path, tiny_sd_dir, single_file):
    folder = copy_folder(tiny_sd_dir, tmp_path / "configs")
    edit_config(folder, "vae", {"scaling_factor": "x"})
    expect_error(r"configs/vae/config\.json: scaling_factor must be a positive finite number", single_file,
                 config_dir=folder)


def test_a_fifo_or_a_folder_where_a_file_belongs(tmp_path, tiny_sd_dir):
    """Neither hangs (opening a FIFO waits for a writer) nor passes for a missing file."""
    folder = copy_folder(tiny_sd_dir, tmp_path / "odd")
    config = folder / "vae" / "config.json"
    config.unlink()
    os.mkfifo(config)
    expect_error(r"odd/vae/config\.json: not a regular file \(a FIFO, socket or device\)$", folder)
    config.unlink()
    shutil.copy(tiny_sd_dir / "vae" / "config.json", config)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    weights.mkdir()
    expect_error(r"odd/unet/diffusion_pytorch_model\.safetensors: a folder where a file belongs$", folder)
    os.mkfifo(tmp_path / "pipe.safetensors")
    expect_error(r"pipe\.safetensors: not a regular file \(a FIFO, socket or device\) \(give a hub",
                 tmp_path / "pipe.safetensors")


PRINT_ERRORS = """
import sys
sys.path.insert(0, {root!r})
from weights import load_stable_diffusion, WeightsError
for source in sys.argv[1:]:
    try:
        load_stable_diffusion(source)
    except WeightsError as e:
        print(e)
"""


def test_a_file_without_read_permission_says_so(tmp_path, tiny_sd_dir):
    """The real EACCES, no fault injection. Root reads any file through two capabilities, so as root
    (as these tests run here) the loader runs in a child process that setpriv has stripped of them
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH); as any other user chmod alone does it."""
    unreadable = copy_folder(tiny_sd_dir, tmp_path / "unreadable")
    (unreadable / "unet" / "diffusion_pytorch_model.safetensors").chmod(0)
    closed = copy_folder(tiny_sd_dir, tmp_path / "closed")
    (closed / "vae").chmod(0)
    without_root_reading = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    script = PRINT_ERRORS.format(root=str(ROOT))
    result = subprocess.run([*without_root_reading, sys.executable, "-c", script, str(unreadable), str(closed)],
                            capture_output=True, text=True, timeout=300)
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    assert re.fullmatch(r".*/unreadable/unet/diffusion_pytorch_model\.safetensors: "
                        r"cannot be read \(Permission denied\): check its permissions", lines[0]), lines[0]
    assert re.fullmatch(r".*/closed/vae/config\.json: cannot be looked at \(Permission denied\): "
                        r"check its folders' permissions", lines[1]), lines[1]


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
