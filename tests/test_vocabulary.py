"""Named segments (vocabulary.py): MaskCLIP's scores and refinements against MaskCLIP's head as its code writes it,
the per-pixel classes against F.interpolate, mask voting against a plain loop, the class lists' checks."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vocabulary
from datasets import PRESETS
from inputs import EmerDiffError


def maskclip_head_refine(output: torch.Tensor, k: torch.Tensor, ks_thresh: float, pd_thresh: float) -> torch.Tensor:
    """MaskClipHead.refine_output of MaskCLIP's code (mmseg/models/decode_heads/maskclip_head.py), line for line:
    output (N, C, H, W) cosines, k (N, H*W, C') the last block's keys."""
    if pd_thresh > 0:
        N, C, H, W = output.shape
        _output = F.softmax(output * 100, dim=1)
        max_cls_conf = _output.view(N, C, -1).max(dim=-1)[0]
        selected_cls = (max_cls_conf < pd_thresh)[:, :, None, None].expand(N, C, H, W)
        output = output.clone()
        output[selected_cls] = -100
    if k is not None and ks_thresh > 0:
        output = F.softmax(output * 100, dim=1)
        N, C, H, W = output.shape
        output = output.view(N, C, -1).transpose(-2, -1)
        k = F.normalize(k, p=2)
        weight = k @ k.transpose(-2, -1)
        selected_pos = (output.max(dim=-1, keepdim=True)[0] < ks_thresh)
        selected_pos = selected_pos.expand(-1, -1, C)
        weighted_output = weight @ output
        output = output.clone()
        output[selected_pos] = weighted_output[selected_pos]
        output = output.transpose(-2, -1).reshape(N, C, H, W)
    return output


@pytest.mark.parametrize("ks, pd", [(1.0, 0.0), (0.0, 0.5), (1.0, 0.5), (0.6, 0.3)])
def test_the_refinements_are_maskclips(ks, pd):
    g = torch.Generator().manual_seed(0)
    scores = 0.05 * torch.randn(6, 5, 7, generator=g, dtype=torch.float64)  # cosines, (C, h, w)
    scores[2] -= 0.2  # a class that is nowhere: prompt denoising drops it
    keys = torch.randn(35, 16, generator=g, dtype=torch.float64)  # (h*w, C')
    ours = scores
    if pd:
        ours = vocabulary.prompt_denoised(ours, pd)
    if ks:
        ours = vocabulary.key_smoothed(ours, keys, ks)
    reference = maskclip_head_refine(scores[None], keys[None], ks, pd)[0]
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    if pd:
        assert (ours[2] == (-100 if not ks else ours[2])).all() and not torch.equal(ours, scores)


def test_pixel_classes_are_the_bilinear_argmax_and_its_counts():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 4, 6, generator=g, dtype=torch.float64)  # (C, h, w)
    rng = np.random.default_rng(0)
    segments = rng.integers(0, 4, size=(37, 53)).astype(np.uint8)
    segments[segments == 2] = 1  # segment 2 has no pixel
    classes, votes, sums = vocabulary.pixel_classes(scores, segments)
    up = F.interpolate(scores[None], size=segments.shape, mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_array_equal(classes, up.argmax(0))
    want_votes, want_sums = np.zeros((4, 5), np.int64), np.zeros((4, 5))
    for y in range(segments.shape[0]):
        for x in range(segments.shape[1]):
            want_votes[segments[y, x], up[:, y, x].argmax()] += 1
            want_sums[segments[y, x]] += up[:, y, x]
    np.testing.assert_array_equal(votes, want_votes)
    np.testing.assert_allclose(sums, want_sums, rtol=1e-10)


def test_pixel_classes_in_row_blocks_agree(monkeypatch):
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(3, 3, 3, generator=g)
    segments = np.random.default_rng(1).integers(0, 3, size=(40, 30)).astype(np.uint8)
    whole = vocabulary.pixel_classes(scores, segments)
    monkeypatch.setattr(vocabulary, "BLOCK_ELEMENTS", 3 * 30 * 7)  # 7 rows at a time, the last block short
    for a, b in zip(whole, vocabulary.pixel_classes(scores, segments)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_voting_takes_the_most_votes_and_breaks_ties_by_score():
    votes = np.array([[5, 2, 0], [3, 3, 1], [0, 0, 0], [1, 4, 4]])
    sums = np.array([[0.1, 9.0, 0.0], [1.0, 2.0, 5.0], [0.0, 0.0, 0.0], [0.0, -1.0, -2.0]])
    want = []
    for v, s in zip(votes, sums):  # the plain rule
        if v.sum() == 0:
            want.append(-1)
            continue
        tied = [c for c in range(len(v)) if v[c] == v.max()]
        want.append(max(tied, key=lambda c: s[c]))
    assert vocabulary.voted_classes(votes, sums).tolist() == want == [0, 1, -1, 1]


def test_class_lists_from_text_a_file_and_a_preset(tmp_path):
    assert vocabulary.class_names(" cat,grass ,  blue   sky") == (("cat", "grass", "blue sky"), None)
    listed = tmp_path / "names.txt"
    listed.write_text("cat\n\n  grass\nsky\n")
    assert vocabulary.class_names(str(listed)) == (("cat", "grass", "sky"), None)
    names, preset = vocabulary.class_names("pascal-context-59")
    assert preset == "pascal-context-59" and len(names) == len(PRESETS[preset].classes) == 59
    assert names[0] == "airplane" and "potted plant" in names and "tv monitor" in names
    names, _ = vocabulary.class_names("coco-stuff-171")
    assert {"brick wall", "sky", "tile ceiling", "desk", "person"} <= set(names) and "sky-other" not in names


@pytest.mark.parametrize("dataset", list(PRESETS))
def test_every_preset_gives_a_usable_class_list(dataset):
    names, preset = vocabulary.class_names(dataset)
    assert preset == dataset and len(names) == len(PRESETS[dataset].classes)
    assert vocabulary.checked_names(list(names), dataset) == names  # none empty, none twice


@pytest.mark.parametrize("given, says", [
    ("", "no class name"), (" , ", "no class name"), ("cat,,sky", "name 2 of 3 is empty"),
    ("cat, Cat", "'Cat' is given twice"), (",".join(f"c{i}" for i in range(10_000)), "10000 names, more than 1000"),
    ("x" * 300, "over 200 characters")])
def test_bad_class_lists_get_one_line(given, says):
    with pytest.raises(EmerDiffError, match=says) as caught:
        vocabulary.class_names(given)
    assert "\n" not in str(caught.value)


def test_a_class_file_that_is_no_text_gets_one_line(tmp_path):
    bad = tmp_path / "names.txt"
    bad.write_bytes(b"cat\n\xff\xfe\n")
    with pytest.raises(EmerDiffError, match="one class name a line") as caught:
        vocabulary.class_names(str(bad))
    assert "\n" not in str(caught.value)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(EmerDiffError, match="no class name"):
        vocabulary.class_names(str(tmp_path / "empty.txt"))
