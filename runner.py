"""The command line: images in, one folder of outputs per image out.

    python emerdiff.py --image x.jpg [--image folder/ ...] [options]

emerdiff.py is the method; this file is everything around it that a command line needs: the
options, finding the images, the pictures written per image, and writing them safely.
"""
import argparse
import colorsys
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from emerdiff import (DEFAULTS, MAX_MASKS, EmerDiffError, Segmentation, check_options, check_size, model_device_dtype,
                      open_image, pick_device, pick_dtype, segment, to_rgb)


def palette(k: int) -> np.ndarray:
    """k well-separated colours (k, 3) uint8: hues stepped by the golden ratio."""
    hues = (np.arange(k) * 0.618033988749895) % 1
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.75, 0.95)] for h in hues], dtype=np.uint8)


def overlay(image: Image.Image, labels: np.ndarray, colours: np.ndarray) -> Image.Image:
    """The image half-tinted by segment colour, with segment borders drawn in white."""
    blend = (0.5 * np.asarray(image, dtype=np.float32) + 0.5 * colours[labels]).astype(np.uint8)
    border = np.zeros(labels.shape, dtype=bool)
    border[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    border[:-1, :] |= labels[:-1, :] != labels[1:, :]
    blend[border] = 255
    return Image.fromarray(blend)


def diffmap_grid(maps: torch.Tensor, tile: int = 256) -> Image.Image:
    """The K difference maps side by side, each scaled to its own maximum (white = most change)."""
    k, h, w = maps.shape
    scale = min(1.0, tile / max(h, w))
    maps = F.interpolate(maps[:, None], scale_factor=scale, mode="area")[:, 0] if scale < 1 else maps
    maps = maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    columns = math.ceil(math.sqrt(k))
    rows = math.ceil(k / columns)
    th, tw = maps.shape[1:]
    canvas = torch.zeros(rows * (th + 2), columns * (tw + 2))
    for i, m in enumerate(maps):
        r, c = divmod(i, columns)
        canvas[r * (th + 2):r * (th + 2) + th, c * (tw + 2):c * (tw + 2) + tw] = m
    return Image.fromarray((canvas.numpy() * 255).astype(np.uint8))


def atomic_save(path: Path, write):
    """Write through a temporary file in the same folder, then rename: no half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_outputs(seg: Segmentation, image: Image.Image, out_dir: Path, save_diffmaps: bool = False):
    """labels.png (palette PNG, value = segment), labels.npy, overlay.png, lowres.png[, diffmaps.png]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = palette(MAX_MASKS)
    labels_png = Image.fromarray(seg.labels, mode="P")
    labels_png.putpalette(colours.flatten().tolist())
    lowres = Image.fromarray(colours[seg.low_res_labels]).resize(image.size, Image.NEAREST)
    images = {"labels.png": labels_png, "overlay.png": overlay(image, seg.labels, colours), "lowres.png": lowres}
    if save_diffmaps:
        images["diffmaps.png"] = diffmap_grid(seg.difference_maps)
    for name, picture in images.items():
        atomic_save(out_dir / name, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))

    def save_npy(tmp):
        with open(tmp, "wb") as f:
            np.save(f, seg.labels)
    atomic_save(out_dir / "labels.npy", save_npy)


