"""evaluate.py beyond DiffSeg's counting: its 512x512 scoring against a plain loop, EmerDiff's
clusters and concept protocols against hand-computed confusion matrices, the per-image results, and
the readers of the paper's datasets on fakes in the layouts their distributions unpack to."""
import json

import numpy as np
import pytest
from PIL import Image

import evaluate
from datasets import PRESETS, EvaluationError, dataset_samples
from evaluate import ImageResult, confusion, evaluate_pairs, main
from test_evaluate import (COCO_IDS, IGNORE, coarse_of, coco_fine_labels, crop_array, make_coco, make_folder,
                           permuted, save_image, save_labels)


# ---- DiffSeg's scoring at 512x512 ----

def loop_nearest(ids, side=512):
    """Nearest neighbour with half-pixel centres, pixel by pixel: output i takes input floor((i + 0.5) * in / out)."""
    h, w = ids.shape
    out = np.zeros((side, side), dtype=ids.dtype)
    for i in range(side):
        for j in range(side):
            out[i, j] = ids[(2 * i + 1) * h // (2 * side), (2 * j + 1) * w // (2 * side)]
    return out


@pytest.mark.parametrize("shape", [(30, 30), (37, 53), (640, 600)])
def test_the_512_resize_is_nearest_with_half_pixel_centres(shape):
    ids = np.random.default_rng(0).integers(0, 256, shape)
    assert np.array_equal(evaluate.nearest(ids, 512, 512), loop_nearest(ids))


def noisy(ids, seed):
    """A prediction that is not perfect: the permuted truth with a tenth of its pixels changed."""
    rng = np.random.default_rng(seed)
    pred = permuted(ids, seed)
    flip = rng.random(ids.shape) < 0.1
    return np.where(flip, rng.integers(0, 20, ids.shape), pred)


def test_coco_scored_at_512_by_default_and_natively_on_request(tmp_path):
    root, pred = make_coco(tmp_path / "coco"), tmp_path / "pred"
    truths, predictions = {}, {}
    for seed, (name, (w, h)) in enumerate(COCO_IDS.items()):  # labels at the crop's size, as the runner writes
        truths[name] = coarse_of(crop_array(coco_fine_labels(w, h, seed)))
        predictions[name] = noisy(truths[name], seed)
        save_labels(pred / name / "labels.png", predictions[name], mode="P")
    args = ["--dataset", "coco-stuff-27", "--root", str(root), "--pred", str(pred), "--quiet", "--json"]
    assert main([*args, str(tmp_path / "512.json")]) == 0
    assert main([*args, str(tmp_path / "native.json"), "--resolution", "native"]) == 0
    at_512, native = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("512", "native"))
    assert at_512["resolution"] == "512x512" and native["resolution"] == "native"
    names = sorted(COCO_IDS)
    expected_512 = evaluate_pairs([(loop_nearest(truths[n]), loop_nearest(predictions[n])) for n in names], 27)
    expected_native = evaluate_pairs([(truths[n], predictions[n]) for n in names], 27)
    for protocol in ("hungarian", "majority"):
        assert at_512[protocol]["miou"] == pytest.approx(expected_512[protocol]["miou"])
        assert at_512[protocol]["accuracy"] == pytest.approx(expected_512[protocol]["accuracy"])
        assert native[protocol]["miou"] == pytest.approx(expected_native[protocol]["miou"])
    assert at_512["hungarian"]["miou"] != pytest.approx(native["hungarian"]["miou"])  # the images weigh otherwise


# ---- EmerDiff's protocols, by hand ----
# Two images of 4 pixels, 2 classes, 2 segments each, 2-dimensional mask embeddings:
#   A: truth 0 0 0 1, segments 0 0 1 1, embeddings [1, 0], [0, 1]
#   B: truth 1 1 0 0, segments 0 0 1 1, embeddings [0, 1], [1, 0.2]
# concept: class 0's pixels carry [1,0] [1,0] [0,1] (A) and [1,0.2] twice (B): mean [0.8, 0.28]; class 1's
# carry [0,1] three times: [0, 1]. By cosine, A's segments take classes 0 and 1, B's 1 and 0. Confusion
# (truth x class) [[4, 1], [0, 3]]: TP 4, 3; FP 0, 1; FN 1, 0: IoU 4/5 and 3/4, accuracy 7/8.
# clusters: the embeddings fall in two clusters, {A0, B1} near [1, 0] and {A1, B0} near [0, 1]; confusion
# (truth x cluster) is the same matrix up to the clusters' order, which the matching undoes: the same scores.

