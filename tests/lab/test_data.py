import gzip
import importlib.util
import random
import socket
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from normlab.lab import data
from normlab.lab.data import (
    FASHION_MNIST_FILES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DataNotFoundError,
    as_sequence,
    as_signal,
    batches,
    class_balanced_indices,
    find_fashion_mnist,
    load_fashion_mnist,
    load_image_folder,
    load_mnist1d,
    read_idx,
    shift_index,
    synthetic_stream,
    write_idx,
)

# ------------------------------------------------------------------------------------------------------ IDX


def _idx_bytes(code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + payload


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_decodes_hand_built_uint8_images_and_labels(tmp_path, gz):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(tmp_path / f"img-idx3-ubyte{suffix}", "wb") as f:
        f.write(_idx_bytes(0x08, (2, 3, 4), images.tobytes()))
    with opener(tmp_path / f"lab-idx1-ubyte{suffix}", "wb") as f:
        f.write(_idx_bytes(0x08, (3,), labels.tobytes()))
    got_images = read_idx(tmp_path / f"img-idx3-ubyte{suffix}")
    got_labels = read_idx(str(tmp_path / f"lab-idx1-ubyte{suffix}"))
    assert got_images.dtype == np.uint8 and got_images.shape == (2, 3, 4)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_big_endian_multibyte_types(tmp_path):
    values = np.array([[1, -2, 300], [70000, 5, -6]], dtype=">i4")
    (tmp_path / "a").write_bytes(_idx_bytes(0x0C, (2, 3), values.tobytes()))
    got = read_idx(tmp_path / "a")
    assert got.dtype == np.int32 and got.dtype.isnative
    np.testing.assert_array_equal(got, values.astype(np.int32))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["x-idx", "x-idx.gz"])
def test_write_read_round_trip(tmp_path, dtype, name):
    array = (np.random.default_rng(0).standard_normal((3, 5, 2)) * 50).astype(dtype)
    got = read_idx(write_idx(tmp_path / name, array))
    assert got.dtype == np.dtype(dtype) and got.shape == (3, 5, 2)
    np.testing.assert_array_equal(got, array)


def test_compression_is_detected_from_content_not_name(tmp_path):
    raw_named_gz = tmp_path / "labels-idx1-ubyte.gz"
    raw_named_gz.write_bytes(_idx_bytes(0x08, (2,), b"\x03\x04"))
    gz_named_raw = tmp_path / "labels-idx1-ubyte"
    gz_named_raw.write_bytes(gzip.compress(_idx_bytes(0x08, (2,), b"\x05\x06")))
    assert read_idx(raw_named_gz).tolist() == [3, 4]
    assert read_idx(gz_named_raw).tolist() == [5, 6]


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x02ab", "not an IDX file"),
        (b"PK\x03\x04", "not an IDX file"),
        (b"", "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01a", "unknown element type code 0x07"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated.*header"),
        (_idx_bytes(0x08, (10, 28, 28), bytes(10 * 28 * 28 - 1)), "truncated: 7855 bytes, expected 7856 for shape"),
        (_idx_bytes(0x0D, (4,), bytes(15)), "truncated.*float32"),
        (_idx_bytes(0x08, (3,), bytes(4)), "longer than its header"),
    ],
    ids=["magic", "zip", "empty", "type", "header", "images", "float32", "extra"],
)
@pytest.mark.parametrize("gz", [False, True])
def test_bad_files_raise_value_error_naming_the_file(tmp_path, content, match, gz):
    path = tmp_path / "bad-file-idx"
    path.write_bytes(gzip.compress(content) if gz else content)
    with pytest.raises(ValueError, match=match) as info:
        read_idx(path)
    assert "bad-file-idx" in str(info.value)


