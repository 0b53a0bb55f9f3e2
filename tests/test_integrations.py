"""SAM inside training frameworks: PyTorch Lightning and the Hugging Face Trainer.

Each framework run is compared with a hand-written SAM loop over the same batches in
the same order. Both run the same float32 ops in the same order on the same inputs
(the frameworks add no autocast or scaling here), so the comparisons are bit for bit
except where stated.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import sam_fast

pl = pytest.importorskip("lightning.pytorch")  # installed by the test extra (pyproject)

SCHEDULER_WARNING = "before `optimizer.step()`"


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(n_batches: int, batch_size: int = 8, seed: int = 1
          ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 4, generator=gen),
             torch.randint(0, 3, (batch_size,), generator=gen)) for _ in range(n_batches)]


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _loader(data):
    # A list of ready batches: no shuffling, no collation differences between runs.
    return torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)


def _make_sam(params) -> sam_fast.SAM:
    return sam_fast.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


def _make_scheduler(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def _hand_loop(data, steps: int, scheduler: bool, clip_both: float | None = None
               ) -> list[torch.Tensor]:
    """SAM by hand: backward, first_step, backward, second_step; the scheduler per step;
    ``clip_both``: a global-norm clip after each backward."""
    model = _net()
    opt = _make_sam(model.parameters())
    sched = _make_scheduler(opt) if scheduler else None

    def clip():
        if clip_both is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_both)

    for i in range(steps):
        batch = data[i % len(data)]
        _loss(model, batch).backward()
        clip()
        opt.first_step(zero_grad=True)
        _loss(model, batch).backward()
        clip()
        opt.second_step(zero_grad=True)
        if sched is not None:
            sched.step()
    return [p.detach().clone() for p in model.parameters()]


class AutoModule(pl.LightningModule):
    """The SGD version of this module, with the optimizer line changed to SAM."""

    def __init__(self, scheduler: bool = False) -> None:
        super().__init__()
        self.net = _net()
        self.use_scheduler = scheduler

    def training_step(self, batch, batch_idx):
        return _loss(self.net, batch)

    def configure_optimizers(self):
        opt = _make_sam(self.parameters())
        if not self.use_scheduler:
            return opt
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": _make_scheduler(opt), "interval": "step"}}


class ManualModule(AutoModule):
    """Manual optimization through the LightningOptimizer wrapper ``self.optimizers()``.

    ``finish="second_step"`` is the reference's loop; ``finish="step"`` ends with
    ``opt.step()`` (after first_step that is second_step), which Lightning counts as a
    training step (``trainer.global_step``, hence ``max_steps``); second_step is not.
    """

    def __init__(self, scheduler: bool = False, finish: str = "second_step") -> None:
        super().__init__(scheduler)
        self.automatic_optimization = False
        self.finish = finish

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        self.manual_backward(_loss(self.net, batch))
        opt.first_step(zero_grad=True)
        self.manual_backward(_loss(self.net, batch))
        if self.finish == "second_step":
            opt.second_step(zero_grad=True)
        else:
            opt.step()
            opt.zero_grad()
        if self.use_scheduler:
            self.lr_schedulers().step()


def _trainer(**kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    options.update(kwargs)
    return pl.Trainer(**options)


def _fit(module, data, ckpt_path=None, **kwargs) -> pl.Trainer:
    trainer = _trainer(**kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train_dataloaders=_loader(data), ckpt_path=ckpt_path)
    trainer.caught_warnings = [str(w.message) for w in caught]  # type: ignore[attr-defined]
    return trainer


def _assert_same(got: nn.Module, want: list[torch.Tensor]) -> None:
    params = [p.detach() for p in got.parameters()]
    assert len(params) == len(want)
    for a, b in zip(params, want):
        assert torch.equal(a, b), (a - b).abs().max()


# -- Lightning ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", [False, True], ids=["no_sched", "steplr"])
def test_lightning_automatic_equals_hand_loop(scheduler):
    """Automatic optimization calls ``opt.step(closure)`` with a closure that runs
    training_step, zero_grad and backward: SAM runs it at w and at w + e. Five steps
    over four batches (the second epoch reuses them) equal the hand loop bit for bit."""
    data = _data(4)
    module = AutoModule(scheduler)
    trainer = _fit(module, data, max_steps=5)
    assert trainer.global_step == 5
    _assert_same(module.net, _hand_loop(data, 5, scheduler))
    norm = trainer.optimizers[0].last_grad_norm
    assert norm is not None and torch.isfinite(norm) and norm.item() > 0
    assert not [w for w in trainer.caught_warnings if SCHEDULER_WARNING in w]


def test_lightning_gradient_clip_val_clips_both_passes():
    """``gradient_clip_val`` clips inside Lightning's wrapped closure, after each of its
    calls: with SAM both passes are clipped. (A global-norm clip of the first pass does
    not move SAM's e, but the comparison still checks that both clips happen: without
    the second one the step differs.)"""
    data = _data(4)
    module = AutoModule()
    _fit(module, data, max_steps=4, gradient_clip_val=0.05)
    want = _hand_loop(data, 4, scheduler=False, clip_both=0.05)
    _assert_same(module.net, want)
    unclipped = _hand_loop(data, 4, scheduler=False)
    assert not all(torch.equal(a, b) for a, b in zip(want, unclipped))


@pytest.mark.parametrize("scheduler", [False, True], ids=["no_sched", "steplr"])
def test_lightning_manual_equals_hand_loop(scheduler):
    data = _data(3)
    module = ManualModule(scheduler, finish="second_step")
    # second_step is not Lightning's optimizer.step(): global_step stays 0, so the run
    # is bounded by epochs.
    trainer = _fit(module, data, max_epochs=2)
    assert trainer.global_step == 0
    _assert_same(module.net, _hand_loop(data, 6, scheduler))
    assert module.optimizers().last_grad_norm is not None
    assert not [w for w in trainer.caught_warnings if SCHEDULER_WARNING in w]


def test_lightning_manual_step_counts_steps():
    data = _data(3)
    module = ManualModule(scheduler=True, finish="step")
    trainer = _fit(module, data, max_steps=5)
    assert trainer.global_step == 5
    _assert_same(module.net, _hand_loop(data, 5, scheduler=True))
    assert not [w for w in trainer.caught_warnings if SCHEDULER_WARNING in w]


@pytest.mark.parametrize("module_cls", [AutoModule, ManualModule], ids=["automatic", "manual"])
def test_lightning_resume_equals_uninterrupted(tmp_path, module_cls):
    """One epoch (N = 3 steps) with ModelCheckpoint saving at its end (model, SAM with
    its momentum buffers, StepLR), then a fresh Trainer and module resumed with
    ``fit(ckpt_path=...)`` for the second epoch (M = 3): bit for bit the 2-epoch run.

    Where the checkpoint is taken matters, for plain SGD as much as for SAM (checked by
    hand with Lightning 2.6): resumed mid-epoch, a plain (not stateful) DataLoader
    restarts at the epoch's first batch while batch_idx counts on; and
    ``trainer.save_checkpoint`` after a ``max_steps`` stop on the epoch's last batch
    records the epoch as unfinished, so the resumed run takes one more batch in it.
    A checkpoint saved by ModelCheckpoint at the epoch's end has neither problem.
    """
    data = _data(3)
    kwargs = {} if module_cls is AutoModule else {"finish": "step"}

    whole = module_cls(scheduler=True, **kwargs)
    _fit(whole, data, max_epochs=2)

    first = module_cls(scheduler=True, **kwargs)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    _fit(first, data, max_epochs=1, enable_checkpointing=True, callbacks=[saver])
    path = saver.best_model_path or saver.last_model_path
    assert path

    resumed = module_cls(scheduler=True, **kwargs)
    trainer = _fit(resumed, data, ckpt_path=path, max_epochs=2)
    assert trainer.global_step == 6
    _assert_same(resumed.net, [p.detach().clone() for p in whole.net.parameters()])
    # and the resumed run did continue: it is not the N-step weights
    assert not all(torch.equal(a, b) for a, b in zip(resumed.net.parameters(),
                                                      first.net.parameters()))


def test_import_sam_fast_imports_no_framework():
    code = ("import sys, sam_fast, sam_fast.integrations\n"
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate')"
            " if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- Hugging Face Trainer -------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _transformers():
    """``transformers``, imported with the checkout's root off ``sys.path``.

    The checkout's top-level ``kernels/`` (the sources of ``sam_fast.kernels``) has the
    import name of Hugging Face's ``kernels`` package. ``python -m pytest`` from the
    root puts the root on ``sys.path``; transformers then finds a "kernels" without
    metadata, imports it (it needs triton) and imports names from it that it lacks.
    Its availability check is cached, so answering it once without the root suffices;
    an installed sam_fast (wheel or ``pip install -e``) ships the kernels as
    ``sam_fast.kernels`` and has no such clash.
    """
    root = Path(__file__).resolve().parents[1]
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != root]
    try:
        transformers = pytest.importorskip("transformers")
        import transformers.integrations.hub_kernels  # noqa: F401
        import transformers.models.bert.modeling_bert  # noqa: F401
        import transformers.trainer  # noqa: F401
    finally:
        sys.path[:] = saved
    return transformers

HF_STEPS = 4
HF_BATCH = 4


def _bert(seed: int = 0):
    transformers = _transformers()
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
        # no dropout: the Trainer's and the hand loop's RNG streams need not agree
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def _examples(n: int, seq: int = 6, seed: int = 2) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 50, (seq,), generator=gen),
             "attention_mask": torch.ones(seq, dtype=torch.long),
             "labels": torch.randint(0, 3, (), generator=gen)} for _ in range(n)]


def _hf_args(tmp_path, **kwargs):
    transformers = _transformers()
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=HF_BATCH,
                   max_steps=HF_STEPS, learning_rate=0.1, max_grad_norm=0.5,
                   lr_scheduler_type="linear", warmup_steps=0, report_to=[], use_cpu=True,
                   save_strategy="no", logging_steps=1, dataloader_num_workers=0,
                   disable_tqdm=True, seed=0)
    options.update(kwargs)
    return transformers.TrainingArguments(**options)


def _sequential_trainer():
    _transformers()
    from sam_fast.integrations.hf import SAMTrainer

    class SequentialSAMTrainer(SAMTrainer):
        """Batches in dataset order, so the hand loop can take the same ones."""

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    return SequentialSAMTrainer


def _hf_hand_loop(model, examples, max_grad_norm: float, base_optimizer=None):
    """SAM by hand as the Trainer runs it: clip the second gradients, SAM step, then
    the linear schedule (lr * (1 - t / T))."""
    transformers = _transformers()
    opt = sam_fast.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, HF_STEPS)
    model.train()
    losses = []
    for i in range(HF_STEPS):
        chunk = examples[i * HF_BATCH:(i + 1) * HF_BATCH]
        batch = {k: torch.stack([e[k] for e in chunk]) for k in chunk[0]}
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        opt.first_step(zero_grad=True)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.second_step(zero_grad=True)
        sched.step()
    return losses


def test_hf_sam_trainer_equals_hand_loop(tmp_path):
    """SAMTrainer with SAM(SGD), max_grad_norm and the Trainer's linear schedule equals a
    hand loop doing the same (clip the second gradients, second_step, schedule).

    Bit for bit: both run the same float32 ops on the same batches in the same order
    (no dropout, no autocast, clip_grad_norm_ in both), so any difference is a change
    in what is computed, not rounding."""
    examples = _examples(HF_STEPS * HF_BATCH)
    model = _bert()
    ref = _bert()
    opt = sam_fast.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    trainer = _sequential_trainer()(model=model, args=_hf_args(tmp_path),
                                     train_dataset=examples, optimizers=(opt, None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.state.global_step == HF_STEPS
    assert not [w for w in caught if SCHEDULER_WARNING in str(w.message)]
    losses = _hf_hand_loop(ref, examples, max_grad_norm=0.5)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == HF_STEPS
    # the logged loss is the first pass's (the Trainer rounds what it logs)
    assert logged == pytest.approx(losses, rel=1e-3)
    assert opt.last_grad_norm is not None and opt.last_grad_norm.item() > 0
    # the clipping was active (so the comparison checks it): the norm exceeds the bar
    assert any(h.get("grad_norm", 0) > 0.5 for h in trainer.state.log_history)


def test_hf_sam_trainer_wraps_the_trainers_optimizer(tmp_path):
    """``rho=`` wraps the optimizer the Trainer builds (AdamW by default, with its
    weight-decay groups); training moves the weights and the step is SAM's."""
    model = _bert()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _sequential_trainer()(model=model, args=_hf_args(tmp_path, learning_rate=1e-3),
                                     train_dataset=_examples(HF_STEPS * HF_BATCH), rho=0.05)
    trainer.train()
    sam = trainer.optimizer.optimizer if not isinstance(trainer.optimizer, sam_fast.SAM) \
        else trainer.optimizer
    assert isinstance(sam, sam_fast.SAM)
    assert isinstance(sam.base_optimizer, torch.optim.AdamW)
    assert sam.last_grad_norm is not None
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_hf_sam_trainer_refusals(tmp_path):
    _transformers()
    from sam_fast.integrations.hf import SAMTrainer

    model = _bert()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        SAMTrainer(model=model, args=_hf_args(tmp_path, gradient_accumulation_steps=2),
                   train_dataset=_examples(8), rho=0.05)
    with pytest.raises(TypeError, match="sam_fast.SAM"):
        SAMTrainer(model=model, args=_hf_args(tmp_path), train_dataset=_examples(8),
                   optimizers=(sgd, None))
    with pytest.raises(TypeError, match="rho="):
        SAMTrainer(model=model, args=_hf_args(tmp_path), train_dataset=_examples(8))


