"""`ditmesh` command line: ``ditmesh generate`` runs a pipeline on several processes (GPUs);
``ditmesh bench`` times the same generation under several parallel configs side by side;
``ditmesh serve`` serves generation over HTTP (`ditmesh.serve`); ``ditmesh train`` trains a LoRA
(or the whole transformer) on a folder of images (`ditmesh.training`).

    ditmesh generate --model tiny-flux --parallel ulysses=2 -o out.png
    ditmesh generate --model /models/FLUX.1-dev --lora /loras/ghibli:0.8 --lora /loras/detail -o lora.png
    ditmesh generate --model /models/FLUX.1-dev --parallel cfg=2,ulysses=4 \\
        --prompt "a cat" --negative-prompt "blurry" --true-cfg-scale 4 --steps 28 -o cat.png
    ditmesh bench --model /models/FLUX.1-dev --parallel serial ulysses=8 ring=8 ring=2,ulysses=4 \\
        --steps 28 --dtype bfloat16 --height 1024 --width 1024 --json bench.json
    ditmesh serve --model tiny-flux --parallel ulysses=2 --port 8000
    ditmesh train --model tiny-flux --data shapes/ --parallel data=2 --lora-rank 8 --steps 50 -o lora/

One process per rank is spawned through `DistributedRunner` (the product of the parallel degrees;
NCCL on GPUs, gloo on CPU); rank 0's progress is drawn here and the images are written here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from ditmesh.config import ParallelConfig

TINY_MODELS = ("tiny-flux", "tiny-sd3", "tiny-sdxl", "tiny-wan", "tiny-flux-random")
DTYPES = ("float32", "bfloat16", "float16")
MODEL_HELP = (f"{', '.join(TINY_MODELS)} (tiny, offline: tiny-flux trained on drawn shapes, the others random) "
              "or a local diffusers folder (model_index.json)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ditmesh`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:  # user errors name their fix; no traceback
        print(f"ditmesh: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditmesh", description="Diffusion transformers and U-Nets on many GPUs.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate images from a prompt",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("--model", default="tiny-flux", help=MODEL_HELP)
    gen.add_argument("--parallel", default="serial",
                     help='degrees, e.g. "cfg=2,ulysses=2" (data, cfg, pipefusion, ring, ulysses, tensor); '
                          "their product is the number of processes")
    gen.add_argument("--prompt", default="a photo of an astronaut riding a horse")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--steps", type=int, default=4, help="denoising steps")
    gen.add_argument("--height", type=int, default=None, help="pixels (default: the model's; 128 for tiny models)")
    gen.add_argument("--width", type=int, default=None, help="pixels (default: the model's; 128 for tiny models)")
    gen.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    gen.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the pipeline's)")
    gen.add_argument("--true-cfg-scale", type=float, default=None,
                     help="FLUX true classifier-free guidance (needs --negative-prompt; what cfg=2 splits)")
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt (data=N generates them in parallel)")
    gen.add_argument("--dtype", choices=DTYPES, default="float32")
    gen.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                     help="auto: one GPU per process if there are GPUs, else CPU processes")
    _add_speed_arguments(gen)
    _add_lora_argument(gen)
    gen.add_argument("-o", "--output", default="out.png", help="image path; several images: out_0.png, out_1.png, ...")
    gen.add_argument("--frames", type=int, default=None,
                     help="video models (Wan): frames, 4k+1 (default: the pipeline's; 9 for tiny-wan); "
                          "-o out.mp4 (needs ditmesh[video]), .gif or .webp")
    gen.add_argument("--fps", type=int, default=16, help="video models: frames per second of the written file")
    gen.set_defaults(run=_generate)
    _add_engine(gen)

    bench = commands.add_parser("bench", help="time one generation under several parallel configs, side by side",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_argument("--model", default="tiny-flux", help=MODEL_HELP)
    bench.add_argument("--parallel", nargs="+", default=["serial", "ulysses=2", "ring=2"],
                       help="configs to compare (the first that runs is the baseline of speed-up and pixel diff)")
    bench.add_argument("--prompt", default="a photo of an astronaut riding a horse")
    bench.add_argument("--negative-prompt", default=None)
    bench.add_argument("--true-cfg-scale", type=float, default=None, help="FLUX true CFG (what cfg=2 splits)")
    bench.add_argument("--steps", type=int, default=4)
    bench.add_argument("--height", type=int, default=None)
    bench.add_argument("--width", type=int, default=None)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--frames", type=int, default=None,
                       help="video models (Wan): frames, 4k+1 (default: the pipeline's; 9 for tiny-wan); rows then "
                            "give seconds per video")
    bench.add_argument("--repeats", type=int, default=3, help="timed generations per config (median)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed generations per config first (compile, caches)")
    bench.add_argument("--dtype", choices=DTYPES, default="float32")
    bench.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    bench.add_argument("--eager", action="store_true", help="no torch.compile of the blocks (compiled on GPUs by default)")
    _add_lora_argument(bench)
    bench.add_argument("--max-graphs", type=int, default=8, help=MAX_GRAPHS_HELP)
    bench.add_argument("--no-cuda-graphs", action="store_true",
                       help="issue every op of every step from the host (default on GPUs: each step replayed as one "
                            "CUDA graph, compiled or --eager; never under pipefusion)")
    bench.add_argument("--cuda-graphs", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    bench.add_argument("--json", default=None, help="also write the rows and the environment to this JSON file")
    bench.set_defaults(run=_bench)
    _add_engine(bench, several=True)

    serve = commands.add_parser("serve", help="serve image generation over HTTP (JSON and server-sent events)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--model", default="tiny-flux", help=MODEL_HELP)
    serve.add_argument("--parallel", default="serial", help="degrees, as for generate (their product: the processes)")
    serve.add_argument("--dtype", choices=DTYPES, default="float32")
    serve.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    _add_speed_arguments(serve, serving=True)
    _add_lora_argument(serve)
    serve.add_argument("--lora-dir", default=None,
                       help="a folder of LoRAs on this machine (folders saved with save_lora_weights, or .safetensors), "
                            "loaded once by name; a request turns some on with \"loras\": {\"NAME\": SCALE} (a switch "
                            "to a new set recompiles once on GPUs; a set seen before replays)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind; other than loopback needs --api-key")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port (the ready line names it)")
    serve.add_argument("--api-key", default=None,
                       help="clients must send 'Authorization: Bearer KEY' (default: $DITMESH_API_KEY if set, which "
                            "keeps the key out of the process list)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests that may wait while one runs; more get 429")
    serve.add_argument("--timeout", type=float, default=600.0,
                       help="seconds a generation may take; longer gets 504 and the ranks restart")
    serve.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: 1 on CPU)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.set_defaults(run=_serve)
    _add_engine(serve)

    train = commands.add_parser("train", help="train a LoRA (or the whole transformer) on a folder of images with captions")
    train.add_argument("--model", default="tiny-flux", help=MODEL_HELP)
    train.add_argument("--data", required=True, help="folder of images with captions (a .txt beside each, or metadata.jsonl)")
    train.add_argument("--parallel", default="serial",
                       help='degrees, e.g. "data=2", "fsdp=4", "data=2,tensor=2", "data=2,ulysses=2", '
                            '"pipeline=2,microbatches=4,schedule=gpipe" (pipeline, data, fsdp, ring, ulysses, tensor); '
                            "their product is the number of processes")
    train.add_argument("-o", "--output", default="lora", help="folder for the LoRA (or model), checkpoints and the cache")
    train.add_argument("--steps", type=int, default=None, help="optimizer steps (default 100)")
    train.add_argument("--batch-size", type=int, default=None, help="examples per step over all ranks (default: one per data/fsdp rank and microbatch)")
    train.add_argument("--grad-accum", type=int, default=None, help="micro-steps per optimizer step (default 1)")
    train.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4)")
    train.add_argument("--optimizer", choices=("adamw", "sgd"), default=None, help="default adamw")
    train.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0)")
    train.add_argument("--lora-rank", type=int, default=None, help="LoRA rank; 0 trains every weight (default 16)")
    train.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    train.add_argument("--lora-targets", nargs="+", default=None,
                       help="linear layers to adapt, as name suffixes (default attn.to_q attn.to_k attn.to_v attn.to_out.0)")
    train.add_argument("--mixed-precision", choices=("no", "bf16"), default=None,
                       help="bf16: frozen weights in bf16 and a bf16 autocast forward; trained weights stay fp32")
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    train.add_argument("--resolution", type=int, default=None, help="square training size in pixels (default 512; 64 for tiny models)")
    train.add_argument("--max-sequence-length", type=int, default=None, help="text tokens (default 512; 64 for tiny models)")
    train.add_argument("--guidance", type=float, default=None, help="guidance fed to guidance-distilled models (default 3.5)")
    train.add_argument("--checkpoint-every", type=int, default=None, help="steps between resumable checkpoints (default 0: none)")
    train.add_argument("--seed", type=int, default=None, help="LoRA init, data order and noise (default 0)")
    train.add_argument("--cache", default=None, help="where encoded examples are cached (default OUTPUT/cache)")
    train.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    train.add_argument("--no-resume", action="store_true", help="start over even if OUTPUT has checkpoints")
    train.set_defaults(run=_train)
    for sub in (gen, bench, serve):
        _add_cache_option(sub)
        sub.add_argument("--quantize", choices=("off", "fp8", "fp8-tensorwise"), default="off",
                         help="fp8: the transformer's block linears as fp8 matmuls (torchao, rowwise scales; needs "
                              "--dtype bfloat16 and a GPU with fp8 tensor cores: Ada, Hopper, Blackwell); fp8-tensorwise: one "
                              "scale per tensor instead; see docs/fp8.md")
    return parser


EAGER_HELP = ("on GPUs, skip torch.compile of the blocks (each step is still replayed as one CUDA graph, which "
              "takes the host's per-op issue off the step). Compiled (the default) the first "
              "call compiles for seconds to a minute (tiny FLUX: 19 s on one H200) and each new image size captures a "
              "graph (FLUX.1-dev size: ~0.4 s); afterwards steps are faster (FLUX.1-dev, one H200: 134 ms compiled "
              "against 183-199 ms eager). --eager suits a single quick image")
MAX_GRAPHS_HELP = ("CUDA graphs kept per process, one per image size and LoRA set (least recently used dropped); "
                   "each holds its activations' memory")


def _add_speed_arguments(parser: argparse.ArgumentParser, serving: bool = False) -> None:
    parser.add_argument("--eager", action="store_true",
                        help=EAGER_HELP + (" (serve: compile and capture happen at start-up, before /healthz is "
                                           "ready, and the time is logged)" if serving else ""))
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    parser.add_argument("--max-graphs", type=int, default=8, help=MAX_GRAPHS_HELP)


def _add_lora_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora", action="append", default=[], type=_lora_spec, metavar="PATH[:SCALE]",
                        help="a LoRA (diffusers/peft folder or .safetensors) loaded before parallelizing, at SCALE "
                             "(default 1); repeat for several, all active together")


def _lora_spec(spec: str) -> list:
    path, sep, scale = spec.rpartition(":")
    if not sep or not path or not _is_number(scale):
        path, scale = spec, "1"
    if not Path(path).expanduser().exists():
        raise argparse.ArgumentTypeError(f"no LoRA at {path!r}; pass a folder saved with save_lora_weights or a .safetensors file")
    return [str(Path(path).expanduser()), float(scale)]


def _lora_dir(folder: str | None) -> str | None:
    if folder is not None and not Path(folder).expanduser().is_dir():
        raise ValueError(f"--lora-dir {folder} is not a folder; pass the folder that holds the LoRAs")
    return None if folder is None else str(Path(folder).expanduser())


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _speed_setup(args: argparse.Namespace) -> dict[str, Any]:
    """Setup kwargs of the speed and LoRA options (compile None: compiled on GPUs)."""
    if args.max_graphs < 1:
        raise ValueError(f"--max-graphs must be >= 1 (got {args.max_graphs}); --eager on several GPUs replays none")
    if args.quantize != "off":  # refused here, before any process starts
        from ditmesh.parallel.quantize import check_cli

        check_cli(args.quantize, args.device, args.dtype)
    quantize = {} if args.quantize == "off" else dict(quantize=args.quantize)  # only when on: every worker takes the rest
    return dict(compile=False if args.eager else None, loras=args.lora, max_graphs=args.max_graphs, cache=args.cache, **quantize)


def _cuda_graphs(args: argparse.Namespace) -> bool | None:
    """bench's graph option as `parallelize` takes it: False with --no-cuda-graphs, True only when
    asked for by the old flag (which the xfuser engine refuses), else None (the default)."""
    return False if args.no_cuda_graphs else (True if args.cuda_graphs else None)


def _engine_setup(engine: str, args: argparse.Namespace, setup: dict[str, Any]) -> dict[str, Any]:
    """`setup` for `engine`'s worker: xDiT's pipelines take `compile` and `cuda_graphs` of the speed
    options; ditmesh's own ones (LoRAs, step caching) are refused for it rather than dropped."""
    if engine != "xfuser":
        return setup
    ours = [flag for flag, used in (("--lora", args.lora), ("--cache", args.cache != "off"), ("--quantize", args.quantize != "off"),
                                    ("--lora-dir", getattr(args, "lora_dir", None))) if used]
    if ours:
        raise ValueError(f"{', '.join(ours)} are ditmesh's; --engine xfuser runs xDiT's pipelines without them: "
                         "drop them or use --engine ditmesh")
    return {key: value for key, value in setup.items()
            if key not in ("loras", "max_graphs", "cache", "warmup", "lora_dir", "quantize")}


