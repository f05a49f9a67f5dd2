"""The page of a run: <out>/index.html beside the outputs, where a run is looked at.

One HTML file, its CSS and JavaScript inline, that opens from disk (file://) in any current browser,
offline: no network request, no framework, relative links to the pictures the run wrote. It shows

- the gallery: one tile per complete image folder, the run's and those earlier runs made (its overlay,
  loaded lazily; name, segments, seconds; with --classes the classes its segments took; the options it was made with where they differ from the run's;
  its scores once evaluate.py has scored the folder), sortable by name, score (worst first) or seconds;
  the failed images with their reasons; the run's options and totals (how many images this run made, how
  many were made before); the dataset's scores per protocol and class;
- one image: input, overlay, labels, the low-resolution masks (and the ground truth once scored; named.png with
  --classes) side by side, a legend of segment colours and areas (with --classes each segment's class name; once
  scored, the class each segment was matched to). Hovering a
  segment, in any view or the legend, highlights it in every view and shows its difference map
  (with --save-diffmaps); a click pins it; the arrow keys go to the next image, Escape back.

The page's text lives beside this file, each in its own language: page.html, which names page.css and
page.js (a <link> and a <script src>) and holds an empty run-data script. write_page reads the three and
writes index.html with the CSS, the JavaScript and the run's data (JSON) inline.

A page from file:// cannot read an <img>'s pixels (the canvas would be tainted), so each image folder
holds a small view.js with its label maps run-length encoded, loaded by a <script> tag only when that
image is opened: the gallery of a 5,000-image run stays one file of its tiles' data.

The pictures of an image folder are made here too, in the segments' colours (COLOURS): labels.png,
overlay.png, lowres.png and, with --save-diffmaps, diffmaps.png and diffmaps/, with its view.js
(picture_files). The runner (runner.py) writes them with each image folder, and rewrites the page after
each image and at the end; evaluate.py writes gt.png per image and summary.scores.json, then
rewrites the page. Every file is written whole (files.atomic_save). Only the standard library, numpy and
Pillow are used: evaluate.py imports this without torch.
"""
import colorsys
import json
import math
import os
import re
import time
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from files import (MAX_RECORD, MAX_SEGMENTS, PREDICTION_FILE, RUN_RECORD, SUMMARY, FileError, atomic_save,
                   listed_folder, read_text, shown)

PAGE = "index.html"
OVERLAY = "overlay.png"  # per image folder: the image half-tinted by segment colour, borders white
LOW_RES = "lowres.png"  # per image folder: the low-resolution masks in segment colours, at the image's size
VIEW_SCRIPT = "view.js"  # per image folder: its label maps for the page
DIFFMAP_GRID = "diffmaps.png"  # per image folder, with --save-diffmaps: every difference map, captioned
DIFFMAPS = "diffmaps"  # per image folder, with --save-diffmaps: one greyscale PNG per mask
NAMED = "named.png"  # per image folder, with --classes: the image tinted by class, with a legend of names
GROUND_TRUTH = "gt.png"  # per image folder, written by evaluate.py: the ground truth in class colours
SCORES = "summary.scores.json"  # in the folder evaluate.py scored: what the page shows of it
PICTURES = (PREDICTION_FILE, OVERLAY, LOW_RES, VIEW_SCRIPT)  # what the page shows of a folder
BROWSER_IMAGES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}  # inputs a browser shows (not TIFF)
VIEW_SIDE = 512  # the label maps of view.js are cut to this many pixels a side at most (nearest)
DIFFMAP_SIDE = 256  # likewise the difference maps (area), alone and in diffmaps.png
LEGEND_ROW = 20  # px a class takes in named.png's legend
CAPTION = 16  # px above each difference map of diffmaps.png: a swatch of the segment's colour and its index
IGNORED_COLOUR = (0, 0, 0)  # ground-truth pixels that count nowhere
TEMPLATE = Path(__file__).with_name("page.html")  # the page, which names the two below: inlined when written
STYLE = Path(__file__).with_name("page.css")
SCRIPT = Path(__file__).with_name("page.js")
RUN_DATA = '<script type="application/json" id="run-data">{}</script>'  # page.html's is empty: the run's JSON goes in


# ---- Per image folder: the pictures, and the files the page reads ----

def golden_ratio_palette(k: int, start: float = 0.0, saturation: float = 0.75, value: float = 0.95) -> np.ndarray:
    """k well-separated colours (k, 3) uint8: hues stepped by the golden ratio from `start`."""
    hues = (start + np.arange(k) * 0.618033988749895) % 1
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, saturation, value)] for h in hues], dtype=np.uint8)


