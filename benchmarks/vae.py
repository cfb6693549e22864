"""python benchmarks/vae.py [--device cuda] [--sizes 1024 2048 4096] [--worlds 2 4 8] [--out DIR]

What the decode costs one rank when the ranks that share an image split its rows
(ditmesh/parallel/vae.py), and what text encoders each rank holds once `encode_prompt` runs on
one rank (ditmesh/parallel/text.py).

Decode: `AutoencoderKL` built from FLUX.1's config (`FLUX_VAE_CONFIG`), random weights, bf16 on
CUDA (fp32 on CPU), no download; latents (1, 16, size/8, size/8). "serial" is `vae.decode` in one
process. "W = n" is one rank of n: this process is rank 1 (an interior band with both halos;
rank 0 of 2) of torch's fake process group of n. It decodes its band of latent rows and issues
every halo exchange, statistics gather, key/value gather and the final image gather, but the fake
group moves no data: the time is one rank's compute and issue cost without transfer time
(docs/vae.md estimates the transfers), the peak is that rank's `max_memory_allocated` over the
decode, weights and the gathered image included.

Text: parameters of each family's text encoders (published configs, built on the meta device),
as bf16 GiB on the encoding rank and on every other rank of an image group.

Prints both tables; writes OUT/vae_<machine>.json and .md (default OUT: benchmarks/results).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch

from ditmesh.models.flux import FLUX_VAE_CONFIG
from ditmesh.parallel import vae as parallel_vae
from harness import CLIP_G, CLIP_L, GIB, T5_XXL

TEXT_ENCODERS = {  # family: (encoder, class, config) in the adapter's text_encoder_attrs order
    "FLUX.1": (("CLIP-L", "CLIPTextModel", CLIP_L), ("T5-XXL", "T5EncoderModel", T5_XXL)),
    "SD3.5": (("CLIP-L", "CLIPTextModelWithProjection", CLIP_L), ("CLIP-G", "CLIPTextModelWithProjection", CLIP_G),
              ("T5-XXL", "T5EncoderModel", T5_XXL)),
    "SDXL": (("CLIP-L", "CLIPTextModel", CLIP_L), ("CLIP-G", "CLIPTextModelWithProjection", CLIP_G)),
}


def build_vae(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**FLUX_VAE_CONFIG).to(device, dtype).eval()


def time_decode(vae: torch.nn.Module, latent: torch.Tensor, reps: int) -> dict:
    """Mean seconds of `reps` decodes after one untimed, and the peak memory over them."""
    with torch.no_grad():
        vae.decode(latent)
        harness.sync(latent.device)
        harness.reset_peak(latent.device)
        start = time.perf_counter()
        for _ in range(reps):
            vae.decode(latent)
        harness.sync(latent.device)
    seconds = (time.perf_counter() - start) / reps
    return dict(ms=round(seconds * 1e3, 2), peak_gib=harness.peak_gib(latent.device, 2))


def one_rank_of(world: int, vae: torch.nn.Module, latent: torch.Tensor, reps: int) -> dict:
    import torch.distributed as dist

    rank = 1 if world > 2 else 0
    with harness.fake_group(world, rank):
        parallel_vae.install(vae, dist.group.WORLD, min_latent_pixels=0)
        return {"rank": rank, **time_decode(vae, latent, reps)}


def check_moments(device: torch.device) -> float:
    """Max relative error of the split GroupNorm's local statistics (the CUDA Welford kernel on
    bf16) against fp32 var_mean: the one code path the CPU tests do not run."""
    x = (torch.randn(2, 32, 4096, device=device) * 3 + 1).to(torch.bfloat16)
    mean, var = parallel_vae._moments(x)
    ref_var, ref_mean = torch.var_mean(x.float(), dim=-1, correction=0)
    return max(((mean - ref_mean).abs() / ref_var.sqrt()).max().item(), ((var - ref_var).abs() / ref_var).max().item())


def decode_table(args: argparse.Namespace, device: torch.device) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = build_vae(device, dtype)
    rows = []
    # Serial first, before `install` wraps the VAE (a second install only swaps the group).
    latents = {size: torch.randn(1, 16, size // 8, size // 8, device=device, dtype=dtype) for size in args.sizes}
    time_decode(vae, latents[min(args.sizes)], 1)  # warm-up: cuDNN/cuBLAS handles, allocator
    for size in args.sizes:
        reps = 1 if size >= 4096 else args.reps  # seconds each: one timed call is enough
        rows.append(dict(size=size, world=1, **time_decode(vae, latents[size], reps)))
        print(rows[-1], flush=True)
    for world in args.worlds:
        for size in args.sizes:
            reps = 1 if size * size // world >= 4096 * 4096 // 2 else args.reps
            rows.append(dict(size=size, world=world, **one_rank_of(world, vae, latents[size], reps)))
            print(rows[-1], flush=True)
    serial = {row["size"]: row["ms"] for row in rows if row["world"] == 1}
    for row in rows:
        row["speedup"] = round(serial[row["size"]] / row["ms"], 2)
    return rows


def text_table() -> list[dict]:
    import transformers

    rows = []
    for family, encoders in TEXT_ENCODERS.items():
        sizes = {}
        for name, class_name, config in encoders:
            config_cls = transformers.T5Config if class_name.startswith("T5") else transformers.CLIPTextConfig
            with torch.device("meta"):
                model = getattr(transformers, class_name)(config_cls(**config))
            sizes[name] = sum(p.numel() for p in model.parameters()) * 2 / GIB  # bf16
        total = sum(sizes.values())
        rows.append(dict(family=family, encoders={k: round(v, 2) for k, v in sizes.items()},
                         every_rank_before_gib=round(total, 2), encoding_rank_gib=round(total, 2), other_ranks_gib=0.0))
    return rows


def markdown(env: dict, decode: list[dict], text: list[dict]) -> str:
    lines = [f"# Parallel VAE decode, FLUX.1 VAE, {env['machine']}", "",
             f"torch {env['torch']}, {env['dtype']}; one rank of W in torch's fake process group "
             "(compute and issue cost, no transfer time); peak = max_memory_allocated, weights included.", "",
             *harness.table(("image", "W", "ms per rank", "speed-up vs serial", "peak GiB per rank"), [
                 (f"{r['size']}²", "serial" if r["world"] == 1 else r["world"], r["ms"], f"{r['speedup']}x", r["peak_gib"])
                 for r in decode])]
    if env.get("moments_rel_err") is not None:
        lines += ["", f"CUDA GroupNorm statistics vs fp32 var_mean: max relative error {env['moments_rel_err']:.1e}."]
    lines += ["", "## Text encoders per rank (bf16 GiB)", "",
              *harness.table(("family", "encoders", "every rank, before", "encoding rank", "other ranks"), [
                  (r["family"], ", ".join(f"{k} {v}" for k, v in r["encoders"].items()), r["every_rank_before_gib"],
                   r["encoding_rank_gib"], 0) for r in text])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    parser.add_argument("--tag", default=None, help="file name tag (default: h200 / cpu)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    machine = args.tag or harness.machine_tag(device)
    env = dict(machine=machine, torch=torch.__version__, dtype="bf16" if device.type == "cuda" else "fp32",
               moments_rel_err=check_moments(device) if device.type == "cuda" else None)
    decode = decode_table(args, device)
    text = text_table()
    report = markdown(env, decode, text)
    print(report)
    harness.write_results(args.out / f"vae_{machine}", dict(env=env, decode=decode, text=text), report)


if __name__ == "__main__":
    main()