HAND = [(np.array([[0, 0, 0, 1]]), np.array([[0, 0, 1, 1]]), np.array([[1, 0], [0, 1]], dtype=np.float32)),
        (np.array([[1, 1, 0, 0]]), np.array([[0, 0, 1, 1]]), np.array([[0, 1], [1, 0.2]], dtype=np.float32))]
HAND_IOU, HAND_ACCURACY = [4 / 5, 3 / 4], 7 / 8
HAND_SCORES = {"miou": (4 / 5 + 3 / 4) / 2, "accuracy": HAND_ACCURACY, "iou": HAND_IOU}


def assert_scores(actual, expected):
    """One protocol's scores against the expected ones, the per-class IoU list element by element
    (pytest.approx compares no nested lists inside a dictionary since pytest 9)."""
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value), key


def hand_results():
    return [ImageResult(str(i), confusion(gt, pred, 2), embeddings) for i, (gt, pred, embeddings) in enumerate(HAND)]


def test_concept_protocol_by_hand():
    scores = evaluate.scores(*evaluate.concept_counts(hand_results(), 2, None))
    assert scores["iou"] == pytest.approx(HAND_IOU) and scores["accuracy"] == pytest.approx(HAND_ACCURACY)


@pytest.mark.parametrize("seed", range(4))
def test_clusters_protocol_by_hand_whatever_the_clusters_are_called(seed):
    scores = evaluate.scores(*evaluate.cluster_counts(hand_results(), 2, {"seed": seed, "restarts": 2}))
    assert scores["iou"] == pytest.approx(HAND_IOU) and scores["accuracy"] == pytest.approx(HAND_ACCURACY)


def test_clusters_pool_segments_before_the_one_matching():
    """Three segments, two classes: k-means (k = 2) pools segments 1 and 2, whose embeddings are close, and
    the pooled cluster is matched as one; the per-image hungarian protocol would match segment 1 alone."""
    gt, pred = np.array([[0, 0, 1, 1, 1, 0, 0]]), np.array([[0, 0, 1, 1, 1, 2, 2]])
    embeddings = np.array([[1, 0], [0, 1], [0.1, 1]], dtype=np.float32)
    scores = evaluate.scores(*evaluate.cluster_counts([ImageResult("a", confusion(gt, pred, 2), embeddings)], 2,
                                                      {"seed": 0, "restarts": 3}))
    # clusters (truth x cluster): {segment 0}: class 0 twice; {segments 1, 2}: class 1 three times, class 0
    # twice. Matched 0-0, 1-1 (overlap 5 against 2). TP 2, 3; FP 0, 2; FN 2, 0: IoU 2/4, 3/5; accuracy 5/7.
    assert scores["iou"] == pytest.approx([1 / 2, 3 / 5]) and scores["accuracy"] == pytest.approx(5 / 7)
    hungarian = evaluate_pairs([(gt, pred)], 2)["hungarian"]
    assert hungarian["iou"] == pytest.approx([2 / 4, 3 / 3])  # segment 2 unmatched: misses of class 0 only


@pytest.mark.filterwarnings("ignore:One of the clusters is empty")
@pytest.mark.parametrize("seed", range(3))
def test_the_clusters_kmeans_is_no_worse_than_scipys(seed):
    """evaluate.kmeans (numpy, for the clusters protocol) against scipy's kmeans2 with as many restarts."""
    from scipy.cluster.vq import kmeans2
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((400, 16)) + 3 * rng.standard_normal((12, 16))[rng.integers(0, 12, 400)]

    def inertia(labels):
        return sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels))
    ours = evaluate.kmeans(x, 12, seed=seed, restarts=5)
    best_scipy = min(inertia(kmeans2(x, 12, minit="++", seed=seed * 10 + s)[1]) for s in range(5))
    assert inertia(ours) <= best_scipy * (1 + 1e-3)
    assert np.array_equal(ours, evaluate.kmeans(x, 12, seed=seed, restarts=5))  # seeded: the same again


