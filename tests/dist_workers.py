"""Worker processes for tests/test_distributed.py (gloo on the CPU).

Run as ``python dist_workers.py SCENARIO OUTDIR`` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set. Each scenario writes ``OUTDIR/rank{r}.pt``:
a dict with ``ok`` (and ``error`` when the scenario raised) plus whatever the
parent test compares.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from models import batches, loss_of, make_closure, small_cnn, small_convnet  # noqa: E402
from sam_fast import SAM, SAMPa  # noqa: E402
from sam_fast.distributed import local_ascent  # noqa: E402

STEPS = 4
F64 = torch.float64
# name -> (base optimizer, its options, SAM options), for the FSDP2 runs
FSDP_CASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4), {}),
    "adamw-asam": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2),
                   dict(adaptive=True, eta=0.01, rho=0.5)),
}


def _shard(batch, rank, world):
    x, y = batch
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def _sam_steps(model, opt, data, rank, world, local=False):
    for batch in data:
        mine = _shard(batch, rank, world)
        if local:
            with local_ascent(model):
                loss_of(model, mine).backward()
        else:
            loss_of(model, mine).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, mine).backward()
        opt.second_step(zero_grad=True)


def ddp(rank, world):
    """Global and local ascent with DDP; returns the final weights of each."""
    out = {}
    data = batches(STEPS, batch_size=8, dtype=F64)
    for mode in ("global", "local"):
        model = torch.nn.parallel.DistributedDataParallel(small_convnet(0, F64))
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9,
                  weight_decay=5e-4)
        _sam_steps(model, opt, data, rank, world, local=(mode == "local"))
        out[mode] = [p.detach().clone() for p in model.module.parameters()]
    return out


def fsdp2(rank, world):
    """SAM and ASAM over FSDP2-sharded parameters; returns the full weights."""
    from torch.distributed.fsdp import fully_shard

    out = {}
    data = batches(STEPS, batch_size=8, dtype=F64)
    for name, (base, kw, sam_kw) in FSDP_CASES.items():
        model = small_convnet(0, F64)
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(model)
        opt = SAM(model.parameters(), base, **sam_kw, **kw)
        _sam_steps(model, opt, data, rank, world)
        out[name] = [p.full_tensor().detach().clone() for p in model.parameters()]
    return out


def _sampa_sequential(data, base, kw, lam, dtype):
    model = small_cnn(0, dtype)
    opt = SAMPa(model.parameters(), base, rho=0.1, lam=lam, **kw)
    trajectory, losses = [], []
    for batch in data:
        losses.append(float(opt.step(make_closure(model, batch))))
        trajectory.append([p.detach().clone() for p in model.parameters()])
    return trajectory, losses


def sampa_parallel(rank, world):
    """Two-sided SAMPa against the sequential one, call by call, bit for bit."""
    results = {}
    cases = [
        ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)),
        ("adamw", torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
    ]
    for dtype in (F64, torch.float32):
        data = batches(STEPS + 1, batch_size=8, dtype=dtype)
        for name, base, kw in cases:
            for lam in (0.0, 0.2):
                want, want_losses = _sampa_sequential(data, base, kw, lam, dtype)
                model = small_cnn(0, dtype)
                opt = SAMPa(model.parameters(), base, rho=0.1, lam=lam, parallel=True, **kw)
                mismatches = []
                for k, batch in enumerate(data):
                    loss = opt.step(make_closure(model, batch))
                    same = all(torch.equal(p, q) for p, q in zip(model.parameters(), want[k]))
                    if not same or float(loss) != want_losses[k]:
                        mismatches.append(k)
                results[f"{name}-lam{lam}-{dtype}"] = mismatches
    return {"mismatches": results}


def sampa_failure(rank, world):
    """Rank 1's closure raises on the third call: every rank must raise, none hang."""
    data = batches(4, batch_size=8)
    model = small_cnn(0)
    opt = SAMPa(model.parameters(), lr=0.05, momentum=0.9, parallel=True)
    for k, batch in enumerate(data):
        closure = make_closure(model, batch)
        if rank == 1 and k == 2:
            def closure():
                raise ValueError("rank 1's data loader died")
        x_before = [p.detach().clone() for p in model.parameters()]
        try:
            opt.step(closure)
        except Exception as exc:  # the scenario's point: record what each rank saw
            restored = all(torch.equal(p, q) for p, q in zip(model.parameters(), x_before))
            return {"raised": f"{type(exc).__name__}: {exc}", "at": k, "restored": restored}
    return {"raised": None}


