"""Train the embedded default model from scratch on drawn shapes and write its weights.

    python -m ditmesh.models.pretrain tiny-flux                      # CPU: small steps to try it
    python -m ditmesh.models.pretrain tiny-flux --device cuda \\
        --vae-steps 3000 --steps 5500 -o ditmesh/models/assets        # what ships (one H200, ~6 min)

Three stages, each a fixed function of the seed (docs/default_model.md has the loss curve):

1. the VAE, on the images alone: decode(encode(x)) ~ x (MSE + a small KL term);
2. every image encoded once with the trained VAE (the latent mean), shifted and scaled to unit
   variance (the VAE's shift_factor / scaling_factor), every caption once with the frozen text
   encoders;
3. the transformer, a full fine-tune from random weights with `ditmesh.training.Trainer` (serial
   strategy, flow matching, per-example seeded noise) on those cached latents.

The weights (VAE + transformer, fp16, one safetensors file with the latent shift and scale in
its metadata) are what `ditmesh.models.tiny.pretrained_pipeline` loads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ditmesh.models.tiny import PRETRAINED, TINY_SIZE, pretrained_architecture
from ditmesh.training.config import TrainConfig
from ditmesh.training.loop import Trainer
from ditmesh.training.objective import recipe_for
from ditmesh.training.shapes import scene_examples

TEXT_LEN = 512  # what FluxPipeline pads prompts to by default: train on what inference sees


def main(argv: list[str] | None = None) -> None:
    """``python -m ditmesh.models.pretrain tiny-flux``: train, print the loss curves, write the weights."""
    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 throughout: a re-run on another GPU stays close
    started = time.perf_counter()
    pipe = pretrained_architecture(args.model, seed=args.seed)
    images, captions = _images(args.images, args.seed)
    print(f"{len(images)} images {TINY_SIZE}x{TINY_SIZE}, {len(set(captions))} captions", flush=True)
    train_vae(pipe.vae, images, steps=args.vae_steps, batch_size=args.vae_batch_size, lr=args.vae_lr,
              seed=args.seed, device=device)
    dataset = encode(pipe, images, captions, device)
    print(f"latents: shift {pipe.vae.config.shift_factor:.4f} scale {pipe.vae.config.scaling_factor:.4f}; "
          f"text embeddings checksum {dataset.text['prompt_embeds'].double().abs().sum().item():.6f}", flush=True)
    config = TrainConfig(lora_rank=0, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         resolution=TINY_SIZE, max_sequence_length=TEXT_LEN)
    trainer = Trainer(config, pipe.transformer, dataset, device=device)
    curve = _Curve("transformer", args.steps)
    path = Path(args.output) / PRETRAINED[args.model]

    def on_step(progress: dict) -> None:
        curve.add(progress["step"], progress["loss"])
        if args.save_every and progress["step"] % args.save_every == 0:
            save(pipe, path)  # constant lr, seeded batches and noise: equals a run with --steps <this step>
            print(f"saved step {progress['step']}", flush=True)

    trainer.train(on_step=on_step)
    save(pipe, path)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MB) in {time.perf_counter() - started:.0f} s", flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(PRETRAINED))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=4096, help="drawn training images")
    parser.add_argument("--vae-steps", type=int, default=20)
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=20, help="transformer optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=0, help="also write the weights every N transformer steps")
    parser.add_argument("-o", "--output", default=".", help="folder for the weights file")
    return parser


def _images(num_images: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    examples = scene_examples(num_images, TINY_SIZE, seed)
    pixels = np.stack([np.asarray(image) for image, _ in examples])  # (N, H, W, 3) uint8
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [caption for _, caption in examples]


def _to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0  # uint8 -> [-1, 1]


def train_vae(vae: torch.nn.Module, images: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int,
              device: torch.device, kl_weight: float = 1e-6) -> None:
    """Train `vae` as an autoencoder on `images` (N, 3, H, W) uint8: MSE of the reconstruction of a
    sampled latent, plus `kl_weight` x the KL to N(0, I) (keeps the latents bounded)."""
    vae.to(device).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    curve = _Curve("vae", steps)
    images = images.to(device)
    for step in range(1, steps + 1):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        x = _to_unit(images[index.to(device)])
        posterior = vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        reconstruction = vae.decode(posterior.mean + posterior.std * noise).sample
        loss = torch.nn.functional.mse_loss(reconstruction, x) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.add(step, loss.item())
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode(pipe, images: torch.Tensor, captions: list[str], device: torch.device) -> "EncodedShapes":
    """Encode every image (latent mean) and each distinct caption once; set the VAE's
    shift/scale so the latents have mean 0 and variance 1; return the training dataset."""
    vae = pipe.vae
    latents = torch.cat([vae.encode(_to_unit(chunk).to(device)).latent_dist.mode().cpu() for chunk in images.split(256)])
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    distinct = sorted(set(captions))
    text = recipe_for(pipe).encode_text(pipe, distinct, TEXT_LEN, torch.device("cpu"))  # frozen encoders, on the CPU
    caption_index = torch.tensor([distinct.index(caption) for caption in captions])
    return EncodedShapes((latents - shift) * scale, caption_index, text)


class EncodedShapes(Dataset):
    """The drawn shapes as `Trainer` reads a cache: item i is ``{"index", "latents" (C, h, w),
    "prompt_embeds" (T, D), "pooled_prompt_embeds" (D,)}``, held in memory (captions shared)."""

    def __init__(self, latents: torch.Tensor, caption_index: torch.Tensor, text: dict[str, torch.Tensor]):
        self.latents, self.caption_index, self.text = latents, caption_index, text

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.caption_index[index]
        return {"index": torch.tensor(index), "latents": self.latents[index]} | {
            name: value[row] for name, value in self.text.items()}


def save(pipe, path: Path) -> Path:
    """Write the VAE and transformer weights (fp16) and the latent shift/scale to `path`."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"{prefix}.{name}": tensor.detach().to("cpu", torch.float16).contiguous()
             for prefix, module in (("vae", pipe.vae), ("transformer", pipe.transformer))
             for name, tensor in module.state_dict().items()}
    metadata = {"vae.shift_factor": repr(pipe.vae.config.shift_factor),
                "vae.scaling_factor": repr(pipe.vae.config.scaling_factor)}
    save_file(state, str(path), metadata=metadata)
    return path


class _Curve:
    """Prints the mean loss of every `every` steps (the loss curve) and the first step's."""

    def __init__(self, name: str, steps: int, points: int = 20):
        self.name, self.steps, self.every = name, steps, max(1, steps // points)
        self.losses: list[float] = []
        self.started = time.perf_counter()

    def add(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        if step == 1 or step % self.every == 0 or step == self.steps:
            window = self.losses[-self.every:]
            print(f"{self.name} step {step:5d}/{self.steps} loss {sum(window) / len(window):.5f} "
                  f"({time.perf_counter() - self.started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
