"""Two-rank SAMPa against SAM: step time, communication, and a two-GPU model.

Measured (2 processes, one thread each, gloo on the CPU; NCCL on GPUs):

    torchrun --nproc_per_node 2 benchmarks/distributed_sampa.py --out benchmarks/results/distributed_cpu

- SAM, one process: two forward/backward passes per step, one after the other;
- SAMPa, one process: the same two passes (the sequential form);
- SAMPa, two ranks: each rank runs one of the two passes at the same time,
  then one all-reduce of ``2N + 2P + 1 + W`` elements exchanges the gradients.

Modelled, when only one GPU is at hand (no torchrun needed):

    python benchmarks/distributed_sampa.py --model-only

measures one forward/backward ``T_fb`` and the optimizer's share ``T_opt`` on
one device and predicts ``T_SAM = 2 T_fb + T_opt`` against
``T_SAMPa(2 GPUs) = T_fb + T_allreduce + T_opt``, with a ring all-reduce of
the exchange buffer over a link of the given bandwidths. The paper's ~2x
claim is the limit ``T_allreduce, T_opt << T_fb``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from sam_fast import SAM, SAMPa


def make_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    width = 64
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
    ).to(device)


def data(step: int, device: torch.device, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    return x.to(device), torch.randint(0, 10, (batch,), generator=gen).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, warmup: int, device: torch.device, barrier: bool = False) -> float:
    """Median seconds per call of ``fn(step)`` after ``warmup`` calls."""
    times = []
    for step in range(warmup + steps):
        if barrier:
            dist.barrier()
        _sync(device)
        start = time.perf_counter()
        fn(step)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_functions(device: torch.device, batch: int, parallel: bool = False):
    loss_fn = nn.CrossEntropyLoss()
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)

    def closure_for(model, step):
        x, y = data(step, device, batch)

        def closure():
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        return closure

    sam_model = make_model(device)
    sam = SAM(sam_model.parameters(), torch.optim.SGD, rho=0.05, **sgd)

    def sam_step(step):
        closure = closure_for(sam_model, step)
        closure()
        sam.step(closure)
        sam.zero_grad()

    sampa_model = make_model(device)
    sampa = SAMPa(sampa_model.parameters(), torch.optim.SGD, rho=0.1, lam=0.2,
                  parallel=parallel, **sgd)

    def sampa_step(step):
        sampa.step(closure_for(sampa_model, step))

    fb_model = make_model(device)

    def forward_backward(step):
        fb_model.zero_grad()
        closure_for(fb_model, step)()

    opt_model = make_model(device)
    closure_for(opt_model, 0)()
    opt_only = SAM(opt_model.parameters(), torch.optim.SGD, rho=0.05, **sgd)

    def optimizer_share(step):
        opt_only.first_step()
        opt_only.second_step()

    n_params = sum(p.numel() for p in sam_model.parameters())
    n_tensors = sum(1 for _ in sam_model.parameters())
    return sam_step, sampa_step, forward_backward, optimizer_share, n_params, n_tensors


def ring_allreduce_seconds(nbytes: float, ranks: int, gbytes_per_s: float) -> float:
    """Bandwidth term of a ring all-reduce: each rank sends 2 (W - 1) / W of the buffer."""
    return 2 * (ranks - 1) / ranks * nbytes / (gbytes_per_s * 1e9)


def measure_distributed(args) -> dict:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
              if torch.cuda.is_available() else torch.device("cpu"))
    torch.set_num_threads(1)
    sam_step, sampa_seq, fb, opt_share, n, p = step_functions(device, args.batch)
    _, sampa_par, _, _, _, _ = step_functions(device, args.batch, parallel=True)
    exchange_elems = 2 * n + 2 * p + 1 + world
    buf = torch.zeros(exchange_elems, device=device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "ranks": world, "threads_per_rank": 1, "batch": args.batch,
        "parameters": n, "tensors": p,
        "exchange_bytes_per_step": exchange_elems * 4,
        "sam_1proc_s": timed(sam_step, args.steps, args.warmup, device, barrier=True),
        "sampa_1proc_s": timed(sampa_seq, args.steps, args.warmup, device, barrier=True),
        "sampa_2rank_s": timed(sampa_par, args.steps, args.warmup + 1, device, barrier=True),
        "forward_backward_s": timed(fb, args.steps, args.warmup, device, barrier=True),
        "optimizer_share_s": timed(opt_share, args.steps, args.warmup, device, barrier=True),
        "allreduce_s": timed(lambda _: dist.all_reduce(buf), args.steps, args.warmup, device,
                             barrier=True),
    }
    result["speedup_2rank_sampa_over_sam"] = result["sam_1proc_s"] / result["sampa_2rank_s"]
    result["model_sam_s"] = 2 * result["forward_backward_s"] + result["optimizer_share_s"]
    result["model_sampa_2rank_s"] = (result["forward_backward_s"] + result["allreduce_s"]
                                     + result["optimizer_share_s"])
    if rank == 0:
        report(result, args.out, "distributed")
    dist.destroy_process_group()
    return result


def model_only(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, _, fb, opt_share, n, p = step_functions(device, args.batch)
    t_fb = timed(fb, args.steps, args.warmup, device)
    t_opt = timed(opt_share, args.steps, args.warmup, device)
    nbytes = (2 * n + 2 * p + 3) * 4
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": args.batch, "parameters": n, "tensors": p,
        "forward_backward_s": t_fb, "optimizer_share_s": t_opt,
        "exchange_bytes_per_step": nbytes, "model_sam_s": 2 * t_fb + t_opt,
        "predicted": {},
    }
    for gbps in args.link_gbps:
        t_par = t_fb + ring_allreduce_seconds(nbytes, 2, gbps) + t_opt
        result["predicted"][f"{gbps:g} GB/s"] = {
            "sampa_2gpu_s": t_par, "speedup_over_sam": (2 * t_fb + t_opt) / t_par}
    report(result, args.out, "model")
    return result


def report(result: dict, out: str | None, kind: str) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"sampa_{kind}.json").write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-only", action="store_true",
                        help="one device: measure fwd/bwd and predict the two-GPU step")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--link-gbps", type=float, nargs="+", default=[25.0, 450.0],
                        help="link bandwidths for the model (PCIe 4 x16 ~25, NVLink H100 ~450)")
    parser.add_argument("--out", default=None, help="folder for the JSON result")
    args = parser.parse_args()
    if args.model_only:
        model_only(args)
    else:
        measure_distributed(args)


if __name__ == "__main__":
    main()
