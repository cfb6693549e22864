"""Where inductor puts the Ulysses exchanges among a compiled block's kernels, with and without
`reorder_comms` (the compiled code's call order, rank 0).

    torchrun --nproc-per-node 2 benchmarks/comm_schedule.py          # CPU/gloo, tiny FLUX, ~1-2 min

Tiny FLUX (one double, one single block), ulysses=2, the blocks compiled by inductor as
`parallelize` compiles them (`fastpath.compile_repeated_blocks`): as is, with `reorder_comms=1`, and
with `ulysses_head_groups=2` (which turns `reorder_comms` on). Prints, per compiled block graph, its
calls in order: `a2a` (an all-to-all started), `wait`, `mm` (a matmul), `attn` (attention). With
the reordering the single block's MLP matmul sits between the output all-to-all and its wait.
"""

from __future__ import annotations

import re

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch
import torch.distributed as dist

from ditmesh import ParallelConfig, parallelize
from ditmesh.models.tiny import flux_transformer_inputs, tiny_flux_transformer
from ditmesh.parallel import fastpath
from ditmesh.parallel.mesh import ParallelMesh

CALLS = [(re.compile(r"all_to_all_single\.default\("), "a2a"), (re.compile(r"wait_tensor\.default\("), "wait"),
         (re.compile(r"extern_kernels\.(mm|addmm|bmm)\("), "mm"), (re.compile(r"_scaled_dot_product\w*\.default\("), "attn")]


def schedule(code: str) -> list[str]:
    """The calls of a generated `call` function, in order."""
    body = code[code.index("def call("):] if "def call(" in code else code
    order = []
    for line in body.splitlines():
        if line.strip().startswith(("#", "assert")):
            continue
        order += [name for pattern, name in CALLS if pattern.search(line)][:1]
    return order


def main() -> None:
    from torch._inductor.utils import run_and_get_code

    harness.init_torchrun("cpu")
    torch.manual_seed(0)
    inputs = flux_transformer_inputs(batch=1, height=16, width=16, text_len=6)
    for text in ("ulysses=2", "ulysses=2,reorder_comms=1", "ulysses=2,ulysses_head_groups=2"):
        config = ParallelConfig.parse(text)
        model = parallelize(tiny_flux_transformer(num_heads=4, head_dim=16, num_layers=1, num_single_layers=1),
                            config, mesh=ParallelMesh.build(config), compile=False)
        fastpath.compile_repeated_blocks(model, reorder_comms=config.reorder_comms or config.ulysses_head_groups > 1)
        with torch.no_grad():
            _, codes = run_and_get_code(model, **inputs)
        if dist.get_rank() == 0:
            for name, code in zip(("double block", "single block"), codes):
                print(f"{text:32s} {name:13s} {' '.join(schedule(code))}", flush=True)
        torch._dynamo.reset()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
