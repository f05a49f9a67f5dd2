"""evaluate.py: the metrics against hand-computed confusion matrices and plain loops, the dataset readers on
tiny fakes in the real layouts, the command line end to end, and every bad input."""
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy.optimize import linear_sum_assignment

from conftest import ROOT
from datasets import COCO_CLASSES, CITYSCAPES_CLASSES, Sample, center_crop, dataset_samples
from evaluate import evaluate_pairs, ground_truth, main

IGNORE = 255


def pixels_of(hist, ignored=()):
    """A (1, N) ground truth and prediction whose confusion matrix is `hist` (rows: classes, columns: segments),
    plus ignored pixels: (segment, count) pairs labelled 255."""
    gt, pred = [], []
    for c, row in enumerate(hist):
        for s, count in enumerate(row):
            gt += [c] * count
            pred += [s] * count
    for s, count in ignored:
        gt += [IGNORE] * count
        pred += [s] * count
    return np.array([gt]), np.array([pred])


def check(result, iou, accuracy):
    assert result["iou"] == pytest.approx(iou, nan_ok=True)
    assert result["miou"] == pytest.approx(np.nanmean(iou))
    assert result["accuracy"] == pytest.approx(accuracy)


# ---- Metrics against hand-computed confusion matrices ----

MORE_SEGMENTS = [[5, 1, 0, 2],  # class 0 is split over segments 0 and 3
                 [0, 4, 0, 0],
                 [1, 0, 3, 0]]


def test_more_segments_than_classes():
    r = evaluate_pairs([pixels_of(MORE_SEGMENTS)], 3)
    # hungarian: 0-0, 1-1, 2-2; segment 3's 2 pixels are misses of class 0, no false positives
    # TP 5, 4, 3; FP 1 (s0 holds a class-2 pixel), 1 (s1 holds a class-0 pixel), 0; FN 3, 0, 1
    check(r["hungarian"], [5 / 9, 4 / 5, 3 / 4], 12 / 16)
    # majority: s0, s3 -> 0; s1 -> 1; s2 -> 2; TP 7, 4, 3; FP 1, 1, 0; FN 1, 0, 1
    check(r["majority"], [7 / 9, 4 / 5, 3 / 4], 14 / 16)


def test_fewer_segments_than_classes():
    hist = [[6, 0],
            [2, 0],  # class 1 shares segment 0 with class 0 and is left with an empty padded column
            [0, 4]]
    r = evaluate_pairs([pixels_of(hist)], 3)
    check(r["hungarian"], [6 / 8, 0, 1], 10 / 12)  # TP 6, 0, 4; FP 2, 0, 0; FN 0, 2, 0
    check(r["majority"], [6 / 8, 0, 1], 10 / 12)


def test_ignored_pixels_count_nowhere():
    with_ignored = pixels_of(MORE_SEGMENTS, ignored=[(0, 7), (3, 5), (9, 4)])  # segment 9 only on ignored pixels
    r = evaluate_pairs([with_ignored], 3)
    check(r["hungarian"], [5 / 9, 4 / 5, 3 / 4], 12 / 16)
    check(r["majority"], [7 / 9, 4 / 5, 3 / 4], 14 / 16)


def test_a_class_absent_from_an_image():
    first = [[4, 1], [0, 3], [0, 0]]  # no class 2: it takes the empty padded column (no TP, FP or FN)
    second = [[0, 0], [5, 0], [1, 2]]  # no class 0
    r = evaluate_pairs([pixels_of(first), pixels_of(second)], 3)
    # TP 4+0, 3+5, 0+2; FP 0, 1+1, 0; FN 1, 0, 0+1
    check(r["hungarian"], [4 / 5, 8 / 10, 2 / 3], 14 / 16)
    check(r["majority"], [4 / 5, 8 / 10, 2 / 3], 14 / 16)


def test_a_class_absent_from_an_image_takes_a_leftover_segment():
    # DiffSeg's matching assigns every class a column: with no padding left, the absent class 1 takes
    # segment 1, whose 2 pixels become its false positives (IoU 0), while majority merges them into class 0.
    r = evaluate_pairs([pixels_of([[3, 2], [0, 0]])], 2)
    check(r["hungarian"], [3 / 5, 0], 3 / 5)
    check(r["majority"], [1, np.nan], 1)


