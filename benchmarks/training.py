"""LoRA training of a FLUX.1-dev-sized transformer: step time and peak memory, DDP and FSDP2, 1 and 2 GPUs.

    python benchmarks/training.py --worlds 1                          # one H200  -> results/training_h200.{json,md}
    python benchmarks/training.py --worlds 1,2                        # two H200s -> results/training_h200_x2.{json,md}
    python benchmarks/training.py --device cpu --tiny --worlds 1,2    # CPU + gloo, tiny FLUX: the logic, in a minute

For each world size W in --worlds the script spawns W processes (no torchrun), initialises
torch.distributed (NCCL on CUDA, gloo on CPU) and runs each strategy in --strategies through
ditmesh's own `Trainer` (the code `ditmesh train` runs):

    ddp    data_degree=W: DistributedDataParallel, every rank holds the whole model
    fsdp   fsdp_degree=W: FSDP2 (fully_shard per block), weights, gradients, optimizer state sharded

The transformer has FLUX.1-dev's architecture (19 double + 38 single blocks, 24 heads x 128,
11.9 B parameters), built on the meta device and materialised on the GPU with random weights
(seeded, the same on every rank), frozen in bf16; LoRA adapters (--lora-rank, on the attention
projections) train in fp32 with AdamW under bf16 autocast (``mixed_precision="bf16"``). The data
are synthetic examples of the real shapes (16-channel latents at --resolution, 512 T5 tokens x
4096, 768 pooled CLIP), so no weights, tokenizers or images are needed. Measured per case:
median step time of --steps optimizer steps after --warmup (one example per GPU per step unless
--batch-per-gpu), examples/s, throughput speed-up vs the same strategy on 1 GPU, and per rank
the memory after set-up and the peak during the steps (torch.cuda.max_memory_allocated).

Needs torch, diffusers, peft and safetensors (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from harness import FLUX_DEV

STRATEGIES = {"ddp": "data_degree", "fsdp": "fsdp_degree"}
"""Strategy -> the degree it spreads over; at world 1 the strategy's wrapper still runs (DDP, fully_shard)."""


@dataclass(frozen=True)
class Settings:
    """What every rank needs (picklable: sent to the spawned ranks)."""

    device_type: str
    tiny: bool
    strategies: tuple[str, ...]
    resolution: int
    text_len: int
    lora_rank: int
    batch_per_gpu: int
    steps: int
    warmup: int
    gradient_checkpointing: bool


class SyntheticLatents(Dataset):
    """Cached-example stand-ins of FLUX's real shapes, drawn per index from a seeded generator."""

    def __init__(self, num: int, latent_shape: tuple[int, ...], text_len: int, text_dim: int, pooled_dim: int):
        self.num, self.latent_shape, self.text_shape, self.pooled_dim = num, latent_shape, (text_len, text_dim), pooled_dim

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        return {"index": torch.tensor(index),
                "latents": torch.randn(self.latent_shape, generator=generator),
                "prompt_embeds": torch.randn(self.text_shape, generator=generator).to(torch.bfloat16),
                "pooled_prompt_embeds": torch.randn(self.pooled_dim, generator=generator).to(torch.bfloat16)}


def build_model(settings: Settings, device: torch.device) -> torch.nn.Module:
    """FLUX.1-dev-sized (or tiny) transformer: meta device, then random bf16 weights on `device`."""
    from diffusers import FluxTransformer2DModel

    from ditmesh.models.tiny import tiny_flux_transformer

    if settings.tiny:
        return tiny_flux_transformer()  # the Trainer stores its frozen weights in bf16
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = FluxTransformer2DModel(**FLUX_DEV)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)  # 22 GiB of bf16, uninitialised
    generator = torch.Generator(device=device).manual_seed(0)  # the same weights on every rank
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    return model


