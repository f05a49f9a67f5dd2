"""Loading Stable Diffusion v1.x weights from safetensors: hub repo, diffusers folder or single file.

One entry point, `load_stable_diffusion(source)`. Every tensor is read through safetensors (no
pickle), one model at a time and cast to the requested dtype as it is read, renamed only for the
original single-file format (by prefix tables built from the model config), checked name by name
and shape by shape against our models, and moved to the device before the next model is read.
weights.md documents the layouts and the errors.
"""
import dataclasses
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from clip_text import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class WeightsError(Exception):
    """A checkpoint that cannot be loaded; the message is one line that says why and what to do."""


@dataclass
class StableDiffusion:
    unet: UNet
    vae: VAE
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer


# The files of a diffusers layout, per component: (config, weights, fp16-variant weights).
FOLDER_FILES = {
    "unet": ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
    "vae": ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
    "text_encoder": ("config.json", "model.safetensors", "model.fp16.safetensors"),
}
TOKENIZER_FILES = ("vocab.json", "merges.txt")
MODELS = {"unet": (UNet, UNetConfig), "vae": (VAE, VAEConfig), "text_encoder": (CLIPTextModel, CLIPTextConfig)}


def load_stable_diffusion(source: str | Path = DEFAULT_REPO, device="cpu", dtype=torch.float32,
                          variant: str | None = None, config_dir: str | Path | None = None) -> StableDiffusion:
    """Load SD v1.x from a hub repo id, a local diffusers-layout folder or a single original-format
    `.safetensors` file. `variant="fp16"` takes the hub's half-precision files.

    A single file holds no tokenizer and no configs: they come from `config_dir`, a diffusers-layout
    folder (its tokenizer/ and, where present, unet/, vae/ and text_encoder/ config.json), else the
    tokenizer from the default hub repo and the SD v1.5 configurations."""
    if variant not in (None, "fp16"):
        raise WeightsError(f"unknown variant {variant!r}: use None or 'fp16'")
    if config_dir is not None and not Path(config_dir).expanduser().is_dir():
        raise WeightsError(f"{config_dir}: no such folder (the config folder is a diffusers-layout folder)")
    path = Path(source).expanduser()
    load = dict(variant=variant, dtype=dtype, device=device)
    if path.is_file():  # header and tokenizer first: they fail before GBs are read
        keys = single_file_keys(path)
        tokenizer = load_tokenizer(*_tokenizer_files(config_dir))
        models = load_single_file(path, keys, dtype, device, config_dir)
    elif path.is_dir():
        tokenizer = load_tokenizer(*[path / "tokenizer" / f for f in TOKENIZER_FILES])
        models = {name: _load_component(name, lambda f, name=name: path / name / f, **load) for name in MODELS}
    elif _looks_like_path(str(source)):
        raise WeightsError(f"{source}: no such file or folder (give a hub repo id, a diffusers folder "
                           "or a single .safetensors file)")
    else:
        tokenizer = load_tokenizer(*[hub_file(str(source), "tokenizer", f) for f in TOKENIZER_FILES])
        models = {name: _load_component(name, lambda f, name=name: hub_file(str(source), name, f), **load)
                  for name in MODELS}
    return StableDiffusion(**models, tokenizer=tokenizer)


def _looks_like_path(source: str) -> bool:
    return source.endswith(".safetensors") or source.startswith((".", "/", "~")) or source.count("/") != 1


