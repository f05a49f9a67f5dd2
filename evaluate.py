"""Benchmark evaluation of segmentations: mIoU and pixel accuracy against ground truth.

    python evaluate.py --dataset DATASET --root ROOT --pred PRED [--json OUT.json]

PRED is an output folder of emerdiff.py: PRED/<name>/labels.png, one segment id per pixel,
PRED/<name>/embeddings.npy, one embedding per segment, and with emerdiff.py --classes classes.json (each
segment's class) and maskclip.png (MaskCLIP's class per pixel), <name> the image's stem made safe by
files.folder_name. An unsupervised segmentor names no classes,
so its segments are first given classes; six protocols, computed from the same folders in one run:

  hungarian  DiffSeg's per-image protocol, which diffusion-based unsupervised segmentors report: per
             image, the confusion matrix hist (ground-truth classes x predicted segments, at least as
             many columns as classes) is matched one-to-one by scipy's linear_sum_assignment (maximum
             overlap); pixels of unmatched segments count as misses of their class, not as false positives.
  majority   many-to-one, an upper bound also reported in the literature: per image, each segment takes
             the class it overlaps most.
  clusters   EmerDiff's Table 1 (the classic protocol of IIC, PiCIE and STEGO): the mask embeddings of
             all images, L2-normalised, are clustered by k-means into as many clusters as classes; each
             pixel takes its segment's cluster; one Hungarian matching on the dataset's confusion matrix.
  concept    EmerDiff's Table 2 ("modified evaluation"): a pixel's embedding is its segment's embedding;
             a class's concept embedding is the mean of the embeddings of its ground-truth pixels over the
             dataset; each segment takes the class of highest cosine similarity. No matching.
  open-vocabulary  EmerDiff's Table 3: the segments named by an open-vocabulary segmentor, MaskCLIP: each
             segment takes the class most of its pixels got from MaskCLIP (mask voting; its class_id in
             classes.json), compared with the ground truth as it is, no matching.
  maskclip   Table 3's baseline: MaskCLIP's own class per pixel (maskclip.png), likewise.

All sum TP/FP/FN over the dataset: IoU_c = TP/(TP+FP+FN), mIoU = mean over the classes that have an IoU
(a class absent from ground truth and predictions alike has none), accuracy = sum(TP) / labelled pixels.

Scoring resolution: DiffSeg scores every image at 512x512, the centre-cropped label map and the
prediction each resized there by nearest neighbour (half-pixel centres), so every image weighs the
same: `--resolution 512`, the default of its two presets (coco-stuff-27, cityscapes). `--resolution
native` (the default of the others) scores at the label map's own size, the prediction resized to it.
Each run also refreshes PRED/index.html, the page of the run (page.py): the scores per image,
protocol and class, and per image the ground truth (PRED/<name>/gt.png) with each segment's matched class.
The datasets are read by datasets.py. Only the standard library, numpy, scipy, Pillow and tqdm are
used: no model, no GPU.
"""
import argparse
import json
import math
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from tqdm import tqdm

from datasets import (COCO_CURATED_LIST, DATASETS, IGNORE, PRESETS, EvaluationError, LabelFormat, Sample, center_crop,
                      dataset_samples, label_format_of)
from files import (CLASSES_FILE, EMBEDDINGS_FILE, MASKCLIP_FILE, MAX_RECORD, MAX_SEGMENTS, PREDICTION_FILE, FileError,
                   OneLineParser, atomic_save, checked_file, folder_name, listed_folder, read_text, replaceable, shown)
import page

SCORING_SIDE = 512  # --resolution 512: DiffSeg's
RESOLUTIONS = ("512", "native")
# clusters: each restart is a whole k-means over every segment of the dataset (125,000 for COCO's 5,000
# images at K = 25), so the time grows with the restarts; far more than the lowest inertia needs.
MAX_KMEANS_RESTARTS = 1000


# ---- Label maps and predictions ----

@contextmanager
def readable(path: Path, what: str):
    """`path` checked to be a regular file (files.checked_file), and Pillow's errors on it, as one-line
    EvaluationErrors."""
    try:
        checked_file(path)
        yield
    except FileError as e:
        raise EvaluationError(str(e)) from None
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
    """(H, W) class ids, the dataset's ignored value where unlabelled (label_format_of: IGNORE, or IGNORE_16 in
    16-bit ids); the centre square for DiffSeg's presets."""
    ids = label_values(sample, label_format_of(dataset))
    return PRESETS[dataset].labels[ids] if dataset in PRESETS else ids


def label_values(sample: Sample, label_format: LabelFormat) -> np.ndarray:
    """(H, W) values of a label map, checked to be of the dataset's format (8-bit, or PASCAL-Context-459's
    16-bit) and of its image's size; the centre square for DiffSeg's presets."""
    label = load_picture(sample.label, "label map")
    if label.mode not in label_format.modes:
        raise EvaluationError(f"{shown(sample.label)}: mode {label.mode}, {label_format.hint}")
    image_size = picture_size(sample.image, "image")
    if label.size != image_size:
        raise EvaluationError(f"{shown(sample.label)} is {label.size[0]}x{label.size[1]} but its image "
                              f"{shown(sample.image)} is {image_size[0]}x{image_size[1]}: they must match")
    return np.asarray(center_crop(label) if sample.crop else label)


