"""The speed paths, beside the plain PyTorch models of unet.py and vae.py.

`apply(sd)` swaps two kinds of layer of a loaded model for faster subclasses that compute the
same numbers up to float rounding; `apply(sd, fast=False)` swaps them back. Nothing else in the
project knows these paths exist: the models read as the architecture, and emerdiff.segment's
option `speed=dict(plain=True)` (`--plain` on the command line) runs them plain.

- 3x3 convolutions by Winograd's F(4x4, 3x3) (`FastConv2d`), on the CPU in float32 without gradients.
- Attention over runs that share their queries and keys (the modulated runs under injection replay
  the same q and k): softmax(q k^T / sqrt(d)) computed once for all runs (`FastAttention`).

Neither wins everywhere: what pays depends on the CPU (AVX2 or AVX-512), the shape and the number of
runs per call. So each is chosen by measurement where it runs, in the spirit of cudnn.benchmark: the
first time a layer shape comes on a machine, the fast path and the plain one are each timed
(`fastest`), and the faster is remembered: in the process, and in a file of the user's cache (keyed by
the CPU, its instruction set as PyTorch sees it, the PyTorch version, the thread count and the paths'
revision), so that later runs on the machine measure nothing. On CUDA the plain paths run (cuDNN and
SDPA's fused kernels; docs/speed.md has the measurements behind every choice). The clock all of the
project's timings read (`clock`) is here too: these measurements, the estimate and the stopwatch
(devices.py).
"""
import functools
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from tqdm import tqdm

from files import FileError, atomic_save, path_kind, read_text
from unet import Attention

# ---- Choosing by measurement ----

def synchronize(device: torch.device) -> None:
    """Wait for the GPU (CUDA or mps), which runs behind the Python code: before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def clock(device: torch.device = torch.device("cpu")) -> float:
    """Seconds on a monotonic clock once `device` has done the work queued so far: every timing of the
    project reads this (the choices here, devices.Stopwatch, devices.estimate)."""
    synchronize(device)
    return time.perf_counter()


CHOICES_VARIABLE = "EMERDIFF_SPEED_CHOICES"  # the choices file's path, if not the default (choices_path)


def fastest(key: tuple, candidates: list, *args):
    """The candidate (a function of `args`) that is fastest for `key` on this machine. The first time
    the key comes on a machine, each is called with `args` once to warm up and once timed, and the
    faster is remembered, in this process and in the choices file (`choices_path`) for the next ones.
    The candidates compute the same up to rounding. Under a dispatch mode (torch.utils.flop_counter
    counting, say) nothing is measured: the plain path, candidates[0]."""
    if is_in_torch_dispatch_mode():
        return candidates[0]
    key, chosen = repr((*key, machine())), remembered()
    if chosen.get(key, len(candidates)) >= len(candidates):
        chosen[key] = measured_fastest(candidates, args)
        save_choices({key: chosen[key]})
    return candidates[chosen[key]]


def measured_fastest(candidates: list, args) -> int:
    """The index of the candidate whose call with `args` took least, each warmed up once first."""
    for candidate in candidates:
        candidate(*args)
    seconds = []
    for candidate in candidates:
        start = clock()
        candidate(*args)
        seconds.append(clock() - start)
    return seconds.index(min(seconds))


@functools.cache
def cpu_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())


# Raised when a fast path's code changes, so that the choices measured on the earlier code are measured again
# (2: Winograd by blocks of tile rows).
PATHS_REVISION = 2


def machine() -> str:
    """What a measurement holds for: the CPU, the vector instructions PyTorch uses on it, PyTorch, threads,
    and the fast paths' code (PATHS_REVISION)."""
    return (f"{cpu_name()}, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, paths {PATHS_REVISION}")


CHOICES_LIMIT = 2 ** 20  # bytes: a choices file holds some hundred keys, tens of kB; a larger one is none


