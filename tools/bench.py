"""Speed, measured side by side.

    python tools/bench.py models --size 256 512 --batch 1    # our UNet and VAE decoder against diffusers', same weights
    python tools/bench.py profile --size 512                  # a modulated step against a diffusers UNet call, by operator
    python tools/bench.py method --preset cpu --json m.json  # segment() against the authors' notebook approach, per stage
    python tools/bench.py method --preset gpu --json m.json  # the same at 512x512, K = 25, 100 draws, on CUDA
    python tools/bench.py precision --half bfloat16          # bfloat16 (and float16) against float32, stage by stage
    python tools/bench.py time --size 256 512                # seconds per image, measured with K = 4 and scaled to the defaults
    python tools/bench.py cuda --json c.json                 # CUDA: the defaults on a 12 GB card; no host sync in the loop
    python tools/bench.py compile --preset gpu --json k.json # torch.compile: what it costs and gains, per image
    python tools/bench.py convolutions --size 512 --batch 4  # Winograd against oneDNN, each 3x3 convolution shape

Needs the dev requirements (diffusers). notebook.py beside it holds the reference pipeline
written after the authors' notebook, on diffusers, that `method` measures against. Without --weights the models are SD v1.5's architecture
with random weights (the speed is the same). Times are medians of --repeats interleaved runs,
after a warm-up run of each contender; the warm-up also counts the FLOPs (torch.utils.flop_counter).
`method` runs each contender in a process of its own, its rounds in a row, as a user runs it.
Ratios are reference / ours: above 1, ours is faster.
"""
import argparse
import contextlib
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import time
import warnings
from collections import Counter, defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent  # the project's files: one folder up
sys.path.insert(0, str(ROOT))

import devices  # noqa: E402 (after the path is set)
import emerdiff  # noqa: E402
import sampler  # noqa: E402
from clip_text import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402
from devices import Stopwatch  # noqa: E402
from files import FileError, atomic_save  # noqa: E402
from inputs import GRID_FACTOR, LATENT_FACTOR, feature_grid  # noqa: E402
from notebook import NotebookPipeline, reference_models  # noqa: E402
import speed  # noqa: E402
from speed import clock  # noqa: E402
from unet import UNet, UNetConfig  # noqa: E402
from vae import VAE, VAEConfig  # noqa: E402
from weights import StableDiffusion, random_stable_diffusion  # noqa: E402

EXAMPLE = ROOT / "examples" / "chelsea.jpg"

# The method's options per preset, the same for every contender. "cpu": minutes on 2 cores at 128x128, a
# quick check (per-call overhead weighs there); "cpu512": the size people run, with few masks and draws,
# each stage then scaled to the defaults (scaled_to_defaults): 16 draws, one feature call at the CPU's batch
# size as at the defaults (4 would count 25 calls' fixed cost where the defaults have 7), 2 masks (4 runs
# a call, where the defaults have 12 or 13: a run costs more here); "gpu": the paper's defaults on CUDA.
PRESETS = {
    "cpu": dict(device="cpu", dtypes=["float32"], options=dict(size=128, masks=4, feature_samples=8)),  # a quick check
    "cpu512": dict(device="cpu", dtypes=["float32"], options=dict(size=512, masks=2, feature_samples=16)),
    "gpu": dict(device="cuda", dtypes=["float16", "bfloat16"], options=dict(size=512, masks=25, feature_samples=100)),
}
STAGES = ["batch sizes", "features", "k-means", "inversion", "recording", "modulation"]


# ---- Measuring ----

def timed(fns, device, repeats: int) -> list[float]:
    """Median seconds of each of `fns`, called in turn `repeats` times after a warm-up call each:
    interleaved, so that drift in clock speed or load falls on all of them alike."""
    times = [[] for _ in fns]
    for rep in range(repeats + 1):
        for fn, spent in zip(fns, times):
            start = clock(device)
            fn()
            if rep:  # the first round is the warm-up
                spent.append(clock(device) - start)
    return [statistics.median(spent) for spent in times]


# torch.utils.flop_counter knows the CUDA attention kernels, not the CPU one.
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                       lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)}


class Meter:
    """UNet calls, UNet images and FLOPs per stage. FLOPs are counted only while `count_flops`
    (the counting slows the run): in the warm-up run."""

    def __init__(self):
        self.count_flops = False
        self.stages = defaultdict(lambda: dict(unet_calls=0, unet_images=0, flops=0))

    def reset(self, count_flops: bool):
        self.count_flops = count_flops
        self.stages.clear()

    def run(self, stage: str, fn, unet_images: int = 0):
        """fn(), counted under `stage`; `unet_images` > 0 marks a UNet call of that many samples."""
        counts = self.stages[stage]
        if unet_images:
            counts["unet_calls"] += 1
            counts["unet_images"] += unet_images
        counter = (flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
                   if self.count_flops else nullcontext())
        try:
            with counter:
                return fn()
        finally:
            if self.count_flops:
                counts["flops"] += counter.get_total_flops()


class MeteredUNet(nn.Module):
    """Our UNet, each call counted under the stage its hooks belong to."""
    STAGE_OF_HOOKS = {emerdiff.FeatureCapture: "features", sampler.AttentionRecord: "inversion",
                      sampler.Modulation: "modulation"}

    def __init__(self, unet, meter):
        super().__init__()
        self.unet, self.meter = unet, meter

    def forward(self, x, t, context, hooks=None):
        # A modulated step 0 takes one sample and returns the batch of runs: count what comes out.
        return self.meter.run(self.STAGE_OF_HOOKS[type(hooks)], lambda: self.unet(x, t, context, hooks),
                              unet_images=max(len(x), len(getattr(hooks, "offsets", x))))


class MeteredVAE(nn.Module):
    """Our VAE: encoding counted with the features, decoding with the modulation."""

    def __init__(self, vae, meter):
        super().__init__()
        self.vae, self.meter, self.config = vae, meter, vae.config
        self.decoder, self.post_quant_conv = vae.decoder, vae.post_quant_conv  # for devices.channels_last

    def encode(self, image):
        return self.meter.run("features", lambda: self.vae.encode(image))

    def decode(self, latent):
        return self.meter.run("modulation", lambda: self.vae.decode(latent))


