"""The run's page, index.html (page.py): what it is made of, without a browser; then in a real one,
Debian's chromium driven by playwright, a tiny model's run of 3 images scored by evaluate.py, opened
from file://: its tiles, scores, sorting, hovering and difference maps, and the keys."""
import json
import os
import re
import shutil
import urllib.parse

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import distance_transform_edt
from scipy.optimize import linear_sum_assignment

import evaluate
import page
import runner
from files import folder_name
from page_speed import fake_run
from command_line import save_image
from datasets import PRESETS, dataset_samples
from test_evaluate import crop_array, make_cityscapes, save_labels
from test_open_vocabulary import named_pascal_context_459

INSTALL = "apt-get install chromium && pip install playwright==1.65.2"
NAMES = ["a", "b <&'\"c", "d"]  # image stems; the second needs escaping in HTML, JS and URLs
TINY = ["--random-weights", "--size", "64", "--masks", "4", "--feature-samples", "1", "--kmeans-restarts", "1",
        "--steps", "10", "--tm", "101", "--quiet"]


# ---- Without a browser ----

def test_run_length_encoding_round_trip():
    ids = np.random.default_rng(0).integers(0, 3, (7, 9)).repeat(2, 1)
    encoded = page.run_length_encoded(ids)
    decoded = np.concatenate([[v] * n for v, n in zip(encoded[::2], encoded[1::2])])
    assert np.array_equal(decoded, ids.ravel()) and sum(encoded[1::2]) == ids.size
    assert page.run_length_encoded(np.zeros((0, 3))) == []


def test_data_in_the_page_cannot_end_its_script():
    text = page.script_json({"name": "</script><b>&'\"\u2028é"})
    assert not re.search(r"[<>&]", text) and text.isascii()
    assert json.loads(text) == {"name": "</script><b>&'\"\u2028é"}


def test_the_page_is_page_html_with_its_css_script_and_data_inline(tmp_path, monkeypatch):
    text = page.page_text(page.script_json({"x": 1}))
    assert f"<style>{page.STYLE.read_text()}</style>" in text and f"<script>{page.SCRIPT.read_text()}</script>" in text
    assert '<script type="application/json" id="run-data">{"x":1}</script>' in text
    assert "page.css" not in text and "page.js" not in text
    script = tmp_path / "page.js"  # inserted text is not searched for the tags
    script.write_text('// <link rel="stylesheet" href="page.css">')
    monkeypatch.setattr(page, "SCRIPT", script)
    assert '<script>// <link rel="stylesheet" href="page.css"></script>' in page.page_text("{}")
    template = tmp_path / "page.html"
    template.write_text(page.TEMPLATE.read_text().replace('<script src="page.js"></script>', ""))
    monkeypatch.setattr(page, "TEMPLATE", template)
    with pytest.raises(ValueError, match='<script src="page.js"></script> must be there once, not 0 times'):
        page.page_text("{}")


def test_no_image_folder_takes_the_page_s_name():
    assert folder_name("index.html") == "_index.html" and folder_name("INDEX.HTML") == "_INDEX.HTML"


def page_data(out):
    """The data index.html holds, as its script reads it."""
    text = (out / "index.html").read_text()
    return json.loads(re.search(r'<script type="application/json" id="run-data">(.*?)</script>', text, re.S)[1])


