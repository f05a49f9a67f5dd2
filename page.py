"""The page of a run: <out>/index.html beside the outputs, where a run is looked at.

One HTML file, its CSS and JavaScript inline, that opens from disk (file://) in any current browser,
offline: no network request, no framework, relative links to the pictures the run wrote. It shows

- the gallery: one tile per image (its overlay, loaded lazily; name, segments, seconds; its scores once
  evaluate.py has scored the folder), sortable by name, score (worst first) or seconds; the failed
  images with their reasons; the run's options and totals; the dataset's scores per protocol and class;
- one image: input, overlay, labels, the low-resolution masks (and the ground truth once scored) side by
  side, a legend of segment colours and areas (and the class each segment was matched to). Hovering a
  segment, in any view or the legend, highlights it in every view and shows its difference map
  (with --save-diffmaps); a click pins it; the arrow keys go to the next image, Escape back.

A page from file:// cannot read an <img>'s pixels (the canvas would be tainted), so each image folder
holds a small view.js with its label maps run-length encoded, loaded by a <script> tag only when that
image is opened: the gallery of a 5,000-image run stays one file of its tiles' data.

The runner (runner.py) writes view.js and the difference maps with each image folder, and rewrites the
page after each image and at the end; evaluate.py writes gt.png per image and summary.scores.json, then
rewrites the page. Every file is written whole (files.atomic_save). Only the standard library, numpy and
Pillow are used: evaluate.py imports this without torch.
"""
import colorsys
import json
import os
import time
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image

from files import PREDICTION_FILE, RUN_RECORD, SUMMARY, atomic_save, checked_file, shown

PAGE = "index.html"
VIEW_SCRIPT = "view.js"  # per image folder: its label maps for the page
DIFFMAPS = "diffmaps"  # per image folder, with --save-diffmaps: one greyscale PNG per mask
GROUND_TRUTH = "gt.png"  # per image folder, written by evaluate.py: the ground truth in class colours
SCORES = "summary.scores.json"  # in the folder evaluate.py scored: what the page shows of it
PICTURES = (PREDICTION_FILE, "overlay.png", "lowres.png", VIEW_SCRIPT)  # what the page shows of a folder
BROWSER_IMAGES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}  # inputs a browser shows (not TIFF)
VIEW_SIDE = 512  # the label maps of view.js are cut to this many pixels a side at most (nearest)
DIFFMAP_SIDE = 256  # likewise the difference maps (area)
IGNORED_COLOUR = (0, 0, 0)  # ground-truth pixels that count nowhere


# ---- Per image folder: the files the page reads ----

def diffmap_name(i: int) -> str:
    """The file of mask i's difference map, relative to its image folder."""
    return f"{DIFFMAPS}/{i:03d}.png"


def diffmap_files(maps: np.ndarray) -> dict:
    """(K, H, W) difference maps -> {name: writer of a path}: each map scaled down to DIFFMAP_SIDE (area)
    and to its own maximum (white: most change), a greyscale PNG."""
    files = {}
    for i, m in enumerate(np.asarray(maps, dtype=np.float32)):
        picture = Image.fromarray(m, mode="F")
        scale = min(1.0, DIFFMAP_SIDE / max(picture.size))
        if scale < 1:
            picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                     Image.BOX)
        m = np.asarray(picture)
        grey = Image.fromarray((255 * m / max(float(m.max()), 1e-12)).clip(0, 255).astype(np.uint8), mode="L")
        files[diffmap_name(i)] = lambda path, grey=grey: saved_png(grey, path)
    return files


def saved_png(picture: Image.Image, path: Path):
    """Save a PNG, its folder made first (a difference map goes into diffmaps/)."""
    path.parent.mkdir(exist_ok=True)
    picture.save(path, format="PNG")


def runs(ids: np.ndarray) -> list[int]:
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
    data = {"w": shown_labels.shape[1], "h": shown_labels.shape[0], "labels": runs(shown_labels),
            "lw": low_res_labels.shape[1], "lh": low_res_labels.shape[0], "low": runs(low_res_labels),
            "areas": [round(float(a), 5) for a in areas], "colours": [hex_colour(c) for c in colours]}
    return f"emerdiffView({script_json(data)});\n"


def hex_colour(rgb) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