def id_map(path: Path, what: str, limit: int, bound: str) -> np.ndarray:
    """(h, w) int64 ids of a single-channel PNG (labels.png, maskclip.png), each in 0..limit-1 (`bound` says
    why); else a one-line EvaluationError."""
    picture = load_picture(path, "PNG")
    ids = np.asarray(picture)
    if picture.format != "PNG" or ids.ndim != 2 or ids.dtype.kind not in "biu":
        raise EvaluationError(f"{shown(path)}: not a single-channel PNG of {what} "
                              f"({picture.format} {picture.mode}); write it as emerdiff.py does")
    if ids.size and (ids.min() < 0 or ids.max() >= limit):
        raise EvaluationError(f"{shown(path)}: {what} {ids.min()}..{ids.max()}: {bound} (ids 0..{limit - 1})")
    return ids.astype(np.int64)


def prediction(path: Path, size: tuple[int, int]) -> np.ndarray:
    """(h, w) int64 segment ids of a labels.png, checked against its ground truth's `size` = (W, H):
    the same aspect ratio (the prediction may be at another resolution)."""
    ids = id_map(path, "segment ids", MAX_SEGMENTS, f"at most {MAX_SEGMENTS} segments are supported")
    (height, width), (gt_width, gt_height) = ids.shape, size
    if abs(width * gt_height - height * gt_width) > 0.02 * height * gt_width:
        raise EvaluationError(f"{shown(path)} is {width}x{height}, the ground truth {gt_width}x{gt_height}: "
                              "another aspect ratio; segment the same (centre-cropped) image")
    return ids


def nearest(ids: np.ndarray, height: int, width: int) -> np.ndarray:
    """ids resized to (height, width) by nearest neighbour with half-pixel centres: output pixel i takes
    input pixel floor((i + 0.5) * in / out)."""
    rows = ((np.arange(height) + 0.5) * ids.shape[0] / height).astype(np.int64)
    cols = ((np.arange(width) + 0.5) * ids.shape[1] / width).astype(np.int64)
    return ids[rows[:, None], cols[None, :]]


def scored_pair(gt: np.ndarray, pred: np.ndarray, resolution: str) -> tuple[np.ndarray, np.ndarray]:
    """The ground truth and the prediction at the scoring resolution: both at 512x512 (DiffSeg's), or
    the prediction at the ground truth's size ("native", Pillow's nearest neighbour; mode I holds any class id)."""
    if resolution == "512":
        return nearest(gt, SCORING_SIDE, SCORING_SIDE), nearest(pred, SCORING_SIDE, SCORING_SIDE)
    if pred.shape != gt.shape:
        pred = np.asarray(Image.fromarray(pred.astype(np.int32)).resize(gt.shape[::-1], Image.NEAREST))
    return gt, pred.astype(np.int64)


def npy_array(path: Path) -> np.ndarray:
    """The array of a .npy file, or a one-line EvaluationError: the file is mapped, not read, so a header
    claiming more data than the file holds is refused by the mapping before anything is allocated; an
    empty file, another format (an .npz archive under the name) or pickled objects likewise."""
    try:
        mapped = np.load(checked_file(path), mmap_mode="r", allow_pickle=False)
    except FileError as e:
        raise EvaluationError(str(e)) from None
    except (OSError, ValueError, EOFError) as e:
        raise EvaluationError(f"{shown(path)}: not a readable .npy file ({e.__class__.__name__}: {e}); "
                              "write it as emerdiff.py does") from None
    if not isinstance(mapped, np.ndarray):  # np.load opens a zip archive (.npz) whatever its name
        mapped.close()
        raise EvaluationError(f"{shown(path)}: an .npz archive, not a .npy file; write it as emerdiff.py does")
    return np.array(mapped)


def embeddings_of(folder: Path, segments: int) -> np.ndarray:
    """(K, C) mask embeddings of a prediction folder whose labels.png holds ids below `segments`, as float64
    (emerdiff.py writes float32; wider values are kept as they are, not cast to infinity). Embeddings of no
    channel, (K, 0), are refused with the other malformed ones: no protocol can compare them."""
    path = folder / EMBEDDINGS_FILE
    embeddings = npy_array(path)
    if (embeddings.ndim != 2 or not embeddings.shape[1] or embeddings.dtype.kind != "f"
            or not np.isfinite(embeddings).all()):
        raise EvaluationError(f"{shown(path)}: {embeddings.dtype} of shape {embeddings.shape}, not (segments, "
                              "channels) finite floats of at least one channel; write it as emerdiff.py does")
    if len(embeddings) < segments:
        raise EvaluationError(f"{shown(path)}: {len(embeddings)} embeddings for segment ids up to "
                              f"{segments - 1} in {PREDICTION_FILE}; they come from different runs")
    return embeddings.astype(np.float64)