def test_the_page_is_rewritten_after_each_image_and_stays_true_when_interrupted(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for seed, name in enumerate("abc"):
        save_image(images / f"{name}.png", (64, 64), seed)
    (images / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    args = ["--image", str(images), "--out", str(out), "--save-diffmaps", *TINY]
    written, write_page = [], page.write_page
    monkeypatch.setattr(page, "write_page", lambda *a, **k: (write_page(*a, **k), written.append(page_data(out))))
    segment_file, calls = runner.segment_file, []

    def interrupted_at_c(job, *rest, **kw):
        calls.append(job.name)
        if job.name == "c":
            raise KeyboardInterrupt
        return segment_file(job, *rest, **kw)

    monkeypatch.setattr(runner, "segment_file", interrupted_at_c)
    assert runner.main(args) == 130
    assert [[e["name"] for e in data["entries"]] for data in written] == [["a"], ["a", "b"], ["a", "b"]]
    assert [data["running"] for data in written] == [True, True, False]
    final = page_data(out)
    assert final["summary"]["error"] == "interrupted" and final["images"] == 4
    assert [f["image"] for f in final["summary"]["failed"]] == [str(images / "bad.png")]
    entry = final["entries"][0]
    assert {f"diffmaps/{i:03d}.png" for i in range(4)} | {"view.js", "overlay.png"} <= set(entry["files"])
    assert all((out / "a" / f).is_file() for f in entry["files"])
    assert entry["input"] == "../images/a.png"
    monkeypatch.setattr(runner, "segment_file", segment_file)
    assert runner.main(args) == 2  # the rerun: a and b skipped, c done, bad.png failed again
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["skipped"], summary["done"]) == (2, 1)
    assert [e["name"] for e in page_data(out)["entries"]] == ["a", "b", "c"]


def test_a_page_that_cannot_be_written_is_said_once_and_the_run_goes_on(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for seed, name in enumerate("ab"):
        save_image(images / f"{name}.png", (64, 64), seed)
    out = tmp_path / "out"
    (out / "index.html").mkdir(parents=True)  # in the way of the page
    assert runner.main(["--image", str(images), "--out", str(out), *TINY]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if "error" in line] == [f"emerdiff: error: cannot write {out / 'index.html'}: "
                                                           "a folder where a file belongs"]
    assert all((out / name / "view.js").is_file() for name in "ab")
    assert json.loads((out / "summary.json").read_text())["done"] == 2


NOT_UTF8 = os.fsdecode(b"caf\xe9")  # a file name of bytes that are no UTF-8 (Latin-1's é), as Linux holds it


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs into one --out: images a and b with 4 masks, then, with 3 masks, an image whose file name
    is no UTF-8."""
    tmp = tmp_path_factory.mktemp("two-runs")
    for folder, names in (("first", ["a", "b"]), ("second", [NOT_UTF8])):
        (tmp / folder).mkdir()
        for seed, name in enumerate(names):
            save_image(tmp / folder / f"{name}.png", (64, 64), seed)
    out = tmp / "out"
    assert runner.main(["--image", str(tmp / "first"), "--out", str(out), *TINY]) == 0
    assert runner.main(["--image", str(tmp / "second"), "--out", str(out), *TINY, "--masks", "3"]) == 0
    return out


def test_a_name_that_is_no_utf8_is_linked_by_its_bytes(two_runs):
    """The tile of a folder whose name is no UTF-8: its name as the file system holds it (\\xe9), its
    folder and its input linked by their bytes percent-encoded, and its pictures."""
    entry = next(entry for entry in page_data(two_runs)["entries"] if entry["href"] == "caf%E9")
    assert entry["name"] == "caf\\xe9" and entry["input"] == "../second/caf%E9.png"
    assert {"overlay.png", "labels.png", "view.js"} <= set(entry["files"])


def test_the_page_holds_every_complete_folder_of_out_whichever_run_made_it(two_runs):
    """The second run's page: its own image first, then the two the first run made, with 4 masks where
    this run took 3 (their tiles say so), counted as made before."""
    data = page_data(two_runs)
    assert [(entry["name"], entry.get("differs")) for entry in data["entries"]] == [
        ("caf\\xe9", None), ("a", {"masks": 4}), ("b", {"masks": 4})]
    assert (data["images"], data["earlier"], data["summary"]["done"], data["summary"]["skipped"]) == (1, 2, 1, 0)


# ---- In a browser ----

def browser():
    """Debian's chromium and playwright, or a skip naming how to install them (a failure where the
    environment says they must be there: EMERDIFF_REQUIRE_BROWSER=1, as .ci/run sets)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not shutil.which("chromium"):
        missing = "playwright" if sync_playwright is None else "chromium"
        message = f"{missing} is missing for the browser tests: install with: {INSTALL}"
        if os.environ.get("EMERDIFF_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


@pytest.fixture(scope="module")
def chromium():
    with browser()() as p:
        launched = p.chromium.launch(executable_path=shutil.which("chromium"))
        yield launched
        launched.close()


class Watched:
    """A tab whose console errors, uncaught exceptions and requests other than file:// are kept."""

    def __init__(self, chromium):
        self.page = chromium.new_page(viewport={"width": 1000, "height": 760})
        self.errors, self.requests = [], []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: None if r.url.startswith("file://") else self.requests.append(r.url))

    def open(self, path):
        self.page.goto(path.as_uri())
        self.page.wait_for_selector("body[data-ready]")
        return self.page


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """The tiny model's run of a 3-image folder dataset with --save-diffmaps, scored by evaluate.py."""
    tmp = tmp_path_factory.mktemp("page")
    rng = np.random.default_rng(1)
    for seed, name in enumerate(NAMES):
        (tmp / "data" / "images").mkdir(parents=True, exist_ok=True)
        save_image(tmp / "data" / "images" / f"{name}.png", (80, 64), seed)
        save_labels(tmp / "data" / "labels" / f"{name}.png", rng.integers(0, 3, (4, 5)).repeat(16, 0).repeat(16, 1))
    out = tmp / "out"
    assert runner.main(["--dataset", "folder", "--root", str(tmp / "data"), "--out", str(out), "--save-diffmaps",
                        *TINY]) == 0
    assert evaluate.main(["--dataset", "folder", "--root", str(tmp / "data"), "--pred", str(out), "--quiet",
                          "--json", str(tmp / "scores.json")]) == 0
    return out, json.loads((tmp / "scores.json").read_text())


def test_evaluate_writes_the_ground_truth_and_each_segment_s_class(scored_run):
    out, scores = scored_run
    saved = json.loads((out / "summary.scores.json").read_text())
    assert saved["hungarian"]["miou"] == pytest.approx(scores["hungarian"]["miou"])
    assert saved["class_names"] == ["0", "1", "2"]
    colours = page.class_colours(3)
    for name in NAMES:
        gt = np.asarray(Image.open(out.parent / "data" / "labels" / f"{name}.png"))
        labels = np.load(out / folder_name(name) / "labels.npy")
        assert np.array_equal(np.asarray(Image.open(out / folder_name(name) / "gt.png")), colours[gt])
        hist = np.zeros((3, 4), dtype=int)  # class x segment, by a loop
        for c, s in zip(gt.ravel(), labels.ravel()):
            hist[c, s] += 1
        classes, segments = linear_sum_assignment(hist, maximize=True)
        matched = saved["per_image"][folder_name(name)]["matched"]
        assert [matched[s] for s in segments] == list(classes) and matched.count(-1) == 1


def test_cityscapes_ground_truth_is_drawn_in_cityscapes_colours(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    pred = tmp_path / "pred"
    samples = dataset_samples("cityscapes", root)
    for sample in samples:
        save_labels(pred / sample.stem / "labels.png", crop_array(np.asarray(Image.open(sample.label))) % 5, mode="P")
    assert evaluate.main(["--dataset", "cityscapes", "--root", str(root), "--pred", str(pred), "--quiet"]) == 0
    ids = crop_array(np.asarray(Image.open(samples[0].label)))
    gt = np.asarray(Image.open(pred / samples[0].stem / "gt.png"))
    # label ids 7 road, 23 sky, 26 car, 0 unlabelled: cityscapesScripts' colours, and black
    for label, colour in ((7, (128, 64, 128)), (23, (70, 130, 180)), (26, (0, 0, 142)), (0, (0, 0, 0))):
        assert (ids == label).any() and (gt[ids == label] == colour).all()


def tile_names(browser_page):
    return browser_page.locator(".tile .name").all_text_contents()


def test_the_page_of_a_scored_run(chromium, scored_run):
    out, scores = scored_run
    tab = Watched(chromium)
    browser_page = tab.open(out / "index.html")
    folders = sorted(folder_name(name) for name in NAMES)
    assert tile_names(browser_page) == folders
    per_image = {folder_name(entry["stem"]): entry for entry in scores["per_image"]}
    for name, text in zip(tile_names(browser_page), browser_page.locator(".tile .score").all_text_contents()):
        entry = per_image[name]
        assert text == f"mIoU {100 * entry['miou']:.2f} % · acc {100 * entry['accuracy']:.2f} %"
    browser_page.select_option("#sort", "score")
    assert tile_names(browser_page) == sorted(folders, key=lambda name: per_image[name]["miou"])
    # the options' steps as the steps run: t = 101 and 1 of --steps 10 (a grid 100 apart), not a bare 10
    steps = browser_page.locator("#options th:text-is('steps') + td").text_content()
    assert steps == "2 of the 10-step grid's steps, from t_m = 101 down to 1"
    shot = Image.open(page_screenshot(browser_page, out / "gallery.png")).convert("L")
    assert np.asarray(shot).std() > 10  # not blank
    assert not tab.errors and not tab.requests


def test_the_page_shows_the_named_rows_and_the_459_classes(chromium, tmp_path):
    """The run's page (page.js), in a browser: the two rows beside the others, and the IoU of each of the 459
    classes under each protocol, as summary.scores.json holds them."""
    args = named_pascal_context_459(tmp_path)[0]
    assert evaluate.main([*args, "--quiet", "--json", str(tmp_path / "scores.json")]) == 0
    result = json.loads((tmp_path / "scores.json").read_text())
    tab = Watched(chromium)
    browser_page = tab.open(tmp_path / "pred" / "index.html")
    rows = [row.locator("td").all_text_contents() for row in browser_page.locator("#protocols tr").all()[1:]]
    assert rows == [[name, f"{100 * result[name]['miou']:.2f}", f"{100 * result[name]['accuracy']:.2f}"]
                    for name in ("hungarian", "majority", "open-vocabulary", "maskclip")]
    classes = browser_page.locator("#classes tr")
    assert classes.count() == 1 + 459
    assert classes.nth(0).locator("th").all_text_contents() == ["class", *result["protocols"]]
    for c in (0, 100, 458):  # the first, one in no map (n/a), the last
        ious = [result[name]["iou"][c] for name in result["protocols"]]
        assert classes.nth(1 + c).locator("td").all_text_contents() == [
            PRESETS["pascal-context-459"].classes[c], *("n/a" if iou is None else f"{100 * iou:.2f}" for iou in ious)]
    assert not tab.errors and not tab.requests


def test_the_page_names_each_segment_on_its_tile_and_in_its_legend(chromium, tmp_path):
    """A run with --classes: the tile lists the classes its segments took, the legend says each segment's class
    (as run.json's names, which test_named checks against classes.json), and named.png is shown."""
    out = tmp_path / "out"
    save_image(tmp_path / "cat.png", (80, 64))
    assert runner.main(["--image", str(tmp_path / "cat.png"), "--out", str(out), "--classes", "cat, <sky> & grass",
                        *TINY]) == 0
    names = json.loads((out / "cat" / "run.json").read_text())["result"]["names"]
    tab = Watched(chromium)
    browser_page = tab.open(out / "index.html")
    assert browser_page.locator(".tile .names").text_content() == " · ".join(dict.fromkeys(n for n in names if n))
    browser_page.locator(".tile").first.click()
    browser_page.wait_for_selector("#legend li")
    legend = browser_page.locator("#legend li").all_text_contents()
    assert [text.split(" · ")[-1] if " · " in text else None for text in legend] == names
    assert browser_page.locator("#v-named").get_attribute("src").endswith("cat/named.png")
    browser_page.wait_for_function("document.getElementById('v-named').naturalWidth > 80")  # loaded, legend beside
    assert not tab.errors and not tab.requests


def page_screenshot(browser_page, path):
    browser_page.screenshot(path=str(path))
    return path


def diffmap(browser_page) -> str:
    """The file the difference map's element shows, relative to the page."""
    return urllib.parse.unquote(browser_page.get_attribute("#diffmap", "src"))


def inner_pixel(labels, segment):
    """(x, y) of the pixel of `segment` farthest from any other segment."""
    distance = distance_transform_edt(np.pad(labels == segment, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(distance.argmax(), labels.shape)
    return x, y


def test_hovering_a_segment_shows_its_difference_map(chromium, scored_run):
    out, _ = scored_run
    tab = Watched(chromium)
    browser_page = tab.open(out / "index.html")
    name = folder_name(NAMES[1])
    browser_page.locator(".tile", has_text=name).click()
    browser_page.wait_for_selector("#legend li")
    labels = np.load(out / name / "labels.npy")
    assert browser_page.locator("#legend li").count() == 4
    prefix = name + "/diffmaps/"
    frame = browser_page.locator(".frame:has(#v-labels)").bounding_box()
    for segment in np.unique(labels):  # hovered in the picture: the pixel's segment, from labels.npy
        x, y = inner_pixel(labels, segment)
        browser_page.mouse.move(frame["x"] + (x + 0.5) * frame["width"] / labels.shape[1],
                        frame["y"] + (y + 0.5) * frame["height"] / labels.shape[0])
        assert diffmap(browser_page) == f"{prefix}{segment:03d}.png"
        assert browser_page.locator("#legend li.on").get_attribute("data-segment") == str(segment)
    for segment in (3, 0):  # hovered in the legend
        browser_page.locator("#legend li").nth(segment).hover()
        assert diffmap(browser_page) == f"{prefix}{segment:03d}.png"
    browser_page.locator("#legend li").nth(2).click()  # pinned: it stays when the mouse leaves
    browser_page.mouse.move(1, 1)
    assert diffmap(browser_page) == f"{prefix}002.png"
    shot = os.environ.get("EMERDIFF_SCREENSHOT")  # where to keep the screenshot (README's)
    page_screenshot(browser_page, shot or out / "one-image.png")
    assert np.asarray(Image.open(shot or out / "one-image.png").convert("L")).std() > 10
    browser_page.keyboard.press("ArrowRight")
    assert browser_page.locator("#v-name").text_content() == sorted(folder_name(n) for n in NAMES)[2]
    browser_page.keyboard.press("Escape")
    assert browser_page.locator("#viewer").is_hidden()
    assert not tab.errors and not tab.requests


def test_a_page_of_5000_images_shows_every_tile(chromium, tmp_path):
    names = fake_run(tmp_path / "run", 5000)
    page.write_page(tmp_path / "run", names)
    tab = Watched(chromium)
    browser_page = tab.open(tmp_path / "run" / "index.html")
    assert browser_page.locator(".tile").count() == 5000
    assert browser_page.locator(".tile .name").nth(4999).text_content() == names[-1]
    assert not tab.errors and not tab.requests


def loaded_width(picture) -> int:
    """The width of the picture an <img> (a playwright locator) shows, once loaded (an error if it cannot be)."""
    return picture.evaluate("img => img.decode().then(() => img.naturalWidth)")


def test_a_name_that_is_no_utf8_shows_with_its_pictures(chromium, two_runs):
    """The page loads (JavaScript's encodeURIComponent throws on such a name), and the tile and the image
    opened show their pictures, the input's too."""
    tab = Watched(chromium)
    browser_page = tab.open(two_runs / "index.html")
    tile = browser_page.locator(".tile", has_text="caf\\xe9")
    assert loaded_width(tile.locator("img")) == 64
    tile.click()
    browser_page.wait_for_selector("#legend li")
    assert browser_page.locator("#v-name").text_content() == "caf\\xe9"
    pictures = [browser_page.locator(f"#v-{picture}") for picture in ("input", "overlay", "labels")]
    assert [loaded_width(picture) for picture in pictures] == [64] * 3
    assert not tab.errors and not tab.requests


def test_the_totals_and_the_tiles_of_earlier_runs(chromium, two_runs):
    """Every folder's tile, those of the earlier run saying the options they were made with; the totals
    say how many the folder holds, how many this run made and how many were made before."""
    tab = Watched(chromium)
    browser_page = tab.open(two_runs / "index.html")
    assert tile_names(browser_page) == ["a", "b", "caf\\xe9"]
    assert browser_page.locator(".tile .differs").all_text_contents() == ["made with masks 4"] * 2 + [""]
    assert browser_page.locator("#totals").text_content().startswith(
        "3 images: 1 made by this run, 2 before; 1 of the run's 1 image done; ")
    assert not tab.errors and not tab.requests
