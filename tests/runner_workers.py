"""Worker classes for tests/test_runner.py and tests/test_fal_compat.py (module level: the
spawned worker processes import them)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from ditmesh import DistributedWorker, RequestCancelled


class EchoWorker(DistributedWorker):
    """Sums ``x * scale * (rank + 1)`` over ranks with an all_reduce; payload keys switch on
    streaming extras and faults."""

    def setup(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.calls = 0
        self.history: list[tuple[str, float, float]] = []  # (kind, start, end) in CLOCK_MONOTONIC s

    def __call__(self, streaming: bool = False, x: float = 0.0, steps: int = 0, echo: object = None,
                 raw_event: bytes | None = None, return_lock: bool = False,
                 fail_rank: int | None = None, fail_before_collective_rank: int | None = None,
                 die_rank: int | None = None, sleep: float = 0.0, return_early_rank: int | None = None,
                 slow_rank: int | None = None, slow: float = 0.0, stream_sleep: float = 0.0,
                 keepalive: bool = False, history: bool = False, fal_api: bool = False,
                 image_format: str = "jpeg") -> object:
        if fal_api:
            return self._fal_api()
        if keepalive:  # the runner's keep-alive payload: note when it came
            self.history.append(("keepalive", time.monotonic(), time.monotonic()))
            return None
        if history:
            return {"history": list(self.history), "cwd": os.getcwd(), "pg_timeout_s": _pg_timeout_s()}
        started = time.monotonic()
        self.calls += 1
        if die_rank == self.rank:
            os._exit(3)
        if fail_before_collective_rank == self.rank:
            raise ValueError(f"rank {self.rank} refuses to join the all_reduce")
        if return_early_rank == self.rank:
            return None  # returns normally; the other ranks wait in the all_reduce below for ever
        if sleep:
            time.sleep(sleep)
        total = torch.tensor([x * self.scale * (self.rank + 1)], device=self.device)
        dist.all_reduce(total)  # the other ranks wait here for a rank that raised above
        if slow_rank == self.rank:
            time.sleep(slow)  # healthy, just slow: e.g. rank 0 encoding images after the last collective
        if stream_sleep:
            self.add_streaming_result({"first": True}, as_text_event=True)
            time.sleep(stream_sleep)
        self.history.append(("call", started, time.monotonic()))
        for step in range(steps):
            self.add_streaming_result({"step": step, "rank": self.rank, "t_ns": time.perf_counter_ns()})
        if echo is not None:
            self.add_streaming_result(echo, as_text_event=True)
        if raw_event is not None:
            self.add_streaming_result(raw_event, as_text_event=False)
        if fail_rank == self.rank:
            raise ValueError(f"boom on rank {self.rank}")
        if return_lock:
            if streaming:
                self.add_streaming_result(threading.Lock())  # raises TypeError in this rank
            return threading.Lock()
        return {"sum": total.item(), "world_size": self.world_size, "streaming": streaming,
                "calls": self.calls, "echo": echo, "pid": os.getpid(), "threads": torch.get_num_threads()}


    def _fal_api(self) -> dict:
        """The fal 1.83 worker calls ditmesh lacked: `add_streaming_result(..., image_format=)`,
        `add_streaming_error`, `rank_print(..., debug=)` (its output is returned)."""
        import contextlib
        import io

        from PIL import Image

        image = Image.new("RGB", (16, 8), (200, 30, 60))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            self.rank_print("fal api worker running", debug=True)
        self.add_streaming_result({"image": image}, as_text_event=True)  # jpeg quality 60
        self.add_streaming_result({"image": image}, image_format="png", as_text_event=True)
        self.add_streaming_error(ValueError("a bad frame, carrying on"))
        self.add_streaming_result({"plain": 1})  # fal's default: as_text_event=False
        return {"image": image, "printed": printed.getvalue()}


def _pg_timeout_s() -> float:
    """The default process group's timeout, in seconds, as this rank's torch.distributed holds it."""
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    return backend.options._timeout.total_seconds()


class FailingSetupWorker(DistributedWorker):
    """setup() raises on rank 1 (rank 0 waits in a barrier that rank 1 never reaches)."""

    def setup(self, **kwargs: object) -> None:
        if self.rank == 1:
            raise KeyError("missing weights")
        dist.barrier()

    def __call__(self, streaming: bool = False) -> None:
        return None


class CudaWorker(DistributedWorker):
    """All-reduces a bf16 CUDA tensor over NCCL; returns and streams it still on the GPU."""

    def __call__(self, streaming: bool = False) -> dict:
        tensor = torch.full((4,), float(self.rank + 1), device=self.device, dtype=torch.bfloat16)
        dist.all_reduce(tensor)
        self.add_streaming_result({"tensor": tensor})
        return {"backend": dist.get_backend(), "device": str(self.device),
                "current_device": torch.cuda.current_device(), "tensor": tensor}


class StepsWorker(DistributedWorker):
    """Runs up to `steps` collective steps, checking `cancel_requested` after each, as a denoising
    loop does; ``report=True`` answers how many steps every rank ran in the previous request and
    how many step requests it has started."""

    def setup(self) -> None:
        self.ran = 0
        self.started = 0

    def __call__(self, streaming: bool = False, steps: int = 0, report: bool = False) -> object:
        if report:
            counts = [None] * self.world_size
            dist.all_gather_object(counts, self.ran)
            return {"ran": counts, "started": self.started}
        self.started += 1
        self.ran = 0
        for step in range(steps):
            total = torch.ones(1)
            dist.all_reduce(total)  # a rank that stopped a step early would leave the others here
            self.ran = step + 1
            self.add_streaming_result({"step": step})
            if self.cancel_requested():
                raise RequestCancelled(f"stopped after step {step + 1}")
        return {"ran": self.ran}


# ---------------------------------------------------------------- fal-demos workers, ported
# The two fal-demos distributed workers (fal_demos/distributed/inference/parallel_sdxl/app.py and
# fal_demos/distributed/training/flux_lora/trainer/training_worker.py) as their authors wrote them
# against `fal.distributed`, condensed, on ditmesh's tiny models and a CPU: the same calls, payload
# keys and streaming pattern; only the import is ditmesh's. Where the originals need a GPU or a
# download, the line says what replaced it.


def tensors_to_image_grid(tensors: list[torch.Tensor], blur_radius: int = 0) -> Any:
    """Images (C, H, W in 0..1) side by side as one PIL image (the demo uses torchvision's make_grid)."""
    from PIL import Image, ImageFilter

    grid = torch.cat([tensor.clamp(0, 1) for tensor in tensors], dim=2)  # (C, H, W * n)
    pil_image = Image.fromarray((grid.permute(1, 2, 0).float().cpu().numpy() * 255).astype("uint8"))
    if blur_radius > 0:
        pil_image = pil_image.filter(ImageFilter.GaussianBlur(radius=blur_radius))
    return pil_image


class FalParallelSDXLWorker(DistributedWorker):
    """fal-demos' parallel SDXL worker: every rank draws its own image, previews are gathered to
    rank 0 every `PREVIEW_EVERY` steps and streamed, the final images come back as one grid."""

    PREVIEW_EVERY = 2  # the demo: 5 (of 20 steps)

    def setup(self, **kwargs: Any) -> None:
        from diffusers import AutoencoderTiny

        from ditmesh.models.tiny import tiny_pipeline

        # the demo: StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
        # and AutoencoderTiny.from_pretrained("madebyollin/taesdxl"), float16 on cuda
        self.pipeline = tiny_pipeline("tiny-sdxl").to(self.device, dtype=torch.float32)
        torch.manual_seed(self.rank)
        blocks = dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                      num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4)
        self.tiny_vae = AutoencoderTiny(**blocks).to(self.device)
        if self.rank != 0:
            self.pipeline.set_progress_bar_config(disable=True)

    def pipeline_callback(self, pipeline: Any, step: int, timestep: int, tensors: dict[str, torch.Tensor]) -> dict:
        if step > 0 and step % self.PREVIEW_EVERY != 0:
            return tensors
        latents = tensors["latents"]
        image = self.tiny_vae.decode(latents / self.tiny_vae.config.scaling_factor, return_dict=False)[0]
        image = self.pipeline.image_processor.postprocess(image, output_type="pt")[0]
        if self.rank == 0:
            gather_list = [torch.zeros_like(image, device=self.device) for _ in range(self.world_size)]
        else:
            gather_list = None
        dist.gather(image, gather_list, dst=0)
        if gather_list:
            remaining = timestep / 1000
            image = tensors_to_image_grid(gather_list, blur_radius=int(remaining * 10))
            self.add_streaming_result({"image": image}, as_text_event=True)
        dist.barrier()
        return tensors

    def __call__(self, streaming: bool = False, width: int = 1024, height: int = 1024,
                 prompt: str = "A fantasy landscape", negative_prompt: str = "A blurry image",
                 num_inference_steps: int = 20, **kwargs: Any) -> dict[str, Any]:
        with torch.no_grad():  # the demo runs under fal's worker thread; diffusers' pipeline call is no_grad too
            image = self.pipeline(
                prompt=prompt, height=height, width=width, negative_prompt=negative_prompt,
                num_inference_steps=num_inference_steps, output_type="pt",
                callback_on_step_end=self.pipeline_callback if streaming else None,
            ).images[0]
        if self.rank == 0:
            gather_list = [torch.zeros_like(image, device=self.device) for _ in range(self.world_size)]
        else:
            gather_list = None
        dist.gather(image, gather_list, dst=0)  # blocks until all workers are done
        torch.cuda.empty_cache()
        if not gather_list:
            return {}
        return {"image": tensors_to_image_grid(gather_list)}


