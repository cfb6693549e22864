"""python benchmarks/e2e.py --out benchmarks/results          # one H200 -> e2e_h200.{json,md}
   python benchmarks/e2e.py --device cpu --quick             # proves the script on CPU (tiny models)

What a user waits for: the wall time of one image from the prompt to the decoded image, and its
parts (text encoders, denoising loop, VAE decode), FLUX.1-dev-sized, 28 steps, at 1024² and 2048².

Models (no download, random weights from one seed, bf16 on CUDA): the transformer of
FLUX.1-dev's config (19 + 38 blocks, 12 B parameters), the FLUX VAE's config, CLIP-L and T5-XXL
(4.7 B parameters) by their published configs; the tokenizers are ditmesh's tiny ones
(`ditmesh.models.tiny`): the pipeline pads T5's tokens to 512 and CLIP's to 77, so the encoders
see the real token counts (the vocabulary does not change the cost). One `FluxPipeline` call,
`output_type="pil"` (what a user gets), guidance 3.5, one seeded generator.

Rows (one process, one GPU; each size in turn, frameworks in --frameworks' order, or --rows as given):
* diffusers eager, and compiled (`transformer.compile_repeated_blocks(fullgraph=True)`).
* ditmesh: `parallelize(pipe, ParallelConfig())` (its default on one GPU: fused QKV, cuDNN attention,
  regional compile, each step one CUDA graph); and one rank of W = 2/4/8 GPUs:
  `parallelize(pipe, ParallelConfig.parse("ulysses=W"))` with this process rank 0 of W in torch's fake
  process group. Rank 0 is the rank that encodes the prompt (text.py) and decodes the top band of
  rows (vae.py); the collectives return at once and move nothing, so the row is one rank's compute
  and host cost at its shapes, the exchanges' time left out (peers_h200_x2.md measures them at W = 2).
* cache-dit 1.5.3 without caching: its compile path (`cache_dit.set_compile_configs()`,
  `torch.set_float32_matmul_precision("high")`, `compile_repeated_blocks()`, as its `--compile`
  flag does); its coordinate-descent tuning (on by default there) only with --cache-dit-descent
  (minutes of compile; on ditmesh's blocks it changes the step by < 0.1 %: scaling_h200.md).
* xDiT 0.7.0 (xfuser) at world 1: `xFuserFluxPipeline` in a one-rank NCCL group (as
  ditmesh/runner/xfuser.py runs it), eager, or compiled with its `use_torch_compile`.

Timing: one warm-up call of --warmup-steps steps (its wall time is warm-up s: compile, graph
capture), then --images calls of --steps steps, median. per image s: wall time of the call
(perf_counter, GPU synchronised). text / decode: CUDA events around `encode_prompt` and
`vae.decode` (wrapped on the pipeline object that calls them); denoise: from the end of the text
encoding to the start of the decode (latent set-up, the loop); other: the rest (image to PIL).
peak GiB: max_memory_allocated over the timed calls, weights included. A row that raises records
its error; rows not started within --budget-s are recorded as skipped.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch
import torch.distributed as dist

from ditmesh.models.flux import FLUX_VAE_CONFIG

FRAMEWORKS = ("diffusers", "ditmesh", "cache-dit", "xdit")
GUIDANCE = 3.5


@dataclass(frozen=True)
class Row:
    """One measured configuration: `world` 1 = one GPU; > 1 = one rank of W (fake group)."""

    framework: str
    mode: str  # eager | compiled | default
    world: int
    size: int

    def label(self) -> str:
        where = "1 GPU" if self.world == 1 else f"rank 0 of {self.world}"
        return f"{self.framework} {self.mode}, {where}, {self.size}²"


def planned_rows(args: argparse.Namespace) -> list[Row]:
    """--rows in their order, or every row: each size in turn, frameworks in --frameworks' order,
    ditmesh's one GPU before its fake worlds."""
    if args.rows:
        rows = []
        for key in args.rows.split(","):
            framework, mode, world, size = key.split(":")
            rows.append(Row(framework, mode, int(world), int(size)))
        return rows
    modes = {"diffusers": ("eager", "compiled"), "ditmesh": ("default",), "cache-dit": ("compiled",),
             "xdit": ("compiled",) if args.xdit_compile else ("eager",)}
    return [Row(framework, mode, world, size) for size in args.sizes for framework in args.frameworks
            for mode in modes[framework] for world in ((1, *args.worlds) if framework == "ditmesh" else (1,))]