def test_a_class_absent_from_the_whole_dataset_is_nan_and_left_out_of_the_mean():
    r = evaluate_pairs([pixels_of([[4, 1], [0, 3], [0, 0]])], 3)
    for protocol in ("hungarian", "majority"):
        check(r[protocol], [4 / 5, 3 / 4, np.nan], 7 / 8)
        assert r[protocol]["miou"] == pytest.approx((4 / 5 + 3 / 4) / 2)


def test_a_permuted_perfect_prediction_scores_one():
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(4):
        gt = rng.integers(0, 5, (12, 10))
        gt[rng.random(gt.shape) < 0.2] = IGNORE
        segment_of = rng.permutation(9)[:5]  # class -> segment id, another permutation per image
        pred = np.where(gt == IGNORE, rng.integers(0, 9, gt.shape), segment_of[np.minimum(gt, 4)])
        pairs.append((gt, pred))
    r = evaluate_pairs(pairs, 5)
    for protocol in ("hungarian", "majority"):
        assert r[protocol]["miou"] == 1.0 and r[protocol]["accuracy"] == 1.0
        assert r[protocol]["iou"] == [1.0] * 5


# ---- Our hungarian and majority against plain loops ----

def loop_confusion(gt, pred, n_class, ignore=IGNORE):
    columns = max(n_class, int(pred.max()) + 1)
    hist = [[0] * columns for _ in range(n_class)]
    for g, p in zip(gt.ravel().tolist(), pred.ravel().tolist()):
        if g != ignore:
            hist[g][p] += 1
    return hist


def loop_scores(tp, fp, fn):
    iou = [t / (t + p + n) if t + p + n else float("nan") for t, p, n in zip(tp, fp, fn)]
    return iou, sum(tp) / (sum(tp) + sum(fn))


def loop_hungarian(pairs, n_class, assign):
    """DiffSeg's protocol with plain loops; `assign(hist)` gives each class its column."""
    tp, fp, fn = [0] * n_class, [0] * n_class, [0] * n_class
    for gt, pred in pairs:
        hist = loop_confusion(gt, pred, n_class)
        for c, s in enumerate(assign(hist)):
            column = sum(hist[k][s] for k in range(n_class))
            tp[c] += hist[c][s]
            fn[c] += sum(hist[c]) - hist[c][s]
            fp[c] += column - hist[c][s]
    return loop_scores(tp, fp, fn)


def loop_majority(pairs, n_class):
    merged = [[0] * n_class for _ in range(n_class)]
    for gt, pred in pairs:
        hist = loop_confusion(gt, pred, n_class)
        for s in range(len(hist[0])):
            best = 0
            for c in range(n_class):
                if hist[c][s] > hist[best][s]:
                    best = c
            for c in range(n_class):
                merged[c][best] += hist[c][s]
    tp = [merged[c][c] for c in range(n_class)]
    fp = [sum(merged[k][c] for k in range(n_class)) - tp[c] for c in range(n_class)]
    fn = [sum(merged[c]) - tp[c] for c in range(n_class)]
    return loop_scores(tp, fp, fn)


def scipy_assignment(hist):
    return linear_sum_assignment(np.array(hist), maximize=True)[1]


def best_permutations(hist):
    """Every column assignment (one column per class) of the largest total overlap, by brute force."""
    n_class, columns = len(hist), len(hist[0])
    totals = {p: sum(hist[c][p[c]] for c in range(n_class)) for p in itertools.permutations(range(columns), n_class)}
    best = max(totals.values())
    return [p for p, total in totals.items() if total == best]


def random_pairs(rng, count, n_class, segments, shape=(9, 11)):
    """Noisy segmentations: some classes absent, ignored pixels, segment ids with gaps."""
    pairs = []
    for _ in range(count):
        present = rng.choice(n_class, size=rng.integers(1, n_class + 1), replace=False)
        gt = rng.choice(present, size=shape)
        gt[rng.random(shape) < 0.1] = IGNORE
        pred = rng.choice(rng.choice(segments * 2, size=rng.integers(1, segments + 1), replace=False), size=shape)
        pairs.append((gt, pred))
    return pairs


