"""The authors' notebook approach, written on diffusers, for tools/bench.py to measure against.

EmerDiff's authors published a minimal example notebook built on diffusers and scikit-learn
(repository Kmcode1/Kmcode.github.io, Projects/EmerDiff/EmerDiff_example_implementation.ipynb).
`NotebookPipeline` does what it does, step for step, on the same weights and options as
emerdiff.segment(): one full UNet pass per feature draw, the whole 50-step inversion, a separate
recording pass, each mask's two runs as a batch of 2 and decoded together, the record kept on the
host. A developer's tool: it needs the dev requirements (diffusers), which the project's own
modules never import; bench.py imports it after putting the project's folder on the path.
"""
from dataclasses import asdict

import torch
import torch.nn.functional as F

import emerdiff
import sampler
from devices import Stopwatch
from inputs import feature_grid
from unet import FEATURE_LAYER, MODULATED_LAYER, UNet
from vae import VAE


def reference_models(unet: UNet, vae: VAE, device, dtype):
    """diffusers' UNet2DConditionModel and AutoencoderKL holding our models' weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging
    logging.set_verbosity_error()
    levels = len(vae.config.block_out_channels)
    with torch.device(device):  # our configs hold diffusers' field names
        ref_unet = UNet2DConditionModel(**asdict(unet.config))
        ref_vae = AutoencoderKL(**asdict(vae.config), down_block_types=("DownEncoderBlock2D",) * levels,
                                up_block_types=("UpDecoderBlock2D",) * levels)
    ref_unet.load_state_dict(unet.state_dict())
    ref_vae.load_state_dict(vae.state_dict())
    return ref_unet.to(device, dtype).eval(), ref_vae.to(device, dtype).eval()


class NotebookAttention:
    """A diffusers attention processor doing what the authors' notebook's does: q, k and v are
    projected; when recording, q and k are cloned to the host; when replaying, the host copies are
    written over the computed q and k; SDPA; to_out[0]; in the modulated layer at t_m, each run's
    lambda times the mask is added. In the feature passes the feature layer's query is summed on
    the host."""

    def __init__(self, name, state):
        self.name, self.state = name, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        s = self.state
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if s["mode"] == "features" and self.name == FEATURE_LAYER:
            s["features"] = s["features"] + q[0].detach().cpu()
        elif s["mode"] == "record":
            s["record"][s["t"], self.name] = (q.detach().clone().cpu(), k.detach().clone().cpu())
        elif s["mode"] == "replay":
            recorded_q, recorded_k = s["record"][s["t"], self.name]
            q[:] = recorded_q[0].to(q.device)
            k[:] = recorded_k[0].to(k.device)
        batch, heads = q.shape[0], attn.heads
        q, k, v = (a.view(batch, -1, heads, a.shape[-1] // heads).transpose(1, 2) for a in (q, k, v))
        o = attn.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        if s["mode"] == "replay" and s["t"] == s["t_m"] and self.name == MODULATED_LAYER:
            o = o + s["lam"].to(o.dtype)[:, None, None] * s["mask"].to(o.dtype).reshape(1, -1, 1)
        return o


class NotebookPipeline:
    """The authors' notebook approach on diffusers, written here to measure against: features
    from one full UNet pass per draw, the whole 50-step inversion, a separate recording pass, each
    mask's two runs as a batch of 2 and its two images decoded together, the record kept on the
    host. Same weights and options as ours, and PyTorch's default precision settings (on CUDA, float32
    convolutions in TF32, matrix products not). k-means: the notebook uses scikit-learn's KMeans
    (k-means++, restarts, Lloyd), which is not a dependency here, so this uses emerdiff.kmeans."""

    def __init__(self, sd, dtype, meter):
        self.device = next(sd.unet.parameters()).device
        self.unet, self.vae = reference_models(sd.unet, sd.vae, self.device, dtype)
        self.state = dict(mode=None, t=None)
        self.unet.set_attn_processor({name: NotebookAttention(name.removesuffix(".processor"), self.state)
                                      for name in self.unet.attn_processors})
        self.context = emerdiff.embed_prompt(sd).to(dtype)  # the notebook embeds "" once, when it loads
        self.text_encoder = sd.text_encoder  # held, as the notebook's diffusers pipeline holds its three models
        self.dtype, self.meter = dtype, meter

    def unet_call(self, stage, x, t):
        self.state["t"] = t
        context = self.context.expand(len(x), -1, -1)
        return self.meter.run(stage, lambda: self.unet(x.to(self.dtype), t, context).sample.float(),
                              unet_images=len(x))

    @torch.no_grad()
    def __call__(self, image, o) -> tuple[torch.Tensor, dict]:
        watch, s, scaling = Stopwatch(self.device), self.state, self.vae.config.scaling_factor
        pixels, _ = emerdiff.load_image(image, o["size"])
        x0 = self.meter.run("features", lambda: self.vae.encode(pixels.to(self.device, self.dtype)))
        x0 = x0.latent_dist.mean.float() * scaling
        # Step 1: one full UNet pass per draw, the feature layer's query summed on the host.
        rng, ab = torch.Generator().manual_seed(o["seed"]), sampler.ALPHAS_CUMPROD
        s.update(mode="features", features=0)
        for _ in range(o["feature_samples"]):
            noise = torch.randn(x0.shape, generator=rng).to(self.device)
            self.unet_call("features", ab[o["t_f"]] ** 0.5 * x0 + (1 - ab[o["t_f"]]) ** 0.5 * noise, o["t_f"])
        features = (s["features"] / o["feature_samples"]).to(self.device)
        watch.lap("features")
        labels, centers = emerdiff.kmeans(features, o["masks"], n_init=o["kmeans_restarts"],
                                          generator=torch.Generator().manual_seed(o["seed"]))
        grid = feature_grid(*pixels.shape[-2:])
        masks = emerdiff.low_resolution_masks(labels, grid, len(centers))
        watch.lap("k-means")
        # Step 2: the inversion over the whole grid, one step per call; the record in a second pass.
        s["mode"] = None
        timesteps, x_start, zs = self.invert(x0, o)
        watch.lap("inversion")
        s.update(mode="record", record={})
        self.regenerate(x_start, zs, timesteps, "recording")
        watch.lap("recording")
        # Steps 3-4: per mask, the -lambda and +lambda runs as a batch of 2, decoded together.
        s.update(mode="replay", t_m=timesteps[0], lam=torch.tensor([-o["lam"], o["lam"]], device=self.device))
        maps = []
        for mask in masks:
            s["mask"] = mask.float().to(self.device)
            latents = self.regenerate(x_start.expand(2, -1, -1, -1), zs, timesteps, "modulation")
            images = self.meter.run("modulation", lambda: self.vae.decode((latents / scaling).to(self.dtype)).sample)
            maps.append(emerdiff.gaussian_blur(images[0:1] - images[1:2], *o["blur"]).norm(dim=1).float().cpu())
        maps = torch.cat(maps)
        watch.lap("modulation")
        return maps, watch.seconds

    def invert(self, x0, o):
        """The notebook's inversion: every x_t of the grid drawn around x0 (from t = 1 upwards), then
        z_t for every step from the top of the grid, one UNet call each; z_t below t_m kept."""
        grid = sampler.timestep_grid(o["steps"])
        rng = torch.Generator().manual_seed(o["seed"])
        noise = {t: torch.randn(x0.shape, generator=rng).to(self.device) for t in reversed(grid)}
        ab = sampler.ALPHAS_CUMPROD
        xs = [ab[t] ** 0.5 * x0 + (1 - ab[t]) ** 0.5 * noise[t] for t in grid] + [x0]
        zs, x_start = [], None
        for i, t, alpha_bar, alpha_bar_prev in sampler.denoising_steps(grid):
            if t == o["t_m"]:
                x_start = xs[i]
            mu, sigma = sampler.ddpm_mean_and_std(xs[i], self.unet_call("inversion", xs[i], t), alpha_bar,
                                                  alpha_bar_prev)
            zs.append((xs[i + 1] - mu) / sigma)
            xs[i + 1] = mu + sigma * zs[-1]
        kept = sampler.timesteps_until(o["t_m"], o["steps"])
        return kept, x_start, torch.stack(zs[-len(kept):])

    def regenerate(self, x, zs, timesteps, stage):
        for i, t, alpha_bar, alpha_bar_prev in sampler.denoising_steps(timesteps):
            mu, sigma = sampler.ddpm_mean_and_std(x, self.unet_call(stage, x, t), alpha_bar, alpha_bar_prev)
            x = mu + sigma * zs[i]
        return x