# Segment i is drawn in COLOURS[i] in every picture; a colour per mask, of at most inputs.MAX_MASKS (which is
# MAX_SEGMENTS, what labels.png holds; inputs.py itself imports torch).
COLOURS = golden_ratio_palette(MAX_SEGMENTS)


def picture_files(labels: np.ndarray, low_res_labels: np.ndarray, difference_maps: np.ndarray, image: Image.Image,
                  diffmaps: bool) -> dict:
    """An image folder's pictures, each name -> a function writing it to a given path: labels.png (`labels`,
    (H, W) uint8, COLOURS its palette), overlay.png (on `image`), lowres.png (`low_res_labels`, (h, w), at
    the image's size), view.js and, with `diffmaps`, diffmaps.png and diffmaps/ (`difference_maps`, (K, H',
    W') floats, one per mask: view.js takes its K colours from them)."""
    labels_png = Image.fromarray(labels, mode="P")
    labels_png.putpalette(COLOURS.flatten().tolist())
    pictures = {PREDICTION_FILE: labels_png, OVERLAY: overlay(image, labels),
                LOW_RES: Image.fromarray(COLOURS[low_res_labels]).resize(image.size, Image.NEAREST)}
    greys = []  # each difference map's picture, made once for the grid and for diffmaps/
    if diffmaps:
        greys = diffmap_pictures(difference_maps)
        pictures[DIFFMAP_GRID] = diffmap_grid(greys)
    files = {name: lambda path, picture=picture: picture.save(path, format="PNG") for name, picture in pictures.items()}
    view = view_script(labels, low_res_labels, COLOURS[:len(difference_maps)])
    files[VIEW_SCRIPT] = lambda path: path.write_text(view)
    return files | diffmap_files(greys)


def overlay(image: Image.Image, labels: np.ndarray, colours: np.ndarray = COLOURS) -> Image.Image:
    """The image half-tinted by label colour (segments': COLOURS), with the borders between labels drawn in white."""
    blend = (0.5 * np.asarray(image, dtype=np.float32) + 0.5 * colours[labels]).astype(np.uint8)
    border = np.zeros(labels.shape, dtype=bool)
    border[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    border[:-1, :] |= labels[:-1, :] != labels[1:, :]
    blend[border] = 255
    return Image.fromarray(blend)


def named_picture(image: Image.Image, classes: np.ndarray, names: tuple[str, ...]) -> Image.Image:
    """named.png: the image tinted by class (`classes` (H, W), ids into `names`; the classes' colours, as gt.png
    draws a dataset's), beside a legend of the classes present, largest first: a swatch and the name each."""
    colours = class_colours(len(names))
    ids, areas = np.unique(classes, return_counts=True)
    shown_ids = ids[np.argsort(-areas, kind="stable")]
    font = ImageFont.load_default(size=LEGEND_ROW - 6)
    width = max(round(font.getlength(names[c])) for c in shown_ids) + LEGEND_ROW + 12
    picture = Image.new("RGB", (image.width + width, max(image.height, LEGEND_ROW * len(shown_ids) + 8)), "white")
    picture.paste(overlay(image, classes, colours))
    draw = ImageDraw.Draw(picture)
    for row, c in enumerate(shown_ids):
        left, top = image.width + 6, 4 + row * LEGEND_ROW
        draw.rectangle((left, top + 2, left + LEGEND_ROW - 6, top + LEGEND_ROW - 4), fill=tuple(colours[c].tolist()))
        draw.text((left + LEGEND_ROW, top + 1), names[c], fill="black", font=font)
    return picture


def diffmap_pictures(maps: np.ndarray) -> list[Image.Image]:
    """(K, H, W) difference maps as greyscale pictures, each scaled down to at most DIFFMAP_SIDE a side
    (area) and to its own maximum (white: most change)."""
    pictures = []
    for m in np.asarray(maps, dtype=np.float32):
        picture = Image.fromarray(m, mode="F")
        scale = min(1.0, DIFFMAP_SIDE / max(picture.size))
        if scale < 1:
            picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                     Image.BOX)
        m = np.asarray(picture)
        grey = (255 * m / max(float(m.max()), 1e-12)).clip(0, 255).astype(np.uint8)
        pictures.append(Image.fromarray(grey, mode="L"))
    return pictures


