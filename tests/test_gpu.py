"""GPU paths at world size 1: NCCL, device placement, CUDA tensors through the strategies.

    python -m pytest -q tests/test_gpu.py                                  # on a CUDA machine
    DITMESH_TEST_GPU_DEVICE=cpu python -m pytest -q tests/test_gpu.py      # dev aid: same tests on CPU/gloo

Skipped when no CUDA device is visible (CPU CI). On one GPU only world size 1 is possible, so these
tests check what a multi-GPU run relies on and a CPU/gloo test cannot see: a 1-rank NCCL group
and a CUDA `ParallelMesh`, parallelized pipelines on CUDA against the same pipeline unwrapped,
the sequence-parallel attention entry point and ring attention on CUDA tensors (degree 1), the
`DistributedRunner` on NCCL (CUDA result tensors arrive on the caller's CPU), and the single-GPU
fast path against plain diffusers in bf16. With 2 or more GPUs, `test_every_strategy_on_nccl_matches_serial`
starts one rank per GPU with torchrun and checks every strategy, compiled and graphed, against the
serial model in bf16.
"""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ditmesh import DistributedWorker, ParallelConfig, ParallelMesh, parallelize, tiny_pipeline

DEVICE = os.environ.get("DITMESH_TEST_GPU_DEVICE", "cuda")
BACKEND = "nccl" if DEVICE == "cuda" else "gloo"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL, device placement)"),
]

PROMPT = "a photo of an astronaut riding a horse"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts and ends with empty dynamo caches.

    The order leak (`pytest tests/test_gpu.py tests/test_kernels.py` failed
    test_gpu_fastpath_compiled_matches_eager_tiny_flux, which passes alone): compiled blocks of one
    class share one code object, and dynamo keeps at most `recompile_limit` (8) graphs per code
    object for the whole process. These tests compile FLUX blocks in many configurations (shapes,
    head counts, sequence processors, fused or not), so the next file's compile was a 9th, which
    under `fullgraph=True` raises FailOnRecompileLimitHit instead of running. Resetting scopes each
    test's compiles to the test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def world1(tmp_path):
    """A 1-rank process group (NCCL on CUDA) in this process, and the rank's device."""
    device = torch.device("cuda", 0) if DEVICE == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    extra = dict(device_id=device) if device.type == "cuda" else {}
    dist.init_process_group(BACKEND, store=store, rank=0, world_size=1, **extra)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def generate(pipe, **kwargs):
    """Two steps at 128x128 from a fixed CPU generator, images as a tensor."""
    call = dict(prompt=PROMPT, num_inference_steps=2, height=128, width=128, output_type="pt",
                generator=torch.Generator().manual_seed(0))
    return pipe(**{**call, **kwargs}).images


# ---- (1) a parallelized pipeline on a 1-rank NCCL mesh == the same pipeline unwrapped -------------


def test_mesh_builds_on_cuda_with_nccl(world1):
    mesh = ParallelMesh.build(ParallelConfig())  # device type inferred from the NCCL backend
    assert dist.get_backend() == BACKEND
    assert mesh.device_mesh.device_type == world1.type and mesh.device == world1
    assert all(mesh.size(axis) == 1 for axis in ("data", "cfg", "pipefusion", "ring", "ulysses", "tensor", "sequence"))


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3", "tiny-sdxl"])
def test_parallelized_pipeline_matches_unwrapped_on_device(world1, name):
    expected = generate(tiny_pipeline(name).to(world1))
    pipe = parallelize(tiny_pipeline(name).to(world1), ParallelConfig(), compile=False)  # compiled: below
    got = generate(pipe)
    assert got.device.type == world1.type
    # Same fp32 model, inputs and kernels on the same device: only kernel-selection noise allowed.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # No generator: rank 0 draws the seed and broadcasts it (an object collective on NCCL).
    assert torch.isfinite(generate(pipe, generator=None)).all()