# ---- The named segments (emerdiff.py --classes): open-vocabulary and maskclip ----

def named_predictions(folder: Path, labels: np.ndarray, dataset: str, n_class: int, protocols: set) -> dict:
    """{protocol: (h, w) class ids at labels.png's size} of the naming protocols asked: open-vocabulary, each
    pixel its segment's class_id in classes.json; maskclip, maskclip.png."""
    if not protocols & NAMING_PROTOCOLS:
        return {}
    named = {"open-vocabulary": voted_classes(folder / CLASSES_FILE, labels, dataset, n_class)}
    if "maskclip" in protocols:
        named["maskclip"] = maskclip_classes(folder / MASKCLIP_FILE, labels.shape, n_class)
    return {name: ids for name, ids in named.items() if name in protocols}


def maskclip_classes(path: Path, shape: tuple[int, int], n_class: int) -> np.ndarray:
    """(h, w) class ids of maskclip.png, checked to be at labels.png's size `shape` = (h, w) and among the
    n_class classes."""
    ids = id_map(path, "class ids", n_class, f"{CLASSES_FILE} names {n_class} classes")
    if ids.shape != shape:
        raise EvaluationError(f"{shown(path)} is {ids.shape[1]}x{ids.shape[0]}, its {PREDICTION_FILE} "
                              f"{shape[1]}x{shape[0]}: they come from different runs; segment the image again")
    return ids


def voted_classes(path: Path, labels: np.ndarray, dataset: str, n_class: int) -> np.ndarray:
    """(h, w) class ids: each pixel of labels.png its segment's class_id in classes.json (checked_classes);
    a segment of labels.png that classes.json does not name is refused."""
    class_of = {entry["segment"]: entry["class_id"] for entry in checked_classes(path, dataset, n_class)["segments"]}
    segments = np.unique(labels).tolist()
    unnamed = [segment for segment in segments if segment not in class_of]
    if unnamed:
        raise EvaluationError(f"{shown(path)}: segment {unnamed[0]} of {PREDICTION_FILE} is not in it: they come "
                              "from different runs; segment the image again")
    table = np.zeros(segments[-1] + 1, np.int64)
    table[segments] = [class_of[segment] for segment in segments]
    return table[labels]


def checked_classes(path: Path, dataset: str, n_class: int) -> dict:
    """classes.json, read with a bound on its size, of the contract's form (well_formed), of the dataset's
    classes (a preset's: its vocabulary is the preset's name; a folder's: as many classes as evaluated) and
    every class_id among them; else a one-line EvaluationError."""
    try:
        record = json.loads(read_text(path, MAX_RECORD))
    except FileError as e:
        raise EvaluationError(str(e)) from None
    except (ValueError, RecursionError):
        record = None
    if not well_formed(record):
        raise EvaluationError(f"{shown(path)}: not a {CLASSES_FILE} as emerdiff.py --classes writes it (vocabulary, "
                              "classes, segments of distinct segment ids with their class_id); segment the image again")
    count = len(record["classes"])
    if dataset in PRESETS and (record["vocabulary"] != dataset or count != n_class):
        raise EvaluationError(f"{shown(path)}: vocabulary {json.dumps(record['vocabulary'])} of {count} classes, not "
                              f"{dataset}'s {n_class}: run emerdiff.py with --classes {dataset}")
    if count != n_class:
        raise EvaluationError(f"{shown(path)}: {count} classes, the labels {n_class}: give evaluate.py --classes "
                              f"{count}, or run emerdiff.py with --classes naming the dataset's {n_class} classes")
    wrong = next((entry for entry in record["segments"] if not 0 <= entry["class_id"] < count), None)
    if wrong:
        raise EvaluationError(f"{shown(path)}: segment {wrong['segment']} has class_id {wrong['class_id']}, outside "
                              f"0..{count - 1}; segment the image again")
    return record


def well_formed(record) -> bool:
    """Whether a classes.json holds what the contract says: a vocabulary (a name or null), the class names,
    and the segments, each of its own segment id with an integer class_id."""
    if not isinstance(record, dict) or not {"vocabulary", "classes", "segments"} <= record.keys():
        return False
    vocabulary, classes, segments = record["vocabulary"], record["classes"], record["segments"]
    return (isinstance(vocabulary, (str, type(None))) and isinstance(classes, list) and isinstance(segments, list)
            and all(isinstance(name, str) for name in classes)
            and all(isinstance(entry, dict) and is_integer(entry.get("segment")) and is_integer(entry.get("class_id"))
                    for entry in segments)
            and len({entry["segment"] for entry in segments}) == len(segments))


def is_integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---- Per image: hungarian and majority ----

