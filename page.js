"use strict";
const RUN = JSON.parse(document.getElementById("run-data").textContent);
const $ = id => document.getElementById(id);
const el = (tag, props = {}, ...kids) => { const e = Object.assign(document.createElement(tag), props); e.append(...kids); return e; };
const pct = x => x === null || x === undefined ? "n/a" : (100 * x).toFixed(2);
const folder = entry => entry.href + "/";  // page.py percent-encodes the folder's name, bytes that are no UTF-8 too
const has = (entry, file) => entry.files.includes(file);
const count = n => n === 1 ? "1 image" : `${n} images`;
// The options a tile's folder was made with where they differ from the run's (page.py's "differs").
const madeWith = entry => entry.differs ? "made with " + Object.entries(entry.differs).map(([k, v]) => `${k} ${JSON.stringify(v)}`).join(", ") : "";
const entries = RUN.entries;
const scores = RUN.scores;
let order = entries.map((e, i) => i), current = -1, view = null, hovered = -1, pinned = -1;

function header() {
  const s = RUN.summary || {};
  $("title").textContent = "emerdiff: " + RUN.title;
  document.title = "emerdiff: " + RUN.title;
  const secs = entries.filter(e => e.seconds !== undefined).map(e => e.seconds);
  const mean = secs.length ? (secs.reduce((a, b) => a + b, 0) / secs.length).toFixed(1) + " s per image" : "";
  const failed = (s.failed || []).length, n = entries.length;  // every complete folder: the run's, and earlier runs'
  const made = s.done === undefined ? "" : `: ${s.done} made by this run, ${n - s.done} before`;
  $("totals").textContent = [count(n) + made, `${n - RUN.earlier} of the run's ${count(RUN.images)} done` +
    (failed ? `, ${failed} failed` : ""), mean].filter(Boolean).join("; ");
  if (RUN.running || s.error) {
    $("state").hidden = false;
    $("state").textContent = s.error ? "The run stopped: " + s.error : "The run is in progress: this page is rewritten after each image.";
  }
  // in rows of four; steps as the denoising steps run ("15 of the 50-step grid's steps, ..."), not a bare 50
  const options = Object.entries(s.options || {}).map(([k, v]) =>
    [k, k === "steps" && s.denoising_steps ? s.denoising_steps : JSON.stringify(v)]);
  for (let at = 0; at < options.length; at += 4)
    $("options").append(el("tr", {}, ...options.slice(at, at + 4).flatMap(([k, v]) =>
      [el("th", {textContent: k}), el("td", {textContent: v})])));
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
  const base = folder(entry);
  const picture = has(entry, "overlay.png") ? el("img", {loading: "lazy", src: base + "overlay.png", alt: ""}) : el("div", {className: "blank"});
  const meta = entry.segments !== undefined ? `${entry.segments} segments · ${entry.seconds.toFixed(1)} s` : "";
  const names = entry.names ? [...new Set(entry.names.filter(n => n !== null))].join(" · ") : "";
  const score = entry.score ? `mIoU ${pct(entry.score.miou)} % · acc ${pct(entry.score.accuracy)} %` : "";
  const a = el("a", {className: "tile", href: "#"}, picture, el("div", {className: "name", textContent: entry.name}),
    el("div", {className: "meta", textContent: meta}), el("div", {className: "names", textContent: names}),
    el("div", {className: "differs", textContent: madeWith(entry)}),
    el("div", {className: "score", textContent: score}));
  a.dataset.index = i;
  a.addEventListener("click", ev => { ev.preventDefault(); openImage(i); });
  return a;
}

function gallery() {
  const tiles = document.createDocumentFragment();
  entries.forEach((e, i) => tiles.append(tile(e, i)));
  $("gallery").append(tiles);
  $("count").textContent = count(entries.length);
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
  const entry = entries[i], base = folder(entry);
  $("viewer").hidden = false;
  $("v-name").textContent = entry.name;
  $("v-info").textContent = [entry.segments !== undefined ? `${entry.segments} segments of ${entry.masks} masks, ${entry.seconds.toFixed(1)} s` : "",
    madeWith(entry), entry.score ? `mIoU ${pct(entry.score.miou)} %, accuracy ${pct(entry.score.accuracy)} %` : ""].filter(Boolean).join(" · ");
  const pictures = {"v-input": entry.input, "v-overlay": has(entry, "overlay.png") && base + "overlay.png",
    "v-labels": has(entry, "labels.png") && base + "labels.png", "v-lowres": has(entry, "lowres.png") && base + "lowres.png",
    "v-named": has(entry, "named.png") && base + "named.png", "v-gt": entry.score && entry.score.gt && base + "gt.png"};
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
  history.replaceState(null, "", "#" + entry.href);
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
      `segment ${s}: ${(100 * data.areas[s]).toFixed(1)} %${entry.names && entry.names[s] ? " · " + entry.names[s] : ""}${name}`);
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
    img.src = folder(entry) + name; img.hidden = false;
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
const start = entries.findIndex(e => "#" + e.href === location.hash);
if (start >= 0) openImage(start);
document.body.dataset.ready = "1";