def script_json(data) -> str:
    """JSON that is safe inside <script> and a .js file: ASCII only, and no <, > or & (so no </script>)."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ---- Ground truth and scores (evaluate.py) ----

def golden_ratio_palette(k: int, start: float = 0.0, saturation: float = 0.75, value: float = 0.95) -> np.ndarray:
    """k well-separated colours (k, 3) uint8: hues stepped by the golden ratio from `start`."""
    hues = (start + np.arange(k) * 0.618033988749895) % 1
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, saturation, value)] for h in hues], dtype=np.uint8)


def class_colours(n: int, own=None) -> np.ndarray:
    """(n, 3) uint8 colours of a dataset's n classes: its `own` where it has them (Cityscapes), else a
    fixed palette, hues stepped by the golden ratio from another start than the segments', paler."""
    if own is not None:
        return np.array(own, dtype=np.uint8)
    return golden_ratio_palette(n, start=0.08, saturation=0.55, value=0.85)


def save_ground_truth(folder: Path, gt: np.ndarray, colours: np.ndarray, ignore: int):
    """gt.png in an image folder: the class ids (H, W) in the classes' `colours`, pixels that count nowhere
    black."""
    table = np.zeros((256, 3), dtype=np.uint8)
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

_records: dict = {}  # run.json path -> (mtime, size, entry): a page rewritten after each image reads each once


def image_entry(out: Path, name: str) -> dict | None:
    """A tile's data from an image folder's run.json (what the runner wrote), None where the folder has
    neither run.json nor labels.png (not done). A folder without run.json (predictions made elsewhere)
    shows its name and the pictures it has."""
    folder = out / name
    path = folder / RUN_RECORD
    try:
        stat = path.stat()
    except OSError:
        if not (folder / PREDICTION_FILE).is_file():
            return None
        return {"name": name, "files": [f for f in PICTURES if (folder / f).is_file()]}
    cached = _records.get(path)
    if cached and cached[:2] == (stat.st_mtime_ns, stat.st_size):
        return cached[2]
    try:
        saved = json.loads(checked_file(path).read_text())
        record, result = saved["run"], saved["result"]
        image = Path(record["image"]["path"])
        entry = {"name": name, "segments": result["segments"], "masks": record["options"]["masks"],
                 "seconds": round(sum(result["seconds"].values()), 3), "files": result["files"]}
        if image.suffix.lower() in BROWSER_IMAGES and image.is_file():
            entry["input"] = relative_link(image, out)
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        entry = {"name": name, "files": []}
    _records[path] = (stat.st_mtime_ns, stat.st_size, entry)
    return entry


def relative_link(path: Path, base: Path) -> str:
    """A URL of `path` relative to the page's folder (a file: URL where no relative path exists)."""
    try:
        relative = Path(os.path.relpath(path, base.resolve()))
    except ValueError:  # another drive on Windows
        return path.as_uri()
    return urllib.parse.quote(relative.as_posix())


def read_json(path: Path):
    """A JSON file's content, None where it is missing or unreadable."""
    try:
        return json.loads(checked_file(path).read_text())
    except Exception:  # noqa: BLE001 (any unreadable file is simply not shown)
        return None


def page_data(out: Path, names: list[str], summary: dict | None, running: bool) -> dict:
    """What the page shows: the images done of `names` (in order), the run's summary, the scores."""
    entries = [entry for entry in (image_entry(out, name) for name in names) if entry is not None]
    scores = read_json(out / SCORES)
    if scores:
        per_image = scores.pop("per_image", {})
        changed = 0
        for i, entry in enumerate(entries):
            scored = per_image.get(entry["name"])
            if scored and scored.get("labels_written") == labels_written(out / entry["name"]):
                entries[i] = entry | {"score": scored}
            elif scored:
                changed += 1
        scores["changed"] = changed
    return {"title": out.resolve().name, "images": len(names), "entries": entries, "summary": summary,
            "running": running, "scores": scores}


