"""Loading Stable Diffusion v1.x weights from safetensors: hub repo, diffusers folder or single file.

`load_stable_diffusion(source)` loads a checkpoint in three steps:
1. the files: a local folder or file as it is, a hub repo through huggingface_hub's cache (cached
   files without asking the network; the others announced in one line, then downloaded);
2. the tokenizer and the three config.json files: each field checked against the annotation of its
   config dataclass, then by the dataclass's own structural rules, then the three configurations
   and the tokenizer checked to fit together, all before any tensor is read;
3. the tensors, read through safetensors (no pickle), one model at a time and cast to the requested
   dtype as they are read, renamed only for the original single-file format (by prefix tables built
   from the model config), checked name by name, shape by shape and for a floating-point type
   against our models, and moved to the device before the next model is read.
weights.md documents the layouts and the errors. `random_stable_diffusion` builds the same models
with random weights and reads nothing: a look at the tool without the weights, and the benchmarks.

`load_clip(source)` loads CLIP ViT-B/16 (clip_image.py, for naming segments) from the hub repo
`openai/clip-vit-base-patch16` or a folder in its layout (config.json, model.safetensors, vocab.json,
merges.txt side by side) through the same steps and checks; `random_clip` builds it with random weights.
"""
import json
import sys
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass, is_dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import files
from clip_image import CLIP, CLIPConfig, CLIPVisionConfig
from clip_text import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from unet import FEATURE_LAYER, MODULATED_LAYER, UNet, UNetConfig
from vae import VAE, VAEConfig

DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CLIP_REPO = "openai/clip-vit-base-patch16"
HUB_TIMEOUT_S = 5  # seconds the hub may take to answer a size request before it counts as unreachable


class WeightsError(Exception):
    """A checkpoint that cannot be loaded; the message is one line that says why and what to do."""


@dataclass
class StableDiffusion:
    unet: UNet
    vae: VAE
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer


# A diffusers layout: per component a config.json and `<stem>.safetensors` (`<stem>.fp16.safetensors`
# for the fp16 variant); the tokenizer's two files.
CONFIG_FILE = "config.json"
WEIGHTS_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
TOKENIZER_FILES = ("vocab.json", "merges.txt")
MODELS = {"unet": (UNet, UNetConfig), "vae": (VAE, VAEConfig), "text_encoder": (CLIPTextModel, CLIPTextConfig)}


# SD v1.5's structure at toy width (the tests' tiny model): a run in seconds on a CPU.
TINY_CONFIGS = dict(unet=UNetConfig(block_out_channels=(32, 32, 64, 64), attention_head_dim=4, cross_attention_dim=32,
                                    norm_num_groups=8),
                    vae=VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8),
                    text_encoder=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                num_hidden_layers=2))
RANDOM_CONFIGS = {"tiny": TINY_CONFIGS, "sd15": {name: config_cls() for name, (_, config_cls) in MODELS.items()}}