class _BNClassifier(nn.Module):
    """A plain nn.Module in the Trainer's convention: keyword inputs, a dict with "loss"."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, momentum=None), nn.Tanh(),
                                 nn.Linear(8, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def test_hf_sam_trainer_keeps_batchnorm_stats_out_of_the_second_pass(tmp_path):
    """freeze_bn_stats (the default): after each step the running statistics, counter
    included (momentum=None), are those of one forward of the pre-step model."""
    import copy

    model = _BNClassifier()
    gen = torch.Generator().manual_seed(3)
    examples = [{"x": torch.randn(4, generator=gen),
                 "labels": torch.randint(0, 3, (), generator=gen)} for _ in range(HF_BATCH)]
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        ref(torch.stack([e["x"] for e in examples]))
    opt = sam_fast.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    trainer = _sequential_trainer()(model=model, args=_hf_args(tmp_path, max_steps=1),
                                     train_dataset=examples, optimizers=(opt, None))
    trainer.train()
    bn, ref_bn = model.net[1], ref.net[1]
    assert bn.momentum is None
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(ref_bn, name)), name


def test_hf_sam_trainer_resume_equals_uninterrupted(tmp_path):
    """A checkpoint at step 2 (save_strategy="steps": model, SAM's state with its momentum
    buffers, the schedule), resumed with ``train(resume_from_checkpoint=...)`` in a fresh
    SAMTrainer to step 4: bit for bit the uninterrupted 4-step run (the Trainer skips the
    batches already seen; the sampler is sequential)."""
    examples = _examples(HF_STEPS * HF_BATCH)
    cls = _sequential_trainer()

    def trainer_for(model, out, **kwargs):
        opt = sam_fast.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        return cls(model=model, args=_hf_args(out, **kwargs), train_dataset=examples,
                   optimizers=(opt, None))

    whole = _bert()
    trainer_for(whole, tmp_path / "whole").train()

    first = _bert()
    trainer_for(first, tmp_path / "first", save_strategy="steps", save_steps=2).train()
    resumed = _bert(seed=1)  # other weights: the checkpoint must bring them
    trainer_for(resumed, tmp_path / "resumed").train(
        resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-2"))
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values(), strict=True):
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()