# ---- models: shared encoders, a fresh transformer and VAE per row ------------------------------


class Models:
    """The text encoders and tokenizers every row shares (no row changes them) and a pristine VAE;
    `pipeline()` builds a new transformer (seeded: the same weights in every row) around them."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
        from ditmesh.models.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

        self.args, self.device, self.dtype = args, device, dtype
        self.spec = dict(harness.TINY_CPU["flux"]) if args.quick else dict(harness.FLUX_DEV)
        self.tokenizers = tiny_clip_tokenizer(), tiny_t5_tokenizer()
        torch.manual_seed(0)
        if args.quick:
            clip = harness._tiny_clip(len(self.tokenizers[0]), self.spec["pooled_projection_dim"])
            t5 = harness._tiny_t5(len(self.tokenizers[1]), self.spec["joint_attention_dim"])
            vae = harness._tiny_vae(latent_channels=16)
        else:
            clip, t5, vae = self._real_encoders()
        self.clip, self.t5 = clip.to(device, dtype), t5.to(device, dtype)
        self.vae = vae.to(device, dtype).eval()

    def _real_encoders(self) -> tuple:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        with torch.device(self.device):  # CLIP-L and the VAE are small: built where they run
            clip = CLIPTextModel(CLIPTextConfig(**harness.CLIP_L)).eval()
            vae = AutoencoderKL(**FLUX_VAE_CONFIG).eval()
        with torch.device("meta"):  # T5-XXL: 4.7 B parameters, materialised in bf16 directly
            t5 = T5EncoderModel(T5Config(**harness.T5_XXL)).to(self.dtype)
        return clip, harness.random_weights(t5, self.device), vae

    def pipeline(self) -> Any:
        from diffusers import FluxPipeline

        transformer = harness.random_transformer(self.spec, self.device, self.dtype)
        pipe = FluxPipeline(transformer=transformer, vae=copy.deepcopy(self.vae), text_encoder=self.clip,
                            tokenizer=self.tokenizers[0], text_encoder_2=self.t5, tokenizer_2=self.tokenizers[1],
                            scheduler=harness.flux_scheduler())
        pipe.set_progress_bar_config(disable=True)
        return pipe


# ---- the frameworks: each turns a fresh pipeline into what its row calls ----------------------


def setup_diffusers(pipe: Any, row: Row, args: argparse.Namespace) -> tuple[Any, str]:
    if row.mode == "compiled":
        pipe.transformer.compile_repeated_blocks(fullgraph=True, **_cpu_backend(args))
    return pipe, ""


def setup_ditmesh(pipe: Any, row: Row, args: argparse.Namespace) -> tuple[Any, str]:
    from ditmesh import ParallelConfig, parallelize

    if row.world == 1:
        return parallelize(pipe, ParallelConfig()), "parallelize(pipe, ParallelConfig())"
    harness.init_fake(row.world)  # left by the row runner (measure) after the row
    config = f"ulysses={row.world}"
    return parallelize(pipe, ParallelConfig.parse(config)), f"{config}: rank 0 (encodes the prompt, decodes the top rows)"


def setup_cache_dit(pipe: Any, row: Row, args: argparse.Namespace) -> tuple[Any, str]:
    import cache_dit

    cache_dit.set_compile_configs(descent_tuning=args.cache_dit_descent)
    torch.set_float32_matmul_precision("high")
    pipe.transformer.compile_repeated_blocks(**_cpu_backend(args))
    return pipe, "no cache; compile" + (" + descent tuning" if args.cache_dit_descent else ", descent tuning off")


def setup_xdit(pipe: Any, row: Row, args: argparse.Namespace) -> tuple[Any, str]:
    from xfuser import xFuserArgs, xFuserFluxPipeline
    from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel, parallel_state

    if not dist.is_initialized():
        harness.init_single(torch.device(args.device))  # kept for the later xDiT rows
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed_environment(rank=0, world_size=1, local_rank=0)
    initialize_model_parallel(sequence_parallel_degree=1, ulysses_degree=1, ring_degree=1)
    engine_config, _ = xFuserArgs(model="random-flux-dev", use_torch_compile=row.mode == "compiled", height=row.size,
                                  width=row.size, num_inference_steps=args.steps,
                                  max_sequence_length=args.text_len).create_config()
    return xFuserFluxPipeline(pipe, engine_config), "world 1, " + ("use_torch_compile" if row.mode == "compiled" else "eager")


SETUPS = {"diffusers": setup_diffusers, "ditmesh": setup_ditmesh, "cache-dit": setup_cache_dit, "xdit": setup_xdit}


def _cpu_backend(args: argparse.Namespace) -> dict:
    """CPU proof: dynamo's path without inductor's C++ compile (minutes on a shared core)."""
    return {"backend": "eager"} if args.device == "cpu" else {}


# ---- parts of one call ------------------------------------------------------------------------


class Parts:
    """Marks around `encode_prompt` and `vae.decode` on the object the pipeline calls them on
    (the innermost pipeline under ditmesh's wrappers; xDiT's own pipeline class), as CUDA events
    (no synchronisation inside the call) or perf_counter on CPU."""

    NAMES = ("start", "text_start", "text_end", "decode_start", "decode_end", "end")

    def __init__(self, pipe: Any, cuda: bool):
        self.cuda, self.marks = cuda, {}
        target = pipe
        while "_pipe" in vars(target):  # ditmesh's PipelineWrapper chain
            target = vars(target)["_pipe"]
        self._wrap(target, "encode_prompt", "text")
        vae = target.vae if hasattr(target, "vae") else target.module.vae
        self._wrap(vae, "decode", "decode")

    def _wrap(self, owner: Any, method: str, part: str) -> None:
        inner = getattr(owner, method)

        @functools.wraps(inner)
        def marked(*args, **kwargs):
            if f"{part}_start" not in self.marks:  # FLUX's true CFG encodes twice: the first call opens
                self.mark(f"{part}_start")
            out = inner(*args, **kwargs)
            self.mark(f"{part}_end")
            return out

        object.__setattr__(owner, method, marked)

    def mark(self, name: str) -> None:
        if self.cuda:
            self.marks[name] = torch.cuda.Event(enable_timing=True)
            self.marks[name].record()
        else:
            self.marks[name] = time.perf_counter()

    def ms(self) -> dict[str, float | None]:
        """text, denoise, decode, other ms of the last call (after it returned, GPU synchronised)."""
        if not all(name in self.marks for name in self.NAMES):
            return dict(text_ms=None, denoise_ms=None, decode_ms=None, other_ms=None)
        span = (lambda a, b: self.marks[a].elapsed_time(self.marks[b])) if self.cuda else \
            (lambda a, b: (self.marks[b] - self.marks[a]) * 1e3)
        parts = dict(text_ms=span("text_start", "text_end"), denoise_ms=span("text_end", "decode_start"),
                     decode_ms=span("decode_start", "decode_end"))
        return dict(parts, other_ms=span("start", "end") - sum(parts.values()))


def timed_call(pipe: Any, parts: Parts, row: Row, args: argparse.Namespace, steps: int) -> tuple[float, dict]:
    """One image: (wall seconds, its parts in ms)."""
    device = torch.device(args.device)
    parts.marks.clear()
    harness.sync(device)
    begin = time.perf_counter()
    parts.mark("start")
    pipe(prompt=harness.PROMPT, height=row.size, width=row.size, num_inference_steps=steps, guidance_scale=GUIDANCE,
         max_sequence_length=args.text_len, generator=torch.Generator("cpu").manual_seed(0), output_type="pil")
    parts.mark("end")
    harness.sync(device)
    return time.perf_counter() - begin, parts.ms()


# ---- one row ----------------------------------------------------------------------------------


def measure(row: Row, models: Models, args: argparse.Namespace) -> dict:
    """Build the row's pipeline, warm it up, time --images images; the row's record."""
    device = torch.device(args.device)
    record = dict(asdict(row), steps=args.steps)
    try:
        with torch.no_grad():
            pipe, note = SETUPS[row.framework](models.pipeline(), row, args)
            parts = Parts(pipe, device.type == "cuda")
            record.update(note=note, warmup_s=round(timed_call(pipe, parts, row, args, args.warmup_steps)[0], 2))
            harness.reset_peak(device)
            calls = [timed_call(pipe, parts, row, args, args.steps) for _ in range(args.images)]
        seconds = [s for s, _ in calls]
        middle = calls[seconds.index(sorted(seconds)[len(seconds) // 2])][1]  # the median call's parts
        record.update(per_image_s=round(statistics.median(seconds), 3), images=len(calls),
                      **{k: None if v is None else round(v, 1) for k, v in middle.items()},
                      peak_gib=harness.peak_gib(device, 1))
        if record["denoise_ms"] is not None:
            record["step_ms"] = round(record["denoise_ms"] / args.steps, 2)
    except Exception as exc:  # noqa: BLE001 - a failing framework must not end the run
        record["error"] = f"{type(exc).__name__}: {harness.first_line(exc)}"
        print(f"{row.label()} failed:\n{traceback.format_exc()}", flush=True)
    finally:
        if row.framework == "ditmesh" and row.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        pipe = parts = None
        harness.free()
    return record


def restored_compile_configs() -> Callable[[], None]:
    """cache-dit's set_compile_configs changes inductor's and dynamo's globals: a function that
    puts back what they are now (each row compiles as its framework does)."""
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    saved = inductor.get_config_copy(), dynamo.get_config_copy(), torch.get_float32_matmul_precision()

    def restore() -> None:
        inductor.load_config(saved[0])
        dynamo.load_config(saved[1])
        torch.set_float32_matmul_precision(saved[2])

    return restore


# ---- report -----------------------------------------------------------------------------------


def add_speedups(rows: list[dict]) -> None:
    """Each row's per-image time against diffusers eager and diffusers compiled at its size."""
    for base in ("eager", "compiled"):
        ref = {r["size"]: r["per_image_s"] for r in rows if r["framework"] == "diffusers" and r["mode"] == base
               and r.get("per_image_s")}
        for r in rows:
            if r.get("per_image_s") and r["size"] in ref:
                r[f"vs_diffusers_{base}"] = round(ref[r["size"]] / r["per_image_s"], 2)


