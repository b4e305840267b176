"""benchmarks/gpu_checks.sh, the one-call GPU validation, checked where it can be without a GPU: it
installs the project into a scratch folder without a registry, the installed package imports whole, an
unknown step is reported and the run goes on, even with no time budget left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_checks_installs_the_project_and_keeps_to_its_budget(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GPU_CHECKS_BUDGET_S": "0"}  # fmt: skip
    result = subprocess.run(["bash", "benchmarks/gpu_checks.sh", str(tmp_path / "out"), "env", "bogus"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    env_txt = (tmp_path / "out" / "env.txt").read_text()
    assert "project defocus_scale.orchestration" in env_txt and "torch 2." in env_txt
    assert "unknown step bogus" in result.stdout and "=== done" in result.stdout