def _add_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", default="off", type=_cache_spec,
                        help="step caching: 'fbcache,threshold=0.1', 'static,warmup=4,every=2', 'static,mask=1101...' "
                             "(taylor=1 extrapolates the cached residual) or 'off'; see docs/cache.md")


def _cache_spec(text: str) -> str:
    from ditmesh.config import CacheConfig

    try:
        return str(CacheConfig.parse(text))  # checked before any process starts
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _generate(args: argparse.Namespace) -> int:
    config = ParallelConfig.parse(args.parallel)
    _check_model(args.model)
    worker = _engine_worker(args.engine, config, args.model)
    _quiet_libraries()
    payload = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, height=args.height,
                   width=args.width, seed=args.seed, num_images=args.num_images, guidance=args.guidance)
    if args.true_cfg_scale is not None:
        payload["true_cfg_scale"] = args.true_cfg_scale
    if args.frames is not None:
        payload["num_frames"] = args.frames
    device_type = None if args.device == "auto" else args.device
    started = time.perf_counter()
    setup = dict(model=args.model, parallel=str(config), dtype=args.dtype, **_speed_setup(args))
    result = asyncio.run(_run(config, device_type, _engine_setup(args.engine, args, setup), payload, worker))
    if "videos" in result:
        return _write_videos(result, args, config, started)
    paths = _save(result["images"], Path(args.output))
    total = time.perf_counter() - started
    print(f"wrote {', '.join(map(str, paths))} ({result['images'][0].width}x{result['images'][0].height}, "
          f"{config.world_size} process(es), {config}): generation {result['seconds']:.2f} s, total {total:.2f} s")
    if result.get("computed_steps") is not None:
        print(f"computed {len(result['computed_steps'])} of {args.steps} steps")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from ditmesh import bench

    configs = [ParallelConfig.parse(spec) for spec in args.parallel]  # all parsed before any process starts
    _check_model(args.model)
    engines = {engine: _engine_worker(engine, config, args.model) for engine in args.engine.split(",") for config in configs}
    _quiet_libraries()
    payload = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, height=args.height,
                   width=args.width, seed=args.seed)
    if args.true_cfg_scale is not None:
        payload["true_cfg_scale"] = args.true_cfg_scale
    if args.frames is not None:
        payload["num_frames"] = args.frames
    setup = dict(model=args.model, dtype=args.dtype, cuda_graphs=_cuda_graphs(args), **_speed_setup(args))
    rows = [dict(row, config=f"{engine} {row['config']}" if len(engines) > 1 else row["config"])
            for engine, worker in engines.items()
            for row in bench.run_configs(configs, _engine_setup(engine, args, setup), payload, repeats=args.repeats, worker=worker,
                                         warmup=args.warmup, device_type=None if args.device == "auto" else args.device)]
    frames = next((f", {row['frames']} frames" for row in rows if "frames" in row), "")
    print(f"{args.model}, {args.steps} steps{frames}, {args.dtype}; generation time on rank 0, median of {args.repeats}")
    print(bench.table(rows))
    if args.json:
        import json

        report = dict(model=args.model, steps=args.steps, frames=args.frames, dtype=args.dtype, height=args.height, width=args.width,
                      repeats=args.repeats, warmup=args.warmup, compile_on_gpu=not args.eager, environment=bench.environment(),
                      rows=rows)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


