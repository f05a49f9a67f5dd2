"""speed.py's paths against the plain ones: each fast computation against float64 or a plain loop, the
swap itself (what it takes, what it leaves, and back), the choice by measurement, and whole models
with every fast path forced on against diffusers and against the plain path; and the memory freed
kept for the next tensors inside a call, and handed back after it (devices.freed_memory_kept)."""
import contextlib
import json
import math
import os
import platform
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import devices
import emerdiff
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


@pytest.mark.parametrize("rows", [1, 2])
def test_winograd_convolution_by_blocks_of_tile_rows_is_the_convolution(monkeypatch, rows):
    """A few rows of tiles at a time (WINOGRAD_BLOCK, a memory bound), the last block short: 3 rows of
    tiles in blocks of 1 or of 2, against torch's convolution in float64."""
    b, c_in, c_out, tiles_wide = 2, 16, 4, 2
    monkeypatch.setattr(speed, "WINOGRAD_BLOCK", rows * 36 * c_in * b * tiles_wide)
    g = torch.Generator().manual_seed(rows)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1)
    x = torch.randn(b, c_in, 10, 4 * tiles_wide, generator=g)
    expected = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    with torch.no_grad():
        out = speed.winograd_convolution(x, speed.winograd_filters(conv.weight), conv.bias)
    assert_close(out, expected, rel=1e-5)


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
    a broken file is measured over and left as it is (test_an_odd_choices_file_is_said_once_and_left_as_it_is)."""
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
    assert (tmp_path / "cache" / "choices.json").read_text() == "{not json"  # said, and left as it is
    speed.remembered.cache_clear()
    assert [speed.batch_class(n) for n in (1, 2, 3, 8, 13, 15, 16, 50)] == [1, 2, 2, 8, 8, 8, 16, 32]


def test_another_revision_of_the_fast_paths_is_another_machine(monkeypatch):
    """Choices measured on the fast paths' earlier code are measured again: the revision is in the key."""
    earlier = speed.machine()
    monkeypatch.setattr(speed, "PATHS_REVISION", speed.PATHS_REVISION + 1)
    assert speed.machine() != earlier


def measured_calls(keys) -> int:
    """How many candidate calls speed.fastest makes for `keys` in turn (each new key: 2 warm-ups, 2 timed)."""
    calls = []
    candidates = [lambda x: calls.append(0), lambda x: calls.append(1)]
    for key in keys:
        speed.fastest((key,), candidates, 0)
    return len(calls)


ODD_CHOICES = {"folder": None, "too large": "{}" + " " * speed.CHOICES_LIMIT, "not JSON": "{not json",
               "nested too deep": "[" * 200_000 + "]" * 200_000, "a list": "[1]", "a text index": '{"k": "1"}',
               "a negative index": '{"k": -1}'}


@pytest.mark.parametrize("what", ODD_CHOICES)
def test_an_odd_choices_file_is_said_once_and_left_as_it_is(monkeypatch, tmp_path, capsys, what):
    """A choices file that is a folder, too large, not JSON (nested deeper than the parser goes included)
    or not of keys and indices: one line on stderr for the process, every shape measured again (a key
    measured once in the process is remembered there), and the file as it was."""
    path, text = tmp_path / "choices.json", ODD_CHOICES[what]
    path.mkdir() if text is None else path.write_text(text)
    monkeypatch.setenv(speed.CHOICES_VARIABLE, str(path))
    speed.remembered.cache_clear()
    try:
        assert measured_calls(["a", "b", "a"]) == 8
    finally:
        speed.remembered.cache_clear()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"emerdiff: the speed choices file {path}: "), err
    assert path.is_dir() if text is None else path.read_text() == text


FASTEST_TWICE = """
import speed
calls = []
for key in ("a", "b"):
    speed.fastest((key,), [lambda x: calls.append(0), lambda x: calls.append(1)], 0)
print(len(calls))
"""


@pytest.mark.parametrize("kind", ["FIFO", "device"])
def test_a_choices_path_that_is_no_file_is_never_read_nor_replaced(tmp_path, kind):
    """A FIFO (read, it would wait for ever) or a device node (one of /dev/null's numbers, made here: the
    tests run as root, and a device replaced is a JSON file from then on): the shapes are measured, one
    line says why the file is not used, and the node stays what it was."""
    path = tmp_path / kind
    if kind == "FIFO":
        os.mkfifo(path)
    else:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    result = subprocess.run([sys.executable, "-c", FASTEST_TWICE], cwd=ROOT, capture_output=True, text=True,
                            env=os.environ | {speed.CHOICES_VARIABLE: str(path)}, timeout=120)
    assert result.stdout.split() == ["8"], result.stderr
    assert result.stderr.startswith(f"emerdiff: the speed choices file {path}: not a regular file (a FIFO, socket or "
                                    "device): ignored") and result.stderr.count("\n") == 1, result.stderr
    assert (stat.S_ISFIFO if kind == "FIFO" else stat.S_ISCHR)(os.stat(path).st_mode)


