"""The command line end to end on the example image with a tiny model, and every bad input."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import devices
import emerdiff
import page
import inputs
import runner
from command_line import FAST as CHEAPEST
from command_line import FAST_OPTIONS as CHEAPEST_OPTIONS
from command_line import priced_calls, save_image, temporaries
from conftest import ROOT
from emerdiff import load_image
from files import atomic_save
from runner import main

EXAMPLE = ROOT / "examples" / "chelsea.jpg"  # 451 x 300
FAST = ["--size", "128", "--masks", "4", "--feature-samples", "2", "--kmeans-restarts", "5", "--quiet"]


def run_cli(tiny_sd_dir, out, *args):
    return main(["--weights", str(tiny_sd_dir), "--out", str(out), *FAST, *args])


@pytest.fixture(scope="module")
def outputs(tiny_sd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert run_cli(tiny_sd_dir, out, "--image", str(EXAMPLE), "--save-diffmaps") == 0
    return out / "chelsea"


def test_every_output_file_at_the_input_size(outputs):
    labels = np.load(outputs / "labels.npy")
    assert labels.shape == (300, 451) and labels.dtype == np.uint8
    assert labels.max() < 4 and len(np.unique(labels)) > 1
    png = Image.open(outputs / "labels.png")
    assert png.mode == "P" and png.size == (451, 300)
    assert np.array_equal(np.asarray(png), labels)  # pixel value = segment index
    assert Image.open(outputs / "diffmaps.png").size[0] > 0
    assert not temporaries(outputs.parent)  # the folder is written as a temporary beside it, then renamed


# FAST as segment()'s options
FAST_OPTIONS = dict(size=128, masks=4, feature_samples=2, kmeans_restarts=5)


def segment_colours(folder):
    """Segment i's colour (K, 3) as labels.png's palette gives it."""
    return np.array(Image.open(folder / "labels.png").getpalette()[:3 * 4]).reshape(4, 3)


def test_the_overlay_half_tints_each_segment_in_its_colour_with_white_borders(outputs):
    """overlay.png against a plain loop over labels.npy, the image and labels.png's colours: a pixel
    whose right or lower neighbour is in another segment is white, every other one the mean of the
    image's pixel and its segment's colour, rounded down."""
    labels, colours = np.load(outputs / "labels.npy"), segment_colours(outputs)
    image = np.asarray(Image.open(EXAMPLE).convert("RGB"), dtype=int)
    overlay = np.asarray(Image.open(outputs / "overlay.png").convert("RGB"))
    height, width = labels.shape
    for y in range(height):
        for x in range(width):
            here = labels[y, x]
            border = (x + 1 < width and labels[y, x + 1] != here) or (y + 1 < height and labels[y + 1, x] != here)
            expected = [255] * 3 if border else (image[y, x] + colours[here]) // 2
            assert overlay[y, x].tolist() == list(expected), (y, x)


def cells_under_centre(i, pixels, cells=4):
    """The cells (of `cells` across `pixels`) under pixel i's centre: both where it lies on their border."""
    numerator, denominator = (2 * i + 1) * cells, 2 * pixels
    cell = numerator // denominator
    return {cell - 1, cell} if numerator % denominator == 0 else {cell}


def test_lowres_shows_the_feature_grid_masks_in_their_colours(outputs, sd):
    """lowres.png: each pixel in the colour of the grid cell under its centre, the cells labelled as
    segment() labels them with the run's options."""
    grid = emerdiff.segment(EXAMPLE, sd, **FAST_OPTIONS, upsample="bilinear").low_res_labels  # (4, 4): Step 1's
    colours = segment_colours(outputs)
    lowres = np.asarray(Image.open(outputs / "lowres.png").convert("RGB"))
    assert lowres.shape == (300, 451, 3)
    for y in range(300):
        for x in range(451):
            allowed = [colours[grid[row, column]].tolist()
                       for row in cells_under_centre(y, 300) for column in cells_under_centre(x, 451)]
            assert lowres[y, x].tolist() in allowed, (y, x)


def test_a_run_is_deterministic_for_a_seed(tiny_sd_dir, outputs, tmp_path):
    assert run_cli(tiny_sd_dir, tmp_path, "--image", str(EXAMPLE)) == 0
    assert np.array_equal(np.load(tmp_path / "chelsea" / "labels.npy"), np.load(outputs / "labels.npy"))


