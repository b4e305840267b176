"""A driver launching ``slow_entry`` on 2 workers (``ray`` or ``torchrun``, argv[1]) into argv[2]; the test
SIGKILLs this process and times how long the workers outlive it."""

import sys

from slow_entry import slow_entry

from defocus_scale.orchestration.config import ClusterConfig, LauncherConfig, OrchestrationConfig
from defocus_scale.orchestration.launch import launch

kind, storage = sys.argv[1], sys.argv[2]
orchestration = OrchestrationConfig(
    launcher=LauncherConfig(kind=kind, num_workers=2, max_failures=0, health_check_interval_s=0.5),
    cluster=ClusterConfig(num_cpus=2, object_store_memory=80 * 2**20),
    storage_path=storage,
    run_name="run",
)
launch(orchestration, {"trainer": {"run_dir": f"{storage}/run"}}, entry=slow_entry)
