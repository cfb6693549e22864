"""Parallel VAE decode/encode and text encoders run once equal the serial pipeline.

Every rank builds the same tiny VAE (seeded), computes the serial reference itself, then splits
the VAE's rows over the world group (`vae.install`, threshold 0 so tiny latents split) and
compares (fp32, atol 1e-4). Latent heights that do and do not divide by the world size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

ATOL = 1e-4
TIMEOUT = 300  # first use of a pool imports diffusers on every rank: slow on a loaded host


def _vaes():
    # The VAEs the tiny pipelines hold: FLUX and SD3 share one (flow=True: shift/scale, no quant
    # convs), SDXL's has quant convs. Built alone: no text encoders to import.
    from ditmesh.models.tiny import _tiny_vae

    vaes = {}
    for name, flow in (("flux/sd3", True), ("sdxl", False)):
        torch.manual_seed(0)
        vaes[name] = _tiny_vae(flow=flow)
    return vaes


def _decode_encode_errors(shapes: list[tuple[int, int]], tiled: bool = False) -> dict[str, float]:
    """Run on every rank: max |parallel - serial| of decode and encode per VAE and latent shape."""
    from ditmesh.parallel import vae as parallel_vae

    errors = {}
    for name, vae in _vaes().items():
        if tiled:
            vae.enable_tiling()
        latents = [torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(h * w)) for h, w in shapes]
        with torch.no_grad():
            images = [vae.decode(z).sample for z in latents]
            moments = [vae.encode(image).latent_dist.mean for image in images]
            split = parallel_vae.install(vae, dist.group.WORLD, min_latent_pixels=0)
            assert split is not None
            for (h, w), z, image, moment in zip(shapes, latents, images, moments):
                errors[f"{name} decode {h}x{w}"] = (vae.decode(z).sample - image).abs().max().item()
                errors[f"{name} encode {h}x{w}"] = (vae.encode(image).latent_dist.mean - moment).abs().max().item()
            assert not split.active
    return errors


@pytest.mark.parametrize("world, shapes", [
    (2, [(8, 8), (7, 5)]),
    (4, [(8, 6), (9, 6)]),
    pytest.param(8, [(16, 4), (13, 5)], marks=pytest.mark.slow),  # 13 rows over 8 ranks: bands of 2 and 1
])
def test_decode_encode_equal_serial(pools, world, shapes):
    for rank_errors in pools(world).run(_decode_encode_errors, shapes, timeout=TIMEOUT):
        assert len(rank_errors) == 4 * len(shapes)
        assert max(rank_errors.values()) < ATOL, rank_errors


def test_tiled_decode_equals_serial_tiled(pools):
    # Tiles of 16 latent rows (the tiny VAE's sample_size 128), overlapping: each tile is split.
    for rank_errors in pools(4).run(_decode_encode_errors, [(24, 20)], tiled=True, timeout=TIMEOUT):
        assert max(rank_errors.values()) < ATOL, rank_errors


def _bands_decoded(min_latent_pixels: int, shapes: list[tuple[int, int]]) -> list[int]:
    from ditmesh.parallel import vae as parallel_vae

    vae = _vaes()["sdxl"]
    seen = []
    vae.decoder.conv_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-2]))
    parallel_vae.install(vae, dist.group.WORLD, min_latent_pixels=min_latent_pixels)
    with torch.no_grad():
        for h, w in shapes:
            vae.decode(torch.randn(1, 4, h, w))
    return seen


def test_threshold(pools):
    # Latents below the threshold (and with fewer rows than ranks) decode whole on every rank.
    shapes = [(8, 8), (16, 8), (1, 200)]
    assert pools(2).run(_bands_decoded, 100, shapes, timeout=TIMEOUT) == [[8, 8, 1], [8, 8, 1]]


# ---- whole pipelines: parallel VAE and text encoders once, under strategies ----------------

SIZE = 64  # 8 x 8 latents


def _pipeline_run(name: str, parallel: str, call: dict) -> tuple:
    """Run on every rank: (serial images, parallel images, text encoder parameters this rank
    holds, number of text encodings this rank ran, whether the VAE split)."""
    from ditmesh import ParallelConfig
    from ditmesh.models.tiny import tiny_pipeline
    from ditmesh.parallel import parallelize
    from ditmesh.parallel.vae import row_split

    call = dict(prompt="a photo of a cat", num_inference_steps=2, height=SIZE, width=SIZE, output_type="np", **call)
    serial = tiny_pipeline(name)(**call, generator=torch.Generator().manual_seed(3)).images
    pipe = tiny_pipeline(name)
    encodings = []
    for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, attr, None) is not None:
            getattr(pipe, attr).register_forward_pre_hook(lambda *_: encodings.append(1))
    pipe = parallelize(pipe, ParallelConfig.parse(parallel))
    row_split(pipe.vae).min_latent_pixels = 0  # tiny latents: split anyway
    bands = []
    pipe.vae.decoder.conv_in.register_forward_pre_hook(lambda module, args: bands.append(args[0].shape[-2]))
    images = pipe(**call, generator=torch.Generator().manual_seed(3)).images
    held = sum(p.numel() for attr in ("text_encoder", "text_encoder_2", "text_encoder_3")
               if getattr(pipe, attr, None) is not None for p in getattr(pipe, attr).parameters())
    return serial, images, held, len(encodings), bands


@pytest.mark.parametrize("name, world, parallel, call", [
    ("tiny-flux", 2, "ulysses=2", {}),
    ("tiny-sd3", 4, "cfg=2,ring=2", dict(guidance_scale=5.0, negative_prompt="blurry")),
    ("tiny-sdxl", 2, "cfg=2", dict(guidance_scale=5.0, negative_prompt="blurry")),
])
def test_pipeline_equal_serial(pools, name, world, parallel, call):
    results = pools(world).run(_pipeline_run, name, parallel, call, timeout=TIMEOUT)
    for rank, (serial, images, held, encodings, bands) in enumerate(results):
        np.testing.assert_allclose(images, serial, atol=ATOL, rtol=0)
        assert bands == [8 // world]  # the VAE decoded this rank's band of the 8 latent rows
        if rank == 0:
            assert held > 0 and encodings > 0
        else:  # the other ranks never encode and hold no text encoder
            assert held == 0 and encodings == 0
