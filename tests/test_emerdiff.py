"""The method (emerdiff.py) against independent references: scipy, diffusers, plain loops."""
import copy
import gc
import weakref

import numpy as np
import pytest
import scipy.cluster.vq
import scipy.ndimage
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

import emerdiff
from emerdiff import (cluster_means, difference_maps, extract_features, gaussian_blur, invert, kmeans,
                      low_resolution_masks, mask_embeddings)
from sampler import ALPHAS_CUMPROD, Modulation, regenerate

# The layers the method spec names, written out here rather than imported from unet.py.
FEATURE_LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
MODULATED_LAYER = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"

# ---- k-means ----


def inertia(x, labels, centers):
    return ((x - centers[labels]) ** 2).sum().item()


def test_kmeans_recovers_separable_blobs():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(5, 16, generator=g) * 20
    truth = torch.arange(5).repeat_interleave(50)
    x = means[truth] + torch.randn(250, 16, generator=g)
    labels, centers = kmeans(x, 5, n_init=10, generator=torch.Generator().manual_seed(1))
    assert centers.shape == (5, 16)
    for blob in range(5):  # every blob is one cluster, and no two blobs share one
        assert len(set(labels[truth == blob].tolist())) == 1
    assert len(set(labels.tolist())) == 5


@pytest.mark.parametrize("blobs, k, restarts", [(8, 8, 20), (10, 25, 100)])  # k = blobs; the method's K and restarts
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.filterwarnings("ignore:One of the clusters is empty")  # scipy's restarts may empty a cluster
def test_kmeans_inertia_no_worse_than_scipy(seed, blobs, k, restarts):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=g) + 3 * torch.randn(blobs, 32, generator=g)[torch.randint(blobs, (256,), generator=g)]
    best_scipy = min(
        inertia(x, torch.from_numpy(lab).long(), torch.from_numpy(cen))
        for cen, lab in (scipy.cluster.vq.kmeans2(x.numpy().astype(np.float64), k, minit="++", seed=s)
                         for s in range(restarts)))
    labels, centers = kmeans(x, k, n_init=restarts, generator=torch.Generator().manual_seed(seed))
    assert inertia(x, labels, centers) <= best_scipy * (1 + 1e-3)


def test_kmeans_is_deterministic_for_a_generator():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    a = kmeans(x, 7, n_init=5, generator=torch.Generator().manual_seed(3))
    b = kmeans(x, 7, n_init=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_kmeans_with_fewer_distinct_points_than_k():
    points = torch.tensor([[0.0, 0.0], [5.0, 5.0], [9.0, -2.0]])
    x = points[torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])]
    labels, centers = kmeans(x, 6, n_init=4, generator=torch.Generator().manual_seed(0))
    assert centers.shape == (3, 2) and set(labels.tolist()) == {0, 1, 2}
    assert inertia(x, labels, centers) == 0.0


def test_kmeans_one_point_per_cluster():
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    labels, centers = kmeans(x, 10, n_init=3, generator=torch.Generator().manual_seed(0))
    assert sorted(labels.tolist()) == list(range(10)) and inertia(x, labels, centers) < 1e-8


def test_an_empty_cluster_is_reseeded_at_the_farthest_point():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0], [30.0]])
    labels = torch.tensor([[0, 0, 1, 1, 1]])  # cluster 2 of 3 is empty
    centers = torch.tensor([[[0.5], [17.0], [100.0]]])
    distances = ((x[:, 0] - centers[0, labels[0], 0]) ** 2)[None]
    means = cluster_means(x, labels, 3, distances)
    assert means[0, :, 0].tolist() == [0.5, 17.0, 30.0]  # 30 is farthest from its center (17)


# ---- the blur ----

