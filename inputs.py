"""What `emerdiff.segment` accepts, checked before any work is done: images, sizes and options.

Kept apart from emerdiff.py so that the method reads without detours: everything here turns what a
caller gives into what the method needs (an RGB image, a working size that the networks can take,
options of the right type and range), or refuses it with an `EmerDiffError` of one line that says
what was wrong and what to do. Each check lives here once; the command line (runner.py) reuses them.
The step functions of emerdiff.py, called alone, check their tensors here too (check_tensors: a one-line
TypeError or ValueError, as Python's own functions raise). Last, the command line's images: the files,
folders and lists of --image, or a dataset's (datasets.py), each with the name of its output folder.
"""
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

import sampler
from datasets import IMAGE_SUFFIXES, dataset_samples
from files import MAX_SEGMENTS, FileError, checked_file, folder_name, listed_folder

# Sizes. The VAE halves the image three times (latent = image / 8) and the UNet the latent three
# more: image sides are multiples of 64, and the 16x16 ("up16") block sees image / 32.
LATENT_FACTOR = 8  # image side / latent side
GRID_FACTOR = 32  # image side / side of the feature grid the method clusters and modulates
SIZE_MULTIPLE = 64
MAX_SIDE = 2048  # the largest side --size takes: 16 times 512x512's latents (its memory not measured yet)
AUTO_AREA = 512 * 512  # size "auto": about this many pixels, the area SD v1 was trained at


class EmerDiffError(Exception):
    """Bad input to the method; the message is one line that says what to do."""


# ---- Images ----

def as_image(image) -> Image.Image | torch.Tensor:
    """What `segment` accepts, as an RGB PIL image or a (1, 3, H, W) float tensor in [0, 1].

    A path or a PIL image (any mode, see to_rgb); a numpy array (H, W, 3) or a tensor (3, H, W) /
    (1, 3, H, W), either uint8 or float in [0, 1]. uint8 pixels go through Pillow, as a file's
    would. Anything else is an EmerDiffError that says what was given.
    """
    if isinstance(image, (str, os.PathLike)):
        return to_rgb(open_image(image))
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise EmerDiffError(f"an image array must be RGB, (H, W, 3); got shape {image.shape}")
        if image.dtype != np.uint8 and image.dtype.kind != "f":
            raise EmerDiffError(f"image values must be uint8, or float in [0, 1]; got an array of {image.dtype}")
        image = torch.from_numpy(torch_ready(image)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.ndim == 4 and image.shape[0] != 1:
            raise EmerDiffError(f"a batch of {image.shape[0]} images: segment them one at a time")
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise EmerDiffError(f"an image tensor must be RGB, (3, H, W) or (1, 3, H, W); got {tuple(image.shape)}")
        if image.is_meta:
            raise EmerDiffError("a meta tensor holds no pixel values: give one with data")
        if image.layout != torch.strided:  # sparse
            image = image.to_dense()
        image = image.reshape(image.shape[-3:])
    else:
        raise EmerDiffError(f"cannot read an image from {type(image).__name__}: give a path, a PIL image, "
                            "a numpy array (H, W, 3) or a tensor (3, H, W)")
    return checked_pixels(image.detach().cpu())


def torch_ready(array: np.ndarray) -> np.ndarray:
    """A copy of an image array (the input may be read-only) that torch can take: in this machine's
    byte order, and floats wider than float64 (longdouble) as float64 where their values fit."""
    if array.dtype.kind == "f" and array.dtype.itemsize > 8:
        largest = np.abs(array).max()
        if largest > np.finfo(np.float64).max:
            raise EmerDiffError(f"float image values must be in [0, 1]; this array holds {largest!s}")
        return array.astype(np.float64)
    return array.astype(array.dtype.newbyteorder("="))


def checked_pixels(pixels: torch.Tensor) -> Image.Image | torch.Tensor:
    """(3, H, W) uint8 -> a PIL image; float in [0, 1] -> (1, 3, H, W) fp32; anything else refused."""
    if pixels.numel() == 0:
        raise EmerDiffError(f"the image is empty (shape {tuple(pixels.shape)})")
    if pixels.dtype == torch.uint8:
        return Image.fromarray(pixels.permute(1, 2, 0).numpy())
    if not pixels.is_floating_point():
        raise EmerDiffError(f"image values must be uint8, or float in [0, 1]; got {pixels.dtype}")
    pixels = pixels.float()
    if not torch.isfinite(pixels).all():
        raise EmerDiffError("the image holds NaN or infinite values")
    low, high = pixels.min().item(), pixels.max().item()
    if low < 0 or high > 1:
        raise EmerDiffError(f"float image values must be in [0, 1], these span {low:.9g}..{high:.9g} "
                            "(divide 0..255 values by 255)")
    return pixels[None]


def open_image(path, decode: bool = True) -> Image.Image:
    """The image at `path`, decoded (or only its header read: decode=False), or a one-line error.
    Pillow's warnings (corrupt EXIF, large images) are not shown: a problem is an error or nothing."""
    try:
        checked_file(path)  # a FIFO or a device would block or never end
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(path)
            if decode:
                image.load()
    except FileError as e:
        raise EmerDiffError(str(e)) from None
    except FileNotFoundError:
        raise EmerDiffError(f"{path}: no such file") from None
    except PermissionError:
        raise EmerDiffError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise EmerDiffError(f"{path}: not an image that Pillow can read") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise EmerDiffError(f"{path}: cannot decode the image ({e})") from None
    return image


ORIENTATION = 0x0112  # the EXIF (or XMP) tag of how the image is turned: 5 to 8 turn it a quarter


def upright_size(image: Image.Image, exif_rotation: bool = True) -> tuple[int, int]:
    """(width, height) of `image` as to_rgb will give it, from its header alone: an orientation that turns it a
    quarter swaps the sides (unless exif_rotation is False, the pixels taken as stored)."""
    with warnings.catch_warnings():  # a malformed EXIF tag is ignored, as to_rgb ignores it
        warnings.simplefilter("ignore")
        turned = exif_rotation and image.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8)
    return image.size[::-1] if turned else image.size