def test_the_script_runs_as_the_readme_says(tiny_sd_dir, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "emerdiff.py"), "--image", str(EXAMPLE),
                             "--weights", str(tiny_sd_dir), "--out", str(tmp_path), *FAST],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "chelsea.jpg: " in result.stdout and "segments" in result.stdout
    assert (tmp_path / "chelsea" / "labels.png").is_file()
    help_text = subprocess.run([sys.executable, str(ROOT / "emerdiff.py"), "--help"], capture_output=True,
                               text=True).stdout
    for option in ("--weights", "--variant", "--config-dir", "--out", "--masks", "--lam", "--tm", "--tf", "--feature-samples", "--seed",
                   "--size", "--device", "--dtype", "--no-injection", "--batch-size", "--save-diffmaps"):
        assert option in help_text


FLAGS = {  # each method flag, and segment()'s option it stands for (test_emerdiff checks each option's effect)
    "--tf": (["--tf", "41"], {"t_f": 41}), "--no-injection": (["--no-injection"], {"injection": False}),
    "--prompt": (["--prompt", "a photograph of a cat"], {"prompt": "a photograph of a cat"}),
    "--lam": (["--lam", "3"], {"lam": 3.0}), "--seed": (["--seed", "7"], {"seed": 7}),
    "--blur": (["--blur-kernel", "5", "--blur-sigma", "1.5"], {"blur": (5, 1.5)})}


def test_the_method_flags_reach_segment(tiny_sd_dir, sd, tmp_path, monkeypatch):
    """One run with every flag of FLAGS: its difference maps and embeddings are segment()'s with all
    those options (a flag left out would give another combination's), not the defaults'."""
    made = []
    monkeypatch.setattr(runner, "segment", lambda *args, **kwargs: made.append(emerdiff.segment(*args, **kwargs))
                        or made[-1])
    flags = [flag for flags, _ in FLAGS.values() for flag in flags]
    assert run_cli(tiny_sd_dir, tmp_path, "--image", str(EXAMPLE), *CHEAPEST, *flags) == 0
    options = {name: value for _, option in FLAGS.values() for name, value in option.items()}
    expected = emerdiff.segment(EXAMPLE, sd, **CHEAPEST_OPTIONS, **options)
    assert torch.allclose(made[0].difference_maps, expected.difference_maps, rtol=1e-5, atol=0)
    assert np.array_equal(np.load(tmp_path / "chelsea" / "embeddings.npy"), expected.embeddings)
    default = emerdiff.segment(EXAMPLE, sd, **CHEAPEST_OPTIONS)
    assert not np.allclose(expected.embeddings, default.embeddings, rtol=1e-2)


def test_a_folder_and_several_images(tiny_sd_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.open(EXAMPLE).save(folder / "a.png")
    Image.open(EXAMPLE).crop((0, 0, 200, 150)).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    assert run_cli(tiny_sd_dir, tmp_path / "out", "--image", str(folder), "--image", str(EXAMPLE)) == 0
    assert np.load(tmp_path / "out" / "b" / "labels.npy").shape == (150, 200)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"a", "b", "chelsea", "summary.json", "index.html"}


# ---- images of every kind are converted ----

def rgb_of(image, size=128):
    pixels, original = load_image(image, size)
    return (pixels[0].permute(1, 2, 0).numpy() + 1) / 2 * 255, original


def test_grayscale_rgba_cmyk_palette_and_16_bit_are_converted():
    gray = Image.new("L", (64, 64), 100)
    assert np.allclose(rgb_of(gray, 64)[0], 100, atol=1e-3)
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent: white shows
    assert np.allclose(rgb_of(rgba, 64)[0], 255, atol=1e-3)
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # red ink
    assert np.allclose(rgb_of(cmyk, 64)[0], np.asarray(cmyk.convert("RGB"), dtype=np.float32), atol=1e-3)
    palette = Image.open(EXAMPLE).convert("P")
    assert np.allclose(rgb_of(palette, (448, 320))[0],
                       np.asarray(palette.convert("RGB").resize((448, 320), Image.LANCZOS), dtype=np.float32), atol=1e-3)
    sixteen = Image.fromarray(np.full((64, 64), 257 * 128, dtype=np.uint16))  # a 16-bit gray of 50 %
    assert sixteen.mode.startswith("I") and np.allclose(rgb_of(sixteen, 64)[0], 128, atol=1e-3)