def _train(args: argparse.Namespace) -> int:
    _check_model(args.model)
    _quiet_libraries()
    from ditmesh.training import command  # torch, diffusers and peft load only for this command

    return command.run(args)


def _serve(args: argparse.Namespace) -> int:
    config = ParallelConfig.parse(args.parallel)
    _check_model(args.model)
    worker = _engine_worker(args.engine, config, args.model)
    _quiet_libraries()
    import torch

    from ditmesh.runner.runner import DistributedRunner
    from ditmesh.serve import ServeSettings, run_server

    api_key = args.api_key or os.environ.get("DITMESH_API_KEY") or None
    settings = ServeSettings(max_queue=args.max_queue, timeout=args.timeout, api_key=api_key)
    device_type = None if args.device == "auto" else args.device
    on_cpu = device_type == "cpu" or (device_type is None and not torch.cuda.is_available())
    # The worker by name: only the ranks import diffusers. One thread per rank on CPU (they share the cores).
    runner = DistributedRunner(worker, world_size=config.world_size,
                               device_type=device_type, num_threads=args.threads or (1 if on_cpu else None))
    # Compiled on GPUs: every rank compiles and captures one call before the server says ready.
    setup = dict(model=args.model, parallel=str(config), dtype=args.dtype, **_speed_setup(args),
                 warmup=not args.eager and not on_cpu, lora_dir=_lora_dir(args.lora_dir))
    run_server(runner, _engine_setup(args.engine, args, setup), settings, host=args.host, port=args.port,
               log_level=args.log_level)
    return 0


