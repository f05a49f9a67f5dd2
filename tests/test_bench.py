"""tools/bench.py, the evidence behind docs/speed.md's figures. bench.py method on the tiny model: the
UNet calls and images it counts for both pipelines against the counts worked out by hand from the
method's options, and the notebook pipeline (written on diffusers) against ours: the same segments.
bench.py flops: its FLOPs per UNet image and per decode against diffusers' models counted alike."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import bench
import devices

PRESET = bench.PRESETS["cpu"]["options"]  # 128x128, K = 4, 8 feature draws
K, N, B = PRESET["masks"], PRESET["feature_samples"], devices.CPU_BATCH_SIZES[0]  # B: runs per UNet call on the CPU
S, GRID = 15, 50  # denoising steps t_m = 281 .. 1 on the 50-step grid; the whole grid


def run_method(tiny_sd_dir, tmp_path, preset) -> dict:
    out = tmp_path / f"{preset}.json"
    bench.main(["method", "--preset", preset, "--weights", str(tiny_sd_dir), "--repeats", "1", "--json", str(out)])
    return json.loads(out.read_text())


def counted(contender, key) -> dict:
    return {stage: counts[key] for stage, counts in contender["stages"].items() if counts[key]}


def test_the_method_benchmark_counts_the_calls_of_both_pipelines(tiny_sd_dir, tmp_path):
    report = run_method(tiny_sd_dir, tmp_path, "cpu")
    ours, notebook = report["contenders"]["ours, float32"], report["contenders"]["notebook, float32"]
    # Ours: the feature draws and the inversion steps in batches of B; each step of the modulated runs
    # as ceil(2K / B) calls of up to B runs.
    assert counted(ours, "unet_calls") == dict(features=math.ceil(N / B), inversion=math.ceil(S / B),
                                               modulation=S * math.ceil(2 * K / B))
    assert counted(ours, "unet_images") == dict(features=N, inversion=S, modulation=2 * K * S)
    # The notebook: one call per draw, the whole grid inverted, a recording pass, one call of 2 runs per mask.
    assert counted(notebook, "unet_calls") == dict(features=N, inversion=GRID, recording=S, modulation=K * S)
    assert counted(notebook, "unet_images") == dict(features=N, inversion=GRID, recording=S, modulation=2 * K * S)
    # Fewer FLOPs in every stage the two share (the feature passes stop at the feature layer).
    for stage in ("features", "inversion", "modulation"):
        assert 0 < ours["stages"][stage]["flops"] < notebook["stages"][stage]["flops"], stage
    # Two implementations of the method, one on diffusers: the same segments.
    assert notebook["label_agreement_with_ours"] > 0.99
    assert notebook["max_map_difference_to_ours"] < 1e-3
    assert report["ratio_to_ours"]["notebook, float32"]["unet_calls"] == pytest.approx(
        (N + GRID + S + K * S) / (math.ceil(N / B) + math.ceil(S / B) + S * math.ceil(2 * K / B)))
    # Scaled to the defaults, worked by hand: the feature stage by 100 / N draws, the modulated runs and
    # decodes by 25 / K masks, the inversion, the recording and k-means as measured.
    for contender in (ours, notebook):
        seconds = {stage: s["seconds"] for stage, s in contender["stages"].items()}
        by_hand = (sum(seconds.values()) + seconds["features"] * (100 / N - 1) + seconds["modulation"] * (25 / K - 1))
        assert contender["seconds_scaled_to_defaults"]["total"] == pytest.approx(by_hand)
    assert report["ratio_to_ours"]["notebook, float32"]["seconds_scaled_to_defaults"] == pytest.approx(
        notebook["seconds_scaled_to_defaults"]["total"] / ours["seconds_scaled_to_defaults"]["total"])


def test_the_gpu_presets_contenders_run_at_lower_precision(tiny_sd_dir, tmp_path, monkeypatch):
    """The gpu preset's code path on the CPU, its options cut to seconds: ours in float16 and
    bfloat16, the notebook in float32 and in float16, each compared with ours in float16."""
    small = dict(size=64, masks=2, feature_samples=2)
    monkeypatch.setitem(bench.PRESETS, "gpu", bench.PRESETS["gpu"] | dict(device="cpu", options=small))
    report = run_method(tiny_sd_dir, tmp_path, "gpu")
    contenders = report["contenders"]
    assert list(contenders) == ["ours, float16", "ours, bfloat16", "notebook, float32", "notebook, float16"]
    assert report["options"]["size"] == 64 and set(report["ratio_to_ours"]) == set(list(contenders)[1:])
    agreement = {name: contender["label_agreement_with_ours"] for name, contender in contenders.items()}
    assert agreement["notebook, float32"] > 0.95 and agreement["notebook, float16"] > 0.95  # read 0.99 and 0.99
    assert agreement["ours, bfloat16"] > 0.8  # read 0.92: bfloat16 keeps 8 bits of mantissa, float16 11


def test_the_flop_count_is_diffusers_count(tmp_path):
    """bench.py flops (our models on the meta device, counted by torch.utils.flop_counter): a full
    UNet image and a decode at the cpu preset's size cost what diffusers' SD v1.5 models cost,
    counted alike; the UNet images of each stage are the hand-worked counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from tiny_models import SD15_UNET, SD15_VAE
    out = tmp_path / "flops.json"
    bench.main(["flops", "--preset", "cpu", "--json", str(out)])
    report = json.loads(out.read_text())
    side = PRESET["size"] // 8
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
        latent, context = torch.zeros(1, 4, side, side), torch.zeros(1, 77, 768)
        with FlopCounterMode(display=False, custom_mapping=bench.CPU_ATTENTION_FLOPS) as unet_flops:
            unet(latent, torch.tensor([1]), context)
        with FlopCounterMode(display=False, custom_mapping=bench.CPU_ATTENTION_FLOPS) as decode_flops:
            vae.decode(latent)
    assert report["unet_image_flops"] == unet_flops.get_total_flops()
    assert report["decode_flops"] == decode_flops.get_total_flops()
    assert {stage: counts["unet_images"] for stage, counts in report["ours"].items()} == dict(
        features=N, inversion=S, modulation=2 * K * S)
    assert report["total"]["ours"] < report["total"]["notebook"]