def diffmap_grid(pictures: list[Image.Image]) -> Image.Image:
    """diffmaps.png: the K difference maps' pictures (diffmap_pictures) in a grid, each captioned with its
    segment index beside a swatch of that segment's colour in labels.png and overlay.png."""
    columns = math.ceil(math.sqrt(len(pictures)))
    cell_h, cell_w = pictures[0].height + CAPTION + 2, pictures[0].width + 2
    grid = Image.new("RGB", (columns * cell_w, math.ceil(len(pictures) / columns) * cell_h))
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for i, picture in enumerate(pictures):
        top, left = i // columns * cell_h, i % columns * cell_w
        grid.paste(picture, (left, top + CAPTION))
        draw.rectangle((left + 2, top + 3, left + 12, top + 13), fill=tuple(COLOURS[i].tolist()))
        draw.text((left + 16, top + 2), str(i), fill="white", font=font)
    return grid


def diffmap_name(i: int) -> str:
    """The file of mask i's difference map, relative to its image folder."""
    return f"{DIFFMAPS}/{i:03d}.png"


def is_diffmap_name(name: str) -> bool:
    """Whether `name`, a path relative to an image folder, is of diffmap_name's form."""
    return re.fullmatch(rf"{DIFFMAPS}/[0-9]{{3}}\.png", name) is not None


def diffmap_files(pictures: list[Image.Image]) -> dict:
    """The difference maps' pictures (diffmap_pictures) -> {name: writer of a path}: diffmaps/, each map alone."""
    return {diffmap_name(i): lambda path, grey=grey: saved_png(grey, path) for i, grey in enumerate(pictures)}


def saved_png(picture: Image.Image, path: Path):
    """Save a PNG, its folder made first (a difference map goes into diffmaps/)."""
    path.parent.mkdir(exist_ok=True)
    picture.save(path, format="PNG")


def run_length_encoded(ids: np.ndarray) -> list[int]:
    """A label map run-length encoded, row after row: [value, length, value, length, ...]."""
    flat = np.asarray(ids).ravel()
    if not flat.size:
        return []
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    lengths = np.diff(np.r_[starts, flat.size])
    return np.stack([flat[starts], lengths], 1).ravel().tolist()


def cut(ids: np.ndarray, side: int) -> np.ndarray:
    """A label map at most `side` pixels a side, by nearest neighbour (half-pixel centres)."""
    height, width = ids.shape
    scale = min(1.0, side / max(height, width))
    if scale == 1:
        return ids
    rows = ((np.arange(max(1, round(height * scale))) + 0.5) * height / max(1, round(height * scale))).astype(int)
    cols = ((np.arange(max(1, round(width * scale))) + 0.5) * width / max(1, round(width * scale))).astype(int)
    return ids[rows[:, None], cols[None, :]]


def view_script(labels: np.ndarray, low_res_labels: np.ndarray, colours: np.ndarray) -> str:
    """view.js of an image folder: its label map (cut to VIEW_SIDE) and low-resolution masks run-length
    encoded, each segment's colour (one per mask) and share of the pixels, as one call of the page's
    emerdiffView."""
    shown_labels = cut(labels, VIEW_SIDE)
    areas = np.bincount(labels.ravel(), minlength=len(colours)) / max(labels.size, 1)
    data = {"w": shown_labels.shape[1], "h": shown_labels.shape[0], "labels": run_length_encoded(shown_labels),
            "lw": low_res_labels.shape[1], "lh": low_res_labels.shape[0], "low": run_length_encoded(low_res_labels),
            "areas": [round(float(a), 5) for a in areas], "colours": [hex_colour(c) for c in colours]}
    return f"emerdiffView({script_json(data)});\n"


def hex_colour(rgb) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


def script_json(data) -> str:
    """JSON that is safe inside <script> and a .js file: ASCII only, and no <, > or & (so no </script>)."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ---- Ground truth and scores (evaluate.py) ----

def class_colours(n: int, own=None) -> np.ndarray:
    """(n, 3) uint8 colours of a dataset's n classes: its `own` where it has them (Cityscapes), else a
    fixed palette, hues stepped by the golden ratio from another start than the segments', paler."""
    if own is not None:
        return np.array(own, dtype=np.uint8)
    return golden_ratio_palette(n, start=0.08, saturation=0.55, value=0.85)


def save_ground_truth(folder: Path, gt: np.ndarray, colours: np.ndarray, ignore: int):
    """gt.png in an image folder: the class ids (H, W) in the classes' `colours`, pixels that count nowhere
    (`ignore`: 255, or 65535 in 16-bit class ids) black."""
    table = np.zeros((max(len(colours), ignore + 1), 3), dtype=np.uint8)
    table[:len(colours)] = colours
    table[ignore] = IGNORED_COLOUR
    picture = Image.fromarray(table[gt])
    atomic_save(folder / GROUND_TRUTH, lambda tmp: picture.save(tmp, format="PNG"))


