"""Every path fails cleanly: the command line in a subprocess (exit status, exactly one stderr line, no
traceback, nothing partial or temporary left), interrupts and kills, concurrent runs, and the API's inputs."""
import json
import math
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import devices
import emerdiff
import files
import inputs
import runner
from command_line import (EXAMPLE, FAST, OUTPUTS, assert_complete, assert_one_error, cli, save_image,
                          start_cli, temporaries)
from conftest import ROOT
from emerdiff import EmerDiffError

# ---- options: nonsense refused before the weights load ----

@pytest.mark.parametrize("args, pattern", [
    (["--lam", "0"], "lambda (lam) must be above 0"),
    (["--lam", "-3"], "lambda (lam) must be above 0"),
    (["--lam", "nan"], "option lam must be a finite number"),
    (["--lam", "inf"], "option lam must be a finite number"),
    (["--size", "128\u00b2"], "--size 128\u00b2: use auto, N or WxH"),
    (["--size", "1" * 5000], "use auto, N or WxH"),
    (["--seed", "1" * 30], "seed must be between 0 and 2^63 - 1"),
    (["--seed", "-1"], "seed must be between 0 and 2^63 - 1"),
    (["--blur-kernel", "101"], "the blur kernel size must be odd, from 1 to 63"),
    (["--blur-kernel", "4"], "the blur kernel size must be odd"),
    (["--blur-sigma", "0"], "the blur sigma must be above 0"),
    (["--blur-sigma", "nan"], "option blur must be (kernel size, sigma)"),
    (["--steps", "1"], "steps must be between 2 and 1000"),
    (["--masks", "four"], "argument --masks: invalid int value: 'four'"),
    (["--batch-size", "100000000000000000000"], "batch size must be between 1 and 2^31 - 1"),
    (["--size", "100"], "size 100x100: each side must be a multiple of 64 between 64 and 2048: use 64 or 128"),
    (["--size", "100x320"], "size 100x320: each side must be a multiple of 64 between 64 and 2048: use 64x320 or "
     "128x320"),
    (["--size", "3000x20"], "use 2048x64"),
    (["--masks", "40", "--size", "128"], "40 masks but only 16 cells in the 4x4 feature grid"),
    (["--masks", "200", "--size", "1024x128"], "200 masks but only 128 cells in the 32x4 feature grid"),
], ids=["lam-0", "lam-negative", "lam-nan", "lam-inf", "size-superscript", "size-5000-digits", "seed-30-digits",
        "seed-negative", "blur-too-large", "blur-even", "sigma-0", "sigma-nan", "steps", "masks-text", "batch-1e20",
        "size-100", "size-100x320", "size-3000x20", "masks-over-cells", "masks-over-wide-cells"])
def test_nonsense_options_are_refused_before_the_weights_load(tmp_path, args, pattern):
    result = cli("--image", str(EXAMPLE), "--weights", str(tmp_path / "no-weights"), "--out", str(tmp_path / "out"),
                 *args)
    assert_one_error(result, pattern)
    assert not (tmp_path / "out").exists()