def test_damaged_gzip_stream_raises_value_error_naming_the_file(tmp_path):
    full = gzip.compress(_idx_bytes(0x08, (1000,), bytes(range(256)) * 3 + bytes(232)))
    path = tmp_path / "cut.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="cut.gz.*damaged gzip"):
        read_idx(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


def test_write_idx_rejects_types_without_code(tmp_path):
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


# -------------------------------------------------------------------------------------------- Fashion-MNIST


def _fake_fashion(folder: Path, *, n_train: int = 40, n_test: int = 20, gz: bool = True, value: int = 0) -> Path:
    """Tiny Fashion-MNIST look-alike: labels cycle 0..9, every pixel of image i is (value + i) % 256."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = FASHION_MNIST_FILES[split]
        pixels = ((value + np.arange(n)) % 256).astype(np.uint8)
        write_idx(folder / (images_name + suffix), np.broadcast_to(pixels[:, None, None], (n, 28, 28)))
        write_idx(folder / (labels_name + suffix), (np.arange(n) % 10).astype(np.uint8))
    return folder


@pytest.fixture
def no_data_places(tmp_path, monkeypatch):
    """No NORMLAB_DATA and a system folder that does not exist, so only what a test creates is found."""
    monkeypatch.delenv("NORMLAB_DATA", raising=False)
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "system-absent")
    return tmp_path


def test_search_order_data_dir_then_env_then_system(no_data_places, monkeypatch):
    tmp = no_data_places
    given, env, system = (_fake_fashion(tmp / name) for name in ("given", "env", "system"))
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST_DIR", system)
    monkeypatch.setenv("NORMLAB_DATA", str(env))
    assert find_fashion_mnist(given) == given
    assert find_fashion_mnist(str(given)) == given
    assert find_fashion_mnist() == env
    monkeypatch.delenv("NORMLAB_DATA")
    assert find_fashion_mnist() == system
    # an incomplete folder does not count: the search goes on
    (given / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("NORMLAB_DATA", str(env))
    assert find_fashion_mnist(given) == env


def test_env_may_point_at_a_parent_folder_and_raw_files_count(no_data_places, monkeypatch):
    root = no_data_places / "datasets"
    _fake_fashion(root / "fashion-mnist", gz=False)
    monkeypatch.setenv("NORMLAB_DATA", str(root))
    assert find_fashion_mnist() == root / "fashion-mnist"


def test_loader_reads_from_the_folder_the_search_picks(no_data_places, monkeypatch):
    tmp = no_data_places
    _fake_fashion(tmp / "given", value=10)
    _fake_fashion(tmp / "env", value=20)
    monkeypatch.setenv("NORMLAB_DATA", str(tmp / "env"))
    x_given, _ = load_fashion_mnist("train", tmp / "given", standardize=False)
    x_env, _ = load_fashion_mnist("train", standardize=False)
    assert x_given[0, 0, 0, 0] * 255 == pytest.approx(10) and x_env[0, 0, 0, 0] * 255 == pytest.approx(20)


def test_not_found_lists_every_place_and_how_to_get_the_data(no_data_places, monkeypatch):
    tmp = no_data_places
    given, env = tmp / "given", tmp / "env"
    _fake_fashion(env)
    (env / "train-images-idx3-ubyte.gz").unlink()
    monkeypatch.setenv("NORMLAB_DATA", str(env))
    with pytest.raises(DataNotFoundError) as info:
        find_fashion_mnist(given)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for place in (given, given / "fashion-mnist", env, env / "fashion-mnist", tmp / "system-absent"):
        assert f"{place} (" in message
    env_line = next(line for line in message.splitlines() if line.startswith(f"  - {env} ("))
    assert env_line.endswith("missing train-images-idx3-ubyte[.gz]")
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message and "NORMLAB_DATA" in message
    for split_files in FASHION_MNIST_FILES.values():
        for name in split_files:
            assert name in message


def test_not_found_without_any_hint_says_nothing_was_given(no_data_places):
    with pytest.raises(DataNotFoundError, match="NORMLAB_DATA is not set") as info:
        load_fashion_mnist("test")
    assert "system-absent" in str(info.value)


def test_fashion_mnist_tensors_and_standardization(no_data_places):
    folder = _fake_fashion(no_data_places / "d", n_train=30, gz=False)
    x, y = load_fashion_mnist("train", folder)
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [i % 10 for i in range(30)]
    expected = (torch.arange(30, dtype=torch.float32) / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    torch.testing.assert_close(x[:, 0, 5, 7], expected)
    x_raw, _ = load_fashion_mnist("test", folder, standardize=False)
    assert x_raw.shape == (20, 1, 28, 28) and x_raw.min() == 0 and x_raw.max() == pytest.approx(19 / 255)


def test_fashion_mnist_limit_is_seeded_balanced_and_nested(no_data_places):
    folder = _fake_fashion(no_data_places / "d", n_train=200)
    x, y = load_fashion_mnist("train", folder, limit=25, seed=1, standardize=False)
    assert x.shape[0] == 25 and sorted(torch.bincount(y, minlength=10).tolist()) == [2] * 5 + [3] * 5
    # image i has pixel value i: the indices are sorted and come from the right rows
    picked = (x[:, 0, 0, 0] * 255).round().long()
    assert torch.equal(picked.sort().values, picked) and torch.equal(y, picked % 10)
    again = load_fashion_mnist("train", folder, limit=25, seed=1, standardize=False)[0]
    other = load_fashion_mnist("train", folder, limit=25, seed=2, standardize=False)[0]
    larger = load_fashion_mnist("train", folder, limit=60, seed=1, standardize=False)[0]
    assert torch.equal(x, again) and not torch.equal(x, other)
    assert set(picked.tolist()) <= set((larger[:, 0, 0, 0] * 255).round().long().tolist())
    assert load_fashion_mnist("train", folder, limit=10_000)[0].shape[0] == 200


def test_class_balanced_indices_fills_in_for_a_small_class():
    labels = np.array([0] * 50 + [1] * 2 + [2] * 50)
    idx = class_balanced_indices(labels, 30, seed=0)
    counts = np.bincount(labels[idx], minlength=3).tolist()
    assert counts[1] == 2 and counts[0] + counts[2] == 28 and abs(counts[0] - counts[2]) <= 1
    assert len(set(idx.tolist())) == 30


@pytest.mark.parametrize(
    "kwargs, match",
    [({"split": "val"}, "split='val'"), ({"split": "train", "limit": 0}, "limit=0"),
     ({"split": "train", "limit": 2.5}, "limit=2.5")],
)  # fmt: skip
def test_fashion_mnist_bad_arguments(no_data_places, kwargs, match):
    folder = _fake_fashion(no_data_places / "d")
    with pytest.raises(ValueError, match=match):
        load_fashion_mnist(data_dir=folder, **kwargs)


def test_fashion_mnist_inconsistent_files_name_the_file(no_data_places):
    folder = _fake_fashion(no_data_places / "d")
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(39, dtype=np.uint8))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz.*shape \\(39,\\)"):
        load_fashion_mnist("train", folder)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((20, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*\\(N, 28, 28\\)"):
        load_fashion_mnist("test", folder)


_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not all(any((_SYSTEM / (n + s)).is_file() for s in ("", ".gz")) for p in FASHION_MNIST_FILES.values() for n in p),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_debian_fashion_mnist(monkeypatch):
    monkeypatch.delenv("NORMLAB_DATA", raising=False)
    assert data.SYSTEM_FASHION_MNIST_DIR == _SYSTEM and find_fashion_mnist() == _SYSTEM
    x, y = load_fashion_mnist("train")
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    assert torch.bincount(y).tolist() == [6000] * 10
    # the documented constants are the training set's statistics
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-4
    x_test, y_test = load_fashion_mnist("test")
    assert x_test.shape == (10000, 1, 28, 28) and y_test.dtype == torch.int64
    assert torch.bincount(y_test).tolist() == [1000] * 10


# ------------------------------------------------------------------------------------------------- MNIST-1D

_needs_mnist1d = pytest.mark.skipif(
    importlib.util.find_spec("mnist1d") is None, reason="needs mnist1d (pip install mnist1d)"
)


@_needs_mnist1d
def test_mnist1d_default_shapes_and_types(tmp_path):
    d = load_mnist1d(cache_dir=tmp_path)
    assert d.x_train.shape == (4000, 40) and d.x_test.shape == (1000, 40)
    assert d.y_train.shape == (4000,) and d.y_test.shape == (1000,)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert set(d.y_train.unique().tolist()) == set(range(10))
    assert as_signal(d.x_train).shape == (4000, 1, 40) and as_sequence(d.x_train).shape == (4000, 40, 1)


@_needs_mnist1d
def test_mnist1d_matches_the_package_generator():
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed, args.num_samples = 5, 300
    reference = make_dataset(args)
    d = load_mnist1d(seed=5, num_samples=300, cache=False)
    np.testing.assert_array_equal(d.x_train.numpy(), reference["x"].astype(np.float32))
    np.testing.assert_array_equal(d.y_test.numpy(), reference["y_test"])


@_needs_mnist1d
def test_mnist1d_is_deterministic_per_seed_and_keeps_global_rng():
    random.seed(123)
    np.random.seed(123)
    before = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    a = load_mnist1d(seed=3, num_samples=200, cache=False)
    assert (random.random(), np.random.rand()) == before
    b = load_mnist1d(seed=3, num_samples=200, cache=False)
    c = load_mnist1d(seed=4, num_samples=200, cache=False)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert load_mnist1d(num_samples=200, train_split=0.5, final_seq_length=24, cache=False).x_test.shape == (100, 24)


@_needs_mnist1d
def test_mnist1d_never_touches_the_network(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.chdir(tmp_path)  # mnist1d's get_dataset would look for ./mnist1d_data.pkl here
    d = load_mnist1d(num_samples=100, cache_dir=tmp_path / "cache")
    assert d.x_train.shape == (80, 40)
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


@_needs_mnist1d
def test_mnist1d_cache_is_keyed_by_arguments_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path))
    first = load_mnist1d(seed=1, num_samples=100)
    files = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    monkeypatch.setattr(data, "_generate_mnist1d", lambda options: pytest.fail("regenerated despite the cache"))
    second = load_mnist1d(seed=1, num_samples=100)
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_test, second.y_test)
    monkeypatch.undo()
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path))
    load_mnist1d(seed=1, num_samples=100, shear_scale=0.5)
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 2


@_needs_mnist1d
def test_mnist1d_damaged_cache_regenerates_and_unwritable_cache_warns(tmp_path):
    fresh = load_mnist1d(seed=2, num_samples=100, cache=False)
    load_mnist1d(seed=2, num_samples=100, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("mnist1d-*.npz")
    cached.write_bytes(b"garbage")
    assert torch.equal(load_mnist1d(seed=2, num_samples=100, cache_dir=tmp_path).x_train, fresh.x_train)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not cache"):
        d = load_mnist1d(seed=2, num_samples=100, cache_dir=blocker)
    assert torch.equal(d.x_train, fresh.x_train)


@pytest.mark.parametrize(
    "kwargs, match", [({"num_samples": 5}, "num_samples=5"), ({"train_split": 1.0}, "train_split=1.0")]
)
def test_mnist1d_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_mnist1d(cache=False, **kwargs)


def test_mnist1d_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match="pip install"):
        load_mnist1d(num_samples=100, cache=False)


# ---------------------------------------------------------------------------------------------------- views


def test_sequence_views():
    images = torch.randn(3, 1, 28, 28)
    rows = as_sequence(images)
    assert rows.shape == (3, 28, 28) and torch.equal(rows[:, 5], images[:, 0, 5, :])
    signal = torch.randn(4, 40)
    assert torch.equal(as_sequence(signal)[:, :, 0], signal)
    assert torch.equal(as_sequence(as_signal(signal)), as_sequence(signal))
    assert as_signal(signal).shape == (4, 1, 40)
    for bad in (torch.zeros(3, 3, 28, 28), torch.zeros(5), torch.zeros(2, 2, 7)):
        with pytest.raises(ValueError, match=str(tuple(bad.shape)).replace("(", "\\(").replace(")", "\\)")):
            as_sequence(bad)
    with pytest.raises(ValueError, match="as_signal"):
        as_signal(torch.zeros(2, 1, 4))


# ---------------------------------------------------------------------------------------------- image folder


def _png(path: Path, size: tuple[int, int], color, mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder(tmp_path):
    pytest.importorskip("PIL")
    _png(tmp_path / "zebra" / "1.png", (10, 6), (255, 0, 0))
    _png(tmp_path / "zebra" / "nested" / "2.PNG", (5, 5), (0, 0, 255))
    _png(tmp_path / "ant" / "x.png", (8, 8), 128, mode="L")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "ant" / ".hidden.png").write_bytes(b"junk")
    x, y, names = load_image_folder(tmp_path, image_size=(4, 7))
    assert names == ["ant", "zebra"] and y.tolist() == [0, 1, 1]
    assert x.shape == (3, 3, 4, 7) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.full((3, 4, 7), 128 / 255))
    torch.testing.assert_close(x[1, :, 2, 3], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(x[2, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    gray, _, _ = load_image_folder(tmp_path, image_size=5, grayscale=True)
    assert gray.shape == (3, 1, 5, 5) and 0 <= gray.min() and gray.max() <= 1


def test_image_folder_errors(tmp_path):
    pytest.importorskip("PIL")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_image_folder(tmp_path / "missing", image_size=8)
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_image_folder(tmp_path, image_size=8)
    with pytest.raises(ValueError, match="image_size=0"):
        load_image_folder(tmp_path, image_size=0)
    _png(tmp_path / "a" / "ok.png", (4, 4), (1, 2, 3))
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="class folder .*b holds no images"):
        load_image_folder(tmp_path, image_size=8)
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_image_folder(tmp_path, image_size=8)


def test_image_folder_without_pillow_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        load_image_folder(tmp_path, image_size=8)


# ------------------------------------------------------------------------------------------------- streams


def _stream(**kwargs):
    args = {"num_classes": 4, "dim": 6, "num_batches": 40, "seed": 0, **kwargs}
    return list(synthetic_stream(**args))


def test_stream_is_reproducible_and_well_formed():
    a, b, c = _stream(seed=7), _stream(seed=7), _stream(seed=8)
    assert len(a) == 40
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(xa.shape == xc.shape and torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    for x, y in a:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (y.shape[0], 6)
        assert 0 <= y.min() and y.max() < 4


def test_stream_batch_sizes_stay_in_the_range_and_use_it():
    sizes = [len(y) for _, y in _stream(num_batches=300, batch_sizes=(1, 16))]
    assert min(sizes) == 1 and max(sizes) == 16 and len(set(sizes)) == 16
    assert {len(y) for _, y in _stream(batch_sizes=5)} == {5}
    assert {len(y) for _, y in _stream(batch_sizes=(3, 4))} == {3, 4}


@pytest.mark.parametrize("shift_at, num_batches, first", [(0.5, 40, 20), (0.25, 10, 2), (0.0, 8, 0), (1.0, 8, 8)])
def test_stream_shift_happens_where_configured(shift_at, num_batches, first):
    assert shift_index(num_batches, shift_at) == first
    base = _stream(num_batches=num_batches, shift_scale=0.0)
    shifted = _stream(num_batches=num_batches, shift_at=shift_at, shift_scale=3.0)
    offsets = []
    for step, ((xb, yb), (xs, ys)) in enumerate(zip(base, shifted)):
        assert torch.equal(yb, ys)
        if step < first:
            assert torch.equal(xb, xs)
        else:
            offsets.append(xs - xb)  # the same shift vector for every sample after the shift
    if offsets:
        offset = offsets[0][0]
        assert all(torch.allclose(o, offset.expand_as(o)) for o in offsets)
        assert offset.abs().mean() > 1.0  # about shift_scale per feature


def test_stream_gain_and_no_shift():
    base = _stream(shift_scale=0.0)
    assert all(torch.equal(x, xn) for (x, _), (xn, _) in zip(base, _stream(shift_at=None, shift_scale=5.0)))
    gained = _stream(shift_scale=0.0, shift_gain=3.0, shift_at=0.5)
    torch.testing.assert_close(gained[25][0], 3.0 * base[25][0])
    torch.testing.assert_close(gained[5][0], base[5][0])


def test_stream_classes_are_separable_before_the_shift():
    xs, ys = zip(*_stream(num_batches=200, separation=4.0, shift_at=None))
    x, y = torch.cat(xs), torch.cat(ys)
    means = torch.stack([x[y == k].mean(0) for k in range(4)])
    accuracy = (torch.cdist(x, means).argmin(1) == y).float().mean()
    assert accuracy > 0.8
    assert means.norm(dim=1).sub(4.0).abs().max() < 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 1}, "num_classes=1"),
        ({"dim": 0}, "dim=0"),
        ({"num_batches": -1}, "num_batches=-1"),
        ({"batch_sizes": (0, 4)}, "batch_sizes=\\(0, 4\\)"),
        ({"batch_sizes": (5, 2)}, "batch_sizes=\\(5, 2\\)"),
        ({"shift_at": 1.5}, "shift_at=1.5"),
        ({"shift_scale": -1.0}, "shift_scale=-1.0"),
        ({"shift_gain": 0.0}, "shift_gain=0.0"),
    ],
)
def test_stream_bad_arguments_raise_at_the_call(kwargs, match):
    args = {"num_classes": 3, "dim": 2, "num_batches": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        synthetic_stream(**args)  # not iterated: validation must not wait for the first batch


# ------------------------------------------------------------------------------------------------- batches


def test_batches_cover_every_sample_once_in_a_seeded_order():
    x, y = torch.arange(23).float().unsqueeze(1).expand(23, 3), torch.arange(23)
    loader = batches(x, y, 5, seed=1)
    got = list(loader)
    assert len(loader) == 5 == len(got) and [len(b) for _, b in got] == [5, 5, 5, 5, 3]
    order = torch.cat([b for _, b in got])
    assert sorted(order.tolist()) == list(range(23)) and order.tolist() != list(range(23))
    assert all(torch.equal(bx[:, 0], by.float()) for bx, by in got)
    assert torch.equal(torch.cat([b for _, b in loader]), order)  # re-iterable, same order
    assert torch.equal(torch.cat([b for _, b in batches(x, y, 5, seed=1)]), order)
    assert not torch.equal(torch.cat([b for _, b in batches(x, y, 5, seed=2)]), order)


def test_batches_in_order_and_drop_last():
    x, y = torch.zeros(10, 2), torch.arange(10)
    assert [b.tolist() for _, b in batches(x, y, 4, shuffle=False)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    dropped = batches(x, y, 4, shuffle=False, drop_last=True)
    assert len(dropped) == 2 and [len(b) for _, b in dropped] == [4, 4]
    assert len(batches(x, y, 20, drop_last=True)) == 0 and len(batches(x, y, 20)) == 1


def test_batches_bad_arguments():
    with pytest.raises(ValueError, match="batch_size=0"):
        batches(torch.zeros(4), torch.zeros(4), 0)
    with pytest.raises(ValueError, match="x has 4 samples but y has 3"):
        batches(torch.zeros(4), torch.zeros(3), 2)


def test_named_batches_give_each_task_its_layout():
    from normlab.lab.data import NAMED_DATASETS, named_batches

    shapes = {
        name: [tuple(x.shape) for x, _ in named_batches(name, batch_size=3, num_batches=2)]
        for name in ("mnist1d", "mnist1d-seq")
    }
    assert shapes == {"mnist1d": [(3, 1, 40)] * 2, "mnist1d-seq": [(3, 40, 1)] * 2}
    (x1, y1), _ = named_batches("mnist1d", batch_size=3, num_batches=2)
    (x2, y2), _ = named_batches("mnist1d-seq", batch_size=3, num_batches=2)
    assert torch.equal(x1.squeeze(1), x2.squeeze(-1)) and torch.equal(y1, y2)
    assert set(NAMED_DATASETS) == {"fashion", "fashion-seq", "mnist1d", "mnist1d-seq"}
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        named_batches("cifar")
    with pytest.raises(ValueError, match="num_batches"):
        named_batches("mnist1d", num_batches=0)
