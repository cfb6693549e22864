"""PYTHONPATH=$PWD python3 benchmarks/scaling.py --out benchmarks/results   # one GPU (H200), needs diffusers
   PYTHONPATH=$PWD python3 benchmarks/scaling.py --device cpu --tiny         # proves the script on CPU
   python3 benchmarks/scaling.py --project benchmarks/results/scaling_h200.json \
       benchmarks/results/scaling_h200_cuda_graphs.json   # -> benchmarks/results/scaling_projection.md

What one rank of ulysses=W computes, measured on one GPU, and the speed-up at W GPUs projected
from it. Multi-GPU kinds above two are not lent, so 4 and 8 GPUs are projected, not measured.

1. Compile time and step on one GPU (FLUX.1-dev-sized transformer, random bf16 weights, 1024²:
   4096 image + 512 text tokens, one forward = one denoising step):
     diffusers eager | diffusers `compile_repeated_blocks(fullgraph=True)` |
     ditmesh `parallelize(model, ParallelConfig())` (fused QKV, cuDNN, regional compile) with and
     without the slow inductor autotuning knobs (coordinate descent).
   Inductor's caches are off (TORCHINDUCTOR_FX_GRAPH_CACHE=0 ...), so every compile is cold.
2. One rank of ulysses=W, for W = 2, 4, 8, compiled as `parallelize` compiles it: the rank's
   tokens (image 4096/W, text 512/W when the text is split, all 512 when it is replicated) run
   through every block; attention runs on H/W heads over all tokens, as after Ulysses'
   all-to-all. The all-to-all itself is left out: the q/k/v reshape to (H/W heads, all tokens)
   moves exactly as many elements, so the per-rank GPU work is right except the exchange.
3. Projection (scaling_projection.md): step(W) = compute(W) + comm(W) with
   comm(W) = layers * all_to_alls_per_layer * (alpha + bytes_sent_per_rank(W) / beta),
   alpha and beta fitted to the two P2P hop sizes measured on 2 H200s
   (ring_schedule_h200_x2.md: 25.2 MB in 175.2 us, 100.7 MB in 377.9 us), no overlap counted.
   Speed-up(W) = best single-GPU compiled step / step(W).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch

from ditmesh.parallel import fastpath
from ditmesh.parallel.attention import RedirectSDPA
from harness import FLUX_DEV, first_call_s, host_ms, median_ms

harness.cold_compiles()  # every compile cold: compile times are what a user waits

TEXT, IMAGE = 512, 4096  # FLUX.1-dev at 1024²
# Fitted to the 2-H200 P2P hops (ring_schedule_h200_x2.md): t(bytes) = ALPHA + bytes / BETA.
HOPS = ((25.2e6, 175.2e-6), (100.7e6, 377.9e-6))
BETA = (HOPS[1][0] - HOPS[0][0]) / (HOPS[1][1] - HOPS[0][1])
ALPHA = HOPS[0][1] - HOPS[0][0] / BETA
ROWS: list[dict] = []


# ---- what one Ulysses rank computes -------------------------------------------------------------


class EmulatedUlysses:
    """Attention processor wrapper: the model's processor, with its SDPA run as one rank of
    ulysses=`degree` would run it after the all-to-all (H/W heads over all tokens), no exchange.

    `text` "split": the rank holds T/W text + I/W image tokens; (B, H, S/W, D) is viewed as
    (B, H/W, S, D), the same elements. "replicated" (before the text split): it holds all T text
    tokens + I/W image tokens; text keeps H/W of its heads, image is viewed as (B, H/W, I, D),
    and the text output is repeated back over the heads (the all-gather it stands for)."""

    def __init__(self, inner, degree: int, text: str, num_text: int, head_groups: int = 1):
        self.inner, self.degree, self.text, self.num_text = inner, degree, text, num_text
        self.head_groups = head_groups

    def __call__(self, attn, *args, **kwargs):
        with RedirectSDPA(lambda sdpa, *a, **kw: self._attend(sdpa, *a, **kw)):
            return self.inner(attn, *args, **kwargs)

    def _attend(self, sdpa, query, key, value, **kwargs):
        q, k, v = query, key, value
        batch, heads, seq, dim = q.shape
        w = self.degree
        if self.text == "split" and self.head_groups > 1:
            return self._attend_in_groups(sdpa, q, k, v, **kwargs)
        if self.text == "split":
            q_, k_, v_ = (x.reshape(batch, heads // w, seq * w, dim) for x in (q, k, v))
            return sdpa(q_, k_, v_, **kwargs).reshape(batch, heads, seq, dim)
        t = self.num_text

        def widen(x):  # (B, H, T + I/W, D) -> (B, H/W, T + I, D)
            return torch.cat([x[:, : heads // w, :t], x[:, :, t:].reshape(batch, heads // w, (seq - t) * w, dim)], dim=2)

        out = sdpa(widen(q), widen(k), widen(v), **kwargs)
        text_out = out[:, :, :t].repeat(1, w, 1, 1)
        return torch.cat([text_out, out[:, :, t:].reshape(batch, heads, seq - t, dim)], dim=2)


    def _attend_in_groups(self, sdpa, q, k, v, **kwargs):
        """`ulysses_head_groups`: the copies and kernels of attention.py's pipelined groups, the
        exchanges left out: per group, its heads of every rank laid out for sending (U, B, h, S/U, D),
        read back as (B, h, S, D), attended, laid out for the return and joined."""
        from ditmesh.parallel.ulysses import head_groups, join_head_groups

        batch, heads, seq, dim = q.shape
        w = self.degree
        streams = torch.cat([q, k, v]).unflatten(1, (w, heads // w))  # (3B, U, H/U, S/U, D)
        received = []
        for start, end in head_groups(heads // w, self.head_groups):
            sent = streams[:, :, start:end].transpose(0, 1).contiguous()  # what start_heads_to_sequence sends
            q_, k_, v_ = sent.permute(1, 2, 0, 3, 4).flatten(2, 3).chunk(3)  # (B, h, S, D) each, as received
            out = sdpa(q_, k_, v_, **kwargs)
            received.append(out.unflatten(2, (w, seq)).permute(2, 0, 1, 3, 4).contiguous())  # what returns
        return join_head_groups(received, [seq], heads)[0]


def flux_rank_inputs(image: int, text: int, device: str, dtype: torch.dtype, joint_dim: int, pooled_dim: int) -> dict:
    """A rank's inputs: `image` packed latent tokens and `text` prompt tokens (positions irrelevant here)."""
    gen = torch.Generator(device=device).manual_seed(0)
    kw = dict(device=device, dtype=dtype)
    return dict(hidden_states=torch.randn(1, image, 64, generator=gen, **kw),
                encoder_hidden_states=torch.randn(1, text, joint_dim, generator=gen, **kw),
                pooled_projections=torch.randn(1, pooled_dim, generator=gen, **kw),
                timestep=torch.full((1,), 0.7, **kw), guidance=torch.full((1,), 3.5, **kw),
                img_ids=torch.zeros(image, 3, device=device), txt_ids=torch.zeros(text, 3, device=device), return_dict=False)


