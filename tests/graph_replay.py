"""A CPU stand-in for CUDA graph capture and replay, to test on a CPU what a graph would do with a body.

A CUDA graph records the kernels of one run and replays them later on the same memory: every host value the
body used (sizes, Python numbers, anything read with ``.item()``) is frozen at capture, and every tensor the
body read from outside is read again at the same address. ``record_graph`` records the aten calls of a body the
same way (tensors made outside the body are kept by reference, tensors made inside are recomputed, every other
argument is frozen) and ``replay`` calls them again. A body that is safe to capture gives, replayed on new
buffer contents, what it computes eagerly; one that hides per-call data in host values does not.
Calls that cannot be captured (a device-to-host read, an output whose size depends on data, a host value
copied in) raise ``CaptureError`` like a capture would fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

# reads a device value on the host, sizes an output by its data, or copies a host value in
UNCAPTURABLE = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::unique_dim",
    "aten::_unique2",
    "aten::lift_fresh",
    "aten::lift_fresh_copy",
}


# indexing with a boolean mask finds the mask's true entries on the host first
MASK_INDEXED = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


class CaptureError(RuntimeError):
    pass


def _mask_indexed(name: str, args: Any) -> bool:
    if name not in MASK_INDEXED or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])


@dataclass(frozen=True)
class _Made:
    """Output ``index`` (flattened) of recorded call ``call``."""

    call: int
    index: int


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, Any, Any]] = []
        self.made: dict[int, _Made] = {}
        self.alive: list[torch.Tensor] = []  # keeps ids unique while recording
        self.outside: set[int] = set()

    def _spec(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            made = self.made.get(id(value))
            if made is not None:
                return made
            self.outside.add(id(value))
            return value  # made outside the body: read again at the same "address"
        return value  # frozen, as a captured kernel's arguments are

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in UNCAPTURABLE or _mask_indexed(name, args):
            raise CaptureError(f"{name} cannot be captured in a CUDA graph")
        self.calls.append((func, tree_map(self._spec, args), tree_map(self._spec, kwargs)))
        out = func(*args, **kwargs)
        flat, _ = tree_flatten(out)
        for i, value in enumerate(flat):
            if isinstance(value, torch.Tensor):
                self.made[id(value)] = _Made(len(self.calls) - 1, i)
                self.alive.append(value)
        return out


class RecordedGraph:
    """The recorded calls of one body; ``replay`` runs them again."""

    def __init__(self, calls: list[tuple[Any, Any, Any]], outside: int) -> None:
        self.calls = calls
        self.outside_tensors = outside
        self.replays = 0

    def replay(self) -> None:
        outputs: list[list[Any]] = []

        def resolve(value: Any) -> Any:
            return outputs[value.call][value.index] if isinstance(value, _Made) else value

        for func, args, kwargs in self.calls:
            out = func(*tree_map(resolve, args), **tree_map(resolve, kwargs))
            outputs.append(tree_flatten(out)[0])
        self.replays += 1


def record_graph(body: Callable[[], None]) -> RecordedGraph:
    """Run ``body`` once, recording its aten calls (a CUDA graph capture runs nothing; here the recording run's
    results are simply overwritten by the replay that follows)."""
    recorder = _Recorder()
    with recorder:
        body()
    return RecordedGraph(recorder.calls, len(recorder.outside))
