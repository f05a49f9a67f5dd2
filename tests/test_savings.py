"""The exact savings under attention injection, each against its plain path on the tiny model.

Every saving has a switch that turns it off; with the switch off the code runs the plain path
(what the method computes without the saving). Each test runs both and compares, and where the
saving is "computes nothing there", counts the calls of the projections it skips.
"""
import math

import pytest
import torch

import emerdiff
import sampler
from sampler import AttentionRecord, Modulation, invert, regenerate

LATENT = (1, 4, 16, 16)  # a 128x128 image: the modulated layer works on 4x4 = 16 tokens
TOKENS = 16
STEPS, LAYERS = 15, 16  # denoising steps from t = 281; self- (and cross-) attention layers of the UNet


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def x0_and_context(sd):
    x0 = torch.randn(LATENT, generator=torch.Generator().manual_seed(3))
    return x0, sd.text_encoder(sd.tokenizer("")).detach()


def inverted(sd, x0_and_context, cross_outputs=True, batch_size=1):
    record = AttentionRecord(cross_outputs=cross_outputs)
    timesteps, x_start, zs = invert(sd.unet, *x0_and_context, generator=torch.Generator().manual_seed(42),
                                    hooks=record, batch_size=batch_size)
    return timesteps, x_start, zs, record


@pytest.fixture(scope="module")
def records(sd, x0_and_context):
    """One inversion (one step per call), recorded both ways: cross-attention outputs, or only q/k."""
    return {cross: inverted(sd, x0_and_context, cross) for cross in (True, False)}


# Three runs: one cell each, lambda = +-10, as the method's modulated runs are.
OFFSETS = torch.zeros(3, TOKENS).index_put_((torch.arange(3), torch.tensor([0, 5, 15])), torch.tensor([10., -10., 10.]))


class ComputingModulation(Modulation):
    """Injection without its saving: each layer's q and k projected, then replaced by the record's."""

    def qk(self, name, project):
        if self.replay is not None:
            project()
        return super().qk(name, project)


def modulated(sd, inversion, context, hooks=Modulation):
    timesteps, x_start, zs, record = inversion
    return regenerate(sd.unet, x_start, zs, timesteps, context, hooks=hooks(OFFSETS, record))


class ProjectionCalls:
    """Counts the calls of each attention layer's projections, by layer kind and projection."""

    def __init__(self, unet):
        self.unet, self.counts, self.handles = unet, {}, []

    def __enter__(self):
        for layer in (m for m in self.unet.modules() if hasattr(m, "to_q")):
            kind = "cross" if layer.name.endswith("attn2") else "self"
            for projection, module in (("q", layer.to_q), ("k", layer.to_k), ("v", layer.to_v),
                                       ("out", layer.to_out[0])):
                self.counts[kind, projection] = 0
                self.handles.append(module.register_forward_hook(
                    lambda *_, key=(kind, projection): self.counts.__setitem__(key, self.counts[key] + 1)))
        return self.counts

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


# ---- 1. Cross-attention outputs replayed ----

def test_replayed_cross_attention_outputs_equal_the_recomputed_ones(sd, x0_and_context, records):
    context = x0_and_context[1]
    with ProjectionCalls(sd.unet) as replayed_calls:
        replayed = modulated(sd, records[True], context)
    with ProjectionCalls(sd.unet) as plain_calls:
        plain = modulated(sd, records[False], context, ComputingModulation)
    assert relative_error(replayed, plain) <= 1e-5
    assert all(replayed_calls["cross", p] == 0 for p in ("q", "k", "v", "out"))  # the layer computes nothing
    assert all(plain_calls["cross", p] == STEPS * LAYERS for p in ("q", "k", "v", "out"))


def test_the_modulated_layer_adds_its_offset_to_the_replayed_output(sd, x0_and_context, records):
    """Without the offset the replayed runs are the unmodulated regeneration; with it, not."""
    timesteps, x_start, zs, record = records[True]
    context = x0_and_context[1]
    unmodulated = regenerate(sd.unet, x_start, zs, timesteps, context)
    zero = regenerate(sd.unet, x_start, zs, timesteps, context, hooks=Modulation(torch.zeros(1, TOKENS), record))
    assert relative_error(zero, unmodulated) <= 1e-5
    assert relative_error(modulated(sd, records[True], context)[:1], unmodulated) > 1e-3


# ---- 2. Replaced q/k projections not computed ----

