"""EmerDiff: pixel-level semantic segmentation read out of Stable Diffusion, without training.

Namekata, Sabour, Fidler, Kim, "EmerDiff: Emerging Pixel-level Semantic Knowledge in Diffusion Models", ICLR 2024 (arXiv
2401.11739). Read top to bottom, this file is the method, one function per step of the paper's Sec. 3, in its order:

  Step 0  load_image, encode,             the image into SD's latent space, and the prompt's
          embed_prompt                    CLIP embedding (the empty prompt) that conditions the UNet
  Step 1  extract_features, kmeans,       low-resolution masks: k-means on the query features of
          low_resolution_masks,           the first cross-attention of the 16x16 up block (Sec. 3.2),
          mask_embeddings                 and each mask's mean feature, its embedding (Table 2)
  Step 2  invert                          edit-friendly DDPM inversion, attention recorded (Sec. 3.3)
  Step 3  modulation_offsets,             denoise again with -lambda and +lambda added on each mask
          modulated_latents               at t_m (Sec. 3.3)
  Step 4  difference_maps, decoded_maps,  ||blur(I-) - blur(I+)|| per mask, from the runs' latents;
          assign_labels                   argmax over masks (Sec. 3.3)
          upsampled_masks                 the paper's baseline instead of Steps 2-4: bilinear up-sampling
          segment                         all of it, on one image

Defaults are the paper's (Sec. 4.1) and, where it is silent, the authors' example notebook:
K = 25 masks, lambda = 10, t_m = 281, t_f = 1, 100 feature draws, 50-step grid, seed 42.
Every random draw comes from a CPU torch.Generator, so a seed gives the same draws on any device.

What is not the method lives beside it: sampler.py (the DDPM schedule, the inversion and the hooks that record, replay
and modulate the attention), unet.py / vae.py / clip_text.py (the networks), weights.py (loading them), inputs.py (what
segment() accepts), devices.py (device, precision, speed settings, progress), vocabulary.py (the segments named by
MaskCLIP, the paper's Sec. 4.3) and runner.py, the command line that `python emerdiff.py` runs.
"""
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import devices
import sampler
from devices import progress_bar, ticking
from inputs import EmerDiffError  # noqa: F401 (re-exported: emerdiff.EmerDiffError, the API's error type)
from inputs import as_image, check_tensors, checked_options, feature_grid, working_size
from unet import FEATURE_LAYER, AttentionHooks

# ---- Step 0: the image in SD's latent space ----