@contextmanager
def seeded(seed: int, device):
    """Random initialisation from `seed`, on `device` (where the model runs; meta: shapes only), the
    caller's random stream left as it was."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        yield


def random_stable_diffusion(size: str = "tiny", device="cpu", dtype=torch.float32, seed: int = 0) -> StableDiffusion:
    """SD v1.x with random weights, built without reading a file: "tiny" (TINY_CONFIGS: seconds on a
    CPU, to see the tool work without the 4 GB of weights) or "sd15" (SD v1.5's configurations: the
    speed of the real model). Its segments mean nothing. The tokenizer knows only the byte symbols."""
    with seeded(seed, device):
        models = {name: model_cls(RANDOM_CONFIGS[size][name]).to(dtype).eval()
                  for name, (model_cls, _) in MODELS.items()}
    return StableDiffusion(**models, tokenizer=CLIPTokenizer.bytes_only())


def weights_file(name: str, variant: str | None) -> str:
    return f"{WEIGHTS_STEMS[name]}{'.fp16' if variant == 'fp16' else ''}.safetensors"


def load_stable_diffusion(source: str | Path = DEFAULT_REPO, device="cpu", dtype=torch.float32,
                          variant: str | None = None, config_dir: str | Path | None = None) -> StableDiffusion:
    """Load SD v1.x from a hub repo id, a local diffusers-layout folder or a single original-format
    `.safetensors` file. `variant="fp16"` takes the hub's half-precision files.

    A single file holds no tokenizer and no configs: they come from `config_dir`, a diffusers-layout
    folder (its tokenizer/ and, where present, unet/, vae/ and text_encoder/ config.json), else the
    tokenizer from the default hub repo and the SD v1.5 configurations."""
    if variant not in (None, "fp16"):
        raise WeightsError(f"unknown variant {variant!r}: use None or 'fp16'")
    config_dir = None if config_dir is None else Path(config_dir).expanduser()
    if config_dir is not None and path_kind(config_dir) != "folder":
        raise WeightsError(f"{config_dir}: no such folder (the config folder is a diffusers-layout folder)")
    path = Path(source).expanduser()
    kind = path_kind(path)
    if kind == "file":
        return load_single_file(path, dtype, device, config_dir)
    if kind == "folder":
        return load_folder(lambda folder, name: path / folder / name, variant, dtype, device, str(path))
    if kind == "other" or _looks_like_path(str(source)):
        raise WeightsError(f"{source}: {files.KIND_PROBLEMS[kind] if kind else 'no such file or folder'} (give a hub "
                           "repo id, a diffusers folder or a single .safetensors file)")
    names = [f"tokenizer/{f}" for f in TOKENIZER_FILES]
    names += [f"{name}/{f}" for name in MODELS for f in (CONFIG_FILE, weights_file(name, variant))]
    fetched = hub_files(str(source), names)
    return load_folder(lambda folder, name: fetched[f"{folder}/{name}"], variant, dtype, device, str(source))


def _looks_like_path(source: str) -> bool:
    return source.endswith(".safetensors") or source.startswith((".", "/", "~")) or source.count("/") != 1


def load_folder(file_of, variant, dtype, device, where: str) -> StableDiffusion:
    """The models of a diffusers layout; `file_of(folder, name)` is the path of one of its files."""
    tokenizer = load_tokenizer(*[file_of("tokenizer", f) for f in TOKENIZER_FILES])
    configs = {name: _component_config(name, Path(file_of(name, CONFIG_FILE))) for name in MODELS}
    check_compatible(configs, tokenizer, where)
    models = {}
    for name, config in configs.items():
        weights = Path(file_of(name, weights_file(name, variant)))
        models[name] = build_model(name, config, read_safetensors(weights, dtype), str(weights), device)
    return StableDiffusion(**models, tokenizer=tokenizer)


def _component_config(name: str, config_path: Path):
    if path_kind(config_path.parent) != "folder":
        raise WeightsError(f"{config_path.parent}: missing; a diffusers folder holds unet/, vae/, "
                           "text_encoder/ and tokenizer/")
    return read_config(MODELS[name][1], config_path)


# ---- files: what is at a path, and whether it can be read (files.py checks; errors as WeightsError) ----

def path_kind(path: Path) -> str | None:
    """files.path_kind, its refusal a WeightsError: the loader's one error type."""
    try:
        return files.path_kind(path)
    except files.FileError as e:
        raise WeightsError(str(e)) from None


def readable_file(path: Path, missing: str = "file not found") -> Path:
    """files.checked_file (a FIFO would make safetensors wait forever), its refusal a WeightsError."""
    try:
        return files.checked_file(path, missing)
    except files.FileError as e:
        raise WeightsError(str(e)) from None


# ---- the hub ----