async def _run(config: ParallelConfig, device_type: str | None, setup: dict[str, Any], payload: dict[str, Any],
               worker: str = "ditmesh.runner.diffusion:DiffusionWorker") -> Any:
    from ditmesh.runner.protocol import RemoteError
    from ditmesh.runner.runner import DistributedRunner

    runner = DistributedRunner(worker, world_size=config.world_size, device_type=device_type, setup_kwargs=setup)
    try:
        async with runner:  # starts the ranks: DiffusionWorker.setup(**setup) on each
            result = None
            async for item in runner.stream(payload, as_text_events=False):
                if isinstance(item, dict) and "step" in item:
                    _draw_progress(item["step"], item["of"])
                else:
                    result = item
            print(file=sys.stderr)
            return result
    except RemoteError as error:
        if error.exc_type.endswith("ValueError"):
            raise ValueError(error.message) from None  # a user error on the ranks: show just its message
        raise


ENGINES = {"ditmesh": "ditmesh.runner.diffusion:DiffusionWorker", "xfuser": "ditmesh.runner.xfuser:XFuserWorker"}


def _add_engine(parser: argparse.ArgumentParser, several: bool = False) -> None:
    parser.add_argument("--engine", default="ditmesh",
                        help="ditmesh (ours) or xfuser (xDiT's pipelines: pip install 'ditmesh[xfuser]', CUDA GPUs)"
                             + ("; several, comma-separated, time side by side: ditmesh,xfuser" if several else ""))