@pytest.mark.parametrize("n_class, segments", [(3, 2), (4, 4), (5, 9), (27, 25)])
def test_hungarian_and_majority_match_plain_loops(n_class, segments):
    pairs = random_pairs(np.random.default_rng(n_class), 12, n_class, segments)
    r = evaluate_pairs(pairs, n_class)
    iou, accuracy = loop_hungarian(pairs, n_class, scipy_assignment)
    assert r["hungarian"]["iou"] == pytest.approx(iou, nan_ok=True)
    assert r["hungarian"]["accuracy"] == pytest.approx(accuracy)
    iou, accuracy = loop_majority(pairs, n_class)
    assert r["majority"]["iou"] == pytest.approx(iou, nan_ok=True)
    assert r["majority"]["accuracy"] == pytest.approx(accuracy)


def test_hungarian_matches_brute_force_over_permutations():
    rng = np.random.default_rng(7)
    pairs = []
    while len(pairs) < 20:  # images whose best matching is unique, so that any solver must find this one
        gt = rng.integers(0, 3, (8, 8))
        pred = rng.integers(0, rng.integers(2, 6), (8, 8))
        best = best_permutations(loop_confusion(gt, pred, 3))
        if len(best) == 1:
            pairs.append((gt, pred))
    iou, accuracy = loop_hungarian(pairs, 3, lambda hist: best_permutations(hist)[0])
    r = evaluate_pairs(pairs, 3)["hungarian"]
    assert r["iou"] == pytest.approx(iou) and r["accuracy"] == pytest.approx(accuracy)


# ---- Readers on tiny fake datasets in the real layouts ----

def save_image(path, width, height, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def save_labels(path, ids, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(np.asarray(ids, dtype=np.uint8), mode=mode)
    if mode == "P":  # as emerdiff.py writes labels.png
        picture.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, i)])
    picture.save(path)


# COCO-Stuff fine ids (stuffthingmaps value = COCO-Stuff id - 1) and their coarse parent, by name
# (COCO-Stuff's labels.txt and label hierarchy): person, car, giraffe, grass, road, sky-other, wall-brick, wood
COCO_KNOWN = {0: "person", 2: "vehicle", 24: "animal", 123: "plant", 148: "ground", 156: "sky", 170: "wall",
              181: "solid"}
COCO_IDS = {  # name: (width, height)
    "000000000139": (40, 30), "000000000285": (30, 40), "000000000632": (32, 32)}


def coco_fine_labels(width, height, seed):
    ids = np.array(list(COCO_KNOWN) + [IGNORE])
    return np.random.default_rng(seed).choice(ids, size=(height, width))


def make_coco(root, images="val2017", labels="stuffthingmaps_trainval2017/val2017"):
    for seed, (name, (w, h)) in enumerate(COCO_IDS.items()):
        save_image(root / images / f"{name}.jpg", w, h, seed)
        save_labels(root / labels / f"{name}.png", coco_fine_labels(w, h, seed))
    (root / "Coco164kFull_Stuff_Coarse_7.txt").write_text("000000000139\n000000000632\n")  # DiffSeg's format
    return root


def coarse_of(fine):
    """The coarse class ids the test expects, from names: independent of evaluate's table."""
    return np.vectorize(lambda f: COCO_CLASSES.index(COCO_KNOWN[f]) if f in COCO_KNOWN else IGNORE)(fine)


def crop_array(a):
    """The centred square, by slicing."""
    h, w = a.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return a[top:top + side, left:left + side]