def test_an_automatic_size_has_a_cell_for_every_mask_taken():
    """Why only a fixed --size is checked against --masks (inputs.check_masks_fit): the automatic size of any
    image it takes has at least inputs.MAX_MASKS cells in its feature grid. Every width from 64 to 3,000 px
    against heights from square to the most elongated taken, by a plain loop."""
    fewest = math.inf
    for width in range(64, 3001):
        for height in (64, 65, 100, 127, 128, 200, 300, 451, 511, 512, 513, 700, 1000, 1023, 1024, 2047, 2048,
                       4000, 8191, 16384, 40000):
            try:
                w, h = inputs.working_size(width, height)
            except EmerDiffError:  # too elongated: refused
                continue
            fewest = min(fewest, (w // 32) * (h // 32))
    assert fewest == inputs.MAX_MASKS == 256  # 512x512: 16x16 cells, and 256 masks at most


# ---- the output folder ----

def test_out_is_a_file(tmp_path):
    (tmp_path / "out").write_text("a file")
    assert_one_error(cli("--image", str(EXAMPLE), "--weights", str(tmp_path / "none"), "--out", str(tmp_path / "out")),
                     "a file of that name is in the way")


def test_out_cannot_be_created(tmp_path):
    assert_one_error(cli("--image", str(EXAMPLE), "--weights", str(tmp_path / "none"), "--out", "/proc/emerdiff"),
                     "--out /proc/emerdiff: cannot write there")


@pytest.fixture
def unwritable(tmp_path):
    """A folder no one may write to: read-only by mode, or, for root (whom modes do not stop), immutable."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_out_not_writable(tmp_path, unwritable):
    result = cli("--image", str(EXAMPLE), "--weights", str(tmp_path / "none"), "--out", str(unwritable))
    assert_one_error(result, f"--out {unwritable}: cannot write there")
    assert list(unwritable.iterdir()) == []


def test_a_file_in_the_way_fails_that_image_only(tmp_path, tiny_sd_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "chelsea").write_text("mine")
    small = save_image(tmp_path / "small.png", (96, 64))
    result = cli("--image", str(EXAMPLE), "--image", str(small), "--weights", str(tiny_sd_dir), "--out", str(out), *FAST)
    assert_one_error(result, f"{EXAMPLE}: cannot write {out / 'chelsea'}: a file of that name is in the way")
    assert (out / "chelsea").read_text() == "mine"
    assert_complete(out / "small", (96, 64))
    assert not temporaries(out)


def test_a_folder_of_other_files_is_never_replaced(tmp_path, tiny_sd_dir):
    out = tmp_path / "out"
    (out / "chelsea").mkdir(parents=True)
    (out / "chelsea" / "notes.txt").write_text("mine")
    result = cli("--image", str(EXAMPLE), "--weights", str(tiny_sd_dir), "--out", str(out), *FAST)
    assert_one_error(result, "that folder holds files emerdiff does not write")
    assert [p.name for p in (out / "chelsea").iterdir()] == ["notes.txt"] and not temporaries(out)


@pytest.mark.parametrize("stranger", ["diffmaps/notes.txt", "diffmaps/000.png.bak", "diffmaps/mine/", "mine/"])
def test_overwrite_keeps_a_folder_holding_a_file_of_yours_anywhere(tmp_path, capsys, stranger):
    """--save-diffmaps --overwrite: a file (or folder) of the user's anywhere in an image folder, diffmaps/
    included, keeps the folder whole, exit status 2, and the image's line names it; once it is gone the
    folder is replaced."""
    image, out = save_image(tmp_path / "small.png", (64, 64)), tmp_path / "out"
    args = ["--image", str(image), "--random-weights", "--out", str(out), "--save-diffmaps", "--overwrite", *FAST]
    assert runner.main(args) == 0
    folder = out / "small"
    record = (folder / "run.json").read_text()
    (folder / stranger).mkdir() if stranger.endswith("/") else (folder / stranger).write_text("mine")
    capsys.readouterr()
    assert runner.main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [f"emerdiff: error: {image}: cannot write {folder}: that folder holds files emerdiff does not "
                      f"write ({stranger.rstrip('/')}, for one); move them away"]
    assert (folder / stranger).is_dir() if stranger.endswith("/") else (folder / stranger).read_text() == "mine"
    assert (folder / "run.json").read_text() == record and (folder / "diffmaps" / "000.png").is_file()
    assert not temporaries(out)
    files.remove(folder / stranger)
    assert runner.main(args) == 0 and (folder / "run.json").read_text() != record


def limit_file_size(size):
    def limit():  # as a full disk: writes past `size` bytes fail (EFBIG) instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


def test_a_full_disk_fails_that_image_only_and_leaves_nothing_partial(tmp_path, tiny_sd_dir):
    out = tmp_path / "out"
    small = save_image(tmp_path / "small.png", (96, 64))  # its files fit in 40 kB; chelsea's labels.npy does not
    result = cli("--image", str(EXAMPLE), "--image", str(small), "--weights", str(tiny_sd_dir), "--out", str(out),
                 *FAST, preexec_fn=limit_file_size(40_000))
    assert_one_error(result, f"{EXAMPLE}: cannot write {out / 'chelsea'}: File too large")
    assert not (out / "chelsea").exists() and not temporaries(out)
    assert_complete(out / "small", (96, 64))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 1 and [f["image"] for f in summary["failed"]] == [str(EXAMPLE)]


# ---- images: regular files only, names escaped, Pillow's warnings kept quiet ----

def test_a_fifo_in_a_folder_is_skipped_and_one_given_is_refused(tmp_path, tiny_sd_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    save_image(folder / "a.png", (64, 64))
    os.mkfifo(folder / "pipe.png")
    result = cli("--image", str(folder), "--weights", str(tiny_sd_dir), "--out", str(tmp_path / "out"), *FAST)
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"emerdiff: skipping {folder / 'pipe.png'}: not a regular file (a FIFO, socket or device)\n"
    assert_complete(tmp_path / "out" / "a", (64, 64))
    result = cli("--image", str(folder / "pipe.png"), "--weights", str(tiny_sd_dir), "--out", str(tmp_path / "out"))
    assert_one_error(result, "pipe.png: not a regular file (a FIFO, socket or device)")


def test_a_file_name_cannot_split_the_error_line(tmp_path):
    bad = tmp_path / "two\nlines.jpg"
    bad.write_text("not an image")
    result = cli("--image", str(bad), "--weights", str(tmp_path / "none"), "--out", str(tmp_path / "out"))
    assert_one_error(result, "two\\nlines.jpg: not an image")


def malformed_exif_jpeg(path):
    """A JPEG whose EXIF orientation (and one more tag) points past the end of the data."""
    entries = struct.pack("<HHII", 0x0112, 3, 1000, 5000) + struct.pack("<HHII", 0x0110, 2, 50, 6000)
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2) + entries + struct.pack("<I", 0)
    Image.open(EXAMPLE).resize((100, 80)).save(path, exif=b"Exif\x00\x00" + tiff)
    return path


def test_pillow_warnings_never_reach_the_terminal(tmp_path, tiny_sd_dir):
    exif = malformed_exif_jpeg(tmp_path / "exif.jpg")
    large = save_image(tmp_path / "large.png", (120, 100))  # over the (scaled-down) bomb limit, under twice it
    code = ("import sys; from PIL import Image; Image.MAX_IMAGE_PIXELS = 10_000; import runner; "
            "sys.exit(runner.main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "--image", str(exif), "--image", str(large), "--image",
                             str(EXAMPLE), "--weights", str(tiny_sd_dir), "--out", str(tmp_path / "out"), *FAST],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert_one_error(result, f"{EXAMPLE}: cannot decode the image (Image size (135300 pixels) exceeds limit")
    assert_complete(tmp_path / "out" / "exif", (100, 80))
    assert_complete(tmp_path / "out" / "large", (120, 100))


# ---- whole folders: no mix, no stale file, temporaries of dead runs removed ----

def test_a_rerun_on_another_image_leaves_no_stale_file(tmp_path, tiny_sd_dir):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    save_image(first / "x.png", (128, 64))
    save_image(second / "x.png", (64, 128), seed=1)
    out = tmp_path / "out"
    assert runner.main(["--image", str(first / "x.png"), "--weights", str(tiny_sd_dir), "--out", str(out),
                        "--save-diffmaps", *FAST]) == 0
    assert (out / "x" / "diffmaps.png").is_file()
    assert runner.main(["--image", str(second / "x.png"), "--weights", str(tiny_sd_dir), "--out", str(out),
                        *FAST]) == 0
    record = assert_complete(out / "x", (64, 128))
    assert {p.name for p in (out / "x").iterdir()} == OUTPUTS and record["run"]["image"]["path"].startswith(str(second))


def test_two_concurrent_runs_on_one_name_each_leave_a_consistent_folder(tmp_path, tiny_sd_dir):
    sizes = {"a": (192, 64), "b": (64, 192)}
    for folder, size in sizes.items():
        (tmp_path / folder).mkdir()
        for name in ("x", "y", "z"):
            save_image(tmp_path / folder / f"{name}.png", size)
    out = tmp_path / "out"
    runs = [start_cli("--image", str(tmp_path / folder), "--weights", str(tiny_sd_dir), "--out", str(out), *FAST)
            for folder in sizes]
    for process in runs:
        assert process.wait(timeout=300) == 0, process.stderr.read()
    for name in ("x", "y", "z"):
        source = Path(json.loads((out / name / "run.json").read_text())["run"]["image"]["path"])
        assert_complete(out / name, sizes[source.parent.name])  # every file of the folder from that one image
    assert not temporaries(out)


def test_temporaries_of_dead_processes_are_removed(tmp_path, tiny_sd_dir):
    out = tmp_path / "out"
    dead = out / f".x.{files.HOST}.999999999.tmp"  # no process has this id (Linux caps them at 2^22)
    (dead / "sub").mkdir(parents=True)
    (out / f".summary.json.{files.HOST}.999999999.tmp").write_text("{")
    alive = out / f".y.{files.HOST}.{os.getppid()}.tmp"  # a live process's (a run sweeps its own pid's: test_safety)
    alive.mkdir()
    elsewhere = out / ".z.another-machine.999999999.tmp"
    elsewhere.mkdir()
    assert runner.main(["--image", str(EXAMPLE), "--weights", str(tiny_sd_dir), "--out", str(out), *FAST]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([alive.name, elsewhere.name, "chelsea", "summary.json",
                                                         "index.html"])


# ---- interrupts and kills ----

@pytest.fixture
def big_images(tmp_path):
    """Five images large enough that saving one takes a while (its pictures are at the input size)."""
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(5):
        save_image(folder / f"img{i}.png", (1600, 1200), seed=i)
    return folder


def wait_for(condition, process, timeout=900):
    """Until `condition` holds, which once true stays true (the timeout only bounds a run that hangs)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the moment the test waits for"
        assert time.monotonic() < deadline
        time.sleep(0.05)


# The command line, which pauses at a given moment of its second image, img1 (img0 done and saved): while
# "segmenting" it, or "saving" it half-way, its folder's first file written. There it makes the file named by
# its first argument and sleeps until a signal ends it: the signal's moment is this one, whatever the load.
PAUSES_AT_IMG1 = """
import sys, time
from pathlib import Path
import runner
paused, moment = Path(sys.argv.pop(1)), sys.argv.pop(1)
segment, write_folder, calls = runner.segment, runner.write_folder, []

def pause(*args):
    paused.touch()
    time.sleep(3600)

def pausing_segment(*args, **kwargs):
    calls.append(args)
    if moment == "segmenting" and len(calls) == 2:
        pause()
    return segment(*args, **kwargs)

def pausing_write_folder(folder, files, replaceable):
    if moment == "saving" and folder.name == "img1":
        first = next(iter(files))
        files = {name: write if name == first else pause for name, write in files.items()}
    write_folder(folder, files, replaceable)

runner.segment, runner.write_folder = pausing_segment, pausing_write_folder
sys.exit(runner.main(sys.argv[1:]))
"""


def start_paused_at_img1(moment, tmp_path, *args) -> subprocess.Popen:
    """The run paused at `moment` of img1, once it is there."""
    paused = tmp_path / "paused"
    process = start_cli(str(paused), moment, *args, code=PAUSES_AT_IMG1)
    wait_for(paused.exists, process)
    return process


def test_sigkill_while_saving_then_a_rerun_finishes_everything(tmp_path, tiny_sd_dir, big_images):
    out = tmp_path / "out"
    args = ["--image", str(big_images), "--weights", str(tiny_sd_dir), "--out", str(out), *FAST]
    process = start_paused_at_img1("saving", tmp_path, *args)
    assert (out / "img0" / "run.json").is_file()
    process.kill()
    process.wait()
    assert temporaries(out)  # killed while writing a folder, after the first was complete
    finished_before = {p.name: (p / "run.json").stat().st_mtime_ns for p in out.iterdir() if (p / "run.json").is_file()}
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert not temporaries(out)
    for name, written in finished_before.items():  # done once: not written again
        assert (out / name / "run.json").stat().st_mtime_ns == written
    uninterrupted = tmp_path / "uninterrupted"
    assert cli(*args[:-len(FAST) - 2], "--out", str(uninterrupted), *FAST).returncode == 0
    for i in range(5):
        assert_complete(out / f"img{i}", (1600, 1200))
        assert np.array_equal(np.load(out / f"img{i}" / "labels.npy"), np.load(uninterrupted / f"img{i}" / "labels.npy"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == len(finished_before) and summary["done"] == 5 - len(finished_before)


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"])
def test_an_interrupt_is_one_line_and_leaves_nothing_half_written(tmp_path, tiny_sd_dir, big_images, signum, status):
    out = tmp_path / "out"
    process = start_paused_at_img1("segmenting", tmp_path, "--image", str(big_images), "--weights", str(tiny_sd_dir),
                                   "--out", str(out), *FAST)
    process.send_signal(signum)
    first = process.stderr.readline()
    process.send_signal(signum)  # pressed again while it shuts down: changes nothing
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == status, first + stderr
    lines = (first + stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith("emerdiff: error: interrupted: ") and \
        "of 5 images done and saved; run the same command again to do the rest" in lines[0], stderr
    assert not temporaries(out)
    done = [p for p in out.iterdir() if p.is_dir()]
    assert [p.name for p in done] == ["img0"] and (out / "img0" / "run.json").is_file()  # paused in img1


# ---- the model's output ----

def test_nan_weights_stop_the_image_with_one_line(tmp_path, tiny_sd_dir, capsys):
    broken = tmp_path / "nan_sd"
    shutil.copytree(tiny_sd_dir, broken)
    unet_file = broken / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(unet_file)
    tensors["conv_in.weight"][0, 0, 0, 0] = math.nan
    save_file(tensors, unet_file)
    out = tmp_path / "out"
    assert runner.main(["--image", str(EXAMPLE), "--weights", str(broken), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert err == (f"emerdiff: error: {EXAMPLE}: the features hold NaN or inf: the weights may hold NaN, or "
                   "float16 overflowed; try float32 (--dtype float32)\n")
    assert not (out / "chelsea").exists()


# ---- the API: what segment() and load_image() take ----

OPTIONS = dict(size=64, masks=2, feature_samples=1, kmeans_restarts=1, steps=10, t_m=101)
RGB = np.array(Image.open(EXAMPLE))  # (300, 451, 3) uint8


@pytest.mark.parametrize("image, message", [
    (torch.rand(2, 3, 64, 64), "a batch of 2 images: segment them one at a time"),
    (torch.rand(3, 64, 64) * 255, "float image values must be in [0, 1], these span"),
    (torch.rand(3, 64, 64) - 0.5, "float image values must be in [0, 1]"),
    (torch.zeros(3, 64, 64).index_fill_(1, torch.tensor([5]), 1.0000003), "these span 0..1.00000036"),
    (torch.full((3, 64, 64), math.nan), "the image holds NaN or infinite values"),
    (torch.full((3, 64, 64), math.inf), "the image holds NaN or infinite values"),
    (torch.rand(3, 64, 64, dtype=torch.complex64), "image values must be uint8, or float in [0, 1]; got torch.complex64"),
    (torch.zeros(3, 0, 64), "the image is empty"),
    (torch.rand(3, 64, 64, device="meta"), "a meta tensor holds no pixel values"),
    (torch.rand(64, 64, 3), "an image tensor must be RGB, (3, H, W) or (1, 3, H, W); got (64, 64, 3)"),
    (np.zeros((64, 64)), "an image array must be RGB, (H, W, 3); got shape (64, 64)"),
    (np.zeros((64, 64, 3), dtype=np.int64), "image values must be uint8, or float in [0, 1]; got an array of int64"),
    (None, "cannot read an image from NoneType"),
    (3, "cannot read an image from int"),
    (b"\xff\xd8", "cannot read an image from bytes"),
], ids=["batch", "0-255", "negative", "just-above-1", "nan", "inf", "complex", "empty", "meta", "channels-last-tensor", "gray-array",
        "int-array", "none", "int", "bytes"])
def test_segment_refuses_what_is_not_an_image(sd, image, message):
    with pytest.raises(EmerDiffError) as error:
        emerdiff.segment(image, sd, **OPTIONS)
    assert message in str(error.value) and "\n" not in str(error.value)


SQUARE = RGB[:64, :64].astype(np.float32) / 255  # at the working size 64: no resizing


@pytest.mark.parametrize("odd", [lambda a: a.astype(">f4"), lambda a: a.astype(np.longdouble),
                                 lambda a: torch.from_numpy(a).permute(2, 0, 1).to_sparse(),
                                 lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].to_sparse_csr()],
                         ids=["big-endian", "longdouble", "sparse", "sparse-csr-batch"])
def test_odd_arrays_give_the_pixels_of_their_values(odd):
    pixels, size = emerdiff.load_image(odd(SQUARE), 64)
    assert size == (64, 64) and torch.equal(pixels, torch.from_numpy(SQUARE).permute(2, 0, 1)[None] * 2 - 1)


def test_values_no_float64_holds_are_one_line():
    with pytest.raises(EmerDiffError) as error:
        emerdiff.load_image(np.full((64, 64, 3), np.longdouble("1e400")), 64)
    assert "1e+400" in str(error.value) and "\n" not in str(error.value)


def test_a_pair_of_batch_sizes_sets_runs_and_decodes_per_call(sd, monkeypatch):
    """batch_size=(2, 4): the 2K = 4 modulated runs in UNet calls of 2 runs, decoded 4 images per call."""
    unet_batches, decode_batches = [], []
    unet_forward, decode = sd.unet.forward, sd.vae.decode
    monkeypatch.setattr(sd.unet, "forward", lambda x, *args: unet_batches.append(len(x)) or unet_forward(x, *args))
    monkeypatch.setattr(sd.vae, "decode", lambda latent: decode_batches.append(len(latent)) or decode(latent))
    paired = emerdiff.segment(EXAMPLE, sd, **OPTIONS, speed=dict(batch_size=(2, 4)))
    # t = 101 and 1 on the 10-step grid: 1 feature draw, the 2 inversion steps in one call, then per batch
    # of 2 runs a first step of one sample (the runs differ from the modulated layer on) and a step of 2.
    assert unet_batches == [1, 2] + [1, 2] * 2
    assert decode_batches == [4]
    single = emerdiff.segment(EXAMPLE, sd, **OPTIONS, speed=dict(batch_size=1))  # one run per call, one pair per decode
    assert torch.allclose(paired.difference_maps, single.difference_maps, rtol=0, atol=1e-4 * single.difference_maps.max())


@pytest.mark.parametrize("side, runs", [(128, 16), (256, 16), (360, 16), (368, 15), (512, 8), (1024, 2), (4096, 1)])
def test_auto_on_the_cpu_bounds_the_latent_pixels_of_a_call(sd, side, runs):
    """batch_size "auto" off CUDA: CPU_BATCH_SIZES, UNet calls of at most 8 images of 512x512's latent (64 x 64
    pixels each: a memory bound) or as many smaller ones, at least one; one decode a call."""
    o = emerdiff.DEFAULTS | dict(masks=4)
    assert devices.batch_sizes(sd, side, side, o) == (runs, 1)


BATCH_RANGE = "batch size must be between 1 and 2^31 - 1 (runs or decodes per call; a whole run has fewer)"


@pytest.mark.parametrize("option, value, message", [
    ("masks", 4.5, "option masks must be an integer, not 4.5"),
    ("masks", "4", "option masks must be an integer, not '4'"),
    ("masks", True, "option masks must be an integer, not True"),
    ("size", "128", "option size must be \"auto\", an integer or (width, height), not '128'"),
    ("lam", "10", "option lam must be a finite number, not '10'"),
    ("blur", 3, "option blur must be (kernel size, sigma), not 3"),
    ("prompt", None, "option prompt must be a string, not None"),
    ("injection", 1, "option injection must be True or False, not 1"),
    ("speed", dict(batch_size=(4,)),
     'option speed batch_size must be "auto", an integer or (UNet runs, decodes) per call, not (4,)'),
    ("speed", dict(batch_size=(4, 0)), BATCH_RANGE),
    ("speed", dict(batch_size=10 ** 20), BATCH_RANGE),
    ("speed", dict(plain="yes"), "option speed plain must be True or False, not 'yes'"),
    ("speed", "fast", "option speed must be a dict of some of ['batch_size', 'compile', 'plain'], not 'fast'"),
], ids=["masks-float", "masks-str", "masks-bool", "size-str", "lam-str", "blur-int", "prompt-none", "injection-int",
        "batch-one", "batch-zero", "batch-1e20", "plain-str", "speed-str"])
def test_segment_checks_option_types(sd, option, value, message):
    with pytest.raises(EmerDiffError) as error:
        emerdiff.segment(EXAMPLE, sd, **OPTIONS | {option: value})
    assert str(error.value) == message


def test_an_unknown_option_or_speed_option_lists_the_known_ones(sd):
    with pytest.raises(TypeError, match=r"unknown options \['batch_size'\]; known: \['blur', 'feature_samples'"):
        emerdiff.segment(EXAMPLE, sd, **OPTIONS, batch_size=4)
    with pytest.raises(TypeError, match=r"unknown speed options \['fast'\]; known: \['batch_size', 'compile', 'plain'\]$"):
        emerdiff.segment(EXAMPLE, sd, **OPTIONS, speed=dict(fast=True))


def test_integers_of_any_type_are_options(sd):
    """numpy's integers (numbers.Integral) are taken as the Python int of the same value."""
    plain = emerdiff.segment(EXAMPLE, sd, **OPTIONS, speed=dict(batch_size=4))
    for numpy_int in (np.int64(4), (np.int32(4), np.uint8(4))):
        numpy_options = {k: np.int16(v) if type(v) is int else v for k, v in OPTIONS.items()}
        same = emerdiff.segment(EXAMPLE, sd, **numpy_options, speed=dict(batch_size=numpy_int))
        assert np.array_equal(same.labels, plain.labels)
        assert all(type(v) is int for v in (same.options["masks"], same.options["steps"]))


def test_arrays_and_tensors_give_what_the_same_pixels_from_a_file_give(sd):
    by_file = emerdiff.segment(EXAMPLE, sd, **OPTIONS)
    for same in (RGB, torch.from_numpy(RGB).permute(2, 0, 1), torch.from_numpy(RGB).permute(2, 0, 1)[None]):
        assert np.array_equal(emerdiff.segment(same, sd, **OPTIONS).labels, by_file.labels)
    as_float = emerdiff.segment(RGB.astype(np.float32) / 255, sd, **OPTIONS)  # bicubic, not Lanczos: not equal
    as_tensor = emerdiff.segment(torch.from_numpy(RGB).permute(2, 0, 1).float() / 255, sd, **OPTIONS)
    assert as_float.labels.shape == (300, 451) and np.array_equal(as_float.labels, as_tensor.labels)
    pixels, size = emerdiff.load_image(RGB.astype(np.float64) / 255, 64)
    assert size == (451, 300) and pixels.dtype == torch.float32 and pixels.shape == (1, 3, 64, 64)
