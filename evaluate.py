"""Benchmark evaluation of segmentations: mIoU and pixel accuracy against ground truth.

    python evaluate.py --dataset {coco-stuff-27,cityscapes,folder} --root ROOT --pred PRED [--json OUT.json]

PRED is an output folder of emerdiff.py: PRED/<stem>/labels.png, one segment id per pixel. An unsupervised
segmentor names no classes, so its segments are first matched to ground-truth classes; two protocols:

  hungarian  DiffSeg's published per-image protocol, which diffusion-based unsupervised segmentors report:
             per image, the confusion matrix hist (ground-truth classes x predicted segments, at least as
             many columns as classes) is matched one-to-one by scipy's linear_sum_assignment (maximum
             overlap); pixels of unmatched segments count as misses of their class, not as false positives.
  majority   many-to-one, an upper bound also reported in the literature: per image, each segment takes
             the class it overlaps most; one confusion matrix over the dataset.

Both sum TP/FP/FN over the dataset: IoU_c = TP/(TP+FP+FN), mIoU = mean over the classes that have an IoU
(a class absent from ground truth and predictions alike has none), accuracy = sum(TP) / labelled pixels.

The dataset readers (`dataset_samples`, `center_crop`) also serve `emerdiff.py --dataset`: the
presets evaluate the centred square of each image, the crop DiffSeg's protocol segments (resized to
512x512); the same `center_crop` cuts the labels here, so predictions and ground truth align.
Only the standard library, numpy, scipy, Pillow, tqdm and files.py are used: no model, no GPU.
"""
import argparse
import json
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from files import MAX_SEGMENTS, atomic_save, shown

DATASETS = ("coco-stuff-27", "cityscapes", "folder")
IGNORE = 255  # label value of unlabelled pixels, in every dataset
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
PREDICTION_FILE = "labels.png"

# ---- COCO-Stuff-27 ----
# The stuffthingmaps PNGs hold the 182 COCO-Stuff ids minus one (0 = person ... 181 = wood; 255 unlabelled).
# The 27 coarse classes are their parents in the COCO-Stuff label hierarchy: 12 "things" then 15 "stuff",
# in the order IIC introduced and PiCIE, STEGO and DiffSeg kept (IIC: `_sorted_coarse_names`; STEGO:
# src/data.py `Coco.fine_to_coarse`; PiCIE/DiffSeg load the same table from `fine_to_coarse_dict.pickle`).
COCO_CLASSES = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal", "outdoor",
    "person", "sports", "vehicle",  # things 0-11
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall", "window",
    "building", "ground", "plant", "sky", "solid", "structural", "water")  # stuff 12-26
COCO_FINE_TO_COARSE = (  # index: fine id (COCO-Stuff id - 1); value: coarse class
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7,  # 0-19
    7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10,  # 20-39
    10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2,  # 40-59
    2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1,  # 60-79
    1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25, 16,  # 80-99: things end at 90
    13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26,  # 100-119
    14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21,  # 120-139
    17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24,  # 140-159
    15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19,  # 160-179
    19, 24)  # 180-181
# (images folder, labels folder) under ROOT, tried in this order:
COCO_LAYOUTS = (("val2017", "stuffthingmaps_trainval2017/val2017"),  # each zip unzipped into a folder of its name
                ("images/val2017", "annotations/val2017"))  # the COCO-Stuff repository's set-up (PiCIE, STEGO)
COCO_CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"  # the 2,175 val images IIC curated, one id per line

# ---- Cityscapes: the 27 classes of label ids 7..33; ids 0..6 (void) and the rest are ignored ----
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
    "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider",
    "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle")
CITYSCAPES_FIRST_ID = 7


def lookup_table(mapping) -> np.ndarray:
    """(256,) uint8: label value -> class, IGNORE where unmapped."""
    table = np.full(256, IGNORE, dtype=np.uint8)
    for value, cls in mapping.items():
        table[value] = cls
    return table


LABEL_TABLES = {
    "coco-stuff-27": lookup_table(dict(enumerate(COCO_FINE_TO_COARSE))),
    "cityscapes": lookup_table({CITYSCAPES_FIRST_ID + c: c for c in range(len(CITYSCAPES_CLASSES))}),
}
PRESET_CLASSES = {"coco-stuff-27": COCO_CLASSES, "cityscapes": CITYSCAPES_CLASSES}


