"""LoRAs are never silently ignored: the same diffusers calls (`load_lora_weights`,
`set_adapters`, `fuse_lora`, `unload_lora_weights`) give the same images with ditmesh as on the
plain pipeline (fp32, atol 1e-4), before or after `parallelize`, or raise a `ValueError` that
names the fix.

The LoRAs are made here as a user makes one: peft adapters with random non-zero B on the tiny
FLUX transformer, saved with `FluxPipeline.save_lora_weights`, loaded with
`pipe.load_lora_weights(folder)`. The CUDA fast path's fused Q/K/V and graph wrapper run on CPU
through `fastpath.apply_fastpath(compile=False)` (the graph wrapper passes CPU calls through;
its keying and LRU are tested with a stand-in capture).
"""

from __future__ import annotations

import os

import pytest
import torch

from ditmesh.models.tiny import tiny_pipeline

ATOL = 1e-4
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"]


def _make_loras(folder: str) -> dict[str, str]:
    """Two LoRA folders ("a", "b") of the tiny FLUX transformer, random non-zero B."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from ditmesh.models.tiny import tiny_flux_transformer

    paths = {}
    for seed, name in enumerate(("a", "b")):
        transformer = tiny_flux_transformer()  # the tiny pipeline's architecture
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, param in transformer.named_parameters():
                if "lora_" in pname:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        paths[name] = os.path.join(folder, name)
        FluxPipeline.save_lora_weights(paths[name], transformer_lora_layers=get_peft_model_state_dict(transformer))
    return paths


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _make_loras(str(tmp_path_factory.mktemp("loras")))
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the ranks use: the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(pipe, size: int = 32, steps: int = 2, **extra) -> torch.Tensor:
    with torch.no_grad():  # latents: the denoiser's work, without the VAE's
        out = pipe(prompt="a red cube", num_inference_steps=steps, height=size, width=size, output_type="latent",
                   guidance_scale=3.5, generator=torch.Generator().manual_seed(0), **extra)
    return None if out is None else out.images


def _script(pipe, loras, steps_before: int) -> list[torch.Tensor]:
    """The same LoRA calls in order; images after each. The first `steps_before` calls ran already."""
    calls = [
        lambda: pipe.load_lora_weights(loras["a"], adapter_name="a"),
        lambda: (pipe.load_lora_weights(loras["b"], adapter_name="b"), pipe.set_adapters(["a", "b"], [0.5, 1.5])),
        lambda: pipe.fuse_lora(adapter_names=["a"], lora_scale=1.0),
        lambda: (pipe.unfuse_lora(), pipe.fuse_lora(adapter_names=["a"], lora_scale=1.0), pipe.unload_lora_weights()),
    ]
    images = []
    for call in calls[steps_before:]:
        call()
        images.append(_image(pipe))
    return images


def _plain(loras) -> list[torch.Tensor]:
    return _script(tiny_pipeline("tiny-flux"), loras, 0)


def _assert_all_close(images, reference, what):
    assert len(images) == len(reference)
    for i, (image, ref) in enumerate(zip(images, reference)):
        torch.testing.assert_close(image, ref, atol=ATOL, rtol=0, msg=lambda m: f"{what}, call {i}: {m}")


def test_lora_changes_the_image(loras):
    pipe = tiny_pipeline("tiny-flux")
    base = _image(pipe)
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    assert (_image(pipe) - base).abs().max() > 1e-2  # else the parity tests below prove nothing


def test_fast_path_follows_every_lora_call(loras):
    """Fused Q/K/V + the graph wrapper (the single-GPU fast path, run on CPU): LoRAs loaded after
    and before it, switched, fused, unfused and unloaded give the plain pipeline's images."""
    from ditmesh.parallel import fastpath

    reference = _plain(loras)
    after = fastpath.apply_fastpath(tiny_pipeline("tiny-flux"), compile=False)
    _assert_all_close(_script(after, loras, 0), reference, "loaded after the fast path")
    before = tiny_pipeline("tiny-flux")
    before.load_lora_weights(loras["a"], adapter_name="a")
    before = fastpath.apply_fastpath(before, compile=False)
    _assert_all_close(_script(before, loras, 1), reference[1:], "loaded before the fast path")


def _stored_bytes(model: torch.nn.Module) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def test_fused_qkv_keeps_one_copy_of_the_weights():
    from ditmesh.parallel import fastpath

    transformer = tiny_pipeline("tiny-flux").transformer
    before = _stored_bytes(transformer)
    # The load's peak: when a module fuses, every module fused before it already shares storage
    # (fusing all modules first held both copies of every block at once: +4 GiB on FLUX.1-dev).
    excess = []
    for module in transformer.modules():
        if getattr(module, "_supports_qkv_fusion", False):
            module.fuse_projections = (lambda fuse: lambda: (excess.append(_stored_bytes(transformer) - before), fuse()))(
                module.fuse_projections)
    fastpath.fuse_qkv(transformer)
    assert len(excess) > 1 and max(excess) <= 0, f"bytes above the unfused model when each module fused: {excess}"
    attn = transformer.transformer_blocks[0].attn
    assert attn.fused_projections and attn.to_qkv.weight.shape[0] == 3 * attn.to_q.weight.shape[0]
    assert attn.to_q.weight.untyped_storage().data_ptr() == attn.to_qkv.weight.untyped_storage().data_ptr()
    assert _stored_bytes(transformer) <= before, "the fused weights replace the unfused ones; nothing is stored twice"