def load_image(image, size="auto") -> tuple[torch.Tensor, tuple[int, int]]:
    """Image -> ((1, 3, H, W) in [-1, 1], the input's own (width, height)).

    `image` is anything `as_image` takes. The working size H, W is a multiple of 64: by default of area about 512x512
    with the input's aspect ratio (the notebook's rule); `size` may also be an int (square) or (width, height). Images
    are resized with Lanczos as the notebook does; float tensors (no Lanczos in torch) with antialiased bicubic.
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


@torch.no_grad()
def encode(sd, image: torch.Tensor) -> torch.Tensor:
    """x0 = VAE encoder mean x 0.18215, (1, 4, H/8, W/8) in fp32."""
    device, dtype = devices.model_device_dtype(sd)
    return sd.vae.encode(image.to(device, dtype)).float()


@torch.no_grad()
def embed_prompt(sd, prompt: str = "") -> torch.Tensor:
    """The CLIP embedding (1, 77, 768) of `prompt`; EmerDiff uses the empty prompt everywhere."""
    device, _ = devices.model_device_dtype(sd)
    return sd.text_encoder(sd.tokenizer(prompt).to(device))


# ---- Step 1: low-resolution masks (Sec. 3.2) ----

class FeatureCapture(AttentionHooks):
    """Adds up the feature layer's queries over a batch, then stops the UNet by raising `Done`:
    nothing after that layer is needed, so well under half of the UNet runs."""

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
                     prompt: str = "") -> torch.Tensor:
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
    for start in progress_bar(range(0, samples, batch_size), desc="features"):
        x = alpha_bar ** 0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise[start:start + batch_size]
        try:
            sampler.predict_noise(sd.unet, x, t, context, capture, step=0)
        except FeatureCapture.Done:
            pass
    return capture.total / samples


def squared_distances(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """||x_n - c_rj||^2 for points x (N, D) and R sets of centers (R, k, D) -> (R, N, k)."""
    check_tensors("squared_distances", x=(x, "(N, D)"), centers=(centers, "(R, k, D)"))
    cross = torch.matmul(x, centers.transpose(1, 2))  # (R, N, k)
    return (x.pow(2).sum(1)[None, :, None] - 2 * cross + centers.pow(2).sum(2)[:, None, :]).clamp_min(0)


def kmeans_plus_plus(x: torch.Tensor, k: int, restarts: int, generator=None) -> torch.Tensor:
    """Greedy k-means++ seeding (scikit-learn's) for `restarts` independent runs at once: (R, k, D).

    The first center is a uniformly drawn point. For each next one, 2 + ln(k) candidates are drawn with probability
    proportional to their squared distance to the nearest center so far, and the one that lowers the total squared
    distance most is kept. Random numbers come from the (CPU) generator, so the result is the same on every device.
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

    All `n_init` restarts run as one batched computation on x's device; the one of lowest inertia is returned. A
    cluster that empties is re-seeded at the point farthest from its center. k' is k, or the number of distinct points
    where there are fewer. A run stops when the centers move less than tol x the mean feature variance (sklearn's rule).
    """
    check_tensors("kmeans", x=(x, "(N, D)"))
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
    check_tensors("low_resolution_masks", h=grid[0], w=grid[1], labels=(labels, "(h*w,)"))
    return labels.reshape(grid)[None] == torch.arange(k, device=labels.device)[:, None, None]


def mask_embeddings(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Each mask's embedding (K, C): the mean feature vector over its cells (its k-means centre, once
    k-means has converged). The paper's evaluation describes a mask by it to give it a class (its
    Table 2; evaluate.py's concept and clusters protocols). An empty mask's row is zero."""
    check_tensors("mask_embeddings", masks=(masks, "(K, h, w)"), features=(features, "(h*w, C)"))
    flat = masks.flatten(1).float()  # (K, h*w)
    return flat @ features.float() / flat.sum(1, keepdim=True).clamp_min(1)


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
           record_attention: bool = True, batch_size: int = 8, replay_cross_attention: bool = True) -> Inversion:
    """Invert x0 from t_m down to 1 on the `steps`-step grid, recording the attention on the way.

    The inversion's UNet inputs are those of the unmodulated regeneration, so the record taken here is what attention
    injection replays: no separate recording pass. Its UNet calls are independent of each other: `batch_size` steps
    run in one call (1: one step per call). The record keeps the queries and keys of the self-attention layers and the
    outputs of the cross-attention layers, which the modulated runs replay whole (`replay_cross_attention=False`:
    their queries and keys, as for the others). Without injection the record (all layers' q and k at every step: the
    largest thing kept) need not be kept: `record_attention=False`.
    """
    context = embed_prompt(sd, prompt)
    record = sampler.AttentionRecord(cross_outputs=replay_cross_attention) if record_attention else None
    timesteps, x_start, zs = sampler.invert(
        sd.unet, x0, context, steps=steps, until=t_m, generator=generator, hooks=record, batch_size=batch_size,
        progress=lambda calls: progress_bar(calls, desc="inversion"))
    return Inversion(timesteps, x_start, zs, context, record)


# ---- Step 3: modulated denoising (Sec. 3.3) ----

def modulation_offsets(masks: torch.Tensor, lam: float) -> torch.Tensor:
    """The offsets c M_i of all 2K runs, (2K, h*w): run 2i adds -lambda on mask i, run 2i+1 +lambda."""
    check_tensors("modulation_offsets", masks=(masks, "(K, h, w)"))
    flat = masks.flatten(1).float()  # (K, h*w)
    return torch.stack([-lam * flat, lam * flat], dim=1).flatten(0, 1)


@torch.no_grad()
def modulated_latents(sd, inversion: Inversion, offsets: torch.Tensor, *, injection: bool = True,
                      batch_size: int = 8) -> torch.Tensor:
    """Regenerate from x_{t_m} once per row of offsets, at most `batch_size` runs per UNet call -> (R, 4, h, w).

    At t_m the modulated layer's output becomes f(softmax(QK^T/sqrt(d)) V) + c M, the paper's modulation (added in
    sampler.Modulation.out); with injection, every attention layer at every step takes the recorded Q and K of the
    unmodulated pass. What injection makes the same in every run is not computed again (sampler.Modulation).
    """
    if injection and inversion.record is None:
        raise ValueError("attention injection needs the inversion's attention record: invert(record_attention=True)")
    devices.hand_back_freed_memory()  # the blocks freed before (the inversion's: one call of its steps) fit no run's
    replay = inversion.record if injection else None
    _, dtype = devices.model_device_dtype(sd)
    # The offsets in the model's dtype once, not at every step; the runs spread evenly over the calls (50
    # runs in batches of at most 16: 13, 13, 12, 12, not 16, 16, 16, 2: a small batch shares less).
    batches = offsets.to(dtype).tensor_split(math.ceil(len(offsets) / batch_size))
    latents = []
    with progress_bar(total=len(batches) * len(inversion.timesteps), desc="modulated runs", unit="step") as bar:
        for batch in batches:
            hooks = sampler.Modulation(batch, replay)
            latents.append(sampler.regenerate(sd.unet, inversion.x_start, inversion.zs, inversion.timesteps,
                                              inversion.context, hooks=hooks, progress=lambda steps: ticking(steps, bar)))
    return torch.cat(latents)


# ---- Step 4: difference maps and labels (Sec. 3.3) ----

def gaussian_blur(images: torch.Tensor, kernel_size: int = 3, sigma: float = 0.8) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding (as torchvision's, which the
    notebook uses; its default sigma for kernel 3 is 0.8)."""
    check_tensors("gaussian_blur", images=(images, "(B, C, H, W)"))
    offsets = torch.arange(kernel_size, dtype=images.dtype, device=images.device) - (kernel_size - 1) / 2
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels, pad = images.shape[1], kernel_size // 2
    x = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernel.reshape(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.reshape(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


@torch.no_grad()
def difference_maps(sd, inversion: Inversion, masks: torch.Tensor, *, lam: float = 10.0, injection: bool = True,
                    batch_size: int = 8, decode_batch_size: int | None = None, blur=(3, 0.8)) -> torch.Tensor:
    """d_i = || blur(I-_i) - blur(I+_i) ||_2 over RGB for each mask (K, h, w) -> (K, H, W) in fp32: all 2K runs
    through the UNet, `batch_size` runs a call, then decoded_maps, `decode_batch_size` images a call (default:
    batch_size; whole +- pairs, or one image)."""
    latents = modulated_latents(sd, inversion, modulation_offsets(masks, lam), injection=injection, batch_size=batch_size)
    return decoded_maps(sd, latents, decode_batch_size or batch_size, blur)


@torch.no_grad()
def decoded_maps(sd, latents: torch.Tensor, per_call: int, blur=(3, 0.8)) -> torch.Tensor:
    """The runs' latents (I-_1, I+_1, I-_2, ...) decoded, `per_call` images a call, into the maps d_i (K, H, W). The blur
    comes before the norm, as in the authors' notebook (it blurs both images, then takes the norm of their difference);
    the blur is linear, so the difference is blurred once. (After the norm, not linear, it would give other maps.)"""
    devices.hand_back_freed_memory()  # the decoder's blocks are of other sizes than the UNet's: docs/speed.md
    (_, dtype), maps = devices.model_device_dtype(sd), []
    for pairs in progress_bar(latents.split(2 * max(1, per_call // 2)), desc="decoding"):  # I-_i, I+_i, I-_j, ...
        images = torch.cat([sd.vae.decode(x.to(dtype)) for x in pairs.split(per_call)]).float()
        maps.append(gaussian_blur(images[0::2] - images[1::2], *blur).norm(dim=1))  # (m, H, W)
    return torch.cat(maps)


def assign_labels(maps: torch.Tensor) -> torch.Tensor:
    """Label(x, y) = argmax_i d_i(x, y): each pixel joins the mask that moved it most. (H, W)."""
    check_tensors("assign_labels", maps=(maps, "(K, H, W)"))
    return maps.argmax(0)


def upsampled_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The paper's baseline ("SD" in Table 2), instead of Steps 2-4: the low-resolution masks (K, h, w),
    one-hot, up-sampled bilinearly to the working size (H, W) (align_corners=False) -> (K, H, W),
    which assign_labels turns into labels as it does the difference maps. Costs the feature pass only."""
    check_tensors("upsampled_masks", masks=(masks, "(K, h, w)"))
    return F.interpolate(masks[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]


def at_input_size(labels: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Labels (H, W) at the working size -> uint8 (height, width) at the input's own `size` = (width,
    height), nearest neighbour (Step 0 resized the input; this undoes it)."""
    check_tensors("at_input_size", labels=(labels, "(H, W)"))
    resized = F.interpolate(labels[None, None].float(), size=size[::-1], mode="nearest-exact")
    return resized[0, 0].to(torch.uint8).cpu().numpy()


# ---- The whole method ----

@dataclass
class Segmentation:
    labels: np.ndarray  # (H0, W0) uint8 at the input image's own size
    low_res_labels: np.ndarray  # (h, w) uint8 on the feature grid (working size / 32)
    difference_maps: torch.Tensor  # (K, H, W) at the working size (the up-sampled masks with upsample="bilinear")
    embeddings: np.ndarray  # (K, C) float32: mask i's embedding, the mean feature over its cells
    options: dict
    seconds: dict = field(default_factory=dict)  # per stage


DEFAULTS = dict(masks=25, lam=10.0, t_m=281, t_f=1, feature_samples=100, kmeans_restarts=100, seed=42,
                size="auto", injection=True, steps=50, prompt="", blur=(3, 0.8),
                upsample="modulation",  # "bilinear": the paper's baseline instead of Steps 2-4
                speed=devices.SPEED)  # how the work is laid out (batch sizes, compilation, plain models): devices.py


def segment(image, sd=None, *, progress: bool = False, **options) -> Segmentation:
    """EmerDiff on one image (a path, a PIL image, a numpy array or a tensor: see inputs.as_image). `sd` is a loaded
    model (weights.load_stable_diffusion); without one the default weights are loaded on the best device. Options and
    their defaults: DEFAULTS (`speed` a dict of some of devices.SPEED's keys); each is checked before any work is done.
    `progress`: a progress bar for each step (devices.showing_progress). The call runs under devices.speed_settings,
    which puts the model and the process back as they were when it returns (a compiled model stays compiled)."""
    o = checked_options(options, DEFAULTS)
    pixels, (width, height) = load_image(image, o["size"])
    grid = feature_grid(*pixels.shape[-2:])  # at least as many cells as masks: inputs.check_masks_fit
    sd = default_model() if sd is None else sd
    watch = devices.Stopwatch(devices.model_device_dtype(sd)[0])  # seconds per stage

    def generator():  # every stage draws from its own generator seeded alike, as the notebook does
        return torch.Generator().manual_seed(o["seed"])

    # The settings first: on CUDA their memory probes reset the peak-memory count.
    with devices.showing_progress(progress), devices.speed_settings(sd, *pixels.shape[-2:], o) as layout:
        x0 = encode(sd, pixels)
        features = extract_features(sd, x0, t_f=o["t_f"], samples=o["feature_samples"], generator=generator(),
                                    batch_size=layout.batch_size, prompt=o["prompt"])
        devices.check_finite(features, "features")
        watch.lap("features")
        low_res, centers = kmeans(features, o["masks"], n_init=o["kmeans_restarts"], generator=generator())
        masks = low_resolution_masks(low_res, grid, len(centers))
        embeddings = mask_embeddings(features, masks)
        watch.lap("k-means")
        if o["upsample"] == "bilinear":  # the paper's baseline: no inversion, no modulated runs
            maps = upsampled_masks(masks, pixels.shape[-2:])
        else:
            inversion = invert(sd, x0, t_m=o["t_m"], steps=o["steps"], generator=generator(), prompt=o["prompt"],
                               record_attention=o["injection"], batch_size=layout.batch_size,
                               replay_cross_attention=layout.replay_cross_attention)
            watch.lap("inversion")
            latents = modulated_latents(sd, inversion, modulation_offsets(masks, o["lam"]), injection=o["injection"],
                                        batch_size=layout.batch_size)
            del inversion  # difference_maps' two steps apart: the attention record (2.1 GB at 512x512) freed first
            maps = decoded_maps(sd, latents, layout.decode_batch_size, o["blur"])
            devices.check_finite(maps, "difference maps")
            watch.lap("modulation")
    return Segmentation(labels=at_input_size(assign_labels(maps), (width, height)),
                        low_res_labels=low_res.reshape(grid).to(torch.uint8).cpu().numpy(),
                        difference_maps=maps.cpu(), embeddings=embeddings.cpu().numpy(), options=o,
                        seconds=watch.seconds)


def default_model():
    """SD v1.5 from the hub (weights.md), on the best device in its usual precision there."""
    from weights import load_stable_diffusion
    device = devices.pick_device("auto")
    return load_stable_diffusion(device=device, dtype=devices.pick_dtype("auto", device))


if __name__ == "__main__":
    import runner
    sys.exit(runner.main())