def write_scores(folder: Path, result: dict, images: dict, colours: np.ndarray):
    """summary.scores.json: evaluate.py's result (nan as None) (per protocol, per class) and, per image folder name,
    its scores, the class matched to each segment, the classes present and when its labels.png was
    written (the page shows an image's scores only while its labels.png is that one)."""
    keep = ("dataset", "images", "missing", "resolution", "protocols", "class_names")
    data = {k: result[k] for k in keep} | {p: result[p] for p in result["protocols"]}
    data |= {"class_colours": [hex_colour(c) for c in colours],
             "evaluated": time.strftime("%Y-%m-%d %H:%M:%S"), "per_image": images}
    text = json.dumps(data, indent=1, allow_nan=False)
    atomic_save(folder / SCORES, lambda tmp: tmp.write_text(text + "\n"))


def labels_written(folder: Path) -> int | None:
    """When an image folder's labels.png was written (ns), None where it has none."""
    try:
        return (folder / PREDICTION_FILE).stat().st_mtime_ns
    except OSError:
        return None


# ---- The page ----

_records: dict = {}  # run.json path -> (mtime, size, entry, options): a page rewritten after each image reads each once


def image_entry(out: Path, name: str, options: dict | None = None) -> dict | None:
    """A tile's data from an image folder's run.json (what the runner wrote), None where the folder has
    neither run.json nor labels.png (not done). A folder without run.json (predictions made elsewhere)
    shows its name and the pictures it has. Where the options its run.json records differ from `options`
    (the page's run's, as JSON holds them: run_options), the tile says which, with their values ("differs")."""
    folder = out / name
    path = folder / RUN_RECORD
    try:
        stat = path.stat()
    except OSError:
        if not (folder / PREDICTION_FILE).is_file():
            return None
        return named(name) | {"files": [f for f in PICTURES if (folder / f).is_file()]}
    cached = _records.get(path)
    if not (cached and cached[:2] == (stat.st_mtime_ns, stat.st_size)):
        cached = _records[path] = (stat.st_mtime_ns, stat.st_size, *recorded(out, name, path))
    entry, made_with = cached[2:]
    differs = {key: value for key, value in made_with.items() if options.get(key) != value} if options else {}
    return entry | {"differs": differs} if differs else entry


def recorded(out: Path, name: str, path: Path) -> tuple[dict, dict]:
    """The tile's data of image folder `name` from its run.json at `path`, and the options the run.json
    records ({} where it cannot be read: the tile then shows the name alone)."""
    try:
        saved = json.loads(read_text(path, MAX_RECORD))
        record, result = saved["run"], saved["result"]
        image, options = Path(record["image"]["path"]), dict(record["options"])
        entry = named(name) | {"segments": result["segments"], "masks": options["masks"],
                               "seconds": round(sum(result["seconds"].values()), 3), "files": result["files"]}
        if isinstance(result.get("names"), list):  # with --classes: each segment's class name (None: no pixel)
            entry["names"] = result["names"]
        if image.suffix.lower() in BROWSER_IMAGES and image.is_file():
            entry["input"] = relative_link(image, out)
        return entry, options
    except (FileError, OSError, ValueError, KeyError, TypeError, RecursionError):
        return named(name) | {"files": []}, {}


