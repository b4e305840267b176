"""Shutdown stress: run the 2-rank trainer (``torchrun -m defocus_scale.train``) many times, optionally beside
CPU-heavy processes, and count the runs whose processes do not end cleanly.

A run is bad when it aborts (``terminate called ...``, SIGABRT/SIGSEGV of any process, a fatal Python
error), hangs (the whole launch outlives ``--timeout``), leaves a process behind, or ends with the wrong
status. Cases (``--cases``, each run ``--runs`` times, in turn):

* ``ok`` / ``ok-notb`` / ``ok-workers``: a full run (async checkpoints every 2 steps, EMA, evaluation
  every 2 steps and at the end) with TensorBoard on / off / on with 2 DataLoader workers per rank; must
  exit 0 and print rank 0's summary;
* ``bad-source``: ``data.source`` does not exist, so every rank fails after the process groups (the
  default one and the checkpointer's) exist; must exit non-zero with the error, promptly;
* ``rank-error``: rank 1 raises in its 3rd backward pass while rank 0 is inside FSDP's collectives; must
  exit non-zero promptly, no rank left waiting;
* ``sigterm-launcher`` / ``sigterm-worker``: SIGTERM to torchrun / to rank 1's worker after the 3rd step;
  every process must exit within ``--grace`` seconds of the signal, none by SIGKILL, abort or the signal
  itself (that would mean no clean-up ran), and the trainer must say it was terminated.

Every process of a launch carries a marker in its environment, so leftovers are found (and killed) by
scanning ``/proc``. Workers run with ``PYTHONFAULTHANDLER=1``: an abort prints every thread's Python stack.

An abort of torchrun's own agent after a SIGTERM to it (its exit status -6, once, after its
``SignalException`` traceback, every rank having reported its clean termination) is counted apart, as
``launcher``: torch's elastic agent skips its rendezvous shutdown on a signal and exits with the daemon
``RendezvousKeepAliveTimer`` thread still running TCPStore calls -- pytorch#38228's pattern, in torch's
launcher, not in the trainer.

    python benchmarks/stress_shutdown.py --runs 20 --load 2 --cases ok,ok-notb --json out.json
    python benchmarks/stress_shutdown.py --runs 2 --cases bad-source,rank-error,sigterm-worker
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CASES = ("ok", "ok-notb", "ok-workers", "bad-source", "rank-error", "sigterm-launcher", "sigterm-worker")
OK_CASES = ("ok", "ok-notb", "ok-workers")
MARKER = "DEFOCUS_STRESS_SHUTDOWN"

TINY_MODEL = [
    "model.overrides.embed_dim=32", "model.overrides.depth=2", "model.overrides.inner_dim=64",
    "model.overrides.dt_rank=4", "model.overrides.group_size=16", "model.overrides.patch_size=8",
]  # fmt: skip

# Signs of a process that did not end by itself: C++ terminate, signals, interpreter aborts.
ABORT_PATTERNS = re.compile(
    r"terminate called|Aborted|core dumped|SIGABRT|SIGSEGV|SIGBUS|Signal 6 |Signal 11 |Fatal Python error|"
    r"Segmentation fault|exitcode\s*:\s*-(6|11|7)\b|FATAL: exception not rethrown"
)
KILLED_PATTERNS = re.compile(r"exitcode\s*:\s*-9\b|forcefully exiting via SIGKILL|Signal 9 ")

# Rank STRESS_FAIL_RANK raises in its STRESS_FAIL_AT-th backward pass (any loop: the trainer's own code is
# untouched), then the ordinary entry runs. torchrun starts it as a script.
FAILING_ENTRY = """\
import os, sys
import torch
from defocus_scale.train.cli import run_from_overrides

_backward, _calls = torch.autograd.backward, [0]
_rank, _at = os.environ["STRESS_FAIL_RANK"], int(os.environ["STRESS_FAIL_AT"])

