"""speed.py's paths against the plain ones: each fast computation against float64 or a plain loop, the
swap itself (what it takes, what it leaves, and back), the choice by measurement, and whole models
with every fast path forced on against diffusers and against the plain path; and the memory freed
kept for the next tensors (devices.keep_freed_memory)."""
import json
import math
import platform
import resource
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import devices
import emerdiff
import runner
import speed
from conftest import ROOT
from sampler import Modulation, regenerate
from test_models import assert_close
from test_savings import OFFSETS, inverted, relative_error
from tiny_models import TINY_UNET
from unet import Attention
from vae import PixelAttention


def always_fast(key, candidates, *args):
    """In place of speed.fastest: every layer takes its fast path (the plain one is candidates[0])."""
    return candidates[-1]


@pytest.fixture
def fast_paths(sd, monkeypatch):
    """The session's tiny models with every fast path applied and chosen; plain again afterwards."""
    monkeypatch.setattr(speed, "fastest", always_fast)
    speed.apply(sd)
    yield sd
    speed.apply(sd, fast=False)


# ---- Winograd's F(4x4, 3x3) ----

@pytest.mark.parametrize("in_channels, out_channels, side", [
    (8, 8, (8, 12)), (11, 9, (5, 7)), (8, 8, (1, 1)), (8, 8, (2, 3)), (16, 4, (10, 6))])
def test_winograd_convolution_is_the_convolution(in_channels, out_channels, side):
    """Against torch's convolution in float64, sides not a multiple of 4 (padded and cropped), both
    memory layouts."""
    g = torch.Generator().manual_seed(in_channels + out_channels + side[0])
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    x = torch.randn(2, in_channels, *side, generator=g)
    expected = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    for layout in (torch.contiguous_format, torch.channels_last):
        with torch.no_grad():
            out = speed.winograd_convolution(x.contiguous(memory_format=layout), speed.winograd_filters(conv.weight),
                                             conv.bias)
        assert_close(out, expected, rel=1e-5)  # torch's own float32 convolution: up to 6e-6


def test_fast_conv2d_follows_the_weights_and_runs_only_float32_on_the_cpu(monkeypatch):
    """Winograd's filters come from the weights of the moment (loaded anew after a first call). Other
    dtypes and gradients take torch's convolution."""
    monkeypatch.setattr(speed, "fastest", always_fast)
    g = torch.Generator().manual_seed(7)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    speed.apply(conv)
    assert type(conv) is speed.FastConv2d
    x = torch.randn(1, 8, 4, 4, generator=g)
    with torch.no_grad():
        conv(x)
        conv.load_state_dict({name: torch.randn(p.shape, generator=g) for name, p in conv.state_dict().items()})
        expected = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        assert_close(conv(x), expected, rel=1e-5)
        assert torch.equal(conv.double()(x.double()), F.conv2d(x.double(), conv.weight, conv.bias, padding=1))
        half = conv.bfloat16()
        assert torch.equal(half(x.bfloat16()), F.conv2d(x.bfloat16(), half.weight, half.bias, padding=1))
    conv.float()
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))  # with gradients: torch's


# ---- Attention probabilities once for the runs ----

@pytest.mark.parametrize("heads, runs, n, m", [(1, 2, 16, 16), (4, 3, 64, 64), (8, 5, 20, 77),
                                               (2, 3, 2 * speed.QUERY_BLOCK + 52, 50)])  # 3 blocks of queries
def test_shared_probabilities_attention_is_softmax_attention_run_by_run(heads, runs, n, m):
    g = torch.Generator().manual_seed(heads)
    channels = 8 * heads
    q, k = (torch.randn(1, length, channels, generator=g, dtype=torch.float64) for length in (n, m))
    v = torch.randn(runs, m, channels, generator=g, dtype=torch.float64)
    d = channels // heads
    expected = torch.empty(runs, n, channels, dtype=torch.float64)
    for run in range(runs):  # softmax(q k^T / sqrt(d)) v, head by head, run by run
        for h in range(heads):
            head = slice(h * d, (h + 1) * d)
            p = torch.softmax(q[0, :, head] @ k[0, :, head].T / math.sqrt(d), dim=-1)
            expected[run, :, head] = p @ v[run, :, head]
    assert torch.allclose(speed.shared_probabilities_attention(q, k, v, heads), expected, rtol=1e-12, atol=1e-12)


# ---- The swap and the choice ----

