"""``torchrun --nproc_per_node N -m defocus_scale.train model=... trainer.max_steps=...``"""

from __future__ import annotations

import sys

from defocus_scale.train.cli import run_from_overrides

if __name__ == "__main__":
    sys.exit(run_from_overrides(sys.argv[1:]))
