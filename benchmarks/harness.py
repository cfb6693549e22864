"""What every benchmark script shares: process groups, timing, memory, errors, machine tags,
JSON + markdown writers and the FLUX.1-dev / SD3.5-sized model builders.

Each script in benchmarks/ asks one question and imports this module first:

    import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)

(`python benchmarks/x.py` and `torchrun benchmarks/x.py` put benchmarks/ on sys.path, so
`import harness` finds this file; nothing else in benchmarks/ touches sys.path.)

Importing it puts the repository root on sys.path (so `ditmesh` imports from this checkout
without an install) and turns NVLink multicast off for NCCL (the lender's GPU machines need it
off; it must be set before the first communicator). Scripts keep running as
`python benchmarks/x.py` and `torchrun ... benchmarks/x.py`, as the docs quote them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the one sys.path line of benchmarks/
RESULTS = REPO / "benchmarks" / "results"
for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ditmesh.models.flux import FLUX_DEV_CONFIG as FLUX_DEV  # noqa: E402
from ditmesh.models.sd3 import SD35_LARGE_CONFIG as SD35_LARGE  # noqa: E402

GIB = 2**30
GUIDANCE = 3.5  # FLUX.1-dev's guidance scale
PROMPT = "a photo of an astronaut riding a horse"
# --quick on a GPU: full width, few blocks (8 each, so pipefusion=8 still has a block per stage).
QUICK_GPU = {"flux": dict(num_layers=2, num_single_layers=6), "sd3": dict(num_layers=8)}
# CPU: tiny widths too (same shapes as ditmesh.models.tiny), 16 latent channels like the real VAEs.
TINY_CPU = {
    "flux": dict(FLUX_DEV, num_layers=2, num_single_layers=6, attention_head_dim=16, num_attention_heads=4,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
    "sd3": dict(SD35_LARGE, sample_size=32, num_layers=8, attention_head_dim=16, num_attention_heads=4,
                joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=64, pos_embed_max_size=32),
}
# Published text encoder configs (transformers): real sizes on the meta device or with random weights.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")


def cold_compiles() -> None:
    """Inductor's caches off, so every compile is cold: a warm-up is what a user's first call waits
    (whatever ran on the machine before). The environment for child processes, the configs for this one."""
    import torch._functorch.config as functorch
    import torch._inductor.config as inductor

    for name in ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE", "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE"):
        os.environ[name] = "0"
    inductor.fx_graph_cache = inductor.autotune_remote_cache = False
    functorch.enable_autograd_cache = False


# ---- process groups ---------------------------------------------------------------------------


def init_torchrun(device_type: str, timeout_s: float = 600.0, bind_device: bool = False) -> torch.device:
    """torch.distributed from torchrun's environment: NCCL on CUDA (this rank's GPU selected;
    `bind_device` also passes `device_id`, which xDiT's group set-up cannot take), gloo on CPU
    (the cores shared among the ranks). Returns this rank's device."""
    timeout = timedelta(seconds=timeout_s)
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device if bind_device else None)
        return device
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", 1))))
    dist.init_process_group("gloo", timeout=timeout)
    return torch.device("cpu")


def init_rank(rank: int, world: int, port: int, device_type: str, timeout_s: float = 600.0,
              bind_device: bool = True) -> torch.device:
    """torch.distributed in a rank that `spawn` started (one host: local rank == rank): NCCL on
    this rank's GPU, or gloo with one thread per rank on CPU. Returns this rank's device."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    timeout = timedelta(seconds=timeout_s)  # NCCL's watchdog ends a collective stuck this long
    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timeout,
                                device_id=device if bind_device else None)
        return device
    torch.set_num_threads(1)  # CPU runs prove the logic; one thread per rank keeps worlds comparable
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    return torch.device("cpu")


def spawn(body: Callable, world: int, *args: Any) -> None:
    """Run `body(rank, world, port, *args)` in `world` new processes and wait for them; if one
    raises, the others are ended and the error is raised here."""
    import torch.multiprocessing as mp

    from ditmesh.testing import free_port

    mp.spawn(body, args=(world, free_port(), *args), nprocs=world, join=True)


def spawn_rows(body: Callable, world: int, *args: Any) -> tuple[list, str | None, str | None]:
    """`spawn` of `body(rank, world, port, out_path, *args)`, whose rank 0 saves its rows so far to
    `out_path` (torch.save) after each row and may name the row in progress in `out_path.running`.
    Returns (the rows saved, the failure's last line or None, the row running when it failed), so a
    crash or hang keeps the rows finished before it."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.pt")
        error = running = None
        try:
            spawn(body, world, out_path, *args)
        except Exception as exc:  # noqa: BLE001 - reported to the caller with the rows finished before it
            lines = str(exc).strip().splitlines()
            error = lines[-1] if lines else type(exc).__name__
            print(f"world {world} failed:\n{exc}", flush=True)
            if os.path.exists(out_path + ".running"):
                running = Path(out_path + ".running").read_text()
        rows = torch.load(out_path, weights_only=False) if os.path.exists(out_path) else []
    return rows, error, running


