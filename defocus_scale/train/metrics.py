"""Per-step metrics: a Parquet table (pyarrow) and TensorBoard events under the run directory, console
lines with rich; FLOP counting and the peak used for MFU; peak memory."""

from __future__ import annotations

import resource
import time
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.console import Console
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from defocus_scale.losses import defocus_loss

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device-name fragment.
_GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "4090": 165e12,
}


def _conv_backward_flops(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed, _output_padding,
    _groups, output_mask, out_shape=None, **_kwargs,
) -> int:  # fmt: skip
    """A convolution's backward: each of the input and weight gradients costs what the forward does.
    torch's own formula ignores ``groups``, so it counts a depthwise convolution's weight gradient as a
    dense one (De-focus Mamba-S: 22.8 of its 51.3 counted GFLOP per training sample were this)."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def train_flops_per_sample(model_fn: Any, image_size: int) -> float:
    """Forward + backward FLOPs of one training sample, counted by ``FlopCounterMode`` on a meta-device
    copy (no memory, no compute). Matmuls and convolutions only, the usual MFU convention: the scans'
    elementwise work is not counted."""
    with torch.device("meta"):
        model: nn.Module = model_fn()
        model.train()
        images = torch.empty(1, 3, image_size, image_size)
        conv_backward = {torch.ops.aten.convolution_backward: _conv_backward_flops}
        with FlopCounterMode(display=False, custom_mapping=conv_backward) as counter:
            output = model.forward_train(images)
            defocus_loss(output, torch.zeros(1, dtype=torch.long)).total.backward()
    return float(counter.get_total_flops())


def peak_flops_per_device(device: torch.device, precision_bf16: bool) -> tuple[float, str]:
    """(peak FLOP/s of one rank's device, how it was arrived at)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in _GPU_PEAK_BF16.items():
            if fragment in name:
                peak = peak if precision_bf16 else peak / 2  # TF32 is half the bf16 rate on these parts
                return peak, f"{name}: {peak / 1e12:.0f} TFLOP/s {'bf16' if precision_bf16 else 'tf32'} dense"
        return float("nan"), f"{name}: unknown peak (set trainer.peak_flops)"
    mhz, has_fma, has_avx512 = 0.0, False, False
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("cpu MHz") and not mhz:
                    mhz = float(line.split(":")[1])
                if line.startswith("flags"):
                    has_fma, has_avx512 = " fma" in line, " avx512f" in line
    except OSError:
        pass
    threads = torch.get_num_threads()
    # fp32 FLOPs per cycle and core: two FMA pipes x lanes (16 with AVX-512, 8 with AVX2) x 2 (multiply-add).
    # An upper bound: cores that split 512-bit FMAs in two reach half of it.
    per_cycle = 64 if has_avx512 else 32 if has_fma else 8
    peak = threads * mhz * 1e6 * per_cycle
    return peak, f"CPU: {threads} threads x {mhz:.0f} MHz x {per_cycle} fp32 FLOP/cycle"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on CUDA; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class MetricsWriter:
    """Rank 0's sink for records. Each table (``train``: one row per step; ``eval``) is a folder of Parquet
    parts under ``<run_dir>/metrics/``, one complete file per flush (every 100 rows, at every checkpoint
    and at the end), written under a temporary name and renamed: a killed worker loses at most its
    unflushed rows, never a file. Parts sort by (first step of the process, start time, flush), so after
    a restart the later part holds the truth for repeated steps (``report.read_metrics`` applies that;
    ``pyarrow.dataset`` reads the folder as it is)."""

    def __init__(
        self, run_dir: str, *, first_step: int, tensorboard: bool, console: Console | None, log_every: int
    ) -> None:
        self.fs, root = fsspec.core.url_to_fs(run_dir)
        self.root = root.rstrip("/")
        self.part_stem = f"part-{first_step:08d}-{time.strftime('%Y%m%dT%H%M%S')}"
        self._flushes = 0
        self.console, self.log_every = console, log_every
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=f"{run_dir.rstrip('/')}/tensorboard")

    def log(self, step: int, record: dict[str, float], table: str = "train") -> None:
        rows = self._rows.setdefault(table, [])
        rows.append({"step": step, "time": time.time(), **{k: float(v) for k, v in record.items()}})
        if self._tb is not None:
            for key, value in record.items():
                self._tb.add_scalar(f"{table}/{key}", value, step)
        if self.console is not None and (table != "train" or step % self.log_every == 0):
            shown = " ".join(f"{k} {v:.4g}" for k, v in record.items())
            self.console.print(f"[bold]{table} step {step}[/] {shown}")
        if len(rows) >= 100:
            self.flush()

    def flush(self) -> None:
        for table_name, rows in self._rows.items():
            if not rows:
                continue
            folder = f"{self.root}/metrics/{table_name}"
            self.fs.makedirs(folder, exist_ok=True)
            final = f"{folder}/{self.part_stem}-{self._flushes:05d}.parquet"
            with self.fs.open(f"{final}.tmp", "wb") as handle:
                pq.write_table(pa.Table.from_pylist(rows), handle)
            self.fs.mv(f"{final}.tmp", final)
            rows.clear()
        self._flushes += 1
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush the rows left and close TensorBoard's writer, which joins its background thread (a daemon
        thread: left running, the interpreter's exit would kill it mid-write). TensorBoard is closed even
        if the Parquet flush fails; a second call does nothing."""
        try:
            self.flush()
        finally:
            writer, self._tb = self._tb, None
            if writer is not None:
                writer.close()
