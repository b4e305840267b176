"""How trainer processes end: the SIGTERM/SIGINT guard of the torchrun entry (in process, fast), a SIGTERM to
one rank of a 2-rank run (every process exits promptly and cleanly), and, slow, the shutdown stress of
``benchmarks/stress_shutdown.py`` beside CPU-heavy processes: zero aborts at exit."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from defocus_scale.train.cli import ShutdownGuard, Terminated

REPO = Path(__file__).resolve().parents[1]


def _stress_module():
    path = REPO / "benchmarks" / "stress_shutdown.py"
    spec = importlib.util.spec_from_file_location("stress_shutdown", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_sigterm_raises_terminated_once_in_the_main_thread() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with ShutdownGuard(grace=30) as guard:
        with pytest.raises(Terminated) as raised:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted: the handler raises at once
        assert raised.value.exit_status == 143 and guard.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated signal is only recorded
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) is before


def test_signal_during_exception_handling_is_raised_afterwards() -> None:
    """A signal landing in an ``except`` block does not cut that handling short; it is raised after it."""
    with ShutdownGuard(grace=30):
        with pytest.raises(Terminated):
            try:
                raise ValueError("being handled")
            except ValueError:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # bytecode runs: the handler is called here, and must not raise
                    pass
                handled = True
            assert handled
            time.sleep(5)  # the watchdog resends the signal within 0.25 s


def test_watchdog_ends_a_process_whose_cleanup_hangs(monkeypatch: pytest.MonkeyPatch,
                                                     capfd: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """The main thread never gets to raise (stuck, as in a collective with a peer that never comes): the
    watchdog ends the process with 128 + signal once the grace period is over."""
    exits: list[int] = []
    exited = threading.Event()

    def fake_exit(status: int) -> None:  # the watchdog thread's os._exit
        exits.append(status)
        exited.set()

    monkeypatch.setattr(os, "_exit", fake_exit)
    with ShutdownGuard(grace=0.5) as guard:
        guard.stop_raising()  # as if the handler could not run: only the watchdog acts
        os.kill(os.getpid(), signal.SIGTERM)
        assert exited.wait(20), "the watchdog did not act"
    assert exits == [143]
    assert "clean-up did not finish within 0.5 s; exiting with status 143" in capfd.readouterr().err


def test_forked_children_get_their_own_sigterm() -> None:
    """A DataLoader worker (forked) must die of SIGTERM, not raise the parent's Terminated or wake the
    parent's watchdog."""
    # The child gets back the handler the guard replaced; make that the default one (a Ray driver earlier
    # in this pytest process installs a SIGTERM handler that calls sys.exit(15)).
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        _fork_and_terminate_under_a_guard()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fork_and_terminate_under_a_guard() -> None:
    with ShutdownGuard(grace=1) as guard:
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        worker.start()
        time.sleep(0.5)
        worker.terminate()
        worker.join(10)
        time.sleep(1.5)  # past the grace period: the parent's watchdog must not have fired
        assert worker.exitcode == -signal.SIGTERM
        assert guard.signum is None


def test_abandoned_checkpointer_still_commits_a_finished_save(world_of_one, tmp_path: Path) -> None:
    import torch
    import torch.distributed as dist

    from defocus_scale.train.checkpoint import Checkpointer, CheckpointStore, TrainState

    model = torch.nn.Linear(4, 2)
    state = TrainState(model, torch.optim.AdamW(model.parameters()), None)
    store = CheckpointStore(str(tmp_path))
    checkpointer = Checkpointer(store, keep_last=2, async_save=True, rank=0)
    checkpointer.save(3, state, {"step": 3})
    checkpointer.close(abandon=True)  # no barrier: fine with peers gone; the save had time to finish
    assert checkpointer.last_committed == 3 and store.newest_complete() == (3, [])
    assert not [t for t in threading.enumerate() if t.name.startswith("AsyncCheckpointExecutor")]
    checkpointer.close(abandon=True)  # a second call does nothing
    checkpointer.close()
    assert dist.is_initialized()  # only its own group went


