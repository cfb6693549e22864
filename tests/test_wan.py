"""Wan 2.1 / 2.2 video under every strategy vs the same tiny model run serially in one process.

Every rank builds the same tiny Wan (seeded), computes the serial reference itself, then runs the
parallel one; outputs (transformer outputs, or the pipeline's final latents with
output_type="latent") must agree to 1e-4 max abs error (fp32, `assert_close(atol=1e-4, rtol=0)`).
Token and head counts that do not divide are included: 3 latent frames of 3x3 tokens (27 tokens)
and 3 heads at ulysses=2. The pipelines are Wan 2.2 A14B's layout (two experts: of the 2 steps,
the high-noise one runs the first, the low-noise one the second), so both experts are proven to get the strategies; one is the I2V pipeline.
Several cases share one pool run (a job per world size) to keep the rank start-ups few.
"""

from __future__ import annotations

import pytest
import torch

from ditmesh import ParallelConfig
from ditmesh.models import adapter_for
from ditmesh.models.tiny import T5_DIM, tiny_wan_pipeline, tiny_wan_transformer, wan_transformer_inputs
from ditmesh.parallel import parallelize, sequence, tensor
from ditmesh.parallel.mesh import ParallelMesh

TOL = dict(atol=1e-4, rtol=0)
SIZE = 48  # 6x6 latents -> 3x3 tokens per frame
FRAMES = 9  # 3 latent frames: 27 video tokens


# ---- the transformer alone: sequence and tensor parallelism ----------------------------------


def _transformer_case(parallel: str, num_heads: int, frames: int, height: int, width: int, image_tokens: int = 0) -> dict:
    """Serial vs parallel output of one tiny Wan transformer, and the tokens rank-local blocks saw.
    `image_tokens` > 0: Wan 2.1 I2V's cross-attention to image-encoder tokens (and 512 text tokens)."""
    config = ParallelConfig.parse(parallel)
    mesh = ParallelMesh.build(config)
    model = tiny_wan_transformer(num_heads=num_heads, image_dim=16 if image_tokens else None)
    inputs = wan_transformer_inputs(frames=frames, height=height, width=width, image_tokens=image_tokens,
                                    text_len=512 if image_tokens else 7)
    seen = []  # (video tokens, text tokens) entering the second block
    model.blocks[1].register_forward_pre_hook(lambda m, args: seen.append((args[0].shape[1], args[1].shape[1])))
    with torch.no_grad():
        expected = model(**inputs)[0]
        tensor.apply(model, mesh, adapter_for(model), config)
        if config.sequence_degree > 1:
            sequence.apply(model, mesh, adapter_for(model), config)
        out = model(**inputs)[0]
    return dict(error=(out - expected).abs().max().item(), close=_close(out, expected), serial=seen[0], parallel=seen[1],
                degree=mesh.size("sequence"))


