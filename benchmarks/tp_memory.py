"""python benchmarks/tp_memory.py

Per-rank parameter memory of FLUX.1-dev and SD3.5-large under tensor parallelism, T = 1, 2, 4, 8.

The real configs are built on the meta device (no weights, no download, a few seconds on a CPU)
and `ditmesh.parallel.tensor.rank_parameter_bytes` sums what one rank keeps after sharding with
the adapters' tensor plans, in bf16. The "AdaLN replicated" column is the same plan with the
AdaLN modulation layers left whole on every rank (what diffusers' own `_tp_plan` does), to show
why ditmesh shards them. A degree that does not divide the heads is reported as not possible.
Prints a table; writes benchmarks/results/tp_memory.json.
"""

from __future__ import annotations

import dataclasses

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch

from ditmesh import plans
from ditmesh.models import adapter_for
from ditmesh.parallel import tensor
from harness import FLUX_DEV, GIB, SD35_LARGE

DEGREES = (1, 2, 4, 8)
DTYPE = torch.bfloat16


MODELS = {
    "FLUX.1-dev": ("FluxTransformer2DModel", FLUX_DEV),
    "SD3.5-large": ("SD3Transformer2DModel", SD35_LARGE),
}


def build_meta(class_name: str, config: dict) -> torch.nn.Module:
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, class_name)(**config)


def without_adaln(plan: plans.TensorPlan) -> plans.TensorPlan:
    layers = tuple((pattern, style) for pattern, style in plan.layers if style != plans.COLWISE_GATHER)
    return dataclasses.replace(plan, layers=layers)


def measure(name: str, class_name: str, config: dict) -> dict:
    model = build_meta(class_name, config)
    plan = adapter_for(model).tensor_plan
    valid = tensor.valid_degrees(model, plan)
    rows = {}
    for degree in DEGREES:
        if degree not in valid:
            rows[degree] = None
            continue
        rows[degree] = dict(
            gib=tensor.rank_parameter_bytes(model, plan, degree, DTYPE) / GIB,
            gib_adaln_replicated=tensor.rank_parameter_bytes(model, without_adaln(plan), degree, DTYPE) / GIB,
        )
    num_params = sum(p.numel() for p in model.parameters())
    return dict(model=name, num_params=num_params, valid_degrees=valid, dtype=str(DTYPE), per_rank=rows)


def main() -> None:
    results = [measure(name, *spec) for name, spec in MODELS.items()]
    print(f"per-rank parameter memory, {DTYPE} (GiB)")
    print(f"{'model':<13} {'params':>7} {'T':>2} {'per rank':>9} {'vs T=1':>7} {'AdaLN replicated':>17}")
    for result in results:
        full = result["per_rank"][1]["gib"]
        for degree, row in result["per_rank"].items():
            params = f"{result['num_params'] / 1e9:.2f}B" if degree == 1 else ""
            if row is None:
                print(f"{result['model']:<13} {params:>7} {degree:>2} {'n/a':>9}   (heads: valid T = {result['valid_degrees']})")
                continue
            print(
                f"{result['model']:<13} {params:>7} {degree:>2} {row['gib']:>9.2f} {row['gib'] / full:>7.3f} "
                f"{row['gib_adaln_replicated']:>17.2f}"
            )
    harness.write_results(harness.RESULTS / "tp_memory", results)
    print(f"wrote {harness.RESULTS / 'tp_memory.json'}")


if __name__ == "__main__":
    main()