def markdown(rows: list[dict], env: dict) -> str:
    f = harness.fmt
    where = lambda r: "1" if r["world"] == 1 else f"rank 0 of {r['world']} (fake)"  # noqa: E731
    body = [(f"{r['size']}²", r["framework"], r["mode"], where(r), f(r.get("per_image_s"), ".2f"), f(r.get("text_ms"), ".1f"),
             f(r.get("denoise_ms") and r["denoise_ms"] / 1e3, ".2f"), f(r.get("step_ms"), ".1f"), f(r.get("decode_ms"), ".1f"),
             f(r.get("other_ms"), ".1f"), f(r.get("warmup_s"), ".1f"), f(r.get("peak_gib"), ".1f"),
             *(f(r.get(key), ".2f") + ("x" if r.get(key) else "") for key in ("vs_diffusers_eager", "vs_diffusers_compiled")),
             r.get("error") or r.get("note", "")) for r in sorted(rows, key=lambda r: r["size"])]
    lines = [f"# Per-image latency, prompt to decoded image: FLUX.1-dev-sized on {env['machine']}", "",
             f"Command: `{env['command']}`", "",
             ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f"; {env['models']}; {env['steps']} steps, "
             f"{env['text_len']} T5 tokens + 77 CLIP tokens, guidance {GUIDANCE}, output PIL. per image: median wall "
             f"time of {env['images']} call(s) after a {env['warmup_steps']}-step warm-up call (warm-up s: compile, "
             "capture); text / decode: CUDA events around encode_prompt / vae.decode; denoise: between them; "
             "other: the rest (latents set-up, image to PIL). peak: max_memory_allocated, weights included.", "",
             *harness.table(("image", "framework", "mode", "GPUs", "per image s", "text ms", "denoise s", "step ms",
                             "decode ms", "other ms", "warm-up s", "peak GiB", "vs diffusers eager",
                             "vs diffusers compiled", "note"), body, "lllrrrrrrrrrrrl"),
             "", *[f"- {note}" for note in env["notes"]]]
    return "\n".join(lines) + "\n"