def init_fake(world: int, rank: int = 0) -> None:
    """This process becomes rank `rank` of `world` in torch's fake process group: collectives
    return at once and move nothing, so a parallel code path runs one rank's compute and host
    cost at its shapes on one device, without the exchanges' time (outputs are not the model's)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())


@contextlib.contextmanager
def fake_group(world: int, rank: int = 0):
    """`init_fake` for the block's duration."""
    init_fake(world, rank)
    try:
        yield
    finally:
        dist.destroy_process_group()


def init_single(device: torch.device) -> None:
    """A real process group of one rank (NCCL on CUDA, gloo on CPU), for code that needs
    torch.distributed initialised while one process runs alone."""
    import tempfile

    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    if device.type == "cuda":
        # device_id needs an index ("cuda" alone is refused)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", device.index or 0))
    else:
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)


@contextlib.contextmanager
def one_accelerator_on_cpu(device: torch.device | str = "cpu"):
    """CPU proof of diffusers' context parallelism only: diffusers 0.42.1 places CP on device
    `rank % torch.accelerator.device_count()`, which divides by zero on a CPU-only host; inside,
    `device_count()` answers 1 (yields whether it did)."""
    if torch.device(device).type != "cpu" or torch.accelerator.device_count() > 0:
        yield False
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield True
    finally:
        torch.accelerator.device_count = count


# ---- timing, memory, error --------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn: Callable[[], Any], device: torch.device | str) -> float:
    """Wall time of `fn()` in ms: CUDA events on a GPU (queued work included), perf_counter on CPU."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def median_ms(fn: Callable[[], Any], device: torch.device | str, samples: int, warmup: int = 2) -> float:
    """Median of `samples` timed calls after `warmup` untimed ones. Under a process group every
    rank calls this with the same counts: the calls are collective, a rank doing fewer would
    leave the others hanging."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed_ms(fn, device) for _ in range(samples))


def first_call_s(fn: Callable[[], Any], device: torch.device | str) -> float:
    """Seconds of one call, its queued GPU work included (a first call: compile, capture, set-up)."""
    return timed_ms(fn, device) / 1e3


def bench_ms(fn: Callable[[], Any], samples: int = 7, min_sample_ms: float = 2.0, graph: bool = False,
             inner: int | None = None) -> float:
    """CUDA: median over `samples` of the mean time of a loop of calls (loop long enough for
    events). `inner` fixes the loop length instead (collectives: every rank must make the same
    calls). graph=True captures the loop in a CUDA graph and times its replays: the GPU time
    without the host's launch cost (which dominates kernels of a few tens of microseconds)."""
    for _ in range(3):
        fn()
    inner = inner or max(1, math.ceil(min_sample_ms / max(timed_ms(fn, "cuda"), 1e-3)))
    run = lambda: [fn() for _ in range(inner)]  # noqa: E731
    if graph:
        cuda_graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()  # warm the graph pool's allocations on the capture stream
            with torch.cuda.graph(cuda_graph, stream=stream):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        run = cuda_graph.replay
    return statistics.median(timed_ms(run, "cuda") / inner for _ in range(samples))


def host_ms(fn: Callable[[], Any], device: torch.device | str = "cuda", calls: int = 5) -> float:
    """Median ms the host takes to issue one call without waiting for the GPU (after a sync)."""
    times = []
    for _ in range(calls):
        sync(device)
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    sync(device)
    return statistics.median(times)


def percentiles(samples_ms: Iterable[float], ndigits: int | None = None) -> dict[str, float]:
    """p50, p99 (nearest rank), mean and count of latencies in ms."""
    ms = sorted(samples_ms)
    stats = {"p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))],
             "mean_ms": statistics.fmean(ms)}
    return {**({k: round(v, ndigits) for k, v in stats.items()} if ndigits is not None else stats), "n": len(ms)}