# ---- (2) sequence-parallel attention and ring attention on device tensors, degree 1 -----------------


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("backend", ["auto", "math", "sdpa"])
def test_sequence_parallel_transformer_at_degree_1_matches_plain(world1, family, backend):
    from ditmesh.models.base import adapter_for
    from ditmesh.models.tiny import flux_transformer_inputs, sd3_transformer_inputs, tiny_flux_transformer, tiny_sd3_transformer
    from ditmesh.parallel import sequence

    build, inputs = (tiny_flux_transformer, flux_transformer_inputs) if family == "flux" else (tiny_sd3_transformer, sd3_transformer_inputs)
    kwargs = {k: v.to(world1) if isinstance(v, torch.Tensor) else v for k, v in inputs(height=32, width=48).items()}
    plain, wrapped = build().to(world1), build().to(world1)
    config = ParallelConfig(attention_backend=backend)
    # sequence.apply directly: parallelize skips it at degree 1, but its hooks, processors and the
    # attention entry point are what every sequence-parallel GPU run goes through.
    handle = sequence.apply(wrapped, ParallelMesh.build(config), adapter_for(wrapped), config)
    with torch.no_grad():
        expected, got = plain(**kwargs)[0], wrapped(**kwargs)[0]
    assert handle.ctx.num_tokens is not None and got.device.type == world1.type
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # fp32: math vs SDPA rounding only


@pytest.mark.timeout(600)
def test_compiled_blocks_around_sequence_wrappers_match_eager(world1):
    # What parallelize compiles on CUDA under sequence parallelism, with inductor, at degree 1.
    from ditmesh.models.base import adapter_for
    from ditmesh.models.tiny import flux_transformer_inputs, tiny_flux_transformer
    from ditmesh.parallel import fastpath, sequence

    kwargs = {k: v.to(world1) if isinstance(v, torch.Tensor) else v for k, v in flux_transformer_inputs(height=32, width=48).items()}
    plain, wrapped = tiny_flux_transformer().to(world1), tiny_flux_transformer().to(world1)
    config = ParallelConfig()
    sequence.apply(wrapped, ParallelMesh.build(config), adapter_for(wrapped), config)
    fastpath.fuse_qkv(wrapped)
    fastpath.compile_repeated_blocks(wrapped)
    with torch.no_grad():
        expected, got = plain(**kwargs)[0], wrapped(**kwargs)[0]
    assert all(b._compiled_call_impl is not None for b in fastpath.repeated_blocks(wrapped))
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)  # fp32; TF32 off by default


@pytest.mark.parametrize("fused", [False, True], ids=["attend+merge", "fused-step"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_ring_attention_at_degree_1_matches_sdpa(world1, dtype, tol, fused):
    from ditmesh import kernels
    from ditmesh.parallel.attention import local_attention
    from ditmesh.parallel.ring import ring_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 96, 64, generator=gen).to(world1, dtype) for _ in range(3))
    group = ParallelMesh.build(ParallelConfig()).group("ring")
    # "auto" with LSE: on CUDA the fastest exact kernel (cuDNN / Triton), the ring's GPU path;
    # the fused step (attention + LSE merge in one call) is what backend "auto" uses at ring > 1.
    step = (lambda q_, k_, v_, out, lse: kernels.attention_merge_lse(q_, k_, v_, out, lse, None)) if fused else None
    out, lse = ring_attention(q, k, v, group, lambda *qkv: local_attention(*qkv, "auto", return_lse=True),
                              valid_keys=[80], step=step)
    expected = F.scaled_dot_product_attention(q.float(), k[:, :, :80].float(), v[:, :, :80].float())
    assert out.device.type == world1.type and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


def test_functional_collectives_run_on_the_device(world1):
    import torch.distributed._functional_collectives as fc

    group = ParallelMesh.build(ParallelConfig()).group("sequence")
    x = torch.arange(24.0, device=world1).reshape(2, 3, 4)
    # comm.all_to_all / all_gather skip the exchange at size 1; call the collectives they use.
    got = fc.wait_tensor(fc.all_to_all_single(x, None, None, group))
    all_gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor  # renamed in torch 2.10
    gathered = fc.wait_tensor(all_gather(x, 0, group))
    assert got.device.type == world1.type
    torch.testing.assert_close(got, x)
    torch.testing.assert_close(gathered, x)


# ---- (3) the runner on NCCL: a CUDA result tensor arrives on the caller's CPU ------------------------