def dataset_for(settings: Settings, model: torch.nn.Module) -> SyntheticLatents:
    config = model.config
    latent_channels = config.in_channels // 4  # FLUX packs 2x2 latent pixels per token
    side = settings.resolution // 8  # the VAE's 8x downscale
    return SyntheticLatents(1024, (latent_channels, side, side), settings.text_len, config.joint_attention_dim,
                            config.pooled_projection_dim)


def run_case(strategy_name: str, world: int, settings: Settings, device: torch.device) -> dict:
    """Train --warmup + --steps steps of one strategy; rank 0 returns the row (others None)."""
    from ditmesh.training.config import TrainConfig
    from ditmesh.training.ddp import DDPStrategy
    from ditmesh.training.fsdp import FSDPStrategy
    from ditmesh.training.loop import Trainer
    from ditmesh.training.mesh import TrainMesh

    config = TrainConfig(**{STRATEGIES[strategy_name]: world}, batch_size=world * settings.batch_per_gpu,
                         steps=settings.warmup + settings.steps, lora_rank=settings.lora_rank, lr=1e-4,
                         mixed_precision="bf16", resolution=settings.resolution, max_sequence_length=settings.text_len,
                         gradient_checkpointing=settings.gradient_checkpointing)
    cuda = device.type == "cuda"
    gc.collect()  # the previous case's model, wrappers and optimizer
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(settings, device)
    strategy = {"ddp": DDPStrategy, "fsdp": FSDPStrategy}[strategy_name]
    trainer = Trainer(config, model, dataset_for(settings, model), mesh=TrainMesh.build(config), device=device,
                      strategy=strategy)
    del model
    setup_gib = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(config.steps):
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        losses.append(trainer.train_step())  # ends in a loss all-reduce + .item(): the step is done
        if step >= settings.warmup:
            times.append(time.perf_counter() - started)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    memory = [None] * world
    dist.all_gather_object(memory, (setup_gib and round(setup_gib, 2), peak_gib and round(peak_gib, 2)))
    trained = sum(p.numel() for p in trainer.full_state().values())  # collective (FSDP gathers)
    if dist.get_rank() != 0:
        return None
    step_s = statistics.median(times)
    return dict(strategy=strategy_name, world=world, parallel=config.parallel_str(), batch=config.batch_size,
                step_ms=round(step_s * 1000, 1), examples_per_s=round(config.batch_size / step_s, 3),
                setup_gib_per_rank=[m[0] for m in memory], peak_gib_per_rank=[m[1] for m in memory],
                trained_params=trained, losses=[round(x, 4) for x in losses])


def rank_main(rank: int, world: int, port: int, out_path: str, settings: Settings) -> None:
    """Body of each spawned rank: init torch.distributed, run this world's strategies; rank 0 saves rows."""
    device = harness.init_rank(rank, world, port, settings.device_type)
    rows = []
    try:
        for strategy in settings.strategies:
            try:
                row = run_case(strategy, world, settings, device)
            except torch.OutOfMemoryError as error:  # report it, go on with the next case
                row = dict(strategy=strategy, world=world, error=f"out of memory: {str(error).splitlines()[0]}")
                torch.cuda.empty_cache()
            if rank == 0:
                rows.append(row)
                print(f"[world {world}] {strategy}: {_summary(row)}", flush=True)
                torch.save(rows, out_path)
    finally:
        dist.destroy_process_group()


def _summary(row: dict) -> str:
    if "error" in row:
        return row["error"]
    peak = row["peak_gib_per_rank"]
    return (f"step {row['step_ms']:.0f} ms, {row['examples_per_s']:.2f} examples/s"
            + (f", peak {max(peak):.1f} GiB per rank" if peak[0] is not None else ""))


def run_world(world: int, settings: Settings) -> list[dict]:
    rows, error, _ = harness.spawn_rows(rank_main, world, settings)
    return rows + ([dict(strategy="(world)", world=world, error=f"failed: {error}")] if error else [])