def hub_files(repo_id: str, names: list[str]) -> dict[str, Path]:
    """The files `names` ("unet/config.json", ...) of a hub repo, in huggingface_hub's cache (HF_HOME).

    Cached files are found on disk, without a request. The others are sized by one request each to
    the hub, without huggingface_hub's retries, so an unreachable hub fails in seconds; then one
    line says what is downloaded and where, and huggingface_hub downloads them (its progress bars)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

    def ask(name, request):
        try:
            return request()
        except Exception as e:  # the transport's own errors differ between huggingface_hub versions
            raise _hub_error(repo_id, name, e) from None

    paths = {name: ask(name, lambda: try_to_load_from_cache(repo_id, name)) for name in names}
    missing = [name for name, path in paths.items() if not isinstance(path, str)]  # None or "known absent"
    if missing:
        size = sum(ask(name, lambda: get_hf_file_metadata(hf_hub_url(repo_id, name), timeout=HUB_TIMEOUT_S)).size
                   or 0 for name in missing)
        shown = f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
        files = f"{len(missing)} file{'s' * (len(missing) > 1)}"
        print(f"Downloading {files} of {repo_id} ({shown}) into {constants.HF_HUB_CACHE} "
              "(once: later runs read them from there)", file=sys.stderr)
        paths |= {name: ask(name, lambda: hf_hub_download(repo_id, name)) for name in missing}
    return {name: Path(path) for name, path in paths.items()}


def _hub_error(repo_id: str, name: str, error: Exception) -> WeightsError:
    """One line for a hub failure: refused (a wrong id, a gated repo, a missing file), offline, or
    unreachable (or the download itself failed)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
    if isinstance(error, (HfHubHTTPError, HFValidationError)):
        return WeightsError(f"{repo_id}/{name}: no local file or folder, and the hub refused it "
                            f"({_first_line(error)}): check the repo id, your hub login and --variant")
    why, todo = ("HF_HUB_OFFLINE is set", "unset it to download") if isinstance(error, OfflineModeIsEnabled) else (
        f"fetching it from {constants.ENDPOINT} failed ({_first_line(error)})", "connect once")
    return WeightsError(f"{repo_id}/{name} is not in the local cache ({constants.HF_HUB_CACHE}) and {why}: {todo}, "
                        "or load a local folder or file (weights.md, 'Using a local copy or an offline machine')")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---- configs ----