class NcclWorker(DistributedWorker):
    """all_reduce on this rank's device; streams one event; returns a device tensor."""

    def __call__(self, streaming: bool = False, x: float = 1.0) -> dict:
        total = torch.full((3,), x * (self.rank + 1), device=self.device)
        dist.all_reduce(total)
        if streaming:
            self.add_streaming_result({"step": 1, "device": str(total.device)}, as_text_event=False)
        return {"sum": total, "device": str(self.device), "backend": dist.get_backend()}


@pytest.mark.timeout(180)
def test_runner_on_nccl_returns_device_results_on_cpu():
    from ditmesh import DistributedRunner

    async def run():
        async with DistributedRunner(NcclWorker, 1, device_type=DEVICE, start_timeout=120) as runner:
            await runner.start()
            invoked = await runner.invoke({"x": 2.0})
            streamed = [item async for item in runner.stream({"x": 3.0}, as_text_events=False)]
        return invoked, streamed

    invoked, streamed = asyncio.run(run())
    expected_device = "cuda:0" if DEVICE == "cuda" else "cpu"
    assert invoked["backend"] == BACKEND and invoked["device"] == expected_device
    assert invoked["sum"].device.type == "cpu"
    torch.testing.assert_close(invoked["sum"], torch.full((3,), 2.0))
    assert streamed[0] == {"step": 1, "device": expected_device}
    torch.testing.assert_close(streamed[-1]["sum"], torch.full((3,), 3.0))


# ---- (4) the single-GPU fast path vs plain diffusers, bf16 -----------------------------------------


@pytest.mark.skipif(DEVICE != "cuda", reason="the fast path is CUDA-only (on CPU parallelize returns the pipeline as is)")
@pytest.mark.timeout(600)
def test_single_gpu_fast_path_matches_diffusers_in_bf16():
    assert not dist.is_initialized(), "the fast path is the no-process-group path"
    device = torch.device("cuda", 0)
    expected = generate(tiny_pipeline("tiny-flux").to(device, torch.bfloat16), output_type="latent").float()
    pipe = parallelize(tiny_pipeline("tiny-flux").to(device, torch.bfloat16), ParallelConfig())
    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
    assert all(block._compiled_call_impl is not None for block in blocks), "regional compile not applied"
    assert pipe.transformer.transformer_blocks[0].attn.fused_projections, "QKV not fused"
    got = generate(pipe, output_type="latent").float()
    # bf16 (eps 2^-8): fused QKV, cuDNN attention and inductor's fusions round differently from
    # eager diffusers; over 2 steps the latents stay within 3% (relative norm).
    rel = (got - expected).norm() / expected.norm()
    assert rel < 3e-2, f"fast path differs from diffusers by {rel:.3g} (relative norm)"


# ---- CUDA graphs: a compiled step captured whole and replayed ------------------------------------


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_graphed_compiled_step_matches_eager_for_every_new_input(world1):
    # What parallelize(..., cuda_graphs=True) runs under sequence parallelism, at degree 1: hooks,
    # processors, compiled blocks, all in one graph. Each replay must see its own inputs.
    from ditmesh.models.base import adapter_for
    from ditmesh.models.tiny import flux_transformer_inputs, tiny_flux_transformer
    from ditmesh.parallel import fastpath, graphs, sequence

    plain, wrapped = tiny_flux_transformer().to(world1), tiny_flux_transformer().to(world1)
    config = ParallelConfig()
    sequence.apply(wrapped, ParallelMesh.build(config), adapter_for(wrapped), config)
    fastpath.compile_repeated_blocks(wrapped)
    graphed = graphs.GraphedDenoiser(wrapped)
    for seed, (height, width) in enumerate([(32, 48), (32, 48), (32, 32), (32, 48)]):
        torch.manual_seed(seed)
        kwargs = {k: v.to(world1) if isinstance(v, torch.Tensor) else v
                  for k, v in flux_transformer_inputs(height=height, width=width).items()}
        kwargs["hidden_states"] = torch.randn_like(kwargs["hidden_states"])
        with torch.no_grad():
            expected, got = plain(**kwargs)[0], graphed(**kwargs)[0]
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert len(graphed._graphs) == 2  # one graph per input signature, replayed for the repeats


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_nccl_collective_runs_inside_a_cuda_graph(world1):
    # Multi-GPU graphs hold the Ulysses all-to-alls: a functional NCCL collective captured with
    # the NCCL watchdog running (thread-local capture), then replayed on new data.
    import torch.distributed._functional_collectives as fc

    from ditmesh.parallel.graphs import GraphedDenoiser

    group = dist.group.WORLD

    class Exchange(torch.nn.Module):
        def forward(self, x):
            y = fc.all_to_all_single(x * 2, None, None, group)
            return fc.wait_tensor(y) + fc.wait_tensor(fc.all_gather_tensor(x, 0, group))

    graphed = GraphedDenoiser(Exchange())
    for value in (1.0, 3.0, 5.0):
        x = torch.full((4, 8), value, device=world1)
        torch.testing.assert_close(graphed(x), torch.full((4, 8), 3 * value, device=world1))
    assert len(graphed._graphs) == 1