def write_page(out: Path, names: list[str], summary: dict | None = None, running: bool = False):
    """(Re)write <out>/index.html whole: the images of `names` that are done, and the run's `summary`
    (runner.py's summary.json as a dict; None: the one in `out`, if any)."""
    summary = summary if summary is not None else read_json(out / SUMMARY)
    text = PAGE_HTML.replace("/*DATA*/", script_json(page_data(out, names, summary, running)))
    atomic_save(out / PAGE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def refresh_page(out: Path, names: list[str], summary: dict | None, say, running: bool = False) -> bool:
    """write_page; a page that cannot be written is said through `say` (one line), not raised."""
    try:
        write_page(out, names, summary, running)
        return True
    except OSError as e:
        say(f"cannot write {shown(out / PAGE)}: {e.strerror or e}")
    except ValueError as e:  # a value JSON cannot hold (nan): the run's outputs stand without their page
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


PAGE_CSS = """
:root { color-scheme: light dark; --line: #8884; --dim: #888; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.2em 2em; }
h1 { font-size: 1.4em; margin: .6em 0 .2em; } h2 { font-size: 1.1em; margin: 1em 0 .3em; }
table { border-collapse: collapse; } td, th { padding: 1px 8px; border-bottom: 1px solid var(--line); text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: var(--dim); } .warn { color: #c60; }
#controls { position: sticky; top: 0; padding: .4em 0; background: Canvas; z-index: 1; }
#gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 10px; }
.tile { display: block; color: inherit; text-decoration: none; border: 1px solid var(--line); border-radius: 6px;
  padding: 4px; content-visibility: auto; contain-intrinsic-size: 170px 240px; }
.tile:hover, .tile:focus { outline: 2px solid #48f; }
.tile img, .tile .blank { display: block; width: 100%; aspect-ratio: 1; object-fit: contain; background: #8882; }
.tile .name { font-weight: 600; overflow-wrap: anywhere; } .tile .meta, .tile .score { font-size: 12px; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: -1px; margin-right: 4px; }
#viewer { position: fixed; inset: 0; background: Canvas; overflow: auto; padding: 0 1.2em 1em; z-index: 2; }
#viewer .bar { display: flex; gap: .6em; align-items: center; padding: .5em 0; position: sticky; top: 0; background: Canvas; }
#viewer .bar b { font-size: 1.15em; overflow-wrap: anywhere; } #viewer .bar .grow { flex: 1; }
#views { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 10px; }
#views figure, #side figure { margin: 0; }
.frame { position: relative; cursor: crosshair; }
.frame img { display: block; width: 100%; height: auto; aspect-ratio: var(--ar, auto); object-fit: cover; }
.frame canvas { position: absolute; inset: 0; width: 100%; height: 100%; pointer-events: none; image-rendering: pixelated; }
#side { display: grid; grid-template-columns: minmax(220px, 1fr) minmax(200px, 340px); gap: 16px; margin-top: 12px; }
#legend { list-style: none; padding: 0; margin: 0; columns: 2 200px; }
#legend li { padding: 1px 4px; cursor: pointer; border-radius: 3px; break-inside: avoid; }
#legend li.on { background: #48f4; } #legend li.pinned { outline: 2px solid #48f; }
#diffmap { display: block; width: 100%; aspect-ratio: var(--ar, auto); image-rendering: pixelated; background: #000; }
#diffmap[hidden] { display: none; }
"""

PAGE_BODY = """
<header>
<h1 id="title"></h1>
<p id="totals"></p>
<p id="state" class="warn" hidden></p>
<details open><summary>Options</summary><table id="options"></table></details>
<section id="evaluation" hidden>
<h2>Scores (evaluate.py)</h2>
<p id="eval-note" class="note"></p>
<table id="protocols"></table>
<details><summary>IoU per class (%)</summary><table id="classes"></table></details>
</section>
</header>
<nav id="controls">Sort by <select id="sort">
<option value="name">name</option><option value="score">score (mIoU), worst first</option>
<option value="seconds">seconds, slowest first</option></select>
<span id="count" class="note"></span></nav>
<main id="gallery"></main>
<section id="failed" hidden><h2>Failed</h2><ul id="failed-list"></ul></section>
<div id="viewer" hidden>
<div class="bar"><button id="prev" title="previous image (left arrow)">&larr;</button>
<button id="next" title="next image (right arrow)">&rarr;</button><b id="v-name"></b>
<span id="v-info" class="note"></span><span class="grow"></span><button id="close" title="back (Escape)">&times;</button></div>
<div id="views">
<figure><div class="frame" data-map="labels"><img id="v-input" alt="input"><canvas></canvas></div><figcaption>input</figcaption></figure>
<figure><div class="frame" data-map="labels"><img id="v-overlay" alt="overlay"><canvas></canvas></div><figcaption>overlay.png</figcaption></figure>
<figure><div class="frame" data-map="labels"><img id="v-labels" alt="labels"><canvas></canvas></div><figcaption>labels.png</figcaption></figure>
<figure><div class="frame" data-map="low"><img id="v-lowres" alt="low-resolution masks"><canvas></canvas></div><figcaption>lowres.png: the low-resolution masks</figcaption></figure>
<figure id="gt-box" hidden><div class="frame" data-map="labels"><img id="v-gt" alt="ground truth"><canvas></canvas></div><figcaption>ground truth: <span id="gt-legend"></span></figcaption></figure>
</div>
<div id="side">
<div><h2>Segments</h2><p class="note">Hover a segment (here or in a picture) to highlight it; click to pin it.</p><ol id="legend"></ol></div>
<figure><h2 id="diff-title">Difference map</h2><img id="diffmap" alt="difference map" hidden><figcaption id="diff-note" class="note"></figcaption></figure>
</div>
</div>
"""

PAGE_JS = r"""
"use strict";
const RUN = JSON.parse(document.getElementById("run-data").textContent);
const $ = id => document.getElementById(id);
const el = (tag, props = {}, ...kids) => { const e = Object.assign(document.createElement(tag), props); e.append(...kids); return e; };
const pct = x => x === null || x === undefined ? "n/a" : (100 * x).toFixed(2);
const folder = name => { try { return encodeURIComponent(name) + "/"; } catch (e) { return "_/"; } };
const has = (entry, file) => entry.files.includes(file);
const entries = RUN.entries;
const scores = RUN.scores;
let order = entries.map((e, i) => i), current = -1, view = null, hovered = -1, pinned = -1;

function header() {
  const s = RUN.summary || {};
  $("title").textContent = "emerdiff: " + RUN.title;
  document.title = "emerdiff: " + RUN.title;
  const secs = entries.filter(e => e.seconds !== undefined).map(e => e.seconds);
  const mean = secs.length ? (secs.reduce((a, b) => a + b, 0) / secs.length).toFixed(1) + " s per image" : "";
  const failed = (s.failed || []).length;
  $("totals").textContent = [`${entries.length} of ${RUN.images} images segmented`, failed ? `${failed} failed` : "",
    s.done !== undefined ? `${s.done} by the last run, ${s.skipped} done before` : "", mean].filter(Boolean).join("; ");
  if (RUN.running || s.error) {
    $("state").hidden = false;
    $("state").textContent = s.error ? "The run stopped: " + s.error : "The run is in progress: this page is rewritten after each image.";
  }
  const options = Object.entries(s.options || {});  // in rows of four
  for (let at = 0; at < options.length; at += 4)
    $("options").append(el("tr", {}, ...options.slice(at, at + 4).flatMap(([k, v]) =>
      [el("th", {textContent: k}), el("td", {textContent: JSON.stringify(v)})])));
  if (failed) {
    $("failed").hidden = false;
    for (const f of s.failed) $("failed-list").append(el("li", {textContent: f.reason}));
  }
}

function evaluation() {
  $("sort").querySelector("[value=score]").disabled = !entries.some(e => e.score);
  if (!scores) return;
  $("evaluation").hidden = false;
  const scored = entries.filter(e => e.score).length;
  $("eval-note").textContent = `${scores.dataset}: ${scores.images} images scored at ${scores.resolution}, ` +
    `${scores.missing} missing; ${scores.evaluated}. Per image: DiffSeg's hungarian matching.` +
    (scores.changed ? ` ${scores.changed} images were segmented again since: their scores are not shown.` : "");
  $("protocols").append(el("tr", {}, el("th", {textContent: "protocol"}), el("th", {className: "n", textContent: "mIoU %"}),
    el("th", {className: "n", textContent: "pixel accuracy %"})));
  for (const p of scores.protocols)
    $("protocols").append(el("tr", {}, el("td", {textContent: p}), el("td", {className: "n", textContent: pct(scores[p].miou)}),
      el("td", {className: "n", textContent: pct(scores[p].accuracy)})));
  $("classes").append(el("tr", {}, el("th", {textContent: "class"}), ...scores.protocols.map(p => el("th", {className: "n", textContent: p}))));
  scores.class_names.forEach((name, c) => $("classes").append(el("tr", {},
    el("td", {}, el("span", {className: "swatch", style: "background:" + scores.class_colours[c]}), name),
    ...scores.protocols.map(p => el("td", {className: "n", textContent: pct(scores[p].iou[c])})))));
}

function tile(entry, i) {
  const base = folder(entry.name);
  const picture = has(entry, "overlay.png") ? el("img", {loading: "lazy", src: base + "overlay.png", alt: ""}) : el("div", {className: "blank"});
  const meta = entry.segments !== undefined ? `${entry.segments} segments · ${entry.seconds.toFixed(1)} s` : "";
  const score = entry.score ? `mIoU ${pct(entry.score.miou)} % · acc ${pct(entry.score.accuracy)} %` : "";
  const a = el("a", {className: "tile", href: "#"}, picture, el("div", {className: "name", textContent: entry.name}),
    el("div", {className: "meta", textContent: meta}), el("div", {className: "score", textContent: score}));
  a.dataset.index = i;
  a.addEventListener("click", ev => { ev.preventDefault(); openImage(i); });
  return a;
}

function gallery() {
  const tiles = document.createDocumentFragment();
  entries.forEach((e, i) => tiles.append(tile(e, i)));
  $("gallery").append(tiles);
  $("count").textContent = entries.length === 1 ? "1 image" : `${entries.length} images`;
}

const SORTS = {
  name: (a, b) => entries[a].name < entries[b].name ? -1 : entries[a].name > entries[b].name ? 1 : 0,
  score: (a, b) => key(a, e => e.score && e.score.miou) - key(b, e => e.score && e.score.miou) || SORTS.name(a, b),
  seconds: (a, b) => key(b, e => e.seconds, -Infinity) - key(a, e => e.seconds, -Infinity) || SORTS.name(a, b),
};
function key(i, get, none = Infinity) { const v = get(entries[i]); return typeof v === "number" ? v : none; }

function sortTiles() {
  order = entries.map((e, i) => i).sort(SORTS[$("sort").value]);
  const tiles = [];
  for (const t of $("gallery").children) tiles[+t.dataset.index] = t;
  $("gallery").append(...order.map(i => tiles[i]));
}

function openImage(i) {
  current = i; view = null; hovered = pinned = -1;
  const entry = entries[i], base = folder(entry.name);
  $("viewer").hidden = false;
  $("v-name").textContent = entry.name;
  $("v-info").textContent = [entry.segments !== undefined ? `${entry.segments} segments of ${entry.masks} masks, ${entry.seconds.toFixed(1)} s` : "",
    entry.score ? `mIoU ${pct(entry.score.miou)} %, accuracy ${pct(entry.score.accuracy)} %` : ""].filter(Boolean).join(" · ");
  const pictures = {"v-input": entry.input, "v-overlay": has(entry, "overlay.png") && base + "overlay.png",
    "v-labels": has(entry, "labels.png") && base + "labels.png", "v-lowres": has(entry, "lowres.png") && base + "lowres.png",
    "v-gt": entry.score && entry.score.gt && base + "gt.png"};
  for (const [id, src] of Object.entries(pictures)) {
    $(id).closest("figure").hidden = !src;
    if (src) $(id).src = src; else $(id).removeAttribute("src");
  }
  $("viewer").style.removeProperty("--ar");
  $("legend").replaceChildren();
  $("gt-legend").replaceChildren();
  if (entry.score) entry.score.classes.forEach(c => $("gt-legend").append(el("span", {},
    el("span", {className: "swatch", style: "background:" + scores.class_colours[c]}), scores.class_names[c] + " ")));
  document.querySelectorAll(".frame canvas").forEach(c => c.getContext("2d").clearRect(0, 0, c.width, c.height));
  showDiffmap(-1);
  history.replaceState(null, "", "#" + encodeURIComponent(entry.name));
  document.querySelectorAll("script.view").forEach(s => s.remove());
  if (has(entry, "view.js")) {
    const s = el("script", {className: "view", src: base + "view.js"});
    s.dataset.index = i;
    document.body.append(s);
  } else $("legend").append(el("li", {className: "note", textContent:
    "no view.js in this folder (made by an earlier version, or not by emerdiff.py): segment it again with --overwrite for the legend and the highlighting"}));
}

function closeImage() {
  $("viewer").hidden = true; current = -1;
  history.replaceState(null, "", location.pathname + location.search);
}

function decode(runs, size) {
  const ids = new Uint8Array(size);
  for (let k = 0, at = 0; k < runs.length; k += 2) { ids.fill(runs[k], at, at + runs[k + 1]); at += runs[k + 1]; }
  return ids;
}

// Called by an image folder's view.js: its label maps, colours and areas.
window.emerdiffView = function (data) {
  const i = +document.currentScript.dataset.index;
  if (i !== current) return;
  const entry = entries[i];
  view = {maps: {labels: {w: data.w, h: data.h, ids: decode(data.labels, data.w * data.h)},
                 low: {w: data.lw, h: data.lh, ids: decode(data.low, data.lw * data.lh)}}, masks: {}};
  $("viewer").style.setProperty("--ar", `${data.w} / ${data.h}`);
  document.querySelectorAll(".frame").forEach(f => { const m = view.maps[f.dataset.map], c = f.querySelector("canvas"); c.width = m.w; c.height = m.h; });
  data.colours.forEach((colour, s) => {
    const matched = entry.score && s < entry.score.matched.length ? entry.score.matched[s] : null;
    const name = matched === null ? "" : matched < 0 ? " → unmatched" : " → " + scores.class_names[matched];
    const li = el("li", {}, el("span", {className: "swatch", style: "background:" + colour}),
      `segment ${s}: ${(100 * data.areas[s]).toFixed(1)} %${name}`);
    li.dataset.segment = s;
    li.addEventListener("mouseenter", () => hover(s));
    li.addEventListener("mouseleave", () => hover(-1));
    li.addEventListener("click", () => pin(s));
    $("legend").append(li);
  });
};

function segmentAt(frame, ev) {
  if (!view) return -1;
  const m = view.maps[frame.dataset.map], r = frame.getBoundingClientRect();
  const x = Math.floor((ev.clientX - r.left) / r.width * m.w), y = Math.floor((ev.clientY - r.top) / r.height * m.h);
  return x < 0 || y < 0 || x >= m.w || y >= m.h ? -1 : m.ids[y * m.w + x];
}

function mask(map, s) {
  const key = map + ":" + s;
  if (!view.masks[key]) {
    const m = view.maps[map], image = new ImageData(m.w, m.h);
    for (let p = 0; p < m.ids.length; p++) if (m.ids[p] !== s) image.data[4 * p + 3] = 165;
    view.masks[key] = image;
  }
  return view.masks[key];
}

function highlight(s) {
  if (!view) return;
  document.querySelectorAll(".frame").forEach(f => {
    const c = f.querySelector("canvas"), g = c.getContext("2d");
    if (s < 0) g.clearRect(0, 0, c.width, c.height); else g.putImageData(mask(f.dataset.map, s), 0, 0);
  });
  document.querySelectorAll("#legend li").forEach(li => {
    li.classList.toggle("on", +li.dataset.segment === s);
    li.classList.toggle("pinned", +li.dataset.segment === pinned);
  });
  showDiffmap(s);
}

function showDiffmap(s) {
  const entry = entries[current], img = $("diffmap"), name = "diffmaps/" + String(s).padStart(3, "0") + ".png";
  $("diff-title").textContent = s < 0 ? "Difference map" : `Difference map of mask ${s}`;
  if (s >= 0 && entry && has(entry, name)) {
    img.src = folder(entry.name) + name; img.hidden = false;
    $("diff-note").textContent = "the pixels the modulation of this mask moved (white: most), scaled to its maximum";
  } else {
    img.hidden = true; img.removeAttribute("src");
    $("diff-note").textContent = entry && !entry.files.some(f => f.startsWith("diffmaps/"))
      ? "no difference maps: segment with --save-diffmaps to see them" : "hover a segment to see its difference map";
  }
}

function hover(s) { hovered = s; highlight(s >= 0 ? s : pinned); }
function pin(s) { pinned = pinned === s ? -1 : s; highlight(pinned >= 0 ? pinned : hovered); }

function step(by) {
  const at = order.indexOf(current);
  if (at >= 0 && order.length) openImage(order[(at + by + order.length) % order.length]);
}

function wire() {
  $("sort").addEventListener("change", sortTiles);
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  $("close").addEventListener("click", closeImage);
  document.querySelectorAll(".frame").forEach(f => {
    f.addEventListener("mousemove", ev => { const s = segmentAt(f, ev); if (s !== hovered) hover(s); });
    f.addEventListener("mouseleave", () => hover(-1));
    f.addEventListener("click", ev => { const s = segmentAt(f, ev); if (s >= 0) pin(s); });
  });
  document.addEventListener("keydown", ev => {
    if ($("viewer").hidden) return;
    if (ev.key === "ArrowRight") step(1); else if (ev.key === "ArrowLeft") step(-1); else if (ev.key === "Escape") closeImage();
  });
}

header(); evaluation(); gallery(); sortTiles(); wire();
const start = entries.findIndex(e => "#" + encodeURIComponent(e.name) === location.hash);
if (start >= 0) openImage(start);
document.body.dataset.ready = "1";
"""

PAGE_HTML = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
             "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>emerdiff</title>\n"
             f"<style>{PAGE_CSS}</style>\n</head>\n<body>{PAGE_BODY}"
             "<script type=\"application/json\" id=\"run-data\">/*DATA*/</script>\n"
             f"<script>{PAGE_JS}</script>\n</body>\n</html>\n")