# ---- timing -------------------------------------------------------------------------------------


def graphed(fn):
    """`fn` (fixed inputs) captured in one CUDA graph after two warm-up calls; returns replay.
    The first call of the returned function compiles and captures (its time is the warm-up)."""
    state = {}

    def replay():
        if "graph" not in state:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
                state["graph"] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(state["graph"], stream=stream):
                    state["out"] = fn()
            torch.cuda.current_stream().wait_stream(stream)
        state["graph"].replay()
        return state["out"]

    return replay


def record(name: str, degree: int, text: str, fn, args, reference=None, head_groups: int = 1) -> torch.Tensor:
    import torch._dynamo

    harness.reset_peak(args.device)
    with torch.no_grad():
        warmup = first_call_s(fn, args.device)
        out = fn()[0]
        row = dict(variant=name, degree=degree, text=text, head_groups=head_groups, warmup_s=warmup,
                   step_ms=median_ms(fn, args.device, args.samples), host_ms=host_ms(fn, args.device),
                   peak_gib=harness.peak_gib(args.device))
        if reference is not None:
            row["rel_err"] = harness.rel_err(out, reference)
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    torch._dynamo.reset()
    return out


# ---- the runs -----------------------------------------------------------------------------------


def build(args) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    config = dict(FLUX_DEV)
    if args.tiny:
        config.update(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=8,
                      joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    torch.manual_seed(0)
    with torch.device(args.device):
        return FluxTransformer2DModel(**config).to(args.dtype).eval()


def single_gpu_rows(model, args, autotune: tuple[bool, ...]) -> None:
    """Part 1: diffusers eager / compiled and ditmesh's single-GPU path (with `autotune` as given)."""
    import copy

    import torch._inductor.config as inductor

    text, image = args.tokens
    inputs = flux_rank_inputs(image, text, args.device, args.dtype, model.config.joint_attention_dim, model.config.pooled_projection_dim)
    if not autotune[0]:
        reference = args.reference = record("diffusers eager", 1, "whole", lambda: model(**inputs), args)
        compiled = copy.deepcopy(model)
        compiled.compile_repeated_blocks(fullgraph=True, backend=args.backend)
        record("diffusers compile_repeated_blocks", 1, "whole", lambda: compiled(**inputs), args, reference)
        del compiled
    reference = getattr(args, "reference", None)
    defaults = {name: getattr(inductor, name) for name in fastpath.AUTOTUNE_KNOBS}
    for autotune in autotune:
        if time.time() > args.deadline:
            print(f"skipped (past --deadline-s): ditmesh fast path, autotune={autotune}", flush=True)
            continue
        ours = copy.deepcopy(model)
        fastpath.apply_fastpath(ours, compile=False, cuda_graphs=False)
        fastpath.compile_repeated_blocks(ours, autotune=autotune, backend=args.backend)
        name = "ditmesh fast path" + (" + autotune (coordinate descent)" if autotune else "")
        record(name, 1, "whole", lambda ours=ours: ours(**inputs), args, reference)
        del ours
        for knob, value in defaults.items():
            setattr(inductor, knob, value)
        if not autotune and args.device == "cuda":  # what parallelize(model, ParallelConfig()) returns on one GPU
            graphed = fastpath.apply_fastpath(copy.deepcopy(model))
            record("ditmesh fast path + CUDA graphs (the default)", 1, "whole", lambda: graphed(**inputs), args, reference)
            del graphed


def ulysses_rank_rows(model, args) -> None:
    """Part 2: one rank of ulysses=W at its shapes, compiled as parallelize compiles it."""
    import copy

    model = copy.deepcopy(model)  # the original stays unfused for part 1's last rows
    fastpath.fuse_qkv(model)
    if args.device == "cuda":
        fastpath.prefer_cudnn_attention(model)
    originals = dict(model.attn_processors)
    text_total, image_total = args.tokens
    for degree in args.degrees:
        for (text, graphs), groups in ((v, g) for v in args.variants for g in args.head_groups):
            if groups > 1 and (text != "split" or groups > model.config.num_attention_heads // degree):
                continue  # replicated text has no grouped variant; more groups than heads = fewer groups
            text_local = -(-text_total // degree) if text == "split" else text_total
            model.set_attn_processor({n: EmulatedUlysses(p, degree, text, text_local, groups) for n, p in originals.items()})
            fastpath.compile_repeated_blocks(model, backend=args.backend)
            inputs = flux_rank_inputs(image_total // degree, text_local, args.device, args.dtype,
                                      model.config.joint_attention_dim, model.config.pooled_projection_dim)
            call = graphed(lambda: model(**inputs)) if graphs else (lambda: model(**inputs))
            name = (f"one rank of ulysses={degree}" + (f", {groups} head groups" if groups > 1 else "")
                    + (", whole step in one CUDA graph" if graphs else "") + "".join(f", {k}" for k in args.inductor))
            record(name, degree, text, call, args, head_groups=groups)
            for block in fastpath.repeated_blocks(model):
                block._compiled_call_impl = None  # next degree: eager blocks, recompiled with its shapes
    model.set_attn_processor(originals)


# ---- projection ---------------------------------------------------------------------------------


def comm_ms(degree: int, text: str, config: dict, tokens: tuple[int, int], alpha: float = ALPHA, bytes_per_value: int = 2) -> float:
    """Ulysses exchange time per step for one rank (no overlap counted).

    Per attention layer: one all-to-all of q, k, v together and one of the output. A rank holds
    S_local = T/W + I/W tokens (split text; T + I/W with replicated text, whose text q/k/v stay
    local and whose text output is all-gathered over heads); it sends (W-1)/W of what it holds."""
    if degree == 1:
        return 0.0
    text_total, image_total = tokens
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    layers = config["num_layers"] + config["num_single_layers"]
    local = (text_total + image_total) / degree if text == "split" else image_total / degree
    moved = (degree - 1) / degree * local * hidden * bytes_per_value
    per_layer = (alpha + 3 * moved / BETA) + (alpha + moved / BETA)
    if text == "replicated":  # the text output's all-gather over heads
        per_layer += alpha + (degree - 1) / degree * text_total * hidden * bytes_per_value / BETA
    return 1e3 * layers * per_layer


def projection(config: dict, tokens: tuple[int, int], baseline_ms: float | None) -> tuple[list[dict], float]:
    best = baseline_ms or min(r["step_ms"] for r in ROWS if r["degree"] == 1 and r["variant"] != "diffusers eager")
    out = []
    for r in ROWS:
        if r["degree"] == 1:
            continue
        comm = comm_ms(r["degree"], r["text"], config, tokens)
        step = r["step_ms"] + comm
        bandwidth_only = r["step_ms"] + comm_ms(r["degree"], r["text"], config, tokens, alpha=0.0)
        out.append(dict(degree=r["degree"], text=r["text"], compute_ms=r["step_ms"], comm_ms=comm, step_ms=step,
                        speedup=best / step, efficiency=best / step / r["degree"], speedup_alpha0=best / bandwidth_only))
    return out, best


def write(args, config: dict) -> None:
    projected, best = projection(config, args.tokens, args.baseline_ms)
    tag = args.tag or harness.machine_tag(args.device, tiny=args.device == "cpu")
    meta = dict(device=harness.device_name(args.device), torch=torch.__version__,
                tokens=dict(text=args.tokens[0], image=args.tokens[1]), alpha_us=ALPHA * 1e6, beta_gbps=BETA / 1e9)
    lines = [f"# One rank's compute at ulysses=W, measured on one {meta['device']}; W GPUs projected", "",
             f"torch {torch.__version__}; FLUX.1-dev-sized transformer{' (tiny)' if args.tiny else ''}, "
             f"{args.tokens[1]} image + {args.tokens[0]} text tokens, {args.dtype}.", "",
             f"Command: `{harness.command()}`", "", "## Measured", "",
             "| variant | W | text | first call s | GPU ms/step | host ms/step | peak GiB | rel err |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in ROWS:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else ""
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        lines.append(f"| {r['variant']} | {r['degree']} | {r['text']} | {r['warmup_s']:.1f} | {r['step_ms']:.2f} | "
                     f"{r['host_ms']:.2f} | {peak} | {err} |")
    lines += ["", "## Projection", "",
              "step(W) = compute(W) + comm(W); comm(W) = layers x [2 all-to-alls (q/k/v, output)"
              " (+ text all-gather when replicated)] x (alpha + bytes sent per rank / beta);",
              f"alpha = {ALPHA * 1e6:.0f} us, beta = {BETA / 1e9:.0f} GB/s fitted to the P2P hops measured on 2 H200s"
              " (ring_schedule_h200_x2.md; alpha includes the eager host cost of those hops, so it is pessimistic);"
              f" no overlap. Baseline: best single-GPU compiled step {best:.2f} ms.", "",
              "| W | text | compute ms | comm ms | step ms | speed-up | efficiency | speed-up, alpha = 0 |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for p in projected:
        lines.append(f"| {p['degree']} | {p['text']} | {p['compute_ms']:.2f} | {p['comm_ms']:.2f} | {p['step_ms']:.2f} | "
                     f"{p['speedup']:.2f}x | {100 * p['efficiency']:.0f}% | {p['speedup_alpha0']:.2f}x |")
    harness.write_results(args.out / f"scaling_{tag}", dict(meta, rows=ROWS, projection=projected), "\n".join(lines) + "\n")
    print("\n".join(lines))


def project_files(paths: list[Path], out: Path) -> None:
    """scaling_projection.md from saved measurements: every W > 1 row of every file, projected
    with the fitted alpha and with alpha = 0 (the bounds of the exchange's cost)."""
    rows, baseline = [], None
    for path in paths:
        data = json.loads(path.read_text())
        rows += [dict(r, run=path.stem) for r in data["rows"]]
        single = [r["step_ms"] for r in data["rows"] if r["degree"] == 1 and r["variant"] != "diffusers eager"]
        baseline = min(single + ([baseline] if baseline else []))
    config = FLUX_DEV
    lines = ["# Projected speed-up of FLUX.1-dev at 1024² (ulysses=W) from one H200's measurements", "",
             f"Command: `python3 benchmarks/scaling.py --project {' '.join(str(p) for p in paths)}`", "",
             "Only 1- and 2-GPU machines are lent, so W = 4 and 8 are projected, not measured:",
             "", "    step(W) = compute(W) + comm(W)",
             "    comm(W) = 57 attention layers x [all-to-all(q, k, v) + all-to-all(out) (+ text all-gather over heads when",
             "              the text is replicated)], each alpha + (W-1)/W x (tokens per rank x 3072 x 2 bytes) / beta",
             "    speed-up(W) = best single-GPU compiled step / step(W)", "",
             "compute(W): one rank's step measured on one H200 at the rank's shapes (benchmarks/scaling.py: tokens per",
             "rank, attention on H/W heads over all tokens; the exchange left out). beta = "
             f"{BETA / 1e9:.0f} GB/s and alpha = {ALPHA * 1e6:.0f} us are fitted to the P2P hops measured on 2 H200s",
             "(ring_schedule_h200_x2.md: 25.2 MB in 175.2 us, 100.7 MB in 377.9 us). That alpha includes the eager host",
             "cost of launching those hops; inside a CUDA graph it is NCCL's own latency, so the true step lies between",
             "the two speed-up columns. No overlap of exchange and compute is counted.",
             f"Baseline: best single-GPU compiled step = {baseline:.2f} ms.", "",
             "Rows of the same config from two runs differ where the host issues the step: a host-bound step's",
             "GPU time follows the host's pace.", "",
             "| W | text | step issued as | run | compute ms | comm ms (alpha) | speed-up | speed-up, alpha = 0 |",
             "|---:|---|---|---|---:|---:|---:|---:|"]
    tokens = (TEXT, IMAGE)
    for r in sorted((r for r in rows if r["degree"] > 1), key=lambda r: (r["degree"], r["text"] != "replicated", r["variant"])):
        comm, comm0 = comm_ms(r["degree"], r["text"], config, tokens), comm_ms(r["degree"], r["text"], config, tokens, alpha=0.0)
        issued = "one CUDA graph" if "CUDA graph" in r["variant"] else "compiled blocks"
        lines.append(f"| {r['degree']} | {r['text']} | {issued} | {r['run']} | {r['step_ms']:.2f} | {comm:.2f} | "
                     f"{baseline / (r['step_ms'] + comm):.2f}x | {baseline / (r['step_ms'] + comm0):.2f}x |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def set_inductor_knobs(settings: list[str]) -> None:
    """--inductor KNOB=VALUE ...: set on torch._inductor.config (values parsed as Python literals)."""
    import ast

    import torch._inductor.config as inductor

    for item in settings:
        knob, _, value = item.partition("=")
        if not hasattr(inductor, knob):
            raise ValueError(f"torch._inductor.config has no {knob!r}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value  # a plain string, e.g. max_autotune_gemm_backends=TRITON,ATEN
        setattr(inductor, knob, parsed)


# The exchange's cost measured at W = 2: the 2-H200 step of ditmesh ulysses=2 compiled + CUDA graphs
# (peers_h200_x2.md, 83.8 ms at a 132.2 ms serial step) minus one rank's compute of the same code
# under the fake group (peers_h200_fake2, first run at that commit: 76.68 ms at a 134.11 ms serial
# step), each scaled to its own run's serial step: 0.0621 x serial = 8.2 ms at 131.5 ms.
EXCHANGE_W2_FRACTION = 83.8 / 132.2 - 76.68 / 134.11


def fitted_alpha(config: dict, tokens: tuple[int, int], serial_ms: float) -> float:
    """alpha (s) for which comm_ms(2) equals the exchange cost measured at W = 2."""
    measured = EXCHANGE_W2_FRACTION * serial_ms
    bandwidth_only = comm_ms(2, "split", config, tokens, alpha=0.0)
    layers = config["num_layers"] + config["num_single_layers"]
    return max(0.0, (measured - bandwidth_only) / (2 * layers)) / 1e3


def project_fake(paths: list[Path], out: Path) -> None:
    """Append to scaling_projection.md: one rank's compute of the real code path at W (peers.py
    --fake-world W on one GPU) plus the exchange model, for ulysses=W."""
    config = FLUX_DEV
    tokens = (TEXT, IMAGE)
    lines = ["", "## From one rank of the real code path (`peers.py --fake-world W`)", "",
             f"Command: `python3 benchmarks/scaling.py --project-fake {' '.join(str(p) for p in paths)}`", "",
             "compute(W): `python3 benchmarks/peers.py --fake-world W` on one H200: one process is rank 0 of W in",
             "torch's fake process group, so the whole code path of ulysses=W runs at the rank's shapes (packing,",
             "attention, joins, hooks) and every collective returns at once; serial rows in the same run.",
             "comm(W) as above with three alphas: 108 us (P2P hops), the alpha that makes comm(2) equal the",
             f"exchange cost measured on 2 H200s ({100 * EXCHANGE_W2_FRACTION:.1f} % of the serial step: the x2 step minus",
             "the fake-group step of the same code, each over its run's serial step), and 0 (bandwidth only).",
             "'compute only' is the bound if the exchange were hidden completely.", "",
             "| W | framework | step issued as | compute ms | serial ms | speed-up, alpha 108 us | alpha fitted | "
             "alpha 0 | compute only |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for path in paths:
        rows = json.loads(path.read_text())
        serial = min(r["step_ms"] for r in rows if r["config"] == "serial" and r["compiled"] and r["step_ms"])
        alpha = fitted_alpha(config, tokens, serial)
        for r in rows:
            if not r["config"].startswith("ulysses=") or not r["compiled"] or not r["step_ms"]:
                continue
            degree = ulysses_degree_of(r["config"])
            comms = [comm_ms(degree, "split", config, tokens, alpha=a) for a in (ALPHA, alpha, 0.0)]
            issued = "compiled + CUDA graphs" if r["cuda_graphs"] else "compiled"
            speedups = " | ".join(f"{serial / (r['step_ms'] + c):.2f}x" for c in comms)
            lines.append(f"| {degree} | {r['framework']} {r['config']} | {issued} | {r['step_ms']:.2f} | {serial:.2f} | "
                         f"{speedups} | {serial / r['step_ms']:.2f}x |")
        lines.append(f"|  | fitted alpha for {path.stem}: {alpha * 1e6:.0f} us |  |  |  |  |  |  |  |")
    text = out.read_text() if out.exists() else ""
    marker = "\n## From one rank of the real code path"
    text = text.split(marker)[0].rstrip("\n") + "\n"
    out.write_text(text + "\n".join(lines) + "\n")
    print("\n".join(lines))


def ulysses_degree_of(config: str) -> int:
    from ditmesh import ParallelConfig

    return ParallelConfig.parse(config).ulysses_degree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny FLUX (CPU proof of the script)")
    parser.add_argument("--degrees", default="2,4,8")
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--deadline-s", type=float, default=1e9, help="start no autotuned compile after this many seconds")
    parser.add_argument("--parts", default="single,ulysses,autotune", help="which parts to run (comma-separated)")
    parser.add_argument("--project", nargs="+", type=Path, default=None,
                        help="only write scaling_projection.md (into --out) from these saved results")
    parser.add_argument("--image-tokens", type=int, default=None, help="image tokens (default 4096: 1024²; 1024: 512²)")
    parser.add_argument("--tag", default=None, help="results file suffix (default: the device)")
    parser.add_argument("--baseline-ms", type=float, default=None,
                        help="best single-GPU compiled step for the projection (default: part 1's)")
    parser.add_argument("--inductor", nargs="*", default=[], metavar="KNOB=VALUE",
                        help="torch._inductor.config settings for every compile of this run (e.g. max_autotune_gemm=True); "
                             "the variant names say so")
    parser.add_argument("--head-groups", default="1",
                        help="ulysses_head_groups values to emulate for the split-text variants (e.g. 1,2,3)")
    parser.add_argument("--variants", default="split,replicated",
                        help="per degree: split / replicated text, compiled as parallelize does; split-graphs: "
                             "split text, the compiled step captured whole in one CUDA graph and replayed")
    parser.add_argument("--project-fake", nargs="+", type=Path, default=None,
                        help="append to scaling_projection.md (in --out) the projection from peers.py --fake-world results")
    args = parser.parse_args()
    if args.project_fake:
        return project_fake(args.project_fake, args.out / "scaling_projection.md")
    if args.project:
        return project_files(args.project, args.out / "scaling_projection.md")
    args.deadline = time.time() + args.deadline_s
    args.degrees = [int(d) for d in args.degrees.split(",")]
    args.head_groups = [int(g) for g in args.head_groups.split(",")]
    set_inductor_knobs(args.inductor)
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    args.backend = "inductor" if args.device == "cuda" else "aot_eager"
    args.tokens = (TEXT, args.image_tokens or IMAGE) if not args.tiny else (8, 64)
    torch._dynamo.config.automatic_dynamic_shapes = False  # each degree compiles for its own static shapes
    modes = {"split": ("split", False), "replicated": ("replicated", False), "split-graphs": ("split", True)}
    args.variants = [modes[v] for v in args.variants.split(",")]
    parts = args.parts.split(",")
    model = build(args)
    if "single" in parts:
        single_gpu_rows(model, args, autotune=(False,))
    if "ulysses" in parts:
        ulysses_rank_rows(model, args)
    if "autotune" in parts and args.device == "cuda":  # last: autotuning may compile for minutes
        single_gpu_rows(model, args, autotune=(True,))
    write(args, dict(model.config))


if __name__ == "__main__":
    main()
