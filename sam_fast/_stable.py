"""What the portable library ``sam_fast._C_stable`` cannot register on the stable ABI:
every op's Autograd and ADInplaceOrView kernels (docs/extension.md, "Two libraries").

The version-matched ``sam_fast._C`` registers these in C++ (csrc/ops.cpp). The ops are
optimizer updates, not differentiable functions: with grad mode on and an argument
that requires grad they refuse, instead of silently cutting the graph; below autograd
they run and then bump the version counter of every tensor their schema marks written,
lists included (PyTorch's generic fallback only looks at single tensors), so autograd
notices when a tensor it saved for backward was changed in place. Here the same two
kernels are Python functions, registered once when the portable library is loaded.
"""

from __future__ import annotations

from typing import Any

import torch

_libraries: list[torch.library.Library] = []


def _written_positions(schema: torch._C.FunctionSchema) -> tuple[tuple[int, str], ...]:
    return tuple((i, a.name) for i, a in enumerate(schema.arguments)
                 if a.alias_info is not None and a.alias_info.is_write)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for t in value if isinstance(t, torch.Tensor)]
    return []


_increment_version = torch._C._increment_version


def _bump_written(written: tuple[tuple[int, str], ...], args: tuple, kwargs: dict) -> None:
    """Bump the version counters of the written arguments: one call per list (torch
    skips inference tensors)."""
    n = len(args)
    for i, arg_name in written:
        value = args[i] if i < n else kwargs.get(arg_name)
        if isinstance(value, torch.Tensor):
            _increment_version((value,))
        elif value:
            _increment_version(value)


def _kernels(name: str):
    """The two kernels of op ``name``. The op's schema is read at the first call: the
    SAM family's and BSAM's ops are defined in Python (family_ops.py, bsam_ops.py)
    after this library is loaded, as the C++ registrations by name allow too. Per call
    they do the least Python can: one version-counter call per written argument (torch
    skips inference tensors), and the requires-grad scan only under grad mode (the
    optimizers call the ops under no_grad)."""
    below_autograd = torch._C._after_autograd_keyset
    below_inplace = torch._C._after_ADInplaceOrView_keyset
    below_inplace_guard = torch._C._AutoDispatchBelowADInplaceOrView
    is_grad_enabled = torch.is_grad_enabled
    resolved: list = []  # [op, argument names, written (position, name) pairs]

    def resolve() -> list:
        if not resolved:
            op = getattr(torch.ops.sam_fast, name).default
            schema = op._schema
            resolved.extend((op, [a.name for a in schema.arguments],
                             _written_positions(schema)))
        return resolved

    def inplace_or_view(keys, *args, **kwargs):
        op, _, written = resolved or resolve()
        with below_inplace_guard():
            out = op.redispatch(keys & below_inplace, *args, **kwargs)
        _bump_written(written, args, kwargs)
        return out

    def autograd(keys, *args, **kwargs):
        if is_grad_enabled():
            _, names, _ = resolved or resolve()
            n = len(args)
            for i, arg_name in enumerate(names):
                value = args[i] if i < n else kwargs.get(arg_name)
                if any(t.requires_grad for t in _tensors(value)):
                    raise RuntimeError(
                        f"{name} is an optimizer update and not differentiable, but its "
                        f"argument '{arg_name}' requires grad: call it under torch.no_grad()")
        return inplace_or_view(keys & below_autograd, *args, **kwargs)

    return autograd, inplace_or_view


def register(op_names: tuple[str, ...]) -> None:
    """Registers the two kernels of every op (once per process)."""
    if _libraries:
        return
    lib = torch.library.Library("sam_fast", "IMPL")
    for op_name in op_names:
        autograd, inplace_or_view = _kernels(op_name)
        lib.impl(op_name, autograd, "Autograd", with_keyset=True)
        lib.impl(op_name, inplace_or_view, "ADInplaceOrView", with_keyset=True)
    _libraries.append(lib)


def direct_call(name: str):
    """``torch.ops.sam_fast.<name>`` as the optimizers call it under the portable library.

    With grad mode off (the optimizers' steps) and outside ``torch.compile``'s tracing,
    the Python Autograd kernel above has nothing to refuse, and going through it costs a
    Python hop that converts every list twice more: so the call runs below Autograd and
    ADInplaceOrView (one guard) and bumps the written lists' version counters itself,
    one C++ call per list, which is what that kernel would have done. Otherwise (grad
    mode on, tracing) it is the plain op.
    """
    packet = getattr(torch.ops.sam_fast, name)
    op = packet.default
    written = _written_positions(op._schema)
    below_inplace_guard = torch._C._AutoDispatchBelowADInplaceOrView
    is_grad_enabled = torch.is_grad_enabled
    is_compiling = torch.compiler.is_compiling

    def call(*args, **kwargs):
        if is_grad_enabled() or is_compiling():
            return packet(*args, **kwargs)
        with below_inplace_guard():
            out = op(*args, **kwargs)
        _bump_written(written, args, kwargs)
        return out

    call.__name__ = name
    return call