def test_skipped_projections_change_nothing(sd, x0_and_context, records):
    context = x0_and_context[1]
    with ProjectionCalls(sd.unet) as skipped_calls:
        skipped = modulated(sd, records[True], context)
    with ProjectionCalls(sd.unet) as computed_calls:
        computed = modulated(sd, records[True], context, ComputingModulation)
    assert torch.equal(skipped, computed)  # the projections were thrown away: not a bit differs
    assert skipped_calls["self", "q"] == skipped_calls["self", "k"] == 0
    assert skipped_calls["self", "v"] == skipped_calls["self", "out"] == STEPS * LAYERS  # the values are the runs' own
    assert computed_calls["self", "q"] == computed_calls["self", "k"] == STEPS * LAYERS


# ---- 3. The inversion's UNet calls batched ----

class CallSpy(torch.nn.Module):
    """Wraps a UNet, recording each call's (t, x)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, x, t, context, hooks=None):
        self.calls.append((t, x.clone()))
        return self.unet(x, t, context, hooks)


@pytest.mark.parametrize("batch_size", [4, 15])
def test_batched_inversion_equals_one_step_per_call(sd, x0_and_context, records, batch_size):
    timesteps, x_start, zs, record = records[True]
    spy = CallSpy(sd.unet)
    record_b = AttentionRecord()
    timesteps_b, x_start_b, zs_b = invert(spy, *x0_and_context, generator=torch.Generator().manual_seed(42),
                                          hooks=record_b, batch_size=batch_size)
    assert len(spy.calls) == math.ceil(15 / batch_size)  # each call one timestep per sample, in order
    assert torch.cat([t.expand(len(x)) for t, x in spy.calls]).tolist() == timesteps == timesteps_b
    assert torch.equal(x_start_b, x_start) and relative_error(zs_b, zs) <= 1e-5
    assert record_b.qks.keys() == record.qks.keys() and record_b.outputs.keys() == record.outputs.keys()
    for key, (q, k) in record.qks.items():
        assert relative_error(record_b.qks[key][0], q) <= 1e-5 and relative_error(record_b.qks[key][1], k) <= 1e-5
    for key, o in record.outputs.items():
        assert relative_error(record_b.outputs[key], o) <= 1e-5
    x0, context = x0_and_context
    assert relative_error(regenerate(sd.unet, x_start_b, zs_b, timesteps_b, context), x0) <= 1e-5


# ---- All of them together, through the method's own functions ----

def test_all_savings_together_equal_the_plain_path(sd, monkeypatch):
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(5)) * 2 - 1
    x0 = emerdiff.encode(sd, image)
    masks = emerdiff.low_resolution_masks(torch.arange(16) % 3, (4, 4), 3)
    offsets = emerdiff.modulation_offsets(masks, 10.0)  # 6 runs

    def latents(saving: bool):
        inversion = emerdiff.invert(sd, x0, generator=torch.Generator().manual_seed(42),
                                    batch_size=8 if saving else 1, replay_cross_attention=saving)
        with monkeypatch.context() as patch:
            patch.setattr(sampler, "Modulation", Modulation if saving else ComputingModulation)
            return emerdiff.modulated_latents(sd, inversion, offsets, batch_size=6)
    # 15 chained steps: float32 rounding grows to about 1e-5 here (each saving alone stays below it)
    assert relative_error(latents(True), latents(False)) <= 5e-5


# ---- 4. State on the device, in the model's dtype ----

@pytest.fixture(scope="module")
def sd_bf16(tiny_sd_dir):
    from weights import load_stable_diffusion
    return load_stable_diffusion(tiny_sd_dir, dtype=torch.bfloat16)


def test_record_and_timesteps_stay_on_the_device_in_the_model_dtype(sd_bf16):
    """The record is kept as the model made it; every UNet call gets its timesteps as a tensor
    already on the device (an int would be copied to the device at every call)."""
    device = next(sd_bf16.unet.parameters()).device
    x0 = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    spy = CallSpy(sd_bf16.unet)
    unet, sd_bf16.unet = sd_bf16.unet, spy
    try:
        inversion = emerdiff.invert(sd_bf16, x0, generator=torch.Generator().manual_seed(42), batch_size=4)
        emerdiff.modulated_latents(sd_bf16, inversion, OFFSETS, batch_size=3)
        emerdiff.extract_features(sd_bf16, x0, samples=2, batch_size=2)
    finally:
        sd_bf16.unet = unet
    stored = [*inversion.record.outputs.values(), *(a for qk in inversion.record.qks.values() for a in qk)]
    assert stored and all(a.dtype == torch.bfloat16 and a.device == device for a in stored)
    assert len(spy.calls) == 4 + 15 + 1
    assert all(isinstance(t, torch.Tensor) and t.device == x.device for t, x in spy.calls)