def choices_path() -> Path | None:
    """$EMERDIFF_SPEED_CHOICES, else speed-choices.json in emerdiff's folder of the user's cache:
    $XDG_CACHE_HOME, else $HOME/.cache (each only where it is an absolute path, as the XDG specification
    asks). None where there is no such place (HOME empty or unset, as for some services): the choices then
    stay in the process (no /.cache is made)."""
    given = os.environ.get(CHOICES_VARIABLE)
    if given:
        return Path(given)
    cache, home = os.environ.get("XDG_CACHE_HOME", ""), os.environ.get("HOME", "")
    folder = Path(cache) if os.path.isabs(cache) else Path(home) / ".cache" if os.path.isabs(home) else None
    return folder / "emerdiff" / "speed-choices.json" if folder else None


@functools.cache
def remembered() -> dict[str, int]:
    """The choices made so far, key -> index of the faster candidate: the file's, then this process's. A
    choices file that is odd in any way (saved_choices) is said in one line, once per process, and
    ignored: every shape is measured again, and the file is left as it is."""
    try:
        return saved_choices()
    except FileError as e:
        tqdm.write(f"emerdiff: the speed choices file {e}: ignored, so the speed paths are measured in this "
                   f"process and nothing is written there (remove it, or set {CHOICES_VARIABLE} to another file)",
                   file=sys.stderr)
        return {}


def saved_choices() -> dict[str, int]:
    """The choices file's, read through files.read_text (a regular file, at most CHOICES_LIMIT bytes); none
    where there is no file (or no place for one). A file that is something else, too large, not JSON
    (nested too deep for the parser included) or not of keys and indices is a FileError of one line."""
    path = choices_path()
    if path is None or path_kind(path) is None:
        return {}
    text = read_text(path, CHOICES_LIMIT)
    try:
        saved = json.loads(text)
    except (ValueError, RecursionError):
        raise FileError(path, "not JSON") from None
    if not (isinstance(saved, dict) and all(type(index) is int and index >= 0 for index in saved.values())):
        raise FileError(path, "not speed choices (JSON of key: candidate index)")
    return saved


def save_choices(new: dict[str, int]) -> None:
    """Add `new` to the choices file, whole or not at all (other processes may add theirs meanwhile: the
    file is read again first). Where there is no place for it, it cannot be written or the file there is
    odd (saved_choices; said once by remembered), the choices stay with this process."""
    path = choices_path()
    if path is None:
        return
    try:
        merged = saved_choices() | new
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(path, lambda tmp: tmp.write_text(json.dumps(merged, indent=0, sort_keys=True)))
    except (OSError, FileError):
        pass


def batch_class(n: int) -> int:
    """n rounded down to a power of two: batches of 8 to 15 runs share one measurement."""
    return 1 << (n.bit_length() - 1)


