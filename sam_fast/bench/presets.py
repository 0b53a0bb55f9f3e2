"""Parameter-set presets: the tensor shapes of real models, written out (no downloads).

A preset is only a list of shapes; the benchmark fills them with random
values. The counts in each docstring are checked by ``tests/test_bench.py``
against the published models (torchvision's ``resnet50`` / ``vit_b_16``,
Hugging Face's ``gpt2-medium``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    shapes: tuple[Shape, ...]

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def num_elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of one copy of the parameters (one "pass" in the byte model)."""
        return self.num_elements * dtype_size(dtype)


# -- model shape lists ---------------------------------------------------------------------


def _bn(c: int) -> list[Shape]:
    """BatchNorm / LayerNorm affine parameters: weight and bias."""
    return [(c,), (c,)]


def resnet50_shapes(num_classes: int = 1000) -> list[Shape]:
    """torchvision ``resnet50``: 161 tensors, 25,557,032 parameters (convs have no bias)."""
    shapes: list[Shape] = [(64, 3, 7, 7), *_bn(64)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = width * 4
            shapes += [(width, inplanes, 1, 1), *_bn(width)]
            shapes += [(width, width, 3, 3), *_bn(width)]
            shapes += [(out, width, 1, 1), *_bn(out)]
            if b == 0:  # the downsample shortcut of each stage's first block
                shapes += [(out, inplanes, 1, 1), *_bn(out)]
            inplanes = out
    shapes += [(num_classes, 2048), (num_classes,)]
    return shapes


def resnet18_cifar_shapes(num_classes: int = 10) -> list[Shape]:
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), as :mod:`sam_fast.bench.e2e`
    builds it: 62 tensors, 11,173,962 parameters."""
    shapes: list[Shape] = [(64, 3, 3, 3), *_bn(64)]
    inplanes = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for b in range(2):
            shapes += [(width, inplanes, 3, 3), *_bn(width), (width, width, 3, 3), *_bn(width)]
            if b == 0 and (stride != 1 or inplanes != width):
                shapes += [(width, inplanes, 1, 1), *_bn(width)]
            inplanes = width
    shapes += [(num_classes, 512), (num_classes,)]
    return shapes


def vit_b16_shapes(num_classes: int = 1000) -> list[Shape]:
    """torchvision ``vit_b_16`` (224x224, patch 16): 152 tensors, 86,567,656 parameters."""
    d, mlp, layers, tokens = 768, 3072, 12, 197
    shapes: list[Shape] = [(1, 1, d), (d, 3, 16, 16), (d,), (1, tokens, d)]
    for _ in range(layers):
        shapes += [*_bn(d), (3 * d, d), (3 * d,), (d, d), (d,), *_bn(d)]
        shapes += [(mlp, d), (mlp,), (d, mlp), (d,)]
    shapes += [*_bn(d), (num_classes, d), (num_classes,)]
    return shapes


def gpt2_medium_shapes() -> list[Shape]:
    """Hugging Face ``gpt2-medium`` (tied LM head): 292 tensors, 354,823,168 parameters."""
    d, layers, vocab, ctx = 1024, 24, 50257, 1024
    shapes: list[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [*_bn(d), (d, 3 * d), (3 * d,), (d, d), (d,), *_bn(d)]
        shapes += [(d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += _bn(d)
    return shapes


def tiny_shapes() -> list[Shape]:
    """A small CNN + MLP head (15 tensors, 40,922 elements): smoke tests, launch overhead."""
    return [
        (16, 3, 3, 3), *_bn(16), (32, 16, 3, 3), *_bn(32), (64, 32, 3, 3), *_bn(64),
        (128, 64), (128,), (64, 128), (64,), (10, 64), (10,),
    ]


_BUILDERS: dict[str, tuple[str, Callable[[], list[Shape]]]] = {
    "tiny": ("small CNN, 15 tensors (smoke tests)", tiny_shapes),
    "resnet18": ("ResNet-18 for CIFAR (the e2e model)", resnet18_cifar_shapes),
    "resnet50": ("ResNet-50 (ImageNet)", resnet50_shapes),
    "vit_b16": ("ViT-B/16 (ImageNet)", vit_b16_shapes),
    "gpt2_medium": ("GPT-2-medium transformer", gpt2_medium_shapes),
    "many_small": ("10 000 tensors x 1 000 elements", lambda: [(1000,)] * 10_000),
    "many_small_2k": ("2 000 tensors x 1 000 elements (many_small scaled down for CPUs)",
                      lambda: [(1000,)] * 2_000),
    "huge": ("one 16384 x 16384 tensor", lambda: [(16384, 16384)]),
}

PRESETS: dict[str, Preset] = {
    name: Preset(name, desc, tuple(build())) for name, (desc, build) in _BUILDERS.items()
}

# GPU: the full set. CPU: a scaled-down set, so that the no-argument run on a 2-core,
# 24 GiB machine finishes in a few minutes: ResNet-18 (a real model's shapes, 62
# tensors; the e2e model) and many_small_2k (the per-tensor overhead case, 2 000
# tensors). On a few cores every contender needs seconds per step of the 86M-355M
# presets and of many_small's 10 000 tensors, so they run there only when asked for.
DEFAULT_PRESETS = {
    "cuda": ("resnet50", "vit_b16", "gpt2_medium", "many_small", "huge"),
    "cpu": ("resnet18", "many_small_2k"),
}

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
DEFAULT_DTYPES = ("fp32", "bf16")


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    return str(dtype).replace("torch.", "")


def default_presets(device_type: str) -> tuple[str, ...]:
    return DEFAULT_PRESETS.get(device_type, DEFAULT_PRESETS["cpu"])


def format_count(n: float) -> str:
    """1234567 -> '1.23M' (parameter counts in headers)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))
