"""python3 benchmarks/video.py --out benchmarks/results                     # one H200 -> video_h200.{json,md}
   python3 benchmarks/video.py --device cpu --quick --out /tmp/video        # CPU: proves the script (tiny sizes)

Wan 2.1 video on one GPU: how close one rank of ulysses=8 comes to 1/8 of the serial step, and
what 8 GPUs would give once the all-to-alls are added back.

What is timed: one forward of a `WanTransformer3DModel` with the real Wan2.1-T2V-14B (40 heads x
128, ffn 13824, text 4096) or -1.3B (12 heads x 128, ffn 8960) widths and random bf16 weights, on
the latents of 81 frames (21 latent frames) at 720p (1280x720: 21 x 45 x 80 = 75,600 tokens) or
480p (832x480: 32,760 tokens), 512 text tokens, one denoiser call (a step is two with guidance).

Rows: `serial` = the single-GPU fast path ditmesh applies in one process (fused QKV, cuDNN
attention first, regional `torch.compile` of the blocks; `fastpath.apply_fastpath`, no CUDA graph:
at seconds per step the host's issue time does not matter). `ulysses=W` / `ring=R,ulysses=U` =
`parallelize(transformer, config)` compiled, in a process that is rank 0 of W in torch's fake process
group: the whole code path of one rank runs at the rank's shapes (its 1/W of the tokens, its heads
over all tokens, the exchanges' packing, hooks) and every collective returns at once, moving nothing.

Depth: `--layers K` (default 4) builds K of the 40 (30) blocks, all alike. Two CUDA events, after
`condition_embedder` and before `norm_out`, time the blocks' span; the full-depth step is then
    step = (forward - span) + span x num_layers / K
(`--layers 0`: the real depth, nothing scaled). Rows at the real depth run last, where the budget allows.

Projection to W GPUs (per-rank compute measured here, exchange estimated):
    comm(W) = num_layers x [ulysses: 2 x alpha + (U-1)/U x 4 x (S/W) x Hp x D x 2 B / beta
                            ring:    alpha + (R-1) x 2 x (S/R) x (Hp/U) x D x 2 B / beta]
    speed-up(W) = serial step / (rank step + comm(W))
(Ulysses: q, k, v leave in one packed all-to-all and the output returns in one; Hp = heads padded to
a multiple of U; ring: the k/v all-gather over the ring group; cross-attention to the text moves
nothing.) alpha = 108 us, beta = 372 GB/s: fitted to P2P hops on 2 H200 (ring_schedule_h200_x2.md,
as in scaling_projection.md); the beta = 450 GB/s column is NVLink 4's one-direction rate per GPU.

`--vae` adds the Wan 2.1 VAE (diffusers' `AutoencoderKLWan` defaults, random fp32 weights) decoding the
21 latent frames: serial vs rank 0 of 8 with the rows split (`ditmesh.parallel.vae.install_video`,
fake group: halo rows and the gathered frames move nothing and are not modelled); peak GiB per rank.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from pathlib import Path

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch
import torch.distributed as dist

from ditmesh import ParallelConfig, parallelize
from ditmesh.models.wan import WAN21_1_3B_CONFIG, WAN21_14B_CONFIG
from ditmesh.parallel import fastpath
from ditmesh.parallel.mesh import ParallelMesh
from ditmesh.parallel.ulysses import padded_heads

ALPHA_S, BETA_BPS, BETA_NVLINK_BPS = 108e-6, 372e9, 450e9
MODELS = {"14B": WAN21_14B_CONFIG, "1.3B": WAN21_1_3B_CONFIG}
# Latent (frames, height, width) of 81 frames: the VAE's 4x time and 8x space compression.
SIZES = {"720p": (21, 90, 160), "480p": (21, 60, 104)}
# --quick (CPU): the same code path at tiny widths; "1.3B" keeps heads that do not divide by 8.
QUICK_MODELS = {"14B": dict(WAN21_14B_CONFIG, num_attention_heads=8, attention_head_dim=16, ffn_dim=256, text_dim=64,
                            freq_dim=32, num_layers=2),
                "1.3B": dict(WAN21_14B_CONFIG, num_attention_heads=3, attention_head_dim=16, ffn_dim=128, text_dim=64,
                             freq_dim=32, num_layers=2)}
QUICK_SIZES = {"720p": (3, 8, 16), "480p": (3, 8, 8)}


def planned_rows(full_depth: bool, vae: bool = False) -> list[tuple[str, str, str, bool]]:
    """(model, size, config, real depth) in the order they run: the judged comparison first."""
    rows = []
    for model, size in (("14B", "720p"), ("14B", "480p"), ("1.3B", "720p"), ("1.3B", "480p")):
        rows += [(model, size, "serial", False), (model, size, "ulysses=8", False)]
        if model == "1.3B":  # 12 heads: ulysses=8 pads to 16; ring=2 x ulysses=4 pads none
            rows.append((model, size, "ring=2,ulysses=4", False))
    rows += [("14B", "720p", "ulysses=4", False), ("14B", "720p", "ulysses=2", False), ("14B", "720p", "ring=8", False)]
    if vae:  # the Wan 2.1 VAE decode of the 21 latent frames: serial vs one rank of 8 (rows split)
        rows += [("VAE", size, config, True) for size in ("480p", "720p") for config in ("serial", "rows=8")]
    if full_depth:
        rows += [("14B", "720p", "serial", True), ("14B", "720p", "ulysses=8", True)]
    return rows


# ---- one row --------------------------------------------------------------------------------------


def build(spec: dict, layers: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A Wan transformer of `spec`'s widths with `layers` blocks, random weights made on `device`,
    cast to `dtype` but for the modules diffusers keeps in float32 (`_keep_in_fp32_modules`: rope,
    time embedder, modulation tables, norms), as `from_pretrained(torch_dtype=...)` loads them."""
    model = harness.seeded_model("WanTransformer3DModel", dict(spec, num_layers=layers), device, torch.float32)
    keep = set(model._keep_in_fp32_modules or ())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not keep & set(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    return model


def inputs(spec: dict, latent: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(1)
    text_len = 512
    return dict(hidden_states=torch.randn(1, spec["in_channels"], *latent, generator=gen).to(device, dtype),
                timestep=torch.full((1,), 700.0, device=device),
                encoder_hidden_states=torch.randn(1, text_len, spec["text_dim"], generator=gen).to(device, dtype),
                return_dict=False)


class Span:
    """CUDA events (perf_counter on CPU) after `condition_embedder` and before `norm_out`: the blocks' time."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device, self.marks = device, []
        model.condition_embedder.register_forward_hook(lambda *a: self.mark())
        model.norm_out.register_forward_pre_hook(lambda *a: self.mark())

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def last_ms(self) -> float:
        start, end = self.marks[-2:]
        return start.elapsed_time(end) if self.device.type == "cuda" else (end - start) * 1e3


def measure_vae(row: tuple, args: argparse.Namespace, device: torch.device) -> dict:
    """One decode of 21 latent frames by the Wan 2.1 VAE (random fp32 weights, the real widths; tiny
    with --quick): serial, or rank 0 of W in a fake group with its rows split (`vae.install_video`)."""
    from diffusers import AutoencoderKLWan

    from ditmesh.models.tiny import _tiny_wan_vae
    from ditmesh.parallel import vae as parallel_vae

    _, size, config_text, _ = row
    world = 1 if config_text == "serial" else int(config_text.split("=")[1])
    with harness.fake_group(world):
        torch.manual_seed(0)
        with torch.device(device):
            vae = (_tiny_wan_vae() if args.quick else AutoencoderKLWan()).eval()
        if world > 1:
            parallel_vae.install_video(vae, dist.group.WORLD, min_latent_pixels=0)
        latent = (QUICK_SIZES if args.quick else SIZES)[size]
        z = torch.randn(1, vae.config.z_dim, *latent, generator=torch.Generator().manual_seed(2)).to(device)
        harness.reset_peak(device)
        with torch.no_grad():
            warmup_s = harness.first_call_s(lambda: vae.decode(z), device)
            step_ms = harness.median_ms(lambda: vae.decode(z), device, args.repeats, warmup=0)
    return dict(model="Wan2.1-VAE", size=size, config=config_text, world=world, layers=None, num_layers=None,
                tokens=None, compiled=False, forward_ms=round(step_ms, 3), step_ms=round(step_ms, 3),
                warmup_s=round(warmup_s, 2), peak_gib=harness.peak_gib(device, 2))


def measure(row: tuple, args: argparse.Namespace, device: torch.device) -> dict:
    if row[0] == "VAE":
        return measure_vae(row, args, device)
    model_name, size, config_text, real_depth = row
    spec = (QUICK_MODELS if args.quick else MODELS)[model_name]
    latent = (QUICK_SIZES if args.quick else SIZES)[size]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    depth = spec["num_layers"]
    layers = depth if real_depth or args.layers == 0 else min(args.layers, depth)
    compiled = not args.eager
    config = ParallelConfig() if config_text == "serial" else ParallelConfig.parse(config_text)
    with harness.fake_group(config.world_size):
        begin = time.perf_counter()
        model = build(spec, layers, device, dtype)
        span = Span(model, device)
        if config_text == "serial":
            model = fastpath.apply_fastpath(model, compile=compiled, cuda_graphs=False)
        else:
            mesh = ParallelMesh.build(config, device.type)
            model = parallelize(model, config, mesh=mesh, compile=compiled, cuda_graphs=False)
        kwargs = inputs(spec, latent, device, dtype)
        harness.reset_peak(device)
        with torch.no_grad():
            warmup_s = harness.first_call_s(lambda: model(**kwargs), device)  # compiles
            samples = [(harness.timed_ms(lambda: model(**kwargs), device), span.last_ms()) for _ in range(args.repeats)]
    forward_ms = statistics.median(s[0] for s in samples)
    span_ms = statistics.median(s[1] for s in samples)
    step_ms = forward_ms - span_ms + span_ms * depth / layers
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    return dict(model=f"Wan2.1-{model_name}", size=size, config=config_text, world=config.world_size, layers=layers,
                num_layers=depth, tokens=tokens, heads=spec["num_attention_heads"], head_dim=spec["attention_head_dim"],
                compiled=compiled, forward_ms=round(forward_ms, 3), blocks_ms=round(span_ms, 3), step_ms=round(step_ms, 3),
                warmup_s=round(warmup_s, 2), setup_s=round(time.perf_counter() - begin - warmup_s, 2),
                peak_gib=harness.peak_gib(device, 2))


def comm_ms(row: dict, alpha: float, beta: float) -> float:
    """The exchanges one rank would wait for per step (formula in the docstring)."""
    if row["config"] == "serial":
        return 0.0
    config = ParallelConfig.parse(row["config"])
    ring, ulysses = config.ring_degree, config.ulysses_degree
    tokens, dim = row["tokens"], row["head_dim"]
    heads = padded_heads(row["heads"], ulysses)
    per_layer = 0.0
    if ulysses > 1:
        per_layer += 2 * alpha + (ulysses - 1) / ulysses * 4 * tokens / (ring * ulysses) * heads * dim * 2 / beta
    if ring > 1:
        per_layer += alpha + (ring - 1) * 2 * tokens / ring * heads / ulysses * dim * 2 / beta
    return per_layer * row["num_layers"] * 1e3


def add_projection(rows: list[dict]) -> None:
    serial = {(r["model"], r["size"], r["layers"] == r["num_layers"]): r["step_ms"]
              for r in rows if r.get("step_ms") and r["config"] == "serial"}
    for r in rows:
        if not r.get("step_ms") or r["config"] == "serial":
            continue
        base = serial.get((r["model"], r["size"], r["layers"] == r["num_layers"])) or serial.get((r["model"], r["size"], False))
        if base is None:
            continue
        r["serial_over_rank"] = round(base / r["step_ms"], 3)
        if r["model"] == "Wan2.1-VAE":  # halo rows and the gathered frames: not modelled
            continue
        r["comm_ms"] = round(comm_ms(r, ALPHA_S, BETA_BPS), 2)
        r["projected_speedup"] = round(base / (r["step_ms"] + r["comm_ms"]), 3)
        r["projected_speedup_nvlink"] = round(base / (r["step_ms"] + comm_ms(r, ALPHA_S, BETA_NVLINK_BPS)), 3)


# ---- report ---------------------------------------------------------------------------------------


def markdown(rows: list[dict], env: dict) -> str:
    fmt, x = harness.fmt, harness.times
    lines = [f"# Wan 2.1 video: serial vs one rank of W on {env['device']}", "", f"Command: `{env['command']}`", "",
             f"torch {env['torch']}, diffusers {env['diffusers']}; {env['dtype']}; one transformer forward (a denoiser "
             "call: a step with guidance is two) on 21 latent frames (81 video frames), 512 text tokens, random weights. "
             f"Median of {env['repeats']} after one warm-up (compile). Blocks measured: `layers` of `num_layers`, "
             "step = (forward - blocks) + blocks x num_layers / layers. Parallel rows: rank 0 of W in a fake process "
             "group (one rank's compute and host cost, exchanges moving nothing); comm and projection: the module "
             "docstring's formula, alpha 108 us, beta 372 GB/s (450 GB/s in the last column).", ""]
    cells = [(r["model"], r["size"], r.get("tokens") or "", r["config"],
              "" if r.get("layers") is None else f"{r['layers']}/{r['num_layers']}", fmt(r.get("step_ms"), ".1f"),
              x(r.get("serial_over_rank")), fmt(r.get("comm_ms"), ".1f"), x(r.get("projected_speedup")),
              x(r.get("projected_speedup_nvlink")), fmt(r.get("warmup_s"), ".1f"), fmt(r.get("peak_gib"), ".1f"),
              r.get("error", "")) for r in rows]
    lines += harness.table(("model", "size", "tokens", "config", "layers", "step ms", "serial / rank", "comm ms",
                            "projected speed-up", "at 450 GB/s", "warm-up s", "peak GiB", "error"), cells, "llrllrrrrrrrl")
    lines += ["", *[f"- {note}" for note in env["notes"]]]
    return "\n".join(lines) + "\n"


def environment(args: argparse.Namespace, device: torch.device) -> dict:
    notes = ["Targets (issue 32): Wan2.1-14B 720p, one rank of ulysses=8 <= 1/7.5 of the serial compiled step "
             "(serial / rank >= 7.5x) and a projected 8-GPU speed-up >= 7.0x.",
             "Wan2.1-1.3B has 12 heads: ulysses=8 pads them to 16 (2 per rank: a third more attention work than 12/8); "
             "ring=2,ulysses=4 splits them 3 per rank with no padding."]
    if device.type == "cpu":
        notes.insert(0, "CPU --quick: tiny widths and sizes, fp32, eager: proves the script's logic; the times mean nothing.")
    versions = harness.versions()
    return dict(device=harness.device_name(device, "CPU"), torch=versions["torch"], diffusers=versions["diffusers"],
                repeats=args.repeats, dtype="float32" if device.type == "cpu" else "bfloat16", command=harness.command(),
                notes=notes)


def write(rows: list[dict], env: dict, stem: Path) -> None:
    add_projection(rows)
    harness.write_results(stem, dict(environment=env, rows=rows), markdown(rows, env))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny widths and sizes (CPU proof of the script)")
    parser.add_argument("--layers", type=int, default=4, help="blocks built and timed (0: the real depth)")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per row after the warm-up (median)")
    parser.add_argument("--eager", action="store_true", help="no torch.compile (default on CUDA: compiled)")
    parser.add_argument("--vae", action="store_true",
                        help="also the Wan 2.1 VAE decode (fp32) at 480p and 720p: serial vs one rank of 8 (rows split)")
    parser.add_argument("--full-depth", action="store_true", help="also 14B 720p serial and ulysses=8 at all 40 blocks, last")
    parser.add_argument("--only", default="", help="run only rows whose 'model size config' contains this")
    parser.add_argument("--budget-s", type=float, default=600.0, help="start no row after this many seconds")
    parser.add_argument("--tag", default=None, help="results name video_<tag> (default h200 / cpu_quick)")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args()
    if args.device == "cpu":
        args.eager = True  # inductor's C++ compile on a shared CPU proves nothing here
        torch.set_num_threads(1)
    started = time.time()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tag = args.tag or ("cpu_quick" if device.type == "cpu" else harness.machine_tag(device))
    stem, env, rows = args.out / f"video_{tag}", environment(args, device), []
    for row in planned_rows(args.full_depth, args.vae):
        label = f"{row[0]} {row[1]} {row[2]}" + (" full depth" if row[3] and row[0] != "VAE" else "")
        if args.only and args.only not in label:
            continue
        if time.time() - started > args.budget_s:
            rows.append(dict(model=f"Wan2.1-{row[0]}", size=row[1], config=row[2], error=f"skipped: --budget-s {args.budget_s:.0f}"))
            write(rows, env, stem)
            continue
        tic = time.perf_counter()
        try:
            rows.append(measure(row, args, device))
        except Exception as exc:  # noqa: BLE001 - one failing row must not end the run
            traceback.print_exc()
            rows.append(dict(model=f"Wan2.1-{row[0]}", size=row[1], config=row[2], error=f"{type(exc).__name__}: {harness.first_line(exc)}"))
        harness.free()  # each row compiles its own blocks (new shapes and processors)
        write(rows, env, stem)
        r = rows[-1]
        print(f"== {label:32s} step {r.get('step_ms')} ms, serial/rank {r.get('serial_over_rank')}, projected "
              f"{r.get('projected_speedup')} {r.get('error', '')} ({time.perf_counter() - tic:.0f} s)", flush=True)
    print(markdown(rows, env))


if __name__ == "__main__":
    main()
