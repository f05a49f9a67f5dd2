"""The command line: images in, one complete folder of outputs per image out.

    python emerdiff.py --image x.jpg [--image folder/ --image list.txt ...] [options]
    python emerdiff.py --dataset coco-stuff-27 --root ROOT [--list F] --out PRED      # a benchmark
    torchrun --nproc_per_node=N emerdiff.py ...                                       # N processes

emerdiff.py is the method; this file is what a command line needs around it, kept apart so that
emerdiff.py stays the paper's steps in order:
- options, all checked before the weights load, and the images to segment (files, folders, lists);
- the files written per image (labels.npy, embeddings.npy, and page.py's pictures, labels.png, overlay.png,
  lowres.png, diffmaps.png and diffmaps/, with view.js), and the run's page, index.html (page.py), after
  each image and at the end;
- dataset runs: a benchmark's images (datasets.py's readers and DiffSeg's centre crop), resumable,
  and shared out over torchrun's processes, each taking every N-th image;
- safe writing (files.py): each image's folder is written under a temporary name and swapped in
  whole, so a reader finds the previous complete set or the new one, never a mix; a run.json in it
  records how it was made, so a rerun skips what is done; temporaries of dead runs are removed;
- clean failure: one line per problem, exit status 2; Ctrl-C / SIGTERM end with one line and exit
  status 130 / 143, leaving every finished image saved and nothing half-written.
"""
import argparse
import io
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from devices import (CPU_BATCH_SIZES, cpu_runs_per_call, estimate, model_device_dtype, pick_device, pick_dtype,
                     showing_progress)
from emerdiff import DEFAULTS, Segmentation, segment
from datasets import DATASETS, EvaluationError, center_crop
from files import (CLASSES_FILE, EMBEDDINGS_FILE, MASKCLIP_FILE, MAX_RECORD, PREDICTION_FILE, RUN_RECORD, SUMMARY,
                   FileError, OneLineParser, atomic_save, read_text, remove_dead_temporaries, shown, temporary_path,
                   write_folder)
from inputs import (MAX_MASKS, UPSAMPLING, EmerDiffError, Job, all_jobs, check_options, denoising_in_words, fixed_size,
                    open_image, to_rgb, upright_size, working_size)
import page
from vocabulary import KEY_SMOOTHING, PROMPT_DENOISING, RANDOM_CLIP, Namer
from weights import CLIP_REPO

