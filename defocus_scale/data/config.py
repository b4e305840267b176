"""Typed configuration of the input pipeline (read by the trainer from Hydra YAML)."""

from __future__ import annotations

from dataclasses import dataclass

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


@dataclass
class DataConfig:
    """Shard sources, batching, and the DeiT augmentation recipe (defaults follow DeiT-B)."""

    # A shard directory with manifest.parquet, a manifest path, a brace pattern, or a URL (see open_stream).
    source: str
    num_classes: int
    eval_source: str | None = None
    image_size: int = 224
    batch_size: int = 64  # per rank
    eval_batch_size: int | None = None  # None: same as batch_size
    workers: int = 4
    prefetch_factor: int = 2
    drop_last: bool = True  # drops each rank's final partial batch (< batch_size samples) per epoch
    shuffle: bool = True
    shuffle_buffer: int = 1000  # raw samples per reader (each DataLoader worker has its own)
    # Slices of shards each worker's epoch share is cut into, from places spread over the epoch, and read
    # interleaved at once: a batch then draws from this many shards even when workers outnumber shards.
    open_shards: int = 8
    max_bad_fraction: float = 0.05  # fraction of shards allowed to be missing or corrupt before failing
    read_retries: int = 3  # a failed shard read is retried this many times, resuming at its sample
    retry_backoff_s: float = 0.5  # first retry's wait; it doubles with each retry
    # Augmentation (timm.data.create_transform).
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4  # timm ignores it when auto_augment is set, as in DeiT
    interpolation: str = "bicubic"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    eval_crop_pct: float = 0.875
    # Repeated augmentation (DeiT's RASampler): each source sample gives this many differently augmented
    # views, in different batches; an epoch is 1 / repeated_aug of a pass over the data (as many views as
    # the dataset has samples), so epoch-based schedules mean what they say. Exactly once per view.
    repeated_aug: int = 1
    # Mixup / CutMix (timm.data.Mixup); label smoothing is applied inside it.
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.image_size < 1 or self.workers < 0 or self.repeated_aug < 1:
            raise ValueError(
                "DataConfig: batch_size, image_size and repeated_aug must be >= 1 and workers >= 0, got "
                f"batch_size={self.batch_size}, image_size={self.image_size}, "
                f"repeated_aug={self.repeated_aug}, workers={self.workers}"
            )
        if self.repeated_aug > 16 or self.read_retries < 0 or self.retry_backoff_s < 0:
            raise ValueError(
                "DataConfig: repeated_aug must be <= 16, read_retries and retry_backoff_s >= 0, got "
                f"{self.repeated_aug}, {self.read_retries}, {self.retry_backoff_s}"
            )
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"DataConfig.max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}")

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0
