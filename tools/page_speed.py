"""How long a large run's page (page.py's index.html) takes to open in a browser.

    python tools/page_speed.py [--images 5000] [--repeats 3] [--keep DIR]

Makes a fake run of N images, each folder holding what the page reads of it (run.json, a small
overlay.png, view.js), writes its index.html with page.write_page, opens it from file:// in headless
chromium (Debian's, driven by playwright: pip install playwright==1.65.2), and times each load from
the navigation until every tile is in the page and two frames were drawn. Prints the load times and
the time page.write_page took, first and again (as after each image of a run).
"""
import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import page  # noqa: E402 (after the repository is on the path)

RENDERED = "new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"


def fake_run(out: Path, count: int, masks: int = 25) -> list[str]:
    """A run's folder of `count` images as the runner leaves it, for the page only (and their inputs, in
    out/images); returns their names."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"{i:012d}" for i in range(count)]
    overlay = out / "overlay-template.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(overlay)
    low = rng.integers(0, masks, (16, 16))
    labels = low.repeat(8, 0).repeat(8, 1)
    view = page.view_script(labels, low, rng.integers(0, 256, (masks, 3)))
    for i, name in enumerate(names):
        folder = out / name
        folder.mkdir(exist_ok=True)
        shutil.copyfile(overlay, folder / "overlay.png")
        shutil.copyfile(overlay, out / "images" / f"{name}.png")  # the input the page links to
        (folder / page.VIEW_SCRIPT).write_text(view)
        record = {"run": {"image": {"path": str(out / "images" / f"{name}.png"), "centre_crop": True}, "options": {"masks": masks}},
                  "result": {"segments": masks, "seconds": {"features": 1.0 + i % 7}, "files": ["overlay.png", "view.js"]}}
        (folder / page.RUN_RECORD).write_text(json.dumps(record))
    overlay.unlink()
    summary = {"images": count, "done": count, "skipped": 0, "failed": [], "seconds_per_image": 4.0, "seconds": [],
               "seconds_before": [], "error": None, "options": {"masks": masks}}
    (out / page.SUMMARY).write_text(json.dumps(summary))
    return names


def timed_loads(page_path: Path, count: int, repeats: int) -> list[float]:
    """Seconds from navigation until the page shows `count` tiles and drew two frames, each in a new tab."""
    from playwright.sync_api import sync_playwright
    times = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"))
        for _ in range(repeats):
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            clock = time.perf_counter()
            tab.goto(page_path.as_uri())
            tab.wait_for_function(f"document.querySelectorAll('.tile').length === {count} && document.body.dataset.ready")
            tab.evaluate(RENDERED)
            times.append(time.perf_counter() - clock)
            tab.close()
        browser.close()
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", metavar="DIR", help="make the fake run here and keep it (default: a temporary folder)")
    args = p.parse_args(argv)
    if not shutil.which("chromium"):
        print("page_speed: no chromium on the PATH: apt-get install chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as temporary:
        out = Path(args.keep or temporary) / "run"
        names = fake_run(out, args.images)
        written = []
        for _ in range(2):  # the first reads each run.json, the next (a rewrite after an image) only stats it
            clock = time.perf_counter()
            page.write_page(out, names)
            written.append(time.perf_counter() - clock)
        size = (out / page.PAGE).stat().st_size
        times = timed_loads(out / page.PAGE, args.images, args.repeats)
    print(f"{args.images} images: index.html {size / 1e6:.2f} MB written in {written[0]:.2f} s (rewritten in "
          f"{written[1]:.2f} s); opened in "
          f"{', '.join(f'{t:.2f}' for t in times)} s (median {statistics.median(times):.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
