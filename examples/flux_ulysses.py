"""FLUX with Ulysses sequence parallelism: one image's tokens split over the processes (GPUs).

    # CPU, tiny random FLUX (no download), 2 processes:
    python examples/flux_ulysses.py --ulysses 2 -o flux.png
    # 4 GPUs, a local FLUX.1-dev folder (diffusers layout):
    python examples/flux_ulysses.py --model /models/FLUX.1-dev --ulysses 4 --height 1024 --width 1024 \
        --steps 28 --dtype bfloat16 -o flux.png

Progress is streamed from rank 0 (one event per denoising step, with a small latent preview).
"""

from __future__ import annotations

import argparse
import asyncio

from ditmesh import DistributedRunner, ParallelConfig
from ditmesh.runner.diffusion import DiffusionWorker


async def generate(args: argparse.Namespace):
    config = ParallelConfig(ulysses_degree=args.ulysses)
    setup = dict(model=args.model, parallel=config, dtype=args.dtype)
    payload = dict(prompt=args.prompt, steps=args.steps, height=args.height, width=args.width, seed=args.seed,
                   preview=True)
    async with DistributedRunner(DiffusionWorker, world_size=config.world_size, setup_kwargs=setup) as runner:
        async for item in runner.stream(payload, as_text_events=False):
            if "step" in item:
                print(f"step {item['step']}/{item['of']} (preview {item['preview'].size[0]}x{item['preview'].size[1]})")
            else:
                print(f"generated in {item['seconds']:.2f} s on {config.world_size} processes ({config})")
                return item["images"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-flux", help="tiny-flux or a local FLUX.1 folder")
    parser.add_argument("--ulysses", type=int, default=2, help="processes sharing one image's tokens")
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("-o", "--output", default="flux.png")
    args = parser.parse_args()
    image = asyncio.run(generate(args))
    image.save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