def _engine_worker(engine: str, config: ParallelConfig, model: str) -> str:
    """The worker class (by name) that runs `engine`; what the engine cannot run is refused here,
    before any process starts."""
    if engine not in ENGINES:
        raise ValueError(f"--engine {engine!r} is unknown; use one of {', '.join(ENGINES)}")
    if engine == "xfuser":
        import importlib.util

        from ditmesh.runner.xfuser import XFUSER_VERSION, check_xfuser

        check_xfuser(config, model)
        if importlib.util.find_spec("xfuser") is None:
            raise ValueError(f"--engine xfuser needs xfuser {XFUSER_VERSION}: pip install 'ditmesh[xfuser]' "
                             "(it runs on CUDA GPUs only)")
    return ENGINES[engine]


def _quiet_libraries() -> None:
    # Library advisories (optional packages not installed) in every worker drown the output; the
    # workers inherit this environment. Set the variables yourself to see them.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from ditmesh.runner.procs import quiet_import_warnings

    quiet_import_warnings()  # this process's own; the ranks' fork server does the same (_preload.py)


def _draw_progress(step: int, of: int, width: int = 30) -> None:
    filled = width * step // max(of, 1)
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] step {step}/{of}", end="", file=sys.stderr, flush=True)


def _check_model(model: str) -> None:
    # Fail before spawning processes; the workers raise the same errors (loading.py).
    if model in TINY_MODELS:
        return
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise ValueError(f"--model {model!r} is neither a tiny model ({', '.join(TINY_MODELS)}) nor a folder; "
                         "pass a tiny name or the path of a downloaded diffusers folder (with model_index.json)")
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"no model_index.json in {folder}; pass the folder in diffusers layout that holds it")


