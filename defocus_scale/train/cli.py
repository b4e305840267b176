"""The plain in-process trainer entry (``torchrun -m defocus_scale.train KEY=VALUE...``) and ``defocus-scale
export CKPT OUT.safetensors [--ema]``. ``defocus-scale train`` launches through the orchestration
(``defocus_scale.orchestration.cli``), whose workers run the same trainer.

How a trainer process ends, on every path:

* success: rank 0 prints the summary; all ranks meet at a barrier (every collective of every group is
  done), destroy the process groups, free what is left of the run (DataLoader iterators, the sharded
  model) and join the Python threads; exit status 0;
* error: the rank prints one ``rank R: training failed: ...`` line and the traceback (one
  ``rank R: training stopped: ...`` message and no traceback for what a user can cause: a bad config,
  checkpoint or shard, a full disk, non-finite steps), destroys its
  process groups without waiting for the other ranks (they may be dead or elsewhere) and exits with 1;
  ranks that merely lost a failed peer say so in one line; a watchdog bounds the clean-up as below;
* SIGTERM / SIGINT (torchrun forwards them; a scheduler's preemption): raised once in the main thread as
  :class:`Terminated`, so ``finally`` blocks run (the loop abandons a pending checkpoint, which stays
  uncommitted and is skipped on resume); exit status 128 + signal (143 for SIGTERM). A watchdog ends
  the process if clean-up has not finished ``TERMINATION_GRACE_S`` after the signal (a main thread stuck
  in a collective with a peer that never comes), before torchrun's SIGKILL 30 s later.

Every path then ends with ``os._exit``, after flushing stdio and logging: the interpreter's finalization
and the C++ static destructors never run. They are where a finished trainer used to abort (``terminate
called without an active exception``): torch keeps the default gloo group's C++ object -- and its three
threads -- alive past ``destroy_process_group()`` (DTensor's caches hold the DeviceMesh, which holds the
group), so they were still running while CPython tore itself down; a native thread that touches the
interpreter then is ended by ``pthread_exit``, whose forced unwinding through a ``noexcept`` C++ frame
calls ``std::terminate``. No public API stops those threads (``shutdown()``/``abort()`` leave them
running), so nothing may be torn down concurrently with them: we do our own ordered shutdown, then leave.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType

import torch.distributed as dist
from rich.console import Console
from rich.markup import escape

from defocus_scale.train.config import ConfigError, TrainConfig, load_train_config

logger = logging.getLogger(__name__)

TERMINATION_GRACE_S = 20.0  # after SIGTERM/SIGINT or an error; torchrun sends SIGKILL 30 s after SIGTERM
THREAD_JOIN_S = 10.0  # for the Python threads left at the end (a checkpoint writer finishing its callbacks)
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Errors a rank gets when another rank died and its connections closed: reported in one line.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout")


_SIGNAL_REPEATS = 20  # a signal that arrived while an exception was handled is resent, every 0.25 s
_guards: list[ShutdownGuard] = []  # the active one, for the fork hook
_fork_hook: list[bool] = []


def _reset_in_forked_children() -> None:
    if not _fork_hook:  # once per process: os.register_at_fork has no way back
        _fork_hook.append(True)
        os.register_at_fork(after_in_child=lambda: [guard._forget_in_child() for guard in list(_guards)])


class Terminated(BaseException):
    """SIGTERM/SIGINT, raised in the main thread. A BaseException (like KeyboardInterrupt), so that clean-up
    code's ``except Exception`` lets it through."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class ShutdownGuard:
    """SIGTERM/SIGINT handling for the trainer's main thread, and a watchdog that bounds the clean-up.

    The first signal raises :class:`Terminated` in the main thread -- unless an exception is already being
    handled there (the process is shutting down anyway; raising would cut that clean-up short). Further
    signals are ignored. The watchdog thread is woken by Python's signal wakeup fd, so it sees a signal
    even while the main thread is blocked in C++ (a collective waiting for a peer): ``grace`` seconds after
    the first signal, or after :meth:`arm`, it ends the process if it is still running."""

    def __init__(self, grace: float = TERMINATION_GRACE_S) -> None:
        self.grace = grace
        self.signum: int | None = None
        self.raising = True
        self._status = 1
        self._active = False
        self._previous_handlers: dict[int, object] = {}
        self._previous_wakeup = -1
        self._fds: list[int] = []
        self._watchdog: threading.Thread | None = None
        self._main_thread = threading.main_thread().ident

    def __enter__(self) -> ShutdownGuard:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers belong to the main thread; the caller handles signals
        self._wake_r, self._wake_w = os.pipe()
        self._control_r, self._control_w = os.pipe()
        self._fds = [self._wake_r, self._wake_w, self._control_r, self._control_w]
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        for signum in EXIT_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        self._previous_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        # A daemon thread: it must never keep the process alive; every path ends it (exit or os._exit).
        self._watchdog = threading.Thread(target=self._watch, name="defocus-shutdown-watchdog", daemon=True)
        self._watchdog.start()
        self._active = True
        _guards.append(self)
        _reset_in_forked_children()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._active:
            return
        self._restore()
        os.write(self._control_w, b"s")
        if self._watchdog is not None:
            self._watchdog.join()
        for fd in self._fds:
            os.close(fd)

    def _restore(self) -> None:
        self._active = False
        if self in _guards:
            _guards.remove(self)
        signal.set_wakeup_fd(self._previous_wakeup)
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _forget_in_child(self) -> None:
        """In a forked child (a DataLoader worker): the parent's handlers and wakeup pipe are not its own --
        its SIGTERM must neither raise here nor wake the parent's watchdog."""
        self._restore()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def stop_raising(self) -> None:
        """From now on signals are only recorded: the caller is shutting down already."""
        self.raising = False

    def arm(self, status: int) -> None:
        """Start the grace period now (an error is being cleaned up): past it the process exits ``status``."""
        self._status = status
        if self._active:
            os.write(self._control_w, b"a")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        # Raised once, and not while an exception is being handled (the watchdog signals again shortly).
        if self.raising and sys.exc_info()[1] is None:
            self.raising = False
            raise Terminated(self.signum)

    def _watch(self) -> None:
        deadline: float | None = None
        signalled: int | None = None  # seen on the wakeup pipe, maybe before the main thread's handler ran
        repeats = 0
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            deferred = self.signum is not None and self.raising and repeats < _SIGNAL_REPEATS
            if deferred:
                timeout = 0.25 if timeout is None else min(timeout, 0.25)
            ready, _, _ = select.select([self._wake_r, self._control_r], [], [], timeout)
            if not ready:
                if deadline is not None and time.monotonic() >= deadline:
                    break  # the grace period is over
                if deferred:
                    repeats += 1
                    signal.pthread_kill(self._main_thread, self.signum)  # type: ignore[arg-type]
                continue
            if self._control_r in ready:
                command = os.read(self._control_r, 64)
                if b"s" in command:
                    return
                if b"a" in command and deadline is None:
                    deadline = time.monotonic() + self.grace
            if self._wake_r in ready:
                try:
                    woken_by = os.read(self._wake_r, 512)
                except BlockingIOError:
                    woken_by = b""
                for byte in woken_by:
                    if byte in EXIT_SIGNALS and signalled is None:
                        signalled = byte
                        deadline = time.monotonic() + self.grace if deadline is None else deadline
        signum = self.signum if self.signum is not None else signalled
        status = 128 + signum if signum is not None else self._status
        _write_stderr(
            f"rank {_rank()}: clean-up did not finish within {self.grace:g} s; exiting with status {status}"
        )
        os._exit(status)


