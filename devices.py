"""Where and how fast the method runs: device and precision, the speed settings, the batch sizes, the
estimate of an image's time, and watching the work (progress bars, seconds per stage).

None of this changes what the method computes (beyond float rounding); it decides how the work is
laid out on the machine. Kept apart so that emerdiff.py reads as the paper. Every speed setting is
made in one place, `speed_settings`, the way diffusers keeps every "how" of attention in its
processors: the batch sizes, speed.py's layers, the memory layout, the C library's allocator and
torch.compile are set on entering it and put back on leaving it. `segment` and the command line's
estimate go through it; `speed=dict(plain=True)` turns every setting off. What each gains is
measured in docs/speed.md; its table "Measured constants" holds the figures behind the constants here.
"""
import contextvars
import ctypes
import math
import platform
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

import sampler
import speed
from inputs import GRID_FACTOR, LATENT_FACTOR, EmerDiffError, denoising_steps, is_int
from unet import FeedForward, ResnetBlock2D

# segment()'s option `speed`, with these defaults: how the work is laid out, none of it changing a result
# beyond float rounding. batch_size: "auto", UNet runs per call (and decodes per call) or a pair of them;
# compile: torch.compile the models; plain: the models as unet.py, vae.py and sampler.py read, no setting.
SPEED = dict(batch_size="auto", compile=False, plain=False)
# Measured constants (docs/speed.md, Measured constants, has each measurement whole):
# batch_size "auto" off CUDA: UNet images per call (the fastest per image of 1 to 16 on the AVX2 CPU,
# `python tools/bench.py profile`), decodes per call (one image: at 512x512 on the AVX2 CPU 10.7 s an image
# against 14.8 s a pair, peak 11.2 GB against 13.8; on the AVX-512 CPU a pair was faster per image than 4 or 8)
CPU_BATCH_SIZES = (16, 1)
# ... and at most this many latent pixels in a UNet call off CUDA (8 images at 512x512): at 512x512 a modulated call
# of 12 runs held 3.4 GB beside the models and the record, a peak of 9.74 GB against the notebook approach's 8.62 GB
CPU_CALL_LATENT_PIXELS = 8 * 64 * 64
MEMORY_HEADROOM = 0.8  # of the free CUDA memory, what "auto" may fill (H200, `python tools/bench.py cuda`)
COMPILED_SHAPES = 256  # block shapes x batch sizes that torch.compile may specialise for
COMPILE_BACKEND = "inductor"  # torch.compile's (the tests count compilations with "eager", traced alike in seconds)


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


# ---- The speed settings, set and put back together ----

@dataclass(frozen=True)
class Layout:
    """What the method's steps are told by the speed settings."""
    batch_size: int  # UNet runs (feature draws, inversion steps, modulated runs) per call
    decode_batch_size: int  # VAE decodes per call
    replay_cross_attention: bool  # the inversion records cross-attention outputs whole, for the runs to replay


@contextmanager
def speed_settings(sd, height: int, width: int, o: dict):
    """Lay `sd` out for a height x width image with options `o` (`o["speed"]`: SPEED's keys) for the block
    inside, which gets the Layout. Unless `plain`: on CUDA the UNet and decoder in channels_last; on the
    CPU the C library keeps the memory it frees (freed_memory_kept); speed.py's layers, or torch.compile
    of the plain ones. Then the batch sizes (on CUDA probed in that layout). On leaving, the layers'
    classes, the memory layout and the allocator are as they were, and the freed memory is handed back;
    only compilation stays with the model (a compiled model is reused by later calls, with the batch
    sizes it took for each image size)."""
    options, device = o["speed"], model_device_dtype(sd)[0]
    with ExitStack() as settings:
        if not options["plain"]:
            settings.enter_context(channels_last(sd) if device.type == "cuda" else freed_memory_kept())
            settings.enter_context(compiled(sd) if options["compile"] else speed.applied(sd))
        else:
            settings.enter_context(speed.applied(sd, fast=False))
        yield Layout(*batch_sizes(sd, height, width, o), replay_cross_attention=not options["plain"])


