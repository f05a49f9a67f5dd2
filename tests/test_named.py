"""Named segments end to end: the class names' embeddings and name_segments against plain computations on a tiny
CLIP, and the command line with --classes: its files, its page, its one-line refusals."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import emerdiff
import vocabulary
from command_line import EXAMPLE, OUTPUTS
from runner import main
from weights import load_clip

FAST = ["--size", "128", "--masks", "4", "--feature-samples", "2", "--kmeans-restarts", "5", "--quiet"]
NAMES = ("cat", "grass", "sky", "a wooden table")


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return load_clip(tiny_clip_dir)


def test_the_class_embeddings_average_the_templates_one_prompt_at_a_time(clip):
    got = vocabulary.text_embeddings(clip, NAMES[:2], templates=vocabulary.TEMPLATES[:5])
    for row, name in zip(got, NAMES[:2]):
        each = [F.normalize(clip.encode_text([t.format(name)])[0], dim=0) for t in vocabulary.TEMPLATES[:5]]
        want = F.normalize(torch.stack(each).mean(0), dim=0)
        torch.testing.assert_close(row, want, rtol=1e-5, atol=1e-6)
    assert len(vocabulary.TEMPLATES) == 85 and all(t.count("{}") == 1 for t in vocabulary.TEMPLATES)


def test_name_segments_is_maskclip_up_sampled_then_voted(clip, sd):
    seg = emerdiff.segment(EXAMPLE, sd, size=128, masks=4, feature_samples=2, kmeans_restarts=3)
    naming = vocabulary.name_segments(EXAMPLE, seg.labels, clip, NAMES, size=128)
    pixels, _ = emerdiff.load_image(EXAMPLE, 128)
    with torch.no_grad():
        text = torch.stack([F.normalize(torch.stack([F.normalize(clip.encode_text([t.format(n)])[0], dim=0)
                                                     for t in vocabulary.TEMPLATES]).mean(0), dim=0) for n in NAMES])
        features = F.normalize(clip.dense_features(pixels)[0], dim=0)  # (D, 8, 8)
        scores = torch.einsum("dhw,cd->chw", features, text)
    up = F.interpolate(scores[None].double(), size=seg.labels.shape, mode="bilinear", align_corners=False)[0]
    maskclip = up.argmax(0).numpy()
    assert (maskclip == naming.maskclip_labels).mean() > 0.999  # float rounding may flip a near tie
    for s in np.unique(seg.labels):  # each segment: the class most of its pixels got (MaskCLIP's own pixels)
        votes = np.bincount(naming.maskclip_labels[seg.labels == s], minlength=len(NAMES))
        assert np.array_equal(naming.votes[s], votes) and naming.segment_classes[s] == votes.argmax()
    assert np.array_equal(naming.labels(seg.labels), naming.segment_classes[seg.labels])


@pytest.fixture(scope="module")
def named_run(tiny_sd_dir, tiny_clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("named")
    assert main(["--weights", str(tiny_sd_dir), "--clip", str(tiny_clip_dir), "--out", str(out), *FAST,
                 "--image", str(EXAMPLE), "--classes", ", ".join(NAMES)]) == 0
    return out


def test_a_named_run_writes_classes_maskclip_and_named_pictures(named_run, tiny_clip_dir):
    folder = named_run / "chelsea"
    assert OUTPUTS | {"classes.json", "maskclip.png", "named.png"} <= {p.name for p in folder.iterdir()}
    record = json.loads((folder / "classes.json").read_text())
    labels = np.asarray(Image.open(folder / "labels.png"))
    maskclip = np.asarray(Image.open(folder / "maskclip.png"))
    assert maskclip.dtype == np.uint16 and maskclip.shape == labels.shape == (300, 451)
    assert record["vocabulary"] is None and record["classes"] == list(NAMES)
    assert record["maskclip"] == {"templates": 85, "key_smoothing": None, "prompt_denoising": None}
    assert [s["segment"] for s in record["segments"]] == sorted(np.unique(labels).tolist())
    for s in record["segments"]:  # votes counted again from the two pictures
        counts = np.bincount(maskclip[labels == s["segment"]], minlength=len(NAMES))
        assert s["votes"] == {NAMES[c]: int(n) for c, n in enumerate(counts) if n}
        assert s["area"] == (labels == s["segment"]).sum() and s["class"] == NAMES[s["class_id"]]
        assert counts[s["class_id"]] == counts.max()
    named = Image.open(folder / "named.png")
    assert named.height >= 300 and named.width > 451  # the image, and the legend beside it
    run = json.loads((folder / "run.json").read_text())
    assert run["run"]["naming"] == {"key_smoothing": None, "prompt_denoising": None,
                                    "clip": str(tiny_clip_dir.resolve()), "classes": list(NAMES)}
    by_segment = {s["segment"]: s["class"] for s in record["segments"]}
    assert run["result"]["names"] == [by_segment.get(s) for s in range(len(run["result"]["names"]))]
    assert "naming" in run["result"]["seconds"]


def test_the_page_shows_each_segments_name(named_run):
    page = (named_run / "index.html").read_text()
    data = json.loads(page.split('<script type="application/json" id="run-data">')[1].split("</script>")[0])
    entry, = data["entries"]
    assert "named.png" in entry["files"] and set(entry["names"]) - {None} <= set(NAMES)


def test_a_rerun_with_other_classes_names_again_and_the_same_skips(named_run, tiny_sd_dir, tiny_clip_dir, capsys):
    args = ["--weights", str(tiny_sd_dir), "--clip", str(tiny_clip_dir), "--out", str(named_run), *FAST,
            "--image", str(EXAMPLE)]
    assert main([*args, "--classes", ", ".join(NAMES)]) == 0
    assert "1 of 1 images already done" in capsys.readouterr().err
    assert main([*args, "--classes", "dog, road", "--prompt-denoising"]) == 0
    record = json.loads((named_run / "chelsea" / "classes.json").read_text())
    assert record["classes"] == ["dog", "road"] and record["maskclip"]["prompt_denoising"] == 0.5


def test_random_weights_name_with_a_random_clip_and_bilinear_up_sampling_works(tmp_path, capsys):
    assert main(["--random-weights", "--out", str(tmp_path), *FAST, "--image", str(EXAMPLE), "--upsample", "bilinear",
                 "--classes", "ade20k", "--key-smoothing"]) == 0
    record = json.loads((tmp_path / "chelsea" / "classes.json").read_text())
    assert record["vocabulary"] == "ade20k" and len(record["classes"]) == 150
    assert record["maskclip"]["key_smoothing"] == 1.0


def test_the_class_names_are_embedded_once_per_run(tiny_sd_dir, tmp_path, monkeypatch):
    calls = []
    embed = vocabulary.text_embeddings
    monkeypatch.setattr(vocabulary, "text_embeddings", lambda *a, **k: calls.append(a) or embed(*a, **k))
    second = tmp_path / "mirror.jpg"
    Image.open(EXAMPLE).transpose(Image.FLIP_LEFT_RIGHT).save(second)
    assert main(["--random-weights", "--out", str(tmp_path / "out"), *FAST, "--image", str(EXAMPLE),
                 "--image", str(second), "--classes", "cat, sky"]) == 0
    assert len(calls) == 1 and (tmp_path / "out" / "mirror" / "classes.json").is_file()


@pytest.mark.parametrize("args, says", [
    (["--classes", ""], "--classes: no class name"),
    (["--classes", "cat, sky, Cat"], "'Cat' is given twice"),
    (["--classes", ",".join(f"thing {i}" for i in range(10_000))], "10000 names, more than 1000"),
    (["--classes", "cat", "--key-smoothing", "0"], "--key-smoothing 0.0: a probability threshold in (0, 1]"),
    (["--classes", "cat", "--prompt-denoising", "1.5"], "--prompt-denoising 1.5: a probability threshold"),
], ids=["empty", "twice", "10000", "key-smoothing", "prompt-denoising"])
def test_bad_class_lists_are_refused_in_one_line_before_anything_loads(capsys, tmp_path, args, says):
    status = main(["--out", str(tmp_path / "out"), "--quiet", "--weights", str(tmp_path / "no-weights"),
                   "--image", str(EXAMPLE), *args])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith("emerdiff: error: ") and says in err, err
    assert not (tmp_path / "out").exists()


def test_a_missing_or_malformed_clip_folder_is_one_line(capsys, tmp_path, tiny_sd_dir, tiny_clip_dir):
    def refused(clip, says):
        status = main(["--out", str(tmp_path / "out"), *FAST, "--weights", str(tiny_sd_dir), "--image", str(EXAMPLE),
                       "--classes", "cat, sky", "--clip", str(clip)])
        err = capsys.readouterr().err
        assert status == 2 and err.count("\n") == 1 and says in err, err
        assert not (tmp_path / "out" / "chelsea").exists()
    refused(tmp_path / "no-clip", "no such file or folder")
    broken = tmp_path / "broken-clip"
    broken.mkdir()
    for name in ("model.safetensors", "vocab.json", "merges.txt"):
        (broken / name).symlink_to(tiny_clip_dir / name)
    (broken / "config.json").write_text("{not json")
    refused(broken, "config.json")