class FalFluxLoRATrainingWorker(DistributedWorker):
    """fal-demos' Flux LoRA trainer: DDP over the ranks, rank 0 loads the preprocessed data and
    broadcasts it, streams progress every `STREAM_EVERY` steps, then saves the LoRA alone while
    the other ranks have already returned ``{}``."""

    STREAM_EVERY = 2  # the demo: 10

    def setup(self, model_path: str = "/data/flux_weights", use_torch_compile: bool = True, **kwargs: Any) -> None:
        from diffusers import FluxTransformer2DModel
        from peft import LoraConfig

        self.rank_print(f"Loading Flux model on {self.device}")
        self.transformer = FluxTransformer2DModel.from_pretrained(model_path, subfolder="transformer",
                                                                  torch_dtype=torch.float32).to(self.device)
        target_modules = []  # the demo lists FLUX.1's 19 double and 38 single blocks; the tiny has fewer
        for block_num in range(self.transformer.config.num_layers):
            target_modules += [f"transformer_blocks.{block_num}.attn.{name}" for name in
                               ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")]
        for block_num in range(self.transformer.config.num_single_layers):
            target_modules += [f"single_transformer_blocks.{block_num}.{name}" for name in
                               ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")]
        self.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=target_modules, lora_dropout=0.0,
                                                bias="none", init_lora_weights="gaussian"))
        self.transformer.requires_grad_(False)
        for name, param in self.transformer.named_parameters():
            if "lora" in name:
                param.requires_grad = True
        if use_torch_compile:
            self.transformer = torch.compile(self.transformer, mode="reduce-overhead", dynamic=False)
        # the demo: device_ids=[self.rank], output_device=self.rank (a GPU module); a CPU module takes None
        self.transformer = torch.nn.parallel.DistributedDataParallel(self.transformer, find_unused_parameters=False)
        self.rank_print("Model loaded and wrapped with DDP")

    def compute_flux_loss(self, latents: torch.Tensor, text_embeddings: torch.Tensor, pooled: torch.Tensor,
                          text_ids: torch.Tensor, img_ids: torch.Tensor, timesteps: torch.Tensor,
                          guidance: torch.Tensor) -> torch.Tensor:
        from diffusers import FluxPipeline

        batch, channels, height, width = latents.shape
        noise = torch.randn_like(latents)
        weight = timesteps.view(-1, 1, 1, 1)
        noisy = (1.0 - weight) * latents + weight * noise
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        pred = self.transformer(hidden_states=packed, timestep=timesteps, guidance=guidance,
                                pooled_projections=pooled, encoder_hidden_states=text_embeddings,
                                txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, height=height * 8, width=width * 8, vae_scale_factor=8)
        return torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())

    def __call__(self, streaming: bool = False, training_data_path: str | None = None, learning_rate: float = 4e-4,
                 max_train_steps: int = 100, batch_size: int = 4, guidance_scale: float = 1.0, seed: int = 42,
                 **kwargs: Any) -> dict[str, Any]:
        import shutil
        import tempfile
        from pathlib import Path

        from diffusers import FluxPipeline
        from peft import get_peft_model_state_dict

        self.rank_print(f"Starting training: lr={learning_rate}, steps={max_train_steps}")
        torch.manual_seed(seed + self.rank)
        if self.rank == 0:
            data = torch.load(training_data_path, map_location="cpu", weights_only=False)
            latents, text_embeddings, pooled = data["latents"], data["text_embeddings"], data["pooled_embeddings"]
            text_ids = data["text_ids"]
        else:
            latents, text_embeddings, pooled = torch.empty(0), torch.empty(0), torch.empty(0)
            text_ids = torch.empty(0, dtype=torch.long)
        objects = [latents, text_embeddings, pooled, text_ids]
        dist.broadcast_object_list(objects, src=0)
        latents, text_embeddings, pooled, text_ids = (t.to(self.device) for t in objects)
        # (H/2 * W/2, 3) ids of the packed 2x2 latent patches
        img_ids = FluxPipeline._prepare_latent_image_ids(1, latents.shape[2] // 2, latents.shape[3] // 2,
                                                         self.device, torch.float32)
        optimizer = torch.optim.AdamW([p for p in self.transformer.parameters() if p.requires_grad], lr=learning_rate)
        self.transformer.train()
        total_loss = 0.0
        for step in range(max_train_steps):
            indices = torch.randint(0, latents.shape[0], (batch_size,))
            timesteps = torch.sigmoid(torch.randn(batch_size))
            guidance = torch.full((batch_size,), guidance_scale)
            loss = self.compute_flux_loss(latents[indices], text_embeddings[indices], pooled[indices], text_ids,
                                          img_ids, timesteps, guidance)
            loss.backward()  # DDP all-reduces the LoRA gradients here
            optimizer.step()
            optimizer.zero_grad()
            total_loss += loss.item()
            if streaming and self.rank == 0 and step % self.STREAM_EVERY == 0:
                self.add_streaming_result({
                    "step": step, "loss": loss.item(), "avg_loss": total_loss / (step + 1),
                    "learning_rate": optimizer.param_groups[0]["lr"], "progress": f"{step}/{max_train_steps}",
                }, as_text_event=True)
        avg_loss = total_loss / max_train_steps
        if self.rank == 0:  # the others return {} at once; rank 0 saves alone
            lora_state_dict = get_peft_model_state_dict(self.transformer.module)
            with tempfile.TemporaryDirectory() as temp_dir:
                FluxPipeline.save_lora_weights(save_directory=temp_dir, transformer_lora_layers=lora_state_dict,
                                               text_encoder_lora_layers=None)
                with tempfile.NamedTemporaryFile(mode="wb", suffix=".safetensors", delete=False) as f:
                    checkpoint_path = f.name
                shutil.copy(Path(temp_dir) / "pytorch_lora_weights.safetensors", checkpoint_path)
            return {"checkpoint_path": checkpoint_path, "final_loss": avg_loss, "num_steps": max_train_steps}
        return {}