def run_from_overrides(overrides: list[str], *, exit_process: bool = True) -> int:
    """Compose ``configs/train.yaml`` with ``overrides`` and train in this process's group (torchrun's, or a
    world of one). Returns the exit status -- or, with ``exit_process`` (the torchrun entry), ends the
    process with it once everything is shut down (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=True)
    try:
        cfg = load_train_config(overrides)
    except ConfigError as exc:
        console.print(f"[red]config error:[/] {exc}")
        return 2
    status = run_guarded(lambda: _train(cfg, console), console)
    if exit_process:
        exit_now(status)
    return status


def _train(cfg: TrainConfig, console: Console) -> None:
    from defocus_scale.train.loop import train

    summary = train(cfg, console=console)
    if dist.get_rank() == 0:
        print(json.dumps(summary, indent=2, default=str), flush=True)


def run_guarded(body: Callable[[], object], console: Console) -> int:
    """Run ``body`` -- a trainer process's work in its process group -- under a :class:`ShutdownGuard`, then
    shut down in order (see the module docstring); returns the exit status for :func:`exit_now`. Used by
    this entry and by the orchestration's torchrun workers."""
    with ShutdownGuard() as guard:
        status = _run_body(body, console, guard)
        _finish_process(completed=status == 0)
    return status


def _run_body(body: Callable[[], object], console: Console, guard: ShutdownGuard) -> int:
    status = 0
    try:
        body()
        # Every rank is past its last collective before any group goes: gloo aborts a process whose peer
        # tears a group down while it is still in use.
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    except Terminated as exc:
        guard.stop_raising()
        guard.arm(exc.exit_status)
        console.print(f"rank {_rank()}: {exc}; shutting down", soft_wrap=True)
        status = exc.exit_status
    except Exception as exc:  # noqa: BLE001 -- reported here, once, then the process ends
        guard.stop_raising()
        status = 128 + guard.signum if guard.signum is not None else 1
        guard.arm(status)
        _report_failure(console, exc, guard.signum)
    finally:
        guard.stop_raising()
        _destroy_process_groups()
    return status