@contextmanager
def channels_last(sd):
    """The UNet and the VAE decoder in channels_last, in which CUDA's convolutions run faster; the
    encoder, run once, keeps the layout the UNet expects. Afterwards the layout they had."""
    modules = (sd.unet, sd.vae.post_quant_conv, sd.vae.decoder)
    weight = sd.unet.conv_in.weight  # (320, 4, 3, 3): its strides tell the two layouts apart
    before = torch.channels_last if weight.stride(1) == 1 else torch.contiguous_format
    for module in modules:
        module.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for module in modules:
            module.to(memory_format=before)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
KEPT = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2 ** 31 - 1}  # every block from the heap; the heap never trimmed
GLIBC_DEFAULTS = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024}  # malloc.h's DEFAULT_MMAP_MAX, _TRIM_THRESHOLD
kept_depth = 0  # how many freed_memory_kept blocks are open: the outermost sets and restores


@contextmanager
def freed_memory_kept():
    """Have glibc keep the memory that PyTorch frees for the next tensors, inside the block. By default it
    maps every block over 32 MB afresh (most activations at 512x512 are 100 to 500 MB) and unmaps it when
    freed, so each new tensor first page-faults through pages the kernel zeroes: a quarter of a modulated
    step's time on the CPU measured (docs/speed.md, Freed memory kept). Afterwards glibc's defaults again,
    and the freed memory handed back to the system (malloc_trim). Elsewhere than glibc nothing is set."""
    global kept_depth
    libc = ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None  # the C library the process runs on
    if libc is None or kept_depth:
        yield
        return
    for parameter, value in KEPT.items():
        libc.mallopt(parameter, value)
    kept_depth += 1
    try:
        yield
    finally:
        kept_depth -= 1
        for parameter, value in GLIBC_DEFAULTS.items():
            libc.mallopt(parameter, value)
        libc.malloc_trim(0)


def hand_back_freed_memory():
    """Inside freed_memory_kept, hand the memory freed so far back to the system (malloc_trim) at a change of work
    whose blocks differ in size: kept, the modulated runs' freed blocks cannot serve the decoder's, which would take
    new memory beside them (512x512: a peak of 16.8 GB against 11 GB handed back; docs/speed.md). Elsewhere nothing."""
    if kept_depth:
        ctypes.CDLL(None).malloc_trim(0)


@contextmanager
def compiled(sd):
    """torch.compile the UNet's blocks without hooks (resnets and feed-forwards) and the VAE decoder, once
    per model: the compiled blocks stay with it, for later calls. Shapes are static, so each batch size
    compiles on its first call (minutes; whether that pays is measured in docs/speed.md); the model keeps
    the batch sizes of each image size's first image (batch_sizes), so that later images of a size compile
    nothing. Inside the block torch may specialise for COMPILED_SHAPES shapes."""
    if not hasattr(sd.unet, "compiled_batch_sizes"):
        for module in [*sd.unet.modules(), sd.vae.decoder]:
            if isinstance(module, (ResnetBlock2D, FeedForward)) or module is sd.vae.decoder:
                module.compile(backend=COMPILE_BACKEND, dynamic=False)
        sd.unet.compiled_batch_sizes = {}  # marks the model compiled; batch_sizes keeps each size's in it
    limit = max(torch._dynamo.config.recompile_limit, COMPILED_SHAPES)
    with torch._dynamo.config.patch(recompile_limit=limit):
        yield


# ---- Batch sizes ----

def latent_shape(sd, height: int, width: int) -> tuple[int, int, int, int]:
    """The shape of the latent of one height x width image: (1, 4, H/8, W/8)."""
    return 1, sd.vae.config.latent_channels, height // LATENT_FACTOR, width // LATENT_FACTOR


def blank_context(sd) -> torch.Tensor:
    """A prompt embedding's shape (1, 77, 768) filled with zeros: what probes and timings feed the UNet
    (its memory and time do not depend on the values)."""
    device, dtype = model_device_dtype(sd)
    return torch.zeros(1, sd.tokenizer.max_length, sd.unet.config.cross_attention_dim, device=device, dtype=dtype)