def ddp_failure(rank, world):
    """Rank 1 dies between SAM's two passes; rank 0 must fail, not wait forever."""
    model = torch.nn.parallel.DistributedDataParallel(small_convnet(0))
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05)
    batch = _shard(batches(1, batch_size=8)[0], rank, world)
    loss_of(model, batch).backward()
    opt.first_step(zero_grad=True)
    if rank == 1:
        os._exit(3)  # a crash: no cleanup, no goodbye to the peers
    try:
        loss_of(model, batch).backward()
    except Exception as exc:
        return {"raised": f"{type(exc).__name__}: {exc}"}
    return {"raised": None}


# name -> (optimizer factory over params, whether its step takes the first pass itself);
# the SAM family under DDP (global ascent) and FSDP2, each against one process.
def _family_cases():
    from sam_fast import BSAM, ESAM, GSAM, WSAM, FriendlySAM, LookSAM, MomentumSAM

    sgd = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    return {
        "gsam": (lambda ps: GSAM(ps, torch.optim.SGD, rho=0.1, alpha=0.4, **sgd), False),
        "wsam": (lambda ps: WSAM(ps, torch.optim.SGD, rho=0.1, gamma=0.9, **sgd), False),
        "looksam": (lambda ps: LookSAM(ps, torch.optim.SGD, rho=0.1, k=2, alpha=0.7, **sgd),
                    False),
        "friendly": (lambda ps: FriendlySAM(ps, torch.optim.AdamW, rho=0.1, sigma=1.0,
                                            lmbda=0.9, lr=1e-3, weight_decay=1e-2), False),
        "interval": (lambda ps: SAM(ps, torch.optim.SGD, rho=0.1, interval=2, **sgd), False),
        "msam": (lambda ps: MomentumSAM(ps, torch.optim.SGD, rho=0.3, **sgd), True),
        # The same seed on every rank: the same random subset (ESAM), the same noise (BSAM);
        # under FSDP2 each rank draws for the whole model and keeps its shards' part.
        "esam": (lambda ps: ESAM(ps, torch.optim.SGD, rho=0.1, beta=0.5, seed=0, **sgd),
                 "esam"),
        "esam-tensor": (lambda ps: ESAM(ps, torch.optim.SGD, rho=0.1, beta=0.5, swp="tensor",
                                        seed=0, **sgd), "esam"),
        "bsam": (lambda ps: BSAM(ps, num_data=64, lr=0.05, rho=0.01, weight_decay=1e-3,
                                 seed=0), True),
        "bsam-official": (lambda ps: BSAM(ps, num_data=64, lr=0.05, rho=0.01,
                                          weight_decay=1e-3, variant="official", seed=0), True),
    }


# The members that draw random numbers: under FSDP2 they are also resumed from a checkpoint
# taken after RESUME_AT steps (generator states included), which must end bit for bit where
# the uninterrupted run ends.
RANDOM = ("esam", "esam-tensor", "bsam", "bsam-official")
RESUME_AT = 2
FAMILY_STEPS = 5  # LookSAM and SAM every 2 steps: three SAM steps and two plain ones


class _Scale(torch.nn.Module):
    """Logits times a learnt scalar: a parameter of shape (1,), so that under FSDP2 on two
    ranks one rank's shard of it is empty (and the linear layer's 5 rows split 3 / 2)."""

    def __init__(self, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1, dtype=dtype))

    def forward(self, x):
        return x * self.weight


def family_model(dtype=F64):
    """small_convnet and a (1,)-shaped scale: the family's model in these tests."""
    return torch.nn.Sequential(*small_convnet(0, dtype), _Scale(dtype))


def family_steps(model, opt, data, one_pass, rank=0, world=1):
    """Each family member the way users drive it: backward, then step(closure); Momentum-SAM
    and BSAM take their passes in step(closure), ESAM its per-example losses."""
    for batch in data:
        mine = _shard(batch, rank, world)

        def closure(mine=mine):
            loss = loss_of(model, mine)
            loss.backward()
            return loss

        if one_pass == "esam":  # its closure returns the loss; ESAM backpropagates it
            opt.step(lambda idx=None, mine=mine: loss_of(model, mine))
            continue
        if not one_pass:
            loss_of(model, mine).backward()
        opt.step(closure)
        opt.zero_grad(set_to_none=True)


def family_ddp(rank, world):
    """The family with DDP's all-reduce in both passes; the final weights of each."""
    out = {}
    data = batches(FAMILY_STEPS, batch_size=8, dtype=F64)
    for name, (make, one_pass) in _family_cases().items():
        model = torch.nn.parallel.DistributedDataParallel(family_model())
        opt = make(model.parameters())
        family_steps(model, opt, data, one_pass, rank, world)
        out[name] = [p.detach().clone() for p in model.module.parameters()]
    return out