def test_exif_rotation_is_honoured(tiny_sd_dir, tmp_path):
    image = Image.open(EXAMPLE).crop((0, 0, 200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif)
    pixels, original = load_image(tmp_path / "rotated.jpg", 128)
    assert original == (100, 200)
    assert run_cli(tiny_sd_dir, tmp_path / "out", "--image", str(tmp_path / "rotated.jpg")) == 0
    assert np.load(tmp_path / "out" / "rotated" / "labels.npy").shape == (200, 100)


def test_segment_accepts_a_path_an_image_and_a_tensor(sd):
    options = dict(size=128, masks=3, feature_samples=2, kmeans_restarts=3)
    by_path = emerdiff.segment(EXAMPLE, sd, **options)
    by_image = emerdiff.segment(Image.open(EXAMPLE), sd, **options)
    assert np.array_equal(by_path.labels, by_image.labels) and by_path.labels.shape == (300, 451)
    assert by_path.low_res_labels.shape == (4, 4) and by_path.difference_maps.shape == (3, 128, 128)
    argmax = by_path.difference_maps.numpy().argmax(0)  # labels: argmax, then nearest by pixel centres
    rows, cols = (2 * np.arange(300) + 1) * 128 // 600, (2 * np.arange(451) + 1) * 128 // 902
    assert np.array_equal(by_path.labels, argmax[rows][:, cols])
    tensor = torch.from_numpy(np.asarray(Image.open(EXAMPLE), dtype=np.float32) / 255).permute(2, 0, 1)
    assert emerdiff.segment(tensor, sd, **options).labels.shape == (300, 451)


# ---- bad input: one line on stderr, exit status 2, nothing written ----

def expect_error(capsys, tmp_path, pattern, *args, weights=None):
    status = main(["--out", str(tmp_path / "out"), "--quiet", *(["--weights", str(weights)] if weights else []),
                   *args])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("emerdiff: error: ") and err.count("\n") == 1 and pattern in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_not_an_image(capsys, tmp_path, tiny_sd_dir):
    (tmp_path / "x.jpg").write_text("hello")
    expect_error(capsys, tmp_path, "x.jpg: not an image", "--image", str(tmp_path / "x.jpg"), weights=tiny_sd_dir)


def test_truncated_image(capsys, tmp_path, tiny_sd_dir):
    (tmp_path / "cut.jpg").write_bytes(EXAMPLE.read_bytes()[:4000])
    expect_error(capsys, tmp_path, "cut.jpg: cannot decode the image", "--image", str(tmp_path / "cut.jpg"),
                 weights=tiny_sd_dir)


def test_missing_image_and_empty_folder(capsys, tmp_path):
    expect_error(capsys, tmp_path, "nothing.jpg: no such file or folder", "--image", str(tmp_path / "nothing.jpg"))
    (tmp_path / "empty").mkdir()
    expect_error(capsys, tmp_path, "empty: no images", "--image", str(tmp_path / "empty"))


def test_too_small_image(capsys, tmp_path, tiny_sd_dir):
    Image.new("RGB", (40, 300)).save(tmp_path / "thin.png")
    expect_error(capsys, tmp_path, "the image is 40x300: at least 64 px", "--image", str(tmp_path / "thin.png"),
                 weights=tiny_sd_dir)


def test_more_masks_than_cells(capsys, tmp_path, tiny_sd_dir):
    expect_error(capsys, tmp_path, "20 masks but only 16 cells", "--image", str(EXAMPLE), "--masks", "20",
                 "--size", "128", weights=tiny_sd_dir)


def test_more_masks_than_a_fixed_sizes_cells_are_refused_before_anything_is_read_or_loaded(capsys, tmp_path):
    """A fixed --size's feature grid is known from the option alone (128 / 32: 4x4 cells): --masks 40 is refused
    before the image is looked at (there is none), --out made or any weights loaded (there are none)."""
    expect_error(capsys, tmp_path, "40 masks but only 16 cells in the 4x4 feature grid: lower --masks or raise --size",
                 "--image", str(tmp_path / "no-image.jpg"), "--masks", "40", "--size", "128",
                 weights=tmp_path / "no-weights")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, pattern", [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cuda"], "device 'cuda' is not available"),
    (["--tm", "280"], "t_m = 280 is not on the 50-step grid"),
    (["--size", "100"], "size 100x100: each side must be a multiple of 64"),
    (["--size", "big"], "--size big: use auto, N or WxH"),
    (["--masks", "0"], "masks must be between 1 and 256"),
], ids=["device", "no-cuda", "tm", "size", "size-text", "masks"])
def test_bad_options(capsys, tmp_path, args, pattern):
    expect_error(capsys, tmp_path, pattern, "--image", str(EXAMPLE), *args)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_a_cpu_without_instructions_for_it(capsys, tmp_path, monkeypatch, dtype):
    """Emulated half precision is refused on the CPU (measured about 60 times slower than float32 on
    this project's AVX2 CPU), and accepted where oneDNN says the CPU has the instructions."""
    import devices
    monkeypatch.setattr(devices, "cpu_computes", lambda wanted: False)
    expect_error(capsys, tmp_path, f"this CPU has no {dtype} instructions", "--image", str(EXAMPLE), "--device", "cpu",
                 "--dtype", dtype)
    assert not (tmp_path / "out").exists()  # refused before --out is made
    monkeypatch.setattr(devices, "cpu_computes", lambda wanted: wanted == getattr(torch, dtype))
    assert devices.pick_dtype(dtype, torch.device("cpu")) == getattr(torch, dtype)


