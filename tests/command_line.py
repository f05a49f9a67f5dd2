"""Running the command line in tests: a subprocess, the cheapest options, and checks on its outputs."""
import json
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
from PIL import Image

import devices
from conftest import ROOT

EXAMPLE = ROOT / "examples" / "chelsea.jpg"  # 451 x 300
# The cheapest run that still goes through every step: a 2x2 feature grid, 2 masks, 2 denoising steps.
FAST = ["--size", "64", "--masks", "2", "--feature-samples", "1", "--kmeans-restarts", "1", "--steps", "10",
        "--tm", "101", "--quiet"]
FAST_OPTIONS = dict(size=64, masks=2, feature_samples=1, kmeans_restarts=1, steps=10, t_m=101)  # as segment()'s
OUTPUTS = {"labels.png", "labels.npy", "embeddings.npy", "overlay.png", "lowres.png", "view.js", "run.json"}


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "emerdiff.py"), *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def torchrun_cli(*args, processes=2) -> subprocess.CompletedProcess:
    """emerdiff.py under a real torchrun of `processes` processes on this machine."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                           "--standalone", str(ROOT / "emerdiff.py"), *args], capture_output=True, text=True,
                          timeout=600)


def default_ctrl_c():
    """In the child: Ctrl-C as a terminal delivers it. A shell without job control starts its background
    jobs (`pytest ... &`) with SIGINT ignored, which their children inherit, and Python then leaves it
    ignored, as `nohup` means it to."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(*args, env=None, code=None) -> subprocess.Popen:
    """The command line in a child process; with `code`, that Python code (run in the repository's
    folder, the arguments in sys.argv[1:]) instead of emerdiff.py."""
    command = [sys.executable, "-c", code] if code else [sys.executable, str(ROOT / "emerdiff.py")]
    return subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=default_ctrl_c, cwd=ROOT if code else None)


def assert_one_error(result, pattern, status=2):
    lines = result.stderr.splitlines()
    assert result.returncode == status, result.stderr
    assert len(lines) == 1 and lines[0].startswith("emerdiff: error: ") and pattern in lines[0], result.stderr


def temporaries(folder):
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def assert_complete(folder, image_size):
    """Every output file there, all of one image: the labels at its size in both formats."""
    assert OUTPUTS <= {p.name for p in folder.iterdir()}
    labels = np.load(folder / "labels.npy")
    assert labels.shape == image_size[::-1]
    assert np.array_equal(np.asarray(Image.open(folder / "labels.png")), labels)
    for picture in ("overlay.png", "lowres.png"):
        assert Image.open(folder / picture).size == image_size
    return json.loads((folder / "run.json").read_text())


def save_image(path, size, seed=0):
    rng = np.random.default_rng(seed)
    crop = Image.open(EXAMPLE).resize(size)
    noisy = np.clip(np.asarray(crop, dtype=np.int16) + rng.integers(-20, 20, (*size[::-1], 3)), 0, 255)
    Image.fromarray(noisy.astype(np.uint8)).save(path)
    return path


def priced_calls(monkeypatch, sd, unet_s: float, fixed_s: float, decode_s: float, slowest: float = 1.0):
    """A clock (time.perf_counter) that only `sd`'s calls move, each by its price: a UNet call unet_s at a
    latent above 8x8 and fixed_s at 8x8 (devices.FIXED_COST_LATENT), a decode decode_s; the last of
    devices.estimate's timed calls of each kind costs `slowest` times its price. What the estimate makes of
    them can then be worked out by hand."""
    clock, calls = [0.0], Counter()
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    def priced(f, kind_and_price):
        def call(*args, **kwargs):
            kind, price = kind_and_price(*args)
            calls[kind] += 1
            clock[0] += price * (slowest if calls[kind] % (devices.TIMED_CALLS + 1) == 0 else 1)
            return f(*args, **kwargs)
        return call
    monkeypatch.setattr(sd.unet, "forward", priced(sd.unet.forward, lambda x, *_: ("unet", unet_s) if x.shape[-1] > 8
                                                   else ("fixed", fixed_s)))
    monkeypatch.setattr(sd.vae, "decode", priced(sd.vae.decode, lambda *_: ("decode", decode_s)))