def add_speedups(rows: list[dict]) -> None:
    """Throughput (examples/s) of each row vs the same strategy on one process."""
    base = {row["strategy"]: row for row in rows if row["world"] == 1 and "error" not in row}
    for row in rows:
        if "error" not in row and row["strategy"] in base:
            row["speedup_vs_1"] = round(row["examples_per_s"] / base[row["strategy"]]["examples_per_s"], 3)


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# LoRA training step: {env['model']} on {env['device']}", "",
             f"`{env['command']}`", "",
             f"torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}; {env['resolution']}x"
             f"{env['resolution']} ({env['image_tokens']} image + {env['text_len']} text tokens), LoRA rank "
             f"{env['lora_rank']} on the attention projections, bf16 base, AdamW, {env['batch_per_gpu']} example(s) "
             f"per GPU per step, gradient checkpointing {'on' if env['gradient_checkpointing'] else 'off'}; median of "
             f"{env['steps']} steps after {env['warmup']} warm-up."
             + (" CPU run: it proves the code path; times on a shared CPU host are no measurement." if env["device"] == "cpu" else ""),
             "",
             *harness.table(("strategy", "GPUs", "step (ms)", "examples/s", "speed-up vs 1 GPU",
                             "memory after set-up, per rank (GiB)", "peak per rank (GiB)"), [
                 (r["strategy"], r["world"], r["error"], "", "", "", "") if "error" in r else
                 (r["strategy"], r["world"], f"{r['step_ms']:.0f}", f"{r['examples_per_s']:.2f}", r.get("speedup_vs_1", ""),
                  _gib(r["setup_gib_per_rank"]), _gib(r["peak_gib_per_rank"])) for r in report["rows"]])]
    return "\n".join(lines) + "\n"


def _gib(values: list) -> str:
    return ", ".join("-" if value is None else f"{value:.2f}" for value in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="1,2", help="comma-separated world sizes (GPUs)")
    parser.add_argument("--strategies", default="ddp,fsdp", help=f"comma-separated: {', '.join(STRATEGIES)}")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny FLUX (a few hundred k parameters) instead of FLUX.1-dev")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 1024; 64 with --tiny)")
    parser.add_argument("--text-len", type=int, default=None, help="T5 tokens (default 512; 16 with --tiny)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--batch-per-gpu", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--tag", default=None, help="results file name: training_<tag>.{json,md}")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args()

    worlds = [int(w) for w in args.worlds.split(",")]
    if args.device == "cuda" and max(worlds) > torch.cuda.device_count():
        raise SystemExit(f"--worlds {args.worlds} needs {max(worlds)} GPUs; {torch.cuda.device_count()} visible")
    settings = Settings(device_type=args.device, tiny=args.tiny, strategies=tuple(args.strategies.split(",")),
                        resolution=args.resolution or (64 if args.tiny else 1024), text_len=args.text_len or (16 if args.tiny else 512),
                        lora_rank=args.lora_rank, batch_per_gpu=args.batch_per_gpu, steps=args.steps, warmup=args.warmup,
                        gradient_checkpointing=args.gradient_checkpointing)
    rows = []
    for world in worlds:
        rows += run_world(world, settings)
    add_speedups(rows)

    import peft

    device_name = harness.device_name(args.device)
    tag = args.tag or harness.machine_tag(args.device, max(worlds) if max(worlds) > 1 and args.device == "cuda" else None, args.tiny)
    env = dict(tag=tag, device=device_name, model="tiny FLUX" if args.tiny else "FLUX.1-dev-sized transformer (random weights)",
               command=harness.command(), torch=torch.__version__, diffusers=harness.versions()["diffusers"],
               peft=peft.__version__, resolution=settings.resolution, image_tokens=(settings.resolution // 16) ** 2,
               text_len=settings.text_len, lora_rank=settings.lora_rank, batch_per_gpu=settings.batch_per_gpu,
               steps=settings.steps, warmup=settings.warmup, gradient_checkpointing=settings.gradient_checkpointing)
    report = dict(env=env, rows=rows)
    stem = args.out / f"training_{tag}"
    harness.write_results(stem, report, markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
