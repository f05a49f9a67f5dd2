"""--compile compiles once per image size: counted by dynamo's own counters over several images on the CPU.
torch.compile runs with its "eager" backend: dynamo traces, guards and caches each frame as it does for
inductor (a recompilation is a frame traced again whatever the backend), in seconds, not minutes."""
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