# ---- Options ----


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" only where there is a default worth showing."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(
        prog="emerdiff.py", formatter_class=HelpFormatter,
        description="EmerDiff (ICLR 2024): training-free segmentation from Stable Diffusion. Writes "
        "labels.png, labels.npy, embeddings.npy, overlay.png, lowres.png and run.json into OUT/<image name>/ "
        "per image, and OUT/index.html, the run's page (open it in a browser); a rerun skips the images already "
        "done with the same options.")
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", action="append", metavar="PATH",
                        help="an image file, a folder of images, or a .txt file listing image paths (one per "
                        "line, relative to the list); give it several times for several")
    inputs.add_argument("--dataset", choices=DATASETS,
                        help="a benchmark's images under --root, as evaluate.py scores them (coco-stuff-27 and "
                        "cityscapes: each image's centre square, DiffSeg's; the others whole; docs/evaluation.md)")
    p.add_argument("--root", help="with --dataset: the dataset's folder")
    p.add_argument("--list", metavar="F", help="with --dataset: only the images this file lists (one id or "
                   "file name per line)")
    models = p.add_mutually_exclusive_group()
    models.add_argument("--weights", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="SD v1.x: hub repo id, diffusers folder or single .safetensors file (see weights.md)")
    models.add_argument("--random-weights", action="store_true",
                        help="instead of --weights: a tiny model with random weights, built on the spot (no "
                        "download, seconds on a CPU); its segments mean nothing: it shows what emerdiff writes")
    p.add_argument("--config-dir", help="for a single-file --weights: a diffusers folder with the tokenizer/configs")
    p.add_argument("--variant", choices=["fp16"], help="for a hub id: download the half-size fp16 files")
    p.add_argument("--out", default="emerdiff_out", help="output folder; one subfolder per image")
    p.add_argument("--overwrite", action="store_true", help="segment again images whose outputs are complete")
    p.add_argument("--masks", type=int, default=DEFAULTS["masks"],
                   help=f"K, the number of low-resolution masks (segments), 1..{MAX_MASKS}")
    p.add_argument("--lam", type=float, default=DEFAULTS["lam"], help="lambda, the modulation strength, > 0")
    p.add_argument("--tm", type=int, default=DEFAULTS["t_m"],
                   help="t_m, the modulation timestep, on the --steps grid (50 steps: 1, 21, ..., 981)")
    p.add_argument("--tf", type=int, default=DEFAULTS["t_f"],
                   help="t_f, the feature timestep, 0..999 (the notebook uses 0)")
    p.add_argument("--feature-samples", type=int, default=DEFAULTS["feature_samples"],
                   help="noise draws averaged for the features, >= 1")
    p.add_argument("--kmeans-restarts", type=int, default=DEFAULTS["kmeans_restarts"],
                   help="k-means++ restarts, >= 1; the lowest inertia is kept")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of every random draw, 0..2^63-1")
    p.add_argument("--size", default="auto",
                   help="working size in pixels: auto (area about 512x512, aspect kept), N or WxH; "
                   "sides multiples of 64, 64..2048")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"],
                   help="DDPM grid steps, 2..1000 (50: t = 981, 961, ..., 1)")
    p.add_argument("--prompt", default=DEFAULTS["prompt"], help="the text condition (the paper: empty)")
    p.add_argument("--blur-kernel", type=int, default=DEFAULTS["blur"][0],
                   help="Gaussian blur kernel size in pixels, odd, 1..63")
    p.add_argument("--blur-sigma", type=float, default=DEFAULTS["blur"][1], help="Gaussian blur sigma in pixels, > 0")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="model precision; auto: float16 on a GPU, float32 on the CPU")
    p.add_argument("--no-injection", action="store_true", help="turn attention injection off")
    p.add_argument("--upsample", choices=UPSAMPLING, default=DEFAULTS["upsample"],
                   help="modulation: the method; bilinear: the paper's baseline, the low-resolution masks "
                   "up-sampled bilinearly (no inversion, no modulated runs: the feature pass only)")
    p.add_argument("--batch-size", type=batch_size, default=DEFAULTS["speed"]["batch_size"],
                   help="denoising runs (and decodes) per batch: N >= 1, or auto (on CUDA as many as fit in the "
                   f"memory free at the start; elsewhere {CPU_BATCH_SIZES[0]} runs, {cpu_runs_per_call(512, 512)} at "
                   f"512x512, and {CPU_BATCH_SIZES[1]} decode a call); lower it when memory runs out")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and VAE decoder (the plain path): minutes at the first image of "
                   "each size; slower on the CPU and the GPU measured (docs/speed.md)")
    p.add_argument("--plain", action="store_true",
                   help="the plain PyTorch path: no speed setting (speed.py's Winograd convolutions and shared "
                   "attention, the allocator setting, channels_last on CUDA); not with --compile; for comparison "
                   "and for reading")
    p.add_argument("--save-diffmaps", action="store_true",
                   help="also write diffmaps.png, the K difference maps captioned with their segment's colour, and "
                   "each alone in diffmaps/ (index.html shows the one of the segment hovered)")
    named = p.add_argument_group("named segments", "EmerDiff's Table 3: MaskCLIP gives each pixel a class and each "
                                 "segment takes its pixels' most frequent class; writes classes.json, maskclip.png and "
                                 "named.png (docs/command-line.md)")
    named.add_argument("--classes", metavar="NAMES", help='the class names: "cat, grass, sky", a file with one name a '
                       "line, or a dataset's classes (ade20k, pascal-context-59, ...)")
    named.add_argument("--clip", default=CLIP_REPO, help="CLIP ViT-B/16: hub repo id or folder (weights.md)")
    named.add_argument("--key-smoothing", type=float, nargs="?", const=KEY_SMOOTHING, metavar="T",
                       help=f"MaskCLIP's key smoothing of patches less sure than T (default off; alone: "
                       f"{KEY_SMOOTHING})")
    named.add_argument("--prompt-denoising", type=float, nargs="?", const=PROMPT_DENOISING, metavar="T",
                       help=f"MaskCLIP's prompt denoising of classes nowhere surer than T (default off; alone: "
                       f"{PROMPT_DENOISING})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--estimate", action="store_true",
                   help="print what each image would cost on this machine with these options and SD v1.5 (timed on "
                   "random weights of its architecture, built here: nothing downloaded, nothing written), and exit")
    return p.parse_args(argv)