class _FakeCapture:
    """Stand-in for a CUDA graph on CPU: 'replay' reruns the denoiser on the static inputs."""

    def __init__(self, run):
        self.run, self.output = run, None

    def replay(self):
        self.output.copy_(self.run())


def test_graph_key_follows_adapters_and_cache_is_bounded(loras, monkeypatch):
    from ditmesh.parallel import graphs

    pipe = tiny_pipeline("tiny-flux")
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    denoiser = graphs.GraphedDenoiser(pipe.transformer, max_graphs=2)
    captures = []

    def capture(key, leaves, spec):
        static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = graphs.pytree.tree_unflatten(static, spec)
        fake = _FakeCapture(lambda: denoiser.inner(*args, **dict(kwargs, return_dict=False))[0])
        fake.output = fake.run()
        captures.append(key)
        entry = denoiser._graphs[key] = graphs._Graph(fake, [x for x in static if isinstance(x, torch.Tensor)], fake.output)
        return entry

    monkeypatch.setattr(graphs, "_graphable", lambda leaves: True)
    monkeypatch.setattr(denoiser, "_capture", capture)
    from ditmesh.models.tiny import flux_transformer_inputs

    inputs = flux_transformer_inputs()
    with torch.no_grad():
        first = denoiser(**inputs)
        again = denoiser(**inputs)
        pipe.set_adapters(["a"], [0.0])  # through the plain pipeline: the model itself changes
        switched = denoiser(**inputs)
    assert len(captures) == 2, "one capture per adapter set, none per call"
    torch.testing.assert_close(first, again)
    assert (first - switched).abs().max() > 1e-3, "a new adapter scale must not replay the old graph"
    with torch.no_grad():
        denoiser(**flux_transformer_inputs(height=48))
    assert len(denoiser._graphs) == 2 and len(captures) == 3, "least recently used graph dropped at max_graphs"
    with pytest.raises(ValueError, match="max_graphs must be >= 1"):
        graphs.GraphedDenoiser(pipe.transformer, max_graphs=0)


# ---- under the strategies, on gloo ranks ----------------------------------------------------------

STRATEGIES = ["ulysses=2", "ring=2", "data=2", "cfg=2"]


def _parallel_after(parallel: str, paths: dict[str, str], steps_before: int) -> list:
    from ditmesh import ParallelConfig, parallelize

    pipe = tiny_pipeline("tiny-flux")
    for call in (lambda: pipe.load_lora_weights(paths["a"], adapter_name="a"),)[:steps_before]:
        call()
    pipe = parallelize(pipe, ParallelConfig.parse(parallel))
    extra = dict(true_cfg_scale=4.0, negative_prompt="blurry") if parallel.startswith("cfg") else {}
    images = []
    calls = _calls(pipe, paths)
    for call in calls[steps_before:]:
        call()
        images.append(_image(pipe, **extra))
    return images


def _calls(pipe, paths):
    return [
        lambda: pipe.load_lora_weights(paths["a"], adapter_name="a"),
        lambda: pipe.set_adapters(["a"], [0.5]),
        lambda: pipe.fuse_lora(adapter_names=["a"], lora_scale=1.0),
        lambda: pipe.unload_lora_weights(),
    ]


def _serial_script(paths: dict[str, str], cfg: bool) -> list:
    pipe = tiny_pipeline("tiny-flux")
    extra = dict(true_cfg_scale=4.0, negative_prompt="blurry") if cfg else {}
    images = []
    for call in _calls(pipe, paths):
        call()
        images.append(_image(pipe, **extra))
    return images


def _strategies_and_refusals(paths: dict[str, str]) -> dict:
    results = {p: _parallel_after(p, paths, 0) for p in STRATEGIES}
    results["pipefusion before"] = _parallel_after("pipefusion=2,warmup_steps=2", paths, 1)
    results["pipefusion after"] = _error(lambda: _parallel_after("pipefusion=2,warmup_steps=2", paths, 0))
    results["tensor before"] = _error(lambda: _parallel_after("tensor=2", paths, 1))
    results["tensor after"] = _error(lambda: _parallel_after("tensor=2", paths, 0))
    results["tensor baked"] = _tensor_baked(paths)
    return results


def _tensor_baked(paths):
    from ditmesh import ParallelConfig, parallelize

    pipe = tiny_pipeline("tiny-flux")
    pipe.load_lora_weights(paths["a"], adapter_name="a")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    return _image(parallelize(pipe, ParallelConfig.parse("tensor=2")))


def _error(run) -> str:
    try:
        run()
    except ValueError as error:
        return str(error)
    return "no error"


def test_strategies_follow_loras_or_name_the_fix(pools, loras):
    ranks = pools(2).run(_strategies_and_refusals, loras, timeout=300)  # a fresh pool first imports for a minute
    serial, serial_cfg = _serial_script(loras, False), _serial_script(loras, True)
    for rank, results in enumerate(ranks):
        for parallel in STRATEGIES:
            if parallel == "data=2" and rank == 1:
                continue  # data rank 1 holds no image of a one-image call
            reference = serial_cfg if parallel.startswith("cfg") else serial
            _assert_all_close(results[parallel], reference, f"{parallel}, rank {rank}")
        _assert_all_close(results["pipefusion before"], serial[1:], f"pipefusion, LoRA loaded before, rank {rank}")
        assert "load LoRAs before parallelize" in results["pipefusion after"]
        for case in ("tensor before", "tensor after"):
            assert "pipe.fuse_lora() then pipe.unload_lora_weights()" in results[case], results[case]
        torch.testing.assert_close(results["tensor baked"], serial[0], atol=ATOL, rtol=0)  # fused at scale 1
