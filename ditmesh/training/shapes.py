"""A tiny training set drawn in code: coloured shapes on plain backgrounds, with captions.

    python -m ditmesh.training.shapes shapes/            # 32 images, 64x64, a .txt caption beside each
    ditmesh train --model tiny-flux --data shapes/ --parallel data=2 --lora-rank 8 --steps 50 -o lora/

Deterministic: the same arguments write the same files, so tests can build it once per session
and every strategy trains on identical data. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
PLAIN = (128, 128, 128)
"""The grey background of a caption that names none ("a red circle")."""


def write_shapes_dataset(folder: str | Path, num_images: int = 32, size: int = 64, seed: int = 0,
                         captions: str = "txt") -> list[Path]:
    """Draw `num_images` `size`x`size` PNGs into `folder`; return their paths.

    Captions go in a ``.txt`` beside each image (``captions="txt"``) or in one ``metadata.jsonl``
    (``captions="jsonl"``, lines ``{"file_name": ..., "text": ...}``), the two layouts
    `ditmesh.training.data.read_folder` accepts.
    """
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths, lines = [], []
    for index in range(num_images):
        image, caption = _draw(rng, size)
        path = folder / f"shape_{index:03d}.png"
        image.save(path)
        if captions == "txt":
            path.with_suffix(".txt").write_text(caption + "\n")
        else:
            lines.append(json.dumps({"file_name": path.name, "text": caption}))
        paths.append(path)
    if lines:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return paths


def _draw(rng: random.Random, size: int):
    shape = rng.choice(SHAPES)
    colour, background = rng.sample(sorted(COLOURS), 2)
    radius = rng.randint(size // 6, size // 3)
    cx, cy = (rng.randint(radius, size - radius) for _ in range(2))
    image = draw_shape(size, shape, COLOURS[colour], COLOURS[background], (cx, cy), radius)
    return image, f"a {colour} {shape} on a {background} background"


def draw_shape(size: int, shape: str, colour: tuple[int, int, int], background: tuple[int, int, int],
               centre: tuple[int, int], radius: int):
    """A `size`x`size` PIL image: one filled `shape` ("circle", "square", "triangle") of
    half-width `radius` at `centre` on a plain `background` (RGB tuples)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cx, cy = centre
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return image


def scene_examples(num_images: int, size: int = 128, seed: int = 0) -> list[tuple[object, str]]:
    """The pretraining set of the embedded default model (`python -m ditmesh.models.pretrain`):
    (PIL image, caption) pairs, in memory, a fixed function of the arguments.

    Even examples: a shape near the centre on the plain grey background, captioned with colour
    and shape only ("a red circle", what a user types). Odd examples: anywhere on a named
    background ("a red circle on a blue background").
    """
    rng = random.Random(seed)
    examples = []
    for index in range(num_images):
        shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
        radius = rng.randint(size // 5, size // 3)
        if index % 2 == 0:
            jitter = size // 16
            centre = (size // 2 + rng.randint(-jitter, jitter), size // 2 + rng.randint(-jitter, jitter))
            background, caption = PLAIN, f"a {colour} {shape}"
        else:
            name = rng.choice([other for other in sorted(COLOURS) if other != colour])
            centre = (rng.randint(radius, size - radius), rng.randint(radius, size - radius))
            background, caption = COLOURS[name], f"a {colour} {shape} on a {name} background"
        examples.append((draw_shape(size, shape, COLOURS[colour], background, centre, radius), caption))
    return examples


def main(argv: list[str] | None = None) -> None:
    """``python -m ditmesh.training.shapes DIR``: write the tiny dataset to DIR."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_shapes_dataset(args.folder, args.num_images, args.size, args.seed)
    print(f"wrote {len(paths)} {args.size}x{args.size} images with captions to {args.folder}")


if __name__ == "__main__":
    main()