def reset_peak(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device | str, ndigits: int | None = None) -> float | None:
    """torch.cuda.max_memory_allocated in GiB since the last reset; None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated() / GIB
    return peak if ndigits is None else round(peak, ndigits)


def rel_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """||a - b|| / ||b|| in float64; None when either is missing or their shapes differ."""
    if a is None or b is None or a.shape != b.shape:
        return None
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def free() -> None:
    """Drop what a row left: garbage, compiled code (each row compiles its own, as a user's process
    would) and cached CUDA blocks."""
    import torch._dynamo

    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def first_line(exc: BaseException) -> str:
    """An error's first line (plus the raised exception torch.compile reports it traced), for a row."""
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    traced = next((line for line in lines if line.startswith("Developer debug context: raised exception")), None)
    return ((lines[0] if lines else repr(exc)) + (f" ({traced})" if traced else ""))[:400]


# ---- machine ----------------------------------------------------------------------------------


def device_name(device: torch.device | str = "cuda", cpu: str = "cpu") -> str:
    """The GPU's name ("NVIDIA H200"), or `cpu` off CUDA."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu


def machine_tag(device: torch.device | str, world: int | None = None, tiny: bool = False, fake: bool = False) -> str:
    """Results file tag: "h200", "h200_x2", "h200_fake8", "cpu_x2_tiny", "cpu_tiny" ..."""
    device = torch.device(device)
    name = device_name(device).split()[-1].lower()
    return name + ("" if world is None else f"_fake{world}" if fake else f"_x{world}") + ("_tiny" if tiny else "")


def versions() -> dict[str, str]:
    """Versions of what the numbers depend on (the peers where installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for package in ("diffusers", "transformers", "cache-dit", "xfuser"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def host_env() -> dict:
    """The host a CPU measurement ran on (load inflates tail latencies) and when."""
    import platform

    return {"cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "python": platform.python_version(),
            "torch": torch.__version__, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def command() -> str:
    """This run's command line, as a user would type it."""
    launcher = f"torchrun --nproc-per-node {os.environ['WORLD_SIZE']} " if "TORCHELASTIC_RUN_ID" in os.environ else "python "
    return launcher + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


# ---- writers ----------------------------------------------------------------------------------


def fmt(value: Any, spec: str = "") -> str:
    """A table cell: "" for None, `value` formatted with `spec` otherwise."""
    return "" if value is None else format(value, spec)


def times(ratio: float | None) -> str:
    """A speed-up cell: "1.23x", "" for None."""
    return "" if ratio is None else f"{ratio:.2f}x"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> list[str]:
    """Markdown table lines; `align` one letter per column ("l"/"r"), default all left."""
    align = align or "l" * len(header)
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def write_results(stem: Path, data: Any, markdown: str | None = None) -> None:
    """`stem`.json (indent 1) and, when given, `stem`.md; folders made as needed."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(data, indent=1, default=str))
    if markdown is not None:
        stem.with_name(stem.name + ".md").write_text(markdown)


def tag_from(name: str) -> str:
    """A file-name-safe tag ("NVIDIA H200" -> "nvidia-h200")."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---- models -----------------------------------------------------------------------------------


def seeded_model(cls_name: str, config: dict, device: torch.device | str = "cuda",
                 dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A diffusers model of class `cls_name` and `config` with torch's own initialisation from
    seed 0, built on `device` in fp32 and cast to `dtype` (as torch's initialisers expect)."""
    import diffusers

    torch.manual_seed(0)
    with torch.device(device):
        return getattr(diffusers, cls_name)(**config).to(dtype).eval()


def flux_inputs(batch: int = 1, h: int = 64, w: int = 64, text: int = 512, spec: dict = FLUX_DEV,
                device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict:
    """Keyword inputs of one FLUX transformer forward: h x w packed latent tokens (1024 px / 8
    (VAE) / 2 (packing) -> 64 x 64 = 4096) with their grid ids, `text` prompt tokens."""
    img_ids = torch.zeros(h, w, 3, device=device)
    img_ids[..., 1] = torch.arange(h, device=device)[:, None]
    img_ids[..., 2] = torch.arange(w, device=device)[None, :]
    kw = dict(device=device, dtype=dtype)
    return dict(hidden_states=torch.randn(batch, h * w, spec["in_channels"], **kw),
                encoder_hidden_states=torch.randn(batch, text, spec["joint_attention_dim"], **kw),
                pooled_projections=torch.randn(batch, spec["pooled_projection_dim"], **kw),
                timestep=torch.full((batch,), 0.7, **kw), guidance=torch.full((batch,), 3.5, **kw),
                img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3, device=device), return_dict=False)


def random_transformer(spec: dict, device: torch.device, dtype: torch.dtype, seed: int = 0,
                       cls: str = "FluxTransformer2DModel") -> torch.nn.Module:
    """A diffusers transformer of architecture `spec`: built on the meta device, materialised on
    `device` in `dtype`, weights U(+-1/sqrt(fan_in)) (torch's Linear scale), norms 1, biases 0,
    from `seed`: the same on every rank, in seconds even at FLUX.1-dev's 12 B parameters."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, cls)(**spec).to(dtype)
    return random_weights(model, device, seed)


def random_weights(model: torch.nn.Module, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """`model` (built on the meta device, no buffers) materialised on `device` with
    `random_transformer`'s weights."""
    model = model.to_empty(device=device).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                bound = 1.0 / math.sqrt(param[0].numel())
                param.uniform_(-bound, bound, generator=generator)
            else:
                param.fill_(0.0 if name.endswith("bias") else 1.0)
    return model


def build_pipeline(family: str, spec: dict, device: torch.device, dtype: torch.dtype, seed: int = 0,
                   transformer: Any = None) -> Any:
    """A real FluxPipeline / StableDiffusion3Pipeline: transformer of architecture `spec` built
    on `device` (random, seeded: identical on every rank), tiny text encoders and VAE fitted to it.
    A `transformer` given (built elsewhere, of architecture `spec`) is used as it is."""
    import diffusers

    from ditmesh.models.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    torch.manual_seed(seed)
    cls = diffusers.FluxTransformer2DModel if family == "flux" else diffusers.SD3Transformer2DModel
    if transformer is None:
        with torch.device(device):
            transformer = cls(**spec).to(dtype).eval()  # fp32 init then cast, as torch's initialisers expect
    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    t5 = _tiny_t5(len(t5_tok), spec["joint_attention_dim"])
    vae = _tiny_vae(latent_channels=spec["in_channels"] // (4 if family == "flux" else 1))
    if family == "flux":
        pipe = diffusers.FluxPipeline(
            transformer=transformer, vae=vae, text_encoder=_tiny_clip(len(clip_tok), spec["pooled_projection_dim"]),
            tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, scheduler=flux_scheduler())
    else:
        # CLIP-L and CLIP-G: pooled outputs concatenated; hidden states concatenated (16 + 16) and
        # zero-padded to the T5 width by the pipeline.
        half = spec["pooled_projection_dim"] // 2
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, vae=vae, text_encoder=_tiny_clip(len(clip_tok), 16, projection=half),
            tokenizer=clip_tok, text_encoder_2=_tiny_clip(len(clip_tok), 16, projection=half),
            tokenizer_2=tiny_clip_tokenizer(), text_encoder_3=t5, tokenizer_3=t5_tok,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def flux_scheduler() -> Any:
    """FLUX.1-dev's scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def _tiny_clip(vocab: int, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=projection or hidden,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")
    return (CLIPTextModel if projection is None else CLIPTextModelWithProjection)(config).eval()


def _tiny_t5(vocab: int, width: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab, d_model=width, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).eval()


def _tiny_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    # Four blocks: the 8x down-scaling of the real VAEs; 8/16 channels, so decoding costs little.
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, shift_factor=0.0609,
                         scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False).eval()


def prompt_embeds(pipe: Any, family: str, text_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Encoded prompt (and the negative one for SD3's CFG) as pipeline keyword arguments."""
    with torch.no_grad():
        if family == "flux":
            embeds, pooled, _ = pipe.encode_prompt(PROMPT, None, device=device, max_sequence_length=text_len)
            return dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPT, None, None, device=device, do_classifier_free_guidance=True, max_sequence_length=text_len)
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled)


def fresh_flux_pipeline(settings: dict, device: torch.device) -> Any:
    """A new FluxPipeline around a random transformer of `settings["spec"]` in `settings["dtype"]`
    (each strategy changes the one it gets)."""
    dtype = getattr(torch, settings["dtype"])
    return build_pipeline("flux", settings["spec"], device, dtype,
                          transformer=random_transformer(settings["spec"], device, dtype))


def flux_call_inputs(pipe: Any, settings: dict, device: torch.device) -> dict:
    """Keyword arguments of every timed call of a FLUX pipeline at `settings["size"]`²: prompt
    embeddings and initial latents, the same on every rank; latents out."""
    dtype = getattr(torch, settings["dtype"])
    size = settings["size"]
    tokens, channels = (size // 16) ** 2, settings["spec"]["in_channels"]
    latents = torch.randn(1, tokens, channels, generator=torch.Generator().manual_seed(1))  # packed 2x2 latents
    embeds = prompt_embeds(pipe, "flux", settings["text_len"], device)
    return dict(embeds, latents=latents.to(device, dtype), height=size, width=size, guidance_scale=GUIDANCE,
                max_sequence_length=settings["text_len"], output_type="latent")
