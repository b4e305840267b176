"""``torchrun --nproc_per_node N -m defocus_scale.evaluate MODEL DATA [options]``: the ``eval`` command in the
process group torchrun sets up (without ``--launcher``)."""

import sys

from defocus_scale.evaluate.cli import main

sys.exit(main())