def test_bad_weights(capsys, tmp_path, tiny_sd_dir):
    expect_error(capsys, tmp_path, "no such file or folder", "--image", str(EXAMPLE), weights=tmp_path / "nope")
    expect_error(capsys, tmp_path, "diffusion_pytorch_model.fp16.safetensors: file not found", "--image", str(EXAMPLE),
                 "--variant", "fp16", weights=tiny_sd_dir)


def test_out_of_memory_names_the_batch_size(capsys, tmp_path, tiny_sd_dir, monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(runner, "segment", exhausted)
    expect_error(capsys, tmp_path, "out of memory at --batch-size auto: lower it (e.g. --batch-size 4)",
                 "--image", str(EXAMPLE), weights=tiny_sd_dir)


def test_an_interrupted_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "labels.png"
    target.write_bytes(b"old")

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_save(target, broken)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["labels.png"]


def test_out_of_memory_on_the_cpu_or_mps_too(capsys, tmp_path, tiny_sd_dir, monkeypatch):
    def exhausted(*args, **kwargs):
        raise RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)")
    monkeypatch.setattr(runner, "segment", exhausted)
    expect_error(capsys, tmp_path, "out of memory at --batch-size 2", "--image", str(EXAMPLE), "--batch-size", "2",
                 weights=tiny_sd_dir)


def test_an_elongated_image_gets_a_clear_error(capsys, tmp_path, tiny_sd_dir):
    Image.new("RGB", (64, 20000)).save(tmp_path / "strip.png")
    expect_error(capsys, tmp_path, "too elongated for the automatic size", "--image", str(tmp_path / "strip.png"),
                 weights=tiny_sd_dir)


def test_repeated_names_get_their_own_folders():
    from pathlib import Path
    names = inputs.output_names([Path("a/x.jpg"), Path("b/x.jpg"), Path("c/x.png"), Path("y.jpg")])
    assert names == ["x", "x-2", "x-3", "y"]