def batch_size(text: str):
    """--batch-size: "auto" or a whole number (its range is checked with the other options)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text[:20]!r}: auto or a whole number") from None


def parse_size(text: str):
    """--size: "auto", "N" (N x N) or "WxH", checked before any model is loaded."""
    text = text.lower()
    if text == "auto":
        return "auto"
    parts = text.split("x")
    if len(parts) not in (1, 2) or not all(re.fullmatch(r"[0-9]{1,5}", part) for part in parts):
        raise EmerDiffError(f"--size {text:.20}: use auto, N or WxH (N, W, H multiples of 64)")
    return fixed_size((int(parts[0]), int(parts[-1])))


def method_options(args) -> dict:
    """The options of emerdiff.segment from the command line, checked."""
    options = dict(masks=args.masks, lam=args.lam, t_m=args.tm, t_f=args.tf, feature_samples=args.feature_samples,
                   kmeans_restarts=args.kmeans_restarts, seed=args.seed, size=parse_size(args.size),
                   injection=not args.no_injection, steps=args.steps, prompt=args.prompt,
                   blur=(args.blur_kernel, args.blur_sigma), upsample=args.upsample,
                   speed=dict(batch_size=args.batch_size, compile=args.compile, plain=args.plain))
    check_options(DEFAULTS | options)
    return options


# ---- The images ----

def checked_jobs(jobs: list[Job], options: dict, summary) -> dict[Job, tuple[int, int]]:
    """The jobs whose image can be segmented with these options, each with its working size (W, H), read from
    its header only (Pillow's bomb check included); each other image is reported in one line and counted failed."""
    good = {}
    for job in jobs:
        try:
            with open_image(job.path, decode=False) as image:
                width, height = (min(image.size),) * 2 if job.crop else upright_size(image, not job.as_stored)
            good[job] = working_size(width, height, options["size"])
        except EmerDiffError as e:
            summary.fail(job.path, e)
    return good


# ---- How long it will take ----

LONG_RUN_S = 60  # per image: a run expected to take longer says so before it starts


def announce_long_run(sd, size: tuple[int, int], options: dict):
    """Off CUDA, one line before a run that will take minutes per image: how long, and what cuts it."""
    device, _ = model_device_dtype(sd)
    if device.type == "cuda":
        return
    e = estimate(sd, size, options)
    if e.seconds >= LONG_RUN_S:
        note(e.line(device))


def estimate_images(sizes: dict[Job, tuple[int, int]], options: dict, device: torch.device, dtype: torch.dtype):
    """--estimate: for each working size of `sizes` (job -> (W, H)), one line on what an image costs there on this
    machine with SD v1.5, timed on random weights of its architecture built here (nothing downloaded)."""
    from weights import random_stable_diffusion
    if not sizes:
        return
    note("--estimate: SD v1.5's architecture with random weights, built here (nothing downloaded; 4.3 GB in float32)")
    sd = random_stable_diffusion("sd15", device, dtype)
    for (width, height), count in Counter(sizes.values()).items():
        line = estimate(sd, (width, height), options).line(device)
        report(f"SD v1.5 at {width}x{height}, {count} image{'s' * (count > 1)}: {line}")


# ---- The files of an image ----

def output_files(seg: Segmentation, image: Image.Image, diffmaps: bool) -> dict:
    """Each output file's name -> a function writing it to a given path: the labels and the embeddings as
    arrays, and the pictures (page.picture_files)."""
    files = {"labels.npy": array_file(seg.labels), EMBEDDINGS_FILE: array_file(seg.embeddings)}
    maps = seg.difference_maps.float().cpu().numpy()
    return files | page.picture_files(seg.labels, seg.low_res_labels, maps, image, diffmaps)


def array_file(array: np.ndarray):
    """A writer of `array` as a .npy file in one write, so that a full disk is said as the system says it
    ("File too large"), not as numpy's count of the bytes it managed."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return lambda path: path.write_bytes(buffer.getvalue())


# ---- Writing safely ----

OUTPUT_FILES = {PREDICTION_FILE, "labels.npy", EMBEDDINGS_FILE, page.OVERLAY, page.LOW_RES, page.DIFFMAP_GRID,
                RUN_RECORD, page.VIEW_SCRIPT, page.DIFFMAPS, page.GROUND_TRUTH,  # gt.png: evaluate.py's
                CLASSES_FILE, MASKCLIP_FILE, page.NAMED}  # with --classes


def is_output_file(name: str) -> bool:
    """Whether `name`, a path relative to an image folder, is one emerdiff writes there (OUTPUT_FILES, and
    the difference maps in diffmaps/): a folder is replaced only where every entry is (files.swap_in)."""
    return name in OUTPUT_FILES or page.is_diffmap_name(name)


def prepare_out(out: Path):
    """Create the output folder and prove it writable (before any weights load), then remove the
    temporaries that runs killed on this machine left in it (files.py)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = temporary_path(out / "write-probe")
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise EmerDiffError(f"--out {out}: a file of that name is in the way; give a folder") from None
    except OSError as e:
        raise EmerDiffError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    remove_dead_temporaries(out)


# ---- Running ----

@dataclass
class Summary:
    """What a run did, for its last lines and its summary.json."""
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)  # [{"image": ..., "reason": ...}]
    seconds: list = field(default_factory=list)  # per image done by this run
    seconds_before: list = field(default_factory=list)  # per image skipped: what its run.json recorded
    error: str | None = None  # why the whole run stopped, if it did

    def fail(self, path: Path, error: Exception):
        message = str(error) if str(error).startswith(str(path)) else f"{path}: {error}"
        say(message)
        self.failed.append({"image": str(path), "reason": message})

    def as_dict(self, options: dict) -> dict:
        """`done` and `seconds`: this run's images; `skipped` and `seconds_before`: those earlier runs
        did; `seconds_per_image`: the mean over both (every image complete in --out)."""
        complete = self.seconds + self.seconds_before
        return {"images": self.total, "done": self.done, "skipped": self.skipped, "failed": self.failed,
                "seconds_per_image": sum(complete) / len(complete) if complete else None,
                "seconds": self.seconds, "seconds_before": self.seconds_before, "error": self.error,
                "options": options, "denoising_steps": denoising_in_words(options)}


