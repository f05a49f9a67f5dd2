"""Where and how fast the method runs: device and precision, batch sizes, memory layout, speed paths,
compilation.

None of this changes what the method computes (beyond float rounding); it decides how the work is
laid out on the machine. Kept apart so that emerdiff.py reads as the paper: the choices are made in
`prepare`, which `segment` calls once per image. What each choice gains is measured in docs/speed.md.
"""
import ctypes
import functools
import math
import platform
import time

import torch

import sampler
import speed
from inputs import GRID_FACTOR, LATENT_FACTOR, EmerDiffError, is_int
from unet import FeedForward, ResnetBlock2D

# segment()'s option `speed`, with these defaults: how the work is laid out, none of it changing a result
# beyond float rounding. batch_size: "auto", UNet runs per call (and decodes per call) or a pair of them;
# compile: torch.compile the models; plain: the plain models, without speed.py's paths.
SPEED = dict(batch_size="auto", compile=False, plain=False)
CPU_BATCH_SIZES = (16, 2)  # batch_size "auto" off CUDA: UNet images per call (the fastest per image of 1 to 16
                          # in `python tools/bench.py profile`), decodes per call: one +- pair (at 512x512 faster
                          # per image than 4 or 8, and a tenth of 8's memory: docs/speed.md)
MEMORY_HEADROOM = 0.8  # of the free CUDA memory, what the automatic batch sizes may fill
COMPILED_SHAPES = 256  # block shapes x batch sizes that torch.compile may specialise for


# ---- Device and precision ----

def pick_device(name: str = "auto") -> torch.device:
    """"auto" picks cuda, then mps, then cpu; a named device must be available."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EmerDiffError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise EmerDiffError(f"device {name!r} is not available here: use --device auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise EmerDiffError(f"device {name!r} is not available here: the CUDA devices are cuda:0 to cuda:{count - 1}")
    return device


CPU_INSTRUCTIONS = {torch.bfloat16: "BF16", torch.float16: "FP16"}  # what oneDNN needs for each, besides AMX


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": fp16 on a GPU (SD v1.5's usual precision), fp32 on the CPU. Half precision on a CPU
    without instructions for it is refused: PyTorch emulates it there, dozens of times slower."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    if device.type == "cpu" and dtype != torch.float32 and not cpu_computes(dtype):
        raise EmerDiffError(f"this CPU has no {name} instructions (AVX-512 {CPU_INSTRUCTIONS[dtype]} or AMX): "
                            f"{name} runs dozens of times slower than float32 on it (docs/speed.md); use --dtype float32")
    return dtype


def cpu_computes(dtype: torch.dtype) -> bool:
    """Whether oneDNN, PyTorch's CPU kernels, has instructions for `dtype` on this CPU."""
    supported = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
                 torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}
    return supported[dtype]()


def model_device_dtype(sd) -> tuple[torch.device, torch.dtype]:
    parameter = next(sd.unet.parameters())
    return parameter.device, parameter.dtype


def check_finite(values: torch.Tensor, what: str):
    """Stop with one line when NaN or inf came out of the model (NaN weights, or a float16 overflow)."""
    if not torch.isfinite(values).all():
        raise EmerDiffError(f"the {what} hold NaN or inf: the weights may hold NaN, or float16 overflowed; "
                            "try float32 (--dtype float32)")


def synchronize(device: torch.device) -> None:
    """Wait for the GPU (CUDA or mps), which runs behind the Python code: before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Stopwatch:
    """Seconds per stage (`lap(stage)` ends one), the device synchronised at each lap."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}
        synchronize(device)
        self.clock = time.perf_counter()

    def lap(self, stage: str):
        synchronize(self.device)
        self.seconds[stage], self.clock = time.perf_counter() - self.clock, time.perf_counter()


# ---- Preparing the models for a run ----

def prepare(sd, height: int, width: int, o: dict) -> tuple[int, int]:
    """Ready `sd` for segmenting a height x width image with options `o`; returns the batch sizes
    (UNet runs per call, decodes per call). The memory layout and the speed paths first (speed.py;
    torch.compile takes the plain model), then the batch sizes (on CUDA probed in that layout), then
    compilation (after the probes: they would compile shapes of their own)."""
    set_memory_layout(sd)
    set_speed_paths(sd, o["speed"])
    sizes = batch_sizes(sd, height, width, o)
    if o["speed"]["compile"]:
        compile_models(sd)
    return sizes


def set_speed_paths(sd, options: dict) -> None:
    """speed.py's paths on, unless the `speed` options ask for the plain models or for torch.compile
    (which takes the plain model). In place; idempotent."""
    speed.apply(sd, fast=not (options["plain"] or options["compile"]))


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2 ** 31 - 1  # bytes free at the heap's top before glibc gives them back: the most it takes