def scaled_to_defaults(seconds: dict, options: dict) -> dict:
    """Seconds per stage measured with `options`, scaled stage by stage to the paper's defaults: the
    feature stage by the draws, the modulated runs and their decodes by the masks, the rest (the
    inversion, the recording, k-means) as measured; and their "total"."""
    defaults = emerdiff.DEFAULTS
    scale = dict(features=defaults["feature_samples"] / options["feature_samples"],
                 modulation=defaults["masks"] / options["masks"])
    scaled = {stage: s * scale.get(stage, 1) for stage, s in seconds.items() if stage != "total"}
    return scaled | {"total": sum(scaled.values())}


def load_average() -> float:
    return os.getloadavg()[0]


# ---- Models ----

def load_models(args, device, dtype) -> StableDiffusion:
    if args.weights:
        from weights import load_stable_diffusion
        return load_stable_diffusion(args.weights, device=device, dtype=dtype)
    return random_stable_diffusion("sd15", device, dtype)


def converted(sd: StableDiffusion, dtype) -> StableDiffusion:
    """A copy of sd's models in another dtype (sd itself unchanged)."""
    import copy
    return StableDiffusion(*(copy.deepcopy(m).to(dtype) for m in (sd.unet, sd.vae, sd.text_encoder)), sd.tokenizer)


# ---- python tools/bench.py models: our UNet and VAE against diffusers' ----

def relative_difference(ours, ref) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@torch.no_grad()
def compare_models(sd, size, args, device, dtype) -> list[dict]:
    """One plain UNet call and one decode, ours and diffusers' interleaved; then our hooked steps."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, size // 8, size // 8, generator=g).to(device, dtype)
    context = torch.randn(1, 77, sd.unet.config.cross_attention_dim, generator=g).to(device, dtype)
    t = torch.tensor([281], device=device)
    return against_diffusers(sd, x, context, t, args, device, dtype) + hooked_steps(sd.unet, x, context, t, args,
                                                                                   device)


def against_diffusers(sd, x, context, t, args, device, dtype) -> list[dict]:
    """Our UNet call and decode against diffusers' on the same weights (freed on return)."""
    unet, vae = sd.unet, sd.vae
    ref_unet, ref_vae = reference_models(unet, vae, device, dtype)
    ref = StableDiffusion(ref_unet, ref_vae, None, None)
    with devices.channels_last(ref) if device.type == "cuda" else contextlib.nullcontext():  # the layout ours has
        h, w = x.shape[-2:]
        contexts, size = context.expand(len(x), -1, -1), 8 * w
        rows = []
        ours_s, ref_s = timed([lambda: unet(x, t, context), lambda: ref_unet(x, t, contexts)], device, args.repeats)
        rows.append(dict(row=f"UNet, {h}x{w} latents", ours_s=ours_s, reference_s=ref_s,
                         max_difference=relative_difference(unet(x, t, context), ref_unet(x, t, contexts).sample)))
        if not args.skip_vae:
            latent, scaled = x * 0.5, x * 0.5 / vae.config.scaling_factor
            ours_s, ref_s = timed([lambda: vae.decode(latent), lambda: ref_vae.decode(scaled)], device, args.repeats)
            difference = relative_difference(vae.decode(latent), ref_vae.decode(scaled).sample)
            rows.append(dict(row=f"VAE decode, {size}x{size}", ours_s=ours_s, reference_s=ref_s,
                             max_difference=difference))
    return rows


def as_segment_runs(sd, side: int):
    """The speed settings segment() gives `sd` for a side x side image (devices.speed_settings), one run
    per call (no memory probes)."""
    return devices.speed_settings(sd, side, side, emerdiff.DEFAULTS | dict(speed=dict(devices.SPEED, batch_size=1)))