def hub_file(repo_id: str, subfolder: str, filename: str) -> Path:
    """One file of a hub repo through huggingface_hub's cache (honours HF_HOME and HF_HUB_OFFLINE)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    try:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder))
    except LocalEntryNotFoundError:
        message = (f"{repo_id}/{subfolder}/{filename} is not in the local cache and the hub cannot be reached: "
                   "connect once (or unset HF_HUB_OFFLINE), or pass a local folder or file")
        raise WeightsError(message) from None
    except (HfHubHTTPError, HFValidationError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{repo_id} is no local file or folder, and fetching {subfolder}/{filename} "
                           f"from the hub failed: {first_line}") from None


def _load_component(name, file_of, variant, dtype, device):
    """Build one model from its config.json (SD v1.5 defaults where a folder has none) and weights."""
    config_name, weights_name, fp16_name = FOLDER_FILES[name]
    config_cls = MODELS[name][1]
    config_path = Path(file_of(config_name))
    if not config_path.parent.is_dir():
        raise WeightsError(f"{config_path.parent}: missing; a diffusers folder holds unet/, vae/, "
                           "text_encoder/ and tokenizer/")
    config = read_config(config_cls, config_path)
    weights = Path(file_of(fp16_name if variant == "fp16" else weights_name))
    return build_model(name, config, read_safetensors(weights, dtype), str(weights), device)


def read_config(config_cls, path: Path):
    """The dataclass `config_cls` filled from a config.json file; SD v1.5's defaults where there is none."""
    if not path.is_file():
        return config_cls()
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable JSON config ({e})") from None
    return config_from_dict(config_cls, raw, str(path))


def config_from_dict(config_cls, raw: dict, where: str = "config"):
    """The dataclass `config_cls` from the keys of a diffusers/transformers config it knows."""
    if not isinstance(raw, dict):
        raise WeightsError(f"{where}: a config must be a JSON object, not {type(raw).__name__}")
    _reject_foreign_config(raw, where)
    known = {f.name for f in dataclasses.fields(config_cls)}
    try:
        return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known})
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{where}: {e}") from None


def _reject_foreign_config(raw: dict, where: str):
    if raw.get("addition_embed_type") == "text_time":
        raise WeightsError(f"{where}: this is an SDXL UNet; emerdiff needs Stable Diffusion v1.x")
    if raw.get("use_linear_projection") or raw.get("cross_attention_dim") == 1024 or raw.get("hidden_size") == 1024:
        raise WeightsError(f"{where}: this is a Stable Diffusion 2.x model; emerdiff needs v1.x")
    if any(n != 1 for n in _as_tuple(raw.get("transformer_layers_per_block", 1))):
        raise WeightsError(f"{where}: transformer_layers_per_block != 1 is not SD v1.x")
    if "cross_attention_dim" in raw and raw.get("in_channels", 4) != 4:
        raise WeightsError(f"{where}: a UNet with {raw['in_channels']} input channels (inpainting or "
                           "instruction editing); emerdiff needs the text-to-image SD v1.x UNet")


def _as_tuple(x):
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


@contextmanager
def open_safetensors(path: Path):
    """safetensors' reader for `path`, with a one-line error for a missing or bad file."""
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: not a valid safetensors file, truncated or another format ({e})") from None


def read_safetensors(path: Path, dtype, rename=lambda key: key) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose `rename(key)` is not None, under that name, each
    cast to dtype (floating point ones) as it is read: no second copy of the file in memory."""
    with open_safetensors(path) as f:
        tensors = {}
        for key in f.keys():
            name = rename(key)
            if name is not None:
                tensor = f.get_tensor(key)
                tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        return tensors


def build_model(name: str, config, state_dict: dict, where: str, device):
    """Our model `name` for `config`, holding exactly the tensors of `state_dict` (checked), on device."""
    state_dict = normalise_names(name, state_dict)
    _reject_foreign_tensors(state_dict, where)
    with torch.device("meta"):
        model = MODELS[name][0](config)
    check_tensors(model, state_dict, where)
    model.load_state_dict(state_dict, assign=True)
    return model.to(device).eval().requires_grad_(False)


# Older diffusers VAE files name the mid-block attention by its pre-0.14 names.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def normalise_names(name: str, state_dict: dict) -> dict:
    """Drop CLIP's position_ids buffer, put CLIP's names under `text_model.` (transformers >= 5 and
    very old files leave it out), and rename legacy VAE attention layers."""
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if name == "text_encoder" and not key.startswith("text_model."):
            key = "text_model." + key
        *prefix, layer, param = key.split(".")
        if "attentions" in prefix and layer in LEGACY_ATTENTION_NAMES:
            key = ".".join([*prefix, LEGACY_ATTENTION_NAMES[layer], param])
        out[key] = tensor
    return out


def _reject_foreign_tensors(state_dict: dict, where: str):
    """Name SD 2.x and SDXL checkpoints by what their tensors show."""
    if any(k.startswith("add_embedding.") or ".transformer_blocks.1." in k for k in state_dict):
        raise WeightsError(f"{where}: this is an SDXL UNet; emerdiff needs Stable Diffusion v1.x")
    if any(k.endswith("proj_in.weight") and v.ndim == 2 for k, v in state_dict.items()) or any(
            k.endswith("attn2.to_k.weight") and v.shape[1] == 1024 for k, v in state_dict.items()):
        raise WeightsError(f"{where}: this is a Stable Diffusion 2.x UNet; emerdiff needs v1.x")


def check_tensors(model, state_dict: dict, where: str, show: int = 5):
    """Raise WeightsError listing the first few missing, unexpected and wrongly shaped tensors."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {expected[k]}" for k in expected
             if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    problems = [f"{len(names)} {what} ({', '.join(names[:show])}{', ...' if len(names) > show else ''})"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong))
                if names]
    if problems:
        raise WeightsError(f"{where}: not a {type(model).__name__} of this configuration: {'; '.join(problems)}")