def merged(parts: list[dict]) -> dict:
    """The summaries of the processes of one run as one."""
    whole = Summary(sum(p["images"] for p in parts), sum(p["done"] for p in parts), sum(p["skipped"] for p in parts),
                    [f for p in parts for f in p["failed"]], [s for p in parts for s in p["seconds"]],
                    [s for p in parts for s in p["seconds_before"]],
                    "; ".join(p["error"] for p in parts if p.get("error")) or None)
    return whole.as_dict(parts[0]["options"])


RANDOM_WEIGHTS = "random: the tiny model of weights.random_stable_diffusion, seed 0"


def run_record(job: Job, args, options: dict, dtype: torch.dtype, namer: Namer | None) -> dict:
    """What makes an output folder what it is: the image file, the weights, the options (and the naming's, with
    --classes). A folder whose run.json holds the same record is complete and is not made again."""
    image = job.path.stat()
    record = {"image": {"path": str(job.path.resolve()), "bytes": image.st_size, "modified_ns": image.st_mtime_ns,
                        "centre_crop": job.crop},
              "weights": {"source": weights_source(args),
                          "variant": args.variant, "config_dir": args.config_dir, "dtype": str(dtype)},
              "options": {k: v for k, v in json.loads(json.dumps(options)).items() if k != "speed"},  # not the result's
              "diffmaps": args.save_diffmaps}
    if namer:  # only with --classes: without, the record is as before, and earlier runs' folders stay done
        record["naming"] = namer.settings | {"classes": list(namer.classes)}
    return record


