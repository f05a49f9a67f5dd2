"""EmerDiff: pixel-level semantic segmentation read out of Stable Diffusion, without training.

Namekata, Sabour, Fidler, Kim, "EmerDiff: Emerging Pixel-level Semantic Knowledge in Diffusion
Models", ICLR 2024 (arXiv 2401.11739). Read top to bottom, this file is the method, one function
per step of the paper's Sec. 3, in its order:

  Step 0  load_image, encode              the image into SD's latent space
  Step 1  extract_features, kmeans,       low-resolution masks: k-means on the up16 query
          low_resolution_masks            features of the first up16 cross-attention (Sec. 3.2)
  Step 2  invert                          edit-friendly DDPM inversion, attention recorded (Sec. 3.3)
  Step 3  modulated_latents               denoise again with +-lambda added on each mask at t_m (Sec. 3.3)
  Step 4  difference_maps, assign_labels  ||I- - I+|| per mask, blurred; argmax over masks (Sec. 3.3)
          segment                         all of it;  main: the command line

Defaults are the paper's (Sec. 4.1) and, where it is silent, the authors' example notebook:
K = 25 masks, lambda = 10, t_m = 281, t_f = 1, 100 feature draws, 50-step grid, seed 42.
Every random draw comes from a CPU torch.Generator, so a seed gives the same draws on any device.
"""
import math
import numbers
import os
import stat
import sys
import warnings
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

import sampler
from unet import FEATURE_LAYER, AttentionHooks, FeedForward, ResnetBlock2D

GRID_FACTOR = 32  # image side / side of the 16x16 ("up16") feature grid
LATENT_FACTOR = 8  # image side / latent side: the VAE halves the image three times
SIZE_MULTIPLE = 64  # the UNet halves the latent three times: image sides are multiples of 64
MAX_SIDE = 2048  # an explicit --size beyond this does not fit a GPU
MAX_MASKS = 256  # labels.png is a palette image


class EmerDiffError(Exception):
    """Bad input to the method; the message is one line that says what to do."""


# ---- Step 0: the image in SD's latent space ----

def load_image(image, size="auto") -> tuple[torch.Tensor, tuple[int, int]]:
    """Image -> ((1, 3, H, W) in [-1, 1], the input's own (width, height)).

    `image` is anything `as_image` takes. The working size H, W is a multiple of 64: by default of
    area about 512x512 with the input's aspect ratio (the notebook's rule); `size` may also be an
    int (square) or (width, height). Images are resized with Lanczos as the notebook does; float
    tensors (no Lanczos in torch) with antialiased bicubic.
    """
    source = as_image(image)
    is_tensor = isinstance(source, torch.Tensor)
    width, height = (source.shape[-1], source.shape[-2]) if is_tensor else source.size
    target = working_size(width, height, size)
    if not is_tensor:  # Lanczos, as the notebook resizes
        resized = np.asarray(source.resize(target, Image.LANCZOS), dtype=np.float32) / 255
        return torch.from_numpy(resized).permute(2, 0, 1)[None] * 2 - 1, (width, height)
    if target != (width, height):
        source = F.interpolate(source, size=target[::-1], mode="bicubic", antialias=True).clamp(0, 1)
    return source * 2 - 1, (width, height)