def environment(args: argparse.Namespace, device: torch.device) -> dict:
    notes = ["rank 0 of W (fake): torch's fake process group; the collectives (ulysses all-to-alls, the prompt "
             "embeddings' broadcast, the VAE's halo exchanges and image gather) return at once and move no data: one "
             "rank's compute and host cost without transfer time. Rank 0 encodes the prompt (the others skip the "
             "text encoders and hold none) and decodes its band of rows.",
             "Each row builds a new transformer (same seeded weights) and VAE; the text encoders are shared.",
             "Inductor caches off: every warm-up compiles cold."]
    if args.quick:
        notes.insert(0, "--quick: tiny models and sizes; proves the script, the times mean nothing.")
    models = ("tiny FLUX, tiny CLIP/T5, tiny VAE" if args.quick else
              "FLUX.1-dev transformer (19+38 blocks), FLUX VAE, CLIP-L, T5-XXL; random weights")
    return dict(machine=harness.device_name(device, "CPU"), command=harness.command(), versions=harness.versions(),
                models=models + (", bf16" if device.type == "cuda" else ", fp32"), steps=args.steps,
                text_len=args.text_len, images=args.images, warmup_steps=args.warmup_steps, notes=notes)


def kept_rows(path: Path, rows: list[Row]) -> list[dict]:
    """--append: the earlier results' rows that this run does not measure again."""
    if not path.exists():
        return []
    now = {(r.framework, r.mode, r.world, r.size) for r in rows}
    return [r for r in json.loads(path.read_text())["rows"]
            if (r["framework"], r["mode"], r["world"], r["size"]) not in now]


