"""Dataset runs: reruns that skip what is done, list files, the benchmark presets (centre crop, as
evaluate.py scores them), and torchrun's processes sharing the images out."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import emerdiff
import evaluate
import runner
from command_line import EXAMPLE, FAST, assert_complete, assert_one_error, cli, save_image, torchrun_cli
from conftest import ROOT

OPTIONS = dict(size=64, masks=2, feature_samples=1, kmeans_restarts=1, steps=10, t_m=101)


def written(out, names):
    return {name: (out / name / "run.json").stat().st_mtime_ns for name in names}


def test_a_rerun_skips_what_is_done_and_redoes_what_changed(tmp_path, tiny_sd_dir, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name, size in (("a", (96, 64)), ("b", (64, 96))):
        save_image(images / f"{name}.png", size)
    out = tmp_path / "out"
    args = ["--image", str(images), "--weights", str(tiny_sd_dir), "--out", str(out), *FAST]

    def rerun(*more):
        before = written(out, "ab")
        assert runner.main([*args, *more]) == 0
        after = written(out, "ab")
        return json.loads((out / "summary.json").read_text()), {n for n in "ab" if after[n] != before[n]}

    assert runner.main(args) == 0
    first = json.loads((out / "summary.json").read_text())
    recorded = [sum(json.loads((out / n / "run.json").read_text())["result"]["seconds"].values()) for n in "ab"]
    summary, redone = rerun()
    assert redone == set() and (summary["done"], summary["skipped"]) == (0, 2)
    assert summary["seconds"] == [] and sorted(summary["seconds_before"]) == pytest.approx(sorted(recorded))
    assert summary["seconds_per_image"] == pytest.approx(sum(recorded) / 2)  # the work of the first run, kept
    assert first["seconds_per_image"] >= summary["seconds_per_image"]  # the first also counted its saving
    assert "2 of 2 images already done with these options" in capsys.readouterr().err
    summary, redone = rerun("--masks", "3")
    assert redone == {"a", "b"} and (summary["done"], summary["skipped"]) == (2, 0)
    assert json.loads((out / "a" / "run.json").read_text())["run"]["options"]["masks"] == 3
    os.utime(images / "b.png", ns=(1, 1))  # the image file changed: only it is redone
    summary, redone = rerun("--masks", "3")
    assert redone == {"b"} and (summary["done"], summary["skipped"]) == (1, 1)
    summary, redone = rerun("--masks", "3", "--overwrite")
    assert redone == {"a", "b"} and summary["done"] == 2


def test_a_list_file_names_images_relative_to_itself(tmp_path, tiny_sd_dir):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    save_image(tmp_path / "data" / "sub" / "x.png", (64, 80))
    save_image(tmp_path / "data" / "y.png", (80, 64))
    listing = tmp_path / "data" / "todo.txt"
    listing.write_text("# images to segment\nsub/x.png\n\n  y.png  \n")
    assert runner.main(["--image", str(listing), "--weights", str(tiny_sd_dir), "--out", str(tmp_path / "out"),
                        *FAST]) == 0
    assert_complete(tmp_path / "out" / "x", (64, 80))
    assert_complete(tmp_path / "out" / "y", (80, 64))
    listing.write_text("# nothing\n")
    result = cli("--image", str(listing), "--weights", str(tiny_sd_dir), "--out", str(tmp_path / "out"))
    assert_one_error(result, "todo.txt: the list names no image")


def fake_coco(root, sizes):
    """COCO-Stuff in its distributed layout: val2017/<id>.jpg, stuffthingmaps_trainval2017/val2017/<id>.png."""
    (root / "val2017").mkdir(parents=True)
    (root / "stuffthingmaps_trainval2017" / "val2017").mkdir(parents=True)
    ids = [f"{i:012d}" for i in range(1, len(sizes) + 1)]
    for i, (image_id, size) in enumerate(zip(ids, sizes)):
        save_image(root / "val2017" / f"{image_id}.jpg", size, seed=i)
        fine = np.random.default_rng(i).integers(0, 182, size[::-1]).astype(np.uint8)
        Image.fromarray(fine).save(root / "stuffthingmaps_trainval2017" / "val2017" / f"{image_id}.png")
    return ids


def as_stored(path, crop=False):
    """The image's pixels as stored, no EXIF rotation (the pixels alone: a PIL image keeps its EXIF, which
    segment() applies), and with `crop` their centred square of side min(width, height)."""
    raw = Image.fromarray(np.asarray(Image.open(path).convert("RGB")))
    side = min(raw.size)
    left, top = (raw.width - side) // 2, (raw.height - side) // 2
    return raw.crop((left, top, left + side, top + side)) if crop else raw


def test_a_preset_segments_each_centre_square_as_evaluate_reads_it(tmp_path, tiny_sd_dir, sd):
    root, pred = tmp_path / "coco", tmp_path / "pred"
    ids = fake_coco(root, [(128, 96), (80, 112), (96, 96)])
    rotated = root / "val2017" / f"{ids[1]}.jpg"  # an EXIF orientation the labels do not follow: ignored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(rotated).save(rotated, exif=exif)
    (tmp_path / "list.txt").write_text(f"{ids[0]}\n{ids[1]}\n")
    assert runner.main(["--dataset", "coco-stuff-27", "--root", str(root), "--list", str(tmp_path / "list.txt"),
                        "--weights", str(tiny_sd_dir), "--out", str(pred), *FAST]) == 0
    assert sorted(p.name for p in pred.iterdir() if p.is_dir()) == ids[:2]
    for image_id, side in zip(ids, (96, 80)):
        assert_complete(pred / image_id, (side, side))
        expected = emerdiff.segment(as_stored(root / "val2017" / f"{image_id}.jpg", crop=True), sd, **OPTIONS)
        assert np.array_equal(np.load(pred / image_id / "labels.npy"), expected.labels)
    assert evaluate.main(["--dataset", "coco-stuff-27", "--root", str(root), "--list", str(tmp_path / "list.txt"),
                          "--pred", str(pred), "--json", str(tmp_path / "scores.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "scores.json").read_text())["images"] == 2


@pytest.mark.parametrize("args, pattern", [
    (["--dataset", "folder"], "--dataset folder needs --root"),
    (["--dataset", "cityscapes", "--root", "."], "leftImg8bit/val: no such folder"),
    (["--image", str(EXAMPLE), "--root", "."], "--root and --list go with --dataset"),
    (["--image", str(EXAMPLE), "--dataset", "folder"], "argument --dataset: not allowed with argument --image"),
], ids=["no-root", "wrong-layout", "root-without-dataset", "both"])
def test_bad_dataset_arguments(tmp_path, args, pattern):
    assert_one_error(cli(*args, "--weights", str(tmp_path / "none"), "--out", str(tmp_path / "out")), pattern)


def test_torchrun_shares_the_images_out_once_each(tmp_path, tiny_sd_dir):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        save_image(images / f"img{i}.png", (64 + 16 * i, 64), seed=i)
    common = ["--image", str(images), "--weights", str(tiny_sd_dir), *FAST]
    shared = torchrun_cli(*common, "--out", str(tmp_path / "shared"))
    assert shared.returncode == 0, shared.stderr
    lines = sorted(line for line in shared.stdout.splitlines() if " segments -> " in line)
    assert [line.split(":")[0] for line in lines] == [str(images / f"img{i}.png") for i in range(5)]  # once each
    single = cli(*common, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    for i in range(5):
        assert np.array_equal(np.load(tmp_path / "shared" / f"img{i}" / "labels.npy"),
                              np.load(tmp_path / "single" / f"img{i}" / "labels.npy"))
    assert sorted(p.name for p in (tmp_path / "shared").iterdir() if p.is_file()) == ["index.html", "summary.json"]
    page = (tmp_path / "shared" / "index.html").read_text()  # the merging process's: every process's images
    assert all(f'"name":"img{i}"' in page for i in range(5))
    summary = json.loads((tmp_path / "shared" / "summary.json").read_text())
    assert (summary["images"], summary["done"], len(summary["seconds"])) == (5, 5, 5)


def test_the_papers_presets_segment_whole_images_with_their_embeddings(tmp_path, tiny_sd_dir, sd):
    """--dataset coco-stuff-171 (EmerDiff's Table 2) segments each whole image, and every folder holds
    embeddings.npy: the segment() result's mask embeddings. --upsample bilinear (the paper's baseline)
    writes the same files, recorded in run.json as another run; evaluate.py then scores all four protocols."""
    root, pred = tmp_path / "coco", tmp_path / "pred"
    ids = fake_coco(root, [(128, 96), (96, 128)])
    args = ["--dataset", "coco-stuff-171", "--root", str(root), "--weights", str(tiny_sd_dir), *FAST]
    assert runner.main([*args, "--out", str(pred)]) == 0
    for image_id, size in zip(ids, [(128, 96), (96, 128)]):
        assert_complete(pred / image_id, size)  # the whole image, at its own size
        expected = emerdiff.segment(Image.open(root / "val2017" / f"{image_id}.jpg").convert("RGB"), sd, **OPTIONS)
        embeddings = np.load(pred / image_id / "embeddings.npy")
        assert embeddings.dtype == np.float32 and np.array_equal(embeddings, expected.embeddings)
        assert np.array_equal(np.load(pred / image_id / "labels.npy"), expected.labels)
    baseline = tmp_path / "baseline"
    assert runner.main([*args, "--out", str(baseline), "--upsample", "bilinear"]) == 0
    record = json.loads((baseline / ids[0] / "run.json").read_text())
    assert record["run"]["options"]["upsample"] == "bilinear"
    assert (baseline / ids[0] / "embeddings.npy").is_file()
    assert record["run"]["options"] | {"upsample": "modulation"} == json.loads(
        (pred / ids[0] / "run.json").read_text())["run"]["options"]  # so a rerun of one never skips the other
    scores = tmp_path / "scores.json"
    assert evaluate.main(["--dataset", "coco-stuff-171", "--root", str(root), "--pred", str(pred), "--quiet",
                          "--json", str(scores)]) == 0
    assert json.loads(scores.read_text())["protocols"] == ["hungarian", "majority", "clusters", "concept"]


# The other presets' layouts (docs/evaluation.md): (image, label) of a stem under the root, the largest
# label id, whether the image's centre square is segmented, and the stem's output folder.
PRESET_LAYOUTS = {
    "ade20k": ("images/validation/{}.jpg", "annotations/validation/{}.png", 150, False, "{}"),
    "pascal-context-59": ("JPEGImages/{}.jpg", "SegmentationClassContext/{}.png", 59, False, "{}"),
    "pascal-context-459": ("images/validation/{}.jpg", "annotations_ctx459/validation/{}.tif", 458, False, "{}"),
    "cityscapes": ("leftImg8bit/val/frankfurt/{}_leftImg8bit.png", "gtFine/val/frankfurt/{}_gtFine_labelIds.png",
                   33, True, "{}_leftImg8bit"),
    "cityscapes-19": ("leftImg8bit/val/frankfurt/{}_leftImg8bit.png", "gtFine/val/frankfurt/{}_gtFine_labelIds.png",
                      33, False, "{}_leftImg8bit")}
STEMS = {"ade20k": ["ADE_val_00000001", "ADE_val_00000002"], "pascal-context-59": ["2008_000002", "2008_000003"],
         "cityscapes": ["frankfurt_000000_000294", "frankfurt_000001_000019"]}
STEMS["cityscapes-19"] = STEMS["cityscapes"]
STEMS["pascal-context-459"] = STEMS["pascal-context-59"]
SIZES = [(96, 64), (64, 80)]


def fake_preset(dataset, root):
    """Two images with label maps in the preset's layout (VOC2010's val.txt lists only the second)."""
    image, label, largest, _, _ = PRESET_LAYOUTS[dataset]
    for seed, (stem, size) in enumerate(zip(STEMS[dataset], SIZES)):
        for path in (root / image.format(stem), root / label.format(stem)):
            path.parent.mkdir(parents=True, exist_ok=True)
        save_image(root / image.format(stem), size, seed=seed)
        dtype = np.uint16 if largest > 255 else np.uint8  # PASCAL-Context-459's TIFFs are 16-bit
        ids = np.random.default_rng(seed).integers(0, largest + 1, size[::-1]).astype(dtype)
        Image.fromarray(ids).save(root / label.format(stem))
    if dataset == "pascal-context-59":
        (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
        (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text(f"{STEMS[dataset][1]}\n")
        return STEMS[dataset][1:], SIZES[1:]
    return STEMS[dataset], SIZES


@pytest.mark.parametrize("dataset", PRESET_LAYOUTS)
def test_the_other_presets_segment_their_images_from_their_layouts(tmp_path, tiny_sd_dir, sd, dataset):
    """emerdiff.py --dataset on a fake in the preset's layout: one output folder per image of the split (the
    centre square for cityscapes, the whole image for the others), its labels those segment() gives for
    the image as stored, and evaluate.py scores the folders."""
    root, pred = tmp_path / "data", tmp_path / "pred"
    stems, sizes = fake_preset(dataset, root)
    image, _, _, crop, folder = PRESET_LAYOUTS[dataset]
    assert runner.main(["--dataset", dataset, "--root", str(root), "--weights", str(tiny_sd_dir), "--out", str(pred),
                        *FAST]) == 0
    assert sorted(p.name for p in pred.iterdir() if p.is_dir()) == [folder.format(stem) for stem in stems]
    for stem, size in zip(stems, sizes):
        assert_complete(pred / folder.format(stem), (min(size),) * 2 if crop else size)
        expected = emerdiff.segment(as_stored(root / image.format(stem), crop), sd, **OPTIONS)
        assert np.array_equal(np.load(pred / folder.format(stem) / "labels.npy"), expected.labels)
    scores = tmp_path / "scores.json"
    assert evaluate.main(["--dataset", dataset, "--root", str(root), "--pred", str(pred), "--quiet",
                          "--json", str(scores)]) == 0
    assert json.loads(scores.read_text())["images"] == len(stems)