def test_gaussian_blur_matches_scipy():
    images = torch.rand(2, 3, 17, 23, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # radius = int(truncate * sigma + 0.5) = 1: a 3-tap kernel; torch's "reflect" is scipy's "mirror"
    expected = scipy.ndimage.gaussian_filter(images.numpy(), sigma=(0, 0, 0.8, 0.8), mode="mirror", truncate=1.25)
    assert np.abs(gaussian_blur(images, 3, 0.8).numpy() - expected).max() < 1e-12


# ---- the models and one inversion, shared ----

SIZE = 128  # a 128x128 image: 16x16 latents, a 4x4 feature grid
GRID = (4, 4)


@pytest.fixture(scope="module")
def x0(sd):
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) * 2 - 1
    return emerdiff.encode(sd, image)


@pytest.fixture(scope="module")
def inversion(sd, x0):
    return invert(sd, x0, generator=torch.Generator().manual_seed(42))


@pytest.fixture(scope="module")
def masks():
    labels = torch.tensor([0, 0, 1, 1, 0, 2, 2, 1, 3, 3, 2, 1, 3, 0, 2, 1])
    return low_resolution_masks(labels, GRID, 4)


def test_low_resolution_masks_partition_the_grid(masks):
    assert masks.shape == (4, *GRID) and masks.dtype == torch.bool
    assert torch.equal(masks.sum(0), torch.ones(GRID, dtype=torch.long))
    assert masks[2].tolist() == [[False, False, False, False], [False, True, True, False],
                                 [False, False, True, False], [False, False, True, False]]  # the cells labelled 2


class DiffusersAttention:
    """An attention processor for diffusers' UNet, written from the paper: record Q/K, replay
    them (attention injection), add c M after the output projection of the modulated layer."""

    def __init__(self, name, state):
        self.name, self.state = name, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        s, key = self.state, (self.state["step"], self.name)
        if s["mode"] == "capture" and self.name == FEATURE_LAYER:
            s["features"].append(q)
        if s["mode"] == "record":
            s["record"][key] = (q, k)
        if s["mode"] == "modulate" and s["inject"]:
            q, k = s["record"][key]
        batch, heads = v.shape[0], attn.heads
        q, k, v = (a.expand(batch, -1, -1).reshape(batch, a.shape[1], heads, -1).transpose(1, 2) for a in (q, k, v))
        o = attn.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        if s["mode"] == "modulate" and s["step"] == 0 and self.name == MODULATED_LAYER:
            o = o + s["offset"] * s["mask"].reshape(1, -1, 1)
        return attn.to_out[1](o)


@pytest.fixture(scope="module")
def reference(tiny_reference):
    """diffusers' UNet with DiffusersAttention in every layer, its VAE and their shared state. The UNet
    is a copy: the session's own keeps diffusers' attention code for the files after this one."""
    unet = copy.deepcopy(tiny_reference[0])
    state = {"step": 0, "mode": None, "record": {}, "features": []}
    unet.set_attn_processor({name: DiffusersAttention(name.removesuffix(".processor"), state)
                             for name in unet.attn_processors})
    return unet, tiny_reference[1], state


def reference_features(reference, x0, context, *, t_f=1, samples=5, seed=7):
    """Step 1's features with diffusers' UNet: the feature layer's queries averaged over `samples`
    draws around x0 at t_f (drawn at once from a generator seeded `seed`), one draw per UNet call."""
    ref_unet, _, state = reference
    noise = torch.randn((samples, *x0.shape[1:]), generator=torch.Generator().manual_seed(seed))
    state.update(mode="capture", features=[])
    with torch.no_grad():
        for eps in noise:  # one draw at a time, the whole UNet each time
            x = ALPHAS_CUMPROD[t_f].sqrt() * x0 + (1 - ALPHAS_CUMPROD[t_f]).sqrt() * eps[None]
            ref_unet(x, t_f, context)
    return torch.cat(state["features"]).mean(0)


def assert_close(ours, expected, tolerance=1e-4):
    """Equal up to float32 rounding, relative to the largest expected value."""
    ours, expected = torch.as_tensor(ours), torch.as_tensor(expected)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= tolerance * expected.abs().max()


def assert_far(ours, other, tolerance=1e-2):
    """Different by far more than assert_close allows: an option that changes them is seen."""
    assert (torch.as_tensor(ours) - torch.as_tensor(other)).abs().max() > tolerance * torch.as_tensor(other).abs().max()