@functools.cache
def keep_freed_memory() -> bool:
    """Have the C library keep the memory that PyTorch frees for the next tensors, instead of giving
    it back to the system. By default glibc maps every block over 32 MB afresh (most activations at
    512x512 are 100 to 500 MB) and unmaps it when freed, so each new tensor first page-faults through
    pages the kernel zeroes: a quarter of a modulated step's time on the CPU measured (docs/speed.md,
    Freed memory kept). Set once per process, by mallopt: all blocks from the heap, which is not
    trimmed; the process's memory then stays near its peak until it ends. glibc only (Linux);
    elsewhere nothing is set. Returns whether it is set."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library the process runs on
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def set_memory_layout(sd) -> None:
    """channels_last on CUDA, where convolutions run faster in it: the UNet and the VAE decoder; the
    encoder, run once, keeps the layout the UNet expects. The CPU keeps the usual layout, in which
    speed.FastConv2d may run Winograd's convolutions, faster there than oneDNN's in channels_last on
    the CPUs measured (docs/speed.md), and the process keeps the memory it frees (keep_freed_memory).
    In place; idempotent."""
    device, _ = model_device_dtype(sd)
    if device.type == "cuda":
        for module in (sd.unet, sd.vae.post_quant_conv, sd.vae.decoder):
            module.to(memory_format=torch.channels_last)
    elif device.type == "cpu":
        keep_freed_memory()


def compile_models(sd) -> None:
    """torch.compile the UNet's blocks without hooks (resnets and feed-forwards) and the VAE decoder,
    once per model. Shapes are static, so each batch size compiles on its first call (minutes;
    whether that pays is measured in docs/speed.md). In place; idempotent."""
    if getattr(sd.unet, "compiled", False):
        return
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_SHAPES)
    for module in [*sd.unet.modules(), sd.vae.decoder]:
        if isinstance(module, (ResnetBlock2D, FeedForward)) or module is sd.vae.decoder:
            module.compile(dynamic=False)
    sd.unet.compiled = True


# ---- Batch sizes ----

def latent_shape(sd, height: int, width: int) -> tuple[int, int, int, int]:
    """The shape of the latent of one height x width image: (1, 4, H/8, W/8)."""
    return 1, sd.vae.config.latent_channels, height // LATENT_FACTOR, width // LATENT_FACTOR


def batch_sizes(sd, height: int, width: int, o: dict) -> tuple[int, int]:
    """(UNet images per call, decodes per call) for a height x width image with options `o`: their
    speed's batch_size an int (both), such a pair, or "auto".

    "auto" on CUDA fills the memory free at the start (see auto_batch_sizes: probes at the image's
    latent shape, for its 2K runs of the steps from t_m); elsewhere it is CPU_BATCH_SIZES."""
    size = o["speed"]["batch_size"]
    if size != "auto":
        return (size, size) if is_int(size) else tuple(size)
    device, _ = model_device_dtype(sd)
    if device.type != "cuda":
        return CPU_BATCH_SIZES
    return auto_batch_sizes(sd, latent_shape(sd, height, width), runs=2 * o["masks"],
                            steps=len(sampler.timesteps_until(o["t_m"], o["steps"])))


def free_cuda_memory(device) -> int:
    """Bytes this process may still allocate on `device`: the device's free memory plus what
    PyTorch holds unused, within torch.cuda.set_per_process_memory_fraction's cap."""
    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    cap = torch.cuda.get_per_process_memory_fraction(device) * total
    return int(min(free + reserved - allocated, cap - allocated))


def peak_memory(call, device) -> int:
    """Peak bytes allocated by call() above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def fixed_and_per_image(call, device) -> tuple[int, int]:
    """(fixed, per image) peak bytes of call(n), from its peaks at n = 1 and n = 2 images."""
    one, two = (peak_memory(lambda: call(n), device) for n in (1, 2))
    return max(0, 2 * one - two), max(1, two - one)


@torch.no_grad()
def auto_batch_sizes(sd, shape, *, runs: int, steps: int) -> tuple[int, int]:
    """The largest batches that fit in MEMORY_HEADROOM of the free CUDA memory, measured at the
    start by probes at this image's size: one recording UNet call (the attention record's bytes
    per step, kept through the modulated runs and the decoding), one modulated UNet step and one
    decode at 1 and 2 images each (their peaks give the memory per image). The probes reset
    CUDA's peak-memory count: its reading afterwards covers what follows them."""
    device, dtype = model_device_dtype(sd)
    x0 = torch.zeros(shape, device=device)
    from emerdiff import embed_prompt  # here: emerdiff imports this module
    context = embed_prompt(sd)
    t = torch.tensor([1], device=device)
    record = sampler.AttentionRecord()
    sampler.predict_noise(sd.unet, x0, t, context, record, step=0)
    record_bytes = steps * sum(a.numel() * a.element_size()
                               for a in [*record.outputs.values(), *(a for qk in record.qks.values() for a in qk)])
    tokens = math.prod(side // (GRID_FACTOR // LATENT_FACTOR) for side in shape[-2:])  # the modulated layer's h*w

    def modulated_step(n):
        offsets = torch.zeros(n, tokens, device=device, dtype=dtype)
        sampler.predict_noise(sd.unet, x0.expand(n, -1, -1, -1), t, context, sampler.Modulation(offsets, record), 0)

    budget = MEMORY_HEADROOM * free_cuda_memory(device) - record_bytes
    unet_fixed, per_run = fixed_and_per_image(modulated_step, device)
    decode_fixed, per_decode = fixed_and_per_image(
        lambda n: sd.vae.decode(x0.expand(n, -1, -1, -1).to(dtype)), device)
    return tuple(int(min(runs, max(2, (budget - fixed) // per_image)))
                 for fixed, per_image in ((unet_fixed, per_run), (decode_fixed, per_decode)))
