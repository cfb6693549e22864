"""Data-parallel SDXL: N images at once, one share per process (GPU), through the runner.

    # CPU, tiny random SDXL (no download), 2 processes, 4 images:
    python examples/parallel_sdxl.py --data 2 --num-images 4 -o sdxl_out
    # 8 GPUs, a local SDXL folder (diffusers layout), 8 images at 1024x1024, cfg on a second axis:
    python examples/parallel_sdxl.py --model /models/stable-diffusion-xl-base-1.0 --data 4 --cfg 2 \
        --num-images 8 --height 1024 --width 1024 --steps 30 --dtype float16 -o sdxl_out

Image i uses seed + i, so the images are the same for any --data / --cfg.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from ditmesh import DistributedRunner, ParallelConfig
from ditmesh.runner.diffusion import DiffusionWorker


async def generate(args: argparse.Namespace) -> list:
    config = ParallelConfig(data_degree=args.data, cfg_degree=args.cfg)
    setup = dict(model=args.model, parallel=config, dtype=args.dtype)
    payload = dict(prompt=args.prompt, negative_prompt="blurry, low quality", num_images=args.num_images,
                   steps=args.steps, height=args.height, width=args.width, seed=args.seed)
    async with DistributedRunner(DiffusionWorker, world_size=config.world_size, setup_kwargs=setup) as runner:
        started = time.perf_counter()
        result = await runner.invoke(payload)
        print(f"{len(result['images'])} images on {config.world_size} processes ({config}) "
              f"in {time.perf_counter() - started:.2f} s")
        return result["images"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-sdxl", help="tiny-sdxl or a local SDXL folder")
    parser.add_argument("--data", type=int, default=2, help="data-parallel replicas")
    parser.add_argument("--cfg", type=int, default=1, choices=(1, 2), help="2: guidance branches on two ranks")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("-o", "--output", default="sdxl_out", help="folder for image_0.png, image_1.png, ...")
    args = parser.parse_args()
    images = asyncio.run(generate(args))
    Path(args.output).mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(Path(args.output) / f"image_{i}.png")
    print(f"wrote {len(images)} images to {args.output}/")


if __name__ == "__main__":
    main()