@pytest.mark.skipif(DEVICE != "cuda", reason="strided inputs reach cuDNN/flash only on CUDA")
@pytest.mark.parametrize("batch", [1, 2])
def test_packed_ulysses_views_attend_like_the_reference(batch):
    """The packed Ulysses layout hands attention strided views of the receive buffer
    (S, B, 3, h, D) and joins the returned output sequence-major; on CUDA with cuDNN first (as
    parallelize sets it) both must give plain attention's result."""
    from torch.nn.attention import sdpa_kernel

    from ditmesh.kernels import reference
    from ditmesh.parallel.attention import local_attention
    from ditmesh.parallel.fastpath import _SDPA_PRIORITY
    from ditmesh.parallel.ulysses import join_packed

    torch.manual_seed(0)
    received = torch.randn(2 * 1152, batch, 3, 12, 128, device="cuda", dtype=torch.bfloat16)  # 2 ranks' tokens
    q, k, v = (received[:, :, i].permute(1, 2, 0, 3) for i in range(3))
    with sdpa_kernel(_SDPA_PRIORITY, set_priority=True):
        out = local_attention(q, k, v)
    expected, _ = reference.attention_lse(*(x.float() for x in (q, k, v)), None)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=0)
    # The return: rank r's share of this rank's tokens -> (B, H, S/U, D) in sequence-major memory.
    sent = out.permute(2, 0, 1, 3).unflatten(0, (2, -1))  # (U, S/U, B, h, D) as start_packed_return sends it
    joined = join_packed([sent])  # as if rank 0 and 1 had returned these two halves
    assert joined.shape == (batch, 2 * 12, 1152, 128) and joined.permute(0, 2, 1, 3).is_contiguous()
    torch.testing.assert_close(joined[:, :12], out[:, :, :1152], atol=0, rtol=0)
    torch.testing.assert_close(joined[:, 12:], out[:, :, 1152:], atol=0, rtol=0)


# ---- several GPUs: every strategy on NCCL ranks vs the serial model ----------------------------------

NUM_GPUS = torch.cuda.device_count() if DEVICE == "cuda" else 0
NCCL_TOL = 3e-2  # relative norm of the latents, bf16 (the fast-path test's bound)


def _strategies(world: int) -> list[str]:
    """Every strategy: sequence and data at degree `world`; pipefusion, tensor and cfg at 2 (the
    tiny model's limits), data filling the rest of the GPUs."""
    rest = f",data={world // 2}" if world > 2 else ""
    compiled = [f"ulysses={world}", f"ring={world}", f"data={world}", f"pipefusion=2,warmup_steps=2{rest}",
                f"tensor=2{rest}", f"cfg=2{rest}"]
    # compile=False: eager blocks, each step still one CUDA graph (the eager NCCL collectives captured)
    eager = [f"{EAGER}ulysses={world}", f"{EAGER}ring={world}", f"{EAGER}tensor=2{rest}", f"{EAGER}cfg=2{rest}"]
    return compiled + eager


EAGER = "eager:"  # a _strategies entry run with parallelize(..., compile=False)