# ---- The command line ----

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="emerdiff.py", description="EmerDiff (ICLR 2024): training-free segmentation from Stable Diffusion. "
        "Writes labels.png, labels.npy, overlay.png and lowres.png per image.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image", action="append", required=True,
                   help="an image file or a folder of images; give it several times for several")
    p.add_argument("--weights", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="SD v1.x: hub repo id, diffusers folder or single .safetensors file (see weights.md)")
    p.add_argument("--config-dir", help="for a single-file --weights: a diffusers folder with the tokenizer/configs")
    p.add_argument("--variant", choices=["fp16"], help="for a hub id: download the half-size fp16 files")
    p.add_argument("--out", default="emerdiff_out", help="output folder; one subfolder per image")
    p.add_argument("--masks", type=int, default=DEFAULTS["masks"], help="K, the number of low-resolution masks")
    p.add_argument("--lam", type=float, default=DEFAULTS["lam"], help="lambda, the modulation strength")
    p.add_argument("--tm", type=int, default=DEFAULTS["t_m"], help="t_m, the modulation timestep (on the step grid)")
    p.add_argument("--tf", type=int, default=DEFAULTS["t_f"], help="t_f, the feature timestep (the notebook uses 0)")
    p.add_argument("--feature-samples", type=int, default=DEFAULTS["feature_samples"],
                   help="noise draws averaged for the features")
    p.add_argument("--kmeans-restarts", type=int, default=DEFAULTS["kmeans_restarts"], help="k-means++ restarts")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of every random draw")
    p.add_argument("--size", default="auto",
                   help="working size: auto (area ~512x512, aspect kept, sides multiples of 64), N or WxH")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="the DDPM grid (50: t = 981, 961, ..., 1)")
    p.add_argument("--prompt", default=DEFAULTS["prompt"], help="the text condition (the paper: empty)")
    p.add_argument("--blur-kernel", type=int, default=DEFAULTS["blur"][0], help="Gaussian blur kernel size")
    p.add_argument("--blur-sigma", type=float, default=DEFAULTS["blur"][1], help="Gaussian blur sigma")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="model precision; auto: float16 on a GPU, float32 on the CPU")
    p.add_argument("--no-injection", action="store_true", help="turn attention injection off")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help="denoising runs (and decodes) per batch; lower it when GPU memory runs out")
    p.add_argument("--save-diffmaps", action="store_true", help="also write diffmaps.png, a grid of the K maps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def parse_size(text: str):
    """--size: "auto", "N" (N x N) or "WxH", checked before any model is loaded."""
    text = text.lower()
    if text == "auto":
        return "auto"
    parts = text.split("x")
    if len(parts) not in (1, 2) or not all(part.isdigit() for part in parts):
        raise EmerDiffError(f"--size {text}: use auto, N or WxH")
    return check_size((int(parts[0]), int(parts[-1])))


def image_paths(given: list[str]) -> list[Path]:
    paths = []
    for name in given:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise EmerDiffError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise EmerDiffError(f"{path}: no such file or folder")
    return paths


def output_names(paths: list[Path]) -> list[str]:
    """One output folder name per image: its stem, numbered where stems repeat."""
    names = []
    for path in paths:
        name, n = path.stem, 1
        while name in names:
            n += 1
            name = f"{path.stem}-{n}"
        names.append(name)
    return names


def run(args) -> int:
    """Segment every image of the command line; returns how many failed (each said in one line)."""
    from weights import load_stable_diffusion
    paths = image_paths(args.image)
    options = dict(masks=args.masks, lam=args.lam, t_m=args.tm, t_f=args.tf, feature_samples=args.feature_samples,
                   kmeans_restarts=args.kmeans_restarts, seed=args.seed, size=parse_size(args.size),
                   injection=not args.no_injection, batch_size=args.batch_size, steps=args.steps,
                   prompt=args.prompt, blur=(args.blur_kernel, args.blur_sigma))
    check_options(DEFAULTS | options)
    for path in paths:  # every file must at least be an image before any weights are loaded
        open_image(path, decode=False).close()
    device = pick_device(args.device)
    sd = load_stable_diffusion(args.weights, device=device, dtype=pick_dtype(args.dtype, device),
                               variant=args.variant, config_dir=args.config_dir)
    failed = 0
    for path, name in zip(paths, output_names(paths)):
        try:
            segment_file(path, Path(args.out) / name, sd, options, args)
        except EmerDiffError as e:  # say it, and go on with the other images
            message = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
            print(f"emerdiff: error: {message}", file=sys.stderr)
            failed += 1
    return failed


def segment_file(path: Path, out_dir: Path, sd, options: dict, args):
    """Segment one image file, write its outputs, print its one-line summary."""
    device, _ = model_device_dtype(sd)
    image = to_rgb(open_image(path))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seg = segment(image, sd, progress=not args.quiet, **options)
    clock = time.perf_counter()
    save_outputs(seg, image, out_dir, args.save_diffmaps)
    seg.seconds["saving"] = time.perf_counter() - clock
    stages = ", ".join(f"{stage} {s:.1f} s" for stage, s in seg.seconds.items())
    memory = (f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
              if device.type == "cuda" else "")
    print(f"{path}: {int(seg.labels.max()) + 1} segments -> {out_dir}/ ({stages}{memory})")


def main(argv=None) -> int:
    args = parse_args(argv)
    from weights import WeightsError
    try:
        failed = run(args)
    except (EmerDiffError, WeightsError) as e:
        print(f"emerdiff: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch.OutOfMemoryError on CUDA; a plain RuntimeError on mps/cpu
        if "out of memory" not in str(e).lower():
            raise
        print(f"emerdiff: error: out of memory at --batch-size {args.batch_size}: lower it "
              f"(e.g. --batch-size {max(1, args.batch_size // 2)}) or the --size", file=sys.stderr)
        return 2
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
