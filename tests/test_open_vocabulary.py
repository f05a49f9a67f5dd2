"""evaluate.py's open-vocabulary protocols (EmerDiff's Table 3) against confusion matrices counted pixel by
pixel in plain loops, on prediction folders made here as emerdiff.py --classes leaves them
(notes/contract-34.md: labels.png, classes.json, maskclip.png); the PASCAL-Context-459 reader on a fake
in ODISE's layout (16-bit TIFF label maps); and every malformed input, refused in one line."""
import json
import math
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import evaluate
from datasets import PASCAL_CONTEXT_CLASSES, PRESETS, dataset_samples
from evaluate import main
from page import class_colours
from test_evaluate import expect_error, loop_confusion, loop_scores, make_folder, save_image, save_labels
from test_protocols import loop_nearest

PC459 = PRESETS["pascal-context-459"].classes
UNLABELLED_16 = 65535


def save_named(folder, segments, maskclip, vocabulary, classes) -> dict:
    """A prediction folder as emerdiff.py --classes writes it: labels.png (segment ids), maskclip.png (16-bit
    class ids at labels.png's size) and classes.json, each segment named by the class most of its pixels got
    from MaskCLIP (ties: the lowest id), its votes counted here pixel by pixel. Returns {segment: class_id}."""
    segments, maskclip = np.asarray(segments), np.asarray(maskclip)
    save_labels(folder / "labels.png", segments, mode="P")
    Image.fromarray(maskclip.astype(np.uint16)).save(folder / "maskclip.png")
    votes = {}
    for segment, voted in zip(segments.ravel().tolist(), maskclip.ravel().tolist()):
        votes.setdefault(segment, Counter())[voted] += 1
    class_of = {segment: min(count, key=lambda c: (-count[c], c)) for segment, count in votes.items()}
    entries = [{"segment": s, "class": classes[class_of[s]], "class_id": class_of[s], "area": sum(votes[s].values()),
                "votes": {classes[c]: n for c, n in votes[s].items()}} for s in sorted(votes)]
    record = {"vocabulary": vocabulary, "classes": list(classes), "segments": entries,
              "maskclip": {"templates": 85, "key_smoothing": None, "prompt_denoising": None}}
    (folder / "classes.json").write_text(json.dumps(record))
    return class_of


def loop_class_scores(pairs, n_class, ignore):
    """Per-class IoU (nan where no pixel), mIoU and pixel accuracy of class predictions, from a confusion matrix
    counted pixel by pixel over every (truth, prediction) pair."""
    matrix = [[0] * n_class for _ in range(n_class)]
    for gt, pred in pairs:
        for row, counts in enumerate(loop_confusion(gt, pred, n_class, ignore)):
            for column in range(n_class):
                matrix[row][column] += counts[column]
    tp = [matrix[c][c] for c in range(n_class)]
    fp = [sum(matrix[k][c] for k in range(n_class)) - tp[c] for c in range(n_class)]
    fn = [sum(matrix[c]) - tp[c] for c in range(n_class)]
    iou, accuracy = loop_scores(tp, fp, fn)
    present = [x for x in iou if not math.isnan(x)]
    return iou, sum(present) / len(present), accuracy


def assert_protocol(result, expected):
    iou, miou, accuracy = expected
    assert result["iou"] == [None if math.isnan(x) else pytest.approx(x) for x in iou]
    assert result["miou"] == pytest.approx(miou) and result["accuracy"] == pytest.approx(accuracy)


def voted_by_loop(segments, class_of):
    return np.array([[class_of[s] for s in row] for row in np.asarray(segments).tolist()])


# ---- PASCAL-Context-459: ODISE's layout, 16-bit label maps ----

# Two val images: 16-bit label values (65535 unlabelled; 1000 is no class of the dataset), EmerDiff's segments and
# MaskCLIP's classes (ids above 255, and 255 itself, among them). The first image's predictions are written at
# twice its size, as a run at another resolution leaves them: scored at the label map's size (nearest).
PC459_IMAGES = {
    "2008_000002": ([[0, 458, 65535, 300], [256, 255, 1, 1000], [0, 0, 458, 458]],
                    [[0, 1, 1, 2], [0, 3, 3, 2], [0, 0, 2, 2]],
                    [[0, 458, 458, 300], [256, 255, 255, 300], [0, 7, 300, 458]]),
    "2008_000003": ([[65535, 7, 7], [300, 300, 0]],
                    [[0, 0, 0], [2, 2, 1]],
                    [[7, 1, 7], [300, 458, 0]])}


