"""Live tensor bytes on the CPU, counted the way `torch.cuda.memory_allocated` counts them on a GPU.

usage: with LiveTensorBytes() as live: ...; live.current, live.peak, live.peak_breakdown

A TorchDispatchMode sees every tensor an operator returns; each new storage is counted until Python
frees it (a weakref finalizer on the storage), so `current` is the bytes of live storages and `peak` its
maximum, as a GPU's allocator would see them without its caching. Storages made outside the mode (the
model's weights read before it started, mmapped checkpoint tensors) are adopted by `adopt_live()` from the
garbage collector's view. What it cannot see: scratch tensors inside one custom operator (a bitsandbytes
kernel's own temporaries), which exist for the length of that call only.

At each new peak (in steps of `resolution` bytes) the live storages are summed by a label: what
`categorize` names them (weights, gradients, optimizer states) or else where they were made (phase,
innermost module, operator), so the breakdown says what the peak is made of.
"""

import gc
import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MIB = 2**20


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self, device: str = "cpu", resolution: int = 8 * MIB):
        super().__init__()
        self.device, self.resolution = device, resolution
        self.live: dict[int, tuple[int, str]] = {}  # id(storage) -> (bytes, where it was made)
        self.current = self.peak = self.segment_peak = 0
        self.phase, self.modules = "start", []
        self.names: dict[int, str] = {}
        self.categorize = None  # () -> {id(storage): label} for storages known by role
        self.peak_breakdown: dict[str, int] = {}  # of the whole run's peak
        self.peak_phase = ""
        self.segment_breakdown: dict[str, int] = {}  # of the current segment's peak
        self.segments: dict[str, dict] = {}  # closed segments: their peak's breakdown and what was live at their end
        self._snapshot_at = self._segment_snapshot_at = 0
        self._hooks = []

    # ---- counting
    def _count(self, storage, label: str):
        key = id(storage)
        if key in self.live or storage.device.type != self.device:
            return
        size = storage.nbytes()
        self.live[key] = (size, label)
        weakref.finalize(storage, self._free, key)
        self.current += size
        if self.current > self.segment_peak:
            self.segment_peak = self.current
            if self.current >= self._segment_snapshot_at + self.resolution:
                self.segment_breakdown, self._segment_snapshot_at = self.breakdown(), self.current
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.phase
            if self.current >= self._snapshot_at + self.resolution:
                self.peak_breakdown, self._snapshot_at = self.breakdown(), self.current

    def _free(self, key: int):
        size, _ = self.live.pop(key, (0, ""))
        self.current -= size

    def breakdown(self) -> dict[str, int]:
        """Live bytes now, by role or else by where they were made."""
        known = self.categorize() if self.categorize else {}
        totals = Counter()
        for key, (size, label) in list(self.live.items()):
            totals[known.get(key, label)] += size
        return dict(totals)

    def adopt_live(self, label: str = "existing"):
        """Count every storage alive now that the mode did not see made (weights loaded before it started)."""
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                try:
                    self._count(obj.untyped_storage(), label)
                except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
                    pass

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        label = f"{self.phase}|{self.modules[-1] if self.modules else '-'}|{func.__name__.split('.')[0]}"
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._count(t.untyped_storage(), label)
        return out

    # ---- where tensors are made: the innermost module running (forward, or recomputed under checkpointing)
    def name_modules(self, model: torch.nn.Module):
        self.names = {id(m): short_module(n) for n, m in model.named_modules()}

    def __enter__(self):
        pre = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: self.modules.append(self.names.get(id(m), type(m).__name__)))
        post = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: self._leave())
        self._hooks = [pre, post]
        return super().__enter__()

    def _leave(self):  # returns None: a forward hook's return value would replace the module's output
        if self.modules:
            self.modules.pop()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def next_segment(self, name: str) -> int:
        """Close segment `name`, the time since the last call: its peak (as max_memory_allocated after
        reset_peak_memory_stats) and breakdowns of that peak and of what is live now; then start another."""
        peak, self.segment_peak = self.segment_peak, self.current
        self.segments[name] = {"peak": self.segment_breakdown, "end": self.breakdown()}
        self.segment_breakdown, self._segment_snapshot_at = {}, 0
        self.modules.clear()  # a module stack left over from a recomputation must not name what comes next
        return peak


def short_module(name: str) -> str:
    """base_model.model.model.layers.0.mlp.experts.base_layer -> layers.mlp.experts (layers folded together)."""
    parts = [p for p in name.split(".") if p not in ("base_model", "model", "base_layer", "default") and not p.isdigit()]
    return ".".join(parts) or "model"


def gpu_like_lm_head(rows: int = 32):
    """On the CPU, TRL's fused LM head folds each [4096, 32768] logits tile with torch ops on the whole tile
    and accumulates its gradient products through fp32 copies of both operands (several GiB at real
    widths); on a GPU a Triton kernel folds the tile in place and `addmm(out_dtype=float32)` needs no
    copies. For a CPU measurement that stands for the GPU's, fold `rows` tokens and multiply `rows`
    columns at a time: the same numbers, temporaries of a few MiB."""
    from trl.kernels import chunked_logprob

    def blocked(fold):
        def run(tile, stride, *args, **kwargs):
            n = tile.shape[0]
            for start in range(0, n, rows):
                part = [a[start : start + rows] if isinstance(a, torch.Tensor) and a.dim() == 1 and a.shape[0] == n else a for a in args]
                fold(tile[start : start + rows], stride, *part, **kwargs)

        return run

    def addmm_fp32(acc, a, b):
        for start in range(0, a.shape[1], 16 * rows):
            acc.addmm_(a[:, start : start + 16 * rows].float(), b[start : start + 16 * rows].float())

    chunked_logprob._forward_tile = blocked(chunked_logprob._forward_tile)
    chunked_logprob._backward_tile = blocked(chunked_logprob._backward_tile)
    chunked_logprob._addmm_fp32 = addmm_fp32