def as_image(image) -> Image.Image | torch.Tensor:
    """What `segment` accepts, as an RGB PIL image or a (1, 3, H, W) float tensor in [0, 1].

    A path or a PIL image (any mode, see to_rgb); a numpy array (H, W, 3) or a tensor (3, H, W) /
    (1, 3, H, W), either uint8 or float in [0, 1]. uint8 pixels go through Pillow, as a file's
    would. Anything else is an EmerDiffError that says what was given.
    """
    if isinstance(image, (str, os.PathLike)):
        return to_rgb(open_image(image))
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise EmerDiffError(f"an image array must be RGB, (H, W, 3); got shape {image.shape}")
        if image.dtype != np.uint8 and image.dtype.kind != "f":
            raise EmerDiffError(f"image values must be uint8, or float in [0, 1]; got an array of {image.dtype}")
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy: the input may be read-only
    elif isinstance(image, torch.Tensor):
        if image.ndim == 4 and image.shape[0] != 1:
            raise EmerDiffError(f"a batch of {image.shape[0]} images: segment them one at a time")
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise EmerDiffError(f"an image tensor must be RGB, (3, H, W) or (1, 3, H, W); got {tuple(image.shape)}")
        if image.is_meta:
            raise EmerDiffError("a meta tensor holds no pixel values: give one with data")
        image = image.reshape(image.shape[-3:])
    else:
        raise EmerDiffError(f"cannot read an image from {type(image).__name__}: give a path, a PIL image, "
                            "a numpy array (H, W, 3) or a tensor (3, H, W)")
    return checked_pixels(image.detach().cpu())


def checked_pixels(pixels: torch.Tensor) -> Image.Image | torch.Tensor:
    """(3, H, W) uint8 -> a PIL image; float in [0, 1] -> (1, 3, H, W) fp32; anything else refused."""
    if pixels.numel() == 0:
        raise EmerDiffError(f"the image is empty (shape {tuple(pixels.shape)})")
    if pixels.dtype == torch.uint8:
        return Image.fromarray(pixels.permute(1, 2, 0).numpy())
    if not pixels.is_floating_point():
        raise EmerDiffError(f"image values must be uint8, or float in [0, 1]; got {pixels.dtype}")
    pixels = pixels.float()
    if not torch.isfinite(pixels).all():
        raise EmerDiffError("the image holds NaN or infinite values")
    low, high = pixels.min().item(), pixels.max().item()
    if low < 0 or high > 1:
        raise EmerDiffError(f"float image values must be in [0, 1], these span {low:g}..{high:g} "
                            "(divide 0..255 values by 255)")
    return pixels[None]


def model_device_dtype(sd) -> tuple[torch.device, torch.dtype]:
    parameter = next(sd.unet.parameters())
    return parameter.device, parameter.dtype


