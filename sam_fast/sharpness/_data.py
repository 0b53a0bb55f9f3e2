"""The data of one measurement: one batch or an iterable of batches, checked up front.

Every estimator needs the mean loss over *all* the data, evaluated many times
(once per probe block, Lanczos step or ascent step), so the data must be
re-iterable. A one-shot iterator (a generator) is therefore kept in memory on
first sight; a list, a tuple of batches or a ``DataLoader`` is iterated afresh
each pass.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

Batch = tuple[Any, Any]
LossFn = Callable[[Any, Any], Tensor]


def is_batch(data: Any) -> bool:
    """One ``(inputs, targets)`` pair, as opposed to an iterable of them.

    A pair whose first element is a tensor is a batch; an iterable of batches
    has pairs (not tensors) as its elements.
    """
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)


def to_device(obj: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch to the parameters' device."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def batch_size(batch: Batch) -> int:
    """Examples in a batch: the leading dimension of the targets (else of the inputs)."""
    for part in (batch[1], batch[0]):
        if isinstance(part, Tensor) and part.dim() >= 1:
            return int(part.shape[0])
    raise ValueError("cannot tell the batch size: neither targets nor inputs is a tensor "
                     "with a leading batch dimension")


class Data:
    """Batches on the parameters' device, each with its weight in the mean loss.

    ``loss_fn(model(inputs), targets)`` is a mean over its batch, so the loss of
    the whole data is ``sum_b n_b L_b / sum_b n_b``; every estimator here
    accumulates batch results with the weights ``n_b`` and divides once.
    """

    def __init__(self, data: Any, device: torch.device) -> None:
        self.device = device
        if isinstance(data, Tensor):
            raise TypeError("data must be one (inputs, targets) batch or an iterable of them, "
                            "not a single tensor")
        if is_batch(data):
            self._source: Iterable[Batch] = [tuple(data)]
        else:
            try:
                it = iter(data)
            except TypeError:
                raise TypeError("data must be one (inputs, targets) batch or an iterable of them, "
                                f"got {type(data).__name__}") from None
            # A one-shot iterator would be empty on the second pass: keep its batches.
            self._source = list(it) if it is data else data

    def __iter__(self) -> Iterator[tuple[Batch, int]]:
        for batch in self._source:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError("each batch must be an (inputs, targets) pair, "
                                f"got {type(batch).__name__}")
            batch = to_device(tuple(batch), self.device)
            yield batch, batch_size(batch)

    def first(self) -> tuple[Batch, int]:
        """The first batch, or ValueError when there is none."""
        for item in self:
            return item
        raise ValueError("data is empty: it yielded no batch")


def mean_loss(model: nn.Module, loss_fn: LossFn, batch: Batch) -> Tensor:
    """``loss_fn(model(inputs), targets)``, which must be a scalar."""
    loss = loss_fn(model(batch[0]), batch[1])
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError("loss_fn(model(inputs), targets) must be a scalar (the mean over the "
                         f"batch), got {shape}; use reduction='mean'")
    return loss


def check_data(model: nn.Module, loss_fn: LossFn, data: Data) -> None:
    """Fail before any work on empty data or a non-scalar loss (one forward pass)."""
    batch, _ = data.first()
    with torch.no_grad():
        mean_loss(model, loss_fn, batch)
