"""What every benchmark records beside its numbers: device, library versions, date."""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def describe_environment() -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton ships with the pinned torch
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})",
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
    }


def write_result(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``{"environment": ..., **payload}`` as JSON; ``out`` defaults to results/<name>.json."""
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": describe_environment(), **payload}, indent=2) + "\n")
    return path
