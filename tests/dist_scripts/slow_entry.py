"""Trainer entries for the orchestration tests: `slow_entry` runs slow steps for minutes and notes its
pid (the dead-driver test); `paced_trainer` is the real trainer with a pause after each step (node loss)."""

import os
import time


def slow_entry(cfg: dict, hooks) -> dict:
    folder = os.path.join(cfg["trainer"]["run_dir"], "pids")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, str(os.getpid())), "w") as handle:
        handle.write("started")
    hooks.on_resume(0, None)
    for step in range(1, 1200):
        time.sleep(0.25)
        hooks.on_step_end(step)
    return {"steps": 1200}


class _PacedHooks:
    """The orchestration's hooks, with a pause after every step (so that a test can act mid-run)."""

    def __init__(self, hooks, pause_s: float) -> None:
        self.hooks, self.pause_s = hooks, pause_s

    def on_resume(self, step: int, checkpoint: str | None) -> None:
        self.hooks.on_resume(step, checkpoint)

    def on_step_end(self, step: int) -> None:
        self.hooks.on_step_end(step)
        time.sleep(self.pause_s)


def paced_trainer(cfg: dict, hooks) -> dict:
    """The real trainer entry, each step followed by a 0.3 s pause."""
    from defocus_scale.train import train_in_process_group

    return train_in_process_group(cfg, _PacedHooks(hooks, 0.3))