def test_the_profile_sets_a_modulated_step_beside_a_diffusers_call(tiny_sd_dir, tmp_path, monkeypatch):
    """bench.py profile: per batch, diffusers' plain call and our modulated step, operator by operator;
    with the speed paths chosen (forced here), ours computes the probabilities once (softmax) for 3
    runs, and takes SDPA for one run, which shares nothing."""
    import speed
    monkeypatch.setattr(speed, "fastest", lambda key, candidates, *args: candidates[-1])
    out = tmp_path / "profile.json"
    bench.main(["profile", "--weights", str(tiny_sd_dir), "--size", "64", "--batches", "1", "3",
                "--repeats", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [(row["size"], row["batch"]) for row in report["rows"]] == [(64, 1), (64, 3)]
    sdpa, softmax = "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax"
    for row in report["rows"]:
        assert row["diffusers_s"] > 0 and row["ours_s"] > 0 and sdpa in row["diffusers_by_operator"]
    one, several = (row["ours_by_operator"] for row in report["rows"])
    assert sdpa in one and softmax not in one
    assert softmax in several and sdpa not in several
    assert [row["runs"] for row in report["shared_attention"]] == list(range(1, 9))


def architecture_convolutions(channels, layers, latent_side, out_channels, skips) -> list[tuple]:
    """Every 3x3 convolution of SD v1.5's UNet (skips=True) or VAE decoder (skips=False), as
    (input channels, output channels, map side) in call order, worked out from the architecture as
    diffusers builds it: resnets of two convolutions, a down- or upsampler between levels."""
    convs, side = [], latent_side
    if skips:  # the UNet: conv_in, the down blocks whose outputs the up blocks concatenate, the mid block
        convs.append((4, channels[0], side))
        saved, width = [channels[0]], channels[0]
        for level, ch in enumerate(channels):
            for _ in range(layers):
                convs += [(width, ch, side), (ch, ch, side)]
                width = ch
                saved.append(ch)
            if level < len(channels) - 1:
                convs.append((ch, ch, side))  # the downsampler, stride 2, reads the map at this side
                side //= 2
                saved.append(ch)
    else:
        width = channels[-1]
        convs.append((4, width, side))
    convs += [(width, width, side)] * 4  # the mid block: two resnets
    for level, ch in enumerate(reversed(channels)):
        for _ in range(layers + 1):
            extra = saved.pop() if skips else 0
            convs += [(width + extra, ch, side), (ch, ch, side)]
            width = ch
        if level < len(channels) - 1:
            side *= 2
            convs.append((ch, ch, side))  # the upsampler's convolution, after the map doubles
    convs.append((width, out_channels, side))
    return convs


@pytest.mark.parametrize("model", ["unet", "decoder"])
def test_the_convolution_benchmark_covers_every_convolution_of_the_model(model):
    """bench.py convolutions times each 3x3 convolution shape of a UNet call and a decode at 512x512,
    counted as often as the model calls it: against the list worked out from the architecture."""
    from collections import Counter
    expected = (architecture_convolutions([320, 640, 1280, 1280], 2, 64, 4, skips=True) if model == "unet" else
                architecture_convolutions([128, 256, 512, 512], 2, 64, 3, skips=False))
    assert bench.convolution_shapes(model, 512) == Counter(expected)


# ---- bench.py precision: half-precision arithmetic emulated where the CPU has no instructions for it ----

HALF_TYPES = [torch.bfloat16, torch.float16]


def emulated(fn, *args):
    with bench.HalfArithmetic():
        return fn(*args)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_emulated_products_round_as_pytorchs_half_kernels(dtype):
    """Matrix products and convolutions of half tensors, emulated (float32 from the half inputs,
    rounded once) against PyTorch's own half kernels: equal but for the order of the sums, which
    moves an element by one step of the half type now and then; float32 rounded at the inputs
    instead of the output, say, would differ almost everywhere."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    cases = {"linear": (F.linear, r(2, 64, 320), r(128, 320), r(128)), "mm": (torch.mm, r(64, 320), r(320, 96)),
             "bmm": (torch.bmm, r(4, 64, 40), r(4, 40, 64)),
             "baddbmm": (torch.baddbmm, r(4, 64, 64), r(4, 64, 40), r(4, 40, 64)),
             "conv3x3": (F.conv2d, r(2, 32, 16, 16), r(64, 32, 3, 3), r(64)), "conv1x1": (F.conv2d, r(1, 64, 8, 8), r(32, 64, 1, 1))}
    for name, (fn, *args) in cases.items():
        native, emulation = fn(*args), emulated(fn, *args)
        assert emulation.dtype == dtype, name
        assert (native != emulation).float().mean() < 0.005, name


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_emulated_attention_errs_as_pytorchs_flash_kernel(dtype, causal):
    """SDPA on half tensors, causal as in CLIP's text encoder or not: PyTorch's CPU flash kernel rounds the
    softmax's exponentials to half before they weight the values. The emulation errs from the exact result
    (float64) as much on average, within 5 %; without that rounding it errs about a third less."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 40, generator=g).to(dtype) for _ in range(3))
    attention = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    exact = attention(q.double(), k.double(), v.double())
    error = lambda out: (out.double() - exact).abs().mean().item()  # noqa: E731
    native, emulation = attention(q, k, v), emulated(attention, q, k, v)
    assert emulation.dtype == dtype
    assert error(emulation) == pytest.approx(error(native), rel=0.05)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_emulated_half_arithmetic_errs_as_pytorchs_half_kernels(dtype):
    """The tests' tiny models, a UNet call and a decode at 128x128, in half precision by PyTorch's own
    kernels and emulated: as far from float32 on average, within 10 % (read 0.99 to 1.05)."""
    reference = bench.tiny_stable_diffusion()
    half = bench.converted(reference, dtype)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(1, 77, reference.unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([281])
    error = lambda out, ref: (out.float() - ref).abs().mean().item()  # noqa: E731
    with torch.no_grad():
        for model, args in ((lambda m, *a: m.unet(*a), (x, t, context)), (lambda m, x: m.vae.decode(x), (x,))):
            float32 = model(reference, *args)
            halves = [a.to(dtype) if a.is_floating_point() else a for a in args]
            native, emulation = model(half, *halves), emulated(model, half, *halves)
            assert error(emulation, float32) == pytest.approx(error(native, float32), rel=0.1)


def test_the_precision_benchmark_compares_each_stage_with_float32(tmp_path):
    """bench.py precision on the tiny model, seconds: a row per half type, emulated where the CPU has no
    instructions for it; float16 (11 bits of mantissa) moves the maps less than bfloat16 (8 bits)."""
    out = tmp_path / "precision.json"
    bench.main(["precision", "--tiny", "--size", "64", "--masks", "2", "--feature-samples", "2", "--json", str(out)])
    rows = {row["dtype"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"bfloat16", "float16"}
    for name, row in rows.items():
        assert row["arithmetic"] == ("native" if devices.cpu_computes(getattr(torch, name)) else "emulated")
        assert 0 < row["mean_map_difference"] <= row["max_map_difference"] < 1
        assert 0.5 < row["label_agreement"] < 1 and 0 < row["low_res_agreement"] <= 1
    assert rows["float16"]["mean_map_difference"] < rows["bfloat16"]["mean_map_difference"]
