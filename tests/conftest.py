"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest

import defocus_scale  # noqa: F401  (first, before torch: it caps OpenMP's spin, see its module)


@pytest.fixture
def world_of_one():
    """A gloo process group of this process alone (torchrun's variables are not needed)."""
    import torch.distributed as dist

    from defocus_scale.train.parallel import _free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