def _report_failure(console: Console, exc: BaseException, signum: int | None) -> None:
    """One line naming the failure (plus the traceback when it is this rank's own)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    first_line = escape(text.splitlines()[0])
    if signum is not None:  # a signal came while the error was being handled: torchrun stopping the rank
        console.print(f"rank {_rank()}: terminated by {signal.Signals(signum).name} while failing with: "
                      f"{first_line}", soft_wrap=True)  # fmt: skip
    elif any(marker in text for marker in _PEER_LOST):
        console.print(f"rank {_rank()}: stopped: lost the connection to another rank, which probably "
                      f"failed (see its message): {first_line}", soft_wrap=True)  # fmt: skip
    elif caused_by_the_user(exc):  # its message names the thing and what to do; a traceback would bury it
        console.print(f"[red]rank {_rank()}: training stopped:[/] {escape(text)}", soft_wrap=True)
    else:
        console.print(f"[red]rank {_rank()}: training failed:[/] {first_line}", soft_wrap=True)
        traceback.print_exception(exc, file=sys.stderr)


def worth_a_restart(exc: BaseException) -> bool:
    """Whether a launcher should restart the workers after ``exc``: an error's own ``retryable`` decides;
    else not for what the user must fix (config, missing input, damaged checkpoint, full disk), which a
    restart would only meet again -- except a shard read failure, which a storage outage can cause."""
    from defocus_scale.data.stream import ShardReadError

    explicit = getattr(exc, "retryable", None)
    if explicit is not None:
        return bool(explicit)
    return isinstance(exc, ShardReadError) or not caused_by_the_user(exc)


def caused_by_the_user(exc: BaseException) -> bool:
    """Errors a user's config, data, checkpoint or disk causes: reported as their message alone, and not
    worth a restart (the orchestration's workers end the launch on them)."""
    import errno

    from defocus_scale.data.stream import ShardReadError
    from defocus_scale.train.checkpoint import CheckpointError
    from defocus_scale.train.nonfinite import NonFiniteTrainingError

    if isinstance(exc, ConfigError | CheckpointError | ShardReadError | NonFiniteTrainingError):
        return True
    if isinstance(exc, FileNotFoundError):  # raised with a message naming the path (errno unset)
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOSPC, errno.EDQUOT)


def _destroy_process_groups() -> None:
    """Destroy every process group (the default one and any a failed run left behind) -- local work only,
    no collective, so it is as safe on the error paths as on success."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- shutting down; say so and go on
        logger.warning("destroying the process groups failed", exc_info=True)


def _finish_process(completed: bool) -> None:
    """What the interpreter's exit would do that matters, done now and in order. After a completed run:
    free its objects (DataLoader iterators join their workers, DCP and FSDP state goes) and join the
    Python threads (a checkpoint writer finishing its callbacks), bounded. On every path: reap child
    processes (DataLoader workers of an iterator never closed). A failed run frees and joins nothing: a
    thread or destructor may be waiting for a peer that is gone, and nothing is left to save."""
    deadline = time.monotonic() + THREAD_JOIN_S
    if completed:
        gc.collect()
        for thread in threading.enumerate():
            if thread is threading.current_thread() or thread.daemon:
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("thread %r is still running at exit", thread.name)
    for child in multiprocessing.active_children():
        child.terminate()
        child.join(max(0.1, deadline - time.monotonic()))


def exit_now(status: int) -> None:
    """End the process with ``status`` without interpreter finalization (see the module docstring)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(status)


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def _write_stderr(message: str) -> None:
    try:
        os.write(2, (message + "\n").encode())
    except OSError:
        pass


def register(subparsers: argparse._SubParsersAction) -> None:
    export_parser = subparsers.add_parser(
        "export", help="write a checkpoint's weights as one safetensors file for inference",
        description="CKPT is a checkpoint folder (RUN/checkpoints/step_N) or a run directory (its newest "
        "complete checkpoint). Load the result with defocus_scale.train.load_exported.",
    )  # fmt: skip
    export_parser.add_argument("checkpoint", metavar="CKPT")
    export_parser.add_argument("out", metavar="OUT.safetensors")
    export_parser.add_argument(
        "--ema", action="store_true", help="export the EMA weights instead of the live ones"
    )
    export_parser.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from defocus_scale.train.checkpoint import CheckpointError
    from defocus_scale.train.export import export_checkpoint

    try:
        metadata = export_checkpoint(args.checkpoint, args.out, ema=args.ema)
    except (CheckpointError, FileNotFoundError) as exc:
        Console(stderr=True).print(f"[red]export failed:[/] {exc}")
        return 1
    print(f"wrote {args.out}: {metadata['model']} ({metadata['weights']} weights, step {metadata['step']})")
    return 0
