"""One kernel launch as data: what the launchers run and what the kernel report compiles.

A launcher builds a :class:`KernelLaunch` (kernel, grid, arguments, compile-time constants, warps) and
runs it; ``benchmarks/kernel_report.py`` builds the same object from meta tensors of the production
shapes and compiles it ahead of time for a GPU it does not have (``defocus_scale.kernels.aot``). One
code path chooses the tiling, so the report cannot drift from what runs.

``work`` is the launcher's account of the work the launch does, for the report's estimate: the
trip count of the token loops per program, the exponentials it must evaluate, and the bytes it must
move at least (every input read once, every output written once) and does move (with scratch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
                  torch.int64: "i64"}  # fmt: skip


# The compute capability launches are built for when their tensors do not say it (the kernel report's meta
# tensors): set by ``targeting``; ``None`` means unknown (the interpreter, or no target given).
_TARGET_CAPABILITY: ContextVar[int | None] = ContextVar("defocus_target_capability", default=None)


def target_capability(device: torch.device) -> int | None:
    """The GPU a launch on ``device`` is for, as ``10 * major + minor`` (90 for an H100): the device's own
    on CUDA, else the one ``targeting`` names (the report compiles each arch's own launches), else None."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return _TARGET_CAPABILITY.get()


# SMs of the parts the report targets, by compute capability (SXM parts: A100, H100, B200)
_SMS = {80: 108, 90: 132, 100: 148}


def target_sms(device: torch.device) -> int:
    """SMs of the GPU a launch on ``device`` is for (see ``target_capability``); 0 when there is none."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS.get(_TARGET_CAPABILITY.get() or 0, 0)


@contextlib.contextmanager
def targeting(capability: int) -> Iterator[None]:
    """Build launches on meta tensors as for a GPU of this compute capability (``10 * major + minor``)."""
    token = _TARGET_CAPABILITY.set(capability)
    try:
        yield
    finally:
        _TARGET_CAPABILITY.reset(token)


@dataclass(frozen=True)
class LaunchWork:
    """What one launch has to do. ``token_steps``: iterations of each token loop per program (every token
    loop of a kernel runs that many times; or a tuple, one count per token loop in code order);
    ``exp``: exponentials the maths needs (the SFU floor);
    ``rebuild_steps``: iterations of the rebuild loops together (loops that load and store nothing: a
    split's passes over the chunks outside its range, accumulating states) of the program that runs the
    most of them; ``chunk_steps``: iterations of the loop enclosing the token loops, where one does."""

    token_steps: int | tuple[int, ...]
    exp: int
    bytes_min: int
    bytes_moved: int
    rebuild_steps: int = 0
    # iterations per program of the loop that encloses the token loops (0: none does); its own
    # instructions (outside the token loops) run that many times
    chunk_steps: int = 0
    # what marks a token loop (the innermost loops with it): global stores, or, for a pass that writes
    # nothing a token (the selective backward's carry pass), global loads ("LDG")
    token_marker: str = "STG"


@dataclass
class KernelLaunch:
    kernel: Any  # a triton.JITFunction
    grid: tuple[int, ...]
    args: dict[str, Any]  # runtime arguments by name: tensors, ints, floats
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 1
    work: LaunchWork | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    # launches that must run before this one (an earlier pass of the same op); the report compiles each
    prelude: tuple[KernelLaunch, ...] = ()
    # tensor arguments the kernel needs zeroed at every run (counters and flags it synchronises with)
    zeroed: tuple[str, ...] = ()

    @property
    def programs(self) -> int:
        total = 1
        for g in self.grid:
            total *= g
        return total

    def run(self) -> None:
        for earlier in self.prelude:
            earlier.run()
        for name in self.zeroed:
            self.args[name].zero_()
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)  # fmt: skip

    def signature(self) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int, ...], list]]:
        """Triton's ahead-of-time ``(signature, constexprs, attrs)``, specialised as the JIT would at this
        launch: pointers and integers divisible by 16 are marked so, integers equal to 1 become constants
        (except the kernel's ``do_not_specialize`` arguments).
        Tensors from ``torch.empty`` are 16-byte aligned, which the meta tensors of the report stand for."""
        names = self.kernel.arg_names
        unspecialised = {p.name for p in self.kernel.params if p.do_not_specialize}
        signature: dict[str, str] = {}
        constexprs = dict(self.constexprs)
        attrs: dict[tuple[int, ...], list] = {}
        for index, name in enumerate(names):
            if name in self.constexprs:
                signature[name] = "constexpr"
                continue
            value = self.args[name]
            if isinstance(value, torch.Tensor):
                signature[name] = "*" + _TRITON_DTYPES[value.dtype]
                if value.is_meta or value.data_ptr() % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
            elif isinstance(value, bool) or value is None:
                raise TypeError(f"argument {name}={value!r}: pass flags as constexprs")
            elif isinstance(value, int):
                if name in unspecialised:
                    signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                    continue
                if value == 1:
                    signature[name] = "constexpr"
                    constexprs[name] = 1
                    continue
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"argument {name}: unsupported type {type(value).__name__}")
        return signature, constexprs, attrs
