"""SAM with the Hugging Face Trainer: ``sam_fast.integrations.hf.SAMTrainer``.

    python examples/hf_trainer_sam.py [--steps 40]

A tiny BERT built from a config (no download) learns a synthetic sequence task on
the CPU in a few seconds: the label is whether the sequence's first token is
below 16.
The Trainer keeps its gradient clipping (``max_grad_norm``), linear schedule and
logging; SAMTrainer's training_step adds the second pass.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

import sam_fast
from sam_fast.integrations.hf import SAMTrainer


def make_examples(n: int, seq: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 30, (n, seq), generator=gen)
    labels = (ids[:, 0] < 16).long()
    return [{"input_ids": i, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": y}
            for i, y in zip(ids, labels)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    config = transformers.BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    opt = sam_fast.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2)
    with tempfile.TemporaryDirectory() as out:
        training = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=16, max_steps=args.steps,
            max_grad_norm=1.0, lr_scheduler_type="linear", report_to=[], use_cpu=True,
            save_strategy="no", logging_steps=10, disable_tqdm=True)
        # optimizers=(SAM, None): the Trainer builds its linear schedule over SAM.
        # SAMTrainer(..., rho=0.05) would instead wrap the optimizer the Trainer builds.
        trainer = SAMTrainer(model=model, args=training, train_dataset=make_examples(1024),
                             optimizers=(opt, None))
        trainer.train()
    test = make_examples(512, seed=1)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.stack([e["input_ids"] for e in test])).logits
    accuracy = (logits.argmax(1) == torch.stack([e["labels"] for e in test])).float().mean()
    print(f"{trainer.state.global_step} steps, held-out accuracy {accuracy.item():.3f}")


if __name__ == "__main__":
    main()