# ---- the original single-file (LDM) format ----

LDM_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                "text_encoder": "cond_stage_model.transformer."}


def single_file_keys(path: Path) -> list[str]:
    """The tensor names of an original-format file (its header only), refusing SDXL and SD 2.x."""
    with open_safetensors(path) as f:
        keys = list(f.keys())
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise WeightsError(f"{path}: this is an SDXL checkpoint; emerdiff needs Stable Diffusion v1.x")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise WeightsError(f"{path}: this is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder); "
                           "emerdiff needs v1.x")
    return keys


def load_single_file(path: Path, keys: list[str], dtype, device, config_dir=None) -> dict:
    """The three models of an original `v1-5-pruned(-emaonly).safetensors`, configured from
    `config_dir`'s config.json files where it has them, else as SD v1.5."""
    models = {}
    for name, prefix in LDM_PREFIXES.items():
        names = {k: k[len(prefix):] for k in keys if k.startswith(prefix)}  # file key -> key in its model
        if not names:
            raise WeightsError(f"{path}: no tensors under '{prefix}': not an original-format SD v1.x checkpoint")
        if name == "unet":
            names = ema_names(names, keys)
        config_cls = MODELS[name][1]
        config = read_config(config_cls, Path(config_dir, name, "config.json")) if config_dir else config_cls()
        part = read_safetensors(path, dtype, names.get)
        models[name] = build_model(name, config, convert_ldm(name, part, config), str(path), device)
    return models


def ema_names(names: dict[str, str], keys: list[str]) -> dict[str, str]:
    """The EMA copy of the UNet where the file holds one (the full `v1-5-pruned` does, as
    `model_ema.diffusion_model<key without dots>`): the hub's diffusers weights are the EMA ones."""
    ema = {"model_ema.diffusion_model" + short.replace(".", ""): short for short in names.values()}
    return ema if set(ema) <= set(keys) else names


def convert_ldm(name: str, tensors: dict, config) -> dict:
    """Rename one model's LDM tensors to diffusers names by its prefix table."""
    if name == "text_encoder":  # already transformers' names
        return tensors
    table = ldm_unet_prefixes(config) if name == "unet" else ldm_vae_prefixes(config)
    out = {}
    for key, tensor in tensors.items():
        key = rename_prefix(key, table)
        if name == "vae" and ".attentions." in key and tensor.ndim == 4 and tensor.shape[-2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]  # LDM stores the mid attention's q/k/v/proj as 1x1 convs
        out[key] = tensor
    return out


