"""The shard writer: round trips (ImageFolder, Parquet, synthetic), bad input, bounds, atomic writes, CLI."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from defocus_scale.cli import main
from defocus_scale.data import make_shards as make_shards_module
from defocus_scale.data.make_shards import make_shards, read_classes, read_manifest
from defocus_scale.data.synthetic import synthetic_image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HYMENOPTERA_TRAIN = SHARED_DATA / "hymenoptera" / "train"
MNIST_PARQUET = SHARED_DATA / "mnist-test.parquet"
CIFAR_TRAIN = SHARED_DATA / "cifar10-subset" / "train"


def read_shards(out_dir: Path) -> dict[str, dict[str, bytes]]:
    """``{key: {extension: bytes}}`` over all shards of the manifest, checking that keys are unique."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in read_manifest(out_dir).column("shard").to_pylist():
        with tarfile.open(out_dir / shard) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                sample = samples.setdefault(key, {})
                assert extension not in sample, f"duplicate member {member.name}"
                sample[extension] = tar.extractfile(member).read()
    return samples


def check_manifest_matches_shards(out_dir: Path) -> None:
    manifest = read_manifest(out_dir).to_pylist()
    for row in manifest:
        path = out_dir / row["shard"]
        assert path.stat().st_size == row["bytes"]
        with tarfile.open(path) as tar:
            labels = [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
        assert len(labels) == row["samples"]
        assert [labels.count(c) for c in range(len(row["class_counts"]))] == row["class_counts"]
    assert sorted(p.name for p in out_dir.glob("*.tar")) == [row["shard"] for row in manifest]
    assert not list(out_dir.glob(".*tmp")), "temporary files left behind"


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# ---------------------------------------------------------------- ImageFolder


@pytest.fixture(scope="module")
def hymenoptera_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    if not HYMENOPTERA_TRAIN.is_dir():
        pytest.skip("../shared/data/hymenoptera is absent")
    out_dir = tmp_path_factory.mktemp("hymenoptera")
    return out_dir, make_shards(HYMENOPTERA_TRAIN, out_dir, samples_per_shard=100, progress=False)


def test_image_folder_round_trip_keeps_bytes_labels_and_counts(hymenoptera_shards):
    out_dir, summary = hymenoptera_shards
    sources = {
        path.relative_to(HYMENOPTERA_TRAIN).as_posix(): path
        for path in HYMENOPTERA_TRAIN.rglob("*")
        if path.is_file()
    }
    images = {name: path for name, path in sources.items() if path.suffix.lower() in (".jpg", ".jpeg")}
    assert read_classes(out_dir) == ["ants", "bees"] == summary.classes
    assert summary.samples == len(images) == len(sources) - 1
    assert summary.skipped == [("ants/imageNotFound.gif", summary.skipped[0][1])]
    assert "GIF" in summary.skipped[0][1]
    assert summary.shards == 3 and summary.manifest == out_dir / "manifest.parquet"

    samples = read_shards(out_dir)
    assert len(samples) == len(images)
    # Keys are the relative path without its extension, other characters than [A-Za-z0-9_-] made "_".
    by_key = {re.sub(r"[^A-Za-z0-9_-]", "_", name.rsplit(".", 1)[0]): path for name, path in images.items()}
    assert "ants_ant_photos" in by_key
    for key, sample in samples.items():
        source = by_key[key]
        assert sample["jpg"] == source.read_bytes()  # original bytes, not re-encoded
        assert int(sample["cls"]) == ["ants", "bees"].index(source.parent.name)
    check_manifest_matches_shards(out_dir)
    counts = read_manifest(out_dir).column("class_counts").to_pylist()
    per_class = [sum(c[i] for c in counts) for i in range(2)]
    assert per_class == [sum(1 for n in images if n.startswith(c + "/")) for c in ("ants", "bees")]


def test_shards_are_standard_webdataset(hymenoptera_shards):
    out_dir, summary = hymenoptera_shards
    shards = [str(out_dir / s) for s in read_manifest(out_dir).column("shard").to_pylist()]
    dataset = wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("pil")
    seen = 0
    for sample in dataset:
        assert isinstance(sample["jpg"], Image.Image) and sample["cls"] in (0, 1)
        seen += 1
    assert seen == summary.samples


def make_folder_with_bad_input(root: Path) -> dict[str, bytes]:
    """A small ImageFolder with good PNG/JPEG files and bad ones; returns the good ones' bytes by name."""
    good: dict[str, bytes] = {}
    for index in range(12):
        image, label = synthetic_image(index, image_size=24, num_classes=3, seed=5)
        name = f"class_{label}/sub/img{index:02d}.{'png' if index % 2 else 'jpg'}"
        data = image_bytes(image, "PNG" if index % 2 else "JPEG")
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        good[name] = data
    truncated = image_bytes(Image.new("RGB", (64, 64), "red"), "JPEG")
    (root / "class_0" / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    (root / "class_1" / "notes.txt").write_text("not an image")
    (root / "class_1" / "empty.png").write_bytes(b"")
    (root / "stray.jpg").write_bytes(good[next(iter(good))])
    return good


def test_bad_input_is_skipped_counted_and_named(tmp_path, capsys):
    good = make_folder_with_bad_input(tmp_path / "src")
    summary = make_shards(tmp_path / "src", tmp_path / "out", samples_per_shard=5)
    assert summary.samples == len(good)
    assert sorted(name for name, _ in summary.skipped) == [
        "class_0/truncated.jpg", "class_1/empty.png", "class_1/notes.txt", "stray.jpg",
    ]  # fmt: skip
    reasons = dict(summary.skipped)
    assert "undecodable" in reasons["class_0/truncated.jpg"]
    assert "not an image" in reasons["class_1/notes.txt"]
    printed = capsys.readouterr().out
    assert "skipped 4 item(s)" in printed and "class_0/truncated.jpg" in printed
    assert json.loads((tmp_path / "out" / "skipped.json").read_text()) == [list(s) for s in summary.skipped]
    samples = read_shards(tmp_path / "out")
    for name, data in good.items():
        sample = samples[name.rsplit(".", 1)[0].replace("/", "_")]
        assert sample[name.rsplit(".", 1)[1]] == data
        assert int(sample["cls"]) == int(name.split("/")[0][-1])
    check_manifest_matches_shards(tmp_path / "out")


def test_reencoding_and_resize(tmp_path):
    make_folder_with_bad_input(tmp_path / "src")
    summary = make_shards(tmp_path / "src", tmp_path / "out", image_format="webp", resize=16, progress=False)
    samples = read_shards(tmp_path / "out")
    assert summary.samples == len(samples) == 12
    for sample in samples.values():
        assert set(sample) == {"webp", "cls"}
        image = Image.open(io.BytesIO(sample["webp"]))
        assert image.format == "WEBP" and image.size == (16, 16)


# ---------------------------------------------------------------- Parquet


def write_mnist_parquet_copy(directory: Path, rows: int) -> tuple[list[dict], list[int]]:
    """Two Parquet files in the Hugging Face layout with small row groups, holding the first ``rows``
    MNIST rows plus a truncated image and a null label; returns the rows and their labels."""
    table = pq.read_table(MNIST_PARQUET).slice(0, rows)
    images, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
    images[5] = {"bytes": images[5]["bytes"][:40], "path": None}  # truncated PNG
    labels[9] = None
    names = json.dumps({"info": {"features": {"label": {"names": [f"digit {d}" for d in range(10)]}}}})
    schema = table.schema.with_metadata({"huggingface": names})
    half = rows // 2
    directory.mkdir()
    for name, part in [("train-00000-of-00002", slice(0, half)), ("train-00001-of-00002", slice(half, rows))]:
        chunk = pa.table({"image": images[part], "label": labels[part]}, schema=schema)
        pq.write_table(chunk, directory / f"{name}.parquet", row_group_size=64)
    return images, labels


@pytest.mark.skipif(not MNIST_PARQUET.is_file(), reason="../shared/data/mnist-test.parquet is absent")
@pytest.mark.parametrize("as_glob", [False, True])
def test_parquet_round_trip(tmp_path, as_glob):
    images, labels = write_mnist_parquet_copy(tmp_path / "parquet", 400)
    source = str(tmp_path / "parquet" / "*.parquet") if as_glob else tmp_path / "parquet"
    summary = make_shards(source, tmp_path / "out", samples_per_shard=150, progress=False)
    assert sorted(summary.skipped) == [
        ("train-00000-of-00002.parquet#row5", summary.skipped[0][1]),
        ("train-00000-of-00002.parquet#row9", "unreadable label None"),
    ]
    assert summary.samples == 398 and summary.shards == 3  # chunks of 150 cross files and row groups
    assert read_classes(tmp_path / "out") == [f"digit {d}" for d in range(10)]
    samples = read_shards(tmp_path / "out")
    for index in set(range(400)) - {5, 9}:
        file, row = ("train-00000-of-00002", index) if index < 200 else ("train-00001-of-00002", index - 200)
        sample = samples[f"{file}_{row:08d}"]
        assert sample["png"] == images[index]["bytes"] and int(sample["cls"]) == labels[index]
    check_manifest_matches_shards(tmp_path / "out")


@pytest.mark.skipif(not MNIST_PARQUET.is_file(), reason="../shared/data/mnist-test.parquet is absent")
def test_whole_mnist_parquet_file(tmp_path):
    summary = make_shards(MNIST_PARQUET, tmp_path, samples_per_shard=4000, progress=False)
    assert (summary.samples, summary.shards, summary.skipped) == (10_000, 3, [])
    assert read_classes(tmp_path) == [str(d) for d in range(10)]  # no names stored: the labels seen
    counts = read_manifest(tmp_path).column("class_counts").to_pylist()
    expected = pq.read_table(MNIST_PARQUET, columns=["label"]).column("label").value_counts().to_pylist()
    assert [sum(c[d] for c in counts) for d in range(10)] == [
        next(e["counts"] for e in expected if e["values"] == d) for d in range(10)
    ]


# ---------------------------------------------------------------- synthetic, bounds, atomicity


def test_synthetic_round_trip_bounds_and_worker_independence(tmp_path):
    bound = 4 * 10240
    kwargs = dict(samples_per_shard=9, max_shard_bytes=bound, synthetic_samples=60, synthetic_classes=4,
                  synthetic_image_size=48, seed=2, progress=False)  # fmt: skip
    one = make_shards("synthetic", tmp_path / "one", **kwargs)
    two = make_shards("synthetic", tmp_path / "two", workers=2, **kwargs)
    assert (one.samples, one.shards, one.skipped) == (two.samples, two.shards, two.skipped)
    assert one.samples == 60 and one.classes == ["class_000", "class_001", "class_002", "class_003"]
    manifest = read_manifest(tmp_path / "one")
    assert manifest.equals(read_manifest(tmp_path / "two"))
    assert max(manifest.column("samples").to_pylist()) <= 9
    assert max(manifest.column("bytes").to_pylist()) <= bound
    assert one.shards > 60 // 9 + 1  # the byte bound, not only the sample bound, cut shards
    for shard in manifest.column("shard").to_pylist():  # same bytes whatever the number of workers
        assert (tmp_path / "one" / shard).read_bytes() == (tmp_path / "two" / shard).read_bytes()
    samples = read_shards(tmp_path / "one")
    for index in (0, 31, 59):
        image, label = synthetic_image(index, image_size=48, num_classes=4, seed=2)
        sample = samples[f"synthetic_{index:08d}"]
        assert sample["png"] == image_bytes(image, "PNG") and int(sample["cls"]) == label
    check_manifest_matches_shards(tmp_path / "one")
    check_manifest_matches_shards(tmp_path / "two")


def test_a_sample_larger_than_the_byte_bound_gets_its_own_shard(tmp_path):
    summary = make_shards("synthetic", tmp_path, max_shard_bytes=10240, synthetic_samples=3,
                          synthetic_image_size=96, progress=False)  # fmt: skip
    assert summary.shards == 3 and read_manifest(tmp_path).column("samples").to_pylist() == [1, 1, 1]


@pytest.mark.parametrize("workers", [1, 2])
def test_failed_run_leaves_only_complete_shards_and_is_rerun_with_overwrite(tmp_path, monkeypatch, workers):
    real_encode = make_shards_module._encode
    calls = 0

    def failing_encode(payload, options):
        nonlocal calls
        calls += 1
        if calls == 15:
            raise OSError("disk on fire")
        return real_encode(payload, options)

    monkeypatch.setattr(make_shards_module, "_encode", failing_encode)
    # (Forked workers inherit the patch and count their own calls: each fails on its 15th sample.)
    with pytest.raises(OSError, match="disk on fire"):
        make_shards("synthetic", tmp_path, samples_per_shard=10, synthetic_samples=30, workers=workers,
                    progress=False)  # fmt: skip
    left = sorted(p.name for p in tmp_path.iterdir())
    whole_run = ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert left == whole_run[: len(left)] and len(left) < 3  # whole shards in order, no temporary files
    if workers == 1:
        assert left == ["train-000000.tar"]  # the chunk that finished before the failure
    for name in left:
        with tarfile.open(tmp_path / name) as tar:
            assert len(tar.getmembers()) == 20
    monkeypatch.undo()

    if left:  # (with workers, the failure may also come before any shard is complete)
        with pytest.raises(FileExistsError, match="overwrite"):
            make_shards("synthetic", tmp_path, samples_per_shard=10, synthetic_samples=30, progress=False)
    summary = make_shards("synthetic", tmp_path, samples_per_shard=10, synthetic_samples=30, progress=False,
                          overwrite=True)  # fmt: skip
    assert (summary.shards, summary.samples) == (3, 30)
    check_manifest_matches_shards(tmp_path)


def test_argument_and_source_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        make_shards(tmp_path / "no-such-dir", tmp_path / "out")
    with pytest.raises(ValueError, match="image_format"):
        make_shards("synthetic", tmp_path / "out", image_format="gif")
    with pytest.raises(ValueError, match="samples_per_shard"):
        make_shards("synthetic", tmp_path / "out", samples_per_shard=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        make_shards(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "table.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="table.parquet"):
        make_shards(tmp_path / "table.parquet", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_manifest(tmp_path)


# ---------------------------------------------------------------- command line


def test_cli_writes_shards_and_reports_a_missing_source(tmp_path, capsys):
    out_dir = tmp_path / "out"
    code = main(["make-shards", "synthetic", str(out_dir), "--synthetic-samples", "50", "--samples-per-shard",
                 "20", "--max-shard-bytes", "1M", "--synthetic-classes", "5", "--synthetic-image-size", "16",
                 "--format", "jpg", "--no-progress"])  # fmt: skip
    assert code == 0
    assert "wrote 50 samples of 5 classes in 3 shards" in capsys.readouterr().out
    assert read_manifest(out_dir).column("samples").to_pylist() == [20, 20, 10]
    assert all(set(s) == {"jpg", "cls"} for s in read_shards(out_dir).values())

    assert main(["make-shards", str(tmp_path / "missing"), str(tmp_path / "out2")]) == 1
    assert "source not found" in capsys.readouterr().err
    assert main(["make-shards", "synthetic", str(out_dir), "--synthetic-samples", "5"]) == 1
    assert "overwrite" in capsys.readouterr().err


@pytest.mark.skipif(not CIFAR_TRAIN.is_dir(), reason="../shared/data/cifar10-subset is absent")
def test_image_folder_shards_mix_the_classes(tmp_path):
    """A class-by-class ImageFolder walk, written in seeded random order: every shard holds (nearly) every
    class, the same seed gives the same shards byte for byte, and keys do not depend on the seed."""
    make_shards(CIFAR_TRAIN, tmp_path / "a", samples_per_shard=512, progress=False)
    make_shards(CIFAR_TRAIN, tmp_path / "b", samples_per_shard=512, progress=False)
    make_shards(CIFAR_TRAIN, tmp_path / "c", samples_per_shard=512, progress=False, shuffle_seed=1)
    make_shards(CIFAR_TRAIN, tmp_path / "sorted", samples_per_shard=512, progress=False, shuffle_seed=None)
    manifest = read_manifest(tmp_path / "a")
    for row in manifest.to_pylist():
        present = sum(1 for count in row["class_counts"] if count > 0)
        assert present >= 8, row["shard"]
    sorted_rows = read_manifest(tmp_path / "sorted").to_pylist()
    assert min(sum(1 for c in row["class_counts"] if c > 0) for row in sorted_rows) <= 2  # the old layout
    for shard in sorted((tmp_path / "a").glob("*.tar")):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()
    keys = {seed: {key: sample for key, sample in read_shards(tmp_path / seed).items()} for seed in "ac"}
    assert keys["a"].keys() == keys["c"].keys() and len(keys["a"]) == 5085
    assert all(keys["a"][k] == keys["c"][k] for k in keys["a"])  # a key names the same image and label


def classes_per_shard(out_dir: Path) -> list[int]:
    return [sum(1 for c in row["class_counts"] if c > 0) for row in read_manifest(out_dir).to_pylist()]


@pytest.mark.skipif(not MNIST_PARQUET.is_file(), reason="../shared/data/mnist-test.parquet is absent")
def test_label_sorted_parquet_shards_mix_the_classes(tmp_path):
    """Parquet is shuffled by row group windows: shards of a label-sorted table mix the classes, the same
    seed gives the same bytes (whatever the number of workers), and keys name the same rows."""
    table = pq.read_table(MNIST_PARQUET).slice(0, 2000)
    table = table.take(pc.sort_indices(table, [("label", "ascending")]))
    (tmp_path / "src").mkdir()
    for index, start in enumerate((0, 1000)):  # two files of 50-row groups, each group a single class
        pq.write_table(table.slice(start, 1000), tmp_path / "src" / f"part{index}.parquet", row_group_size=50)
    runs = {"a": {}, "b": {"workers": 2}, "c": {"shuffle_seed": 5}, "sorted": {"shuffle_seed": None}}
    for name, kwargs in runs.items():
        summary = make_shards(tmp_path / "src", tmp_path / name, samples_per_shard=100, progress=False,
                              **kwargs)  # fmt: skip
        assert (summary.samples, summary.skipped) == (2000, [])
        check_manifest_matches_shards(tmp_path / name)
    assert min(classes_per_shard(tmp_path / "a")) >= 7
    assert min(classes_per_shard(tmp_path / "sorted")) == 1  # the source order, one class per shard
    assert read_manifest(tmp_path / "a").equals(read_manifest(tmp_path / "b"))
    for shard in read_manifest(tmp_path / "a").column("shard").to_pylist():
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    samples = {name: read_shards(tmp_path / name) for name in ("a", "c", "sorted")}
    assert samples["a"] == samples["c"] == samples["sorted"]  # same keys, each the same image and label
    assert samples["sorted"]["part1_00000999"]["png"] == table.column("image")[1999].as_py()["bytes"]


def test_synthetic_shards_are_shuffled_with_stable_keys(tmp_path):
    kwargs = dict(samples_per_shard=10, synthetic_samples=30, synthetic_image_size=8, progress=False)
    make_shards("synthetic", tmp_path / "a", shuffle_seed=3, **kwargs)
    make_shards("synthetic", tmp_path / "b", shuffle_seed=3, **kwargs)
    make_shards("synthetic", tmp_path / "sorted", shuffle_seed=None, **kwargs)
    with tarfile.open(tmp_path / "sorted" / "train-000000.tar") as tar:
        first_keys = {m.name.split(".")[0] for m in tar.getmembers()}
    assert first_keys == {f"synthetic_{i:08d}" for i in range(10)}
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tar:
        assert {m.name.split(".")[0] for m in tar.getmembers()} != first_keys
    for shard in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    assert read_shards(tmp_path / "a") == read_shards(tmp_path / "sorted")
    with pytest.raises(ValueError, match="shuffle_seed"):
        make_shards("synthetic", tmp_path / "neg", shuffle_seed=-1, **kwargs)