def _rank_main(out: str) -> None:
    """One torchrun rank: each strategy's latents against the same tiny FLUX run serially here."""
    import json

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    plain = dict(prompt=PROMPT, num_inference_steps=2, height=128, width=128, output_type="latent")
    guided = dict(plain, true_cfg_scale=4.0, negative_prompt="blurry")  # FLUX true CFG: what cfg=2 splits
    serial = tiny_pipeline("tiny-flux").to(device, torch.bfloat16)
    with torch.no_grad():
        expected = {id(call): serial(**call, generator=torch.Generator().manual_seed(0)).images.float()
                    for call in (plain, guided)}
    errors = {}
    for spec in _strategies(world):
        eager = spec.startswith(EAGER)
        config = ParallelConfig.parse(spec.removeprefix(EAGER))
        call = guided if config.cfg_degree > 1 else plain
        pipe = parallelize(tiny_pipeline("tiny-flux").to(device, torch.bfloat16), config, compile=False if eager else None)
        with torch.no_grad():
            for _ in range(2):  # the first compiles and captures, the second replays
                out = pipe(**call, generator=torch.Generator().manual_seed(0))
        if out is not None:
            want = expected[id(call)]
            errors[spec] = ((out.images.float() - want).norm() / want.norm()).item()
        torch._dynamo.reset()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(errors, f)
    dist.destroy_process_group()


@pytest.mark.skipif(NUM_GPUS < 2, reason="needs 2 or more GPUs (one NCCL rank each)")
@pytest.mark.timeout(900)
def test_every_strategy_on_nccl_matches_serial(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "errors.json"
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONPATH=os.pathsep.join(sys.path))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={NUM_GPUS}", __file__, str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors = json.loads(out.read_text())
    assert set(errors) == set(_strategies(NUM_GPUS)), errors
    assert all(error < NCCL_TOL for error in errors.values()), errors


@pytest.mark.skipif(NUM_GPUS < 2, reason="needs 2 GPUs (one NCCL rank each)")
def test_rank_left_in_an_nccl_collective_fails_the_call_within_the_bound():
    # Issue 24 on NCCL: rank 1 returns, rank 0 waits for an all_reduce rank 1 never entered (its
    # result's .item() blocks). The call fails within collective_timeout + 5 s naming rank 0;
    # the ranks restart by themselves and the next request works.
    import time

    from runner_workers import EchoWorker

    from ditmesh import DistributedRunner
    from ditmesh.runner.runner import RanksStuck

    async def session():
        async with DistributedRunner(EchoWorker, 2, device_type="cuda", collective_timeout=10.0) as runner:
            await runner.start()
            started = time.perf_counter()
            with pytest.raises(RanksStuck) as info:
                await runner.invoke({"x": 1.0, "return_early_rank": 1}, timeout=60)
            elapsed = time.perf_counter() - started
            return elapsed, info.value, await runner.invoke({"x": 2.0}, timeout=120)

    elapsed, error, after = asyncio.run(session())
    assert 10.0 <= elapsed < 15.0 and error.ranks == [0], (elapsed, error)
    assert after["sum"] == 2.0 * (1 + 2)


# ---- xDiT (xfuser) hosted by XFuserWorker == xfuser run on its own (world 1) ---------------------
# Each run is its own process (xfuser keeps its groups in module globals): `ditmesh generate
# --engine xfuser` spawns its rank, xfuser alone runs in a fresh interpreter. Needs xfuser 0.7.0.

XFUSER_PIPELINES = {"tiny-flux": "xFuserFluxPipeline", "tiny-sd3": "xFuserStableDiffusion3Pipeline"}
XFUSER_ALONE = """
import os, sys, torch
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[4])
import xfuser
from xfuser import xFuserArgs
folder, pipeline, path = sys.argv[1:4]
engine_config, _ = xFuserArgs(model=folder).create_config()  # initialises torch.distributed itself
pipe = getattr(xfuser, pipeline).from_pretrained(folder, engine_config=engine_config, torch_dtype=torch.float32)
pipe = pipe.to("cuda")
out = pipe(prompt=sys.argv[5], num_inference_steps=3, height=128, width=128, output_type="pil",
           generator=[torch.Generator().manual_seed(0)])
out.images[0].save(path)
"""


def _xfuser_or_skip():
    import importlib.util

    if importlib.util.find_spec("xfuser") is None:
        pytest.skip("needs xfuser 0.7.0 (pip install 'ditmesh[xfuser]')")
    if DEVICE != "cuda":
        pytest.skip("xfuser refuses to import without an accelerator")