def _fsdp2_model():
    from torch.distributed.fsdp import fully_shard

    model = family_model()
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    return model


def family_fsdp2(rank, world):
    """The family over FSDP2-sharded parameters (the inner products, norms and the running
    average's norm completed over the shards; ESAM's and BSAM's draws cut per shard); the
    full weights of each, and of ESAM's and BSAM's runs resumed from a checkpoint."""
    import copy

    from sam_fast import ESAM

    out = {}
    data = batches(FAMILY_STEPS, batch_size=8, dtype=F64)
    for name, (make, one_pass) in _family_cases().items():
        model = _fsdp2_model()
        opt = make(model.parameters())
        if name not in RANDOM:
            family_steps(model, opt, data, one_pass, rank, world)
            out[name] = [p.full_tensor().detach().clone() for p in model.parameters()]
            continue
        family_steps(model, opt, data[:RESUME_AT], one_pass, rank, world)
        saved = copy.deepcopy(opt.state_dict())
        weights = [p.to_local().detach().clone() for p in model.parameters()]
        family_steps(model, opt, data[RESUME_AT:], one_pass, rank, world)
        out[name] = [p.full_tensor().detach().clone() for p in model.parameters()]
        # A fresh optimizer (its generators seeded anew) loads the checkpoint.
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights):
                p.to_local().copy_(w)
        opt = make(model.parameters())
        opt.load_state_dict(saved)
        family_steps(model, opt, data[RESUME_AT:], one_pass, rank, world)
        out[name + "/resumed"] = [p.full_tensor().detach().clone() for p in model.parameters()]
    # SDS would select per rank: refused at construction, with why.
    try:
        ESAM(_fsdp2_model().parameters(), torch.optim.SGD, beta=0.5, gamma=0.5, seed=0, lr=0.1)
        out["esam-sds"] = "built"
    except NotImplementedError as exc:
        out["esam-sds"] = str(exc)
    # A shard that is not a block of rows cannot be cut out of the whole tensor's draw by
    # rows: refused at construction (nothing drawn, nothing moved).
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from sam_fast import BSAM

    mesh = init_device_mesh("cpu", (world,))
    for name, make in (("esam-shard1", lambda ps: ESAM(ps, torch.optim.SGD, beta=0.5, lr=0.1)),
                       ("bsam-shard1", lambda ps: BSAM(ps, num_data=8))):
        w = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4, dtype=F64), mesh, [Shard(1)]))
        try:
            make([w])
            out[name] = "built"
        except NotImplementedError as exc:
            out[name] = str(exc)
    return out


def family_local_ascent(rank, world):
    """What local_ascent() allows and refuses under real DDP: Friendly-SAM climbs locally;
    GSAM's update would read the local first gradient (refused before anything moves); a
    second pass under local_ascent() is refused with the weights back at w."""
    from sam_fast import GSAM, FriendlySAM

    out = {}
    batch = _shard(batches(1, batch_size=8, dtype=F64)[0], rank, world)
    model = torch.nn.parallel.DistributedDataParallel(small_convnet(0, F64))
    opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    for _ in range(2):
        with local_ascent(model):
            loss_of(model, batch).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, batch).backward()
        opt.second_step(zero_grad=True)
    out["friendly"] = [p.detach().clone() for p in model.module.parameters()]

    model = torch.nn.parallel.DistributedDataParallel(small_convnet(0, F64))
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05)
    with local_ascent(model):
        loss_of(model, batch).backward()
    before = [p.detach().clone() for p in model.module.parameters()]
    try:
        opt.first_step(zero_grad=True)
        out["gsam"] = None
    except RuntimeError as exc:
        out["gsam"] = str(exc)
    out["gsam_untouched"] = all(torch.equal(p, q)
                                for p, q in zip(model.module.parameters(), before))
    return out


SCENARIOS = {f.__name__: f for f in (ddp, fsdp2, sampa_parallel, sampa_failure, ddp_failure,
                                     family_ddp, family_fsdp2, family_local_ascent)}


def main() -> None:
    scenario, outdir = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)  # same reduction order in every process and in the parent
    timeout = datetime.timedelta(seconds=float(os.environ.get("DIST_TIMEOUT", "60")))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        result = {"ok": True, **SCENARIOS[scenario](rank, world)}
    except Exception:
        result = {"ok": False, "error": traceback.format_exc()}
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


if __name__ == "__main__":
    main()