class EvaluationError(Exception):
    """Bad input to the evaluation; the message is one line that says what is wrong and what to do."""


@dataclass(frozen=True)
class Sample:
    stem: str  # the prediction folder name: PRED/<stem>/labels.png (unique within a dataset)
    image: Path
    label: Path
    crop: bool  # True for the presets (centre square), False for "folder"


# ---- Dataset readers ----

def dataset_samples(dataset: str, root, list_file=None) -> list[Sample]:
    """The (image, label) pairs of a dataset under `root`, sorted by stem; `list_file` keeps the listed ones."""
    if dataset not in DATASETS:
        raise EvaluationError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    root = Path(root)
    if not root.is_dir():
        raise EvaluationError(f"--root {shown(root)}: no such folder")
    samples = {"coco-stuff-27": coco_samples, "cityscapes": cityscapes_samples, "folder": folder_samples}[dataset](root)
    if list_file is not None:
        samples = listed(samples, Path(list_file))
    if not samples:
        raise EvaluationError(f"{dataset} under {shown(root)}: no images (an empty dataset)")
    return sorted(samples, key=lambda s: s.stem)


def existing_folder(folder: Path, hint: str) -> Path:
    if not folder.is_dir():
        raise EvaluationError(f"{shown(folder)}: no such folder; {hint} (see docs/evaluation.md)")
    return folder


def paired(images: list[Path], label_of, crop: bool) -> list[Sample]:
    """One sample per image; every image must have its label file."""
    samples = []
    for image in images:
        label = label_of(image)
        if not label.is_file():
            raise EvaluationError(f"{shown(label)}: missing, the label of {shown(image)}")
        samples.append(Sample(image.stem, image, label, crop))
    return samples


def coco_samples(root: Path) -> list[Sample]:
    """val2017/<id>.jpg with stuffthingmaps val2017/<id>.png (either layout of COCO_LAYOUTS)."""
    layouts = [(root / images, root / labels) for images, labels in COCO_LAYOUTS]
    images, labels = next((layout for layout in layouts if layout[0].is_dir()), layouts[0])
    image_dir = existing_folder(images, f"unzip val2017.zip -d {shown(images.parent)}")
    label_dir = existing_folder(labels, f"unzip stuffthingmaps_trainval2017.zip -d {shown(labels.parent)}")
    return paired(sorted(image_dir.glob("*.jpg")), lambda image: label_dir / f"{image.stem}.png", crop=True)


def cityscapes_samples(root: Path) -> list[Sample]:
    """leftImg8bit/val/<city>/<name>_leftImg8bit.png with gtFine/val/<city>/<name>_gtFine_labelIds.png."""
    image_dir = existing_folder(root / "leftImg8bit" / "val", f"unzip leftImg8bit_trainvaltest.zip -d {shown(root)}")
    label_dir = existing_folder(root / "gtFine" / "val", f"unzip gtFine_trainvaltest.zip -d {shown(root)}")

    def label_of(image: Path) -> Path:
        name = image.name.removesuffix("_leftImg8bit.png")
        return label_dir / image.parent.name / f"{name}_gtFine_labelIds.png"
    return paired(sorted(image_dir.glob("*/*_leftImg8bit.png")), label_of, crop=True)


def folder_samples(root: Path) -> list[Sample]:
    """images/<stem>.<ext> with labels/<stem>.png."""
    image_dir = existing_folder(root / "images", "put the images there")
    label_dir = existing_folder(root / "labels", "put one <stem>.png of class ids per image there")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    stems = {}
    for image in images:
        if image.stem in stems:
            raise EvaluationError(f"{shown(stems[image.stem])} and {shown(image)} share the stem "
                                  f"{shown(image.stem)}: rename one")
        stems[image.stem] = image
    return paired(images, lambda image: label_dir / f"{image.stem}.png", crop=False)


