"""The PASCAL-Context-459 reader on a fake in ODISE's layout (16-bit TIFF label maps)."""
import numpy as np
from PIL import Image

import evaluate
from datasets import PASCAL_CONTEXT_CLASSES, PRESETS, dataset_samples
from test_evaluate import save_image

PC459 = PRESETS["pascal-context-459"].classes


# ---- PASCAL-Context-459: ODISE's layout, 16-bit label maps ----

# Two val images: 16-bit label values (65535 unlabelled; 1000 is no class of the dataset)
PC459_IMAGES = {"2008_000002": [[0, 458, 65535, 300], [256, 255, 1, 1000], [0, 0, 458, 458]],
                "2008_000003": [[65535, 7, 7], [300, 300, 0]]}


def make_pascal_context_459(root):
    """pascal_ctx_d2 as ODISE's scripts leave it: images/validation/<id>.jpg, annotations_ctx459/validation/<id>.tif
    (PIL's uint16 TIFF, as prepare_pascal_ctx_full_sem_seg.py saves it); a training image that is not read."""
    labels = root / "annotations_ctx459" / "validation"
    labels.mkdir(parents=True)
    for name, truth in PC459_IMAGES.items():
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