def make_pascal_context_459(root):
    """pascal_ctx_d2 as ODISE's scripts leave it: images/validation/<id>.jpg, annotations_ctx459/validation/<id>.tif
    (PIL's uint16 TIFF, as prepare_pascal_ctx_full_sem_seg.py saves it); a training image that is not read."""
    labels = root / "annotations_ctx459" / "validation"
    labels.mkdir(parents=True)
    for name, (truth, _, _) in PC459_IMAGES.items():
        save_image(root / "images" / "validation" / f"{name}.jpg", len(truth[0]), len(truth))
        Image.fromarray(np.array(truth, dtype=np.uint16)).save(labels / f"{name}.tif")
    save_image(root / "images" / "training" / "2008_000001.jpg", 3, 2)
    return root


def test_pascal_context_459_reads_16_bit_tiffs_in_odises_layout(tmp_path):
    root = make_pascal_context_459(tmp_path / "pascal_ctx_d2")
    samples = dataset_samples("pascal-context-459", root)
    assert [(s.stem, s.crop) for s in samples] == [("2008_000002", False), ("2008_000003", False)]
    assert samples[0].label == root / "annotations_ctx459" / "validation" / "2008_000002.tif"
    label = Image.open(samples[0].label)
    assert label.mode == "I;16" and np.asarray(label).dtype == np.uint16
    gt = evaluate.ground_truth(samples[0], "pascal-context-459")
    assert gt.dtype == np.uint16 and gt.tolist() == [[0, 458, 65535, 300], [256, 255, 1, 65535], [0, 0, 458, 458]]
    assert PRESETS["pascal-context-459"].undefined(np.asarray(label)) == {1000: 1}


def test_the_459_names_are_the_datasets_labels_in_order():
    """labels.txt's ids (1-based) of the 59 classes of PASCAL-Context-59, from ODISE's
    prepare_pascal_ctx_sem_seg.py (its _mapping), name those classes at index id - 1 of the 459 (MaskCLIP's
    readable names: airplane for aeroplane, spaces in potted plant and tv monitor)."""
    ids_of_59 = (2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115,
                 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349,
                 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458)
    readable = {"aeroplane": "airplane", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}
    assert [PC459[i - 1] for i in ids_of_59] == [readable.get(name, name) for name in PASCAL_CONTEXT_CLASSES]
    assert len(PC459) == len(set(PC459)) == 459
    assert (PC459[0], PC459[430], PC459[458]) == ("accordion", "unknown", "wool")


def named_pascal_context_459(tmp_path):
    """The fake PASCAL-Context-459 and its named segments (the first image's at twice its size): the command
    line's arguments, and the (truth, prediction) pairs of the voted classes and of MaskCLIP's, at the label
    maps' size (their unlabelled pixels and undefined values 65535)."""
    root, pred = make_pascal_context_459(tmp_path / "pascal_ctx_d2"), tmp_path / "pred"
    voted_pairs, maskclip_pairs = [], []
    for name, (truth, segments, maskclip) in PC459_IMAGES.items():
        scale = np.ones((2, 2) if name == "2008_000002" else (1, 1), int)
        class_of = save_named(pred / name, np.kron(segments, scale), np.kron(maskclip, scale), "pascal-context-459",
                              PC459)
        gt = np.array([[v if v < 459 else UNLABELLED_16 for v in row] for row in truth])
        voted_pairs.append((gt, voted_by_loop(segments, class_of)))
        maskclip_pairs.append((gt, np.array(maskclip)))
    return ["--dataset", "pascal-context-459", "--root", str(root), "--pred", str(pred)], voted_pairs, maskclip_pairs