def listed(samples: list[Sample], list_file: Path) -> list[Sample]:
    """The samples named in `list_file`: one image per line, as an id ("000000000139") or a file name."""
    try:
        lines = list_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationError(f"--list {shown(list_file)}: cannot read it ({e.__class__.__name__})") from None
    by_stem = {s.stem: s for s in samples}
    chosen = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        stem = Path(line.strip()).stem
        if stem not in by_stem:
            raise EvaluationError(f"--list {shown(list_file)} line {number}: {shown(stem)} is not an image "
                                  "of the dataset under --root")
        chosen[stem] = by_stem[stem]
    return list(chosen.values())


# ---- Images and label maps ----

def center_crop(image: Image.Image) -> Image.Image:
    """The centred square of side min(w, h): DiffSeg's crop, the same for an image and its label map."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


@contextmanager
def readable(path: Path, what: str):
    """Pillow's errors on `path` as one-line EvaluationErrors."""
    try:
        yield
    except FileNotFoundError:
        raise EvaluationError(f"{shown(path)}: no such file") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise EvaluationError(f"{shown(path)}: not a readable {what} ({e.__class__.__name__})") from None


def load_picture(path: Path, what: str) -> Image.Image:
    with readable(path, what):
        picture = Image.open(path)
        picture.load()
        return picture


def picture_size(path: Path, what: str) -> tuple[int, int]:
    """(W, H) from the file's header, without decoding it."""
    with readable(path, what), Image.open(path) as picture:
        return picture.size


def ground_truth(sample: Sample, dataset: str) -> np.ndarray:
    """(H, W) uint8 class ids, IGNORE where unlabelled; the centre square for the presets."""
    label = load_picture(sample.label, "PNG label map")
    if label.mode not in ("L", "P"):
        raise EvaluationError(f"{shown(sample.label)}: mode {label.mode}, not 8-bit class ids; "
                              "save it as a grayscale (L) or palette (P) PNG")
    image_size = picture_size(sample.image, "image")
    if label.size != image_size:
        raise EvaluationError(f"{shown(sample.label)} is {label.size[0]}x{label.size[1]} but its image "
                              f"{shown(sample.image)} is {image_size[0]}x{image_size[1]}: they must match")
    ids = np.asarray(center_crop(label) if sample.crop else label)
    return LABEL_TABLES[dataset][ids] if dataset in LABEL_TABLES else ids


def prediction(path: Path, size: tuple[int, int]) -> np.ndarray:
    """(H, W) int64 segment ids of a labels.png, resized (nearest) to `size` = (W, H) where it differs."""
    picture = load_picture(path, "PNG")
    ids = np.asarray(picture)
    if picture.format != "PNG" or ids.ndim != 2 or ids.dtype.kind not in "biu":
        raise EvaluationError(f"{shown(path)}: not a single-channel PNG of segment ids "
                              f"({picture.format} {picture.mode}); write it as emerdiff.py does")
    if ids.size and (ids.min() < 0 or ids.max() >= MAX_SEGMENTS):
        raise EvaluationError(f"{shown(path)}: segment ids {ids.min()}..{ids.max()}: at most {MAX_SEGMENTS} "
                              f"segments (ids 0..{MAX_SEGMENTS - 1}) are supported")
    (width, height), (gt_width, gt_height) = picture.size, size
    if abs(width * gt_height - height * gt_width) > 0.02 * height * gt_width:
        raise EvaluationError(f"{shown(path)} is {width}x{height}, the ground truth {gt_width}x{gt_height}: "
                              "another aspect ratio; segment the same (centre-cropped) image")
    if picture.size != size:
        ids = np.asarray(Image.fromarray(ids.astype(np.uint8)).resize(size, Image.NEAREST))
    return ids.astype(np.int64)


# ---- Metrics ----

def confusion(gt: np.ndarray, pred: np.ndarray, n_class: int) -> np.ndarray:
    """hist (n_class, max(n_class, pred.max() + 1)): labelled pixels of class c in segment s."""
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    n_segments = max(n_class, int(pred.max()) + 1 if pred.size else 0)
    labelled = gt != IGNORE
    flat = n_segments * gt[labelled].astype(np.int64) + pred[labelled]
    return np.bincount(flat, minlength=n_class * n_segments).reshape(n_class, n_segments)


