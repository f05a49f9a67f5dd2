"""SD v1's noise schedule, the edit-friendly DDPM inversion and the batched modulation sampler.

EmerDiff (Sec. 3.3 of the paper) regenerates the image from a noised latent many times, each time
with a small offset added to one attention layer at the first step, and compares the results. To
make the unmodulated regeneration reproduce the image exactly, the noise of every DDPM step is
taken from the edit-friendly DDPM inversion of Huberman-Spiegelglas et al. (CVPR 2024):
`invert` finds noise maps z_t such that the stochastic sampler `regenerate` walks back to x0.

All scheduler arithmetic is fp32 whatever the model's dtype; the UNet sees its own dtype.
"""
import math

import torch

from unet import MODULATED_LAYER, AttentionHooks, is_cross_attention

TRAIN_STEPS = 1000


def alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """alpha_bar_t for t = 0..999 of SD's "scaled linear" schedule: betas linear in sqrt space."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, TRAIN_STEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


ALPHAS_CUMPROD = alphas_cumprod()


def timestep_grid(steps: int = 50) -> list[int]:
    """The `steps`-step grid with "leading" spacing and offset 1, descending (50: 981, 961, ..., 1)."""
    ratio = TRAIN_STEPS // steps
    return [i * ratio + 1 for i in reversed(range(steps))]


def timesteps_until(until: int, steps: int = 50) -> list[int]:
    """The grid's timesteps from `until` (t_m) down to 1: the inversion's steps, and each modulated
    run's (281, 261, ..., 1: 15 for the defaults). A ValueError where `until` is not on the grid."""
    grid = timestep_grid(steps)
    if until not in grid:
        raise ValueError(f"t_m = {until} is not on the {steps}-step grid ({grid[-1]}, {grid[-2]}, ...)")
    return [t for t in grid if t <= until]


def alpha_bars(timesteps: list[int]) -> list[tuple[float, float]]:
    """(alpha_bar_t, alpha_bar_prev) for each step of a descending run of grid timesteps ending
    at t = 1. The previous timestep is the next one in the run; after t = 1 it is alphas_cumprod[0]
    (SD v1 does not set the final alpha_bar to one)."""
    ab = ALPHAS_CUMPROD
    return [(ab[t].item(), ab[t_prev].item()) for t, t_prev in zip(timesteps, [*timesteps[1:], 0])]


def denoising_steps(timesteps: list[int]) -> list[tuple[int, int, float, float]]:
    """(step index, t, alpha_bar_t, alpha_bar_prev) for each step of a run of grid timesteps."""
    return [(i, t, *bars) for i, (t, bars) in enumerate(zip(timesteps, alpha_bars(timesteps)))]