def shown_name(name: str) -> str:
    """A file name as the page shows it: as the file system holds it, its bytes that are no UTF-8 written
    \\xNN (Python holds them as lone surrogates, which a browser cannot show)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def named(name: str) -> dict:
    """A tile's name as shown (shown_name) and the link to its folder: the bytes of its name percent-encoded,
    which the browser finds on disk whatever they are (the page's script never encodes a name itself:
    JavaScript's encodeURIComponent throws on a name that is no UTF-8)."""
    return {"name": shown_name(name), "href": urllib.parse.quote(os.fsencode(name), safe="")}


def relative_link(path: Path, base: Path) -> str:
    """A URL of `path` relative to the page's folder, its bytes percent-encoded (a name that is no UTF-8
    included); a file: URL where no relative path exists."""
    try:
        relative = Path(os.path.relpath(path, base.resolve()))
    except ValueError:  # another drive on Windows
        return path.as_uri()
    return urllib.parse.quote(os.fsencode(relative.as_posix()))


def read_json(path: Path):
    """A JSON file's content, None where it is missing or unreadable (files.read_text: a regular file of
    at most MAX_RECORD bytes)."""
    try:
        return json.loads(read_text(path, MAX_RECORD))
    except Exception:  # noqa: BLE001 (any unreadable file is simply not shown)
        return None


def image_folders(out: Path) -> list[str]:
    """The names of the image folders of `out` that runs completed, whichever made them: those holding
    run.json, which a run writes last (hidden folders, a run's temporaries among them, left out)."""
    return [p.name for p in listed_folder(out) if not p.name.startswith(".") and (p / RUN_RECORD).is_file()]


def run_options(summary) -> dict | None:
    """The options of the run a summary (summary.json's) tells of, as JSON holds them, which is how run.json
    records them; None where it tells none."""
    options = summary.get("options") if isinstance(summary, dict) else None
    return json.loads(json.dumps(options)) if isinstance(options, dict) else None


def page_data(out: Path, names: list[str], summary: dict | None, running: bool) -> dict:
    """What the page shows: every image folder of `out` that is done, the run's `names` first (in order),
    then those earlier runs made (image_folders; their count is "earlier"), each saying the options it was
    made with where they differ from the run's (its summary's); the run's summary; the scores."""
    ours, options = set(names), run_options(summary)
    every = [*names, *(name for name in image_folders(out) if name not in ours)]
    done = [(name, entry) for name in every if (entry := image_entry(out, name, options)) is not None]
    entries = [entry for _, entry in done]
    scores = read_json(out / SCORES)
    if scores:
        per_image = scores.pop("per_image", {})
        changed = 0
        for i, (name, entry) in enumerate(done):
            scored = per_image.get(name)
            if scored and scored.get("labels_written") == labels_written(out / name):
                entries[i] = entry | {"score": scored}
            elif scored:
                changed += 1
        scores["changed"] = changed
    return {"title": shown_name(out.resolve().name), "images": len(names), "entries": entries,
            "earlier": sum(name not in ours for name, _ in done), "summary": summary, "running": running,
            "scores": scores}


def write_page(out: Path, names: list[str], summary: dict | None = None, running: bool = False):
    """(Re)write <out>/index.html whole: the images of `names` (the run's) that are done and every other
    complete image folder of `out` (page_data), and the run's `summary` (runner.py's summary.json as a dict;
    None: the one in `out`, if any)."""
    summary = summary if summary is not None else read_json(out / SUMMARY)
    text = page_text(script_json(page_data(out, names, summary, running)))
    atomic_save(out / PAGE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def page_text(data: str) -> str:
    """index.html's text: page.html with page.css and page.js inline, in a <style> and a <script>, and `data`
    (the run's JSON) in its run-data script. One pass over page.html, so that nothing inserted is searched
    for a tag; page.html without each tag exactly once is an error."""
    fills = {f'<link rel="stylesheet" href="{STYLE.name}">': f"<style>{STYLE.read_text(encoding='utf-8')}</style>",
             f'<script src="{SCRIPT.name}"></script>': f"<script>{SCRIPT.read_text(encoding='utf-8')}</script>",
             RUN_DATA.format(""): RUN_DATA.format(data)}
    html = TEMPLATE.read_text(encoding="utf-8")
    for tag in fills:
        if html.count(tag) != 1:
            raise ValueError(f"{TEMPLATE}: {tag} must be there once, not {html.count(tag)} times")
    return re.sub("|".join(map(re.escape, fills)), lambda match: fills[match[0]], html)


def refresh_page(out: Path, names: list[str], summary: dict | None, say, running: bool = False) -> bool:
    """write_page; a page that cannot be written (something other than a file in its place included:
    files.atomic_save) is said through `say` (one line), not raised."""
    try:
        write_page(out, names, summary, running)
        return True
    except FileError as e:
        say(f"cannot write {e}")
    except OSError as e:
        say(f"cannot write {shown(out / PAGE)}: {e.strerror or e}")
    except ValueError as e:  # a value JSON cannot hold (nan), or a page.html without its tags
        say(f"cannot write {shown(out / PAGE)}: {e}")
    return False


class RunPage:
    """The page of one run, rewritten when asked (runner.py: after each image and at the end); a page that
    cannot be written is said once, through `say`, and not tried again in this run."""

    def __init__(self, out: Path, names: list[str], say):
        self.out, self.names, self.say, self.failed = out, names, say, False

    def write(self, summary: dict, running: bool = False):
        if not self.failed:
            self.failed = not refresh_page(self.out, self.names, summary, self.say, running)