def modulated_step(unet, x, context, t, runs: int):
    """A call of our UNet as a modulated step after t_m (every run in full) of `runs` runs under
    injection, all savings on, the speed paths as the UNet has them: the recording pass is made
    first, from x's first image."""
    record = sampler.AttentionRecord()
    sampler.predict_noise(unet, x[:1], t, context, record, step=0)
    x = x[:1].expand(runs, -1, -1, -1).contiguous()
    tokens = math.prod(side // (GRID_FACTOR // LATENT_FACTOR) for side in x.shape[-2:])  # the modulated layer's h*w
    hooks = sampler.Modulation(torch.zeros(runs, tokens, device=x.device, dtype=x.dtype), record)
    return lambda: sampler.predict_noise(unet, x, t, context, hooks, step=0)


def on_path(unet, fast: bool, call):
    """`call`, with the UNet's speed paths applied (fast) or swapped back first (speed.apply)."""
    def run():
        speed.apply(unet, fast)
        return call()
    return run


@torch.no_grad()
def hooked_steps(unet, x, context, t, args, device) -> list[dict]:
    """A modulated step under injection (batch of runs, savings on) against a plain UNet call of as
    many images, with the speed paths and on the plain path."""
    plain = x[:1].expand(args.runs, -1, -1, -1).contiguous()  # as the modulated step's runs
    step = modulated_step(unet, x, context, t, args.runs)
    plain_s, fast_s, plain_path_s = timed([on_path(unet, True, lambda: unet(plain, t, context)),
                                           on_path(unet, True, step), on_path(unet, False, step)],
                                          device, args.repeats)
    speed.apply(unet)
    h, w = x.shape[-2:]
    note = f"{args.runs} runs; reference: a plain UNet call"
    return [dict(row=f"modulated step, speed paths, {h}x{w}", ours_s=fast_s, reference_s=plain_s, note=note),
            dict(row=f"modulated step, plain path, {h}x{w}", ours_s=plain_path_s, reference_s=plain_s, note=note)]


def print_rows(title, rows):
    print(f"{title:<44}{'ours':>11}{'reference':>12}{'ratio':>8}{'max diff':>11}")
    for r in rows:
        diff = f"{r['max_difference']:>11.2e}" if "max_difference" in r else f"   {r.get('note', '')}"
        print(f"{r['row']:<44}{r['ours_s'] * 1e3:>9.1f}ms{r['reference_s'] * 1e3:>10.1f}ms"
              f"{r['reference_s'] / r['ours_s']:>8.2f}{diff}")


def bench_models(args, device, dtype):
    sd = load_models(args, device, dtype)
    load = load_average()
    with as_segment_runs(sd, max(args.size)):
        rows = [row for size in args.size for row in compare_models(sd, size, args, device, dtype)]
    print_rows(f"batch {args.batch}, reference: diffusers", rows)
    return dict(command="models", batch=args.batch, rows=rows, load_average=[load, load_average()])


# ---- python tools/bench.py convolutions: Winograd against oneDNN, shape by shape ----

def convolution_shapes(model: str, side: int) -> Counter:
    """(input channels, output channels, map side) -> count, of every 3x3 convolution that one call of
    SD v1.5's UNet, or one decode, makes for a side x side image (a call on the meta device)."""
    shapes = Counter()
    with torch.device("meta"), torch.no_grad():
        net = UNet(UNetConfig()) if model == "unet" else VAE(VAEConfig()).decoder
        for conv in net.modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                conv.register_forward_pre_hook(lambda m, x: shapes.update([(m.in_channels, m.out_channels, x[0].shape[-1])]))
        latent = torch.empty(1, 4, side // LATENT_FACTOR, side // LATENT_FACTOR)
        net(latent, torch.tensor([281]), torch.empty(1, 77, 768)) if model == "unet" else net(latent)
    return shapes


@torch.no_grad()
def bench_convolutions(args, device, dtype):
    """Each 3x3 convolution shape of a UNet call and a decode at --size, --batch images per call, random
    weights: torch's convolution (oneDNN on the CPU) in the usual layout and in channels_last, and
    Winograd's F(4x4, 3x3) (speed.winograd_convolution, the filters transformed in the call, as
    speed.FastConv2d does); seconds per image for all the convolutions of that shape in the model, and
    what speed.FastConv2d's choice (the faster of oneDNN and Winograd, measured where it runs) costs."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for model in ("unet", "decoder"):
        for (c_in, c_out, side), count in sorted(convolution_shapes(model, args.size[0]).items()):
            conv = nn.Conv2d(c_in, c_out, 3, padding=1).to(device, dtype)
            x = torch.randn(args.batch, c_in, side, side, generator=g).to(device, dtype)
            x_last = x.contiguous(memory_format=torch.channels_last)
            weight_last = conv.weight.contiguous(memory_format=torch.channels_last)
            seconds = timed([lambda: F.conv2d(x, conv.weight, conv.bias, padding=1),
                             lambda: F.conv2d(x_last, weight_last, conv.bias, padding=1),
                             lambda: speed.winograd_convolution(x, speed.winograd_filters(conv.weight), conv.bias)],
                            device, args.repeats)
            onednn, channels_last, winograd = (s * count / args.batch for s in seconds)
            rows.append(dict(model=model, in_channels=c_in, out_channels=c_out, side=side, count=count, onednn_s=onednn,
                             channels_last_s=channels_last, winograd_s=winograd))
            print(f"{model:<8}{c_in:>5} -> {c_out:<5}{side:>4}x{side:<4} x{count:<3} oneDNN {onednn:7.3f} s, channels_last "
                  f"{channels_last:7.3f} s, Winograd {winograd:7.3f} s ({winograd / onednn:.2f} of oneDNN's)", flush=True)
    for model in ("unet", "decoder"):
        mine = [r for r in rows if r["model"] == model]
        chosen = sum(min(r["winograd_s"], r["onednn_s"]) for r in mine)
        print(f"{model}: all 3x3 convolutions per image, oneDNN {sum(r['onednn_s'] for r in mine):.2f} s, channels_last "
              f"{sum(r['channels_last_s'] for r in mine):.2f} s, speed.FastConv2d's choice {chosen:.2f} s")
    return dict(command="convolutions", size=args.size[0], batch=args.batch, device=str(device), dtype=str(dtype),
                rows=rows, load_average=load_average())


# ---- python tools/bench.py profile: where a modulated step's time goes, against diffusers ----

def seconds_by_operator(prof, images: int) -> dict:
    """Self CPU seconds per image of each operator in a torch.profiler run."""
    return {e.key: e.self_cpu_time_total / 1e6 / images for e in prof.key_averages() if e.self_cpu_time_total > 0}


@torch.no_grad()
def shared_attention_rows(unet, side: int, device, dtype, repeats: int) -> list[dict]:
    """The full-resolution self-attention of a modulated step (SD v1.5: 8 heads, h*w tokens of 320
    channels at a side x side image): the probabilities shared by the runs against SDPA run by run,
    per run, for 1 to 8 runs: the two paths that speed.FastAttention chooses between."""
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    tokens, channels = (side // LATENT_FACTOR) ** 2, layer.to_q.in_features
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, tokens, channels, generator=g).to(device, dtype) for _ in range(2))
    rows = []
    for runs in range(1, 9):
        v = torch.randn(runs, tokens, channels, generator=g).to(device, dtype)
        shared_s, sdpa_s = timed([lambda: speed.shared_probabilities_attention(q, k, v, layer.heads),
                                  lambda: F.scaled_dot_product_attention(*(layer._split_heads(a, runs)
                                                                           for a in (q, k, v)))],
                                 device, repeats)
        rows.append(dict(runs=runs, tokens=tokens, shared_s=shared_s, sdpa_s=sdpa_s))
        print(f"self-attention, {tokens} tokens, {runs} runs: shared {shared_s / runs:.3f} s per run, SDPA "
              f"{sdpa_s / runs:.3f} s ({shared_s / sdpa_s:.2f} of SDPA's time)")
    return rows


@torch.no_grad()
def bench_profile(args, device, dtype):
    """Per image, one plain UNet evaluation of diffusers and one modulated step of ours (after t_m,
    every run in full, all savings on), each at every --batches (diffusers: images per call; ours:
    runs per call): wall seconds (the median of --repeats interleaved calls after a warm-up, without
    the profiler, whose overhead per operator would weigh more on diffusers' many small ones), then
    one call each under torch.profiler: self seconds by operator side by side. Then the shared
    self-attention against SDPA by runs."""
    from torch.profiler import ProfilerActivity, profile
    sd = load_models(args, device, dtype)
    ref_unet, _ = reference_models(sd.unet, sd.vae, device, dtype)
    g = torch.Generator().manual_seed(0)
    rows, attention = [], []
    for side in args.size:
        with as_segment_runs(sd, side):  # ours as segment() runs it
            x = torch.randn(1, 4, side // LATENT_FACTOR, side // LATENT_FACTOR, generator=g).to(device, dtype)
            context = torch.randn(1, 77, sd.unet.config.cross_attention_dim, generator=g).to(device, dtype)
            t = torch.tensor([281], device=device)
            for batch in args.batches:
                calls = dict(diffusers=lambda: ref_unet(x.expand(batch, -1, -1, -1), t, context.expand(batch, -1, -1)),
                             ours=modulated_step(sd.unet, x, context, t, batch))
                seconds = timed(list(calls.values()), device, args.repeats)
                row = dict(size=side, batch=batch, **{f"{name}_s": s / batch for name, s in zip(calls, seconds)})
                for name, call in calls.items():
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        call()
                    row[f"{name}_by_operator"] = seconds_by_operator(prof, batch)
                rows.append(row)
                print_profile(row, args.top)
            attention += shared_attention_rows(sd.unet, side, device, dtype, args.repeats)
    return dict(command="profile", device=str(device), dtype=str(dtype), torch=torch.__version__, rows=rows,
                shared_attention=attention, load_average=load_average())


def print_profile(row, top: int):
    ours, ref = row["ours_by_operator"], row["diffusers_by_operator"]
    print(f"{row['size']}x{row['size']}, batch {row['batch']}: per image, diffusers {row['diffusers_s']:.2f} s, "
          f"our modulated step {row['ours_s']:.2f} s ({row['ours_s'] / row['diffusers_s']:.2f} of diffusers')")
    for op in sorted(ours.keys() | ref.keys(), key=lambda op: -max(ours.get(op, 0), ref.get(op, 0)))[:top]:
        print(f"    {op:<52}{ref.get(op, 0):>8.3f} s{ours.get(op, 0):>8.3f} s")


# ---- python tools/bench.py method: segment() against the authors' notebook approach ----

class OurPipeline:
    """emerdiff.segment() on metered models. The batch sizes are chosen first, on the models
    unmetered: a stage of its own (on CUDA, "auto" probes the memory with UNet calls and decodes
    that are not the method's), the pair chosen then given to segment()."""

    def __init__(self, sd, dtype, meter):
        self.plain = sd if next(sd.unet.parameters()).dtype == dtype else converted(sd, dtype)
        self.sd = StableDiffusion(MeteredUNet(self.plain.unet, meter), MeteredVAE(self.plain.vae, meter),
                                  self.plain.text_encoder, self.plain.tokenizer)

    def __call__(self, image, o):
        watch = Stopwatch(next(self.plain.unet.parameters()).device)
        pixels, _ = emerdiff.load_image(image, o["size"])
        with devices.speed_settings(self.plain, *pixels.shape[-2:], o) as layout:  # as segment() lays it out
            sizes = layout.batch_size, layout.decode_batch_size
        watch.lap("batch sizes")
        seg = emerdiff.segment(image, self.sd, **o | dict(speed=o["speed"] | dict(batch_size=sizes)))
        return seg.difference_maps, watch.seconds | seg.seconds


def bench_method(args, device, _dtype):
    """Each contender in a new process of its own, one after the other, as a user runs each: the warm-up
    round, then --repeats timed rounds. Ours keeps freed memory for each segment() call
    (devices.freed_memory_kept); the notebook's process keeps glibc's defaults unless --notebook-allocator
    kept, which keeps freed memory for the whole process."""
    preset = PRESETS[args.preset]
    o = emerdiff.DEFAULTS | preset["options"]
    load = load_average()
    names = [f"ours, {name}" for name in preset["dtypes"]] + ["notebook, float32"]
    if preset["dtypes"][0] != "float32":  # the notebook at our precision too: the method's structure against precision
        names.append(f"notebook, {preset['dtypes'][0]}")
    spawn = multiprocessing.get_context("spawn")
    results = {}
    for name in names:
        with spawn.Pool(1) as process:
            results[name] = process.apply(contender_rounds, (name, args, o, device))
    report = method_report(results, args, o, device, load)
    print_method(report)
    return report


def contender_rounds(name: str, args, o, device) -> dict:
    """One contender ("ours, float32", "notebook, float16"...): its seconds per stage in every round
    (round 0 the warm-up, which also counts calls, images and FLOPs), its counts and its maps."""
    pipeline, dtype = name.split(", ")
    if pipeline == "notebook" and args.notebook_allocator == "kept":
        devices.freed_memory_kept().__enter__()  # for the rest of this process
    meter = Meter()
    sd = load_models(args, device, torch.float32)
    run = (OurPipeline if pipeline == "ours" else NotebookPipeline)(sd, getattr(torch, dtype), meter)
    del sd  # the notebook's process holds diffusers' copies of the models alone, as the notebook does
    result = dict(seconds={stage: [] for stage in STAGES})
    for rep in range(args.repeats + 1):
        meter.reset(count_flops=rep == 0)
        maps, seconds = run(args.image, o)
        for stage in STAGES:
            result["seconds"][stage].append(seconds.get(stage, 0.0))  # [0]: the warm-up's
        if rep == 0:
            result["counts"] = {stage: dict(meter.stages[stage]) for stage in STAGES}
            result["maps"] = maps.float().cpu()
        print(f"round {rep} {name}: {sum(seconds.values()):.1f} s", file=sys.stderr, flush=True)
    result["peak_resident_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    return result


def method_report(results, args, o, device, load) -> dict:
    """Per contender and stage: median seconds, calls, images, FLOPs; the agreement of its labels with
    ours (each contender runs its own k-means, which may number the same clusters differently: the
    numbers are matched first); the ratio reference / ours of every number."""
    ours_name = next(iter(results))
    ours_maps = results[ours_name]["maps"]
    contenders = {}
    for name, r in results.items():
        stages = {stage: dict(seconds=statistics.median(r["seconds"][stage][1:]), **r["counts"][stage])
                  for stage in STAGES}
        total = {key: sum(stage[key] for stage in stages.values()) for key in ("seconds", "unet_calls", "unet_images",
                                                                                "flops")}
        at_defaults = scaled_to_defaults({stage: s["seconds"] for stage, s in stages.items()}, o)
        contenders[name] = dict(stages=stages, total=total, seconds_scaled_to_defaults=at_defaults,
                                round_totals_seconds=[sum(t) for t in zip(*r["seconds"].values())],  # round 0: warm-up
                                label_agreement_with_ours=matched_agreement(r["maps"].argmax(0), ours_maps.argmax(0),
                                                                            len(ours_maps)),
                                max_map_difference_to_ours=relative_difference(r["maps"], ours_maps),
                                peak_resident_gb=r["peak_resident_gb"])
    ours_at_defaults = contenders[ours_name]["seconds_scaled_to_defaults"]["total"]
    ratios = {name: {key: c["total"][key] / max(contenders[ours_name]["total"][key], 1e-12)
                     for key in ("seconds", "unet_calls", "unet_images", "flops")}
              | {"seconds_scaled_to_defaults": c["seconds_scaled_to_defaults"]["total"] / ours_at_defaults}
              for name, c in contenders.items() if name != ours_name}
    return dict(command="method", preset=args.preset, device=str(device), torch=torch.__version__,
                weights=args.weights or "random (SD v1.5 architecture)", image=str(args.image), repeats=args.repeats,
                options={k: o[k] for k in ("size", "masks", "feature_samples", "kmeans_restarts", "t_m", "t_f",
                                           "steps", "speed")},
                load_average=[load, load_average()], contenders=contenders, ratio_to_ours=ratios)


def print_method(report):
    print(f"{report['preset']} preset on {report['device']}: {report['options']}; load {report['load_average']}")
    print(f"{'':<22}{'stage':<12}{'seconds':>9}{'UNet calls':>12}{'UNet images':>13}{'TFLOP':>9}")
    for name, c in report["contenders"].items():
        for stage, s in [*c["stages"].items(), ("total", c["total"])]:
            print(f"{name:<22}{stage:<12}{s['seconds']:>9.2f}{s['unet_calls']:>12}{s['unet_images']:>13}"
                  f"{s['flops'] / 1e12:>9.2f}")
        print(f"{'':<22}labels agree with ours on {c['label_agreement_with_ours']:.1%} of the pixels "
              f"(maps differ by {c['max_map_difference_to_ours']:.1e} of their maximum); "
              f"at most {c['peak_resident_gb']:.2f} GB resident")
    for name, r in report["ratio_to_ours"].items():
        print(f"{name} / ours: " + ", ".join(f"{key} {value:.2f}" for key, value in r.items()))
    print("scaled to the defaults (K = 25, 100 draws; features by the draws, modulation by the masks): "
          + ", ".join(f"{name} {c['seconds_scaled_to_defaults']['total']:.0f} s"
                      for name, c in report["contenders"].items()))


# ---- python tools/bench.py flops: the FLOPs of a preset, counted without computing ----

@torch.no_grad()
def bench_flops(args, _device, _dtype):
    """Our steps on the meta device (shapes only, no numbers), stage by stage, under the flop
    counter; the masks are any partition of the grid (k-means needs numbers; the cost does not
    depend on them). The notebook approach runs every UNet call in full: its FLOPs are its counts
    (the method bench's) times a full UNet image, plus the same decodes."""
    o = emerdiff.DEFAULTS | PRESETS[args.preset]["options"]
    meter = Meter()
    meter.reset(count_flops=True)
    with torch.device("meta"):
        sd = random_stable_diffusion("sd15", "meta", torch.float32)
    sd = StableDiffusion(MeteredUNet(sd.unet, meter), MeteredVAE(sd.vae, meter), sd.text_encoder, sd.tokenizer)
    side, runs, steps = o["size"], 2 * o["masks"], len(sampler.timesteps_until(o["t_m"], o["steps"]))
    batch = devices.CPU_BATCH_SIZES[0] if args.batch_size is None else args.batch_size
    x0 = emerdiff.encode(sd, torch.zeros(1, 3, side, side, device="meta"))
    emerdiff.extract_features(sd, x0, samples=o["feature_samples"], batch_size=batch)
    inversion = emerdiff.invert(sd, x0, batch_size=batch)
    grid = side // GRID_FACTOR
    masks = emerdiff.low_resolution_masks(torch.arange(grid * grid, device="meta") % o["masks"], (grid, grid),
                                          o["masks"])
    emerdiff.difference_maps(sd, inversion, masks, batch_size=batch)
    ours = {stage: dict(counts) for stage, counts in meter.stages.items()}
    meter.reset(count_flops=True)
    latent = torch.zeros(1, 4, side // 8, side // 8, device="meta")
    sd.unet(latent, torch.tensor([1], device="meta"), inversion.context, sampler.AttentionRecord())
    sd.vae.decode(latent)
    emerdiff.encode(sd, torch.zeros(1, 3, side, side, device="meta"))
    unet_image, decode, encode = (meter.stages[stage]["flops"] for stage in ("inversion", "modulation", "features"))
    images = dict(features=o["feature_samples"], inversion=o["steps"], recording=steps, modulation=runs * steps)
    extra = dict(features=encode, modulation=runs * decode)
    notebook = {stage: dict(unet_images=n, flops=n * unet_image + extra.get(stage, 0)) for stage, n in images.items()}
    both = dict(ours=ours, notebook=notebook)
    total = {name: sum(s["flops"] for s in stages.values()) for name, stages in both.items()}
    print(f"{args.preset} preset, batch {batch}: a full UNet image {unet_image / 1e12:.3f} TFLOP, a decode "
          f"{decode / 1e12:.3f} TFLOP")
    for name, stages in both.items():
        print(f"{name:<9}" + ", ".join(f"{stage} {s['flops'] / 1e12:.1f}" for stage, s in stages.items())
              + f"; total {total[name] / 1e12:.1f} TFLOP")
    return dict(command="flops", preset=args.preset, batch_size=batch, unet_image_flops=unet_image,
                decode_flops=decode, ours=ours, notebook=notebook, total=total)


# ---- python tools/bench.py precision: float16 / bfloat16 against float32 ----

def tiny_stable_diffusion() -> StableDiffusion:
    """The tests' tiny random-weight models (tests/tiny_models.py, built by diffusers/transformers)
    in our classes; the byte tokenizer stands in for the vocabulary (the prompt is empty)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import TINY_CLIP, TINY_UNET, TINY_VAE, tiny_reference_models
    from weights import config_from_dict
    ref_unet, ref_vae, ref_clip = tiny_reference_models()
    unet, vae = UNet(config_from_dict(UNetConfig, TINY_UNET)), VAE(config_from_dict(VAEConfig, TINY_VAE))
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP))
    unet.load_state_dict(ref_unet.state_dict())
    vae.load_state_dict(ref_vae.state_dict())
    text_encoder.load_state_dict({k if k.startswith("text_model.") else "text_model." + k: v
                                  for k, v in ref_clip.state_dict().items()}, strict=False)
    return StableDiffusion(unet.eval(), vae.eval(), text_encoder.eval(), CLIPTokenizer.bytes_only())


def matched_agreement(labels, reference, k) -> float:
    """Share of the cells with the same cluster, the clusters' numbers matched one to one for the
    largest overlap (k-means numbers its clusters arbitrarily)."""
    from scipy.optimize import linear_sum_assignment
    overlap = torch.zeros(k, k)
    overlap.index_put_((labels.flatten().cpu(), reference.flatten().cpu()), torch.ones(labels.numel()), accumulate=True)
    rows, cols = linear_sum_assignment(-overlap.numpy())
    return overlap[rows, cols].sum().item() / labels.numel()


ATEN = torch.ops.aten
PRODUCTS = {ATEN.mm.default, ATEN.addmm.default, ATEN.bmm.default, ATEN.baddbmm.default, ATEN.convolution.default}
FLASH_ATTENTION = ATEN._scaled_dot_product_flash_attention_for_cpu.default
HALF = (torch.bfloat16, torch.float16)


class HalfArithmetic(TorchDispatchMode):
    """Half-precision arithmetic at about float32's speed on a CPU without instructions for it: what
    PyTorch's half kernels compute, by other means. Those kernels (oneDNN's where the CPU has AVX-512
    BF16/FP16 or AMX, PyTorch's reference ones elsewhere, dozens of times slower) multiply half inputs,
    sum the products in float32 and round the sum to half once. Here the matrix products and
    convolutions of half tensors are computed in float32 from the same half inputs (exactly: every half
    value is a float32 value) and rounded to half once; SDPA as PyTorch's CPU flash kernel computes it:
    the scores, their maximum and the softmax's sums in float32, the exponentials rounded to half before
    they weight the values. Every other operator runs PyTorch's own half kernel. Only the order of the
    sums differs (tests/test_bench.py checks the tiny models against PyTorch's own half kernels)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in PRODUCTS and func is not FLASH_ATTENTION:
            return func(*args, **kwargs)
        half = {a.dtype for a in args if isinstance(a, torch.Tensor)} & set(HALF)
        if not half:
            return func(*args, **kwargs)
        (dtype,) = half
        if func is FLASH_ATTENTION:
            if kwargs.get("attn_mask") is not None:
                raise NotImplementedError("HalfArithmetic's attention takes no attention mask")
            return flash_attention(*args[:3], dtype, causal=any(args[4:5]), scale=kwargs.get("scale"))
        widened = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
        return func(*widened, **kwargs).to(dtype)


def flash_attention(q, k, v, dtype, causal=False, scale=None, block: int = 256):
    """softmax(q k^T * scale) v of half tensors (B, heads, N, d) as PyTorch's CPU flash kernel computes it,
    `block` queries at a time, `causal`: query i sees keys 0..i (CLIP's text encoder) -> (output in half,
    logsumexp in float32), the kernel's two results."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    logsumexp = q.new_empty(q.shape[:-1], dtype=torch.float32)
    k, v = k.float(), v.float()
    for start in range(0, q.shape[-2], block):
        scores = q[..., start:start + block, :].float() @ k.transpose(-1, -2) * scale  # (B, heads, block, M)
        if causal:
            queries = torch.arange(start, start + scores.shape[-2], device=q.device)[:, None]
            scores.masked_fill_(torch.arange(k.shape[-2], device=q.device) > queries, -math.inf)
        top = scores.amax(-1, keepdim=True)
        weights = torch.exp(scores - top)
        sums = weights.sum(-1, keepdim=True)
        out[..., start:start + block, :] = (weights.to(dtype).float() @ v / sums).to(dtype)
        logsumexp[..., start:start + block] = (top + sums.log()).squeeze(-1)
    return out, logsumexp


def half_arithmetic(device, dtype):
    """Where `dtype` runs by PyTorch's own kernels: "native"; on a CPU without instructions for it: "emulated"."""
    return "emulated" if device.type == "cpu" and not devices.cpu_computes(dtype) else "native"


def method_stages(sd, pixels, grid, args, masks=None) -> dict:
    """The method's stages on `sd`, each from its own generator seeded alike: the latents, the features, the
    low-resolution masks (k-means), then the difference maps from `masks` (else its own) and their labels;
    and the seconds of each."""
    seeded = lambda: torch.Generator().manual_seed(42)  # noqa: E731
    watch, k = Stopwatch(pixels.device), args.masks
    runs, decodes = devices.CPU_BATCH_SIZES if pixels.device.type == "cpu" else (2 * k, 2)
    x0 = emerdiff.encode(sd, pixels)
    watch.lap("encoding")
    features = emerdiff.extract_features(sd, x0, samples=args.feature_samples, generator=seeded(), batch_size=runs)
    watch.lap("features")
    low_res, _ = emerdiff.kmeans(features, k, n_init=10, generator=seeded())
    watch.lap("k-means")
    masks = emerdiff.low_resolution_masks(low_res, grid, k) if masks is None else masks
    inversion = emerdiff.invert(sd, x0, generator=seeded(), batch_size=runs)
    maps = emerdiff.difference_maps(sd, inversion, masks, batch_size=runs, decode_batch_size=decodes)
    watch.lap("modulation")
    return dict(latents=x0, features=features, low_res=low_res, masks=masks, maps=maps, seconds=watch.seconds)


def compared_stages(half: dict, reference: dict, k: int) -> dict:
    """Each stage of a half-precision run against float32's: the latents and features (largest
    difference relative to their maximum), the low-resolution masks (cells in the same cluster, up to
    the clusters' numbering), the difference maps from float32's masks (largest and mean difference
    relative to their maximum) and their labels (pixels with the same label)."""
    maps, reference_maps = half["maps"], reference["maps"]
    return dict(latents=relative_difference(half["latents"], reference["latents"]),
                features=relative_difference(half["features"], reference["features"]),
                low_res_agreement=matched_agreement(half["low_res"], reference["low_res"], k),
                max_map_difference=relative_difference(maps, reference_maps),
                mean_map_difference=((maps - reference_maps).abs().mean() / reference_maps.abs().max()).item(),
                label_agreement=(maps.argmax(0) == reference_maps.argmax(0)).float().mean().item())


@torch.no_grad()
def bench_precision(args, device, _dtype):
    """float16 and bfloat16 (--half) against float32, stage by stage (compared_stages), on SD v1.5's
    size with random weights (or --weights; --tiny: the tests' tiny model) at each --size with K =
    --masks and --feature-samples draws. Where the CPU has no instructions for a half type its
    arithmetic is emulated (HalfArithmetic): the agreement, not the speed, is what this measures."""
    reference = tiny_stable_diffusion() if args.tiny else load_models(args, device, torch.float32)
    with devices.freed_memory_kept():  # as segment() keeps it for its call
        rows = [row for size in args.size for row in precision_rows(reference, size, args, device)]
    model = "tiny (tests)" if args.tiny else args.weights or "random SD v1.5-size"
    return dict(command="precision", model=model, device=str(device), image=str(args.image), rows=rows)


def precision_rows(reference, size: int, args, device) -> list[dict]:
    """float32's stages at one size, then each half type's from float32's masks, compared and printed."""
    pixels = emerdiff.load_image(args.image, size)[0].to(device)
    grid = feature_grid(*pixels.shape[-2:])
    float32, rows = method_stages(reference, pixels, grid, args), []
    for name in args.half:
        dtype = getattr(torch, name)
        arithmetic = half_arithmetic(device, dtype)
        with HalfArithmetic() if arithmetic == "emulated" else nullcontext():
            half = method_stages(converted(reference, dtype), pixels, grid, args, masks=float32["masks"])
        rows.append(dict(dtype=name, arithmetic=arithmetic, size=size, masks=args.masks,
                         feature_samples=args.feature_samples, seconds=half["seconds"],
                         float32_seconds=float32["seconds"], **compared_stages(half, float32, args.masks)))
        r = rows[-1]
        print(f"{name:<9} ({arithmetic}) {size}x{size}, K = {args.masks}, {args.feature_samples} draws: latents within "
              f"{r['latents']:.1e} and features within {r['features']:.1e} of their maximum, low-resolution masks "
              f"agree on {r['low_res_agreement']:.1%} of the cells; from float32's masks, maps differ by at most "
              f"{r['max_map_difference']:.1e} of their maximum (mean {r['mean_map_difference']:.1e}), labels "
              f"agree on {r['label_agreement']:.1%} of the pixels", flush=True)
    return rows


# ---- python tools/bench.py time: seconds per image, measured and extrapolated to the defaults ----

def bench_time(args, device, dtype):
    """segment() timed stage by stage at each --size with --masks and --feature-samples (fewer than
    the defaults, to take minutes), then scaled to the defaults stage by stage: the features by the
    draws, the modulated runs and decodes by the masks; beside it, what the CLI's estimate line says
    for both settings (devices.estimate, made before the image as the command line makes it)."""
    sd = tiny_stable_diffusion() if args.tiny else load_models(args, device, dtype)
    measured_options = dict(masks=args.masks, feature_samples=args.feature_samples)
    defaults = emerdiff.DEFAULTS
    rows = []
    for size in args.size:
        height, width = emerdiff.load_image(args.image, size)[0].shape[-2:]
        working = (width, height)
        estimate = devices.estimate(sd, working, defaults | measured_options | dict(size=size)).seconds
        seg = emerdiff.segment(args.image, sd, size=size, **measured_options)
        extrapolated = scaled_to_defaults(seg.seconds, measured_options)
        rows.append(dict(size=size, options=measured_options, measured=seg.seconds,
                         defaults_extrapolated=extrapolated, estimate=estimate,
                         defaults_estimate=devices.estimate(sd, working, defaults | dict(size=size)).seconds))
        r = rows[-1]
        print(f"{size}x{size}, K = {args.masks}, {args.feature_samples} draws: {sum(seg.seconds.values()):.0f} s ("
              + ", ".join(f"{stage} {v:.1f}" for stage, v in seg.seconds.items())
              + f"; the CLI's estimate {r['estimate']:.0f} s); the defaults: {extrapolated['total']:.0f} s "
              f"extrapolated, {r['defaults_estimate']:.0f} s estimated")
    return dict(command="time", model="tiny (tests)" if args.tiny else args.weights or "random SD v1.5-size",
                device=str(device), dtype=str(dtype), rows=rows)


# ---- python tools/bench.py cuda: memory and synchronisation on the GPU ----

GIB = 2 ** 30


def bench_cuda(args, device, dtype):
    """(1) segment() with its defaults at 512x512 within what a 12 GB card leaves PyTorch (--cap-gib,
    set by set_per_process_memory_fraction): the batch sizes "auto" chooses within it, then the peak
    memory and the time of the run with them. (2) Synchronisations of the host with the GPU in the
    modulated runs: counted by torch.cuda's sync debug mode for 5 and for 15 steps; equal counts
    mean that no step waits for the GPU."""
    if device.type != "cuda":
        raise SystemExit("bench.py cuda needs CUDA")
    sd = load_models(args, device, dtype)
    index = device.index if device.index is not None else torch.cuda.current_device()  # set_...fraction needs one
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total), index)
    torch.cuda.empty_cache()
    with devices.speed_settings(sd, 512, 512, emerdiff.DEFAULTS) as layout:
        batch = layout.batch_size, layout.decode_batch_size
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    seg = emerdiff.segment(args.image, sd, size=512, speed=dict(batch_size=batch))
    peak, seconds = torch.cuda.max_memory_allocated(device) / GIB, time.perf_counter() - start
    memory = dict(cap_gib=args.cap_gib, peak_gib=peak, seconds=seconds, stages=seg.seconds, batch_sizes=batch)
    print(f"defaults at 512x512 within {args.cap_gib} GiB: batch sizes (UNet, decode) {batch}, peak "
          f"{memory['peak_gib']:.2f} GiB, {memory['seconds']:.1f} s")
    torch.cuda.set_per_process_memory_fraction(1.0, index)
    x0 = emerdiff.encode(sd, emerdiff.load_image(args.image, 512)[0])
    inversion = emerdiff.invert(sd, x0, generator=torch.Generator().manual_seed(0), batch_size=15)
    offsets = torch.zeros(8, (512 // GRID_FACTOR) ** 2, device=device, dtype=dtype)  # the 16x16 grid

    def syncs(steps):
        with devices.speed_settings(sd, 512, 512, emerdiff.DEFAULTS), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sampler.regenerate(sd.unet, inversion.x_start, inversion.zs, inversion.timesteps[:steps],
                                   inversion.context, hooks=sampler.Modulation(offsets, inversion.record))
                torch.cuda.synchronize(device)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught)
    counts = {steps: syncs(steps) for steps in (5, 15)}
    print(f"host-device synchronisations in the modulated runs: {counts} (by number of steps)")
    return dict(command="cuda", device=torch.cuda.get_device_name(device), memory=memory,
                synchronisations_by_steps=counts)


# ---- python tools/bench.py compile: torch.compile on a single image and on a folder ----

def bench_compile(args, device, dtype):
    """segment() with the preset's options, without and with compile=True: the first image
    (compilation included) and a second one; the number of images from which compiling pays off."""
    o = PRESETS[args.preset]["options"]
    times = {}
    for compiled in (False, True):
        sd = load_models(args, device, dtype)
        runs = []
        for _ in range(2):
            start = clock(device)
            emerdiff.segment(args.image, sd, speed=dict(compile=compiled), **o)
            runs.append(clock(device) - start)
        times["compiled" if compiled else "eager"] = runs
        print(f"{'compiled' if compiled else 'eager':<9} first image {runs[0]:.1f} s, next {runs[1]:.2f} s")
    (eager_first, eager_next), (compiled_first, compiled_next) = times["eager"], times["compiled"]
    gain = eager_next - compiled_next
    break_even = math.ceil((compiled_first - eager_first) / gain) + 1 if gain > 0 else None
    print(f"compiling pays off from image {break_even}" if break_even else "compiling does not pay off")
    return dict(command="compile", preset=args.preset, device=str(device), dtype=str(dtype), options=o,
                seconds=times, pays_off_from_image=break_even)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="models", choices=["models", "profile", "method", "flops", "precision",
                                                                 "time", "cuda", "compile", "convolutions"])
    p.add_argument("--weights", help="real weights (hub id, folder or file); default: random SD v1.5-size models")
    p.add_argument("--image", default=str(EXAMPLE), help="the image segmented by method, precision, time, cuda, compile")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="method, compile: the device, sizes and options")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--size", type=int, nargs="+", default=[512], help="models, profile, precision, time: image sides in pixels; convolutions: the first")
    p.add_argument("--batch", type=int, default=2, help="models, convolutions: images per UNet/VAE call")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="profile: images (diffusers) and runs (ours) per UNet call")
    p.add_argument("--top", type=int, default=12, help="profile: the operators printed per row")
    p.add_argument("--skip-vae", action="store_true", help="models: only the UNet rows")
    p.add_argument("--runs", type=int, default=8, help="models: modulated runs per batch in the hooked rows")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (at least 1)")
    p.add_argument("--batch-size", type=int, help="flops: runs per UNet call (default: the CPU's automatic 16)")
    p.add_argument("--masks", type=int, default=4, help="time, precision: K of the measured runs")
    p.add_argument("--feature-samples", type=int, default=8, help="time, precision: feature draws of the measured runs")
    p.add_argument("--tiny", action="store_true", help="time, precision: the tests' tiny model instead of SD v1.5's size")
    p.add_argument("--half", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"],
                   help="precision: the half types compared with float32")
    p.add_argument("--cap-gib", type=float, default=11, help="cuda: the memory the defaults must fit in (a 12 GB "
                   "card, less the CUDA context and the display)")
    p.add_argument("--notebook-allocator", default="default", choices=["default", "kept"],
                   help="method: the notebook's process with glibc's defaults, or keeping freed memory as ours does")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1: the first round of each is a warm-up, not timed")
    return args


def main(argv=None):
    args = parse_args(argv)
    preset_device = PRESETS[args.preset]["device"] if args.command in ("method", "compile") else args.device
    if preset_device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"the {args.preset} preset needs CUDA")
    device = devices.pick_device(preset_device)
    dtype = devices.pick_dtype(args.dtype, device)
    print(f"{args.command}: device {device}, {dtype}, torch {torch.__version__}, load average {load_average():.2f}")
    commands = dict(models=bench_models, profile=bench_profile, method=bench_method, flops=bench_flops,
                    precision=bench_precision, time=bench_time, cuda=bench_cuda, compile=bench_compile,
                    convolutions=bench_convolutions)
    result = commands[args.command](args, device, dtype)
    if args.json:
        try:
            atomic_save(Path(args.json), lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
        except (OSError, FileError) as e:  # a FIFO, device or folder there is never replaced (files.atomic_save)
            raise SystemExit(f"--json: cannot write it: {e}") from None


if __name__ == "__main__":
    main()