# ---- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models, 64², 2 steps: proves the script")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="in this order (default: %(default)s)")
    parser.add_argument("--sizes", default=None, help="image sides in pixels (default 1024,2048; 64 with --quick)")
    parser.add_argument("--worlds", default="2,4,8", help="ditmesh: one rank of these W (fake group)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 28; 2 with --quick)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of the warm-up call (default 2)")
    parser.add_argument("--images", type=int, default=1, help="timed images per row, median (default 1)")
    parser.add_argument("--rows", default=None,
                        help="exactly these rows, in this order: framework:mode:world:size,... (e.g. "
                             "ditmesh:default:8:2048,diffusers:compiled:1:2048)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no row after this many seconds")
    parser.add_argument("--cache-dit-descent", action="store_true", help="cache-dit's coordinate-descent tuning on")
    parser.add_argument("--xdit-compile", action="store_true", help="xDiT with its use_torch_compile")
    parser.add_argument("--append", action="store_true", help="keep the rows of an earlier e2e_<tag>.json not run now")
    parser.add_argument("--tag", default=None, help="results file e2e_<tag>.{json,md} (default: h200, cpu_tiny)")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args()
    started = time.time()
    harness.cold_compiles()
    args.frameworks = args.frameworks.split(",")
    args.sizes = [int(s) for s in (args.sizes or ("64" if args.quick else "1024,2048")).split(",")]
    args.worlds = [int(w) for w in args.worlds.split(",") if w]
    args.steps = args.steps or (2 if args.quick else 28)
    args.warmup_steps = min(args.warmup_steps, args.steps)
    args.text_len = 16 if args.quick else 512
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    stem = args.out / f"e2e_{args.tag or harness.machine_tag(device, tiny=args.quick)}"
    rows = planned_rows(args)
    env = environment(args, device)
    done = kept_rows(stem.with_suffix(".json"), rows) if args.append else []
    tic = time.perf_counter()
    models = Models(args, device, dtype)
    env["build_s"] = round(time.perf_counter() - tic, 1)
    restore = restored_compile_configs()
    for row in rows:
        tic = time.perf_counter()
        if time.time() - started > args.budget_s:
            done.append(dict(asdict(row), steps=args.steps, error=f"skipped: not started within --budget-s {args.budget_s:.0f}"))
        else:
            done.append(measure(row, models, args))
            restore()
        print(f"== {row.label():45s} {_summary(done[-1])} ({time.perf_counter() - tic:.0f} s)", flush=True)
        add_speedups(done)
        harness.write_results(stem, dict(env=env, rows=done), markdown(done, env))
    print(markdown(done, env))
    print(f"wrote {stem}.json and .md ({time.time() - started:.0f} s)", flush=True)


def _summary(record: dict) -> str:
    if record.get("error"):
        return record["error"]
    return (f"{record['per_image_s']:.2f} s/image (text {record['text_ms']} ms, denoise {record['denoise_ms']} ms, "
            f"decode {record['decode_ms']} ms), warm-up {record['warmup_s']} s, peak {record['peak_gib']} GiB")


if __name__ == "__main__":
    main()