@pytest.mark.parametrize("environment, place", [
    ({"HOME": ""}, None), ({}, None), ({"HOME": "relative"}, None), ({"XDG_CACHE_HOME": "relative", "HOME": ""}, None),
    ({"HOME": "/home/u"}, "/home/u/.cache"), ({"XDG_CACHE_HOME": "/c", "HOME": ""}, "/c")],
    ids=["home-empty", "no-home", "home-relative", "xdg-relative", "home", "xdg"])
def test_without_a_cache_folder_the_choices_stay_in_the_process(monkeypatch, environment, place):
    """HOME empty or unset (a service's environment) and no absolute XDG_CACHE_HOME: no choices file (not
    /.cache's); the shapes are measured and remembered in the process, and nothing is written."""
    for variable in (speed.CHOICES_VARIABLE, "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    expected = place and Path(place) / "emerdiff" / "speed-choices.json"
    assert speed.choices_path() == expected
    if place is None:
        monkeypatch.setattr(speed, "atomic_save", lambda *args: pytest.fail("a choices file was written"))
        speed.remembered.cache_clear()
        try:
            assert measured_calls(["a", "a"]) == 4
        finally:
            speed.remembered.cache_clear()


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
    """segment() runs speed.py's layers unless speed=dict(plain=True), which runs the plain models and the
    inversion's plain record (queries and keys of every layer); either way the model's layers come back
    plain. The maps agree within float rounding."""
    chosen, plain_record = [], []
    monkeypatch.setattr(speed, "fastest", lambda key, candidates, *args: chosen.append(key) or candidates[-1])
    monkeypatch.setattr(emerdiff, "invert", lambda *args, f=emerdiff.invert, **kw: plain_record.append(
        not kw["replay_cross_attention"]) or f(*args, **kw))
    options = dict(size=128, masks=3, feature_samples=2, kmeans_restarts=2)
    image = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(4))
    fast = emerdiff.segment(image, sd, **options)
    assert chosen and plain_record == [False]
    assert not any(type(m) in (speed.FastConv2d, speed.FastAttention) for m in sd.unet.modules())
    chosen.clear()
    plain = emerdiff.segment(image, sd, speed=dict(plain=True), **options)
    assert chosen == [] and plain_record == [False, True]
    assert not any(type(m) in (speed.FastConv2d, speed.FastAttention) for m in sd.unet.modules())
    assert relative_error(fast.difference_maps, plain.difference_maps) <= 1e-4


def test_a_speed_setting_is_put_back_as_it_was(sd):
    """speed_settings leaves each layer the class it had: a model the caller made fast stays fast."""
    speed.apply(sd.unet)
    try:
        with devices.speed_settings(sd, 64, 64, emerdiff.DEFAULTS | dict(speed=dict(devices.SPEED, plain=True))):
            assert not any(type(m) is speed.FastConv2d for m in sd.unet.modules())
        assert any(type(m) is speed.FastConv2d for m in sd.unet.modules())
    finally:
        speed.apply(sd, fast=False)


def test_an_unwritable_choices_file_changes_nothing_but_speed(sd, tmp_path, monkeypatch):
    """Where the choices cannot be written (their folder is a file), segment() measures in the process and
    gives what it gives with a writable file, bit for bit, with nothing written and no error."""
    options = dict(size=64, masks=2, feature_samples=2, kmeans_restarts=2, steps=10, t_m=101)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(6))
    results = {}
    for how, path in (("writable", tmp_path / "cache" / "choices.json"), ("unwritable", tmp_path / "file" / "c.json")):
        (tmp_path / "file").write_bytes(b"")
        monkeypatch.setenv(speed.CHOICES_VARIABLE, str(path))
        monkeypatch.setattr(speed, "measured_fastest", lambda candidates, args: len(candidates) - 1)  # the same choice
        speed.remembered.cache_clear()
        results[how] = emerdiff.segment(image, sd, **options)
        assert path.is_file() == (how == "writable")
    speed.remembered.cache_clear()
    assert torch.equal(results["writable"].difference_maps, results["unwritable"].difference_maps)


# ---- Freed memory kept for the next tensors ----

