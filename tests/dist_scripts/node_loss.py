"""A Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``: a head without CPUs and
two 1-CPU worker nodes), the real trainer on it (2 workers, one per node), and one worker node removed
(its raylet and workers killed) once training passes ``kill_step``. ``elastic``: the group continues on the
one node left, and a new node is added once it has run a few steps there, which Ray grows the group onto.
``fixed``: the group waits for a replacement node (added a few seconds later) and restarts on 2 workers.
While the elastic group waits to grow back, its steps are held (``slow_entry.paced_trainer``), so that
the outcome does not depend on the machine's speed.
Prints one JSON line: the summary, the restart records, the group's attempts and the kill/add times.

usage: node_loss.py elastic|fixed STORAGE TRAINER_CFG_JSON"""

import json
import os
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from slow_entry import paced_trainer

from defocus_scale.orchestration.config import LauncherConfig, OrchestrationConfig
from defocus_scale.orchestration.launch import launch
from defocus_scale.orchestration.recovery import FOLDER, PROGRESS, read_attempts
from defocus_scale.orchestration.storage import RunStorage
from defocus_scale.orchestration.trainer_adapter import newest_complete_checkpoint

mode, storage_path, cfg_path = sys.argv[1:4]
trainer_cfg = json.loads(open(cfg_path).read())
KILL_STEP = 6
# Stated with the figures: the GCS declares a node dead after 3 missed 1 s health checks (Ray's default
# is about 30 s), and Ray Train gives up on a worker group that cannot start after 15 s (default 60 s:
# right after a node loss the scheduler may still count the dead node's CPUs). The cluster's processes
# inherit this environment, as the controller does.
system_config = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                 "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}  # fmt: skip
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "15"
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": system_config,
                                                        "include_dashboard": False})  # fmt: skip
workers_nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)

elastic = mode == "elastic"
launcher = LauncherConfig(
    kind="ray", num_workers=2, min_workers=1 if elastic else None, max_workers=2 if elastic else None,
    max_failures=2, health_check_interval_s=0.5, elastic_resize_interval_s=3.0,
)  # fmt: skip
orchestration = OrchestrationConfig(launcher=launcher, storage_path=storage_path, run_name="run")
run_storage = RunStorage(orchestration.run_dir)
hold = Path(orchestration.run_dir) / "hold"  # see slow_entry.paced_trainer
events: dict = {}


def progress() -> dict:
    try:
        return run_storage.read_json(FOLDER, PROGRESS, default={}) or {}
    except Exception:  # noqa: BLE001 -- being rewritten
        return {}


def chaos() -> None:
    while progress().get("step", 0) < KILL_STEP and "error" not in outcome:
        time.sleep(0.1)
    if "error" in outcome:
        return
    events["killed_at_step"], events["killed_at"] = progress()["step"], time.time()
    cluster.remove_node(workers_nodes[1], allow_graceful=False)
    if elastic:  # wait until the group runs on one worker, then give it a node back
        now = progress()
        while not (now.get("world_size") == 1 and now.get("step", 0) >= events["killed_at_step"]):
            time.sleep(0.1)
            now = progress()
        events["one_worker_at_step"] = progress()["step"]
        hold.touch()  # the one-worker group waits here until it has grown back (however slow the machine)
    else:
        time.sleep(5)
    events["node_added_at"] = time.time()
    cluster.add_node(num_cpus=1)
    if elastic:
        deadline = time.time() + 110
        while progress().get("world_size") != 2 and time.time() < deadline:
            time.sleep(0.1)
        hold.unlink()


outcome: dict = {}


def consumed_counts(run_dir: str) -> dict[str, int]:
    """How often each sample was consumed, from the audit log of the newest checkpoint."""
    from collections import Counter

    newest = newest_complete_checkpoint(RunStorage(run_dir))
    return dict(Counter(RunStorage(run_dir).read_json(newest, "trainer_state.json")["consumed_keys"]))


def train() -> None:
    try:
        outcome["result"] = launch(orchestration, trainer_cfg, entry=paced_trainer)
    except Exception as exc:  # noqa: BLE001 -- reported by the JSON line
        outcome["error"] = f"{type(exc).__name__}: {exc}"


training = threading.Thread(target=train, daemon=True)
training.start()
chaos()  # in the main thread: Ray's node start-up installs signal handlers
training.join()
if "error" in outcome:
    print(json.dumps({"error": outcome["error"]}), flush=True)
    sys.exit(1)
result = outcome["result"]
print(json.dumps({
    "summary": {k: result.summary.get(k) for k in ("final_step", "world_size", "global_batch")},
    "restarts": [asdict(r) for r in result.restarts],
    "attempts": [asdict(a) for a in read_attempts(orchestration.run_dir)],
    "events": events, "wall_s": result.wall_s,
    "consumed": consumed_counts(orchestration.run_dir),
}), flush=True)
ray.shutdown()
cluster.shutdown()