def runs_here(x: torch.Tensor, module: nn.Module) -> bool:
    """The fast paths are for inference on the CPU in float32."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())))


# ---- Winograd's F(4x4, 3x3) ----

# Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016: each 4x4 output tile
# of a 3x3 convolution is Y = A^T [(G g G^T) * (B^T d B)] A, d the 6x6 input tile around it and g the
# filter: 36 multiplications per channel pair instead of 144. The matrices interpolate at 0, 1, -1, 2,
# -1/2 and infinity, the points that round least in float32 (Barabasz et al., "Error analysis and
# improving the accuracy of Winograd convolution", 2020).
WINOGRAD_BT = torch.tensor([[2, 3, -4, -3, 2, 0], [0, 2, 5, 1, -2, 0], [0, 2, 1, -5, 2, 0],
                            [0, -1, -2, 1, 2, 0], [0, -2, 1, 2, -1, 0], [0, 2, 3, -4, -3, 2]], dtype=torch.float64)
WINOGRAD_G = torch.tensor([[15, 0, 0], [5, 5, 5], [5, -5, 5], [1, 2, 4], [32, -16, 8], [0, 0, 15]],
                          dtype=torch.float64) / 30
WINOGRAD_AT = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -1 / 2, 0], [0, 1, 1, 4, 1 / 4, 0],
                            [0, 1, -1, 8, -1 / 8, 1]], dtype=torch.float64)
# The same transforms of a flattened tile: kron(M, M) vec(X) = vec(M X M^T).
WINOGRAD_INPUT = torch.kron(WINOGRAD_BT, WINOGRAD_BT).float()  # (36, 36): 6x6 input tile -> B^T d B
WINOGRAD_FILTER = torch.kron(WINOGRAD_G, WINOGRAD_G).float()  # (36, 9): 3x3 filter -> G g G^T
WINOGRAD_OUTPUT = torch.kron(WINOGRAD_AT, WINOGRAD_AT).float()  # (16, 36): products -> 4x4 output tile


def winograd_filters(weight: torch.Tensor) -> torch.Tensor:
    """G g G^T of every filter g: (C_out, C_in, 3, 3) -> (36, C_out, C_in). Made at every call: kept,
    they would take 4 times the weights' memory (7.8 GiB for SD v1.5's UNet), for a few % of the time."""
    c_out, c_in = weight.shape[:2]
    return (WINOGRAD_FILTER.to(weight) @ weight.reshape(c_out * c_in, 9).T).view(36, c_out, c_in)


WINOGRAD_BLOCK = 2 ** 23  # values of the largest matrix of a block of tile rows (32 MB in float32): a memory bound


def winograd_convolution(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """3x3 convolution with padding 1 by F(4x4, 3x3): x (B, C_in, H, W), filters G g G^T (36, C_out, C_in)
    -> (B, C_out, H, W), contiguous. Sides that are not a multiple of 4 are padded up to one and cropped.
    The tiles are independent: a few rows of them at a time (winograd_rows), so that the matrices of the
    transform, each 2.25 times the size of a map, stay within WINOGRAD_BLOCK values."""
    b, c, h, w = x.shape
    th, tw = -(-h // 4), -(-w // 4)  # output tiles
    padded = F.pad(x, (1, 1 + 4 * tw - w, 1, 1 + 4 * th - h))
    c_out = filters.shape[1]
    out = x.new_empty(b, c_out, 4 * th, 4 * tw)
    rows = max(1, WINOGRAD_BLOCK // (36 * max(c, c_out) * b * tw))  # tile rows per block
    for top in range(0, th, rows):
        block = out[:, :, 4 * top:4 * (top + rows)]  # (B, C_out, 4 n, 4 tw), a view
        winograd_rows(padded[:, :, 4 * top:4 * (top + rows) + 2], filters, block)
    return out[:, :, :h, :w].add_(bias[:, None, None]).contiguous()


def winograd_rows(padded: torch.Tensor, filters: torch.Tensor, out: torch.Tensor) -> None:
    """n rows of output tiles into `out` (B, C_out, 4 n, 4 tw) from their padded input rows (B, C_in, 4 n + 2,
    4 tw + 2). Three matrix products: B^T d B of every input tile, then one batched product over the 36 tile
    positions does the multiplying, then A^T m A."""
    b, c = padded.shape[:2]
    n, tw = out.shape[2] // 4, out.shape[3] // 4
    tiles = padded.unfold(2, 6, 4).unfold(3, 6, 4).permute(4, 5, 1, 0, 2, 3)  # (6, 6, C_in, B, n, tw), a view
    transformed = WINOGRAD_INPUT.to(padded.device) @ tiles.reshape(36, -1)  # B^T d B: (36, C_in * B * n * tw)
    products = torch.bmm(filters, transformed.view(36, c, -1))  # (36, C_out, B * n * tw)
    del transformed  # freed before the next product
    y = WINOGRAD_OUTPUT.to(padded.device) @ products.view(36, -1)  # A^T m A: (16, C_out * B * n * tw)
    del products
    y = y.view(4, 4, -1, b, n, tw).permute(3, 2, 4, 0, 5, 1)  # (B, C_out, n, row in tile, tw, column in tile)
    out.view(b, -1, n, 4, tw, 4).copy_(y)


def is_winograd_shaped(conv: nn.Module) -> bool:
    """A plain nn.Conv2d that F(4x4, 3x3) computes: 3x3, stride 1, padding 1, no dilation or groups, a bias."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and conv.bias is not None)


# A convolution's two paths are timed on the fewest images of the batch holding this many pixels per channel:
# timing whole batches made a first 512x512 image 18 % dearer on the AVX-512 CPU (docs/speed.md).
MEASURED_PIXELS = 4096