def test_wait_with_timeout_leaves_an_unfinished_save_pending() -> None:
    from concurrent.futures import Future

    from defocus_scale.train.checkpoint import Checkpointer, _PendingSave

    checkpointer = Checkpointer.__new__(Checkpointer)  # no process group needed for this part
    checkpointer._staging, checkpointer._group = None, None

    class Stager:
        closed = False

        def close(self) -> None:
            Stager.closed = True

    checkpointer._stager = Stager()
    checkpointer._pending = _PendingSave(7, Future())
    with pytest.raises(TimeoutError):
        checkpointer.wait(timeout=0.05)
    assert checkpointer._pending is not None and not Stager.closed
    checkpointer.close(abandon=True, timeout=0.05)  # gives up on it without raising
    assert checkpointer._pending is None
    assert not Stager.closed  # the abandoned write may still be reading the stager's buffers


def test_metrics_writer_close_is_idempotent_and_closes_tensorboard(tmp_path: Path) -> None:
    from defocus_scale.train.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path), first_step=0, tensorboard=True, console=None, log_every=1)
    writer.log(1, {"loss": 1.0})
    writer.close()
    writer.close()
    assert list((tmp_path / "metrics" / "train").glob("*.parquet"))
    assert not [t for t in threading.enumerate() if "Writer" in type(t).__name__ and t.is_alive()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _stress_module().make_data(tmp_path_factory.mktemp("shutdown-data"))


@pytest.mark.distributed
def test_sigterm_to_one_rank_ends_every_process_cleanly(shards: Path, tmp_path: Path) -> None:
    """SIGTERM to rank 1 after its 3rd step: it cleans up and exits 143, rank 0 follows (its peer is gone,
    then torchrun stops it), nothing is left behind, nothing aborts, within seconds of the signal."""
    stress = _stress_module()
    result = stress.run_case("sigterm-worker", 0, shards, tmp_path, grace=45, keep_logs=True)
    log = Path(result.log) / "stderr.txt"
    assert result.ok, f"{result.reason}\n{log.read_text()[-20000:]}"
    assert 143 in result.worker_exitcodes, result.worker_exitcodes
    assert result.seconds_after_signal is not None and result.seconds_after_signal < 30


@pytest.mark.slow
@pytest.mark.distributed
def test_no_abort_at_exit_under_load(shards: Path, tmp_path: Path) -> None:
    """The 2-rank trainer, repeatedly, beside one busy process per core, on every exit path."""
    stress = _stress_module()
    cases = ["ok", "ok-notb", "ok-workers", "bad-source", "rank-error", "sigterm-launcher", "sigterm-worker"]
    results = stress.stress(cases, 2, os.cpu_count() or 2, shards, tmp_path, timeout=400, echo=False)
    table = stress.summarize(results)
    print(stress.format_table(table))
    bad = [f"{r.case} #{r.index}: {r.reason} ({r.log})" for r in results if not r.ok]
    assert sum(row["aborts"] for row in table.values()) == 0, bad
    assert not bad, bad


def test_driver_watchdog_only_where_the_drivers_pid_means_the_same_process() -> None:
    """A worker watches the driver's pid only in the driver's own host and pid namespace (containers on one
    host can share a host name, and there the pid would name another process or none)."""
    from defocus_scale.orchestration.worker import process_namespace, watch_driver

    here = process_namespace()
    assert watch_driver(None) is None and watch_driver((here, os.getpid())) is None  # itself: nothing to do
    assert watch_driver((f"{here.split('/', 1)[0]}/another-boot/1", os.getppid())) is None
    watchdog = watch_driver((here, os.getppid()), interval_s=0.05)  # the live parent: watched, never fires
    assert watchdog is not None and watchdog.daemon
    time.sleep(0.2)
    assert watchdog.is_alive()
