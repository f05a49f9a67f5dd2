"""--compile compiles once per image size: counted by dynamo's own counters over several images, on the CPU,
and with what CUDA changes between images (the layout entered and left, the memory probes' answer)
simulated here. torch.compile runs with its "eager" backend: dynamo traces, guards and caches each frame as
it does for inductor (a recompilation is a frame traced again whatever the backend), in seconds, not minutes."""
import pytest
import torch
from torch._dynamo.utils import counters

import devices
import emerdiff
import weights

OPTIONS = dict(masks=2, feature_samples=1, kmeans_restarts=2, steps=10, t_m=1)


@pytest.fixture
def model(monkeypatch):
    """A tiny model of its own (compilation stays with a model), compiled by the eager backend, and dynamo's
    caches and counters empty before and after."""
    monkeypatch.setattr(devices, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    yield weights.random_stable_diffusion("tiny")
    torch._dynamo.reset()


def frames_compiled(call, *args, **kwargs) -> int:
    """How many frames dynamo set out to compile (or to compile again) while call(*args, **kwargs) ran."""
    before = counters["frames"]["total"]
    call(*args, **kwargs)
    return counters["frames"]["total"] - before


def test_compile_once_per_image_size(model):
    """Two images of one size, then one of another: the second compiles nothing (no frame traced again for
    another image), the third its own shapes."""
    frames = [frames_compiled(emerdiff.segment, torch.rand(3, side, side), model, size=side,
                              speed=dict(compile=True), **OPTIONS) for side in (64, 64, 128)]
    assert frames[0] > 0 and frames[1] == 0 and frames[2] > 0, frames


def test_on_cuda_a_compiled_model_keeps_its_layout_and_each_sizes_batch_sizes(model, monkeypatch):
    """CUDA's settings on the CPU: devices takes the model for a CUDA one (channels_last entered and left by
    each call) whose memory probes answer otherwise at each image (the free memory moves). The probes run
    once per image size and uncompiled, the batch sizes of a size stay its first image's, and the blocks run
    at them compile nothing for the second image of a size."""
    monkeypatch.setattr(devices, "model_device_dtype", lambda sd: (torch.device("cuda"), torch.float32))
    context, t = torch.zeros(1, model.tokenizer.max_length, model.unet.config.cross_attention_dim), torch.tensor([1])
    answers, probe_frames, layouts = iter([(2, 2), (3, 3), (4, 4)]), [], []

    @torch.no_grad()
    def probe(sd, shape, runs, steps):  # in place of auto_batch_sizes: a UNet call of one image, as it makes
        probe_frames.append(frames_compiled(sd.unet, torch.zeros(shape), t, context))
        return next(answers)
    monkeypatch.setattr(devices, "auto_batch_sizes", probe)
    o = emerdiff.DEFAULTS | OPTIONS | dict(speed=dict(devices.SPEED, compile=True))

    def image(side):  # the settings of a side x side image, and the UNet and the decoder at its batch sizes
        with torch.no_grad(), devices.speed_settings(model, side, side, o) as layout:
            latent = torch.zeros(1, 4, side // 8, side // 8)
            model.unet(latent.expand(layout.batch_size, -1, -1, -1), t, context)
            model.vae.decode(latent.expand(layout.decode_batch_size, -1, -1, -1))
        layouts.append(layout)
    frames = [frames_compiled(image, 64) for _ in range(2)]
    with devices.speed_settings(model, 128, 128, o) as layout:  # another size: probed again
        layouts.append(layout)
    assert frames[0] > 0 and frames[1] == 0, frames
    assert probe_frames == [0, 0]
    assert [(chosen.batch_size, chosen.decode_batch_size) for chosen in layouts] == [(2, 2), (2, 2), (3, 3)]