def _write_videos(result: dict[str, Any], args: argparse.Namespace, config: ParallelConfig, started: float) -> int:
    videos, output = result["videos"], Path(args.output)
    if len(videos) == 1:
        paths = [output]
    else:
        paths = [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(len(videos))]
    for frames, path in zip(videos, paths):
        save_video(frames, path, args.fps)
    first = videos[0][0]
    print(f"wrote {', '.join(map(str, paths))} ({len(videos[0])} frames of {first.width}x{first.height}, "
          f"{config.world_size} process(es), {config}): generation {result['seconds']:.2f} s, "
          f"total {time.perf_counter() - started:.2f} s")
    return 0


def save_video(frames: list[Any], path: Path, fps: int = 16) -> Path:
    """Write PIL `frames` to `path`: .mp4 through diffusers' `export_to_video` (imageio-ffmpeg:
    ``pip install 'ditmesh[video]'``), any other suffix (.gif, .webp, .png) as an animation by PIL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".mp4":
        import importlib.util

        if importlib.util.find_spec("imageio_ffmpeg") is None:
            raise ValueError(f"writing {path.name} needs imageio-ffmpeg: pip install 'ditmesh[video]', "
                             "or write a .gif or .webp instead")
        from diffusers.utils import export_to_video

        export_to_video(frames, str(path), fps=fps)
    elif path.suffix.lower() in (".gif", ".webp", ".png"):
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    else:
        raise ValueError(f"cannot write a video to {path.name}; use a .mp4, .gif, .webp or .png (animated) path")
    return path


def _save(images: list[Any], output: Path) -> list[Path]:
    output.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        paths = [output]
    else:
        paths = [output.with_name(f"{output.stem}_{i}{output.suffix or '.png'}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