def save_embeddings(folder, embeddings):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "embeddings.npy", np.asarray(embeddings, dtype=np.float32))


def hand_folder(tmp_path):
    root, pred = tmp_path / "data", tmp_path / "pred"
    for name, (gt, segments, embeddings) in zip("ab", HAND):
        save_image(root / "images" / f"{name}.png", 4, 1)
        save_labels(root / "labels" / f"{name}.png", gt)
        save_labels(pred / name / "labels.png", segments, mode="P")
        save_embeddings(pred / name, embeddings)
    return ["--dataset", "folder", "--root", str(root), "--pred", str(pred), "--quiet"], pred


def test_all_four_protocols_and_the_per_image_results_in_one_run(tmp_path, capsys):
    args, _ = hand_folder(tmp_path)
    out = tmp_path / "scores.json"
    assert main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for protocol in ("clusters", "concept"):
        assert_scores(result[protocol], HAND_SCORES)
    for protocol, expected in evaluate_pairs([(gt, pred) for gt, pred, _ in HAND], 2).items():
        assert_scores(result[protocol], expected)
    for entry, (gt, pred, _) in zip(result["per_image"], HAND):
        alone = evaluate_pairs([(gt, pred)], 2)["hungarian"]
        assert entry == {"stem": entry["stem"], "miou": pytest.approx(alone["miou"]),
                         "accuracy": pytest.approx(alone["accuracy"])}
    assert [entry["stem"] for entry in result["per_image"]] == ["a", "b"]
    shown = capsys.readouterr().out
    assert "clusters   mIoU  77.50 %" in shown and "concept    mIoU  77.50 %" in shown