HEAP = """
import ctypes, resource, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
def touched_and_freed(size):  # -> the resident bytes that freeing it gave back to the system
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    touched = resident()
    libc.free(ctypes.c_void_p(block))
    return touched - resident()
def faults_of_a_new_block():  # a 128 MB block written after a 256 MB one was freed
    touched_and_freed(2 ** 28)
    before = faults()
    touched_and_freed(2 ** 27)
    return faults() - before
"""

PAGE_FAULTS_OF_A_NEW_BLOCK = HEAP + """
import devices
if sys.argv[1] == "kept":
    with devices.freed_memory_kept():
        print(faults_of_a_new_block())
else:
    print(faults_of_a_new_block())
"""


def test_freed_memory_is_kept_for_the_next_block():
    """A 128 MB block of the C heap (where PyTorch's CPU tensors come from) written after a 256 MB one was
    freed, in a new process each: by default the system maps the process fresh pages, touched with a page
    fault each (or each 2 MB under transparent huge pages); inside devices.freed_memory_kept, the freed
    memory serves it, neither unmapped nor trimmed from the heap's top: hardly a fault."""
    faults = {how: int(subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_A_NEW_BLOCK, how], cwd=ROOT, check=True,
                                      capture_output=True, text=True).stdout) for how in ("default", "kept")}
    if platform.libc_ver()[0] != "glibc":
        return  # nothing is set elsewhere
    pages = 2 ** 27 // resource.getpagesize()
    assert faults["kept"] < min(pages / 100, faults["default"]) and faults["default"] > pages / 100, faults


MEMORY_GIVEN_BACK_AFTER_SEGMENT = HEAP + """
import torch, devices, emerdiff, weights
torch.set_num_threads(1)
before = touched_and_freed(2 ** 28)
with devices.freed_memory_kept():
    inside = touched_and_freed(2 ** 28)
sd = weights.random_stable_diffusion("tiny")
emerdiff.segment(torch.rand(3, 64, 64), sd, size=64, masks=2, feature_samples=2, kmeans_restarts=2, steps=10, t_m=101)
after = touched_and_freed(2 ** 28)
print(before, inside, after)
"""


def test_segment_hands_freed_memory_back_when_it_returns():
    """In a new process that imports emerdiff: freeing a 256 MB block that was written gives its memory
    back to the system before segment(), and again after it returns; inside freed_memory_kept (segment's
    setting on the CPU) the process keeps it, which shows that the measure would see a setting left behind."""
    out = subprocess.run([sys.executable, "-c", MEMORY_GIVEN_BACK_AFTER_SEGMENT], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    before, inside, after = map(int, out.split())
    if platform.libc_ver()[0] == "glibc":
        assert inside < 2 ** 24, inside
    assert before > 0.9 * 2 ** 28 and after > 0.9 * 2 ** 28, (before, after)


MEMORY_HANDED_BACK_BETWEEN_STAGES = HEAP + """
import devices
with devices.freed_memory_kept():
    kept = touched_and_freed(2 ** 28)
    before = resident()
    devices.hand_back_freed_memory()
    print(kept, before - resident())
"""


def test_the_memory_freed_inside_the_setting_is_handed_back_between_the_runs_and_the_decodes():
    """devices.hand_back_freed_memory, which difference_maps calls between the modulated runs and the decodes:
    a freed 256 MB block that the setting kept goes back to the system (in a new process)."""
    out = subprocess.run([sys.executable, "-c", MEMORY_HANDED_BACK_BETWEEN_STAGES], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    kept, handed_back = map(int, out.split())
    if platform.libc_ver()[0] == "glibc":
        assert kept < 2 ** 24 and handed_back > 0.9 * 2 ** 28, (kept, handed_back)


def test_segment_and_the_estimate_keep_freed_memory_on_the_cpu_unless_plain(sd, monkeypatch):
    """segment() and devices.estimate (timed before the first image) run under the same speed settings:
    on the CPU the allocator keeps freed memory for the call; speed=dict(plain=True) sets nothing."""
    calls = []

    @contextlib.contextmanager
    def recorded():
        calls.append("set")
        yield
    monkeypatch.setattr(devices, "freed_memory_kept", recorded)
    options = dict(size=64, masks=2, feature_samples=2, kmeans_restarts=2, steps=10, t_m=101)
    emerdiff.segment(torch.rand(3, 64, 64), sd, **options)
    devices.estimate(sd, (64, 64), emerdiff.DEFAULTS | options)
    assert calls == ["set", "set"]
    emerdiff.segment(torch.rand(3, 64, 64), sd, speed=dict(plain=True), **options)
    devices.estimate(sd, (64, 64), emerdiff.DEFAULTS | options | dict(speed=dict(devices.SPEED, plain=True)))
    assert calls == ["set", "set"]