def weights_source(args) -> str:
    """The weights a run uses: a local path resolved, a hub id as given, or the random tiny model."""
    return RANDOM_WEIGHTS if args.random_weights else local_or_hub(args.weights)


def local_or_hub(source: str) -> str:
    """A local path resolved, a hub id as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def saved_result(folder: Path, record: dict) -> dict | None:
    """The result run.json recorded (segments, seconds per stage, files) where `folder` holds a
    complete output made with `record`; else None (its run.json read through files.read_text: a FIFO
    there, or a huge file, is no record)."""
    try:
        saved = json.loads(read_text(folder / RUN_RECORD, MAX_RECORD))
        complete = saved["run"] == record and all((folder / name).is_file() for name in saved["result"]["files"])
        return saved["result"] if complete else None
    except (FileError, OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def run(args, summary: Summary, rank: int = 0, world: int = 1) -> dict | None:
    """Segment the images of the command line (process `rank` of `world`: every world-th one) into
    their own folders of --out, skipping those done; summary.json says what was done, and why the
    run stopped if it did, from the moment --out is ready. Returns the summary this process wrote as
    summary.json, or None where it wrote only its part of a torchrun's (write_summary)."""
    options = method_options(args)
    namer = None if args.classes is None else Namer.checked(
        args.classes, RANDOM_CLIP if args.random_weights else local_or_hub(args.clip), args.key_smoothing,
        args.prompt_denoising)
    if args.random_weights and (args.variant or args.config_dir):
        raise EmerDiffError("--variant and --config-dir go with --weights, not with --random-weights")
    every = all_jobs(args, note)
    jobs, names = every[rank::world], [job.name for job in every]
    summary.total = len(jobs)
    device = pick_device(args.device)
    if device.type == "cuda" and world > 1:  # one GPU per process of the node
        device = pick_device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    dtype = pick_dtype(args.dtype, device)
    if args.estimate:  # what each image would cost: no --out, no weights
        estimate_images(checked_jobs(jobs, options, summary), options, device, dtype)
        return summary.as_dict(options)
    out = Path(args.out)
    prepare_out(out)
    run_page = page.RunPage(out, names, say)
    try:
        segment_jobs(jobs, out, options, device, dtype, args, summary, namer, announce=rank == 0,
                     after_each=lambda: run_page.write(summary.as_dict(options), running=True))
    except BaseException as e:  # the whole run stopped: summary.json says why
        summary.error = str(e).splitlines()[0] if str(e) else "interrupted"
        raise
    finally:
        whole = write_summary(out, summary.as_dict(options), rank, world)
        if whole is not None:  # index.html: the whole run's, by the process that wrote summary.json
            run_page.write(whole)
    return whole


def segment_jobs(jobs: list[Job], out: Path, options: dict, device, dtype, args, summary: Summary, namer: Namer | None,
                 announce: bool, after_each=lambda: None):
    """The jobs that can be done and are not done yet, each segmented into its folder; a failing image
    is said and counted, and the others go on. `announce`: the first image says how long each takes;
    `after_each` is called after each image done or failed (index.html rewritten)."""
    from weights import load_clip, load_stable_diffusion, random_clip, random_stable_diffusion
    jobs = checked_jobs(jobs, options, summary)
    records = {job: run_record(job, args, options, dtype, namer) for job in jobs}
    saved = {job: None if args.overwrite else saved_result(out / job.name, records[job]) for job in jobs}
    todo = [job for job in jobs if saved[job] is None]
    summary.seconds_before = [sum(result["seconds"].values()) for result in saved.values() if result is not None]
    summary.skipped = len(jobs) - len(todo)
    if args.random_weights:
        note("--random-weights: a tiny model with random weights (and a tiny CLIP for --classes); its segments mean "
             "nothing, the run shows the files emerdiff writes (README, With SD v1.5, for the real weights)")
    if summary.skipped:
        note(f"{summary.skipped} of {len(jobs)} images already done with these options (--overwrite redoes them)")
    if not todo:
        return
    if namer:  # CLIP first (the smaller download), and the class names embedded once, for every image
        with showing_progress(not args.quiet):
            namer.load(random_clip("tiny", device=device, dtype=dtype) if args.random_weights else
                       load_clip(args.clip, device=device, dtype=dtype))
    sd = (random_stable_diffusion("tiny", device, dtype) if args.random_weights else
          load_stable_diffusion(args.weights, device=device, dtype=dtype, variant=args.variant,
                                config_dir=args.config_dir))
    for job in tqdm(todo, desc="images", unit="image", disable=args.quiet or len(todo) <= 1 or not announce):
        try:
            summary.seconds.append(segment_file(job, out / job.name, sd, options, records[job], args, namer, announce))
            summary.done += 1
            announce = False
        except EmerDiffError as e:  # say it, and go on with the other images
            summary.fail(job.path, e)
        except OSError as e:
            summary.fail(job.path, EmerDiffError(f"cannot write {out / job.name}: {e.strerror or e}"))
        after_each()