def synchronize(device: torch.device) -> None:
    """Wait for the GPU (CUDA or mps), which runs behind the Python code: before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def latent_shape(sd, height: int, width: int) -> tuple[int, int, int, int]:
    """The shape of the latent of one height x width image: (1, 4, H/8, W/8)."""
    return 1, sd.vae.config.latent_channels, height // LATENT_FACTOR, width // LATENT_FACTOR


@torch.no_grad()
def encode(sd, image: torch.Tensor) -> torch.Tensor:
    """x0 = VAE encoder mean x 0.18215, (1, 4, H/8, W/8) in fp32."""
    device, dtype = model_device_dtype(sd)
    return sd.vae.encode(image.to(device, dtype)).float()


@torch.no_grad()
def embed_prompt(sd, prompt: str = "") -> torch.Tensor:
    """The CLIP embedding (1, 77, 768) of `prompt`; EmerDiff uses the empty prompt everywhere."""
    device, _ = model_device_dtype(sd)
    return sd.text_encoder(sd.tokenizer(prompt).to(device))


# ---- Step 1: low-resolution masks (Sec. 3.2) ----

class FeatureCapture(AttentionHooks):
    """Adds up the feature layer's queries over a batch, then stops the UNet by raising `Done`:
    nothing after that layer is needed (at SD v1.5 size, 0.32 of the UNet's 0.80 TFLOP are run)."""

    class Done(Exception):
        pass

    def __init__(self, layer: str = FEATURE_LAYER):
        self.layer, self.total = layer, 0

    def qk(self, name, project):
        q, k = project()
        if name == self.layer:
            self.total = self.total + q.float().sum(0)  # (h*w, C)
            raise FeatureCapture.Done
        return q, k


@torch.no_grad()
def extract_features(sd, x0, *, t_f: int = 1, samples: int = 100, generator=None, batch_size: int = 8,
                     prompt: str = "", progress: bool = False) -> torch.Tensor:
    """The mean query vectors (h*w, C) of the feature layer over `samples` noise draws at t_f.

    Each draw is x = sqrt(ab) x0 + sqrt(1 - ab) eps at t_f ("minimum noise", t_f = 1 in the paper)
    through the UNet with the (empty) prompt, `batch_size` draws per UNet call; the query is the
    output of the layer's to_q projection, all heads together. (The notebook uses t_f = 0.)
    """
    alpha_bar = sampler.ALPHAS_CUMPROD[t_f].item()
    # Drawn at once (the same numbers as one draw after another, as the notebook makes them): batch-size free.
    noise = torch.randn((samples, *x0.shape[1:]), generator=generator).to(x0.device)
    context, t = embed_prompt(sd, prompt), torch.tensor([t_f], device=x0.device)
    capture = FeatureCapture()
    for start in tqdm(range(0, samples, batch_size), desc="features", disable=not progress, leave=False):
        x = alpha_bar ** 0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise[start:start + batch_size]
        try:
            sampler.predict_noise(sd.unet, x, t, context, capture, step=0)
        except FeatureCapture.Done:
            pass
    return capture.total / samples


def squared_distances(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """||x_n - c_rj||^2 for points x (N, D) and R sets of centers (R, k, D) -> (R, N, k)."""
    cross = torch.matmul(x, centers.transpose(1, 2))  # (R, N, k)
    return (x.pow(2).sum(1)[None, :, None] - 2 * cross + centers.pow(2).sum(2)[:, None, :]).clamp_min(0)


def kmeans_plus_plus(x: torch.Tensor, k: int, restarts: int, generator=None) -> torch.Tensor:
    """Greedy k-means++ seeding (scikit-learn's) for `restarts` independent runs at once: (R, k, D).

    The first center is a uniformly drawn point. For each next one, 2 + ln(k) candidates are drawn
    with probability proportional to their squared distance to the nearest center so far, and the
    one that lowers the total squared distance most is kept. Random numbers come from the (CPU)
    generator, so the result is the same on every device.
    """
    n, trials = len(x), 2 + int(math.log(k))
    chosen = torch.randint(n, (restarts,), generator=generator).to(x.device)
    centers = x[chosen][:, None]  # (R, 1, D)
    nearest = squared_distances(x, centers)[..., 0]  # (R, N)
    for _ in range(1, k):
        cumulative = nearest.cpu().double().cumsum(1)  # (R, N), small; fp64 on the CPU (mps has none)
        u = torch.rand(restarts, trials, generator=generator, dtype=torch.float64)
        candidates = torch.searchsorted(cumulative, u * cumulative[:, -1:], right=True).clamp_max(n - 1)
        candidates = candidates.to(x.device)  # (R, L)
        if_chosen = torch.minimum(nearest[:, :, None], squared_distances(x, x[candidates]))  # (R, N, L)
        best = if_chosen.sum(1).argmin(1)  # (R,)
        runs = torch.arange(restarts, device=x.device)
        centers = torch.cat([centers, x[candidates[runs, best]][:, None]], dim=1)
        nearest = if_chosen[runs, :, best]
    return centers


def kmeans(x: torch.Tensor, k: int, *, n_init: int = 100, iters: int = 300, tol: float = 1e-4,
           generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means (Euclidean, raw features), greedy k-means++ seeding -> (labels (N,), centers (k', D)).

    All `n_init` restarts run together as one batched computation, on x's device; the restart of
    lowest inertia is returned. A cluster that empties is re-seeded at the point farthest from its
    center. With fewer distinct points than k, k' is that number; otherwise k' = k. A run stops
    when the centers move less than tol x the mean feature variance (scikit-learn's rule).
    """
    x = x.float()
    k = min(k, len(torch.unique(x.cpu(), dim=0)))  # (unique over rows is CPU/CUDA only)
    centers = kmeans_plus_plus(x, k, n_init, generator)
    threshold = tol * x.var(0).mean()
    for _ in range(iters):
        distances = squared_distances(x, centers)  # (R, N, k)
        labels = distances.argmin(2)  # (R, N)
        moved = cluster_means(x, labels, k, distances.gather(2, labels[..., None])[..., 0])
        shift = (moved - centers).pow(2).sum((1, 2)).max()
        centers = moved
        if shift <= threshold:
            break
    distances = squared_distances(x, centers)
    inertia, labels = distances.min(2)  # (R, N) each
    best = inertia.sum(1).argmin()
    return labels[best], centers[best]


def cluster_means(x, labels, k, own_distances) -> torch.Tensor:
    """The mean of each cluster (R, k, D) for labels (R, N). An empty cluster is re-seeded at the
    point of its run farthest from its own center (`own_distances`, (R, N))."""
    one_hot = F.one_hot(labels, k).to(x.dtype)  # (R, N, k)
    counts = one_hot.sum(1)  # (R, k)
    means = one_hot.transpose(1, 2) @ x / counts.clamp_min(1)[..., None]
    for run in torch.nonzero((counts == 0).any(1)).flatten().tolist():  # rare: a loop is fine
        empty = torch.nonzero(counts[run] == 0).flatten()
        means[run, empty] = x[own_distances[run].topk(len(empty)).indices]
    return means


def low_resolution_masks(labels: torch.Tensor, grid: tuple[int, int], k: int) -> torch.Tensor:
    """Cluster labels (h*w,) -> one boolean mask per cluster (k, h, w): the paper's M_i."""
    return labels.reshape(grid)[None] == torch.arange(k, device=labels.device)[:, None, None]


# ---- Step 2: edit-friendly DDPM inversion (Sec. 3.3) ----

@dataclass
class Inversion:
    """What the modulated runs share: the start x_{t_m}, the noise maps, the prompt, the attention."""
    timesteps: list[int]  # t_m down to 1 on the grid: 281, 261, ..., 1 for the defaults
    x_start: torch.Tensor  # (1, 4, h, w)
    zs: torch.Tensor  # (len(timesteps), 1, 4, h, w)
    context: torch.Tensor  # (1, 77, 768), the prompt's embedding (the empty prompt's by default)
    record: sampler.AttentionRecord | None  # every attention layer at every step, on the device


def invert(sd, x0, *, t_m: int = 281, steps: int = 50, generator=None, prompt: str = "",
           record_attention: bool = True, batch_size: int = 8, replay_cross_attention: bool = True,
           progress: bool = False) -> Inversion:
    """Invert x0 from t_m down to 1 on the `steps`-step grid, recording the attention on the way.

    The inversion's UNet inputs are those of the unmodulated regeneration, so the record taken
    here is what attention injection replays: no separate recording pass. Its UNet calls are
    independent of each other: `batch_size` steps run in one call (1: one step per call). The
    record keeps the queries and keys of the self-attention layers and the outputs of the
    cross-attention layers, which the modulated runs replay whole (`replay_cross_attention=False`:
    their queries and keys, as for the others). Without injection the record (about 1 GB at 512x512
    in fp16) need not be kept: `record_attention=False`.
    """
    context = embed_prompt(sd, prompt)
    record = sampler.AttentionRecord(cross_outputs=replay_cross_attention) if record_attention else None
    timesteps, x_start, zs = sampler.invert(
        sd.unet, x0, context, steps=steps, until=t_m, generator=generator, hooks=record, batch_size=batch_size,
        progress=lambda calls: tqdm(calls, desc="inversion", disable=not progress, leave=False))
    return Inversion(timesteps, x_start, zs, context, record)


# ---- Step 3: modulated denoising (Sec. 3.3) ----

def modulation_offsets(masks: torch.Tensor, lam: float) -> torch.Tensor:
    """The offsets c M_i of all 2K runs, (2K, h*w): run 2i adds -lambda on mask i, run 2i+1 +lambda."""
    flat = masks.flatten(1).float()  # (K, h*w)
    return torch.stack([-lam * flat, lam * flat], dim=1).flatten(0, 1)


@torch.no_grad()
def modulated_latents(sd, inversion: Inversion, offsets: torch.Tensor, *, injection: bool = True,
                      batch_size: int = 8, skip_projections: bool = True, share_probabilities: bool | None = None,
                      progress: bool = False) -> torch.Tensor:
    """Regenerate from x_{t_m} once per row of offsets, `batch_size` runs per UNet batch -> (R, 4, h, w).

    At t_m the modulated layer's output becomes f(softmax(QK^T/sqrt(d)) V) + c M; with injection,
    every attention layer at every step takes the recorded Q and K of the unmodulated pass. What
    injection makes the same in every run is not computed again (sampler.Modulation):
    `skip_projections` and `share_probabilities` turn those savings off for comparison.
    """
    if injection and inversion.record is None:
        raise ValueError("attention injection needs the inversion's attention record: invert(record_attention=True)")
    replay = inversion.record if injection else None
    _, dtype = model_device_dtype(sd)
    batches = offsets.to(dtype).split(batch_size)  # the offsets in the model's dtype once, not at every step
    savings = dict(skip_projections=skip_projections, share_probabilities=share_probabilities)
    latents = []
    with tqdm(total=len(batches) * len(inversion.timesteps), desc="modulated runs", unit="step",
              disable=not progress, leave=False) as bar:
        for batch in batches:
            latents.append(sampler.regenerate(sd.unet, inversion.x_start, inversion.zs, inversion.timesteps,
                                              inversion.context, hooks=sampler.Modulation(batch, replay, **savings),
                                              progress=lambda steps: ticking(steps, bar)))
    return torch.cat(latents)


def ticking(items, bar):
    """`items`, advancing the progress bar by one as each is taken."""
    for item in items:
        yield item
        bar.update()


# ---- Step 4: difference maps and labels (Sec. 3.3) ----

def gaussian_blur(images: torch.Tensor, kernel_size: int = 3, sigma: float = 0.8) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding (as torchvision's, which the
    notebook uses; its default sigma for kernel 3 is 0.8)."""
    offsets = torch.arange(kernel_size, dtype=images.dtype, device=images.device) - (kernel_size - 1) / 2
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels, pad = images.shape[1], kernel_size // 2
    x = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernel.reshape(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.reshape(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


@torch.no_grad()
def difference_maps(sd, inversion: Inversion, masks: torch.Tensor, *, lam: float = 10.0, injection: bool = True,
                    batch_size: int = 8, decode_batch_size: int | None = None, blur=(3, 0.8),
                    progress: bool = False) -> torch.Tensor:
    """d_i = || blur(I-_i - I+_i) ||_2 over RGB for each mask (K, h, w) -> (K, H, W) in fp32.

    All 2K runs go through the UNet in batches of `batch_size` runs, then the VAE decoder in
    batches of `decode_batch_size` images (default: batch_size), each rounded down to whole +-
    pairs, at least one pair. The blur is linear, so blurring the difference is blurring both images.
    """
    def whole_pairs(size):
        return 2 * max(1, size // 2)
    latents = modulated_latents(sd, inversion, modulation_offsets(masks, lam), injection=injection,
                                batch_size=whole_pairs(batch_size), progress=progress)
    _, dtype = model_device_dtype(sd)
    maps = []
    for batch in tqdm(latents.split(whole_pairs(decode_batch_size or batch_size)), desc="decoding",
                      disable=not progress, leave=False):
        images = sd.vae.decode(batch.to(dtype)).float()  # (2m, 3, H, W): I-, I+, I-, I+, ...
        maps.append(gaussian_blur(images[0::2] - images[1::2], *blur).norm(dim=1))
    return torch.cat(maps)


def assign_labels(maps: torch.Tensor) -> torch.Tensor:
    """Label(x, y) = argmax_i d_i(x, y): each pixel joins the mask that moved it most. (H, W)."""
    return maps.argmax(0)


# ---- Speed: batch sizes, memory layout, compilation (none of it changes a number) ----

CPU_BATCH_SIZE = 8  # batch_size "auto" off CUDA: UNet runs and decodes per call
MEMORY_HEADROOM = 0.8  # of the free CUDA memory, what the automatic batch sizes may fill


def batch_sizes(sd, height: int, width: int, o: dict) -> tuple[int, int]:
    """(UNet images per call, decodes per call) for a height x width image with options `o`: its
    batch_size an int (both), such a pair, or "auto".

    "auto" on CUDA fills the memory free at the start (see auto_batch_sizes: probes at the image's
    latent shape, for its 2K runs of the steps from t_m); elsewhere it is CPU_BATCH_SIZE."""
    if o["batch_size"] != "auto":
        return (o["batch_size"],) * 2 if is_int(o["batch_size"]) else tuple(o["batch_size"])
    device, _ = model_device_dtype(sd)
    if device.type != "cuda":
        return CPU_BATCH_SIZE, CPU_BATCH_SIZE
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
    context, t = embed_prompt(sd), torch.tensor([1], device=device)
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


COMPILED_SHAPES = 256  # block shapes x batch sizes that torch.compile may specialise for


def prepare_models(sd, compile: bool = False) -> None:
    """The memory layout where convolutions run faster: channels_last for the VAE decoder on the CPU
    and on CUDA, for the UNet on CUDA (on the CPU its small maps run faster as they are; bench.py
    measured both; the encoder, run once, keeps the layout the UNet expects).

    `compile`: torch.compile the UNet's blocks without hooks (resnets and feed-forwards) and the VAE
    decoder, once per model; shapes are static, so each batch size compiles on its first call
    (minutes; whether it pays off is for `python bench.py compile` to measure). In place; idempotent."""
    device, _ = model_device_dtype(sd)
    if device.type in ("cpu", "cuda"):
        for module in (sd.vae.post_quant_conv, sd.vae.decoder):
            module.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        sd.unet.to(memory_format=torch.channels_last)
    if compile and not getattr(sd.unet, "compiled", False):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_SHAPES)
        for module in [*sd.unet.modules(), sd.vae.decoder]:
            if isinstance(module, (ResnetBlock2D, FeedForward)) or module is sd.vae.decoder:
                module.compile(dynamic=False)
        sd.unet.compiled = True


# ---- The whole method ----

@dataclass
class Segmentation:
    labels: np.ndarray  # (H0, W0) uint8 at the input image's own size
    low_res_labels: np.ndarray  # (h, w) uint8 on the feature grid (working size / 32)
    difference_maps: torch.Tensor  # (K, H, W) at the working size
    options: dict
    seconds: dict = field(default_factory=dict)  # per stage


DEFAULTS = dict(masks=25, lam=10.0, t_m=281, t_f=1, feature_samples=100, kmeans_restarts=100, seed=42,
                size="auto", injection=True, batch_size="auto", steps=50, prompt="", blur=(3, 0.8), compile=False)


def segment(image, sd=None, *, progress: bool = False, **options) -> Segmentation:
    """EmerDiff on one image (a path, a PIL image, a numpy array or a tensor: see as_image). `sd` is a
    loaded model (weights.load_stable_diffusion); without one the default weights are loaded on the
    best device. Options and their defaults: DEFAULTS; each is checked before any work is done."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    o = DEFAULTS | options
    check_options(o)
    pixels, (width, height) = load_image(image, o["size"])
    if sd is None:
        from weights import load_stable_diffusion
        device = pick_device("auto")
        sd = load_stable_diffusion(device=device, dtype=pick_dtype("auto", device))
    prepare_models(sd)  # the memory layout, which the memory probes of batch_sizes measure uncompiled
    device, _ = model_device_dtype(sd)
    seconds, clock = {}, time.perf_counter()

    def lap(stage):
        nonlocal clock
        synchronize(device)
        seconds[stage], clock = time.perf_counter() - clock, time.perf_counter()

    def generator():  # every stage draws from its own generator seeded alike, as the notebook does
        return torch.Generator().manual_seed(o["seed"])

    grid = (pixels.shape[-2] // GRID_FACTOR, pixels.shape[-1] // GRID_FACTOR)
    if o["masks"] > grid[0] * grid[1]:
        raise EmerDiffError(f"{o['masks']} masks but only {grid[0] * grid[1]} cells in the {grid[1]}x{grid[0]} "
                            "feature grid: lower --masks or raise --size")
    batch, decode_batch = batch_sizes(sd, *pixels.shape[-2:], o)
    prepare_models(sd, o["compile"])  # compiled after the probes: they would compile shapes of their own
    x0 = encode(sd, pixels)  # after the probes of "auto" on CUDA, which reset the peak-memory count
    features = extract_features(sd, x0, t_f=o["t_f"], samples=o["feature_samples"], generator=generator(),
                                batch_size=batch, prompt=o["prompt"], progress=progress)
    check_finite(features, "features")
    lap("features")
    low_res, centers = kmeans(features, o["masks"], n_init=o["kmeans_restarts"], generator=generator())
    masks = low_resolution_masks(low_res, grid, len(centers))
    lap("k-means")
    inversion = invert(sd, x0, t_m=o["t_m"], steps=o["steps"], generator=generator(), prompt=o["prompt"],
                       record_attention=o["injection"], batch_size=batch, progress=progress)
    lap("inversion")
    maps = difference_maps(sd, inversion, masks, lam=o["lam"], injection=o["injection"],
                           batch_size=batch, decode_batch_size=decode_batch, blur=o["blur"], progress=progress)
    check_finite(maps, "difference maps")
    lap("modulation")
    labels = F.interpolate(assign_labels(maps)[None, None].float(), size=(height, width), mode="nearest-exact")
    return Segmentation(labels=labels[0, 0].to(torch.uint8).cpu().numpy(),
                        low_res_labels=low_res.reshape(grid).to(torch.uint8).cpu().numpy(),
                        difference_maps=maps.cpu(), options=o, seconds=seconds)


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_pair(value, first, second) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and first(value[0]) and second(value[1])


# What each option must be: (check, the words for it).
OPTION_TYPES = {
    "masks": (is_int, "an integer"), "lam": (is_real, "a finite number"), "t_m": (is_int, "an integer"),
    "t_f": (is_int, "an integer"), "feature_samples": (is_int, "an integer"),
    "kmeans_restarts": (is_int, "an integer"), "seed": (is_int, "an integer"),
    "size": (lambda v: v == "auto" if isinstance(v, str) else is_int(v) or is_pair(v, is_int, is_int),
             '"auto", an integer or (width, height)'),
    "injection": (lambda v: isinstance(v, bool), "True or False"),
    "batch_size": (lambda v: v == "auto" if isinstance(v, str) else is_int(v) or is_pair(v, is_int, is_int),
                   '"auto", an integer or (UNet runs, decodes) per call'),
    "compile": (lambda v: isinstance(v, bool), "True or False"),
    "steps": (is_int, "an integer"), "prompt": (lambda v: isinstance(v, str), "a string"),
    "blur": (lambda v: is_pair(v, is_int, is_real), "(kernel size, sigma)"),
}
MAX_BLUR_KERNEL = 63  # the reflect padding needs it below the smallest working side (64)


def check_options(o: dict):
    """One-line errors for options of the wrong type or out of range, before any work is done."""
    for name, (ok, kind) in OPTION_TYPES.items():
        if not ok(o[name]):
            raise EmerDiffError(f"option {name} must be {kind}, not {o[name]!r:.40}")
    if not 2 <= o["steps"] <= sampler.TRAIN_STEPS:
        raise EmerDiffError(f"steps must be between 2 and {sampler.TRAIN_STEPS}")
    grid = sampler.timestep_grid(o["steps"])
    kernel, sigma = o["blur"]
    checks = [(1 <= o["masks"] <= MAX_MASKS, f"masks must be between 1 and {MAX_MASKS}"),
              (o["lam"] > 0, "lambda (lam) must be above 0: it is the strength of the modulation"),
              (o["t_m"] in grid,
               f"t_m = {o['t_m']} is not on the {o['steps']}-step grid ({grid[-1]}, {grid[-2]}, ...)"),
              (0 <= o["t_f"] < sampler.TRAIN_STEPS, f"t_f must be a timestep in 0..{sampler.TRAIN_STEPS - 1}"),
              (o["feature_samples"] >= 1, "feature samples must be at least 1"),
              (o["kmeans_restarts"] >= 1, "k-means restarts must be at least 1"),
              (0 <= o["seed"] < 2 ** 63, "seed must be between 0 and 2^63 - 1"),
              (o["batch_size"] == "auto" or min(np.ravel(o["batch_size"])) >= 1, "batch size must be at least 1"),
              (1 <= kernel <= MAX_BLUR_KERNEL and kernel % 2 == 1,
               f"the blur kernel size must be odd, from 1 to {MAX_BLUR_KERNEL}"),
              (sigma > 0, "the blur sigma must be above 0")]
    for ok, message in checks:
        if not ok:
            raise EmerDiffError(message)
    if o["size"] != "auto":
        check_size((o["size"], o["size"]) if is_int(o["size"]) else tuple(o["size"]))


def check_finite(values: torch.Tensor, what: str):
    """Stop with one line when NaN or inf came out of the model (NaN weights, or a float16 overflow)."""
    if not torch.isfinite(values).all():
        raise EmerDiffError(f"the {what} hold NaN or inf: the weights may hold NaN, or float16 overflowed; "
                            "try float32 (--dtype float32)")


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


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": fp16 on a GPU (SD v1.5's usual precision), fp32 on the CPU."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# ---- Reading images (Step 0's helpers) ----

def open_image(path, decode: bool = True) -> Image.Image:
    """The image at `path`, decoded (or only its header read: decode=False), or a one-line error.
    Pillow's warnings (corrupt EXIF, large images) are not shown: a problem is an error or nothing."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
            raise EmerDiffError(f"{path}: not a regular file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(path)
            if decode:
                image.load()
    except FileNotFoundError:
        raise EmerDiffError(f"{path}: no such file") from None
    except PermissionError:
        raise EmerDiffError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise EmerDiffError(f"{path}: not an image that Pillow can read") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise EmerDiffError(f"{path}: cannot decode the image ({e})") from None
    return image


def to_rgb(image: Image.Image, exif_rotation: bool = True) -> Image.Image:
    """RGB of any Pillow mode: EXIF rotation applied (unless the pixels must stay as stored, e.g. to
    align with a dataset's label maps), alpha composited on white, 16-bit scaled."""
    if exif_rotation:
        with warnings.catch_warnings():  # a malformed EXIF tag is ignored, as Pillow then does
            warnings.simplefilter("ignore")
            image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        scale = 1 / 257 if image.mode != "F" else 255
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) * scale, 0, 255).astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def working_size(width: int, height: int, size="auto") -> tuple[int, int]:
    """(W, H) to run a width x height image at: multiples of 64; "auto" keeps the aspect ratio at an
    area of about 512^2. Images under 64 px a side are refused."""
    if min(width, height) < SIZE_MULTIPLE:
        raise EmerDiffError(f"the image is {width}x{height}: at least {SIZE_MULTIPLE} px per side is needed")
    if size == "auto":
        scale = math.sqrt(512 * 512 / (width * height))
        auto = tuple(max(SIZE_MULTIPLE, -(-int(side * scale) // SIZE_MULTIPLE) * SIZE_MULTIPLE)
                     for side in (width, height))
        if max(auto) > MAX_SIDE:
            raise EmerDiffError(f"the image is {width}x{height}: too elongated for the automatic size; "
                                "crop it or give --size")
        return auto
    return check_size((size, size) if isinstance(size, int) else tuple(size))


def check_size(size: tuple[int, int]) -> tuple[int, int]:
    if any(side % SIZE_MULTIPLE or not SIZE_MULTIPLE <= side <= MAX_SIDE for side in size):
        raise EmerDiffError(f"size {size[0]}x{size[1]}: each side must be a multiple of {SIZE_MULTIPLE} "
                            f"between {SIZE_MULTIPLE} and {MAX_SIDE}")
    return size


if __name__ == "__main__":
    import runner
    sys.exit(runner.main())
