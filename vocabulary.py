"""Named segments: EmerDiff's segments named by MaskCLIP, as the paper's Sec. 4.3 (Table 3) does it.

EmerDiff's segments carry no names. For Table 3 ("annotation-free open-vocabulary segmentation") the paper lets an
open-vocabulary segmentor give every pixel a class and each EmerDiff segment take the class that most of its pixels
got ("mask voting"); the segmentor's own per-pixel classes are the row it improves on (MaskCLIP on ADE20K: 9.8 ->
15.9 mIoU). The segmentor here is MaskCLIP (Zhou, Loy, Dai, "Extract Free Dense Labels from CLIP", ECCV 2022),
training-free: CLIP ViT-B/16 (clip_image.py) with its last attention left out for the patch tokens
(CLIP.dense_features), each patch compared by cosine with each class name's text embedding. In order:

  class_names          --classes: a preset's classes, a file's lines, or a comma-separated list, checked
  text_embeddings      each name in MaskCLIP's 85 prompt templates, embedded, averaged (once per run)
  maskclip_scores      per patch, the cosine of its dense feature with each class; MaskCLIP's two refinements,
                       prompt denoising and key smoothing, where asked (both off, as its released configs)
  pixel_classes        the scores up-sampled bilinearly to the image, argmax per pixel; each segment's votes
  voted_classes        each segment's class: most votes, a tie broken by the summed scores
  name_segments        all of it, on one image and emerdiff.segment's labels of it

Why a file beside emerdiff.py and not in it: emerdiff.py is the paper's Steps 0-4 on Stable Diffusion alone, read top
to bottom; naming is one use of their result, with a second model. It imports emerdiff, not the other way round.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datasets import PRESETS
from devices import progress_bar
from emerdiff import load_image
from files import CLASSES_FILE, MASKCLIP_FILE, FileError, read_text, shown
from inputs import EmerDiffError, check_tensors
import page

MAX_CLASSES = 1000  # more names than any benchmark has (PASCAL-Context's 459, ADE20K-full's 847)
MAX_NAME = 200  # characters of one class name (CLIP reads 75 tokens of a prompt)
CLASS_FILE_LIMIT = 2**20  # bytes of a --classes file
TEXT_BATCH = 256  # prompts per call of the text tower
BLOCK_ELEMENTS = 2**24  # up-sampled scores held at once (64 MB in float32): rows of the image at a time
KEY_SMOOTHING, PROMPT_DENOISING = 1.0, 0.5  # MaskCLIP's thresholds where it turns them on (its configs)

# MaskCLIP's prompt templates (its tools/maskclip_utils/prompt_engineering.py): CLIP's 80 ImageNet templates
# (Radford et al. 2021, their zero-shot notebook), then 5 of its own "in the scene" ones.
TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.")


# ---- The class names ----

def preset_names(dataset: str) -> tuple[str, ...]:
    """A benchmark's class names as MaskCLIP words them for its prompts, in the dataset's order (so a class id is
    the dataset's class index): PASCAL-Context's run-together names apart; COCO-Stuff's "wall-brick" as "brick
    wall" and "sky-other" as "sky" (MaskCLIP's coco_stuff_classes). Other presets' names as the dataset has them."""
    names = PRESETS[dataset].classes
    if dataset == "pascal-context-59":
        return tuple({"aeroplane": "airplane", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}.get(n, n)
                     for n in names)
    if dataset == "coco-stuff-171":
        return tuple(coco_stuff_words(n) for n in names)
    return names


def coco_stuff_words(name: str) -> str:
    """"wall-brick" -> "brick wall", "sky-other" and "desk-stuff" -> "sky" and "desk"; other names as they are."""
    if "-" not in name:
        return name
    head, tail = name.split("-", 1)
    return head if tail in ("other", "stuff") else f"{tail} {head}"


def class_names(given: str) -> tuple[tuple[str, ...], str | None]:
    """--classes: (the names in order, the preset's name or None). `given` is a preset (any of datasets.PRESETS:
    its classes in the dataset's order), else a file (one name a line, blank lines skipped), else names
    separated by commas. Each checked: none empty, none twice (CLIP reads "Cat" as "cat"), at most MAX_CLASSES."""
    if given in PRESETS:
        return preset_names(given), given
    path = Path(given)
    if names_a_file(path):
        try:
            names, where = read_text(path, CLASS_FILE_LIMIT).splitlines(), f"--classes {shown(path)}"
        except FileError as e:
            raise EmerDiffError(f"--classes {shown(path)}: cannot read it ({e.reason.split(':')[0]}): give a UTF-8 "
                                f"text file of at most {CLASS_FILE_LIMIT:,} bytes, one class name a line") from None
        names = [name for name in names if name.strip()]
    else:
        names, where = given.split(","), "--classes"
    return checked_names([" ".join(name.split()) for name in names], where), None


def names_a_file(path: Path) -> bool:
    """Whether `path` is a file (a comma-separated list too long to be a file name is none)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def checked_names(names: list[str], where: str) -> tuple[str, ...]:
    """The names, or one line on what is wrong with them."""
    how = ('give names separated by commas ("cat, grass, sky"), a file with one name a line, or a dataset '
           f"({', '.join(PRESETS)})")
    if not any(names):
        raise EmerDiffError(f"{where}: no class name: {how}")
    if "" in names:
        raise EmerDiffError(f"{where}: name {names.index('') + 1} of {len(names)} is empty: {how}")
    if len(names) > MAX_CLASSES:
        raise EmerDiffError(f"{where}: {len(names)} names, more than {MAX_CLASSES}: give fewer")
    if long := next((name for name in names if len(name) > MAX_NAME), None):
        raise EmerDiffError(f"{where}: the name {long[:40]!r}... is over {MAX_NAME} characters: shorten it")
    seen = {}
    for name in names:
        if name.lower() in seen:
            raise EmerDiffError(f"{where}: {name!r} is given twice (as {seen[name.lower()]!r} before): give each once")
        seen[name.lower()] = name
    return tuple(names)


# ---- MaskCLIP ----

@torch.no_grad()
def text_embeddings(clip, classes, templates=TEMPLATES) -> torch.Tensor:
    """(C, D) unit vectors: each class name put in every template, embedded by CLIP's text tower, each embedding
    L2-normalised, averaged over the templates and normalised again (MaskCLIP's prompt engineering, which is CLIP's
    zero-shot recipe). Made once per run: 85 prompts a class."""
    prompts = [template.format(name) for name in classes for template in templates]
    batches = progress_bar(range(0, len(prompts), TEXT_BATCH), desc="class names")
    embedded = torch.cat([clip.encode_text(prompts[i:i + TEXT_BATCH]).float() for i in batches])
    per_class = F.normalize(embedded, dim=-1).unflatten(0, (len(classes), len(templates))).mean(1)
    return F.normalize(per_class, dim=-1)


@torch.no_grad()
def maskclip_scores(clip, pixels: torch.Tensor, text: torch.Tensor, *, key_smoothing: float | None = None,
                    prompt_denoising: float | None = None) -> torch.Tensor:
    """MaskCLIP's class scores per patch, (C, h, w), for pixels (1, 3, H, W) in [-1, 1] and `text` (C, D) unit
    vectors: the cosine of each patch's dense feature with each class (MaskCLIP Sec. 3.2); then, where given a
    threshold, prompt denoising and key smoothing (its Sec. 3.3), in that order, as its MaskClipHead does them."""
    check_tensors("maskclip_scores", pixels=(pixels, "(1, 3, H, W)"), text=(text, "(C, D)"))
    features, keys = clip.dense_features(pixels, with_keys=True)  # (1, D, h, w), (1, h*w, C')
    scores = torch.einsum("dhw,cd->chw", F.normalize(features[0].float(), dim=0), text.float().to(features.device))
    if prompt_denoising is not None:
        scores = prompt_denoised(scores, prompt_denoising)
    if key_smoothing is not None:
        scores = key_smoothed(scores, keys[0].float(), key_smoothing)
    return scores


def prompt_denoised(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Prompt denoising: a class whose probability (softmax of 100 x the cosines over the classes) reaches
    `threshold` at no patch is taken to be absent from the image; its scores become -100 everywhere."""
    probabilities = torch.softmax(100 * scores, dim=0)  # (C, h, w)
    absent = probabilities.flatten(1).amax(1) < threshold  # (C,)
    return scores.masked_fill(absent[:, None, None], -100)


def key_smoothed(scores: torch.Tensor, keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """Key smoothing: the class probabilities (softmax of 100 x the scores) of each patch whose best probability is
    below `threshold` (MaskCLIP's 1.0: nearly all) replaced by the sum of every patch's, weighted by how alike
    their last-block keys (h*w, C') are. Returns probabilities (C, h, w). As MaskCLIP's code computes it, each key
    channel is normalised over the patches (F.normalize's default dim=1 of its (B, h*w, C') keys), not each key."""
    C, h, w = scores.shape
    probabilities = torch.softmax(100 * scores, dim=0).flatten(1).T  # (h*w, C)
    keys = F.normalize(keys, dim=0)
    smoothed = (keys @ keys.T) @ probabilities  # (h*w, h*w) @ (h*w, C)
    unsure = probabilities.amax(1, keepdim=True) < threshold  # (h*w, 1)
    return torch.where(unsure, smoothed, probabilities).T.reshape(C, h, w)


# ---- Per pixel, and per segment ----

def linear_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): linear interpolation from n_in to n_out samples as a matrix, half-pixel centres
    (align_corners=False): one axis of F.interpolate's "bilinear", which is that along each axis in turn."""
    identity = torch.eye(n_in, dtype=torch.float64)[:, None]  # (n_in, 1, n_in): each input sample alone
    return F.interpolate(identity, size=n_out, mode="linear", align_corners=False)[:, 0].T


def pixel_classes(scores: torch.Tensor, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scores (C, h, w) up-sampled bilinearly (align_corners=False) to the size of `segments` (H, W) and the
    argmax per pixel: (MaskCLIP's class per pixel (H, W) int64, votes (K, C) int64: each segment's pixels per
    class, score sums (K, C) float64: each segment's up-sampled scores summed), K = segments.max() + 1. A few
    rows at a time (Wy[rows] @ scores @ Wx^T): 459 classes at 2048x2048 would be 7.7 GB at once."""
    C, h, w = scores.shape
    H, W = segments.shape
    K = int(segments.max()) + 1
    wy, wx = (linear_weights(n, m).to(scores) for n, m in ((h, H), (w, W)))
    classes = np.empty((H, W), dtype=np.int64)
    votes, sums = torch.zeros(K * C, dtype=torch.int64), torch.zeros(K, C, dtype=torch.float64)
    rows = max(1, BLOCK_ELEMENTS // (C * W))
    for top in range(0, H, rows):
        up = wy[top:top + rows] @ scores @ wx.T  # (C, r, W)
        best = up.argmax(0).cpu()  # (r, W)
        segment = torch.from_numpy(segments[top:top + rows].astype(np.int64))  # (r, W)
        classes[top:top + rows] = best.numpy()
        votes += torch.bincount((segment * C + best).flatten(), minlength=K * C)
        sums.index_add_(0, segment.flatten(), up.flatten(1).T.double().cpu())
    return classes, votes.reshape(K, C).numpy(), sums.numpy()


def voted_classes(votes: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Mask voting: each segment's class (K,), the one most of its pixels got; among classes with as many votes,
    the one of the highest summed score. -1 for a segment without pixels."""
    most = votes == votes.max(1, keepdims=True)
    voted = np.where(most, sums, -np.inf).argmax(1)
    return np.where(votes.sum(1) > 0, voted, -1)


@dataclass
class Naming:
    classes: tuple[str, ...]  # the vocabulary: a class id is its index
    segment_classes: np.ndarray  # (K,) each segment's class id, -1 for a segment without pixels
    votes: np.ndarray  # (K, C) each segment's pixels per MaskCLIP class
    maskclip_labels: np.ndarray  # (H, W) uint16: MaskCLIP's class per pixel, at the labels' size

    def labels(self, segments: np.ndarray) -> np.ndarray:
        """The voted classes per pixel (H, W), from the segment labels they were voted on."""
        return self.segment_classes[segments]

    def record(self, vocabulary: str | None, settings: dict) -> dict:
        """classes.json: the vocabulary, each segment's class, area and votes (pixels per class, those > 0)."""
        segments = [{"segment": s, "class": self.classes[c], "class_id": int(c), "area": int(self.votes[s].sum()),
                     "votes": {self.classes[k]: int(self.votes[s, k]) for k in np.flatnonzero(self.votes[s])}}
                    for s, c in enumerate(self.segment_classes) if c >= 0]
        return {"vocabulary": vocabulary, "classes": list(self.classes), "segments": segments,
                "maskclip": {"templates": len(TEMPLATES)} | settings}

    def files(self, image: Image.Image, segments: np.ndarray, vocabulary: str | None, settings: dict) -> dict:
        """An image folder's files of the naming, each name -> a function writing it to a given path: classes.json
        (record), maskclip.png (MaskCLIP's classes, 16-bit) and named.png (page.named_picture) of `image`."""
        record = json.dumps(self.record(vocabulary, settings), indent=1, ensure_ascii=False)
        pictures = {MASKCLIP_FILE: Image.fromarray(self.maskclip_labels),  # uint16: mode "I;16"
                    page.NAMED: page.named_picture(image, self.labels(segments), self.classes)}
        return ({CLASSES_FILE: lambda path: path.write_text(record, encoding="utf-8")} |
                {name: lambda path, p=p: p.save(path, format="PNG") for name, p in pictures.items()})


def name_segments(image, labels: np.ndarray, clip, classes, *, size="auto", text: torch.Tensor | None = None,
                  key_smoothing: float | None = None, prompt_denoising: float | None = None) -> Naming:
    """Names for the segments of `labels` (H, W), emerdiff.segment's labels of `image` (anything segment takes):
    MaskCLIP's classes per pixel, on the image at its working size `size` (the one segment used), up-sampled to
    the labels' size, and each segment's vote. `clip`: weights.load_clip's model; `text`: text_embeddings(clip,
    classes), made here where not given (give it when naming many images: it is the same for all)."""
    pixels, (width, height) = load_image(image, size)
    if labels.shape != (height, width):
        raise EmerDiffError(f"labels of shape {labels.shape} for an image of {width}x{height}: give that image's "
                            "labels (segment's Segmentation.labels)")
    parameter = next(clip.parameters())
    text = text_embeddings(clip, classes) if text is None else text
    scores = maskclip_scores(clip, pixels.to(parameter), text, key_smoothing=key_smoothing,
                             prompt_denoising=prompt_denoising)
    maskclip, votes, sums = pixel_classes(scores, labels)
    return Naming(tuple(classes), voted_classes(votes, sums), votes, maskclip.astype(np.uint16))


# ---- A run's naming (the command line's --classes) ----

RANDOM_CLIP = "random: the tiny CLIP of weights.random_clip, seed 0"


@dataclass
class Namer:
    """The naming of every image of a run: its classes, MaskCLIP's settings, and once loaded (load) CLIP and the class
    names' embeddings, made once for the run."""
    classes: tuple[str, ...]
    vocabulary: str | None  # the preset the classes are, if they are one
    settings: dict  # MaskCLIP's refinements (None: off) and the CLIP weights' source, as run.json records them
    clip: torch.nn.Module | None = None
    text: torch.Tensor | None = None

    @classmethod
    def checked(cls, given: str, clip_source: str, key_smoothing: float | None, prompt_denoising: float | None):
        """The naming --classes asks for, every option checked (before any weights load)."""
        for option, value, maskclips in (("--key-smoothing", key_smoothing, KEY_SMOOTHING),
                                         ("--prompt-denoising", prompt_denoising, PROMPT_DENOISING)):
            if value is not None and not 0 < value <= 1:
                raise EmerDiffError(f"{option} {value}: a probability threshold in (0, 1] (MaskCLIP's: {maskclips})")
        classes, vocabulary = class_names(given)
        return cls(classes, vocabulary, {"key_smoothing": key_smoothing, "prompt_denoising": prompt_denoising,
                                         "clip": clip_source})

    def load(self, clip: torch.nn.Module):
        """Take CLIP, and embed the class names with it (text_embeddings), once."""
        self.clip, self.text = clip, text_embeddings(clip, self.classes)

    def files(self, image: Image.Image, labels: np.ndarray, size) -> tuple[dict, list]:
        """The naming files of an image folder (Naming.files) and each segment's class name (None: no pixel)."""
        refinements = {k: self.settings[k] for k in ("key_smoothing", "prompt_denoising")}
        naming = name_segments(image, labels, self.clip, self.classes, size=size, text=self.text, **refinements)
        names = [self.classes[c] if c >= 0 else None for c in naming.segment_classes]
        return naming.files(image, labels, self.vocabulary, refinements), names
