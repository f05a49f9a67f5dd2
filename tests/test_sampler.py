"""The schedule, the edit-friendly DDPM inversion and the batched modulation sampler."""
import pytest
import torch
from diffusers import DDIMScheduler

from sampler import (ALPHAS_CUMPROD, AttentionRecord, Modulation, alpha_bars, ddpm_mean_and_std, invert, regenerate,
                     timestep_grid)
from unet import MODULATED_LAYER

LATENT = (1, 4, 16, 16)  # a 128x128 image: the modulated layer works on 4x4 = 16 tokens
TOKENS = 16


def sd15_ddim(steps=50):
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                              clip_sample=False, num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("steps", [50, 25, 10])
def test_schedule_matches_diffusers_ddim(steps):
    ref = sd15_ddim(steps)
    assert torch.equal(ALPHAS_CUMPROD, ref.alphas_cumprod)
    grid = timestep_grid(steps)
    assert grid == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    for t, (ab, ab_prev) in zip(grid, alpha_bars(grid)):
        x, eps, z = (torch.randn(1, 4, 4, 4, generator=g) for _ in range(3))
        expected = ref.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample  # x_{t-1} = mu + sigma z
        mu, sigma = ddpm_mean_and_std(x, eps, ab, ab_prev)
        assert torch.allclose(mu + sigma * z, expected, rtol=1e-5, atol=1e-6), t
    assert grid[-1] == 1 and alpha_bars(grid)[-1][1] == ref.final_alpha_cumprod.item() == ALPHAS_CUMPROD[0].item()


@pytest.fixture(scope="module")
def x0_and_context(sd):
    x0 = torch.randn(LATENT, generator=torch.Generator().manual_seed(3))
    return x0, sd.text_encoder(sd.tokenizer("")).detach()


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("steps, until", [(50, 281), (50, 481), (25, 281), (10, 301)])
def test_inversion_then_regeneration_reconstructs_x0(sd, x0_and_context, steps, until):
    x0, context = x0_and_context
    timesteps, x_start, zs = invert(sd.unet, x0, context, steps=steps, until=until,
                                    generator=torch.Generator().manual_seed(42))
    assert timesteps[0] == until and timesteps[-1] == 1 and len(zs) == len(timesteps)
    assert zs.shape == (len(timesteps), *LATENT)
    assert relative_error(regenerate(sd.unet, x_start, zs, timesteps, context), x0) <= 1e-5


def test_inversion_makes_only_the_needed_unet_calls(sd, x0_and_context):
    calls = []
    spy = CallSpy(sd.unet, calls)
    invert(spy, *x0_and_context, generator=torch.Generator().manual_seed(0))
    assert [t for t, _ in calls] == [281 - 20 * i for i in range(15)]


class CallSpy(torch.nn.Module):
    """Wraps a UNet, recording each call's (t, x)."""

    def __init__(self, unet, calls):
        super().__init__()
        self.unet, self.calls = unet, calls

    def forward(self, x, t, context, hooks=None):
        self.calls.append((t, x.clone()))
        return self.unet(x, t, context, hooks)


def test_inversion_inputs_are_the_regeneration_inputs(sd, x0_and_context):
    x0, context = x0_and_context
    inverted, regenerated = [], []
    timesteps, x_start, zs = invert(CallSpy(sd.unet, inverted), x0, context, generator=torch.Generator().manual_seed(1))
    regenerate(CallSpy(sd.unet, regenerated), x_start, zs, timesteps, context)
    assert len(inverted) == len(regenerated) == 15
    for (t1, x1), (t2, x2) in zip(inverted, regenerated):
        assert t1 == t2 and torch.equal(x1, x2)


@pytest.fixture(scope="module")
def inversion(sd, x0_and_context):
    x0, context = x0_and_context
    record = AttentionRecord()
    timesteps, x_start, zs = invert(sd.unet, x0, context, generator=torch.Generator().manual_seed(42), hooks=record)
    return timesteps, x_start, zs, context, record