def write_summary(out: Path, summary: dict, rank: int, world: int) -> dict | None:
    """summary.json in --out, returned. With several processes there is no collective wait: each writes
    its part (tagged with the run it belongs to) and whoever finds every part of its run there merges
    them, so the last to finish does, however unequal the shares; a process never waits for another.
    That one returns the merged summary and says how many images of the whole run failed; the others
    return None. A summary that cannot be written (something other than a file in its place included:
    files.atomic_save) is said, and this process's own summary returned."""
    try:
        if world == 1:
            atomic_save(out / SUMMARY, lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
            for stale in out.glob("summary.part*.json"):  # of an earlier torchrun cut short: superseded
                stale.unlink(missing_ok=True)
            return summary
        run_id = torchrun_id()
        atomic_save(out / f"summary.part{rank}.json",
                    lambda tmp: tmp.write_text(json.dumps(summary | {"run": run_id}, indent=1)))
        parts = [out / f"summary.part{r}.json" for r in range(world)]
        try:
            found = [json.loads(read_text(p, MAX_RECORD)) for p in parts]
        except (FileError, ValueError, RecursionError):  # not all here yet (or another process merged them)
            return None
        if not all(isinstance(part, dict) and part.get("run") == run_id for part in found):
            return None
        whole = merged(found)
        atomic_save(out / SUMMARY, lambda tmp: tmp.write_text(json.dumps(whole, indent=1)))
        for p in parts:
            p.unlink(missing_ok=True)
        if whole["failed"]:
            say(f"{len(whole['failed'])} of {whole['images']} images of this torchrun failed (each said by its "
                f"process); {out / SUMMARY} lists them")
        return whole
    except OSError as e:
        say(f"cannot write {out / SUMMARY}: {e.strerror or e}")
    except FileError as e:
        say(f"cannot write {e}")
    return summary


def segment_file(job: Job, folder: Path, sd, options: dict, record: dict, args, namer: Namer | None = None,
                 announce: bool = False) -> float:
    """Segment one image file (its segments named by `namer`, if given), write its folder, print its one-line
    summary (after a line on how long it takes, if `announce` and it takes minutes)."""
    device, _ = model_device_dtype(sd)
    image = to_rgb(open_image(job.path), exif_rotation=not job.as_stored)
    image = center_crop(image) if job.crop else image
    if announce:
        announce_long_run(sd, working_size(*image.size, options["size"]), options)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seg = segment(image, sd, progress=not args.quiet, **options)
    clock = time.perf_counter()
    named, names = {}, None
    if namer:
        named, names = namer.files(image, seg.labels, options["size"])
        seg.seconds["naming"], clock = time.perf_counter() - clock, time.perf_counter()
    files = output_files(seg, image, args.save_diffmaps) | named
    result = {"segments": int(seg.labels.max()) + 1, "seconds": seg.seconds, "files": sorted(files),
              "denoising_steps": denoising_in_words(options), "names": names}
    files[RUN_RECORD] = lambda path: path.write_text(json.dumps({"run": record, "result": result}, indent=1))
    write_folder(folder, files, is_output_file)
    seg.seconds["saving"] = time.perf_counter() - clock
    stages = ", ".join(f"{stage} {s:.1f} s" for stage, s in seg.seconds.items())
    memory = (f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
              if device.type == "cuda" else "")
    report(shown(f"{job.path}: {result['segments']} segments -> {folder}/ ({stages}{memory})"))
    return sum(seg.seconds.values())


# ---- Saying things ----

errors_said = 0  # error lines printed by this process: any makes the exit status 2


def say(message: str):
    """An error line on stderr."""
    global errors_said
    errors_said += 1
    written(f"emerdiff: error: {shown(message)}", sys.stderr)


def report(line: str):
    """A result line on stdout."""
    written(line, sys.stdout)


def note(message: str):
    """A line on stderr that is not an error."""
    written(f"emerdiff: {shown(message)}", sys.stderr)


def written(line: str, stream):
    """`line` on `stream`. A reader that stopped reading (`| head`), or a stream closed from the start,
    is no failure of the run: what follows goes nowhere."""
    if stream is None:
        return
    try:
        tqdm.write(line, file=stream)
        stream.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())  # also quiets the flush at exit