def confusion(gt: np.ndarray, pred: np.ndarray, n_class: int, ignore: int = IGNORE) -> np.ndarray:
    """hist (n_class, max(n_class, pred.max() + 1)): labelled pixels (gt not `ignore`) of class c in segment s."""
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    n_segments = max(n_class, int(pred.max()) + 1 if pred.size else 0)
    labelled = gt != ignore
    flat = n_segments * gt[labelled].astype(np.int64) + pred[labelled]
    return np.bincount(flat, minlength=n_class * n_segments).reshape(n_class, n_segments)


def with_empty_segments(hist: np.ndarray) -> np.ndarray:
    """hist with empty segments (columns of zeros) added up to as many as its classes: DiffSeg's matching
    gives every class a column."""
    return np.pad(hist, ((0, 0), (0, max(0, hist.shape[0] - hist.shape[1]))))


def hungarian_matching(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes, segments): class classes[i] matched to segment (column) segments[i] of with_empty_segments(hist),
    maximising the total overlap; classes == 0..n_class-1."""
    return linear_sum_assignment(with_empty_segments(hist), maximize=True)


def hungarian_counts(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (TP, FP, FN) of one image, segments matched one-to-one (DiffSeg's protocol).

    Each class is matched to one segment (or an empty padded column) maximising the total overlap.
    FN: the class's pixels outside its segment; FP: its segment's pixels of other classes. Pixels of
    unmatched segments add no FP.
    """
    hist = with_empty_segments(hist)
    classes, segments = hungarian_matching(hist)
    tp = hist[classes, segments]
    return tp, hist.sum(0)[segments] - tp, hist.sum(1)[classes] - tp