def _run(args: list[str], timeout: float = 240.0) -> str:
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", NCCL_NVLS_ENABLE="0")
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args[:3]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["tiny-flux", "tiny-sd3"])
def test_xfuser_engine_writes_the_image_xfuser_alone_writes(tmp_path, family):
    import numpy as np
    from PIL import Image

    from ditmesh.testing import free_port

    _xfuser_or_skip()
    folder = tmp_path / family
    tiny_pipeline(family).save_pretrained(folder)  # a random-weight folder in diffusers layout
    common = ["--model", str(folder), "--parallel", "serial", "--steps", "3", "--height", "128", "--width", "128",
              "--seed", "0", "--prompt", PROMPT]
    for engine in ("xfuser", "ditmesh"):
        _run(["-m", "ditmesh.cli", "generate", "--engine", engine, *common, "-o", str(tmp_path / f"{engine}.png")])
    _run(["-c", XFUSER_ALONE, str(folder), XFUSER_PIPELINES[family], str(tmp_path / "alone.png"), str(free_port()), PROMPT])
    image = {name: np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16) for name in ("xfuser", "ditmesh", "alone")}
    hosted_vs_alone = int(np.abs(image["xfuser"] - image["alone"]).max())
    engines = int(np.abs(image["xfuser"] - image["ditmesh"]).max())
    print(f"\nXFUSER-ROW {family}: max pixel diff, --engine xfuser vs xfuser alone: {hosted_vs_alone}; "
          f"vs --engine ditmesh: {engines}")
    assert hosted_vs_alone == 0


@pytest.mark.timeout(600)
def test_bench_puts_both_engines_side_by_side(tmp_path):
    _xfuser_or_skip()
    folder = tmp_path / "tiny-flux"
    tiny_pipeline("tiny-flux").save_pretrained(folder)
    out = _run(["-m", "ditmesh.cli", "bench", "--engine", "ditmesh,xfuser", "--model", str(folder), "--parallel", "serial",
                "--steps", "3", "--height", "128", "--width", "128", "--repeats", "2", "--warmup", "1", "--eager"])
    print("\n" + out)
    assert "| ditmesh serial |" in out and "| xfuser serial |" in out



@pytest.mark.timeout(600)
def test_serve_with_the_xfuser_engine_streams_steps_then_the_image(tmp_path):
    # `ditmesh serve --engine xfuser` on one GPU: a streamed request gets one `step` event per
    # denoising step, then the `result` with a PNG of the asked size.
    import base64
    import io
    import json
    import re
    import signal
    import subprocess
    import sys

    import httpx
    from PIL import Image

    _xfuser_or_skip()
    folder = tmp_path / "tiny-flux"
    tiny_pipeline("tiny-flux").save_pretrained(folder)
    env = dict(os.environ, HF_HUB_OFFLINE="1", NCCL_NVLS_ENABLE="0", PYTHONUNBUFFERED="1")
    server = subprocess.Popen([sys.executable, "-m", "ditmesh.cli", "serve", "--engine", "xfuser", "--model", str(folder),
                               "--parallel", "serial", "--eager", "--port", "0"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        for line in server.stdout:  # bounded by the test's timeout
            output.append(line)
            if match := re.search(r"ready on (http://127\.0\.0\.1:\d+)", line):
                break
        else:
            pytest.fail("the server exited before it was ready:\n" + "".join(output[-40:]))
        body = dict(prompt=PROMPT, steps=3, height=128, width=128, seed=0, stream=True)
        answer = httpx.post(match.group(1) + "/v1/images/generations", json=body, timeout=300)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    events = re.findall(r"event: (\w+)\ndata: (.*)", answer.text)
    print(f"\nXFUSER-SERVE events: {[name for name, _ in events]}")
    assert [name for name, _ in events] == ["step", "step", "step", "result"], answer.text[-2000:]
    image = Image.open(io.BytesIO(base64.b64decode(json.loads(events[-1][1])["images"][0])))
    assert (image.format, image.size) == ("PNG", (128, 128))

if __name__ == "__main__":  # a torchrun rank of test_every_strategy_on_nccl_matches_serial
    import sys

    _rank_main(sys.argv[1])