def test_apply_swaps_only_the_layers_with_a_fast_path_and_back():
    """3x3 convolutions of stride 1, padding 1, no groups or dilation, with a bias, and the UNet's
    attention: swapped, their parameters and state_dict untouched; every other layer left alone (a
    stride-2 3x3 convolution by F(4x4, 3x3) would compute something else)."""
    layers = nn.ModuleDict(dict(
        same=nn.Conv2d(4, 4, 3, padding=1), strided=nn.Conv2d(4, 4, 3, stride=2, padding=1),
        unpadded=nn.Conv2d(4, 4, 3), pointwise=nn.Conv2d(4, 4, 1), grouped=nn.Conv2d(4, 4, 3, padding=1, groups=2),
        dilated=nn.Conv2d(4, 4, 3, padding=1, dilation=2), unbiased=nn.Conv2d(4, 4, 3, padding=1, bias=False),
        reflected=nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        attention=Attention(8, 2), pixel_attention=PixelAttention(8, 2)))
    plain = {name: type(layer) for name, layer in layers.items()}
    state = {name: p.clone() for name, p in layers.state_dict().items()}
    speed.apply(layers)
    swapped = {name for name, layer in layers.items() if type(layer) is not plain[name]}
    assert swapped == {"same", "attention"}
    assert type(layers["same"]) is speed.FastConv2d and type(layers["attention"]) is speed.FastAttention
    speed.apply(layers)  # idempotent
    assert layers.state_dict().keys() == state.keys()
    assert all(torch.equal(p, state[name]) for name, p in layers.state_dict().items())
    speed.apply(layers, fast=False)
    assert {name: type(layer) for name, layer in layers.items()} == plain


def test_the_faster_candidate_is_measured_once_per_key_and_machine(monkeypatch, tmp_path):
    """A clock that each candidate advances by its own cost: the first time a key comes on a machine, each
    candidate warms up once and is timed once, and the cheaper is kept, in the process and in the choices
    file: a later process (the in-process memory cleared) measures nothing; another machine measures again;
    a broken file is measured over and replaced."""
    clock, calls = [0.0], []
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])
    monkeypatch.setenv(speed.CHOICES_VARIABLE, str(tmp_path / "cache" / "choices.json"))
    monkeypatch.setattr(speed, "machine", lambda: "CPU A")
    speed.remembered.cache_clear()

    def costing(name, seconds):
        def candidate(x):
            calls.append(name)
            clock[0] += seconds
        return candidate
    slow, fast = costing("slow", 2.0), costing("fast", 1.0)
    assert speed.fastest(("key",), [slow, fast], 0) is fast and sorted(calls) == ["fast", "fast", "slow", "slow"]
    calls.clear()
    assert speed.fastest(("key",), [slow, fast], 1) is fast and calls == []
    assert speed.fastest(("other key",), [fast, slow], 2) is fast and len(calls) == 4
    assert json.loads((tmp_path / "cache" / "choices.json").read_text()) == {
        repr(("key", "CPU A")): 1, repr(("other key", "CPU A")): 0}
    calls.clear()
    speed.remembered.cache_clear()  # a new process
    assert speed.fastest(("key",), [slow, fast], 3) is fast and calls == []
    monkeypatch.setattr(speed, "machine", lambda: "CPU B")
    assert speed.fastest(("key",), [fast, slow], 4) is fast and len(calls) == 4
    (tmp_path / "cache" / "choices.json").write_text("{not json")
    speed.remembered.cache_clear()
    calls.clear()
    assert speed.fastest(("key",), [slow, fast], 5) is fast and len(calls) == 4
    assert json.loads((tmp_path / "cache" / "choices.json").read_text()) == {repr(("key", "CPU B")): 1}
    speed.remembered.cache_clear()
    assert [speed.batch_class(n) for n in (1, 2, 3, 8, 13, 15, 16, 50)] == [1, 2, 2, 8, 8, 8, 16, 32]


def test_a_convolution_is_timed_on_as_few_images_as_hold_enough_pixels(monkeypatch):
    """64x64 maps: one image of the batch; 8x8 maps: the whole batch of 16 (its power-of-two class)."""
    timed = []
    monkeypatch.setattr(speed, "fastest", lambda key, candidates, x: timed.append(len(x)) or candidates[0])
    conv = nn.Conv2d(4, 4, 3, padding=1)
    speed.apply(conv)
    with torch.no_grad():
        for side in (64, 8):
            x = torch.randn(16, 4, side, side)
            assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    assert timed == [1, 16]