def test_record_holds_every_layer_at_every_step(sd, inversion):
    """Queries and keys of the self-attention layers, whole outputs of the cross-attention layers."""
    record = inversion[-1]
    layers = {m.name for m in sd.unet.modules() if hasattr(m, "to_q")}
    assert len(layers) == 32 and MODULATED_LAYER in layers  # 16 transformers x (attn1, attn2)
    cross = {name for name in layers if name.endswith("attn2")}
    assert set(record.qks) == {(step, name) for step in range(15) for name in layers - cross}
    assert set(record.outputs) == {(step, name) for step in range(15) for name in cross}


def test_record_of_queries_and_keys_only_holds_every_layer_at_every_step(sd, x0_and_context):
    record = AttentionRecord(cross_outputs=False)
    invert(sd.unet, *x0_and_context, generator=torch.Generator().manual_seed(42), hooks=record)
    layers = {m.name for m in sd.unet.modules() if hasattr(m, "to_q")}
    assert len(layers) == 32 and MODULATED_LAYER in layers  # 16 transformers x (attn1, attn2)
    assert set(record.qks) == {(step, name) for step in range(15) for name in layers} and not record.outputs


def test_injection_is_a_no_op_without_modulation(sd, inversion):
    timesteps, x_start, zs, context, record = inversion
    plain = regenerate(sd.unet, x_start, zs, timesteps, context)
    replayed = regenerate(sd.unet, x_start, zs, timesteps, context,
                          hooks=Modulation(torch.zeros(1, TOKENS), record))
    assert (replayed - plain).abs().max() <= 1e-6


def one_cell_offsets(cells, value):
    offsets = torch.zeros(len(cells), TOKENS)
    offsets[torch.arange(len(cells)), torch.tensor(cells)] = value
    return offsets


@pytest.mark.parametrize("injection", [True, False])
def test_batch_of_runs_equals_single_runs(sd, inversion, injection):
    timesteps, x_start, zs, context, record = inversion
    record = record if injection else None
    offsets = one_cell_offsets([0, 5, 15], torch.tensor([10.0, -10.0, 10.0]))
    batched = regenerate(sd.unet, x_start, zs, timesteps, context, hooks=Modulation(offsets, record))
    assert batched.shape == (3, *LATENT[1:])
    for run in range(3):
        single = regenerate(sd.unet, x_start, zs, timesteps, context, hooks=Modulation(offsets[run:run + 1], record))
        assert relative_error(batched[run:run + 1], single) <= 1e-5


def test_zero_mask_changes_nothing_and_one_cell_does(sd, inversion):
    timesteps, x_start, zs, context, record = inversion
    unmodulated = regenerate(sd.unet, x_start, zs, timesteps, context)
    zero = regenerate(sd.unet, x_start, zs, timesteps, context, hooks=Modulation(torch.zeros(1, TOKENS)))
    one_cell = regenerate(sd.unet, x_start, zs, timesteps, context, hooks=Modulation(one_cell_offsets([6], 10.0)))
    assert torch.equal(zero, unmodulated)
    assert relative_error(one_cell, unmodulated) > 1e-3


def test_inversion_matches_a_diffusers_loop(sd, x0_and_context, tiny_reference):
    """x_t drawn around x0 from the seeded generator in the reference code's order (t = 1, 21, ...
    upwards, as its sample_xts_from_x0 does), then z_t = (x_{t-1} - mu_t) / sigma_t with diffusers'
    UNet, DDIM step (eta = 1, zero noise gives mu_t) and DDIM variance."""
    x0, context = x0_and_context
    timesteps, x_start, zs = invert(sd.unet, x0, context, generator=torch.Generator().manual_seed(42))
    scheduler, g = sd15_ddim(), torch.Generator().manual_seed(42)
    grid = [t for t in scheduler.timesteps.tolist() if t <= 281]
    ab = scheduler.alphas_cumprod
    noise = {t: torch.randn(x0.shape, generator=g) for t in sorted(grid)}
    xs = [ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * noise[t] for t in grid] + [x0]
    assert timesteps == grid and torch.allclose(x_start, xs[0])
    with torch.no_grad():
        for i, t in enumerate(grid):
            eps = tiny_reference[0](xs[i], t, context).sample
            mu = scheduler.step(eps, t, xs[i], eta=1.0, variance_noise=torch.zeros_like(x0)).prev_sample
            z = (xs[i + 1] - mu) / scheduler._get_variance(t, t - 20).sqrt()
            assert relative_error(zs[i], z) <= 1e-4, t