def rename_prefix(key: str, table: dict[str, str]) -> str:
    """Replace the longest dotted prefix of `key` found in `table`; keys without one stay as they are."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            return ".".join([table[prefix], *parts[cut:]])
    return key


def _resnet(ldm: str, ours: str) -> dict[str, str]:
    """An LDM UNet resnet's sub-layer names under `ldm` mapped to ours under `ours`."""
    inner = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    return {f"{ldm}.{a}": f"{ours}.{b}" for a, b in inner.items()}


def ldm_unet_prefixes(cfg: UNetConfig) -> dict[str, str]:
    """LDM `input_blocks`/`middle_block`/`output_blocks` numbering -> diffusers block names."""
    n, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    table = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "middle_block.1": "mid_block.attentions.0"}
    for r in range(2):
        table |= _resnet(f"middle_block.{2 * r}", f"mid_block.resnets.{r}")
    for i in range(levels):
        for j in range(n):
            table |= _resnet(f"input_blocks.{(n + 1) * i + j + 1}.0", f"down_blocks.{i}.resnets.{j}")
            table[f"input_blocks.{(n + 1) * i + j + 1}.1"] = f"down_blocks.{i}.attentions.{j}"
        if i < levels - 1:
            table[f"input_blocks.{(n + 1) * (i + 1)}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
        for j in range(n + 1):
            table |= _resnet(f"output_blocks.{(n + 1) * i + j}.0", f"up_blocks.{i}.resnets.{j}")
            table[f"output_blocks.{(n + 1) * i + j}.1"] = f"up_blocks.{i}.attentions.{j}"
        if i < levels - 1:  # the upsampler follows the attention when the block has one
            index = 2 if cfg.up_block_types[i].startswith("CrossAttn") else 1
            table[f"output_blocks.{(n + 1) * i + n}.{index}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    return table


def ldm_vae_prefixes(cfg: VAEConfig) -> dict[str, str]:
    """LDM `encoder.down`/`decoder.up` (numbered bottom-up) -> diffusers block names."""
    levels = len(cfg.block_out_channels)
    attention = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    table = {}
    for part in ("encoder", "decoder"):
        table[f"{part}.norm_out"] = f"{part}.conv_norm_out"
        for r in range(2):
            table[f"{part}.mid.block_{r + 1}"] = f"{part}.mid_block.resnets.{r}"
        table |= {f"{part}.mid.attn_1.{a}": f"{part}.mid_block.attentions.0.{b}" for a, b in attention.items()}
    for i in range(levels):
        for j in range(cfg.layers_per_block + 1):
            table[f"encoder.down.{i}.block.{j}"] = f"encoder.down_blocks.{i}.resnets.{j}"
            table[f"decoder.up.{levels - 1 - i}.block.{j}"] = f"decoder.up_blocks.{i}.resnets.{j}"
        table[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        table[f"decoder.up.{levels - 1 - i}.upsample.conv"] = f"decoder.up_blocks.{i}.upsamplers.0.conv"
    return table | _vae_shortcuts(table)


def _vae_shortcuts(table: dict[str, str]) -> dict[str, str]:
    """Resnets in the LDM VAE call their 1x1 shortcut `nin_shortcut`."""
    return {f"{a}.nin_shortcut": f"{b}.conv_shortcut" for a, b in table.items() if ".resnets." in b}


# ---- tokenizer ----

def _tokenizer_files(folder) -> list[Path]:
    """vocab.json and merges.txt from `folder`'s tokenizer/ (or `folder` itself), else from the hub repo."""
    if folder is None:
        return [hub_file(DEFAULT_REPO, "tokenizer", f) for f in TOKENIZER_FILES]
    folder = Path(folder).expanduser()
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    return [folder / f for f in TOKENIZER_FILES]


def load_tokenizer(vocab: Path, merges: Path) -> CLIPTokenizer:
    for path in (vocab, merges):
        if not Path(path).is_file():
            raise WeightsError(f"{path}: tokenizer file not found (a tokenizer folder holds vocab.json and merges.txt)")
    try:
        return CLIPTokenizer.from_files(vocab, merges)
    except (ValueError, OSError) as e:
        raise WeightsError(str(e)) from None