# ---- Whole models ----

def test_the_unet_with_every_fast_path_computes_what_diffusers_computes(fast_paths, tiny_reference):
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([281, 1])
    context = torch.randn(2, 77, TINY_UNET["cross_attention_dim"], generator=g)
    assert sum(type(m) is speed.FastConv2d for m in fast_paths.unet.modules()) > 10
    with torch.no_grad():
        assert_close(fast_paths.unet(x, t, context), tiny_reference[0](x, t, context).sample)


def test_modulated_runs_with_shared_probabilities_equal_the_plain_path(sd, monkeypatch):
    """The modulated runs replay batch-1 q and k against the runs' values: FastAttention computes the
    probabilities once (forced here, Winograd too) and the runs come out as on the plain models."""
    x0_and_context = (torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3)),
                      sd.text_encoder(sd.tokenizer("")).detach())
    timesteps, x_start, zs, record = inverted(sd, x0_and_context)

    def runs():
        return regenerate(sd.unet, x_start, zs, timesteps, x0_and_context[1], hooks=Modulation(OFFSETS, record))
    plain = runs()
    shared = []
    monkeypatch.setattr(speed, "shared_probabilities_attention",
                        lambda *args, f=speed.shared_probabilities_attention: shared.append(1) or f(*args))
    monkeypatch.setattr(speed, "fastest", always_fast)
    speed.apply(sd)
    try:
        fast = runs()
    finally:
        speed.apply(sd, fast=False)
    assert len(shared) > 0 and relative_error(fast, plain) <= 1e-5


def test_segment_with_and_without_the_speed_paths(sd, monkeypatch):
    """segment() applies the speed paths unless speed=dict(plain=True), which leaves the models plain; the
    maps agree within float rounding."""
    monkeypatch.setattr(speed, "fastest", always_fast)
    options = dict(size=128, masks=3, feature_samples=2, kmeans_restarts=2)
    image = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(4))
    try:
        fast = emerdiff.segment(image, sd, **options)
        assert any(type(m) is speed.FastConv2d for m in sd.unet.modules())
        plain = emerdiff.segment(image, sd, speed=dict(plain=True), **options)
        assert not any(type(m) in (speed.FastConv2d, speed.FastAttention) for m in sd.unet.modules())
    finally:
        speed.apply(sd, fast=False)
    assert relative_error(fast.difference_maps, plain.difference_maps) <= 1e-4


# ---- Freed memory kept for the next tensors ----

PAGE_FAULTS_OF_A_NEW_BLOCK = """
import ctypes, resource, sys, devices
kept = sys.argv[1] == "kept" and devices.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def touched_and_freed(size):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(ctypes.c_void_p(block))
touched_and_freed(2 ** 28)  # 256 MB
before = faults()
touched_and_freed(2 ** 27)  # 128 MB
print(kept, faults() - before)
"""


def test_freed_memory_is_kept_for_the_next_block():
    """A 128 MB block of the C heap (where PyTorch's CPU tensors come from) written after a 256 MB one was
    freed, in a new process each: by default the system maps the process fresh pages, touched with a page
    fault each (or each 2 MB under transparent huge pages); with devices.keep_freed_memory, the freed
    memory serves it, neither unmapped nor trimmed from the heap's top: hardly a fault. Elsewhere than
    glibc it sets nothing."""
    faults = {}
    for how in ("default", "kept"):
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_A_NEW_BLOCK, how], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
        faults[how] = (out[0] == "True", int(out[1]))
    if platform.libc_ver()[0] != "glibc":
        assert faults["kept"][0] is False
        return
    pages = 2 ** 27 // resource.getpagesize()
    assert faults["kept"][0] and faults["kept"][1] < min(pages / 100, faults["default"][1]), faults


def test_segment_and_the_estimate_keep_freed_memory_on_the_cpu(sd, monkeypatch):
    """Both prepare the process as the run has it: devices.prepare (segment's) and runner.estimate (timed
    before the first image) set the allocator through devices.set_memory_layout."""
    calls = []
    monkeypatch.setattr(devices, "keep_freed_memory", lambda: calls.append("set") or True)
    devices.prepare(sd, 64, 64, emerdiff.DEFAULTS)
    assert calls == ["set"]
    runner.estimate(sd, (64, 64), emerdiff.DEFAULTS | dict(size=64))
    assert calls == ["set", "set"]