class FastConv2d(nn.Conv2d):
    """A 3x3 convolution (is_winograd_shaped) by oneDNN or by Winograd, whichever `fastest` measured faster
    for this shape: timed on a few images of the batch (MEASURED_PIXELS), not the whole, which measuring a
    decode of 8 images at 512x512 four times would cost."""

    def forward(self, x):
        if not runs_here(x, self):
            return super().forward(x)
        images = batch_class(min(len(x), -(-MEASURED_PIXELS // (x.shape[-2] * x.shape[-1]))))
        key = ("conv", images, *x.shape[1:], self.out_channels)
        return fastest(key, [super().forward, self.winograd], x[:images])(x)

    def winograd(self, x):
        return winograd_convolution(x, winograd_filters(self.weight), self.bias)


# ---- Attention computed once for runs that share q and k ----

QUERY_BLOCK = 1024  # queries per softmax in shared_probabilities_attention: (heads, 1024, M) at a time (a memory bound)


def shared_probabilities_attention(q, k, v, heads: int) -> torch.Tensor:
    """Attention of B runs that share their queries and keys: q (1, N, C), k (1, M, C), v (B, M, C).

    P = softmax(q k^T / sqrt(d)) is computed once for all runs, QUERY_BLOCK queries at a time (heads,
    block, M) so that it is never held whole; the runs are folded into the value dimension, (heads, M,
    B * d), so that one matrix product applies each block of P to all of them -> (B, N, C).
    """
    runs, _, channels = v.shape
    d = channels // heads
    q, k = (a[0].unflatten(-1, (heads, d)).transpose(0, 1) for a in (q * d ** -0.5, k))  # (heads, N or M, d)
    folded = v.unflatten(-1, (heads, d)).permute(2, 1, 0, 3).flatten(2)  # (heads, M, B * d)
    out = v.new_empty(heads, q.shape[1], runs * d)
    for start in range(0, q.shape[1], QUERY_BLOCK):
        p = torch.softmax(q[:, start:start + QUERY_BLOCK] @ k.transpose(1, 2), dim=-1)  # (heads, block, M)
        torch.matmul(p, folded, out=out[:, start:start + QUERY_BLOCK])
    return out.unflatten(-1, (runs, d)).permute(2, 1, 0, 3).flatten(2)  # (B, N, C)


class FastAttention(Attention):
    """Attention whose runs share q and k (batch 1 against B values) by SDPA run by run or with the
    probabilities shared, whichever `fastest` measured faster for these shapes."""

    def attention(self, q, k, v):
        if not (len(q) == len(k) == 1 < len(v) and runs_here(v, self)):
            return super().attention(q, k, v)
        shared = lambda q, k, v: shared_probabilities_attention(q, k, v, self.heads)  # noqa: E731
        key = ("attention", *q.shape[1:], *k.shape[1:], batch_class(len(v)), self.heads)
        return fastest(key, [super().attention, shared], q, k, v)(q, k, v)


# ---- The seam ----

def layers(models) -> list[nn.Module]:
    """Every module of `models`: a module, or a StableDiffusion's UNet and decoder (the encoder runs once)."""
    parts = [models] if isinstance(models, nn.Module) else [models.unet, models.vae.decoder]
    return [module for part in parts for module in part.modules()]


def apply(models, fast: bool = True) -> None:
    """Swap the layers of `models` (a module, or a StableDiffusion: its UNet and decoder) that have a speed
    path for their fast subclasses (fast=True), or back to the plain classes: the same parameters,
    state_dict and names; only the forward changes. In place; idempotent. The VAE's pixel attention
    (one image, never shared runs) and every other convolution keep the plain class."""
    for module in layers(models):
        if fast and is_winograd_shaped(module):
            module.__class__ = FastConv2d
        elif fast and type(module) is Attention:
            module.__class__ = FastAttention
        elif not fast and type(module) is FastConv2d:
            module.__class__ = nn.Conv2d
        elif not fast and type(module) is FastAttention:
            module.__class__ = Attention


@contextmanager
def applied(models, fast: bool = True):
    """`apply(models, fast)` for the block inside; afterwards every layer has the class it had before."""
    before = [(module, type(module)) for module in layers(models)]
    apply(models, fast)
    try:
        yield
    finally:
        for module, cls in before:
            module.__class__ = cls
