"""A small autotuner over a kernel's launch parameters, keyed on the shapes.

Why not ``triton.autotune``: our launchers build a :class:`~defocus_scale.kernels.launch.KernelLaunch`
(one code path for what runs and what the kernel report compiles), a launch may be several kernels (a
split pass and its fix-up), and a choice must be reproducible across a job's restarts. So a launcher
lists a few candidate parameter sets for a shape (the first is its default, the one the report
compiles) and asks :func:`choose` which to use.

* On CUDA, the first call for a key times every candidate (``triton.testing.do_bench``) and keeps the
  fastest: in memory, and in a JSON file (``DEFOCUS_AUTOTUNE_CACHE``, default
  ``~/.cache/defocus-scale/autotune.json``) keyed on the GPU's name and the Triton version, so a
  resumed job makes the same choice without timing again.
* In the Triton interpreter (CPU tests), on a CPU or meta tensor, while a CUDA graph is captured, or
  with ``DEFOCUS_AUTOTUNE=0``: the default, untimed. Results are then bitwise reproducible.

Every candidate computes the same function; they differ in tiling, so results may differ in the last
bits from one choice to another, never in meaning (each is tested against the reference).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch

Params = dict[str, Any]

_LOCK = threading.Lock()
_CHOICES: dict[str, Params] = {}  # cache key -> chosen parameters, as stored on disk
_SETTLED: dict[tuple, Params] = {}  # (kernel, key, device) -> this process's choice, checked
_DISK_LOADED: set[Path] = set()


def enabled() -> bool:
    return os.environ.get("DEFOCUS_AUTOTUNE", "1").strip().lower() not in ("0", "off", "false", "no")


def cache_path() -> Path:
    default = Path.home() / ".cache" / "defocus-scale" / "autotune.json"
    return Path(os.environ.get("DEFOCUS_AUTOTUNE_CACHE", default))


def _device_id(device: torch.device) -> str:
    import triton

    return f"{torch.cuda.get_device_name(device)}|triton {triton.__version__}"


def _cache_key(kernel: str, key: Hashable, device: torch.device) -> str:
    return f"{_device_id(device)}|{kernel}|{key!r}"


def _load_disk(path: Path) -> None:
    if path in _DISK_LOADED:
        return
    _DISK_LOADED.add(path)
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):  # unreadable or half-written by a crashed process: re-tune
        return
    if isinstance(stored, dict):
        for k, v in stored.items():
            if isinstance(v, dict):
                _CHOICES.setdefault(k, v)


def _store_disk(path: Path, cache_key: str, params: Params) -> None:
    """Merge one choice into the file; written to a temporary file and renamed, so a reader (another
    rank, a crash) never sees half of it. A lost race only costs the loser's entry a re-tune."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            stored = json.loads(path.read_text())
            if not isinstance(stored, dict):
                stored = {}
        except (OSError, ValueError):
            stored = {}
        stored[cache_key] = params
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(stored, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:  # a read-only or full home: the in-memory choice still holds for this process
        pass


def _default_timer(run: Callable[[], None]) -> float:
    from triton.testing import do_bench

    return float(do_bench(run, warmup=5, rep=20))


def _tunable(device: torch.device) -> bool:
    if not enabled() or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return not torch.cuda.is_current_stream_capturing()


def choose(
    kernel: str,
    key: Hashable,
    default: Params,
    candidates: Callable[[], Sequence[Params]],
    build: Callable[[Params], Callable[[], None]],
    device: torch.device,
    timer: Callable[[Callable[[], None]], float] | None = None,
) -> Params:
    """The parameters to launch ``kernel`` with at ``key`` (the shapes and dtypes that decide speed).

    ``default``: what to launch untuned; ``candidates()``: the parameter sets to try, ``default`` first
    (called once per key and process, and only where tuning is on, so an op's every call costs a dict
    lookup); ``build(params)`` prepares a launch with them (allocating its outputs) and returns what runs
    it, which is what is timed. ``timer`` replaces the CUDA timing (tests)."""
    if not (_tunable(device) or timer is not None):
        return dict(default)
    settled_key = (kernel, key, str(device))
    settled = _SETTLED.get(settled_key)
    if settled is not None:
        return dict(settled)
    options = [dict(c) for c in candidates()]
    if not options or options[0] != dict(default):
        raise ValueError(f"{kernel}: the candidates must start with the default {default}, got {options[:1]}")
    best = options[0] if len(options) == 1 else _tuned(kernel, key, options, build, device, timer)
    with _LOCK:
        _SETTLED[settled_key] = best
    return dict(best)


def _tuned(kernel, key, options: list[Params], build, device: torch.device, timer) -> Params:
    """The stored choice for ``key`` if it is still one of ``options``, else the fastest, stored."""
    cache_key = _cache_key(kernel, key, device) if device.type == "cuda" else f"{kernel}|{key!r}"
    path = cache_path()
    with _LOCK:
        _load_disk(path)
        known = _CHOICES.get(cache_key)
    if known is not None and known in options:
        return dict(known)
    from triton.runtime.errors import OutOfResources

    measure = timer or _default_timer
    times = []
    for index, params in enumerate(options):
        try:
            times.append(measure(build(dict(params))))
        except OutOfResources as error:  # a candidate this GPU cannot launch (shared memory): never chosen
            if index == 0:
                raise RuntimeError(f"{kernel}: the default launch parameters {params} failed") from error
            times.append(float("inf"))
    best = options[min(range(len(options)), key=times.__getitem__)]
    with _LOCK:
        _CHOICES[cache_key] = best
        _store_disk(path, cache_key, best)
    return dict(best)


def clear() -> None:
    """Forget every in-memory choice (tests; a changed cache file is read again)."""
    with _LOCK:
        _CHOICES.clear()
        _SETTLED.clear()
        _DISK_LOADED.clear()
