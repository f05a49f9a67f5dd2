"""clip_image.py and weights.load_clip against transformers' CLIPModel: random weights at toy width and at
ViT-B/16's size, saved in the hub's layout and loaded by our loader; MaskCLIP's dense features against
its value path written here from transformers' modules; the loader's errors."""
import json
import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from test_weights import fake_hub_cache
from tiny_models import TINY_CLIP, TINY_CLIP_MODEL, VIT_B_16_CLIP, clip_reference, save_clip_folder
from weights import TINY_CLIP_CONFIG, WeightsError, load_clip, random_clip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, clip_vocab_dir):
    """(transformers' tiny CLIPModel, the folder it was saved to, ours loaded from there)."""
    reference = clip_reference(TINY_CLIP_MODEL, seed=3)
    folder = save_clip_folder(tmp_path_factory.mktemp("tiny_clip"), clip_vocab_dir, reference)
    return reference, folder, load_clip(folder)


@pytest.fixture(scope="module")
def vit_b_16(tmp_path_factory, clip_vocab_dir):
    """The same at ViT-B/16's size (600 MB of weights)."""
    reference = clip_reference(VIT_B_16_CLIP, seed=4)
    folder = save_clip_folder(tmp_path_factory.mktemp("vit_b_16"), clip_vocab_dir, reference)
    return reference, folder, load_clip(folder)


MODELS = ["tiny", "vit_b_16"]


