"""python benchmarks/pipefusion_quality.py [--steps 8] [--size 128] [--out benchmarks/results]

How much PipeFusion's stale activations change what the trained default model draws: the
images of six prompts (tests/test_prompt_following.py's) under pipefusion=2 with 0/1/2 warm-up
steps and 2/4 patches, against the serial pipeline (same seeds): PSNR of the decoded images
(mean and worst over the prompts, 8-bit range) and how many still show the prompted colour and
shape. CPU/gloo, 2 ranks, one thread each, fp32. Prints a markdown table and writes
benchmarks/results/pipefusion_quality.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import numpy as np
import torch

from ditmesh.testing import RankPool

WARMUPS, PATCHES = (0, 1, 2), (2, 4)


def _draw(parallel: str | None, steps: int, size: int) -> np.ndarray | None:
    from tests.test_prompt_following import _draw as draw  # the prompt-following test's images

    return draw(parallel, steps, size)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _followed(images: np.ndarray) -> int:
    from tests.test_prompt_following import PROMPTS, object_colour_and_shape

    count = 0
    for prompt, image in zip(PROMPTS, images):
        try:
            count += object_colour_and_shape(image) == tuple(prompt.split()[1:])
        except AssertionError:  # no object
            pass
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    serial = _draw(None, args.steps, args.size)
    rows = [dict(config="serial", warmup=None, patches=None, psnr_mean=None, psnr_min=None,
                 followed=_followed(serial), of=len(serial))]
    with RankPool(2) as pool:
        for warmup in WARMUPS:
            for patches in PATCHES:
                config = f"pipefusion=2,pipefusion_patches={patches},warmup_steps={warmup}"
                images = next(out for out in pool.run(_draw, config, args.steps, args.size, timeout=600) if out is not None)
                psnrs = [_psnr(image, reference) for image, reference in zip(images, serial)]
                rows.append(dict(config=config, warmup=warmup, patches=patches, psnr_mean=float(np.mean(psnrs)),
                                 psnr_min=float(min(psnrs)), followed=_followed(images), of=len(images)))
                print(rows[-1], flush=True)
    table = _table(rows, args)
    print(table)
    harness.write_results(Path(args.out) / "pipefusion_quality", dict(steps=args.steps, size=args.size, rows=rows), table + "\n")


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"tiny-flux (trained), {args.size}x{args.size}, {args.steps} steps, 6 prompts, seed 0; PSNR vs serial",
             "", "| config | warm-up | patches | PSNR mean | PSNR worst | prompt followed |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        psnr = ("-", "-") if row["psnr_mean"] is None else (f"{row['psnr_mean']:.1f} dB", f"{row['psnr_min']:.1f} dB")
        lines.append(f"| {'serial' if row['warmup'] is None else 'pipefusion=2'} | {row['warmup'] if row['warmup'] is not None else '-'} "
                     f"| {row['patches'] or '-'} | {psnr[0]} | {psnr[1]} | {row['followed']}/{row['of']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