def test_an_absurdly_large_image_is_refused_before_decoding(capsys, tmp_path, tiny_sd_dir, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # Pillow's bomb guard, scaled down to this test's image
    expect_error(capsys, tmp_path, "chelsea.jpg: cannot decode the image", "--image", str(EXAMPLE),
                 weights=tiny_sd_dir)


def test_a_bad_image_among_several_is_reported_and_the_others_done(capsys, tmp_path, tiny_sd_dir):
    Image.new("RGB", (40, 300)).save(tmp_path / "thin.png")
    status = run_cli(tiny_sd_dir, tmp_path / "out", "--image", str(tmp_path / "thin.png"), "--image", str(EXAMPLE))
    err = capsys.readouterr().err
    thin = tmp_path / "thin.png"
    assert status == 2 and err == f"emerdiff: error: {thin}: the image is 40x300: at least 64 px per side is needed\n"
    assert (tmp_path / "out" / "chelsea" / "labels.npy").is_file() and not (tmp_path / "out" / "thin").exists()


def test_images_are_checked_before_any_weights_load(capsys, tmp_path):
    (tmp_path / "notes.jpg").write_text("hello")  # with no image left to do, the (missing) weights never load
    expect_error(capsys, tmp_path, "notes.jpg: not an image", "--image", str(tmp_path / "notes.jpg"),
                 weights=tmp_path / "no-weights-here")


# ---- what a newcomer reads and looks at ----

@pytest.fixture
def project_copy(tmp_path):
    """A folder like the project's (links to its files and folders), where a snippet is saved and run."""
    for path in ROOT.iterdir():
        if not path.name.startswith("."):
            (tmp_path / path.name).symlink_to(path)
    return tmp_path


def readme_python_snippets() -> list[str]:
    """The Python API section's code blocks: the random-weight model's, then SD v1.5's."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def run_snippet(code: str, folder) -> list[str]:
    """The code saved as a file in `folder` and run there, as README says to."""
    script = folder / "snippet.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=folder)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_readme_api_snippet_runs_as_written_and_agrees_step_by_step(project_copy):
    """The first snippet as written, saved in the project's folder: segment() and the step-by-step calls
    give the same difference maps (the snippet prints allclose's answer) and the same low-resolution
    masks (printed after it here)."""
    random_weights, _ = readme_python_snippets()
    same_masks = "\nprint((seg.low_res_labels == labels.reshape(grid).numpy()).all())"  # and the k-means agrees
    assert run_snippet(random_weights + same_masks, project_copy) == ["(300, 451) (4, 4) (4, 128, 128)", "True", "True"]


def test_the_readme_sd15_snippet_loads_and_segments(tiny_sd_dir, project_copy):
    """The second snippet after the first, its weights a diffusers-layout folder of the tiny model
    (the hub's layout) instead of the download, and options that take seconds."""
    random_weights, sd15 = readme_python_snippets()
    cheaper = {"load_stable_diffusion(device=device": f"load_stable_diffusion({str(tiny_sd_dir)!r}, device=device",
               "segment(image, sd)": "segment(image, sd, size=128, masks=3, feature_samples=2, kmeans_restarts=2)"}
    for old, new in cheaper.items():  # only the weights and the cost change; each must still be in the README
        assert old in sd15, old
        sd15 = sd15.replace(old, new)
    shapes = "\nprint(seg.labels.shape, tuple(seg.difference_maps.shape), len(seg.embeddings))"
    assert run_snippet(random_weights + sd15 + shapes, project_copy)[-1] == "(300, 451) (3, 128, 128) 3"


def test_the_difference_map_grid_has_one_captioned_tile_per_segment():
    maps = torch.rand(5, 40, 60, generator=torch.Generator().manual_seed(0))
    grid = np.asarray(page.diffmap_grid(page.diffmap_pictures(maps.numpy()))).astype(int)
    caption, cell_h, cell_w = 16, 40 + 16 + 2, 60 + 2  # caption strip above each map, 2 px apart
    assert grid.shape == (2 * cell_h, 3 * cell_w, 3)  # 5 tiles: 3 columns, 2 rows
    for i, m in enumerate(maps):
        top, left = i // 3 * cell_h, i % 3 * cell_w
        tile = grid[top + caption:top + caption + 40, left:left + 60]
        expected = (m / m.max() * 255).numpy().astype(int)[..., None]  # grey: scaled to its own maximum
        assert np.abs(tile - expected).max() <= 1
        strip = grid[top:top + caption, left:left + cell_w]
        swatch = (strip == page.COLOURS[i]).all(-1)  # the segment's colour in labels.png / overlay.png
        assert swatch.sum() >= 100 and (strip.max(-1) - strip.min(-1) > 0).any()
        text = strip[:, 14:]  # the index beside the swatch, in white (antialiased: light grey)
        assert ((text.min(-1) > 100) & (text.max(-1) == text.min(-1))).sum() > 5


def test_help_gives_ranges_and_no_empty_defaults():
    help_text = " ".join(subprocess.run([sys.executable, str(ROOT / "emerdiff.py"), "--help"], capture_output=True,
                                        text=True).stdout.split())
    assert "(default: None)" not in help_text and "(default: False)" not in help_text
    for words in ("1..256", "> 0", "0..999", "0..2^63-1", "64..2048", "odd, 1..63", "2..1000", "in pixels"):
        assert words in help_text, words


def test_a_long_run_off_cuda_first_says_how_long(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "LONG_RUN_S", 0)  # the tiny model is fast: count every run as long
    assert run_cli(tiny_sd_dir, tmp_path, "--image", str(EXAMPLE)) == 0
    # FAST: 2 feature draws at 0.4 of a call, 15 inversion steps, 2 x 4 runs of 15 steps; 8 decodes
    line, = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"emerdiff: about \d+ min per image on the cpu \(\d+ UNet calls of \d+ images in all, a call "
                        r"of one \d+\.\d\d s, and 8 decodes; the fastest of 3 timed calls, the slowest \d+ % slower\): "
                        r"--masks, --feature-samples, --size and --steps cut it \(README, Time and cost\)", line), line


def test_estimate_prints_what_each_working_size_costs_with_sd15_and_writes_nothing(sd, tmp_path, capsys, monkeypatch):
    """--estimate builds SD v1.5's architecture with random weights (here the tiny model in its place, that this
    test takes seconds, not 4 GB) and times it at each image's working size, read from its header (an EXIF
    rotation turns it): one line per size on stdout, the status 0, no --out made, no weights read. The model's
    calls move the clock by a price each (a UNet call of one image 10 s, at the smallest latent 2.5 s, a decode
    20 s), so the figures are worked out by hand for 3 masks, 10 draws, batches of 4 and t_m = 281 on the 50-step
    grid (15 steps): the feature passes in 3 calls, the inversion in 4, each modulated step in 2 calls of 3 runs."""
    import weights
    built = []
    monkeypatch.setattr(weights, "random_stable_diffusion", lambda *how: built.append(how) or sd)
    priced_calls(monkeypatch, sd, unet_s=10.0, fixed_s=2.5, decode_s=20.0)
    save_image(tmp_path / "wide.png", (96, 64))  # 3:2 as the example (451x300): 640x448 both
    turned = Image.Exif()
    turned[0x0112] = 6  # a quarter turn: 96x64 as stored, 64x96 shown
    Image.open(save_image(tmp_path / "x.png", (96, 64))).save(tmp_path / "turned.jpg", exif=turned)
    given = [part for path in (EXAMPLE, tmp_path / "wide.png", tmp_path / "turned.jpg") for part in ("--image", path)]
    status = main([*map(str, given), "--estimate", "--masks", "3", "--feature-samples", "10", "--batch-size", "4",
                   "--plain", "--weights", str(tmp_path / "no-weights"), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    steps, m, f = 15, devices.MODULATED_STEP["cpu"], devices.FEATURE_PASS
    calls, images = f * 3 + 4 + steps * 2, f * 10 + steps + m * 6 * steps
    by_hand = devices.Estimate(calls * 2.5 + images * 7.5 + 6 * 20.0, calls, images, 10.0, 2.5, 6, 0.0)
    line = by_hand.line(torch.device("cpu"))
    assert status == 0 and built == [("sd15", torch.device("cpu"), torch.float32)], err
    assert out == f"SD v1.5 at 640x448, 2 images: {line}\nSD v1.5 at 448x640, 1 image: {line}\n"
    assert "nothing downloaded" in err and "error" not in err and not (tmp_path / "out").exists()


def test_run_json_and_the_summary_say_how_many_denoising_steps_ran(outputs):
    """--steps 50 is the grid's size, not the steps run: each run makes 15, t_m = 281, 261, ..., 1. run.json's
    result and summary.json, whose options the page shows, say so; run.json's record, which a rerun compares,
    keeps its keys."""
    run = json.loads((outputs / "run.json").read_text())
    summary = json.loads((outputs.parent / "summary.json").read_text())
    said = "15 of the 50-step grid's steps, from t_m = 281 down to 1"
    assert run["result"]["denoising_steps"] == said and summary["denoising_steps"] == said
    assert set(run["run"]) == {"image", "weights", "options", "diffmaps"} and run["run"]["options"]["steps"] == 50
    assert inputs.denoising_in_words(emerdiff.DEFAULTS | dict(steps=10, t_m=101)) == (
        "2 of the 10-step grid's steps, from t_m = 101 down to 1")  # t = 101, 1 on a grid 100 apart
    assert inputs.denoising_in_words(emerdiff.DEFAULTS | dict(upsample="bilinear")).startswith("none")
