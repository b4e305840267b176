"""Image data as WebDataset shards: the shard writer, the exactly-once elastic stream, the DeiT
augmentation pipeline and the built-in synthetic data.

* ``defocus_scale.data.make_shards.make_shards(source, out_dir, ...)`` and
  ``defocus-scale make-shards SRC OUT``: ImageFolder, Parquet (Hugging Face layout) or ``"synthetic"``
  into tar shards plus ``manifest.parquet`` and ``classes.json``.
* ``open_stream(source, rank=, world_size=, seed=)``: samples of one rank; ``state_dict()`` /
  ``load_state_dict(states_of_all_old_ranks)`` keep every sample exactly once per epoch across restarts
  and world-size changes.
* ``build_train_loader`` / ``build_eval_loader``: augmented batches from DataLoader workers, same guarantee;
  workers ship uint8, the batch is normalised (and erased, mixed) on the loader's ``device``.
* ``to_model_input(uint8 images, device, mean, std)``: that normalisation, for batches from elsewhere.
"""

from defocus_scale.data.config import DataConfig
from defocus_scale.data.loader import build_eval_loader, build_train_loader
from defocus_scale.data.manifest import read_classes, read_manifest
from defocus_scale.data.stream import open_stream
from defocus_scale.data.synthetic import synthetic_batch, synthetic_image
from defocus_scale.data.transforms import BatchFinisher, to_model_input

__all__ = [
    "BatchFinisher",
    "DataConfig",
    "build_eval_loader",
    "build_train_loader",
    "open_stream",
    "read_classes",
    "read_manifest",
    "synthetic_batch",
    "synthetic_image",
    "to_model_input",
]