def ddpm_mean_and_std(x_t, eps, alpha_bar, alpha_bar_prev):
    """mu_t and sigma_t of the eta = 1 DDPM step x_{t-1} = mu_t + sigma_t z (DDIM's Eq. 12 form)."""
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
    x0_hat = (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5
    mu = alpha_bar_prev ** 0.5 * x0_hat + (1 - alpha_bar_prev - variance) ** 0.5 * eps
    return mu, variance ** 0.5


def predict_noise(unet, x, t, context, hooks, step):
    """One UNet call in the model's dtype; fp32 noise back. `t` is a tensor of timesteps on x's
    device, one for all samples or one per sample (made before the loop: an int would be copied to
    the device at every call). Sets `hooks.step = step` first: the hooks key what they record and
    replay by it."""
    if hooks is not None:
        hooks.step = step
    dtype = next(unet.parameters()).dtype
    return unet(x.to(dtype), t, context.to(dtype), hooks).float()


@torch.no_grad()
def invert(unet, x0, context, *, steps: int = 50, until: int = 281, generator=None, hooks=None, batch_size: int = 1,
           progress=iter):
    """Edit-friendly DDPM inversion of latent x0 (1, 4, h, w) from t = `until` down to 1:

        x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) n_t,   each n_t drawn independently
        z_t = (x_{t-1} - mu_t(x_t)) / sigma_t,                     so that mu_t(x_t) + sigma_t z_t = x_{t-1}

    Returns (timesteps, x_start, zs): the grid timesteps from `until` to 1, the latent x_until and
    the noise maps (len(timesteps), 1, 4, h, w). Only these steps call the UNet (15 for the defaults).
    Each step's UNet input is the previous step's mu + sigma z, bit-equal to the input the regeneration
    computes. `batch_size` > 1 makes the same z_t in batched calls (batched_noise_maps). `progress`
    wraps the loop over calls (e.g. tqdm).
    """
    timesteps = timesteps_until(until, steps)
    xs = drawn_latents(x0.float(), timesteps, generator)
    if batch_size > 1:
        return timesteps, xs[0], batched_noise_maps(unet, xs, timesteps, context, hooks, batch_size, progress)
    on_device = torch.tensor(timesteps, device=x0.device)
    x, zs = xs[0], []
    for i, t, ab, ab_prev in progress(denoising_steps(timesteps)):
        mu, sigma = ddpm_mean_and_std(x, predict_noise(unet, x, on_device[i:i + 1], context, hooks, i), ab, ab_prev)
        zs.append((xs[i + 1] - mu) / sigma)
        x = mu + sigma * zs[-1]  # x_{t-1} up to rounding, computed as the regeneration computes it
    return timesteps, xs[0], torch.stack(zs)


def drawn_latents(x0, timesteps: list[int], generator) -> list[torch.Tensor]:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) n_t for each of `timesteps`, then x0 itself
    (x_{t-1} after the last step, t = 1). The noise is drawn from t = 1 upwards, the order of the
    reference implementation (Huberman-Spiegelglas et al.'s code, which the authors' notebook
    reuses): a seed gives the same x_t as theirs."""
    device = generator.device if generator is not None else x0.device
    noises = {t: torch.randn(x0.shape, generator=generator, device=device).to(x0.device) for t in reversed(timesteps)}
    ab = ALPHAS_CUMPROD
    return [ab[t].item() ** 0.5 * x0 + (1 - ab[t].item()) ** 0.5 * noises[t] for t in timesteps] + [x0]


def batched_noise_maps(unet, xs, timesteps, context, hooks, batch_size: int, progress) -> torch.Tensor:
    """invert's z_t with its UNet calls `batch_size` steps at a time. Every x_t is drawn before any
    call, so the calls are independent of each other: each takes the drawn x_t (equal to the previous
    step's mu + sigma z up to rounding), one timestep per sample, and the hooks see `step` as the list
    of the call's step indices."""
    on_device = torch.tensor(timesteps, device=xs[0].device)
    schedule = denoising_steps(timesteps)
    zs = []
    for start in progress(range(0, len(schedule), batch_size)):
        chunk = schedule[start:start + batch_size]
        inputs = xs[start:start + len(chunk)]
        eps = predict_noise(unet, torch.cat(inputs), on_device[start:start + len(chunk)], context, hooks,
                            [i for i, *_ in chunk])
        for (i, t, ab, ab_prev), x_t, eps_t in zip(chunk, inputs, eps):
            mu, sigma = ddpm_mean_and_std(x_t, eps_t[None], ab, ab_prev)
            zs.append((xs[i + 1] - mu) / sigma)
    return torch.stack(zs)


@torch.no_grad()
def regenerate(unet, x_start, zs, timesteps, context, *, hooks=None, progress=iter):
    """The stochastic DDPM sampler with stored noise: x_{t-1} = mu_t(x_t) + sigma_t z_t.

    x_start may carry a batch of B runs, or hooks may create one (a per-run offset); all runs
    share zs (T, 1, 4, h, w) and context by broadcasting. Returns the final latents (B, 4, h, w).
    `progress` wraps the step loop.
    """
    x = x_start.float()
    on_device = torch.tensor(timesteps, device=x.device)
    for i, t, ab, ab_prev in progress(denoising_steps(timesteps)):
        mu, sigma = ddpm_mean_and_std(x, predict_noise(unet, x, on_device[i:i + 1], context, hooks, i), ab, ab_prev)
        x = mu + sigma * zs[i]
    return x


def per_sample(a: torch.Tensor, i: int) -> torch.Tensor:
    """Sample i of a batch, kept (1, ...); a tensor of batch 1 is shared by all samples."""
    return a[i:i + 1] if len(a) > 1 else a


class AttentionRecord(AttentionHooks):
    """What attention injection replays, recorded in the unmodulated pass at every step, on the
    model's device in its dtype.

    Self-attention layers: their queries and keys. Cross-attention layers: their whole output
    (`cross_outputs`, the default), since under injection it is the same in every modulated run:
    the query and key are replayed and the values come from the fixed prompt. The modulated runs
    then replay it and compute nothing in those layers. `cross_outputs=False` records their queries
    and keys instead (the plain path). One call may carry several steps (`step` a list): each
    sample is recorded under its own step.
    """

    def __init__(self, cross_outputs: bool = True):
        self.cross_outputs = cross_outputs
        self.qks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # each (1, tokens, C)
        self.outputs: dict[tuple[int, str], torch.Tensor] = {}  # (1, tokens, C)

    def steps(self) -> list[int]:
        return self.step if isinstance(self.step, list) else [self.step]

    def qk(self, name, project):
        q, k = project()
        if not (self.cross_outputs and is_cross_attention(name)):
            for i, step in enumerate(self.steps()):
                self.qks[step, name] = (per_sample(q, i), per_sample(k, i))
        return q, k

    def out(self, name, attend):
        o = attend()
        if self.cross_outputs and is_cross_attention(name):
            for i, step in enumerate(self.steps()):
                self.outputs[step, name] = per_sample(o, i)
        return o


class Modulation(AttentionHooks):
    """The modulated regeneration's hooks (paper Sec. 3.3).

    At step 0 (t_m) the modulated layer's output gets `offsets` (B, tokens) added, broadcast over
    channels: f(softmax(QK^T / sqrt(d)) V) + c M, one run per row (the "+ c M" is in `out`). With `replay` (the record of
    the unmodulated pass), every attention layer at every step uses the recorded queries and keys
    ("attention injection"), so the modulated images stay aligned with the original; with None,
    no injection.

    Under injection nothing is computed that the record replaces: cross-attention outputs recorded
    whole are replayed (the modulated layer adds its offset to the replayed output), and the
    replaced q/k projections are not computed. The replayed q and k have batch 1 against the runs' values: speed.FastAttention
    may then compute the probabilities once for all runs.
    """

    def __init__(self, offsets: torch.Tensor, replay: AttentionRecord | None = None, layer: str = MODULATED_LAYER):
        self.offsets, self.replay, self.layer = offsets, replay, layer

    def out(self, name, attend):
        o = None if self.replay is None else self.replay.outputs.get((self.step, name))
        o = attend() if o is None else o
        if self.step == 0 and name == self.layer:  # the paper's f(softmax(QK^T / sqrt(d)) V) + c M
            return o + self.offsets[:, :, None].to(o.dtype)
        return o

    def qk(self, name, project):
        return project() if self.replay is None else self.replay.qks[self.step, name]