def read_json(path: Path):
    """The JSON value of a config file that must be there."""
    try:
        return json.loads(readable_file(path).read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable JSON config ({e})") from None


def read_config(config_cls, path: Path | None):
    """The dataclass `config_cls` filled from an SD component's config.json file, refusing other model
    families; SD v1.5's defaults where there is none."""
    if path is None or path_kind(path) is None:
        return config_cls()
    raw = read_json(path)
    config = config_from_dict(config_cls, raw, str(path))
    _reject_foreign_config(raw, str(path))
    return config


def config_from_dict(config_cls, raw: dict, where: str = "config", defaults=None):
    """The dataclass `config_cls` from the keys of a diffusers/transformers config it knows: each
    value checked against its field's annotation (a list becomes a tuple; a field that is a config
    itself, CLIP's text_config and vision_config, read so in turn), then the dataclass's own structural
    rules (its __post_init__). Keys left out keep the values of `defaults` (config_cls()'s)."""
    if not isinstance(raw, dict):
        raise WeightsError(f"{where}: a config must be a JSON object, not {type(raw).__name__}")
    defaults = config_cls() if defaults is None else defaults
    values = {}
    for name, annotation in typing.get_type_hints(config_cls).items():
        if name not in raw:
            continue
        if is_dataclass(annotation):
            values[name] = config_from_dict(annotation, raw[name], f"{where} {name}", getattr(defaults, name))
            continue
        values[name] = parse_value(annotation, raw[name])
        if values[name] is INVALID:
            shown = json.dumps(raw[name], default=repr)
            raise WeightsError(f"{where}: {name} must be {describe(annotation)}, "
                               f"not {shown if len(shown) <= 40 else shown[:37] + '...'}")
    try:
        return replace(defaults, **values)
    except ValueError as e:
        raise WeightsError(f"{where}: {e}") from None


INVALID = object()  # what parse_value returns for a value its annotation does not allow
# Every number in an SD config is a size, a count or a scale: positive (and finite). The largest SD
# v1.x integer is CLIP's vocab_size, 49408; the cap keeps torch's size arithmetic far from overflow.
MAX_CONFIG_INT = 2 ** 16
VALUE_RULES = {  # annotation: (test, what one is, what several are)
    int: (lambda v: type(v) is int and 0 < v <= MAX_CONFIG_INT, f"a positive integer up to {MAX_CONFIG_INT}",
          f"positive integers up to {MAX_CONFIG_INT}"),
    float: (lambda v: type(v) in (int, float) and 0 < v <= sys.float_info.max, "a positive finite number",
            "positive finite numbers"),
    str: (lambda v: type(v) is str, "a string", "strings"),
}


def parse_value(annotation, value):
    """`value` as a config field annotated `annotation` holds it (int, float, str, tuple[X, ...] or
    a union of those), or INVALID. A bool is no number; a list must not be empty."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        parsed = (parse_value(option, value) for option in typing.get_args(annotation))
        return next((v for v in parsed if v is not INVALID), INVALID)
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        items = [parse_value(item, v) for v in value] if isinstance(value, (list, tuple)) else []
        return tuple(items) if items and not any(v is INVALID for v in items) else INVALID
    return annotation(value) if VALUE_RULES[annotation][0](value) else INVALID


def describe(annotation) -> str:
    """What `annotation` allows, in words: "a positive integer or a non-empty list of positive integers"."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(describe(option) for option in typing.get_args(annotation))
    if typing.get_origin(annotation) is tuple:
        return "a non-empty list of " + VALUE_RULES[typing.get_args(annotation)[0]][2]
    return VALUE_RULES[annotation][1]


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


def check_compatible(configs: dict, tokenizer: CLIPTokenizer, where: str):
    """The three configurations fit each other, the tokenizer, RGB images and EmerDiff's two UNet
    layers (config.json files of different models would otherwise load and fail at the first run)."""
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    with torch.device("meta"):  # the layer names only: no memory, no time
        missing_layers = sorted({FEATURE_LAYER, MODULATED_LAYER} - {name for name, _ in UNet(unet).named_modules()})
    rules = [
        (unet.cross_attention_dim == text.hidden_size,
         f"unet cross_attention_dim {unet.cross_attention_dim} != text_encoder hidden_size {text.hidden_size}"),
        (unet.in_channels == unet.out_channels == vae.latent_channels,
         f"unet in/out_channels {unet.in_channels}/{unet.out_channels} != vae latent_channels {vae.latent_channels}"),
        (vae.in_channels == vae.out_channels == 3,
         f"vae in/out_channels {vae.in_channels}/{vae.out_channels} != 3 (RGB)"),
        *tokenizer_rules(text, tokenizer, "text_encoder"),
        (not missing_layers, f"the unet has no {' or '.join(missing_layers)}, which EmerDiff reads and modulates "
                             "(SD v1.x has 4 levels and layers_per_block 2)"),
    ]
    check_rules(rules, where, "config.json files that do not fit together")


def tokenizer_rules(text: CLIPTextConfig, tokenizer: CLIPTokenizer, name: str) -> list[tuple[bool, str]]:
    """A text tower fits the tokenizer: a position for each of its tokens, a table row for each id."""
    largest_id = max(tokenizer.vocab.values())
    return [(text.max_position_embeddings >= tokenizer.max_length,
             f"{name} max_position_embeddings {text.max_position_embeddings} < {tokenizer.max_length} prompt tokens"),
            (text.vocab_size > largest_id, f"{name} vocab_size {text.vocab_size} <= the tokenizer's id {largest_id}")]


def check_rules(rules: list[tuple[bool, str]], where: str, what: str):
    """Raise WeightsError with the first of the (holds, message) rules that does not hold."""
    broken = [message for holds, message in rules if not holds]
    if broken:
        raise WeightsError(f"{where}: {what}: {broken[0]}")


# ---- tensors ----

@contextmanager
def open_safetensors(path: Path):
    """safetensors' reader for `path`, with a one-line error for a missing, unreadable or bad file."""
    readable_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: not a valid safetensors file, truncated or another format ({e})") from None


def read_safetensors(path: Path, dtype, rename=lambda key: key) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose `rename(key)` is not None, under that name, each
    cast to dtype (floating point ones) as it is read: no second copy of the file in memory. Each is
    copied out of the file into memory of its own, aligned as torch aligns it: at the file's offsets
    matrix products round differently (by a last bit) from one layout of the same file to another."""
    with open_safetensors(path) as f:
        tensors = {}
        for key in f.keys():
            name = rename(key)
            if name is not None:
                tensor = f.get_tensor(key)
                tensors[name] = tensor.to(dtype, copy=True) if tensor.is_floating_point() else tensor
        return tensors


def build_model(name: str, config, state_dict: dict, where: str, device):
    """Our model `name` for `config`, holding exactly the tensors of `state_dict` (checked), on device."""
    state_dict = normalise_names(name, state_dict)
    _reject_foreign_tensors(state_dict, where)
    return filled(lambda: MODELS[name][0](config), state_dict, where, device)


def filled(make_model, state_dict: dict, where: str, device):
    """The model `make_model()` builds (on the meta device: no memory), holding exactly the tensors of
    `state_dict` (checked), on device."""
    with torch.device("meta"):
        model = make_model()
    check_tensors(model, state_dict, where)
    model.load_state_dict(state_dict, assign=True)
    return model.to(device).eval().requires_grad_(False)


# Older diffusers VAE files name the mid-block attention by its pre-0.14 names.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
POSITION_IDS = "embeddings.position_ids"  # a buffer (0, 1, 2, ...) older transformers saved with CLIP's weights


def normalise_names(name: str, state_dict: dict) -> dict:
    """Drop CLIP's position_ids buffer, put CLIP's names under `text_model.` (transformers >= 5 and
    very old files leave it out), and rename legacy VAE attention layers."""
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith(POSITION_IDS):
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
            k.endswith("attn2.to_k.weight") and v.ndim == 2 and v.shape[1] == 1024 for k, v in state_dict.items()):
        raise WeightsError(f"{where}: this is a Stable Diffusion 2.x UNet; emerdiff needs v1.x")


def check_tensors(model, state_dict: dict, where: str, show: int = 5):
    """Raise WeightsError listing the first few missing, unexpected, wrongly shaped and integer (or
    bool, complex) tensors."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {expected[k]}" for k in expected
             if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    not_float = [f"{k} {str(v.dtype).removeprefix('torch.')}" for k, v in state_dict.items()
                 if not v.is_floating_point()]
    problems = [f"{len(names)} {what} ({', '.join(names[:show])}{', ...' if len(names) > show else ''})"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong),
                                    ("not floating point", not_float)) if names]
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


