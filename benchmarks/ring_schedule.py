"""PYTHONPATH=$PWD python3 benchmarks/ring_schedule.py --out benchmarks/results      # one GPU
   PYTHONPATH=$PWD python3 benchmarks/ring_schedule.py --nccl 2 --out benchmarks/results  # 2+ GPUs

Per-rank attention of one FLUX.1-dev attention layer (24 heads x 128, bf16; 512 text tokens plus
4096 image tokens at 1024², 16384 at 2048²) under ring=R against Ulysses=R.

One GPU (default): every variant runs the launches one rank of R runs, on that rank's shapes,
with the ring's K/V blocks already in place (the compute alone; transfers need R GPUs):
  ulysses R                     SDPA over the whole sequence for 24/R heads (between its all-to-alls)
  ring R, text repeated         the previous schedule: all text queries on every rank + this
                                rank's image queries; a text launch, then one fused step per block
  ring R, step by step          text queries split over the ring ranks; one launch per block
  ring R, runs [..]             the grouped schedule (`ring.attend_runs`): one launch per run of
                                blocks gathered in place; [1, R-1], [R], and `plan_groups`' choice
                                for the H200 costs in `ring.RING_COSTS`
Times: eager (host launches included) and CUDA-graph replay (GPU time), medians; each variant's
output is checked against the fp32 reference. Also checks whether cuDNN reads the gather buffers'
strided views correctly (`select.CUDNN_READS_HEADS_ADJACENT`).

--nccl W (W GPUs): one process per GPU times a ring hop (K+V block, P2P), ring_attention with
each schedule and the Ulysses exchange + attention, end to end at ring=W / ulysses=W.
Writes ring_schedule_<device>.{json,md} to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import harness  # first: puts the repository on sys.path (and NVLink multicast off for NCCL)
import torch
import torch.nn.functional as F

from ditmesh.kernels import reference, select
from ditmesh.parallel import ring
from harness import bench_ms, rel_err  # (the same timing as gpu_step's kernel table)

HEADS, DIM, TEXT = 24, 128, 512


def rand(*shape, gen):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)


def attend(q, k, v):
    return select.attention_lse(q, k, v)


def step(q, k, v, out, lse):
    return select.attention_merge_lse(q, k, v, out, lse)


# ---- one GPU: per-rank compute ------------------------------------------------------------------


def cudnn_strided_check(gen) -> dict:
    """cuDNN on a (S, B, H, D) buffer's BHSD view without copying, vs the fp32 reference."""
    buf_k, buf_v = rand(1600, 1, HEADS, DIM, gen=gen), rand(1600, 1, HEADS, DIM, gen=gen)
    q = rand(1, HEADS, 576, DIM, gen=gen)
    k, v = buf_k[100:1500].permute(1, 2, 0, 3), buf_v[100:1500].permute(1, 2, 0, 3)
    ref_out, ref_lse = reference.attention_lse(q.float(), k.float(), v.float())
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=DIM**-0.5)[:2]
    lse = lse.reshape(ref_lse.shape)
    err, lse_err = rel_err(out, ref_out), (lse - ref_lse).abs().max().item()
    ok = err < 1e-2 and lse_err < 1e-2
    copied = lambda: select.BACKENDS["cudnn"](q, k.contiguous(), v.contiguous())  # noqa: E731
    strided = lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=DIM**-0.5)  # noqa: E731
    row = dict(rel_err=err, lse_err=lse_err, correct=ok,
               copy_graph_us=1e3 * bench_ms(copied, graph=True), strided_graph_us=1e3 * bench_ms(strided, graph=True))
    print(f"cuDNN on strided gather-buffer views: rel err {err:.1e}, lse err {lse_err:.1e} -> {'correct' if ok else 'WRONG'}; "
          f"copy {row['copy_graph_us']:.1f} us vs strided {row['strided_graph_us']:.1f} us", flush=True)
    return row


