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
    """The orchestration's hooks, with a pause after every step, longer while ``hold`` exists (up to 2
    minutes): a test holds the run at a step until the cluster has changed as it wants."""

    def __init__(self, hooks, pause_s: float, hold: str) -> None:
        self.hooks, self.pause_s, self.hold = hooks, pause_s, hold

    def on_resume(self, step: int, checkpoint: str | None) -> None:
        self.hooks.on_resume(step, checkpoint)

    def on_step_end(self, step: int) -> None:
        self.hooks.on_step_end(step)
        time.sleep(self.pause_s)
        deadline = time.monotonic() + 120
        while os.path.exists(self.hold) and time.monotonic() < deadline:
            time.sleep(0.1)


def paced_trainer(cfg: dict, hooks) -> dict:
    """The real trainer entry, each step followed by a 0.3 s pause (and held while RUN_DIR/hold exists)."""
    from defocus_scale.train import train_in_process_group

    hold = os.path.join(cfg["trainer"]["run_dir"], "hold")
    return train_in_process_group(cfg, _PacedHooks(hooks, 0.3, hold))