def _failing_backward(*args, **kwargs):
    _calls[0] += 1
    if os.environ.get("RANK") == _rank and _calls[0] == _at:
        raise RuntimeError("stress_shutdown: injected failure in backward")
    return _backward(*args, **kwargs)

torch.autograd.backward = _failing_backward
sys.exit(run_from_overrides(sys.argv[1:]))
"""


@dataclass
class RunResult:
    case: str
    index: int
    returncode: int | None
    seconds: float
    ok: bool
    abort: bool = False
    launcher_abort: bool = False
    hang: bool = False
    killed: bool = False
    leftovers: int = 0
    seconds_after_signal: float | None = None
    worker_exitcodes: list[int] = field(default_factory=list)
    reason: str = ""
    log: str | None = None


def make_data(root: Path) -> Path:
    """Tiny synthetic train/val shards under ``root`` (built once; reused when present)."""
    from defocus_scale.data.make_shards import make_shards

    for name, samples, seed in (("train", 256, 0), ("val", 64, 1)):
        if not (root / name / "manifest.parquet").exists():
            make_shards("synthetic", root / name, synthetic_samples=samples, synthetic_classes=10,
                        synthetic_image_size=32, samples_per_shard=64, seed=seed, progress=False)  # fmt: skip
    return root


def overrides(data: Path, run_dir: Path, case: str, steps: int) -> list[str]:
    long = case.startswith("sigterm")  # long enough for the signal to land mid-run
    base = {
        "data.source": data / "train" if case != "bad-source" else data / "missing",
        "data.eval_source": data / "val", "data.batch_size": 8,
        "data.workers": 2 if case == "ok-workers" else 0,
        "trainer.run_dir": run_dir, "trainer.max_steps": 400 if long else steps,
        "trainer.checkpoint_every": 2, "trainer.eval_every": 2, "trainer.max_eval_batches": 2,
        "trainer.global_batch": 16, "trainer.tensorboard": case != "ok-notb", "trainer.progress": False,
        "trainer.log_every": 1, "trainer.ema_decay": 0.9, "trainer.async_save": True,
        "schedule.warmup_steps": 2,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in base.items()] + ["~synthetic_data", *TINY_MODEL]


def marked_processes(tag: str) -> list[int]:
    """Pids of live processes whose environment carries ``MARKER=tag`` (zombies excluded)."""
    found = []
    needle = f"{MARKER}={tag}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


def _worker_pid(tag: str, rank: int) -> int | None:
    for pid in marked_processes(tag):
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                env = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if env.get(b"RANK") == str(rank).encode() and b"TORCHELASTIC_RUN_ID" in env:
            return pid
    return None


def _wait_for(path: Path, pattern: str, process: subprocess.Popen, deadline: float) -> bool:
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and pattern in path.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


def run_case(case: str, index: int, data: Path, work: Path, *, steps: int = 4, timeout: float = 240,
             grace: float = 45, signal_after_step: int = 3,
             keep_logs: bool = False) -> RunResult:  # fmt: skip
    """One launch of ``case``; returns how it ended."""
    tag = uuid.uuid4().hex[:12]
    folder = work / f"{case}-{index:03d}-{tag}"
    folder.mkdir(parents=True)
    out_path, err_path = folder / "stdout.txt", folder / "stderr.txt"
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONFAULTHANDLER": "1",
           MARKER: tag, "PYTHONPATH": python_path}  # fmt: skip
    target = ["-m", "defocus_scale.train"]
    if case == "rank-error":
        entry = folder / "failing_entry.py"
        entry.write_text(FAILING_ENTRY)
        target = [str(entry)]
        env.update(STRESS_FAIL_RANK="1", STRESS_FAIL_AT="3")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *target, *overrides(data, folder / "run", case, steps)]  # fmt: skip
    start = time.monotonic()
    signalled_at: float | None = None
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
        hang = False
        try:
            if case.startswith("sigterm"):
                if _wait_for(err_path, f"train step {signal_after_step} ", process, start + timeout):
                    victim = process.pid if case == "sigterm-launcher" else _worker_pid(tag, 1)
                    if victim is not None:
                        signalled_at = time.monotonic()
                        os.kill(victim, signal.SIGTERM)
            limit = (signalled_at + grace) if signalled_at is not None else (start + timeout)
            process.wait(timeout=max(1.0, limit - time.monotonic()))
        except subprocess.TimeoutExpired:
            hang = True
    end = time.monotonic()
    leftovers = marked_processes(tag)
    for pid in leftovers:  # only this launch's processes carry the tag
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if hang:
        process.wait()
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    result = RunResult(case, index, process.returncode, round(end - start, 2), ok=False, hang=hang,
                       leftovers=len(leftovers))  # fmt: skip
    result.abort = bool(ABORT_PATTERNS.search(stderr))
    if result.abort and _launcher_only_abort(case, process.returncode, stderr):
        result.abort, result.launcher_abort = False, True
    result.killed = bool(KILLED_PATTERNS.search(stderr))
    result.worker_exitcodes = [int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", stderr)]
    if signalled_at is not None:
        result.seconds_after_signal = round(end - signalled_at, 2)
    result.ok, result.reason = _judge(case, result, stdout, stderr, signalled_at is not None, steps)
    if result.ok and result.launcher_abort:
        result.reason = "torchrun's own agent aborted at its exit (counted as launcher)"
    if not result.ok or result.launcher_abort or keep_logs:
        result.log = str(folder)
    else:
        _remove(folder)
    return result


def _launcher_only_abort(case: str, returncode: int | None, stderr: str) -> bool:
    """torchrun itself died of SIGABRT after its SignalException, and every rank had shut down cleanly."""
    if case != "sigterm-launcher" or returncode != -signal.SIGABRT or stderr.count("terminate called") != 1:
        return False
    after_agent = stderr.find("terminate called") > stderr.find("SignalException") >= 0
    return after_agent and all(f"rank {rank}: terminated by SIGTERM" in stderr for rank in (0, 1))


def _judge(
    case: str, r: RunResult, stdout: str, stderr: str, signalled: bool, steps: int
) -> tuple[bool, str]:
    if r.abort:
        match = ABORT_PATTERNS.search(stderr)
        return False, f"abort: {match.group(0) if match else '?'}"
    if r.hang:
        return False, "hang (killed after the time limit)"
    if r.leftovers:
        return False, f"{r.leftovers} process(es) left behind"
    if r.killed:
        return False, "a worker needed SIGKILL"
    if "clean-up did not finish" in stderr:
        return False, "the shutdown watchdog had to end a process"
    if case in OK_CASES:
        if r.returncode != 0:
            return False, f"exit status {r.returncode}"
        try:
            summary = json.loads(stdout[stdout.index("{") :])
        except ValueError:
            return False, "no summary printed"
        if summary.get("final_step") != steps:
            return False, f"final_step {summary.get('final_step')}"
        return True, ""
    if r.returncode in (0, None):
        return False, f"exit status {r.returncode} (a failure was expected)"
    if case == "bad-source" and "shard" not in stderr:
        return False, "the data error is not reported"
    if case == "rank-error" and "injected failure" not in stderr:
        return False, "the injected error is not reported"
    if case.startswith("sigterm"):
        if not signalled:
            return False, "the run ended before the signal could be sent"
        if any(code == -15 for code in r.worker_exitcodes):
            return False, "a worker died by the signal itself (no clean-up ran)"
        if "terminated by SIGTERM" not in stderr:
            return False, "no rank reported the termination (no clean-up ran)"
    return True, ""


def _remove(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


class Load:
    """``count`` busy-looping processes (CPU pressure) for the duration of a ``with`` block."""

    def __init__(self, count: int) -> None:
        self.count, self.processes = count, []

    def __enter__(self) -> Load:
        for _ in range(self.count):
            self.processes.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait()


def stress(cases: list[str], runs: int, load: int, data: Path, work: Path, *, steps: int = 4,
           timeout: float = 240, grace: float = 45, echo: bool = True,
           keep_logs: bool = False) -> list[RunResult]:  # fmt: skip
    results = []
    with Load(load):
        for index in range(runs):
            for case in cases:
                result = run_case(case, index, data, work, steps=steps, timeout=timeout, grace=grace,
                                  keep_logs=keep_logs)  # fmt: skip
                results.append(result)
                if echo:
                    status = f"BAD: {result.reason} (logs: {result.log})" if not result.ok else "ok"
                    if result.ok and result.reason:
                        status += f" -- {result.reason} (logs: {result.log})"
                    after = result.seconds_after_signal
                    after_text = f", {after}s after SIGTERM" if after is not None else ""
                    print(f"{case:>16} #{index}: rc={result.returncode} {result.seconds}s{after_text} "
                          f"{status}", flush=True)  # fmt: skip
    return results


def summarize(results: list[RunResult]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for case in dict.fromkeys(r.case for r in results):
        mine = [r for r in results if r.case == case]
        seconds = [r.seconds for r in mine]
        table[case] = {
            "runs": len(mine), "ok": sum(r.ok for r in mine), "aborts": sum(r.abort for r in mine),
            "launcher_aborts": sum(r.launcher_abort for r in mine),
            "hangs": sum(r.hang for r in mine), "leftovers": sum(r.leftovers > 0 for r in mine),
            "bad": sum(not r.ok for r in mine), "mean_s": round(sum(seconds) / len(seconds), 1),
            "max_s": max(seconds),
            "exit_status": sorted({r.returncode for r in mine}, key=lambda c: (c is None, c)),
        }  # fmt: skip
    return table


def format_table(table: dict[str, dict[str, Any]]) -> str:
    head = ("case", "runs", "ok", "aborts", "launcher", "hangs", "leftover", "mean s", "max s", "exit status")
    row_format = "{:>16} {:>5} {:>4} {:>6} {:>8} {:>5} {:>8} {:>7} {:>6}  {}"
    lines = [row_format.format(*head)]
    for case, row in table.items():
        cells = (case, row["runs"], row["ok"], row["aborts"], row["launcher_aborts"], row["hangs"],
                 row["leftovers"], row["mean_s"], row["max_s"], row["exit_status"])  # fmt: skip
        lines.append(row_format.format(*cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="launches of each case")
    parser.add_argument("--cases", default="ok,ok-notb", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--load", type=int, nargs="?", const=os.cpu_count() or 1, default=0,
                        help="busy-looping processes beside the runs (bare: one per core)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of the ok runs")
    parser.add_argument("--timeout", type=float, default=240, help="seconds before a launch counts as hung")
    parser.add_argument("--grace", type=float, default=45, help="seconds every process has after SIGTERM")
    parser.add_argument("--data", type=Path, help="shard folder to build or reuse (default: temporary)")
    parser.add_argument("--json", type=Path, help="write the runs and the summary here")
    parser.add_argument("--keep-logs", action="store_true", help="keep every launch's stdout/stderr")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    with tempfile.TemporaryDirectory(prefix="stress-shutdown-") as tmp:
        data = make_data(args.data or Path(tmp) / "data")
        work = Path(tempfile.mkdtemp(prefix="stress-shutdown-runs-"))  # kept: logs of the bad runs
        start = time.monotonic()
        results = stress(cases, args.runs, args.load, data, work, steps=args.steps, timeout=args.timeout,
                         grace=args.grace, keep_logs=args.keep_logs)  # fmt: skip
        elapsed = time.monotonic() - start
    table = summarize(results)
    print(format_table(table))
    bad = sum(not r.ok for r in results)
    print(f"{bad} bad of {len(results)} launches in {elapsed:.0f}s (load: {args.load} busy processes); "
          f"logs of bad runs under {work}")  # fmt: skip
    if not bad and not args.keep_logs:
        _remove(work)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "cases": cases, "runs": args.runs, "load": args.load, "steps": args.steps,
            "seconds": round(elapsed, 1), "summary": table, "launches": [asdict(r) for r in results],
        }  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