def test_the_sessions_diffusers_unet_keeps_diffusers_attention(tiny_reference, reference):
    """Other files compare against tiny_reference's UNet: this file's processors are in its copy only."""
    assert all(isinstance(p, DiffusersAttention) for p in reference[0].attn_processors.values())
    assert not any(isinstance(p, DiffusersAttention) for p in tiny_reference[0].attn_processors.values())


def test_features_match_diffusers_queries(sd, x0, inversion, reference):
    features = extract_features(sd, x0, samples=5, generator=torch.Generator().manual_seed(7), batch_size=2)
    assert features.shape == (GRID[0] * GRID[1], 64)
    assert_close(features, reference_features(reference, x0, inversion.context))


def reference_difference_maps(reference, inversion, masks, lam, inject, blur=(3, 0.8)):
    """Steps 3-4 with diffusers' UNet, DDIM scheduler (eta = 1, given noise) and VAE, one run at a time;
    the blur by scipy (a kernel of `blur[0]` taps: radius = truncate x sigma)."""
    unet, vae, state = reference
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    scheduler.set_timesteps(50)

    def denoise(mode, **settings):
        state.update(mode=mode, **settings)
        x = inversion.x_start
        for i, t in enumerate(inversion.timesteps):
            state["step"] = i
            eps = unet(x, t, inversion.context).sample
            x = scheduler.step(eps, t, x, eta=1.0, variance_noise=inversion.zs[i]).prev_sample
        return vae.decode(x / vae.config.scaling_factor).sample

    with torch.no_grad():
        state["record"] = {}
        denoise("record")
        maps = []
        for mask in masks.float():
            minus, plus = (denoise("modulate", offset=c, mask=mask, inject=inject) for c in (-lam, lam))
            kernel, sigma = blur
            blurred = scipy.ndimage.gaussian_filter((minus - plus).double().numpy(), sigma=(0, 0, sigma, sigma),
                                                    mode="mirror", truncate=(kernel // 2) / sigma)
            maps.append(torch.from_numpy(np.linalg.norm(blurred, axis=1)[0]))
    return torch.stack(maps).float()


@pytest.mark.parametrize("inject", [True, False], ids=["injection", "no-injection"])
def test_difference_maps_match_a_diffusers_reference(sd, inversion, masks, reference, inject):
    ours = difference_maps(sd, inversion, masks, lam=10.0, injection=inject, batch_size=4)
    expected = reference_difference_maps(reference, inversion, masks, 10.0, inject)
    assert ours.shape == (4, SIZE, SIZE)
    assert (ours - expected).abs().max() <= 1e-3 * expected.abs().max()


@pytest.mark.parametrize("decodes", [None, 1], ids=["pairs", "one-image-a-call"])
def test_batched_maps_equal_a_plain_loop(sd, inversion, masks, decodes):
    batched = difference_maps(sd, inversion, masks, lam=10.0, batch_size=6,  # 3 pairs a batch: 2 batches
                              decode_batch_size=decodes)
    plain = []
    for mask in masks:
        images = []
        for c in (-10.0, 10.0):
            offsets = c * mask.flatten().float()[None]
            latent = regenerate(sd.unet, inversion.x_start, inversion.zs, inversion.timesteps, inversion.context,
                                hooks=Modulation(offsets, inversion.record))
            images.append(sd.vae.decode(latent))
        plain.append(gaussian_blur(images[0] - images[1]).norm(dim=1)[0])
    plain = torch.stack(plain)
    assert (batched - plain).abs().max() <= 1e-4 * plain.abs().max()


def test_empty_mask_and_zero_lambda_give_zero_maps(sd, inversion, masks):
    with_empty = torch.cat([masks[:1], torch.zeros_like(masks[:1])])
    maps = difference_maps(sd, inversion, with_empty, batch_size=4)
    assert maps[0].abs().max() > 0 and maps[1].abs().max() == 0
    assert difference_maps(sd, inversion, masks[:2], lam=0.0).abs().max() == 0


def test_injection_changes_the_maps(sd, inversion, masks):
    on = difference_maps(sd, inversion, masks[:2], injection=True)
    off = difference_maps(sd, inversion, masks[:2], injection=False)
    assert torch.isfinite(off).all() and (on - off).abs().max() > 1e-3 * on.abs().max()


def test_without_injection_no_record_is_kept(sd, x0, inversion, masks):
    bare = invert(sd, x0, generator=torch.Generator().manual_seed(42), record_attention=False)
    assert bare.record is None and torch.equal(bare.zs, inversion.zs)
    assert torch.equal(difference_maps(sd, bare, masks[:1], injection=False),
                       difference_maps(sd, inversion, masks[:1], injection=False))
    with pytest.raises(ValueError, match="needs the inversion's attention record"):
        difference_maps(sd, bare, masks[:1], injection=True)


# ---- segment()'s options, each against the reference path with that option ----

# An image at the working size (a float tensor: no resize), 2 masks, t_m = 101: 6 steps.
IMAGE = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(11))
CHEAP = dict(size=SIZE, masks=2, feature_samples=2, kmeans_restarts=2, t_m=101)


def segment_with(sd, option, **more):
    """segment() on IMAGE with CHEAP and `option`; also every option's value (DEFAULTS beneath) and x0."""
    seg = emerdiff.segment(IMAGE, sd, **CHEAP, **option, **more)
    return seg, emerdiff.DEFAULTS | CHEAP | option, emerdiff.encode(sd, IMAGE[None] * 2 - 1)


def masks_of(seg):
    return low_resolution_masks(torch.from_numpy(seg.low_res_labels).long().flatten(), GRID, CHEAP["masks"])


def prompt_context(tiny_reference, sd, prompt):
    """The prompt's embedding by transformers' CLIP text model (the tokens are ours)."""
    with torch.no_grad():
        return tiny_reference[2](sd.tokenizer(prompt)).last_hidden_state


FEATURE_OPTIONS = {"t_f": {"t_f": 41}, "seed": {"seed": 7}, "prompt": {"prompt": "a photograph of a cat"}}


@pytest.mark.parametrize("option", FEATURE_OPTIONS.values(), ids=FEATURE_OPTIONS.keys())
def test_segment_features_follow_t_f_seed_and_prompt_as_diffusers_queries_do(sd, reference, tiny_reference, option):
    """The mask embeddings segment() returns are the means, over its masks, of diffusers' queries at
    that t_f, with that seed's draws and that prompt's embedding; the defaults' queries differ, and
    k-means with that seed on diffusers' queries makes the same masks."""
    seg, o, x0 = segment_with(sd, option, upsample="bilinear")  # Step 1 only

    def features(**settings):
        context = prompt_context(tiny_reference, sd, settings["prompt"])
        return reference_features(reference, x0, context, t_f=settings["t_f"], samples=o["feature_samples"],
                                  seed=settings["seed"])
    expected = features(**o)
    assert_far(expected, features(**emerdiff.DEFAULTS))
    assert_close(seg.embeddings, mask_embeddings(expected, masks_of(seg)))
    labels, _ = kmeans(expected, CHEAP["masks"], n_init=CHEAP["kmeans_restarts"],
                       generator=torch.Generator().manual_seed(o["seed"]))
    assert np.array_equal(seg.low_res_labels.flatten(), labels.numpy())


MAP_OPTIONS = {"lam": {"lam": 3.0}, "no-injection": {"injection": False}, "blur": {"blur": (5, 1.5)},
               "seed": {"seed": 7}, "prompt": {"prompt": "a photograph of a cat"}}


@pytest.mark.parametrize("option", MAP_OPTIONS.values(), ids=MAP_OPTIONS.keys())
def test_segment_maps_follow_lam_injection_blur_seed_and_prompt_as_the_diffusers_reference(sd, reference, option):
    """segment()'s difference maps are reference_difference_maps with that lambda, injection and blur,
    from the inversion with that seed and prompt; with the default's lambda, injection and blur the
    reference gives other maps."""
    seg, o, x0 = segment_with(sd, option)
    inversion = invert(sd, x0, t_m=o["t_m"], prompt=o["prompt"], generator=torch.Generator().manual_seed(o["seed"]))
    expected = reference_difference_maps(reference, inversion, masks_of(seg), o["lam"], o["injection"], o["blur"])
    assert_close(seg.difference_maps, expected, 1e-3)
    d = emerdiff.DEFAULTS
    default = invert(sd, x0, t_m=o["t_m"], generator=torch.Generator().manual_seed(d["seed"]))
    if "seed" in option:  # the seed and the prompt change the inversion, the others the maps made from it
        assert_far(inversion.zs, default.zs)
    elif "prompt" in option:
        assert_far(inversion.context, default.context)
    else:
        assert_far(expected, reference_difference_maps(reference, inversion, masks_of(seg), d["lam"], d["injection"],
                                                       d["blur"]))


# ---- mask embeddings and the bilinear baseline ----

def test_mask_embeddings_are_the_kmeans_centres_and_the_mean_features_over_each_mask():
    g = torch.Generator().manual_seed(0)
    grid = (4, 6)
    x = torch.randn(24, 8, generator=g) + 10 * torch.randn(3, 8, generator=g)[torch.arange(24) % 3]
    labels, centers = kmeans(x, 3, n_init=5, generator=torch.Generator().manual_seed(0))
    embeddings = emerdiff.mask_embeddings(x, low_resolution_masks(labels, grid, 3))
    for i in range(3):  # a plain loop over the cells
        cells = [x[n] for n in range(24) if labels[n] == i]
        assert torch.allclose(embeddings[i], sum(cells) / len(cells), atol=1e-5)
    assert torch.allclose(embeddings, centers, atol=1e-5)  # converged: the centres are those means


def test_the_bilinear_baseline_upsamples_the_one_hot_masks_and_skips_the_modulated_runs(sd, monkeypatch):
    calls = []
    forward = sd.unet.forward
    monkeypatch.setattr(sd.unet, "forward", lambda x, *args: calls.append(len(x)) or forward(x, *args))
    image = torch.rand(3, 100, 150, generator=torch.Generator().manual_seed(0))
    seg = emerdiff.segment(image, sd, size=(192, 128), masks=5, feature_samples=3, kmeans_restarts=2,
                           upsample="bilinear")
    assert calls == [3]  # the feature pass only: no inversion, no modulated runs
    one_hot = F.one_hot(torch.from_numpy(seg.low_res_labels).long(), 5).permute(2, 0, 1)[None].float()  # (1, K, 4, 6)
    up = F.interpolate(one_hot, size=(128, 192), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(seg.difference_maps, up)
    expected = F.interpolate(up.argmax(0)[None, None].float(), size=(100, 150), mode="nearest-exact")[0, 0]
    assert np.array_equal(seg.labels, expected.numpy().astype(np.uint8))
    assert seg.embeddings.shape == (5, 64) and seg.embeddings.dtype == np.float32  # the tiny up16 block: 64 channels


# ---- the step functions called alone ----

TAKES = "takes {} as a non-empty torch tensor {}; got "
NUMPY = "numpy.ndarray (torch.from_numpy makes one of it)"


@pytest.mark.parametrize("call, error, message", [
    (lambda: emerdiff.kmeans(np.zeros((5, 3)), 2), TypeError, "kmeans " + TAKES.format("x", "(N, D)") + NUMPY),
    (lambda: emerdiff.kmeans(torch.zeros(5), 2), ValueError, "kmeans " + TAKES.format("x", "(N, D)") + "shape (5,)"),
    (lambda: emerdiff.kmeans(torch.zeros(0, 3), 2), ValueError,
     "kmeans " + TAKES.format("x", "(N, D)") + "shape (0, 3)"),
    (lambda: emerdiff.squared_distances(torch.zeros(5, 3), torch.zeros(2, 4, 4)), ValueError,
     "squared_distances " + TAKES.format("centers", "(R, k, D)") + "shape (2, 4, 4) where N = 5, D = 3"),
    (lambda: emerdiff.low_resolution_masks(torch.zeros(15, dtype=torch.long), (4, 4), 3), ValueError,
     "low_resolution_masks " + TAKES.format("labels", "(h*w,)") + "shape (15,) where h = 4, w = 4"),
    (lambda: emerdiff.low_resolution_masks([0] * 16, (4, 4), 3), TypeError,
     "low_resolution_masks " + TAKES.format("labels", "(h*w,)") + "list"),
    (lambda: emerdiff.mask_embeddings(torch.zeros(15, 8), torch.zeros(3, 4, 4)), ValueError,
     "mask_embeddings " + TAKES.format("features", "(h*w, C)") + "shape (15, 8) where K = 3, h = 4, w = 4"),
    (lambda: emerdiff.mask_embeddings(torch.zeros(16, 8), np.zeros((3, 4, 4))), TypeError,
     "mask_embeddings " + TAKES.format("masks", "(K, h, w)") + NUMPY),
    (lambda: emerdiff.modulation_offsets(torch.zeros(4, 4), 10.0), ValueError,
     "modulation_offsets " + TAKES.format("masks", "(K, h, w)") + "shape (4, 4)"),
    (lambda: emerdiff.gaussian_blur(np.zeros((1, 3, 8, 8))), TypeError,
     "gaussian_blur " + TAKES.format("images", "(B, C, H, W)") + NUMPY),
    (lambda: emerdiff.gaussian_blur(torch.zeros(3, 8, 8)), ValueError,
     "gaussian_blur " + TAKES.format("images", "(B, C, H, W)") + "shape (3, 8, 8)"),
    (lambda: emerdiff.assign_labels(torch.zeros(64, 64)), ValueError,
     "assign_labels " + TAKES.format("maps", "(K, H, W)") + "shape (64, 64)"),
    (lambda: emerdiff.assign_labels(torch.zeros(0, 64, 64)), ValueError,
     "assign_labels " + TAKES.format("maps", "(K, H, W)") + "shape (0, 64, 64)"),
    (lambda: emerdiff.upsampled_masks(np.zeros((3, 4, 4), dtype=bool), (64, 64)), TypeError,
     "upsampled_masks " + TAKES.format("masks", "(K, h, w)") + NUMPY),
    (lambda: emerdiff.at_input_size(torch.zeros(1, 64, 64), (64, 64)), ValueError,
     "at_input_size " + TAKES.format("labels", "(H, W)") + "shape (1, 64, 64)"),
], ids=["kmeans-numpy", "kmeans-1d", "kmeans-empty", "distances-other-d", "masks-short-labels", "masks-list",
        "embeddings-other-cells", "embeddings-numpy", "offsets-2d", "blur-numpy", "blur-3d", "labels-2d",
        "labels-no-maps", "upsampled-numpy", "input-size-3d"])
def test_the_step_functions_called_alone_refuse_what_they_cannot_take_in_one_line(call, error, message):
    """Each says, in one line, which argument it takes as what tensor, and what it got instead: a numpy array, a
    list, a tensor of another shape, an empty one, or one whose sizes disagree with the other arguments'."""
    with pytest.raises(error) as raised:
        call()
    assert str(raised.value) == message


def test_segment_frees_the_attention_record_before_the_decodes(sd, monkeypatch):
    """The record of the inversion (2.1 GB at 512x512) serves the modulated runs alone: segment() lets it go
    before decoded_maps, which then finds it freed (what the maps are, the tests above check)."""
    inversions, freed = [], []
    plain_invert, plain_decoded_maps = emerdiff.invert, emerdiff.decoded_maps

    def invert(*args, **kwargs):
        inversion = plain_invert(*args, **kwargs)
        inversions.append(weakref.ref(inversion.record))
        return inversion

    def decoded_maps(*args, **kwargs):
        gc.collect()
        freed.append(inversions[0]() is None)
        return plain_decoded_maps(*args, **kwargs)

    monkeypatch.setattr(emerdiff, "invert", invert)
    monkeypatch.setattr(emerdiff, "decoded_maps", decoded_maps)
    emerdiff.segment(IMAGE, sd, **CHEAP)
    assert freed == [True]