def hungarian_counts(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (TP, FP, FN) of one image, segments matched one-to-one (DiffSeg's protocol).

    Each class is matched to one segment (or an empty padded column) maximising the total overlap.
    FN: the class's pixels outside its segment; FP: its segment's pixels of other classes. Pixels of
    unmatched segments add no FP.
    """
    classes, segments = linear_sum_assignment(hist, maximize=True)  # classes == 0..n_class-1 (rows <= cols)
    tp = hist[classes, segments]
    return tp, hist.sum(0)[segments] - tp, hist.sum(1)[classes] - tp


def majority_counts(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (TP, FP, FN) of one image, each segment labelled with the class it overlaps most."""
    n_class = hist.shape[0]
    merged = hist @ np.eye(n_class, dtype=hist.dtype)[hist.argmax(0)]  # (class, class the segment took)
    tp = np.diag(merged)
    return tp, merged.sum(0) - tp, merged.sum(1) - tp


PROTOCOLS = {"hungarian": hungarian_counts, "majority": majority_counts}


def scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict:
    """IoU per class (nan where TP+FP+FN = 0), their mean over the others, pixel accuracy."""
    union = tp + fp + fn
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    labelled = (tp + fn).sum()
    return {"miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan,
            "accuracy": float(tp.sum() / labelled) if labelled else math.nan,
            "iou": [float(x) for x in iou]}


def evaluate_pairs(pairs, n_class: int) -> dict:
    """{protocol: scores} over (ground truth, prediction) array pairs, TP/FP/FN summed over the images."""
    totals = {name: np.zeros((3, n_class), dtype=np.int64) for name in PROTOCOLS}
    for gt, pred in pairs:
        hist = confusion(gt, pred, n_class)
        for name, counts in PROTOCOLS.items():
            totals[name] += np.stack(counts(hist))
    return {name: scores(*total) for name, total in totals.items()}


# ---- The command line ----

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="evaluate.py", description="mIoU and pixel accuracy of emerdiff.py's segmentations against ground "
        "truth, under DiffSeg's per-image Hungarian matching and the many-to-one (majority) matching.")
    p.add_argument("--dataset", required=True, choices=DATASETS, help="a benchmark preset, or any folder")
    p.add_argument("--root", required=True, help="the dataset's folder, laid out as docs/evaluation.md says")
    p.add_argument("--pred", required=True, help="emerdiff.py's output folder: PRED/<stem>/labels.png")
    p.add_argument("--json", metavar="OUT.json", help="also write the result to this JSON file")
    p.add_argument("--list", metavar="F",
                   help=f"evaluate only the images listed in this file (COCO: {COCO_CURATED_LIST})")
    p.add_argument("--classes", type=int, metavar="N",
                   help="--dataset folder: number of classes (default: the largest label id + 1)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N images (sorted by name)")
    p.add_argument("--allow-missing", action="store_true", help="evaluate the others when predictions are missing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def largest_class(ids: np.ndarray) -> int:
    """The largest class id of a label map; -1 when every pixel is ignored."""
    labelled = ids[ids != IGNORE]
    return int(labelled.max()) if labelled.size else -1


def class_count(args, samples: list[Sample]) -> int:
    """27 for the presets; for a folder --classes, or the largest label id + 1 over the set."""
    if args.dataset in PRESET_CLASSES:
        if args.classes not in (None, len(PRESET_CLASSES[args.dataset])):
            raise EvaluationError(f"--classes: {args.dataset} has {len(PRESET_CLASSES[args.dataset])} classes; "
                                  "drop --classes")
        return len(PRESET_CLASSES[args.dataset])
    if args.classes is not None:
        if not 1 <= args.classes <= IGNORE:
            raise EvaluationError(f"--classes {args.classes}: give 1..{IGNORE} (label {IGNORE} is 'ignore')")
        return args.classes
    largest = max(largest_class(ground_truth(s, args.dataset)) for s in samples)
    if largest < 0:
        raise EvaluationError(f"{shown(args.root)}/labels: no labelled pixel (every label is {IGNORE}, 'ignore')")
    return largest + 1


def checked_ground_truth(sample: Sample, dataset: str, n_class: int) -> np.ndarray:
    gt = ground_truth(sample, dataset)
    too_large = gt[(gt != IGNORE) & (gt >= n_class)]
    if too_large.size:
        raise EvaluationError(f"{shown(sample.label)}: class id {too_large.max()} with --classes {n_class}; "
                              "raise --classes")
    return gt


def missing_predictions(samples: list[Sample], pred: Path) -> list[Sample]:
    """The samples without PRED/<stem>/labels.png, each said in an error line."""
    missing = [s for s in samples if not (pred / s.stem / PREDICTION_FILE).is_file()]
    for s in missing:
        print(f"evaluate: error: {shown(pred / s.stem / PREDICTION_FILE)}: missing, "
              f"the prediction of {shown(s.image)}", file=sys.stderr)
    return missing


def json_ready(x):
    """nan -> None (JSON null), through dicts and lists."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_ready(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def write_json(path: Path, result: dict):
    """Through a temporary file in the same folder, then rename (files.atomic_save): no half-written file."""
    try:
        atomic_save(path, lambda tmp: tmp.write_text(json.dumps(json_ready(result), indent=1) + "\n"))
    except OSError as e:
        raise EvaluationError(f"--json {shown(path)}: cannot write it ({e.strerror})") from None


def percent(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.2f}"


def report(result: dict) -> str:
    """The result as text: the options, both protocols, IoU per class."""
    options = ", ".join(f"{k}={shown(v)}" for k, v in result["options"].items())
    lines = [f"{result['dataset']}: {result['images']} images evaluated, {result['missing']} missing",
             f"options: {options}"]
    for name in PROTOCOLS:
        lines.append(f"{name:<9}  mIoU {percent(result[name]['miou']):>6} %   "
                     f"pixel accuracy {percent(result[name]['accuracy']):>6} %")
    lines.append("IoU per class (%): hungarian / majority")
    for c, name in enumerate(result["class_names"]):
        lines.append(f"  {c:3d} {name:<16} {percent(result['hungarian']['iou'][c]):>6} / "
                     f"{percent(result['majority']['iou'][c]):>6}")
    return "\n".join(lines)


def run(args) -> dict:
    """Evaluate the command line's predictions; the result as the JSON file holds it."""
    if args.limit is not None and args.limit < 1:
        raise EvaluationError(f"--limit {args.limit}: give a positive number of images")
    pred = Path(args.pred)
    if not pred.is_dir():
        raise EvaluationError(f"--pred {shown(pred)}: no such folder (emerdiff.py's --out)")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise EvaluationError(f"--json {shown(args.json)}: its folder does not exist")
    samples = dataset_samples(args.dataset, args.root, args.list)
    if args.dataset == "coco-stuff-27" and args.list is None:
        print(f"no --list: all {len(samples)} val2017 images (the benchmark: the 2,175 of {COCO_CURATED_LIST})")
    samples = samples[:args.limit]
    n_class = class_count(args, samples)
    missing = missing_predictions(samples, pred)
    if missing and not args.allow_missing:
        raise EvaluationError(f"{len(missing)} of {len(samples)} predictions missing (listed above): "
                              "segment those images, or pass --allow-missing")
    skipped = set(missing)
    present = [s for s in samples if s not in skipped]
    if not present:
        raise EvaluationError(f"--pred {shown(pred)}: none of the {len(samples)} predictions exists")

    def pairs():
        for sample in tqdm(present, desc="evaluate", unit="image", disable=args.quiet):
            gt = checked_ground_truth(sample, args.dataset, n_class)
            yield gt, prediction(pred / sample.stem / PREDICTION_FILE, gt.shape[::-1])
    options = {"root": args.root, "pred": args.pred, "list": args.list, "classes": n_class, "limit": args.limit,
               "allow_missing": args.allow_missing}
    names = PRESET_CLASSES.get(args.dataset) or [str(c) for c in range(n_class)]
    return {"dataset": args.dataset, "images": len(present), "missing": len(missing),
            **evaluate_pairs(pairs(), n_class), "class_names": list(names), "options": options}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
        if args.json:
            write_json(Path(args.json), result)
    except EvaluationError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