def cpu_runs_per_call(height: int, width: int) -> int:
    """UNet images per call off CUDA for a height x width image: CPU_BATCH_SIZES' runs, at most
    CPU_CALL_LATENT_PIXELS of latent in the call, at least one."""
    latent_pixels = (height // LATENT_FACTOR) * (width // LATENT_FACTOR)
    return min(CPU_BATCH_SIZES[0], max(1, CPU_CALL_LATENT_PIXELS // latent_pixels))


def batch_sizes(sd, height: int, width: int, o: dict) -> tuple[int, int]:
    """(UNet images per call, decodes per call) for a height x width image with options `o`: their
    speed's batch_size an int (both), such a pair, or "auto".

    "auto" on CUDA fills the memory free at the start (see auto_batch_sizes: probes at the image's
    latent shape, for its 2K runs of the steps from t_m); elsewhere CPU_BATCH_SIZES, its runs bounded by
    cpu_runs_per_call (a memory bound: 8 images at 512x512, 16 up to 360x360). A compiled
    model probes once per image size and keeps the answer: the free memory moves between images, and
    another batch size would be new static shapes, compiled again (minutes on a GPU). The probes run
    uncompiled: their calls of 1 and 2 images are not the run's shapes."""
    size = o["speed"]["batch_size"]
    if size != "auto":
        return (size, size) if is_int(size) else tuple(size)
    device, _ = model_device_dtype(sd)
    if device.type != "cuda":
        return cpu_runs_per_call(height, width), CPU_BATCH_SIZES[1]
    probe = latent_shape(sd, height, width), 2 * o["masks"], len(sampler.timesteps_until(o["t_m"], o["steps"]))
    kept = getattr(sd.unet, "compiled_batch_sizes", {})  # a compiled model keeps them (compiled); others probe anew
    if probe not in kept:
        with torch.compiler.set_stance("force_eager"):
            kept[probe] = auto_batch_sizes(sd, *probe)
    return kept[probe]


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
def auto_batch_sizes(sd, shape, runs: int, steps: int) -> tuple[int, int]:
    """The largest batches that fit in MEMORY_HEADROOM of the free CUDA memory, measured at the
    start by probes at this image's size: one recording UNet call (the attention record's bytes
    per step, kept through the modulated runs and the decoding), one modulated UNet step and one
    decode at 1 and 2 images each (their peaks give the memory per image). The probes reset
    CUDA's peak-memory count: its reading afterwards covers what follows them."""
    device, dtype = model_device_dtype(sd)
    x0, context, t = torch.zeros(shape, device=device), blank_context(sd), torch.tensor([1], device=device)
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


# ---- How long an image will take ----

FEATURE_PASS = 0.4  # of a UNet call: the feature passes stop at the feature layer (0.32 of 0.80 TFLOP counted)
# Of a UNet image's own work, a modulated run's step in a batch of 16 runs: 2.84 s against 3.82 - 0.26 s on the
# AVX-512 CPU at 512x512 (`python tools/bench.py profile`, before the freed memory was kept); 1 elsewhere.
MODULATED_STEP = {"cpu": 0.8}
TIMED_CALLS = 3  # the estimate takes the fastest of this many timed calls of each
FIXED_COST_LATENT = 8  # latent side of the UNet call whose time is taken as any call's fixed cost


@dataclass
class Estimate:
    """How long one image takes, and what the figure rests on."""
    seconds: float
    unet_calls: float  # feature passes counted at FEATURE_PASS of a call
    unet_images: float  # likewise, and the modulated runs' steps at MODULATED_STEP of an image
    unet_s: float  # one UNet call of one image at the working size
    fixed_s: float  # its fixed cost: a call of one image at the smallest latent
    decodes: int
    spread: float  # how much slower than the fastest the slowest timed call was, relative

    def line(self, device: torch.device) -> str:
        """The estimate in words (docs/command-line.md shows the line): how long, what the figure rests on, and
        what cuts it."""
        duration = f"{self.seconds / 3600:.1f} h" if self.seconds >= 5400 else f"{self.seconds / 60:.0f} min"
        return (f"about {duration} per image on the {device.type} ({self.unet_calls:.0f} UNet calls of "
                f"{self.unet_images:.0f} images in all, a call of one {self.unet_s:.2f} s, and {self.decodes} decodes; "
                f"the fastest of {TIMED_CALLS} timed calls, the slowest {100 * self.spread:.0f} % slower): --masks, "
                "--feature-samples, --size and --steps cut it (README, Time and cost)")


def fastest_and_spread(call, device) -> tuple[float, float]:
    """The fastest of TIMED_CALLS timed calls after an untimed one (the first call of a size allocates;
    a machine that slows down now and then does not inflate it), and how much slower the slowest was."""
    call()
    timed = []
    for _ in range(TIMED_CALLS):
        start = speed.clock(device)
        call()
        timed.append(speed.clock(device) - start)
    return min(timed), max(timed) / min(timed) - 1


@torch.no_grad()
def estimate(sd, size: tuple[int, int], o: dict) -> Estimate:
    """Seconds per image at the working size (W, H) with options `o`, by the cost model of docs/speed.md:
    calls x fixed cost + images x (a call of one - fixed cost) + decodes x a decode, the UNet's calls
    and images counted stage by stage at the run's batch size (a call of many images costs its fixed
    cost once). The UNet of one image at this size and at the smallest latent, and a decode, timed
    under the speed settings the run will have. With upsample="bilinear" only the feature passes run."""
    device, dtype = model_device_dtype(sd)
    with speed_settings(sd, size[1], size[0], o) as layout:
        latent = torch.zeros(latent_shape(sd, size[1], size[0]), device=device, dtype=dtype)
        smallest = torch.zeros(1, latent.shape[1], FIXED_COST_LATENT, FIXED_COST_LATENT, device=device, dtype=dtype)
        context, t = blank_context(sd), torch.tensor([1], device=device)
        (unet_s, unet_spread), (fixed_s, _), (decode_s, decode_spread) = (
            fastest_and_spread(call, device) for call in (lambda: sd.unet(latent, t, context),
                                                          lambda: sd.unet(smallest, t, context),
                                                          lambda: sd.vae.decode(latent)))
    fixed_s, batch = min(fixed_s, unet_s), layout.batch_size
    steps, samples = denoising_steps(o), o["feature_samples"]
    runs = 2 * o["masks"] if o["upsample"] == "modulation" else 0
    calls = FEATURE_PASS * math.ceil(samples / batch) + math.ceil(steps / batch) + steps * math.ceil(runs / batch)
    images = FEATURE_PASS * samples + steps + MODULATED_STEP.get(device.type, 1.0) * runs * steps
    seconds = calls * fixed_s + images * (unet_s - fixed_s) + runs * decode_s
    return Estimate(seconds, calls, images, unet_s, fixed_s, runs, max(unet_spread, decode_spread))


# ---- Watching the work: progress bars and seconds per stage ----

SHOW_PROGRESS = contextvars.ContextVar("SHOW_PROGRESS", default=False)  # set by showing_progress


@contextmanager
def showing_progress(show: bool = True):
    """Progress bars for the steps run inside (segment(progress=True) runs its steps in one)."""
    token = SHOW_PROGRESS.set(show)
    try:
        yield
    finally:
        SHOW_PROGRESS.reset(token)


def progress_bar(items=None, **bar):
    """tqdm's bar over `items` (or a bar of `total`) inside showing_progress(), silent elsewhere."""
    return tqdm(items, disable=not SHOW_PROGRESS.get(), leave=False, **bar)


def ticking(items, bar):
    """`items`, advancing the progress bar by one as each is taken."""
    for item in items:
        yield item
        bar.update()


class Stopwatch:
    """Seconds per stage (`lap(stage)` ends one), the device synchronised at each lap."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}
        self.start = speed.clock(device)

    def lap(self, stage: str):
        now = speed.clock(self.device)
        self.seconds[stage], self.start = now - self.start, now