def assert_close(ours, ref, rel=1e-4):
    """max |ours - ref| <= rel * max |ref| (fp32 parity relative to the output's scale)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    error, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert scale > 0 and error <= rel * scale, f"max abs error {error:.3g} at output scale {scale:.3g}"


def images(B: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1], EmerDiff's convention."""
    return torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def clip_input(pixels: torch.Tensor) -> torch.Tensor:
    """What transformers' CLIP takes: [0, 1] normalised by OpenAI's mean and std (transformers' constants)."""
    mean, std = (torch.tensor(c).view(3, 1, 1) for c in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    return ((pixels + 1) / 2 - mean) / std


# ---- the embeddings ----

IMAGE_CASES = [("tiny", (32, 32)), ("tiny", (160, 224)), ("tiny", (320, 256)), ("vit_b_16", (224, 224)),
               ("vit_b_16", (160, 224))]  # the tiny model's trained size is 32x32, ViT-B/16's 224x224
DENSE_CASES = [("tiny", (32, 32)), ("tiny", (160, 224)), ("vit_b_16", (224, 224))]


def case_ids(cases):
    return [f"{model}-{h}x{w}" for model, (h, w) in cases]


@pytest.mark.parametrize("model, size", IMAGE_CASES, ids=case_ids(IMAGE_CASES))
def test_encode_image_matches_transformers(request, model, size):
    """At the trained size, and at others through the position embeddings resized as transformers'
    interpolate_pos_encoding does."""
    reference, _, ours = request.getfixturevalue(model)
    pixels = images(2, *size)
    with torch.no_grad():
        expected = reference.get_image_features(clip_input(pixels), interpolate_pos_encoding=True).pooler_output
        assert_close(ours.encode_image(pixels), expected)


TEXTS = ["", "a photo of a cat", "a photograph of an astronaut riding a horse, trending on artstation",
         "two cats, 3 dogs!", "word " * 100]  # the last is truncated to 77 tokens


@pytest.mark.parametrize("model", MODELS)
def test_encode_text_matches_transformers(request, model, clip_vocab_dir):
    """On the real CLIP vocabulary, transformers' tokenizer making the reference's ids."""
    reference, _, ours = request.getfixturevalue(model)
    tokenizer = transformers.CLIPTokenizer(vocab=str(clip_vocab_dir / "vocab.json"),
                                           merges=str(clip_vocab_dir / "merges.txt"))
    ids = torch.tensor(tokenizer(TEXTS, padding="max_length", max_length=77, truncation=True)["input_ids"])
    with torch.no_grad():
        assert_close(ours.encode_text(TEXTS), reference.get_text_features(ids).pooler_output)


# ---- MaskCLIP's dense features ----

def maskclip_reference(reference, pixels: torch.Tensor):
    """MaskCLIP's value path (its official code, mmseg/models/backbones/vit.py, TransformerEncoderLayer.forward
    with return_qkv) through transformers' modules: the blocks but the last as usual; in the last, with
    y = layer_norm1(x), v = out_proj(v_proj(y)) + x, v = v + mlp(layer_norm2(v)); then post_layernorm and
    visual_projection. Returns (features (B, D, h, w), keys out_proj(k_proj(y)) (B, h*w, C), the ordinary
    last block's patch tokens through the same head (B, D, h, w))."""
    tower = reference.vision_model
    x = tower.pre_layrnorm(tower.embeddings(clip_input(pixels), interpolate_pos_encoding=True))
    *first, last = tower.encoder.layers
    for layer in first:
        x = layer(x, attention_mask=None)
    y = last.layer_norm1(x)
    v = last.self_attn.out_proj(last.self_attn.v_proj(y)) + x
    v = v + last.mlp(last.layer_norm2(v))
    keys = last.self_attn.out_proj(last.self_attn.k_proj(y))

    def head(tokens):  # the patch tokens, (B, 1 + h*w, C) -> (B, D, h, w)
        patches = reference.visual_projection(tower.post_layernorm(tokens))[:, 1:]
        return patches.transpose(1, 2).reshape(len(pixels), -1, pixels.shape[2] // 16, pixels.shape[3] // 16)
    return head(v), keys[:, 1:], head(last(x, attention_mask=None))


@pytest.mark.parametrize("model, size", DENSE_CASES, ids=case_ids(DENSE_CASES))
def test_dense_features_are_maskclips_value_path(request, model, size):
    reference, _, ours = request.getfixturevalue(model)
    pixels = images(2, *size, seed=1)
    with torch.no_grad():
        features, keys, attended = maskclip_reference(reference, pixels)
        assert_close(ours.dense_features(pixels), features)
        got_features, got_keys = ours.dense_features(pixels, with_keys=True)
    h, w = size[0] // 16, size[1] // 16
    assert got_features.shape == (2, reference.config.projection_dim, h, w)
    assert got_keys.shape == (2, h * w, reference.config.vision_config.hidden_size)
    assert_close(got_features, features)
    assert_close(got_keys, keys)
    # The value path is not the block's ordinary output: the comparison above tells the two apart.
    assert (attended - features).abs().max() > 0.1 * features.abs().max()


# ---- the model's shapes and input checks, random weights ----

@pytest.mark.parametrize("size, D, C", [("tiny", 24, 48), ("vit-b-16", 512, 768)])
def test_random_clip_gives_the_contracts_shapes(size, D, C):
    state = torch.random.get_rng_state()
    clip = random_clip(size)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left alone
    assert clip.patch_size == 16 and not any(p.requires_grad for p in clip.parameters())
    pixels = images(2, 48, 64)
    with torch.no_grad():
        assert clip.encode_image(pixels).shape == (2, D)
        assert clip.encode_text(["a cat", "two dogs", ""]).shape == (3, D)
        assert clip.dense_features(pixels).shape == (2, D, 3, 4)
        features, keys = clip.dense_features(pixels, with_keys=True)
    assert features.shape == (2, D, 3, 4) and keys.shape == (2, 12, C)


def test_random_clip_is_the_tests_tiny_model_and_repeats_with_its_seed(tiny):
    """random_clip("tiny") has the tiny CLIPModel's configuration (weights.TINY_CLIP_CONFIG, as loaded
    from transformers' config.json), its seed gives the same weights again, another seed others."""
    _, _, loaded = tiny
    assert loaded.config == TINY_CLIP_CONFIG
    first, again, other = random_clip(seed=1).state_dict(), random_clip(seed=1).state_dict(), random_clip(seed=2)
    assert first.keys() == loaded.state_dict().keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["visual_projection.weight"], other.state_dict()["visual_projection.weight"])


def test_dtype_and_sizes_not_multiples_of_the_patch(tiny):
    _, folder, _ = tiny
    half = load_clip(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert half.encode_image(images(1, 32, 48)).dtype == torch.bfloat16  # float32 pixels, cast inside
    for size in [(33, 32), (32, 40)]:
        with pytest.raises(ValueError, match=r"^CLIP needs an image whose height and width are multiples of its "
                                             rf"patch size 16, got {size[0]}x{size[1]}$"):
            half.dense_features(images(1, *size))


# ---- the hub's cache ----

def test_a_cached_hub_repo_loads_without_the_network(tmp_path, monkeypatch, capsys, tiny):
    """huggingface_hub's cache layout, read in place: no download line, not one request (the endpoint
    points nowhere)."""
    from huggingface_hub import constants
    reference, folder, ours = tiny
    fake_hub_cache(tmp_path, "someone/tiny-clip", folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    cached = load_clip("someone/tiny-clip")
    assert "Downloading" not in capsys.readouterr().err
    expected = ours.state_dict()
    assert all(torch.equal(tensor, expected[k]) for k, tensor in cached.state_dict().items())


# ---- bad input: one line naming the file and what is wrong ----

def expect_error(pattern, source):
    with pytest.raises(WeightsError) as e:
        load_clip(source)
    message = str(e.value)
    assert "\n" not in message and re.search(pattern, message), message


@pytest.fixture
def copy(tmp_path, tiny):
    """A copy of the tiny CLIP folder to break."""
    return shutil.copytree(tiny[1], tmp_path / "clip")


def edit_json(path, edit):
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def test_the_control_folder_loads(copy):
    """The copy the tests below break loads as it is."""
    assert load_clip(copy).config == TINY_CLIP_CONFIG


def test_missing_folder_and_a_file_for_a_folder(tmp_path, copy):
    expect_error(r"no-such-clip: no such file or folder \(give a hub repo id, e\.g\. openai/clip-vit-base-patch16, "
                 r"or a folder holding config\.json, model\.safetensors, vocab\.json, merges\.txt\)$",
                 tmp_path / "no-such-clip")
    expect_error(r"model\.safetensors: a file, not a folder \(give a hub repo id", copy / "model.safetensors")


def test_missing_weights_or_tokenizer_file(copy):
    (copy / "model.safetensors").unlink()
    expect_error(r"clip/model\.safetensors: file not found$", copy)
    (copy / "merges.txt").unlink()
    expect_error(r"clip/merges\.txt: tokenizer file not found", copy)


def test_not_a_safetensors_file(copy):
    (copy / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip/pickle checkpoint")
    expect_error(r"clip/model\.safetensors: not a valid safetensors file", copy)


def test_a_text_model_config_is_not_a_clip_config(copy):
    """The config.json of transformers' CLIPTextModel (as in an SD repo's text_encoder/) for a CLIPModel's."""
    transformers.CLIPTextConfig(**TINY_CLIP).save_pretrained(copy)
    expect_error(r"clip/config\.json: not the config of a CLIPModel \(no text_config and vision_config; model_type "
                 r"'clip_text_model'\): give a CLIP repo such as openai/clip-vit-base-patch16$", copy)


@pytest.mark.parametrize("edit, pattern", [
    (lambda c: "{", r"config\.json: not a readable JSON config"),
    (lambda c: [c], r"config\.json: a config must be a JSON object, not list$"),
    (lambda c: c | {"vision_config": [1]}, r"config\.json vision_config: a config must be a JSON object, not list$"),
    (lambda c: c | {"projection_dim": "24"}, r'config\.json: projection_dim must be a positive integer up to 65536, '
                                             r'not "24"$'),
    (lambda c: c | {"vision_config": c["vision_config"] | {"patch_size": 0}},
     r"config\.json vision_config: patch_size must be a positive integer up to 65536, not 0$"),
    (lambda c: c | {"text_config": c["text_config"] | {"num_attention_heads": 5}},
     r"config\.json text_config: num_attention_heads 5 does not divide hidden_size 32$"),
    (lambda c: c | {"vision_config": c["vision_config"] | {"hidden_act": "relu"}},
     r"config\.json vision_config: hidden_act must be one of \['gelu', 'quick_gelu'\], got 'relu'$"),
    (lambda c: c | {"text_config": c["text_config"] | {"vocab_size": 1000}},
     r"config\.json: the configuration does not fit the tokenizer: text_config vocab_size 1000 <= the "
     r"tokenizer's id 49407$"),
], ids=["json", "list", "tower-list", "projection", "patch", "heads", "activation", "vocab"])
def test_bad_configs_before_any_tensor(copy, edit, pattern):
    (copy / "model.safetensors").unlink()  # an error about the config must come before the tensors are read
    path = copy / "config.json"
    text = edit(json.loads(path.read_text()))
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    expect_error(pattern, copy)


@pytest.mark.parametrize("edit, pattern", [
    (lambda t: t.pop("vision_model.post_layernorm.bias"), r"1 missing \(vision_model\.post_layernorm\.bias\)$"),
    (lambda t: t.update({"vision_model.extra": torch.zeros(2)}), r"1 unexpected \(vision_model\.extra\)$"),
    (lambda t: t.update({"visual_projection.weight": torch.zeros(24, 32)}),
     r"1 wrongly shaped \(visual_projection\.weight \(24, 32\) != \(24, 48\)\)$"),
], ids=["missing", "unexpected", "shape"])
def test_wrong_tensors_are_listed(copy, edit, pattern):
    tensors = load_file(str(copy / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(copy / "model.safetensors"))
    expect_error(r"clip/model\.safetensors: not a CLIP of this configuration: " + pattern, copy)


def test_position_ids_of_older_files_are_ignored(copy, tiny):
    """Files saved by older transformers hold the position_ids buffers."""
    path = copy / "model.safetensors"
    buffers = {"text_model.embeddings.position_ids": torch.arange(77)[None],
               "vision_model.embeddings.position_ids": torch.arange(5)[None]}
    save_file(load_file(str(path)) | buffers, str(path))
    loaded, expected = load_clip(copy).state_dict(), tiny[2].state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