def test_open_vocabulary_and_maskclip_on_pascal_context_459_by_hand(tmp_path, capsys):
    args, voted_pairs, maskclip_pairs = named_pascal_context_459(tmp_path)
    pred = tmp_path / "pred"
    out = tmp_path / "scores.json"
    assert main([*args, "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["protocols"] == ["hungarian", "majority", "open-vocabulary", "maskclip"]
    assert_protocol(result["open-vocabulary"], loop_class_scores(voted_pairs, 459, UNLABELLED_16))
    assert_protocol(result["maskclip"], loop_class_scores(maskclip_pairs, 459, UNLABELLED_16))
    assert result["undefined_label_values"] == {"1000": 1} and len(result["class_names"]) == 459
    shown = capsys.readouterr().out
    assert "clusters and concept left out: 2 of 2 prediction folders lack embeddings.npy" in shown
    assert "open-vocabulary  mIoU" in shown and "maskclip         mIoU" in shown and " 458 wool " in shown
    scores = json.loads((pred / "summary.scores.json").read_text())  # what the page shows
    assert scores["protocols"] == result["protocols"] and scores["maskclip"] == result["maskclip"]
    gt_png = np.asarray(Image.open(pred / "2008_000002" / "gt.png"))
    colours = class_colours(459)
    assert (gt_png[0, 1] == colours[458]).all() and (gt_png[1, 0] == colours[256]).all()
    assert (gt_png[0, 2] == 0).all() and (gt_png[1, 3] == 0).all()  # unlabelled, and a value the dataset lacks


def test_an_image_keeps_a_column_per_segment_not_per_class(tmp_path):
    """The confusion matrix each image keeps for hungarian and majority: padded to PASCAL-Context-459's 459
    classes, it would take 1.7 MB an image, 8.6 GB for the 5,105 val images (the matching pads it itself)."""
    named_pascal_context_459(tmp_path)
    sample = dataset_samples("pascal-context-459", tmp_path / "pascal_ctx_d2")[1]
    result = evaluate.image_result(sample, tmp_path / "pred" / sample.stem, "pascal-context-459", 459, "native", set())
    assert result.hist.shape == (459, 3)  # segments 0..2
    assert result.hist.base is None and result.hist.nbytes == 459 * 3 * 8  # no view of a 459-column matrix


def test_a_label_map_that_is_not_16_bit(capsys, tmp_path):
    args = named_pascal_context_459(tmp_path)[0]
    Image.new("L", (3, 2)).save(tmp_path / "pascal_ctx_d2" / "annotations_ctx459" / "validation" / "2008_000003.tif")
    expect_error(capsys, "2008_000003.tif: mode L, not a 16-bit label map; make it with ODISE's", *args)
    expect_error(capsys, f"{tmp_path}/images/validation: no such folder; prepare it with ODISE's", "--dataset",
                 "pascal-context-459", "--root", str(tmp_path), "--pred", str(tmp_path))


# ---- A folder dataset: 8-bit labels, a vocabulary of its own ----

FOLDER_CLASSES = ("sky", "tree", "road", "car")
FOLDER_NAMED = {  # name: (EmerDiff's segments, MaskCLIP's classes), at the label map's size (make_folder's)
    "a": ([[0, 1, 1], [2, 2, 0]], [[0, 1, 3], [3, 2, 0]]),
    "b": ([[0, 0, 1], [1, 1, 1]], [[3, 3, 0], [1, 2, 1]])}


@pytest.fixture
def named_folder(tmp_path):
    """The folder dataset of test_evaluate.make_folder (4 classes) with its named segments."""
    root, labels = make_folder(tmp_path / "data")
    pred = tmp_path / "pred"
    class_of = {name: save_named(pred / name, segments, maskclip, None, FOLDER_CLASSES)
                for name, (segments, maskclip) in FOLDER_NAMED.items()}
    return ["--dataset", "folder", "--root", str(root), "--pred", str(pred)], labels, pred, class_of


def test_open_vocabulary_scored_at_512_by_hand(tmp_path, named_folder):
    """--resolution 512 resizes the voted and MaskCLIP's maps as it does labels.png (nearest, half-pixel
    centres): the scores of the pixel loops on the maps resized by a loop."""
    args, labels, _, class_of = named_folder
    out = tmp_path / "scores.json"
    assert main([*args, "--quiet", "--resolution", "512", "--protocols", "open-vocabulary", "maskclip",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["protocols"] == ["open-vocabulary", "maskclip"] and "hungarian" not in result
    gts = {name: loop_nearest(np.asarray(ids)) for name, ids in labels.items()}
    voted = [(gts[name], loop_nearest(voted_by_loop(segments, class_of[name])))
             for name, (segments, _) in FOLDER_NAMED.items()]
    maskclip = [(gts[name], loop_nearest(np.array(classes))) for name, (_, classes) in FOLDER_NAMED.items()]
    assert_protocol(result["open-vocabulary"], loop_class_scores(voted, 4, 255))
    assert_protocol(result["maskclip"], loop_class_scores(maskclip, 4, 255))


def test_folders_without_named_segments(capsys, tmp_path, named_folder):
    args, _, pred, _ = named_folder
    (pred / "b" / "maskclip.png").unlink()
    assert main([*args, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert ("open-vocabulary and maskclip left out: 1 of 2 prediction folders lack classes.json or maskclip.png "
            "(written by emerdiff.py --classes)") in out
    expect_error(capsys, "--protocols open-vocabulary: 1 of 2 prediction folders lack classes.json or maskclip.png",
                 *args, "--protocols", "hungarian", "open-vocabulary")


def rewrite_classes(pred, change):
    path = pred / "a" / "classes.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("change, pattern", [
    (lambda r: r.pop("vocabulary"), "not a classes.json as emerdiff.py --classes writes it"),
    (lambda r: r["segments"][0].update(class_id="0"), "not a classes.json as emerdiff.py --classes writes it"),
    (lambda r: r["segments"][0].update(segment=True), "not a classes.json as emerdiff.py --classes writes it"),
    (lambda r: r["segments"].append(r["segments"][0]), "not a classes.json as emerdiff.py --classes writes it"),
    (lambda r: r.update(classes="sky tree road car"), "not a classes.json as emerdiff.py --classes writes it"),
    (lambda r: r["segments"].pop(1), "a/classes.json: segment 1 of labels.png is not in it: they come from"),
    (lambda r: r["segments"][2].update(class_id=4), "a/classes.json: segment 2 has class_id 4, outside 0..3"),
    (lambda r: r["segments"][2].update(class_id=-1), "a/classes.json: segment 2 has class_id -1, outside 0..3"),
    (lambda r: r["classes"].pop(), "a/classes.json: 3 classes, the labels 4: give evaluate.py --classes 3"),
], ids=["no-vocabulary", "class-id-text", "segment-bool", "segment-twice", "classes-text", "segment-unnamed",
        "class-id-4", "class-id-negative", "three-classes"])
def test_a_malformed_classes_json_is_one_line(capsys, named_folder, change, pattern):
    args, _, pred, _ = named_folder
    rewrite_classes(pred, change)
    expect_error(capsys, pattern, *args)


def test_a_classes_json_that_is_no_json_or_too_large(capsys, named_folder, monkeypatch):
    args, _, pred, _ = named_folder
    path = pred / "a" / "classes.json"
    text = path.read_text()
    path.write_text(text[:-1])
    expect_error(capsys, "a/classes.json: not a classes.json as emerdiff.py --classes writes it", *args)
    path.write_text(text)
    monkeypatch.setattr(evaluate, "MAX_RECORD", len(text.encode()) - 1)
    expect_error(capsys, f"a/classes.json: over {len(text.encode()) - 1:,} bytes", *args)


def test_a_vocabulary_other_than_the_presets(capsys, tmp_path):
    args, pred = named_pascal_context_459(tmp_path)[0], tmp_path / "pred"
    save_named(pred / "2008_000003", [[0, 0, 0], [0, 0, 0]], [[1, 1, 1], [1, 1, 1]], "ade20k",
               PRESETS["ade20k"].classes)
    expect_error(capsys, '2008_000003/classes.json: vocabulary "ade20k" of 150 classes, not pascal-context-459\'s '
                 "459: run emerdiff.py with --classes pascal-context-459", *args)
    save_named(pred / "2008_000003", [[0, 0, 0], [0, 0, 0]], [[1, 1, 1], [1, 1, 1]], None, PC459)
    expect_error(capsys, "vocabulary null of 459 classes, not pascal-context-459's 459", *args)


def test_a_maskclip_png_of_another_size_or_class_range(capsys, named_folder):
    args, _, pred, _ = named_folder
    Image.fromarray(np.zeros((2, 2), np.uint16)).save(pred / "a" / "maskclip.png")
    expect_error(capsys, "a/maskclip.png is 2x2, its labels.png 3x2: they come from different runs", *args)
    Image.fromarray(np.array([[0, 1, 4], [0, 0, 0]], np.uint16)).save(pred / "a" / "maskclip.png")
    expect_error(capsys, "a/maskclip.png: class ids 0..4: classes.json names 4 classes (ids 0..3)", *args)
    Image.new("RGB", (3, 2)).save(pred / "a" / "maskclip.png")
    expect_error(capsys, "a/maskclip.png: not a single-channel PNG of class ids (PNG RGB)", *args)