def load_single_file(path: Path, dtype, device, config_dir: Path | None = None) -> StableDiffusion:
    """The models of an original `v1-5-pruned(-emaonly).safetensors`, configured from `config_dir`'s
    config.json files where it has them, else as SD v1.5. The header and the tokenizer come first:
    they fail before GBs are read."""
    keys = single_file_keys(path)
    tokenizer = load_tokenizer(*_tokenizer_files(config_dir))
    configs = {name: read_config(config_cls, config_dir / name / CONFIG_FILE if config_dir else None)
               for name, (_, config_cls) in MODELS.items()}
    check_compatible(configs, tokenizer, str(config_dir or path))
    renames = {}  # per model: file key -> key in the model
    for name, prefix in LDM_PREFIXES.items():
        renames[name] = {k: k[len(prefix):] for k in keys if k.startswith(prefix)}
        if not renames[name]:
            raise WeightsError(f"{path}: no tensors under '{prefix}': not an original-format SD v1.x checkpoint")
    renames["unet"] = ema_names(renames["unet"], keys)
    models = {}
    for name, config in configs.items():
        part = read_safetensors(path, dtype, renames[name].get)
        models[name] = build_model(name, config, convert_ldm(name, part, config), str(path), device)
    return StableDiffusion(**models, tokenizer=tokenizer)


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

def _tokenizer_files(folder: Path | None) -> list[Path]:
    """vocab.json and merges.txt from `folder`'s tokenizer/ (or `folder` itself), else from the hub repo."""
    if folder is None:
        return list(hub_files(DEFAULT_REPO, [f"tokenizer/{f}" for f in TOKENIZER_FILES]).values())
    if path_kind(folder / "tokenizer") == "folder":
        folder = folder / "tokenizer"
    return [folder / f for f in TOKENIZER_FILES]