def test_coco_reader_the_list_and_the_coarse_mapping(tmp_path):
    root = make_coco(tmp_path / "coco")
    samples = dataset_samples("coco-stuff-27", root)
    assert [s.stem for s in samples] == sorted(COCO_IDS)
    assert samples[0] == Sample("000000000139", root / "val2017" / "000000000139.jpg",
                                root / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", True)
    listed = dataset_samples("coco-stuff-27", root, root / "Coco164kFull_Stuff_Coarse_7.txt")
    assert [s.stem for s in listed] == ["000000000139", "000000000632"]
    for seed, sample in enumerate(samples):
        w, h = COCO_IDS[sample.stem]
        expected = coarse_of(crop_array(coco_fine_labels(w, h, seed)))
        assert np.array_equal(ground_truth(sample, "coco-stuff-27"), expected)
    assert len(COCO_CLASSES) == 27


def test_coco_reader_takes_the_coco_stuff_repository_layout_too(tmp_path):
    root = make_coco(tmp_path / "cocostuff", images="images/val2017", labels="annotations/val2017")
    samples = dataset_samples("coco-stuff-27", root)
    assert samples[1].image == root / "images" / "val2017" / "000000000285.jpg"
    assert samples[1].label == root / "annotations" / "val2017" / "000000000285.png"


CITYSCAPES = {"frankfurt_000000_000294": (48, 24), "munster_000012_000019": (40, 20)}


def make_cityscapes(root):
    for seed, (name, (w, h)) in enumerate(CITYSCAPES.items()):
        city = name.split("_")[0]
        save_image(root / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png", w, h, seed)
        ids = np.random.default_rng(seed).integers(0, 36, (h, w))
        save_labels(root / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png", ids)
        save_labels(root / "gtFine" / "val" / city / f"{name}_gtFine_instanceIds.png", ids)  # not a label map
    return root


def test_cityscapes_reader_and_the_id_range(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    samples = dataset_samples("cityscapes", root)
    assert [s.stem for s in samples] == ["frankfurt_000000_000294_leftImg8bit", "munster_000012_000019_leftImg8bit"]
    assert samples[1].label == root / "gtFine/val/munster/munster_000012_000019_gtFine_labelIds.png"
    assert all(s.crop for s in samples)
    for seed, sample in enumerate(samples):
        ids = crop_array(np.asarray(Image.open(sample.label)))
        gt = ground_truth(sample, "cityscapes")
        assert gt.shape == ((20, 20) if seed else (24, 24))
        assert (gt[ids < 7] == IGNORE).all() and (gt[ids > 33] == IGNORE).all()
        assert np.array_equal(gt[(ids >= 7) & (ids <= 33)], ids[(ids >= 7) & (ids <= 33)] - 7)
    # label ids (Cityscapes' labels.py): 7 road, 23 sky, 24 person, 26 car, 33 bicycle
    assert [CITYSCAPES_CLASSES[i - 7] for i in (7, 23, 24, 26, 33)] == ["road", "sky", "person", "car", "bicycle"]


def make_folder(root, labels=None):
    labels = labels or {"a": np.array([[0, 1, 1], [3, 255, 0]]), "b": np.array([[3, 3, 0], [1, 1, 1]])}
    for name, ids in labels.items():
        save_image(root / "images" / (f"{name}.jpg" if name == "a" else f"{name}.png"), ids.shape[1], ids.shape[0])
        save_labels(root / "labels" / f"{name}.png", ids)
    (root / "images" / "notes.txt").write_text("not an image")
    return root, labels


def test_folder_reader_keeps_the_whole_image(tmp_path):
    root, labels = make_folder(tmp_path / "data")
    samples = dataset_samples("folder", root)
    assert samples == [Sample("a", root / "images/a.jpg", root / "labels/a.png", False),
                       Sample("b", root / "images/b.png", root / "labels/b.png", False)]
    assert np.array_equal(ground_truth(samples[0], "folder"), labels["a"])


def test_one_center_crop_for_images_and_label_maps():
    rgb = np.random.default_rng(0).integers(0, 256, (4, 7, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(center_crop(Image.fromarray(rgb))), rgb[:, 1:5])
    ids = np.arange(40, dtype=np.uint8).reshape(8, 5)
    for mode in ("L", "P"):
        cropped = center_crop(Image.fromarray(ids, mode=mode))
        assert cropped.mode == mode and np.array_equal(np.asarray(cropped), ids[1:6])
    assert np.array_equal(crop_array(ids), ids[1:6])


# ---- The command line end to end ----

def permuted(ids, seed):
    """A perfect prediction under other segment names: class c -> segment perm[c], ignored -> any."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(256)
    return np.where(ids == IGNORE, rng.integers(0, 256, ids.shape), perm[np.minimum(ids, 255)])


def test_the_script_on_a_folder_dataset(tmp_path):
    labels = {"a": np.array([[0, 1, 1, 3], [3, 255, 0, 0], [1, 1, 0, 0]]),
              "b": np.array([[3, 3, 0, 1], [1, 1, 1, 255], [0, 0, 0, 0]]), "c": np.zeros((3, 4), dtype=int)}
    root, _ = make_folder(tmp_path / "data", labels)
    pred = tmp_path / "pred"
    save_labels(pred / "a" / "labels.png", permuted(labels["a"], 1), mode="P")
    doubled = permuted(labels["b"], 2).repeat(2, 0).repeat(2, 1)  # twice the size: resized back, nearest
    save_labels(pred / "b" / "labels.png", doubled, mode="P")  # c has no prediction
    out = tmp_path / "out.json"
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--dataset", "folder", "--root", str(root),
                             "--pred", str(pred), "--json", str(out), "--allow-missing"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{pred / 'c' / 'labels.png'}: missing" in result.stderr
    summary = json.loads(out.read_text())
    assert summary["dataset"] == "folder" and summary["images"] == 2 and summary["missing"] == 1
    assert summary["class_names"] == ["0", "1", "2", "3"]
    for protocol in ("hungarian", "majority"):  # class 2 is in no label: null, left out of the mean
        assert summary[protocol] == {"miou": 1.0, "accuracy": 1.0, "iou": [1.0, 1.0, None, 1.0]}
    assert summary["options"] == {"root": str(root), "pred": str(pred), "list": None, "classes": 4, "limit": None,
                                  "allow_missing": True}
    assert "hungarian  mIoU 100.00 %" in result.stdout and "majority   mIoU 100.00 %" in result.stdout
    assert "options: root=" in result.stdout and "classes=4" in result.stdout
    assert not list(tmp_path.glob(".*tmp"))


def test_the_coco_preset_end_to_end_with_the_crop_and_the_list(tmp_path, capsys):
    root = make_coco(tmp_path / "coco")
    pred = tmp_path / "pred"
    for seed, (name, (w, h)) in enumerate(COCO_IDS.items()):  # what the runner writes: labels at the crop's size
        save_labels(pred / name / "labels.png", permuted(coarse_of(crop_array(coco_fine_labels(w, h, seed))), seed),
                    mode="P")
    out = tmp_path / "coco.json"
    assert main(["--dataset", "coco-stuff-27", "--root", str(root), "--pred", str(pred), "--quiet",
                 "--list", str(root / "Coco164kFull_Stuff_Coarse_7.txt"), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["images"] == 2 and summary["missing"] == 0 and summary["options"]["classes"] == 27
    assert summary["class_names"][9] == "person" and summary["class_names"][23] == "sky"
    present = sorted(COCO_CLASSES.index(name) for name in COCO_KNOWN.values())
    for protocol in ("hungarian", "majority"):
        assert summary[protocol]["miou"] == 1.0 and summary[protocol]["accuracy"] == 1.0
        assert [c for c, iou in enumerate(summary[protocol]["iou"]) if iou is not None] == present
    assert "no --list" not in capsys.readouterr().out
    assert main(["--dataset", "coco-stuff-27", "--root", str(root), "--pred", str(pred), "--quiet",
                 "--limit", "1"]) == 0
    shown = capsys.readouterr().out
    assert "no --list: all 3 val2017 images" in shown and "1 images evaluated" in shown and "limit=1" in shown


def test_the_cityscapes_preset_end_to_end(tmp_path, capsys):
    root = make_cityscapes(tmp_path / "cityscapes")
    pred = tmp_path / "pred"
    for seed, sample in enumerate(dataset_samples("cityscapes", root)):
        ids = crop_array(np.asarray(Image.open(sample.label))).astype(int)
        classes = np.where((ids >= 7) & (ids <= 33), ids - 7, IGNORE)
        save_labels(pred / sample.stem / "labels.png", permuted(classes, seed), mode="P")
    assert main(["--dataset", "cityscapes", "--root", str(root), "--pred", str(pred), "--quiet"]) == 0
    shown = capsys.readouterr().out
    assert "hungarian  mIoU 100.00 %   pixel accuracy 100.00 %" in shown and " 19 car " in shown


def test_evaluate_imports_no_torch():
    code = "import sys, evaluate; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# ---- Bad inputs: one line on stderr, exit status 2, nothing written ----

def expect_error(capsys, pattern, *args):
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate: error: ") and pattern in err and err.count("\n") == 1, err


@pytest.fixture
def folder(tmp_path):
    """A folder dataset with perfect predictions; tests break one thing each."""
    root, labels = make_folder(tmp_path / "data")
    pred = tmp_path / "pred"
    for name, ids in labels.items():
        save_labels(pred / name / "labels.png", ids, mode="P")
    return ["--dataset", "folder", "--root", str(root), "--pred", str(pred)], root, pred


def test_wrong_root_layouts_name_the_missing_folder(capsys, tmp_path):
    coco = make_coco(tmp_path / "coco")
    for png in (coco / "stuffthingmaps_trainval2017" / "val2017").iterdir():
        png.unlink()
    (coco / "stuffthingmaps_trainval2017" / "val2017").rmdir()
    pred = str(tmp_path)
    expect_error(capsys, f"{coco}/stuffthingmaps_trainval2017/val2017: no such folder; unzip "
                 f"stuffthingmaps_trainval2017.zip -d {coco}/stuffthingmaps_trainval2017",
                 "--dataset", "coco-stuff-27", "--root", str(coco), "--pred", pred)
    expect_error(capsys, f"{tmp_path}/val2017: no such folder", "--dataset", "coco-stuff-27", "--root",
                 str(tmp_path), "--pred", pred)
    expect_error(capsys, f"{tmp_path}/leftImg8bit/val: no such folder", "--dataset", "cityscapes", "--root",
                 str(tmp_path), "--pred", pred)
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    expect_error(capsys, f"{tmp_path}/gtFine/val: no such folder", "--dataset", "cityscapes", "--root",
                 str(tmp_path), "--pred", pred)
    expect_error(capsys, f"{tmp_path}/images: no such folder", "--dataset", "folder", "--root", str(tmp_path),
                 "--pred", pred)
    expect_error(capsys, "--root nowhere: no such folder", "--dataset", "folder", "--root", "nowhere", "--pred", pred)


def test_a_label_of_another_size_than_its_image(capsys, folder):
    args, root, _ = folder
    save_labels(root / "labels" / "b.png", np.zeros((2, 4)))
    expect_error(capsys, "b.png is 4x2 but its image", *args)


def test_a_label_missing_or_not_8_bit(capsys, folder):
    args, root, _ = folder
    Image.new("RGB", (3, 2)).save(root / "labels" / "b.png")
    expect_error(capsys, "b.png: mode RGB, not 8-bit class ids", *args)
    (root / "labels" / "b.png").unlink()
    expect_error(capsys, "labels/b.png: missing, the label of", *args)


def test_a_prediction_with_more_than_256_segments(capsys, folder):
    args, _, pred = folder
    Image.fromarray(np.array([[0, 300, 1], [2, 2, 2]], dtype=np.uint16)).save(pred / "a" / "labels.png")
    expect_error(capsys, "a/labels.png: segment ids 0..300: at most 256 segments", *args)


def test_a_prediction_that_is_no_readable_single_channel_png(capsys, folder):
    args, _, pred = folder
    (pred / "a" / "labels.png").write_bytes(b"not a png")
    expect_error(capsys, "a/labels.png: not a readable PNG", *args)
    Image.new("RGB", (3, 2)).save(pred / "a" / "labels.png")
    expect_error(capsys, "a/labels.png: not a single-channel PNG of segment ids", *args)
    Image.new("L", (3, 2)).save(pred / "a" / "labels.png", format="JPEG")
    expect_error(capsys, "a/labels.png: not a single-channel PNG of segment ids (JPEG L)", *args)


def test_a_prediction_of_another_aspect_ratio(capsys, folder):
    args, _, pred = folder
    save_labels(pred / "a" / "labels.png", np.zeros((2, 2)))
    expect_error(capsys, "a/labels.png is 2x2, the ground truth 3x2: another aspect ratio", *args)


def test_an_empty_dataset(capsys, tmp_path, folder):
    args, root, _ = folder
    for f in (root / "images").iterdir():
        f.unlink()
    expect_error(capsys, "no images (an empty dataset)", *args)
    make_folder(root)
    (tmp_path / "empty.txt").write_text("\n")
    expect_error(capsys, "no images (an empty dataset)", *args, "--list", str(tmp_path / "empty.txt"))


def test_a_list_naming_an_unknown_image(capsys, tmp_path, folder):
    args, _, _ = folder
    (tmp_path / "list.txt").write_text("a\nzz\n")
    expect_error(capsys, "list.txt line 2: zz is not an image of the dataset", *args, "--list",
                 str(tmp_path / "list.txt"))
    expect_error(capsys, "nope.txt: cannot read it", *args, "--list", str(tmp_path / "nope.txt"))


def test_bad_options(capsys, folder):
    args, _, _ = folder
    expect_error(capsys, "a.png: class id 3 with --classes 2; raise --classes", *args, "--classes", "2")
    expect_error(capsys, "--classes 300: give 1..255", *args, "--classes", "300")
    expect_error(capsys, "--limit 0: give a positive number", *args, "--limit", "0")
    expect_error(capsys, "--kmeans-restarts 1000000000: give 1..1000", *args, "--kmeans-restarts", "1000000000")
    expect_error(capsys, "--json nowhere/out.json: its folder does not exist", *args, "--json", "nowhere/out.json")
    expect_error(capsys, "--pred nowhere: no such folder", *args[:4], "--pred", "nowhere")


@pytest.mark.parametrize("args, pattern", [
    (["--resolution", "256"], "argument --resolution: invalid choice: '256'"),
    (["--limit", "ten"], "argument --limit: invalid int value: 'ten'"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
], ids=["choice", "int", "unknown"])
def test_option_errors_are_one_line_too(capsys, folder, args, pattern):
    with pytest.raises(SystemExit) as exit:
        main([*folder[0], *args])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and err.startswith("evaluate: error: ") and pattern in err, err


def test_classes_of_a_preset_are_fixed(capsys, tmp_path):
    root = make_coco(tmp_path / "coco")
    expect_error(capsys, "--classes: coco-stuff-27 has 27 classes; drop --classes", "--dataset", "coco-stuff-27",
                 "--root", str(root), "--pred", str(tmp_path), "--classes", "20")


def test_missing_predictions_are_listed_and_stop_the_run_unless_allowed(capsys, tmp_path, folder):
    args, root, pred = folder
    out = tmp_path / "out.json"
    out.write_text("the previous result")
    (pred / "b" / "labels.png").unlink()
    save_image(root / "images" / "x\ny\x1b.png", 3, 2)  # control characters in a name are shown escaped
    save_labels(root / "labels" / "x\ny\x1b.png", np.zeros((2, 3)))
    assert main([*args, "--json", str(out), "--quiet"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("evaluate: error: ") for line in lines)
    assert f"{pred}/b/labels.png: missing, the prediction of {root}/images/b.png" in lines[0]
    assert "x_y_/labels.png: missing, the prediction of" in lines[1]  # the folder: files.folder_name
    assert "x\\ny\\x1b.png" in lines[1]
    assert "2 of 3 predictions missing (listed above): segment those images, or pass --allow-missing" in lines[2]
    assert out.read_text() == "the previous result"  # a failed run writes nothing
    assert main([*args, "--json", str(out), "--quiet", "--allow-missing"]) == 0
    assert json.loads(out.read_text())["missing"] == 2
    for name in ("a", "b", "x\ny\x1b"):
        (pred / name / "labels.png").unlink(missing_ok=True)
    assert main([*args, "--quiet", "--allow-missing"]) == 2
    assert "none of the 3 predictions exists" in capsys.readouterr().err.splitlines()[-1]