def per_rank_rows(image: int, world: int, gen) -> list[dict]:
    block = image // world
    total = TEXT + image
    flop = 4 * HEADS * total * total * DIM / world  # per rank: 1/R of the layer's attention
    rows = []

    def add(name, fn, ref, note=""):
        out = fn()
        err = rel_err(out[0] if isinstance(out, tuple) else out, ref)
        ms, graph_ms = bench_ms(fn), bench_ms(fn, graph=True)
        rows.append(dict(image_tokens=image, world=world, variant=name, eager_us=1e3 * ms, graph_us=1e3 * graph_ms,
                         graph_tflops=flop / graph_ms / 1e9, rel_err=err, note=note))
        print(f"{image:>6} R={world} {name:<34} eager {1e3 * ms:8.1f} us  graph {1e3 * graph_ms:8.1f} us  "
              f"{flop / graph_ms / 1e9:6.0f} TFLOP/s  err {err:.1e} {note}", flush=True)

    # Ulysses: 24/R heads, whole sequence.
    heads_u = HEADS // world
    qu, ku, vu = (rand(1, heads_u, total, DIM, gen=gen) for _ in range(3))
    ref_u = F.scaled_dot_product_attention(qu.float(), ku.float(), vu.float())
    add(f"ulysses {world} (SDPA, {heads_u} heads)", lambda: F.scaled_dot_product_attention(qu, ku, vu), ref_u)

    # Ring: this rank = ring rank 0; keys = text + all R blocks (arrival order is irrelevant here).
    kt, vt = rand(1, HEADS, TEXT, DIM, gen=gen), rand(1, HEADS, TEXT, DIM, gen=gen)
    kb, vb = rand(1, HEADS, image, DIM, gen=gen), rand(1, HEADS, image, DIM, gen=gen)
    qt, qi = rand(1, HEADS, TEXT, DIM, gen=gen), rand(1, HEADS, block, DIM, gen=gen)
    all_k, all_v = torch.cat([kt, kb], 2).float(), torch.cat([vt, vb], 2).float()

    q_rep = torch.cat([qt, qi], 2)  # text repeated on every rank (the previous schedule)
    ref_rep = reference.attention_lse(q_rep.float(), all_k, all_v)[0]

    def text_repeated():
        acc = attend(q_rep, kt, vt)
        for j in range(world):
            acc = step(q_rep, kb[:, :, j * block : (j + 1) * block], vb[:, :, j * block : (j + 1) * block], *acc)
        return acc

    add(f"ring {world}, text repeated, step by step", text_repeated, ref_rep, f"{TEXT + block} queries")

    # Text split over the ranks like the image: each ring block is a text share + an image block.
    share = -(-TEXT // world)
    joint = share + block
    q = torch.cat([qt[:, :, :share], qi], 2)
    kc, vc = rand(1, HEADS, world * joint, DIM, gen=gen), rand(1, HEADS, world * joint, DIM, gen=gen)
    ref = reference.attention_lse(q.float(), kc.float(), vc.float())[0]
    k_buf, v_buf = ring.gather_buffers(kc[:, :, :joint], vc[:, :, :joint], world)
    for j in range(1, world):  # fill the arrival slots as the hops would
        k_buf[j * joint : (j + 1) * joint].copy_(kc[:, :, j * joint : (j + 1) * joint].permute(2, 0, 1, 3))
        v_buf[j * joint : (j + 1) * joint].copy_(vc[:, :, j * joint : (j + 1) * joint].permute(2, 0, 1, 3))
    valid = [joint] * world
    planned = ring.ring_group_sizes(q, kc[:, :, :joint], world)
    schedules = {"step by step": [1] * world, f"runs {[1, world - 1]}": [1, world - 1], f"runs {[world]}": [world]}
    schedules.setdefault(f"runs {planned}", planned)
    for name, sizes in schedules.items():
        note = f"{q.shape[2]} queries" + (", plan_groups' choice (H200 costs)" if sizes == planned else "")
        add(f"ring {world}, {name}", lambda sizes=sizes: ring.attend_runs(q, k_buf, v_buf, joint, valid, sizes, attend, step), ref, note)
    return rows


def one_gpu(args) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {"cudnn_strided": cudnn_strided_check(gen), "rows": []}
    if result["cudnn_strided"]["correct"]:
        select.CUDNN_READS_HEADS_ADJACENT = True
    for image in args.image_tokens:
        for world in args.worlds:
            result["rows"] += per_rank_rows(image, world, gen)
    return result


# ---- R GPUs: end to end -------------------------------------------------------------------------


def nccl_worker(rank: int, world: int, image: int, port: int, queue) -> None:
    import torch.distributed as dist

    from ditmesh.parallel.comm import all_to_all, ring_pass_start, ring_shift_wait

    harness.init_rank(rank, world, port, "cuda")
    group = dist.group.WORLD
    gen = torch.Generator(device="cuda").manual_seed(rank)
    block, share = image // world, -(-TEXT // world)
    # Text split over the ranks like the image: each rank's block is a text share + an image block.
    q, k, v = (rand(1, HEADS, share + block, DIM, gen=gen) for _ in range(3))
    send = [rand(share + block, 1, HEADS, DIM, gen=gen) for _ in range(2)]
    recv = [torch.empty_like(t) for t in send]
    rows = {}

    def timed(name, fn):
        dist.barrier()
        rows[name] = 1e3 * bench_ms(fn, samples=9, inner=20)

    timed("hop (K+V block, P2P)", lambda: ring_shift_wait(ring_pass_start(send, recv, group)))
    planned = ring.ring_group_sizes(q, k, world)
    for name, sizes in {"ring, step by step": [1] * world, f"ring, runs {planned}": planned, f"ring, runs [{world}]": [world]}.items():
        timed(name, lambda sizes=sizes: ring.ring_attention(q, k, v, group, attend, step=step, group_sizes=sizes))
    xu = [rand(1, HEADS, (TEXT + image) // world, DIM, gen=gen) for _ in range(3)]

    def ulysses():
        qu, ku, vu = (all_to_all(x, scatter_dim=1, gather_dim=2, group=group) for x in xu)
        return all_to_all(F.scaled_dot_product_attention(qu, ku, vu), scatter_dim=2, gather_dim=1, group=group)

    timed("ulysses (3 all-to-all + SDPA + 1 all-to-all)", ulysses)
    if rank == 0:
        queue.put(dict(rows=rows, hop_bytes=2 * send[0].numel() * 2, planned=planned))
    dist.destroy_process_group()


def multi_gpu(args) -> dict:
    import torch.multiprocessing as mp

    world = args.nccl
    result = {"world": world, "rows": []}
    ctx = mp.get_context("spawn")
    for image in args.image_tokens:
        queue = ctx.Queue()
        procs = [ctx.Process(target=nccl_worker, args=(r, world, image, 29731 + image % 1000, queue)) for r in range(world)]
        for p in procs:
            p.start()
        got = queue.get(timeout=600)
        for p in procs:
            p.join()
        hop_us = got["rows"]["hop (K+V block, P2P)"]
        print(f"{image} image tokens, W={world}: hop {hop_us:.1f} us = {got['hop_bytes'] / hop_us / 1e3:.0f} GB/s", flush=True)
        for name, us in got["rows"].items():
            print(f"  {name:<46} {us:8.1f} us", flush=True)
        result["rows"].append(dict(image_tokens=image, **got))
    return result


def markdown(result: dict, device: str) -> str:
    lines = [f"# ring_schedule on {device} (torch {torch.__version__})", "", f"Command: `{result['command']}`", ""]
    if "cudnn_strided" in result:
        c = result["cudnn_strided"]
        lines += [f"cuDNN reading the ring gather buffers' strided K/V views: rel err {c['rel_err']:.1e}, lse err "
                  f"{c['lse_err']:.1e} ({'correct' if c['correct'] else 'wrong'}); 576 x 1400 keys: copy first "
                  f"{c['copy_graph_us']:.1f} us, strided {c['strided_graph_us']:.1f} us (graph).", ""]
        lines += ["Per-rank attention of one FLUX.1-dev layer (24 heads x 128, bf16, 512 text tokens), measured on one GPU at the shapes one rank of R runs:", "",
                  "| image tokens | R | variant | eager us | graph us | graph TFLOP/s | vs ulysses (graph) | vs ulysses (eager) | rel err | note |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        base = {}
        for r in result["rows"]:
            key = (r["image_tokens"], r["world"])
            base.setdefault(key, r)
            u = base[key]
            lines.append(f"| {r['image_tokens']} | {r['world']} | {r['variant']} | {r['eager_us']:.1f} | {r['graph_us']:.1f} | "
                         f"{r['graph_tflops']:.0f} | {r['graph_us'] / u['graph_us']:.2f}x | {r['eager_us'] / u['eager_us']:.2f}x | "
                         f"{r['rel_err']:.1e} | {r['note']} |")
    else:
        lines += [f"End to end on {result['world']} GPUs (NCCL), per call, rank 0:", "", "| image tokens | what | us |", "|---:|---|---:|"]
        for r in result["rows"]:
            for name, us in r["rows"].items():
                lines.append(f"| {r['image_tokens']} | {name} | {us:.1f} |")
            lines.append(f"| {r['image_tokens']} | hop bandwidth | {r['hop_bytes'] / r['rows']['hop (K+V block, P2P)'] / 1e3:.0f} GB/s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=harness.RESULTS)
    parser.add_argument("--image-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384])
    parser.add_argument("--worlds", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8])
    parser.add_argument("--nccl", type=int, default=0, help="world size of an end-to-end NCCL run (0: one-GPU compute only)")
    args = parser.parse_args()
    result = multi_gpu(args) if args.nccl else one_gpu(args)
    result["command"] = harness.command()
    stem = Path(args.out) / f"ring_schedule_{harness.machine_tag('cuda', args.nccl or None)}"
    harness.write_results(stem, result, markdown(result, harness.device_name()))
    print(f"wrote {stem}.json/.md", flush=True)


if __name__ == "__main__":
    main()
