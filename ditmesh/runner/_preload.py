"""Imported once, by the fork server ranks start from (`procs.py`), never by anything else.

Every rank of every runner and test pool imports these: torch, ditmesh's strategies and the
diffusers / transformers classes the built-in and common pipelines are made of (lazily
loaded by those libraries, so an import of the top package alone does not do it). Imports only:
no thread, process group or model is created here. On a machine with GPUs these imports ask
torch about them, which initialises the CUDA driver in the server: only CPU ranks fork from it
(`procs.context`), GPU ranks are spawned.
"""

import atexit
import os

from ditmesh.runner.procs import quiet_import_warnings

quiet_import_warnings()

import torch  # noqa: F401, E402
import torch.distributed  # noqa: F401, E402
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline,  # noqa: F401, E402
                       StableDiffusionXLPipeline, WanPipeline)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel  # noqa: F401, E402

import ditmesh.models.tiny  # noqa: F401, E402
import ditmesh.parallel.parallelize  # noqa: F401, E402
import ditmesh.runner.diffusion  # noqa: F401, E402
import ditmesh.runner.worker  # noqa: F401, E402

# The server ends when its parent does. Leave without the interpreter's teardown: triton's
# bindings (imported by diffusers) print pages of "nanobind: leaked ..." there. The ranks are
# unaffected: multiprocessing ends a forked child with os._exit, past any atexit handler.
atexit.register(os._exit, 0)
