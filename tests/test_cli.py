"""`ditmesh generate` end to end (subprocess) and `DiffusionWorker` behind a `DistributedRunner`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ditmesh.cli import main
from ditmesh.models.tiny import tiny_pipeline
from ditmesh.parallel import lora


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`ditmesh ...` in a fresh process (the installed entry point's code path)."""
    command = [sys.executable, "-c", "from ditmesh.cli import main; raise SystemExit(main())", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """`ditmesh ...` in this process: the entry point's code (`run_cli` keeps one test on the
    entry point itself), whose ranks fork from this test session's one fork server instead of
    a new process importing torch twice (itself and its fork server)."""
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_generate_flux_ulysses2_writes_png(tmp_path):
    out = tmp_path / "x.png"
    proc = run_cli("generate", "--model", "tiny-flux", "--parallel", "ulysses=2", "--height", "64", "--width", "96",
                   "--steps", "2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    image = Image.open(out)
    image.verify()  # a valid PNG
    assert Image.open(out).format == "PNG" and Image.open(out).size == (96, 64)
    assert f"wrote {out}" in proc.stdout
    assert "step 2/2" in proc.stderr  # the progress bar, driven by rank 0's stream events


def test_generate_data2_with_one_image_writes_it(tmp_path, capsys):
    # One image, two data groups: the idle group runs no step. The per-step cancel check once
    # reduced over every rank, so rank 0 waited in it for ever (issue 24; tests/test_soak.py
    # runs the same through the runner for the other models).
    out = tmp_path / "x.png"
    proc = run_main(capsys, "generate", "--model", "tiny-flux", "--parallel", "data=2", "--prompt", "a red cube", "--steps", "3",
                    "--height", "64", "--width", "64", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (64, 64) and "step 3/3" in proc.stderr


def test_generate_bad_model_names_the_fix(tmp_path, capsys):
    assert main(["generate", "--model", "tiny-nope", "-o", str(tmp_path / "x.png")]) == 2
    assert "tiny-flux, tiny-sd3, tiny-sdxl" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    assert f"no model_index.json in {tmp_path}" in capsys.readouterr().err
    assert main(["generate", "--parallel", "ulysses=two"]) == 2
    assert "ulysses must be an integer" in capsys.readouterr().err


def test_bench_compares_configs_against_the_first_and_reports_refusals(tmp_path, capsys):
    report_path = tmp_path / "bench.json"
    proc = run_main(capsys, "bench", "--model", "tiny-flux-random", "--parallel", "serial", "ulysses=2", "tensor=3", "--steps",
                    "2", "--repeats", "2", "--warmup", "0", "--height", "64", "--width", "64", "--json", str(report_path))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(report_path.read_text())["rows"]
    assert [r["config"] for r in rows] == ["serial", "ulysses=2", "tensor=3"]
    serial, ulysses, refused = rows
    assert serial["speedup"] == 1.0 and serial["max_pixel_diff"] == 0 and serial["processes"] == 1
    # ulysses=2 is timed against serial and draws the same image (fp32: at most one level of rounding)
    assert ulysses["baseline"] == "serial" and ulysses["processes"] == 2 and ulysses["max_pixel_diff"] <= 1
    assert ulysses["speedup"] == pytest.approx(serial["median_s"] / ulysses["median_s"])
    assert ulysses["best_s"] <= ulysses["median_s"] and ulysses["images"] == 1
    assert "valid tensor degrees: 1, 2, 4" in refused["refused"]  # the fix, and the other configs still ran
    assert "| ulysses=2 | 2 |" in proc.stdout and "refused: tensor_degree 3" in proc.stdout


def test_bench_bad_arguments_name_the_fix(capsys):
    assert main(["bench", "--repeats", "0"]) == 2
    assert "repeats must be >= 1" in capsys.readouterr().err
    assert main(["bench", "--parallel", "serial", "ring=x"]) == 2
    assert "ring must be an integer" in capsys.readouterr().err


# ---- DiffusionWorker through DistributedRunner ----------------------------------------------------


async def _worker_session():
    from ditmesh.runner.diffusion import DiffusionWorker
    from ditmesh.runner.protocol import RemoteError
    from ditmesh.runner.runner import DistributedRunner

    payload = dict(prompt=["a cat", "a dog"], negative_prompt="blurry", steps=2, height=64, width=64, seed=5,
                   guidance=5.0, preview=True)
    async with DistributedRunner(DiffusionWorker, world_size=4, device_type="cpu", request_timeout=120,
                                 setup_kwargs=dict(model="tiny-sd3", parallel="data=2,cfg=2")) as runner:
        items = [item async for item in runner.stream(payload, as_text_events=False)]
        text = [item async for item in runner.stream(dict(payload, preview=False), as_text_events=True)]
        try:
            await runner.invoke(dict(payload, height=100))
            error = None
        except RemoteError as exc:
            error = exc
        return items, text, error


def test_diffusion_worker_streams_and_matches_serial():
    items, text, error = asyncio.run(_worker_session())
    *events, result = items
    assert [(e["step"], e["of"]) for e in events] == [(1, 2), (2, 2)]
    assert all(isinstance(e["preview"], Image.Image) and max(e["preview"].size) == 64 for e in events)
    assert len(result["images"]) == 2 and result["images"][0].size == (64, 64)
    # The same images as the serial pipeline with one generator per image (seed + i), in order.
    serial = tiny_pipeline("tiny-sd3")(
        prompt=["a cat", "a dog"], negative_prompt="blurry", num_inference_steps=2, height=64, width=64,
        guidance_scale=5.0, generator=[torch.Generator().manual_seed(5 + i) for i in range(2)],
    ).images
    for got, want in zip(result["images"], serial):
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1  # uint8 rounding
    assert text[0] == b'data: {"step":1,"of":2}\n\n'
    assert text[-1].startswith(b"data: ") and b"data:image/jpeg;base64," in text[-1]  # fal's event shape
    assert error is not None and error.exc_type.endswith("ValueError")
    assert "height 100 is not a multiple of 16 (sd3); use 96 or 112" in error.message


def test_diffusion_worker_stops_after_the_step_at_which_cancel_is_requested(monkeypatch):
    from ditmesh import RequestCancelled
    from ditmesh.runner.diffusion import DiffusionWorker

    worker = DiffusionWorker()
    worker._device = torch.device("cpu")
    worker.setup(model="tiny-flux", parallel="serial")
    calls = []
    worker.pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    checks = iter([False, True])  # the caller gives up during the second step
    monkeypatch.setattr(worker, "cancel_requested", lambda group=None: next(checks))
    with pytest.raises(RequestCancelled, match="stopped after step 2 of 5"):
        worker(prompt="a cat", steps=5, height=32, width=32)
    assert len(calls) == 2  # no denoising step after the cancel
    monkeypatch.setattr(worker, "cancel_requested", lambda group=None: False)
    assert worker(prompt="a cat", steps=2, height=32, width=32)["images"][0].size == (32, 32)


def test_generate_compiles_by_default_and_takes_loras(tmp_path):
    from ditmesh.cli import _parser, _speed_setup

    (tmp_path / "style").mkdir()
    args = _parser().parse_args(["generate", "--lora", f"{tmp_path / 'style'}:0.5", "--lora", str(tmp_path / "style")])
    setup = _speed_setup(args)
    assert setup["compile"] is None, "generate compiles on GPUs unless --eager"
    assert setup["loras"] == [[str(tmp_path / "style"), 0.5], [str(tmp_path / "style"), 1.0]]
    assert _speed_setup(_parser().parse_args(["generate", "--eager"]))["compile"] is False
    assert _speed_setup(_parser().parse_args(["serve", "--max-graphs", "3"]))["max_graphs"] == 3
    with pytest.raises(SystemExit):  # argparse: "no LoRA at ...; pass a folder saved with save_lora_weights ..."
        _parser().parse_args(["bench", "--lora", str(tmp_path / "missing")])


def test_diffusion_worker_loads_loras_like_the_plain_pipeline(tmp_path):
    from test_lora import _make_loras

    from ditmesh.runner.diffusion import DiffusionWorker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the cores are shared
    try:
        _worker_lora_parity(tmp_path, _make_loras(str(tmp_path))["a"], DiffusionWorker)
    finally:
        torch.set_num_threads(threads)


def test_diffusion_worker_switches_named_loras_of_its_folder_per_request(tmp_path):
    # `ditmesh serve --lora-dir`: LoRAs loaded once by name, a request turns some on; each request
    # must equal the plain pipeline with exactly those LoRAs (never the previous request's).
    from test_lora import _make_loras

    from ditmesh.runner.diffusion import DiffusionWorker

    paths = _make_loras(str(tmp_path))
    plain = tiny_pipeline("tiny-flux")
    for name, path in paths.items():
        plain.load_lora_weights(path, adapter_name=name)
    call = dict(prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="np")

    def expected(adapters):
        lora.activate(plain, adapters)
        return plain(**call, generator=torch.Generator().manual_seed(0)).images[0]

    worker = DiffusionWorker()
    worker._device = torch.device("cpu")
    worker.setup(model="tiny-flux-random", parallel="serial", lora_dir=str(tmp_path))
    assert worker.info["lora_names"] == ["a", "b"]
    for adapters in ({}, {"a": 0.5}, {"a": 1.0, "b": 0.7}, {}):
        image = worker(prompt="a cat", steps=2, height=32, width=32, loras=adapters)["images"][0]
        np.testing.assert_allclose(np.asarray(image, dtype=np.float32) / 255, expected(adapters), atol=1 / 255 + 1e-6)
    with pytest.raises(ValueError, match="unknown LoRA c; this server has a, b"):
        worker(prompt="a cat", steps=1, height=32, width=32, loras={"c": 1.0})


def _worker_lora_parity(tmp_path, path, DiffusionWorker):
    plain = tiny_pipeline("tiny-flux")
    plain.load_lora_weights(path, adapter_name="a")
    plain.set_adapters(["a"], [0.5])
    expected = plain(prompt="a cat", num_inference_steps=2, height=32, width=32,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    worker = DiffusionWorker()
    worker._device = torch.device("cpu")
    worker.setup(model="tiny-flux-random", parallel="serial", loras=[[path, 0.5]])
    image = np.asarray(worker(prompt="a cat", steps=2, height=32, width=32)["images"][0], dtype=np.float32) / 255
    assert worker.info["loras"] == ["a"]
    np.testing.assert_allclose(image, expected, atol=1 / 255 + 1e-6)  # PIL rounding of the same pixels
