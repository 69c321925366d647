"""A recorder of the operator calls a block of code makes, for tests that hold what the attention paths run."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Calls that neither read nor write elements: views and allocations.
_NO_ELEMENT_WORK = ("aten.view", "aten._unsafe_view", "aten.transpose", "aten.t.", "aten.expand", "aten.detach",
                    "aten.alias", "aten.slice", "aten.select", "aten.unsqueeze", "aten.squeeze", "aten.permute",
                    "aten.as_strided", "aten.empty", "aten.new_empty")


class OperatorCall(NamedTuple):
    name: str
    outputs: list  # (shape, dtype) of each output tensor
    largest: int  # elements of the largest tensor it reads or writes


class OperatorCalls(TorchDispatchMode):
    """Every operator call inside the ``with`` block, in order (``calls``)."""

    def __init__(self):
        super().__init__()
        self.calls: list[OperatorCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        tensors = [t for t in (*args, *results) if isinstance(t, torch.Tensor)]
        self.calls.append(OperatorCall(str(func), [(tuple(t.shape), t.dtype) for t in results
                                                   if isinstance(t, torch.Tensor)],
                                       max((t.numel() for t in tensors), default=0)))
        return out

    def large(self, size: int) -> list[str]:
        """Names of the calls that read or write a tensor of at least ``size`` elements, views and allocations
        excluded: on CPU each is a parallel region, on a GPU a kernel launch."""
        return [c.name for c in self.calls if c.largest >= size and not c.name.startswith(_NO_ELEMENT_WORK)]