def counts_of(confusion_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (TP, FP, FN) of a square confusion matrix (ground-truth class x assigned class)."""
    tp = np.diag(confusion_matrix)
    return tp, confusion_matrix.sum(0) - tp, confusion_matrix.sum(1) - tp


def assigned(hist: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """hist (class x segment) -> (class x class): each segment's pixels moved to the class it was given."""
    n_class = hist.shape[0]
    return hist[:, :len(classes)] @ np.eye(n_class, dtype=hist.dtype)[classes]


def majority_counts(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (TP, FP, FN) of one image, each segment labelled with the class it overlaps most."""
    return counts_of(assigned(hist, hist.argmax(0)))


# ---- Over the dataset: clusters and concept, from the mask embeddings ----

@dataclass
class ImageResult:
    stem: str
    hist: np.ndarray  # (n_class, segments) labelled pixels of class c in segment s, no empty columns added
    embeddings: np.ndarray | None  # (K, C) mask embeddings, None where the protocols need none
    undefined: dict = field(default_factory=dict)  # Preset.undefined: {label value: pixels}
    ground_truth_saved: bool = False  # gt.png written into its prediction folder (the page shows it)
    named: dict = field(default_factory=dict)  # open-vocabulary and maskclip, where asked: protocol -> TP, FP, FN

    @cached_property
    def hungarian(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This image's (TP, FP, FN) under hungarian: the protocol and the per-image scores share them."""
        return hungarian_counts(self.hist)


def per_image(counts):
    """A per-image protocol (ImageResult -> TP, FP, FN) as a dataset protocol: its counts summed over the images."""
    return lambda results, n_class, _settings: tuple(sum(np.stack(counts(r)) for r in results))


def concept_counts(results: list[ImageResult], n_class: int, _settings) -> tuple:
    """EmerDiff's modified protocol: concept embeddings from the ground truth, each segment the class
    of the most similar concept (cosine)."""
    dims = results[0].embeddings.shape[1]
    totals, pixels = np.zeros((n_class, dims)), np.zeros(n_class)
    for r in results:  # a pixel's embedding is its segment's: sum hist[c, s] * embedding_s
        hist = r.hist[:, :len(r.embeddings)]
        totals += hist @ r.embeddings
        pixels += hist.sum(1)
    present = np.flatnonzero(pixels)  # a class without a labelled pixel has no concept
    if not present.size:  # no labelled pixel at all: nothing to count
        return counts_of(np.zeros((n_class, n_class), dtype=np.int64))
    concepts = unit(totals[present] / pixels[present, None])
    matrix = sum(assigned(r.hist, present[(unit(r.embeddings) @ concepts.T).argmax(1)]) for r in results)
    return counts_of(matrix)


def cluster_counts(results: list[ImageResult], n_class: int, settings: dict) -> tuple:
    """The classic protocol: every mask embedding of the dataset clustered into n_class clusters,
    then one Hungarian matching of clusters to classes on the dataset's confusion matrix."""
    embeddings = unit(np.concatenate([r.embeddings for r in results]))
    clusters = kmeans(embeddings, n_class, seed=settings["seed"], restarts=settings["restarts"])
    starts = np.cumsum([0] + [len(r.embeddings) for r in results])
    matrix = sum(assigned(r.hist, clusters[start:start + len(r.embeddings)]) for r, start in zip(results, starts))
    classes, matched = linear_sum_assignment(matrix, maximize=True)  # cluster matched[c] is class c
    return counts_of(matrix[:, matched])


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero), in float64, whatever their scale: each row is first
    divided by its largest magnitude, so that no square in its length overflows or vanishes."""
    largest = np.abs(x).max(1, keepdims=True).astype(np.float64)
    x = x / np.where(largest > 0, largest, 1)
    length = np.linalg.norm(x, axis=1, keepdims=True)  # at least 1 for a row that is not zero
    return x / np.where(length > 0, length, 1)


def kmeans(x: np.ndarray, k: int, *, seed: int, restarts: int, iters: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding, the lowest inertia of `restarts` runs -> labels (N,).
    k is lowered to the number of points where there are fewer. Not emerdiff.kmeans: evaluate.py runs
    without torch, on the embeddings of whole datasets, and a cluster that empties keeps its center
    (it then simply stays empty: here fewer clusters than k are allowed, where the method wants K masks
    and re-seeds one)."""
    rng, k = np.random.default_rng(seed), min(k, len(x))
    squares = (x ** 2).sum(1)
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        centers = kmeans_plus_plus(x, squares, k, rng)
        for _ in range(iters):
            distances = squares[:, None] - 2 * x @ centers.T + (centers ** 2).sum(1)  # (N, k)
            labels = distances.argmin(1)
            members = csr_matrix((np.ones(len(x), dtype=x.dtype), (labels, np.arange(len(x)))), shape=(k, len(x)))
            counts = np.bincount(labels, minlength=k)[:, None]
            moved = np.where(counts > 0, (members @ x) / np.maximum(counts, 1), centers)  # an empty one stays
            if np.allclose(moved, centers):
                break
            centers = moved
        inertia = np.maximum(distances[np.arange(len(x)), labels], 0).sum()
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def kmeans_plus_plus(x: np.ndarray, squares: np.ndarray, k: int, rng) -> np.ndarray:
    """Greedy k-means++ seeding (scikit-learn's): the first center uniformly; for each next one, 2 + ln(k)
    candidates drawn in proportion to the squared distance to the nearest center so far, the one that
    lowers the total most kept."""
    trials = 2 + int(np.log(k))
    centers = [x[rng.integers(len(x))]]
    closest = np.maximum(squares - 2 * x @ centers[0] + centers[0] @ centers[0], 0)  # to the nearest center
    while len(centers) < k:
        total = closest.sum()
        candidates = rng.choice(len(x), size=trials, p=closest / total if total > 0 else None)
        to_candidates = np.maximum(squares[:, None] - 2 * x @ x[candidates].T + squares[candidates], 0)  # (N, L)
        if_chosen = np.minimum(closest[:, None], to_candidates)
        best = if_chosen.sum(0).argmin()
        centers.append(x[candidates[best]])
        closest = if_chosen[:, best]
    return np.stack(centers)


PROTOCOLS = {"hungarian": per_image(lambda r: r.hungarian), "majority": per_image(lambda r: majority_counts(r.hist)),
             "clusters": cluster_counts, "concept": concept_counts,
             "open-vocabulary": per_image(lambda r: r.named["open-vocabulary"]),
             "maskclip": per_image(lambda r: r.named["maskclip"])}
EMBEDDING_PROTOCOLS = {"clusters", "concept"}
NAMING_PROTOCOLS = {"open-vocabulary", "maskclip"}  # EmerDiff's Table 3: the segments named (emerdiff.py --classes)
# What the protocols beyond hungarian and majority need in every prediction folder: (protocols, files, what
# writes the files, what to do where they lack)
NEEDED_FILES = [(EMBEDDING_PROTOCOLS, (EMBEDDINGS_FILE,), "written by emerdiff.py since it saves mask embeddings",
                 "segment them again with --overwrite"),
                (NAMING_PROTOCOLS, (CLASSES_FILE, MASKCLIP_FILE), "written by emerdiff.py --classes",
                 "segment them again with --classes (a preset: its name; docs/evaluation.md)")]


def scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict:
    """IoU per class (nan where TP+FP+FN = 0), their mean over the others, pixel accuracy."""
    union = tp + fp + fn
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    labelled = (tp + fn).sum()
    return {"miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan,
            "accuracy": float(tp.sum() / labelled) if labelled else math.nan,
            "iou": [float(x) for x in iou]}


def evaluate_pairs(pairs, n_class: int) -> dict:
    """{protocol: scores} of hungarian and majority over (ground truth, prediction) array pairs."""
    results = [ImageResult(str(i), confusion(gt, pred, n_class), None) for i, (gt, pred) in enumerate(pairs)]
    return {name: scores(*PROTOCOLS[name](results, n_class, None)) for name in ("hungarian", "majority")}


# ---- The command line ----

def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(
        prog="evaluate.py", description="mIoU and pixel accuracy of emerdiff.py's segmentations against ground "
        "truth, under six protocols: DiffSeg's per-image Hungarian matching; the many-to-one (majority) "
        "matching; EmerDiff's Table 1 (clusters: the L2-normalised mask embeddings of all images k-means "
        "clustered into as many clusters as classes, one Hungarian matching over the dataset); EmerDiff's "
        "Table 2 (concept: each segment takes the class whose mean ground-truth embedding is nearest by "
        "cosine); EmerDiff's Table 3 (open-vocabulary: each segment named by MaskCLIP's mask voting, written by "
        "emerdiff.py --classes; maskclip: MaskCLIP alone). See docs/evaluation.md.")
    p.add_argument("--dataset", required=True, choices=DATASETS, help="a benchmark preset, or any folder")
    p.add_argument("--root", required=True, help="the dataset's folder, laid out as docs/evaluation.md says")
    p.add_argument("--pred", required=True, help="emerdiff.py's output folder: PRED/<image stem>/labels.png")
    p.add_argument("--json", metavar="OUT.json", help="also write the result to this JSON file")
    p.add_argument("--list", metavar="F",
                   help=f"evaluate only the images listed in this file (COCO: {COCO_CURATED_LIST})")
    p.add_argument("--classes", type=int, metavar="N",
                   help="--dataset folder: number of classes (default: the largest label id + 1)")
    p.add_argument("--resolution", choices=RESOLUTIONS,
                   help="score at 512x512, both maps resized by nearest neighbour (DiffSeg's; the default of "
                   "coco-stuff-27 and cityscapes), or at the label map's own size (native; the others' default)")
    p.add_argument("--protocols", nargs="+", choices=list(PROTOCOLS), metavar="P",
                   help=f"any of {', '.join(PROTOCOLS)} (default: hungarian and majority, the next two where every "
                   f"prediction folder has {EMBEDDINGS_FILE}, the last two where every one has {CLASSES_FILE} and "
                   f"{MASKCLIP_FILE})")
    p.add_argument("--seed", type=int, default=0, help="clusters: the seed of the k-means over the mask embeddings")
    p.add_argument("--kmeans-restarts", type=int, default=3, metavar="N",
                   help="clusters: k-means++ restarts, the lowest inertia kept")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N images (sorted by name)")
    p.add_argument("--allow-missing", action="store_true", help="evaluate the others when predictions are missing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def largest_class(ids: np.ndarray) -> int:
    """The largest class id of a label map; -1 when every pixel is ignored."""
    labelled = ids[ids != IGNORE]
    return int(labelled.max()) if labelled.size else -1


def class_count(args, samples: list[Sample]) -> int:
    """A preset's class count; for a folder --classes, or the largest label id + 1 over the set."""
    if args.dataset in PRESETS:
        count = len(PRESETS[args.dataset].classes)
        if args.classes not in (None, count):
            raise EvaluationError(f"--classes: {args.dataset} has {count} classes; drop --classes")
        return count
    if args.classes is not None:
        if not 1 <= args.classes <= IGNORE:
            raise EvaluationError(f"--classes {args.classes}: give 1..{IGNORE} (label {IGNORE} is 'ignore')")
        return args.classes
    largest = max(largest_class(ground_truth(s, args.dataset)) for s in samples)
    if largest < 0:
        raise EvaluationError(f"{shown(args.root)}/labels: no labelled pixel (every label is {IGNORE}, 'ignore')")
    return largest + 1


def checked_ground_truth(sample: Sample, dataset: str, n_class: int) -> tuple[np.ndarray, dict]:
    """The class ids of a sample, and for a preset its pixels per label value the dataset does not
    define (counted nowhere, reported); a folder's class id beyond --classes is refused."""
    if dataset in PRESETS:
        preset = PRESETS[dataset]
        ids = label_values(sample, preset.label_format)
        return preset.labels[ids], preset.undefined(ids)
    gt = ground_truth(sample, dataset)
    too_large = gt[(gt != IGNORE) & (gt >= n_class)]
    if too_large.size:
        raise EvaluationError(f"{shown(sample.label)}: class id {too_large.max()} with --classes {n_class}; "
                              "raise --classes")
    return gt, {}


def missing_predictions(samples: list[Sample], pred: Path) -> list[Sample]:
    """The samples without PRED/<name>/labels.png, each said in an error line."""
    missing = [s for s in samples if not (pred / folder_name(s.stem) / PREDICTION_FILE).is_file()]
    for s in missing:
        print(f"evaluate: error: {shown(pred / folder_name(s.stem) / PREDICTION_FILE)}: missing, "
              f"the prediction of {shown(s.image)}", file=sys.stderr)
    return missing


def chosen_protocols(args, samples: list[Sample], pred: Path) -> list[str]:
    """--protocols, or every protocol whose files (NEEDED_FILES) every prediction folder has, those left out
    said in a line; a protocol asked for whose files some folder lacks is refused."""
    chosen = set(args.protocols or PROTOCOLS)
    for protocols, files, made_by, fix in NEEDED_FILES:
        asked = [name for name in PROTOCOLS if name in chosen & protocols]
        lacking = sum(not all((pred / folder_name(s.stem) / f).is_file() for f in files) for s in samples)
        if not asked or not lacking:
            continue
        how = f"{lacking} of {len(samples)} prediction folders lack {' or '.join(files)} ({made_by}): {fix}"
        if args.protocols:
            raise EvaluationError(f"--protocols {' '.join(asked)}: {how}")
        print(f"{' and '.join(asked)} left out: {how}")
        chosen -= protocols
    return [name for name in PROTOCOLS if name in chosen]


def json_ready(x):
    """nan -> None (JSON null), through dicts and lists."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_ready(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def checked_json_path(path: Path) -> Path:
    """--json's file, checked before any scoring: its folder exists, and nothing but a regular file is at
    its path (files.replaceable: a FIFO, a device or a folder there is never opened nor replaced)."""
    if not path.resolve().parent.is_dir():
        raise EvaluationError(f"--json {shown(path)}: its folder does not exist")
    try:
        return replaceable(path)
    except FileError as e:
        raise EvaluationError(f"--json {e}; give the name of a file to write") from None


def write_json(path: Path, result: dict):
    """Through a temporary file in the same folder, then rename (files.atomic_save): no half-written file."""
    try:
        text = json.dumps(json_ready(result), indent=1) + "\n"
        atomic_save(checked_json_path(path), lambda tmp: tmp.write_text(text))
    except OSError as e:
        raise EvaluationError(f"--json {shown(path)}: cannot write it ({e.strerror})") from None


def percent(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.2f}"


def report(result: dict) -> str:
    """The result as text: the options, each protocol, IoU per class."""
    options = ", ".join(f"{k}={shown(v)}" for k, v in result["options"].items())
    protocols = [name for name in PROTOCOLS if name in result]
    lines = [f"{result['dataset']}: {result['images']} images evaluated, {result['missing']} missing; "
             f"scored at {result['resolution']}", f"options: {options}"]
    if result["undefined_label_values"]:
        values = result["undefined_label_values"]
        lines.append(f"{sum(values.values())} pixels in {result['undefined_label_maps']} of {result['images']} label "
                     f"maps hold values {result['dataset']} does not define ({', '.join(values)}): counted nowhere")
    width = max(map(len, protocols))
    for name in protocols:
        lines.append(f"{name:<{width}}  mIoU {percent(result[name]['miou']):>6} %   "
                     f"pixel accuracy {percent(result[name]['accuracy']):>6} %")
    lines.append(f"IoU per class (%): {' / '.join(protocols)}")
    for c, name in enumerate(result["class_names"]):
        lines.append(f"  {c:3d} {name:<16} " + " / ".join(f"{percent(result[p]['iou'][c]):>6}" for p in protocols))
    return "\n".join(lines)


def run(args) -> dict:
    """Evaluate the command line's predictions; the result as the JSON file holds it."""
    if args.limit is not None and args.limit < 1:
        raise EvaluationError(f"--limit {args.limit}: give a positive number of images")
    if not 1 <= args.kmeans_restarts <= MAX_KMEANS_RESTARTS:
        raise EvaluationError(f"--kmeans-restarts {args.kmeans_restarts}: give 1..{MAX_KMEANS_RESTARTS} (each "
                              "restart clusters every segment of the dataset again, with no progress shown)")
    if args.seed < 0:
        raise EvaluationError(f"--seed {args.seed}: give a seed of 0 or more")
    pred = Path(args.pred)
    if not pred.is_dir():
        raise EvaluationError(f"--pred {shown(pred)}: no such folder (emerdiff.py's --out)")
    try:
        listed_folder(pred)
    except FileError as e:
        raise EvaluationError(f"--pred {e}") from None
    if args.json:
        checked_json_path(Path(args.json))
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
    protocols = chosen_protocols(args, present, pred)
    resolution = args.resolution or (PRESETS[args.dataset].resolution if args.dataset in PRESETS else "native")
    results = [image_result(sample, pred / folder_name(sample.stem), args.dataset, n_class, resolution, set(protocols))
               for sample in tqdm(present, desc="evaluate", unit="image", disable=args.quiet)]
    widths = {r.embeddings.shape[1] for r in results if r.embeddings is not None}
    if len(widths) > 1:
        channels = " and ".join(map(str, sorted(widths)))
        raise EvaluationError(f"the {EMBEDDINGS_FILE} files hold embeddings of {channels} channels: they come from "
                              "different models; segment the images again with one")
    settings = {"seed": args.seed, "restarts": args.kmeans_restarts}
    options = {"root": args.root, "pred": args.pred, "list": args.list, "classes": n_class, "limit": args.limit,
               "allow_missing": args.allow_missing}
    names = PRESETS[args.dataset].classes if args.dataset in PRESETS else [str(c) for c in range(n_class)]
    undefined = sum((Counter(r.undefined) for r in results), Counter())
    result = {"dataset": args.dataset, "images": len(present), "missing": len(missing),
            "resolution": f"{SCORING_SIDE}x{SCORING_SIDE}" if resolution == "512" else "native",
            **{name: scores(*PROTOCOLS[name](results, n_class, settings)) for name in protocols},
            "per_image": [{"stem": r.stem, **{k: v for k, v in scores(*r.hungarian).items() if k != "iou"}}
                          for r in results],
            "undefined_label_values": {str(v): n for v, n in sorted(undefined.items())},
            "undefined_label_maps": sum(bool(r.undefined) for r in results),
            "class_names": list(names), "options": options, "protocols": protocols,
            "protocol_settings": {name: value for name, value in settings_of(args).items() if name in protocols}}
    refresh_page(pred, result, results)
    return result


def settings_of(args) -> dict:
    """The choices the paper leaves open, as this evaluation made them (docs/evaluation.md)."""
    return {"clusters": {"embeddings": "L2-normalised", "seed": args.seed, "kmeans_restarts": args.kmeans_restarts},
            "concept": {"pixel embedding": "its segment's", "similarity": "cosine"}}


def image_result(sample: Sample, folder: Path, dataset: str, n_class: int, resolution: str,
                 protocols: set) -> ImageResult:
    """One image's confusion matrix at the scoring resolution, its mask embeddings where `protocols` need them,
    and the counts of its named segments' protocols."""
    gt, undefined = checked_ground_truth(sample, dataset, n_class)
    ignore = label_format_of(dataset).ignore
    saved = saved_ground_truth(folder, gt, class_colours(dataset, n_class), ignore)
    labels = prediction(folder / PREDICTION_FILE, gt.shape[::-1])
    scored_gt, pred = scored_pair(gt, labels, resolution)
    # its segments' columns only, a copy (a slice would keep the whole matrix alive): padded to PASCAL-Context-459's
    # classes, 1.7 MB an image, 8.6 GB for its val set
    hist = confusion(scored_gt, pred, n_class, ignore)[:, :int(pred.max()) + 1].copy()
    named = {name: counts_of(confusion(*scored_pair(gt, ids, resolution), n_class, ignore))
             for name, ids in named_predictions(folder, labels, dataset, n_class, protocols).items()}
    if not protocols & EMBEDDING_PROTOCOLS:
        return ImageResult(sample.stem, hist, None, undefined, saved, named)
    vectors = embeddings_of(folder, int(pred.max()) + 1)
    padded = np.pad(hist, ((0, 0), (0, max(0, len(vectors) - hist.shape[1]))))  # segments with no pixel here
    return ImageResult(sample.stem, padded, vectors, undefined, saved, named)


def class_colours(dataset: str, n_class: int) -> np.ndarray:
    """(n_class, 3) uint8: the dataset's own class colours (Cityscapes), else page.py's fixed palette."""
    return page.class_colours(n_class, PRESETS[dataset].colours if dataset in PRESETS else None)


def saved_ground_truth(folder: Path, gt: np.ndarray, colours: np.ndarray, ignore: int) -> bool:
    """gt.png in the prediction folder, for its page (page.py); False where it cannot be written."""
    try:
        page.save_ground_truth(folder, gt, colours, ignore)
        return True
    except (OSError, FileError):
        return False


def refresh_page(pred: Path, result: dict, results: list[ImageResult]):
    """The prediction folder's summary.scores.json and index.html (page.py): the scores per image (and
    the class each segment was matched to by hungarian), per protocol and per class; the page shows the
    folder's other complete image folders too (page.page_data). A page that cannot be written is said in
    one line; the scores stand."""
    images = {}
    for r, entry in zip(results, result["per_image"]):
        classes, segments = hungarian_matching(r.hist)
        matched = np.full(max(r.hist.shape), -1)
        matched[segments] = classes
        images[folder_name(r.stem)] = {"miou": entry["miou"], "accuracy": entry["accuracy"],
                                       "matched": matched.tolist(), "classes": np.flatnonzero(r.hist.sum(1)).tolist(),
                                       "gt": r.ground_truth_saved,
                                       "labels_written": page.labels_written(pred / folder_name(r.stem))}
    try:
        page.write_scores(pred, json_ready(result), json_ready(images),
                             class_colours(result["dataset"], len(result["class_names"])))
    except OSError as e:
        print(f"evaluate: cannot write {shown(pred / page.SCORES)}: {e.strerror or e}", file=sys.stderr)
        return
    except FileError as e:
        print(f"evaluate: cannot write {e}", file=sys.stderr)
        return
    page.refresh_page(pred, sorted(images), None, lambda line: print(f"evaluate: {line}", file=sys.stderr))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
        if args.json:
            write_json(Path(args.json), result)
    except (EvaluationError, FileError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
