"""Image data as WebDataset shards: the shard writer, the exactly-once elastic stream, the DeiT
augmentation pipeline and the built-in synthetic data.

* ``defocus_scale.data.make_shards.make_shards(source, out_dir, ...)`` and
  ``defocus-scale make-shards SRC OUT``: ImageFolder, Parquet (Hugging Face layout) or ``"synthetic"``
  into tar shards plus ``manifest.parquet`` and ``classes.json``.
* ``open_stream(source, rank=, world_size=, seed=)``: samples of one rank; ``state_dict()`` /
  ``load_state_dict(states_of_all_old_ranks)`` keep every sample exactly once per epoch across restarts
  and world-size changes.
* ``build_train_loader`` / ``build_eval_loader``: augmented batches from DataLoader workers, same guarantee.
"""

from defocus_scale.data.config import DataConfig
from defocus_scale.data.loader import build_eval_loader, build_train_loader
from defocus_scale.data.manifest import read_classes, read_manifest
from defocus_scale.data.stream import open_stream
from defocus_scale.data.synthetic import synthetic_batch, synthetic_image

__all__ = [
    "DataConfig",
    "build_eval_loader",
    "build_train_loader",
    "open_stream",
    "read_classes",
    "read_manifest",
    "synthetic_batch",
    "synthetic_image",
]
