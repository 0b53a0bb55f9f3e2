"""Training-framework integrations.

Each framework's module imports that framework itself, so ``import sam_fast`` (and
``import sam_fast.integrations``) never does:

- :mod:`sam_fast.integrations.hf`: ``SAMTrainer``, a ``transformers.Trainer`` that
  takes SAM's two passes in its ``training_step``.

PyTorch Lightning needs no module here (README, "Integrations").
"""