def to_rgb(image: Image.Image, exif_rotation: bool = True) -> Image.Image:
    """RGB of any Pillow mode: EXIF rotation applied (or, where the pixels must stay as stored to align
    with a dataset's label maps, the EXIF data dropped, so that no later step rotates them), alpha
    composited on white, 16-bit scaled."""
    if exif_rotation:
        with warnings.catch_warnings():  # a malformed EXIF tag is ignored, as Pillow then does
            warnings.simplefilter("ignore")
            image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        scale = 1 / 257 if image.mode != "F" else 255
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) * scale, 0, 255).astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    else:
        rgb = image.convert("RGB")
    if not exif_rotation:
        rgb.info.clear()  # EXIF, and XMP, which Pillow reads an orientation from too
    return rgb


# ---- Sizes ----

def working_size(width: int, height: int, size="auto") -> tuple[int, int]:
    """(W, H) to run a width x height image at: multiples of 64; "auto" keeps the aspect ratio at an
    area of about 512^2 (the notebook's rule), an int is a square, a pair is (W, H). Images under
    64 px a side are refused."""
    if min(width, height) < SIZE_MULTIPLE:
        raise EmerDiffError(f"the image is {width}x{height}: at least {SIZE_MULTIPLE} px per side is needed")
    if size != "auto":
        return fixed_size(size)
    scale = math.sqrt(AUTO_AREA / (width * height))
    auto = tuple(max(SIZE_MULTIPLE, -(-int(side * scale) // SIZE_MULTIPLE) * SIZE_MULTIPLE) for side in (width, height))
    if max(auto) > MAX_SIDE:
        raise EmerDiffError(f"the image is {width}x{height}: too elongated for the automatic size; "
                            "crop it or give --size")
    return auto


def fixed_size(size) -> tuple[int, int]:
    """An explicit working size, N (square) or (W, H), checked: sides multiples of 64 within 64..2048; a
    size refused names the nearest ones taken."""
    size = (size, size) if is_int(size) else tuple(size)
    if any(side % SIZE_MULTIPLE or not SIZE_MULTIPLE <= side <= MAX_SIDE for side in size):
        raise EmerDiffError(f"size {size[0]}x{size[1]}: each side must be a multiple of {SIZE_MULTIPLE} "
                            f"between {SIZE_MULTIPLE} and {MAX_SIDE}: use {nearest_sizes(size)}")
    return size


def nearest_sizes(size: tuple[int, int]) -> str:
    """The sizes taken nearest to (W, H), each side rounded down, then up, to a multiple of 64 within
    64..2048, in --size's words: "64 or 128" for 100x100, "64x128 or 128" for 100x128."""
    def rounded(side: int, up: bool) -> int:
        multiples = side // SIZE_MULTIPLE + (up and side % SIZE_MULTIPLE > 0)
        return min(MAX_SIDE, max(SIZE_MULTIPLE, multiples * SIZE_MULTIPLE))
    sizes = [(rounded(size[0], up), rounded(size[1], up)) for up in (False, True)]
    return " or ".join(dict.fromkeys(f"{width}" if width == height else f"{width}x{height}" for width, height in sizes))


def feature_grid(height: int, width: int) -> tuple[int, int]:
    """(h, w) of the feature grid of a height x width working size: 16x16 at 512x512."""
    return height // GRID_FACTOR, width // GRID_FACTOR


def check_masks_fit(masks: int, grid: tuple[int, int]):
    """K masks need at least K cells of the feature grid. Only a fixed size can have too few (check_options
    checks it, before any image is read): an automatic size has an area of at least 512x512 (its sides are
    rounded up), 256 cells, and K is at most MAX_MASKS, 256 (tests/test_reliability.py checks both)."""
    if masks > grid[0] * grid[1]:
        raise EmerDiffError(f"{masks} masks but only {grid[0] * grid[1]} cells in the {grid[1]}x{grid[0]} "
                            "feature grid: lower --masks or raise --size")


# ---- The step functions' tensors ----

def check_tensors(function: str, **given):
    """Refuse, in one line naming what `function` takes, an argument that is not a torch tensor of the shape
    its docstring gives: emerdiff.py's step functions can be imported and called alone. Each keyword is
    name=(tensor, shape): a shape such as "(N, D)", whose letters are sizes of at least 1 that agree wherever
    a letter comes again, "h*w" the product of sizes known by then, and numbers fixed; or name=size, a size
    known beforehand (a grid's h and w). A TypeError for what is no tensor, a ValueError for a wrong shape."""
    sizes = {name: value for name, value in given.items() if not isinstance(value, tuple)}
    for name, (value, shape) in ((n, v) for n, v in given.items() if n not in sizes):
        takes = f"{function} takes {name} as a non-empty torch tensor {shape}"
        if not isinstance(value, torch.Tensor):
            module = type(value).__module__
            kind = type(value).__name__ if module == "builtins" else f"{module}.{type(value).__name__}"
            hint = " (torch.from_numpy makes one of it)" if module == "numpy" else ""
            raise TypeError(f"{takes}; got {kind}{hint}")
        known = ", ".join(f"{letter} = {size}" for letter, size in sizes.items())
        dims = [dim.strip() for dim in shape.strip("()").split(",") if dim.strip()]
        if value.ndim != len(dims) or not all(fits(dim, size, sizes) for dim, size in zip(dims, value.shape)):
            raise ValueError(f"{takes}; got shape {tuple(value.shape)}" + (f" where {known}" if known else ""))


def fits(dim: str, size: int, sizes: dict) -> bool:
    """Whether `size` can be the dimension `dim` of a shape (check_tensors), a letter taking the size it
    first comes with."""
    if dim.isdigit():
        return size == int(dim)
    if "*" in dim:
        return size == math.prod(sizes[letter] for letter in dim.split("*"))
    return size >= 1 and sizes.setdefault(dim, size) == size


# ---- Options ----

def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_pair(value, first, second) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and first(value[0]) and second(value[1])


def is_text(value: str) -> bool:
    """A string the tokenizer can encode: no unpaired surrogate (what an undecodable argv byte becomes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_flag(value) -> bool:
    return isinstance(value, bool)


def is_auto_int_or_pair(value) -> bool:
    return value == "auto" if isinstance(value, str) else is_int(value) or is_pair(value, is_int, is_int)


UPSAMPLING = ("modulation", "bilinear")  # the method's Steps 2-4, or the paper's baseline
# What each option must be: (check, the words for it).
OPTION_TYPES = {
    "masks": (is_int, "an integer"), "lam": (is_real, "a finite number"), "t_m": (is_int, "an integer"),
    "t_f": (is_int, "an integer"), "feature_samples": (is_int, "an integer"),
    "kmeans_restarts": (is_int, "an integer"), "seed": (is_int, "an integer"),
    "size": (is_auto_int_or_pair, '"auto", an integer or (width, height)'),
    "injection": (is_flag, "True or False"),
    "steps": (is_int, "an integer"), "prompt": (lambda v: isinstance(v, str), "a string"),
    "blur": (lambda v: is_pair(v, is_int, is_real), "(kernel size, sigma)"),
    "upsample": (lambda v: isinstance(v, str) and v in UPSAMPLING, " or ".join(f'"{u}"' for u in UPSAMPLING)),
}
SPEED_OPTION_TYPES = {  # the keys of the option `speed`
    "batch_size": (is_auto_int_or_pair, '"auto", an integer or (UNet runs, decodes) per call'),
    "compile": (is_flag, "True or False"), "plain": (is_flag, "True or False"),
}
MAX_MASKS = MAX_SEGMENTS  # one segment per mask
MAX_BATCH_SIZE = 2 ** 31 - 1  # torch's sizes are 64-bit; a whole run has far fewer runs (2K) or decodes
MAX_BLUR_KERNEL = 63  # the reflect padding needs it below the smallest working side (64)


def checked_options(options: dict, defaults: dict) -> dict:
    """`defaults` updated with `options` (and the `speed` dict's defaults with its keys given), each checked:
    an unknown name is a TypeError that lists the known ones; a wrong type or a value out of range an
    EmerDiffError naming the option."""
    speed = options.get("speed", {})
    if not isinstance(speed, dict):
        raise EmerDiffError(f"option speed must be a dict of some of {sorted(SPEED_OPTION_TYPES)}, not {speed!r:.40}")
    for given, known, what in ((options, defaults, "options"), (speed, defaults["speed"], "speed options")):
        unknown = set(given) - set(known)
        if unknown:
            raise TypeError(f"unknown {what} {sorted(unknown)}; known: {sorted(known)}")
    o = defaults | options | {"speed": defaults["speed"] | speed}
    check_options(o)
    return plain_ints(o)


def plain_ints(value):
    """Integers of any type (numpy's: numbers.Integral) as Python ints, alone or in a pair: torch's
    functions take only those."""
    if is_int(value):
        return int(value)
    if isinstance(value, dict):
        return {name: plain_ints(v) for name, v in value.items()}
    return type(value)(map(plain_ints, value)) if isinstance(value, (tuple, list)) else value


def check_options(o: dict):
    """One-line errors for options of the wrong type or out of range, before any work is done."""
    for values, types, prefix in ((o, OPTION_TYPES, ""), (o["speed"], SPEED_OPTION_TYPES, "speed ")):
        for name, (ok, kind) in types.items():
            if not ok(values[name]):
                raise EmerDiffError(f"option {prefix}{name} must be {kind}, not {values[name]!r:.40}")
    if not 2 <= o["steps"] <= sampler.TRAIN_STEPS:
        raise EmerDiffError(f"steps must be between 2 and {sampler.TRAIN_STEPS}")
    kernel, sigma, batch = *o["blur"], o["speed"]["batch_size"]
    checks = [(1 <= o["masks"] <= MAX_MASKS, f"masks must be between 1 and {MAX_MASKS}"),
              (o["lam"] > 0, "lambda (lam) must be above 0: it is the strength of the modulation"),
              (0 <= o["t_f"] < sampler.TRAIN_STEPS, f"t_f must be a timestep in 0..{sampler.TRAIN_STEPS - 1}"),
              (o["feature_samples"] >= 1, "feature samples must be at least 1"),
              (o["kmeans_restarts"] >= 1, "k-means restarts must be at least 1"),
              (0 <= o["seed"] < 2 ** 63, "seed must be between 0 and 2^63 - 1"),
              (batch == "auto" or all(1 <= int(n) <= MAX_BATCH_SIZE for n in np.ravel(batch)),
               "batch size must be between 1 and 2^31 - 1 (runs or decodes per call; a whole run has fewer)"),
              (1 <= kernel <= MAX_BLUR_KERNEL and kernel % 2 == 1,
               f"the blur kernel size must be odd, from 1 to {MAX_BLUR_KERNEL}"),
              (sigma > 0, "the blur sigma must be above 0"),
              (not (o["speed"]["plain"] and o["speed"]["compile"]),
               "speed options plain and compile exclude each other: plain runs the models as written, uncompiled"),
              (is_text(o["prompt"]), "the prompt holds a character that is no text (an undecodable byte of the "
               "command line?): give it in UTF-8")]
    for ok, message in checks:
        if not ok:
            raise EmerDiffError(message)
    try:
        sampler.timesteps_until(o["t_m"], o["steps"])  # the one check that t_m lies on the grid
    except ValueError as e:
        raise EmerDiffError(str(e)) from None
    if o["size"] != "auto":
        check_masks_fit(o["masks"], feature_grid(*fixed_size(o["size"])[::-1]))


def denoising_steps(o: dict) -> int:
    """The denoising steps each run makes with options `o`: the `steps`-step grid's from t_m down to 1 (15 of 50
    with the defaults); none for the bilinear baseline."""
    return 0 if o["upsample"] == "bilinear" else len(sampler.timesteps_until(o["t_m"], o["steps"]))


def denoising_in_words(o: dict) -> str:
    """denoising_steps in words, for run.json and the page, where a bare "steps 50" would read as 50 steps run."""
    if o["upsample"] == "bilinear":
        return "none: the bilinear baseline runs no denoising"
    return f"{denoising_steps(o)} of the {o['steps']}-step grid's steps, from t_m = {o['t_m']} down to 1"


# ---- The command line's images ----

LIST_SUFFIX = ".txt"


@dataclass(frozen=True)
class Job:
    """One image to segment, the name of its output folder (files.folder_name), whether its centre
    square is segmented (DiffSeg's presets), and whether its pixels are taken as stored, EXIF rotation
    ignored: a dataset's images, whose label maps ignore it too."""
    path: Path
    name: str
    crop: bool = False
    as_stored: bool = False


def all_jobs(args, skip) -> list[Job]:
    """The command line's images, in a fixed order, with their output folder names; a file of a folder that
    is no image is passed over, said through `skip` (one line)."""
    if args.dataset is None:
        if args.root or args.list:
            raise EmerDiffError("--root and --list go with --dataset; for --image, list images in a .txt file")
        paths = image_paths(args.image, skip)
        return [Job(path, name) for path, name in zip(paths, output_names(paths))]
    if args.root is None:
        raise EmerDiffError(f"--dataset {args.dataset} needs --root, the dataset's folder")
    return [Job(s.image, folder_name(s.stem), s.crop, as_stored=True)
            for s in dataset_samples(args.dataset, args.root, args.list)]


def image_paths(given: list[str], skip) -> list[Path]:
    """The images named on the command line: files, the images of folders (regular files only;
    anything else is skipped with a line) and the paths listed in .txt files."""
    paths = []
    for name in given:
        path = Path(name)
        if path.is_dir():
            found = []
            for p in (p for p in listed_folder(path) if p.suffix.lower() in IMAGE_SUFFIXES):
                try:  # regular files (or links to them) only: a FIFO would block the run
                    found.append(checked_file(p))
                except FileError as e:
                    skip(f"skipping {e}")
            if not found:
                raise EmerDiffError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            paths += found
        elif path.suffix.lower() == LIST_SUFFIX and path.is_file():
            paths += listed_paths(path)
        elif path.exists():
            paths.append(path)  # a FIFO or a device is refused by open_image with one line
        else:
            raise EmerDiffError(f"{path}: no such file or folder")
    return paths


def listed_paths(list_file: Path) -> list[Path]:
    """The image paths of a list file: one per line, relative to the file's folder; blank lines
    and lines starting with # are skipped."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EmerDiffError(f"{list_file}: cannot read the list ({e})") from None
    paths = [list_file.parent / line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not paths:
        raise EmerDiffError(f"{list_file}: the list names no image")
    return paths


def output_names(paths: list[Path]) -> list[str]:
    """One output folder name per image: its stem (made safe by files.folder_name), numbered where
    names repeat (ignoring case)."""
    names, taken = [], set()
    for path in paths:
        name, n = folder_name(path.stem), 1
        while name.casefold() in taken:  # names alike but for case are one folder on macOS and Windows
            n += 1
            name = folder_name(f"{path.stem}-{n}")
        names.append(name)
        taken.add(name.casefold())
    return names
