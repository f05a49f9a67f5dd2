"""Speed, side by side in one run: our UNet and VAE against diffusers' on the same weights, the
cost of the attention hooks, and (with real weights) the whole method stage by stage.

    python bench.py                                   # SD v1.5 size, random weights, best device
    python bench.py --weights stable-diffusion-v1-5/stable-diffusion-v1-5 --method examples/chelsea.jpg
    python bench.py --device cpu --size 64 --repeats 1  # a quick run on a CPU

Needs the dev requirements (diffusers) for the side-by-side rows. Times are medians of --repeats
interleaved calls after a warm-up; each row also gives the largest difference from diffusers'
output, relative to its scale.
"""
import argparse
import statistics
import time

import torch

import emerdiff
import sampler
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig


def timed(fns, device, repeats: int) -> list[float]:
    """Median seconds of each of `fns`, called in turn `repeats` times after a warm-up call each:
    interleaved, so that drift in clock speed or load falls on all of them alike."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    times = [[] for _ in fns]
    for rep in range(repeats + 1):
        for fn, spent in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if rep:  # the first round is the warm-up
                spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def reference_models(unet: UNet, vae: VAE, device, dtype):
    """diffusers' UNet2DConditionModel and AutoencoderKL holding our models' weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging
    logging.set_verbosity_error()
    c = unet.config
    ref_unet = UNet2DConditionModel(
        block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
        attention_head_dim=c.attention_head_dim, cross_attention_dim=c.cross_attention_dim,
        norm_num_groups=c.norm_num_groups, down_block_types=c.down_block_types, up_block_types=c.up_block_types)
    ref_vae = AutoencoderKL(block_out_channels=vae.config.block_out_channels,
                            layers_per_block=vae.config.layers_per_block,
                            down_block_types=("DownEncoderBlock2D",) * len(vae.config.block_out_channels),
                            up_block_types=("UpDecoderBlock2D",) * len(vae.config.block_out_channels),
                            latent_channels=vae.config.latent_channels)
    ref_unet.load_state_dict(unet.state_dict())
    ref_vae.load_state_dict(vae.state_dict())
    return ref_unet.to(device, dtype).eval(), ref_vae.to(device, dtype).eval()


def relative_difference(ours, ref) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@torch.no_grad()
def compare_models(unet, vae, args, device, dtype):
    ref_unet, ref_vae = reference_models(unet, vae, device, dtype)
    h = w = args.size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, h, w, generator=g).to(device, dtype)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    contexts = context.expand(args.batch, -1, -1)
    rows = []
    ours_s, ref_s = timed([lambda: unet(x, 281, context), lambda: ref_unet(x, 281, contexts)], device, args.repeats)
    rows.append(("UNet", ours_s, ref_s, relative_difference(unet(x, 281, context), ref_unet(x, 281, contexts).sample)))
    latent = x[:, :4] * 0.5
    ours_s, ref_s = timed([lambda: vae.decode(latent), lambda: ref_vae.decode(latent / vae.config.scaling_factor)],
                          device, args.repeats)
    rows.append(("VAE decode", ours_s, ref_s,
                 relative_difference(vae.decode(latent), ref_vae.decode(latent / vae.config.scaling_factor).sample)))
    title = f"batch {args.batch} at {args.size}px"
    print(f"{title:<28}{'ours':>10}{'diffusers':>11}{'ratio':>8}{'max diff':>11}")
    for name, ours_s, ref_s, diff in rows:
        print(f"{name:<28}{ours_s * 1e3:>8.1f}ms{ref_s * 1e3:>9.1f}ms{ref_s / ours_s:>8.2f}{diff:>11.2e}")
    hooks_overhead(unet, x, context, args, device)


@torch.no_grad()
def hooks_overhead(unet, x, context, args, device):
    """One denoising step with attention injection and modulation, against a plain UNet call."""
    record = sampler.AttentionRecord()
    sampler.predict_noise(unet, x[:1], 281, context, record, step=0)
    offsets = torch.zeros(args.batch, (args.size // 32) ** 2, device=device)
    modulation = sampler.Modulation(offsets, record)
    plain_s, hooked_s = timed([lambda: unet(x, 281, context),
                               lambda: sampler.predict_noise(unet, x, 281, context, modulation, step=0)],
                              device, args.repeats)
    print(f"{'UNet + injection/modulation':<28}{hooked_s * 1e3:>8.1f}ms   ({hooked_s / plain_s:.2f} x the plain UNet)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="real weights (hub id, folder or file); default: random SD v1.5-size models")
    p.add_argument("--method", metavar="IMAGE", help="also time segment() on this image (needs --weights)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--size", type=int, default=512, help="image side in pixels (a multiple of 64)")
    p.add_argument("--batch", type=int, default=8, help="runs per UNet/VAE call")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.method and not args.weights:
        p.error("--method needs --weights")
    device = emerdiff.pick_device(args.device)
    dtype = emerdiff.pick_dtype(args.dtype, device)
    print(f"device {device}, {dtype}, torch {torch.__version__}")
    if args.weights:
        from weights import load_stable_diffusion
        sd = load_stable_diffusion(args.weights, device=device, dtype=dtype)
        unet, vae = sd.unet, sd.vae
    else:
        torch.manual_seed(0)
        unet = UNet(UNetConfig()).to(device, dtype).eval()
        vae = VAE(VAEConfig()).to(device, dtype).eval()
    compare_models(unet, vae, args, device, dtype)
    if args.method:
        seg = emerdiff.segment(args.method, sd, size=args.size, batch_size=args.batch)
        print("segment():", ", ".join(f"{stage} {s:.2f} s" for stage, s in seg.seconds.items()),
              f"total {sum(seg.seconds.values()):.2f} s")


if __name__ == "__main__":
    main()