def load_tokenizer(vocab: Path, merges: Path) -> CLIPTokenizer:
    for path in (vocab, merges):
        readable_file(Path(path), "tokenizer file not found (a tokenizer folder holds vocab.json and merges.txt)")
    try:
        return CLIPTokenizer.from_files(vocab, merges)
    except (ValueError, OSError) as e:
        raise WeightsError(str(e)) from None


# ---- CLIP ViT-B/16 (clip_image.py), for naming segments ----

# CLIP ViT-B/16's structure at toy width (the tests' tiny CLIPModel): seconds on a CPU. The two towers and
# the shared space differ in width, so that a projection applied to the wrong tower cannot pass.
TINY_CLIP_CONFIG = CLIPConfig(
    text_config=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2),
    vision_config=CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
                                   image_size=32),
    projection_dim=24)
RANDOM_CLIP_CONFIGS = {"tiny": TINY_CLIP_CONFIG, "vit-b-16": CLIPConfig()}


def random_clip(size: str = "tiny", seed: int = 0, device=None, dtype=torch.float32) -> CLIP:
    """CLIP with random weights, built without reading a file: "tiny" (TINY_CLIP_CONFIG: seconds on a
    CPU) or "vit-b-16" (ViT-B/16's widths: the speed of the real model). Its embeddings mean nothing.
    The tokenizer knows only the byte symbols (ids below 514, within both text vocabularies)."""
    with seeded(seed, device or "cpu"):
        clip = CLIP(RANDOM_CLIP_CONFIGS[size], CLIPTokenizer.bytes_only())
    return clip.to(dtype).eval().requires_grad_(False)


# The hub layout of a CLIPModel: everything side by side at the top of the repo.
CLIP_WEIGHTS = "model.safetensors"
CLIP_FILES = (CONFIG_FILE, CLIP_WEIGHTS, *TOKENIZER_FILES)
CLIP_SOURCE_PROBLEMS = {None: "no such file or folder", "file": "a file, not a folder",
                        "other": files.KIND_PROBLEMS["other"]}


def load_clip(source: str | Path = CLIP_REPO, device=None, dtype=torch.float32) -> CLIP:
    """CLIP from a hub repo id (huggingface_hub's cache, as load_stable_diffusion) or a local folder
    holding the hub's files: config.json (a CLIPModel's), model.safetensors, vocab.json, merges.txt.
    The tokenizer and the config are checked before any tensor is read; `device=None` is the CPU."""
    path = Path(source).expanduser()
    kind = path_kind(path)
    if kind == "folder":
        paths = {name: path / name for name in CLIP_FILES}
    elif kind or _looks_like_path(str(source)):
        raise WeightsError(f"{source}: {CLIP_SOURCE_PROBLEMS[kind]} (give a hub repo id, e.g. {CLIP_REPO}, or a "
                           f"folder holding {', '.join(CLIP_FILES)})")
    else:
        paths = hub_files(str(source), list(CLIP_FILES))
    tokenizer = load_tokenizer(*[paths[name] for name in TOKENIZER_FILES])
    config = read_clip_config(paths[CONFIG_FILE])
    check_rules(tokenizer_rules(config.text_config, tokenizer, "text_config"), str(paths[CONFIG_FILE]),
                "the configuration does not fit the tokenizer")
    weights = paths[CLIP_WEIGHTS]
    tensors = read_safetensors(weights, dtype, lambda key: None if key.endswith(POSITION_IDS) else key)
    return filled(lambda: CLIP(config, tokenizer), tensors, str(weights), device)


def read_clip_config(path: Path) -> CLIPConfig:
    """A CLIPModel's config.json: its text_config and vision_config (ViT-B/16's values for the keys
    they leave out) and projection_dim."""
    raw = read_json(path)
    config = config_from_dict(CLIPConfig, raw, str(path))
    if not {"text_config", "vision_config"} <= raw.keys():
        raise WeightsError(f"{path}: not the config of a CLIPModel (no text_config and vision_config; model_type "
                           f"{raw.get('model_type')!r}): give a CLIP repo such as {CLIP_REPO}")
    return config