def test_embedding_protocols_without_embeddings(tmp_path, capsys):
    args, pred = hand_folder(tmp_path)
    (pred / "b" / "embeddings.npy").unlink()
    out = tmp_path / "scores.json"
    out.write_text("earlier")
    assert main([*args, "--json", str(out), "--protocols", "hungarian", "concept"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evaluate: error: --protocols concept: 1 of 2 prediction "
                                                   "folders lack embeddings.npy") and "--overwrite" in err
    assert out.read_text() == "earlier"
    assert main([*args, "--json", str(out)]) == 0  # by default the two that need none, said on stdout
    assert "clusters and concept left out: 1 of 2" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["protocols"] == ["hungarian", "majority"] and "concept" not in result and "clusters" not in result


@pytest.mark.parametrize("scale, dtype", [(1e30, np.float32), (1e-30, np.float32), (1e300, np.float64)])
def test_the_embedding_protocols_are_scale_free(tmp_path, scale, dtype):
    """Embeddings scaled as a whole give the scores of HAND, computed by hand: their squares, which
    overflow (or vanish in) their float type, never decide a length, nor does a cast to a narrower one."""
    args, pred = hand_folder(tmp_path)
    for name, (_, _, embeddings) in zip("ab", HAND):
        np.save(pred / name / "embeddings.npy", embeddings.astype(dtype) * dtype(scale))
    out = tmp_path / "scores.json"
    assert main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for protocol in ("clusters", "concept"):
        assert result[protocol]["iou"] == pytest.approx(HAND_IOU)
        assert result[protocol]["accuracy"] == pytest.approx(HAND_ACCURACY)


def test_segments_without_pixels_and_more_masks_than_classes(tmp_path):
    """K = 5 embeddings for 2 classes, of which labels.png uses only segments 0 and 1 (the others lost
    every pixel to the argmax): they count nowhere, and the scores are those of HAND."""
    args, pred = hand_folder(tmp_path)
    for name, (_, _, embeddings) in zip("ab", HAND):
        save_embeddings(pred / name, np.concatenate([embeddings, np.eye(3, 2, dtype=np.float32)]))
    out = tmp_path / "scores.json"
    assert main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for protocol in ("clusters", "concept"):
        assert_scores(result[protocol], HAND_SCORES)


def test_embeddings_from_another_run_are_refused(tmp_path, capsys):
    args, pred = hand_folder(tmp_path)
    save_embeddings(pred / "a", [[1, 0]])  # one row, but labels.png holds segments 0 and 1
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 embeddings for segment ids up to 1" in err


def npz_archive(path):
    np.savez(path.with_suffix(".npz"), np.eye(2, dtype=np.float32))
    path.with_suffix(".npz").rename(path)


def header_of_a_huge_array(path):
    """160 bytes: a .npy header claiming (10**12, 8) float32 (32 TB), then 32 bytes of data."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10 ** 12, 8)})
        f.write(bytes(160 - f.tell()))


@pytest.mark.parametrize("broken", [lambda path: path.write_bytes(b""), npz_archive, header_of_a_huge_array],
                         ids=["empty", "npz", "huge-header"])
def test_embeddings_that_are_no_npy_array_are_one_line(tmp_path, capsys, broken):
    args, pred = hand_folder(tmp_path)
    broken(pred / "a" / "embeddings.npy")
    assert (pred / "a" / "embeddings.npy").stat().st_size in (0, 160) or broken is npz_archive
    out = tmp_path / "scores.json"
    out.write_text("earlier")
    assert main([*args, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"evaluate: error: {pred / 'a' / 'embeddings.npy'}: "), err
    assert out.read_text() == "earlier"


@pytest.mark.parametrize("shape", [(2, 0), (5, 0)])
def test_embeddings_of_no_channel_are_one_line(tmp_path, capsys, shape):
    """(K, 0) arrays in every folder, as many rows as segments or more (so the widths agree): refused like
    the other malformed embeddings, the earlier --json kept (no protocol can compare embeddings of no
    channel: they ended in a ValueError of the clusters protocol)."""
    args, pred = hand_folder(tmp_path)
    for name in "ab":
        save_embeddings(pred / name, np.zeros(shape))
    out = tmp_path / "scores.json"
    out.write_text("earlier")
    assert main([*args, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"evaluate: error: {pred / 'a' / 'embeddings.npy'}: float32 of shape {shape}, not (segments, "
                   "channels) finite floats of at least one channel; write it as emerdiff.py does\n")
    assert out.read_text() == "earlier"


# ---- The paper's datasets, in their distributions' layouts ----

def test_ade20k_reader_and_its_150_classes(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    ids = np.array([[0, 1, 2], [150, 151, 255]])
    for name in ("ADE_val_00000002", "ADE_val_00000001"):
        save_image(root / "images" / "validation" / f"{name}.jpg", 3, 2)
        save_labels(root / "annotations" / "validation" / f"{name}.png", ids)
    save_image(root / "images" / "training" / "ADE_train_00000001.jpg", 3, 2)  # not read
    samples = dataset_samples("ade20k", root)
    assert [(s.stem, s.crop) for s in samples] == [("ADE_val_00000001", False), ("ADE_val_00000002", False)]
    assert samples[0].label == root / "annotations/validation/ADE_val_00000001.png"
    assert evaluate.ground_truth(samples[0], "ade20k").tolist() == [[IGNORE, 0, 1], [149, IGNORE, IGNORE]]
    names = PRESETS["ade20k"].classes
    assert len(names) == 150 and (names[0], names[12], names[149]) == ("wall", "person", "flag")


def test_ade20k_takes_image_suffixes_of_any_case(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for name, suffix in (("a", ".jpg"), ("b", ".JPG"), ("c", ".Jpg")):
        save_image(root / "images" / "validation" / f"{name}{suffix}", 3, 2)
        save_labels(root / "annotations" / "validation" / f"{name}.png", [[1, 2, 3], [4, 5, 6]])
    assert [s.image.name for s in dataset_samples("ade20k", root)] == ["a.jpg", "b.JPG", "c.Jpg"]


def test_label_values_a_preset_does_not_define_are_counted_and_said(tmp_path, capsys):
    """ADE20K defines 0..150 (and 255, ignored everywhere): 151 and 200 are counted nowhere, and said."""
    root, pred = tmp_path / "ADEChallengeData2016", tmp_path / "pred"
    for name, ids in (("a", [[0, 1, 2], [150, 151, 255]]), ("b", [[200, 200, 1], [1, 1, 1]])):
        save_image(root / "images" / "validation" / f"{name}.jpg", 3, 2)
        save_labels(root / "annotations" / "validation" / f"{name}.png", ids)
        save_labels(pred / name / "labels.png", np.zeros((2, 3)), mode="P")
    out = tmp_path / "scores.json"
    assert main(["--dataset", "ade20k", "--root", str(root), "--pred", str(pred), "--quiet", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["undefined_label_values"] == {"151": 1, "200": 2}
    assert ("3 pixels in 2 of 2 label maps hold values ade20k does not define (151, 200): counted "
            "nowhere") in capsys.readouterr().out


def test_pascal_context_val_list_naming_an_id_twice_says_so(tmp_path):
    root = tmp_path / "VOC2010"
    save_image(root / "JPEGImages" / "2008_000002.jpg", 4, 1)
    save_labels(root / "SegmentationClassContext" / "2008_000002.png", [[0, 1, 2, 3]])
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    split = root / "ImageSets" / "SegmentationContext" / "val.txt"
    split.write_text("2008_000002\n\n2008_000002\n")
    with pytest.raises(EvaluationError) as error:
        dataset_samples("pascal-context-59", root)
    assert str(error.value) == f"{split} line 3: 2008_000002 is listed twice (line 1 too): list each image once"


def test_pascal_context_reader_takes_the_val_list(tmp_path):
    root = tmp_path / "VOC2010"
    ids = np.array([[0, 1, 59, 60]])
    for name in ("2008_000002", "2008_000003"):
        save_image(root / "JPEGImages" / f"{name}.jpg", 4, 1)
        save_labels(root / "SegmentationClassContext" / f"{name}.png", ids)
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000003\n")
    samples = dataset_samples("pascal-context-59", root)
    assert [(s.stem, s.crop) for s in samples] == [("2008_000003", False)]
    assert evaluate.ground_truth(samples[0], "pascal-context-59").tolist() == [[IGNORE, 0, 58, IGNORE]]
    names = PRESETS["pascal-context-59"].classes
    assert len(names) == 59 and (names[0], names[58]) == ("aeroplane", "wood")


def test_coco_stuff_171_drops_the_11_unused_thing_ids(tmp_path):
    root = make_coco(tmp_path / "coco")
    samples = dataset_samples("coco-stuff-171", root)
    assert not any(s.crop for s in samples)  # whole images, unlike coco-stuff-27
    names = PRESETS["coco-stuff-171"].classes
    assert len(names) == 171
    # fine ids (stuffthingmaps values) by name, from COCO-Stuff's labels.txt: 0 person, 12 stop sign (id 13,
    # after the unused 12), 90 toothbrush is fine id 89, 91 banner (the first stuff class), 181 wood
    table = PRESETS["coco-stuff-171"].labels
    for fine, name in ((0, "person"), (12, "stop sign"), (89, "toothbrush"), (91, "banner"), (181, "wood")):
        assert names[table[fine]] == name
    assert [table[fine] for fine in (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90, 255)] == [IGNORE] * 12
    w, h = COCO_IDS[samples[0].stem]
    fine = coco_fine_labels(w, h, 0)  # the whole map, not its centre
    assert np.array_equal(evaluate.ground_truth(samples[0], "coco-stuff-171"), table[fine])


def test_cityscapes_19_maps_label_ids_to_train_ids(tmp_path):
    from test_evaluate import make_cityscapes
    root = make_cityscapes(tmp_path / "cityscapes")
    samples = dataset_samples("cityscapes-19", root)
    assert not any(s.crop for s in samples)
    table, names = PRESETS["cityscapes-19"].labels, PRESETS["cityscapes-19"].classes
    # Cityscapes' labels.py: label id -> trainId; 9 (parking) and 0 (unlabeled) are ignored
    for label_id, train_id, name in ((7, 0, "road"), (8, 1, "sidewalk"), (11, 2, "building"), (23, 10, "sky"),
                                     (26, 13, "car"), (31, 16, "train"), (33, 18, "bicycle")):
        assert table[label_id] == train_id and names[train_id] == name
    assert table[9] == table[0] == table[34] == IGNORE and len(names) == 19
    ids = np.asarray(Image.open(samples[0].label))
    assert np.array_equal(evaluate.ground_truth(samples[0], "cityscapes-19"), table[ids])


def test_a_folder_dataset_keeps_native_scoring(tmp_path):
    root, labels = make_folder(tmp_path / "data")
    pred = tmp_path / "pred"
    for name, ids in labels.items():
        save_labels(pred / name / "labels.png", ids, mode="P")
    out = tmp_path / "scores.json"
    assert main(["--dataset", "folder", "--root", str(root), "--pred", str(pred), "--quiet", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["resolution"] == "native"