class Terminated(BaseException):
    """SIGTERM, raised where the program is, as Ctrl-C raises KeyboardInterrupt."""


def raise_terminated(signum, frame):
    raise Terminated


TORCHRUN_MARK = "TORCHELASTIC_RUN_ID"  # set by torchrun's agent in each process it starts, by no other launcher


def process_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside it, where a WORLD_SIZE or RANK
    of another launcher is no share of ours (said). The processes share the images out by rank and
    never talk to each other (no process group: nothing to time out)."""
    if TORCHRUN_MARK not in os.environ:
        if {"WORLD_SIZE", "RANK"} & set(os.environ):
            note(f"WORLD_SIZE / RANK are set, but not by torchrun (no {TORCHRUN_MARK}): this process "
                 "segments every image")
        return 0, 1
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    if not (world.isdigit() and rank.isdigit() and int(rank) < int(world)):
        raise EmerDiffError(f"WORLD_SIZE={world[:20]!r} and RANK={rank[:20]!r} are not a process of a torchrun: "
                            "run under torchrun, or unset them")
    return int(rank), int(world)


def torchrun_id() -> str:
    """What tells one torchrun's processes from another's: its run id, rendezvous address, size and
    restart. (Two launches alike in all of these, a static rendezvous run twice, are not told apart.)"""
    keys = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT")
    return "/".join(os.environ.get(key, "") for key in keys)


def main(argv=None) -> int:
    """The command line; returns the exit status: 0, 2 (an error or a failed image), 130 / 143 (interrupted by Ctrl-C
    / SIGTERM; from then on both signals are ignored, as the process is ending). Under torchrun a process whose images
    failed records them in its summary part and returns 0, as torchrun stops every process when one returns another
    status: the process that merges the parts, the last to finish, returns 2 where any image of the run failed."""
    global errors_said
    args = parse_args(argv)
    from weights import WeightsError
    summary, errors_said = Summary(), 0
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        whole = run(args, summary, *process_rank())
    except (EmerDiffError, WeightsError, EvaluationError, FileError) as e:
        say(str(e))
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        for signum in (signal.SIGINT, signal.SIGTERM):  # the process is ending: a second Ctrl-C must not
            signal.signal(signum, signal.SIG_IGN)       # break this line or the exit with a traceback
        say(f"interrupted: {summary.done + summary.skipped} of {summary.total} images done and saved; "
            "run the same command again to do the rest")
        return 143 if isinstance(e, Terminated) else 130
    except RuntimeError as e:  # torch.OutOfMemoryError on CUDA; a plain RuntimeError on mps/cpu
        if "out of memory" not in str(e).lower():
            raise
        smaller = max(1, args.batch_size // 2) if isinstance(args.batch_size, int) else 4
        say(f"out of memory at --batch-size {args.batch_size}: lower it (e.g. --batch-size {smaller}) or the --size")
        return 2
    finally:
        if signal.getsignal(signal.SIGTERM) is raise_terminated:  # after an interrupt both stay ignored
            signal.signal(signal.SIGTERM, previous)
    if whole is None:  # a part of a torchrun's summary: the process that merges the parts gives the status
        return 0
    return 2 if whole["failed"] or errors_said else 0