def _close(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    try:
        torch.testing.assert_close(actual, expected, **TOL)
    except AssertionError as error:
        return str(error)
    return None


def _transformer_cases(cases: list[tuple]) -> list[dict]:
    return [_transformer_case(*case) for case in cases]


def _check_transformer(results: list[list[dict]], cases: list[tuple]) -> None:
    for rank_results in results:
        for case, result in zip(cases, rank_results):
            assert result["close"] is None, (case, result["close"])
            (tokens, text), degree = result["serial"], result["degree"]  # text: [image tokens, text] for I2V
            # Video tokens are split (ceil(n / degree) per rank), the text stays whole for cross-attention.
            assert result["parallel"] == (-(-tokens // degree), text), (case, result)


# (parallel, heads, latent frames, latent height, latent width[, image tokens]): token counts
# 3*3*5 = 45 and 5*2*3 = 30 and heads 3 do not divide the degrees; 5 image tokens: Wan 2.1 I2V.
CASES_2 = [
    ("ulysses=2", 3, 3, 6, 10),
    ("ring=2", 4, 3, 6, 10),
    ("tensor=2", 4, 5, 4, 6),
    ("ulysses=2", 4, 3, 6, 10, 5),
    ("tensor=2", 4, 3, 4, 4, 5),
]
CASES_4 = [
    ("ulysses=4", 3, 5, 4, 6),
    ("ulysses=4", 4, 2, 4, 4),  # 8 tokens, 4 heads: nothing padded (the packed exchange)
    ("ring=2,ulysses=2", 3, 3, 6, 10),
    ("ulysses=2,tensor=2", 4, 3, 6, 10),
    ("tensor=4", 4, 3, 4, 4),
]


def test_transformer_sequence_and_tensor_world2(pools):
    _check_transformer(pools(2).run(_transformer_cases, CASES_2, timeout=300), CASES_2)


def test_transformer_sequence_and_tensor_world4(pools):
    _check_transformer(pools(4).run(_transformer_cases, CASES_4, timeout=300), CASES_4)


# ---- the pipelines: cfg, data, hybrids; both Wan 2.2 experts ---------------------------------


def _call(parallel: bool, *, prompts: int, image_to_video: bool, guidance: float) -> dict:
    """Call arguments; the parallel call takes one generator seeded s, the serial equivalent one
    generator per video (s, s+1, ...), as data parallelism draws them."""
    gen = torch.Generator().manual_seed(7)
    call = dict(num_inference_steps=2, height=SIZE, width=SIZE, num_frames=FRAMES, output_type="latent",
                guidance_scale=guidance, num_videos_per_prompt=1)
    # Prompt embeddings given (random, 6 text tokens): the same on every rank, and diffusers' I2V
    # pipeline cleans prompt strings only with ftfy installed (ditmesh[video]).
    call["prompt_embeds"] = torch.randn(prompts, 6, T5_DIM, generator=gen)
    call["negative_prompt_embeds"] = torch.randn(prompts, 6, T5_DIM, generator=gen)
    if image_to_video:
        call["image"] = torch.rand(1, 3, SIZE, SIZE, generator=gen)
    call["generator"] = torch.Generator().manual_seed(3) if parallel else [torch.Generator().manual_seed(3 + i) for i in range(prompts)]
    return call


def _pipeline_case(parallel: str, prompts: int = 1, image_to_video: bool = False, guidance: float = 5.0) -> dict:
    kwargs = dict(prompts=prompts, image_to_video=image_to_video, guidance=guidance)
    expected = tiny_wan_pipeline(experts=2, image_to_video=image_to_video)(**_call(False, **kwargs)).frames
    pipe = tiny_wan_pipeline(experts=2, image_to_video=image_to_video)
    experts = (pipe.transformer, pipe.transformer_2)
    calls = [[], []]  # batch sizes of the calls each expert ran on this rank
    for expert, log in zip(experts, calls):
        expert.register_forward_pre_hook(lambda m, args, kwargs, log=log: log.append(kwargs["hidden_states"].shape[0]),
                                         with_kwargs=True)
    out = parallelize(pipe, ParallelConfig.parse(parallel))(**_call(True, **kwargs))
    applied = [(getattr(e, "_ditmesh_sequence_parallel", None) is not None, _is_sharded(e)) for e in experts]
    frames = None if out is None else out.frames
    return dict(expected=expected, frames=frames, calls=calls, applied=applied)


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _pipeline_cases(cases: list[tuple]) -> list[dict]:
    return [_pipeline_case(*case) for case in cases]


def _check_pipeline(result: dict, prompts: int = 1) -> None:
    assert result["expected"].shape == (prompts, 4, 3, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(result["frames"], result["expected"], **TOL)


def test_pipelines_cfg_data_ulysses_world2(pools):
    # cfg=2: each rank runs one branch of each step (one call per step, 1 row) on both experts;
    # data=2: 3 prompts split 2 + 1; ulysses=2 on the I2V pipeline (27 tokens, 4 heads).
    cases = [("cfg=2",), ("data=2", 3), ("ulysses=2", 1, True)]
    results = pools(2).run(_pipeline_cases, cases, timeout=300)
    for rank, (cfg, data, ulysses) in enumerate(results):
        _check_pipeline(cfg)
        assert cfg["calls"] == [[1], [1]]  # step 1 on the high-noise expert, step 2 on the low-noise one
        if rank == 0:
            _check_pipeline(data, prompts=3)
        else:
            torch.testing.assert_close(data["frames"], data["expected"][2:], **TOL)  # its own share
        assert data["calls"] == ([[2, 2], [2, 2]] if rank == 0 else [[1, 1], [1, 1]])  # cond + uncond per step
        _check_pipeline(ulysses)
        assert ulysses["applied"] == [(True, False), (True, False)]


def test_pipelines_hybrids_world4(pools):
    # Two hybrids, on both experts: cfg=2 x ulysses=2 (I2V; 3 heads would pad: tiny has 4) and
    # data=2 x tensor=2 (T2V, 3 prompts).
    cases = [("cfg=2,ulysses=2", 1, True), ("data=2,tensor=2", 3)]
    results = pools(4).run(_pipeline_cases, cases, timeout=300)
    for rank, (cfg_ulysses, data_tensor) in enumerate(results):
        _check_pipeline(cfg_ulysses)
        assert cfg_ulysses["applied"] == [(True, False), (True, False)] and cfg_ulysses["calls"] == [[1], [1]]
        assert data_tensor["applied"] == [(False, True), (False, True)]
        if rank < 2:  # data group 0 holds all videos
            _check_pipeline(data_tensor, prompts=3)


def test_pipefusion_is_refused_naming_the_strategies():
    from ditmesh.parallel import validate

    pipe = tiny_wan_pipeline()
    with pytest.raises(ValueError, match="pipefusion parallelism has no plan for wan models.*use data, cfg, ring/ulysses, tensor"):
        validate.check(pipe, ParallelConfig.parse("pipefusion=2"), 2)
    with pytest.raises(ValueError, match="valid tensor degrees: 1, 2, 4"):
        validate.check(pipe, ParallelConfig.parse("tensor=3"), 3)
    validate.check(pipe, ParallelConfig.parse("cfg=2,ring=2,ulysses=2,tensor=2"), 16)  # everything else composes


# ---- loading and the command line ------------------------------------------------------------


def test_saved_wan_folder_loads_through_load_pipeline(tmp_path):
    from ditmesh.models.loading import load_pipeline

    tiny_wan_pipeline(experts=2).save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path))
    assert type(loaded).__name__ == "WanPipeline" and loaded.transformer_2 is not None
    assert adapter_for(loaded).name == "wan"
    call = dict(prompt="a cat", num_inference_steps=2, height=32, width=32, num_frames=5, output_type="latent",
                max_sequence_length=8)
    expected = tiny_wan_pipeline(experts=2)(**call, generator=torch.Generator().manual_seed(0)).frames
    torch.testing.assert_close(loaded(**call, generator=torch.Generator().manual_seed(0)).frames, expected, atol=0, rtol=0)


def test_generate_writes_a_9_frame_video(tmp_path, capsys):
    import importlib.util

    from PIL import Image

    from ditmesh.cli import main

    # The command's code path in this process (its rank is a spawned worker process, as always).
    suffix = ".mp4" if importlib.util.find_spec("imageio_ffmpeg") else ".gif"
    out = tmp_path / f"video{suffix}"
    code = main(["generate", "--model", "tiny-wan", "--frames", "9", "--height", "32", "--width", "48", "--steps", "2",
                 "-o", str(out)])
    assert code == 0
    assert f"wrote {out} (9 frames of 48x32" in capsys.readouterr().out
    if suffix == ".gif":
        with Image.open(out) as video:
            assert (video.format, video.size, video.n_frames) == ("GIF", (48, 32), 9)
    else:
        import imageio.v3 as iio

        assert iio.imread(out).shape[0] == 9


def test_save_video_formats(tmp_path):
    from PIL import Image

    from ditmesh.cli import save_video

    frames = [Image.new("RGB", (16, 16), (20 * i, 0, 0)) for i in range(9)]
    for suffix, kind in ((".gif", "GIF"), (".webp", "WEBP")):
        with Image.open(save_video(frames, tmp_path / f"v{suffix}", fps=8)) as video:
            assert (video.format, video.n_frames) == (kind, 9)
    with pytest.raises(ValueError, match="use a .mp4, .gif, .webp"):
        save_video(frames, tmp_path / "v.avi")


# ---- the parallel VAE decode (AutoencoderKLWan: causal 3-D convs, per-frame feature cache) ----


def _vae_decode_case(shapes: list[tuple[int, int, int]]) -> list[dict]:
    """Serial vs row-split decode of the tiny Wan VAE for latents (frames, height, width), and the
    band of latent rows each decoder call saw on this rank."""
    import torch.distributed as dist

    from ditmesh.models.tiny import WAN_LATENT_CHANNELS, _tiny_wan_vae
    from ditmesh.parallel import vae as parallel_vae

    torch.manual_seed(0)
    vae = _tiny_wan_vae()
    results = []
    with torch.no_grad():
        latents = [torch.randn(1, WAN_LATENT_CHANNELS, *shape, generator=torch.Generator().manual_seed(sum(shape)))
                   for shape in shapes]
        expected = [vae.decode(z).sample for z in latents]
        split = parallel_vae.install(vae, dist.group.WORLD, min_latent_pixels=0)
        bands = []
        vae.decoder.conv_in.register_forward_pre_hook(lambda module, args: bands.append(args[0].shape[-2]))
        for z, serial in zip(latents, expected):
            bands.clear()
            out = vae.decode(z).sample
            results.append(dict(close=_close(out, serial), error=(out - serial).abs().max().item(), bands=sorted(set(bands)),
                                shape=tuple(out.shape), active=split.active))
    return results


def test_vae_decode_split_by_rows_equals_serial(pools):
    # 3 latent frames (9 video frames: the causal cache carries rows across calls); 7 latent rows
    # split 4 + 3 at world 2 and 2 + 2 + 2 + 1 at world 4; one latent row per rank at world 4.
    for world, shapes in ((2, [(3, 7, 6)]), (4, [(3, 7, 5), (2, 4, 4)])):
        for rank, rank_results in enumerate(pools(world).run(_vae_decode_case, shapes, timeout=300)):
            for (frames, height, _), result in zip(shapes, rank_results):
                assert result["close"] is None, (world, rank, result)
                band = -(-height // world) if rank < height % world or height % world == 0 else height // world
                assert result["bands"] == [band] and not result["active"], (world, rank, result)
                assert result["shape"][2] == 4 * frames - 3


# ---- bench and serve with a video model ------------------------------------------------------


def test_bench_reports_seconds_per_video(tmp_path, capsys):
    import json

    from ditmesh.cli import main

    report = tmp_path / "bench.json"
    code = main(["bench", "--model", "tiny-wan", "--parallel", "serial", "--frames", "5", "--steps", "2", "--height", "32",
                 "--width", "32", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tiny-wan, 2 steps, 5 frames" in printed and "| s/video | videos/s |" in printed
    (row,) = json.loads(report.read_text())["rows"]
    assert (row["videos"], row["frames"], row["max_pixel_diff"]) == (1, 5, 0)
    assert row["s_per_video"] == row["median_s"] > 0


class _VideoRunner:
    """What the app uses of a runner, answering as `DiffusionWorker` does for a video model: step
    events, then ``{"videos": [[PIL frame, ...]], ...}`` with `num_frames` frames."""

    world_size, device_type, pids, alive, is_running, needs_restart = 1, "cpu", [0], [True], True, False
    INFO = dict(model="tiny-wan", family="wan", pipeline="WanPipeline", size_multiple=16, default_size=32,
                parallel="serial", dtype="float32", video=True)

    async def start(self, **kwargs):
        pass

    async def stop(self):
        pass

    async def invoke(self, payload, timeout=None):
        if payload.get("describe"):
            return self.INFO
        from PIL import Image

        frames = [Image.new("RGB", (payload["width"], payload["height"]), (30 * i, 0, 0)) for i in range(payload["num_frames"])]
        return {"videos": [frames], "seed": payload["seed"], "seconds": 0.5}

    async def stream(self, payload, as_text_events=False, timeout=None):
        for step in range(payload["steps"]):
            yield {"step": step + 1, "of": payload["steps"]}
        yield await self.invoke(payload)


def test_serve_answers_a_video_model_with_video_files_and_sse():
    import asyncio
    import base64
    import io

    import httpx
    from PIL import Image

    from ditmesh.serve import ServeSettings
    from ditmesh.serve.app import create_app

    async def talk():
        app = create_app(_VideoRunner(), {}, ServeSettings())
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                body = dict(prompt="a cat", height=32, width=48, steps=2, num_frames=5, seed=1)
                answers = [await client.post("/v1/images/generations", json=dict(body, output_format=fmt))
                           for fmt in ("gif", "png")]
                streamed = await client.post("/v1/images/generations", json=dict(body, output_format="webp", stream=True))
                refused = [await client.post("/v1/images/generations", json=dict(body, **change))
                           for change in (dict(num_frames=6), dict(output_format="jpeg"))]
        return answers, streamed, refused

    answers, streamed, refused = asyncio.run(talk())
    for answer, kind in zip(answers, ("GIF", "PNG")):
        assert answer.status_code == 200, answer.text
        data = answer.json()
        assert (data["images"], data["frames"], data["fps"], data["width"], data["height"]) == ([], 5, 16, 48, 32)
        with Image.open(io.BytesIO(base64.b64decode(data["videos"][0]))) as video:
            assert (video.format, video.n_frames, video.size) == (kind, 5, (48, 32))
    events = [line.split(": ", 1)[1] for line in streamed.text.splitlines() if line.startswith("event: ")]
    assert events == ["step", "step", "result"]
    assert [r.status_code for r in refused] == [422, 422]
    assert "num_frames 6 is not 4k+1; use 5 or 9" in refused[0].text and "a video comes as png, gif, webp, mp4" in refused[1].text
