"""--dataset: folders of images, .npz files and MNIST, converted to one size and channel count,
with bad input refused in one line before anything is decoded or written."""

import argparse
import csv
import json
import os
import re
import time

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import main, make_images, write_dataset
import tool.cli
import tool.data
import tool.errors
import tool.folders
import tool.sources


def config(dataset, **flags):
    values = dict(dataset=str(dataset), data_dir=None, image_size=None, channels=None,
                  test_split=0.1, strict=False, max_memory=None)
    values.update(flags)
    return argparse.Namespace(**values)


def save(path, array, mode=None, **options):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array), mode).save(path, **options)


def gray(value, size=(6, 5)):
    """A gray image of one value, height x width = size."""
    return np.full(size, value, np.uint8)


def write_split_folder(root, n_train=60, n_test=50, size=(6, 5), classes=("cat", "dog")):
    """train/CLASS/k.png and test/CLASS/k.png, image k of a split filled with the value k (and
    100 + k in test/), class by k's parity: {(split, value): class index}."""
    truth = {}
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 100)):
        for k in range(n):
            label = k % len(classes)
            save(os.path.join(root, split, classes[label], f"{k:03d}.png"), gray(offset + k, size))
            truth[split, offset + k] = label
    return truth


def values_and_labels(x, y):
    return {(int(image.flat[0]), int(label)) for image, label in zip(x, y)}


# --- folders -------------------------------------------------------------------------------------

def test_a_train_test_folder_gives_its_split_and_class_labels(tmp_path):
    truth = write_split_folder(tmp_path)
    save(str(tmp_path / "val" / "cat" / "x.png"), gray(7))  # not in train/ or test/: not used
    data = tool.sources.load_data(config(tmp_path))
    assert data.x_train.shape == (60, 6, 5, 1) and data.x_test.shape == (50, 6, 5, 1)
    assert data.class_names == ["cat", "dog"]
    assert values_and_labels(data.x_train, data.y_train) == {
        (v, c) for (s, v), c in truth.items() if s == "train"}
    assert values_and_labels(data.x_test, data.y_test) == {
        (v, c) for (s, v), c in truth.items() if s == "test"}
    assert "1 outside train/ and test/ (val/cat/x.png)" in data.notes[0]


def test_nested_folders_take_the_class_of_their_top_folder_and_the_order_is_fixed(tmp_path):
    for k in range(600):
        deeper = "a/b/c" if k % 3 == 0 else "a" if k % 3 == 1 else "z/y"
        save(str(tmp_path / deeper / f"{k:03d}.png"), gray(k % 256))
    first = tool.sources.load_data(config(tmp_path))
    again = tool.sources.load_data(config(tmp_path))
    assert first.class_names == ["a", "z"]
    np.testing.assert_array_equal(first.x_train, again.x_train)
    # the label follows the folder right under the root
    for x, y in ((first.x_train, first.y_train), (first.x_test, first.y_test)):
        names = np.array(first.class_names)[y]
        assert (names == "z").sum() > 0
    assert len(first.x_train) + len(first.x_test) == 600


def test_the_test_split_is_a_hash_of_the_path_so_new_files_move_no_other(tmp_path):
    for k in range(700):
        save(str(tmp_path / f"{k:03d}.png"), gray(k % 256, (2, 2)) + np.uint8([[0, 0], [0, k // 256]]))
    def test_files(c):
        data = tool.sources.load_data(c)
        return {(int(x[0, 0, 0]), int(x[1, 1, 0])) for x in data.x_test}
    before = test_files(config(tmp_path))
    assert 40 < len(before) < 110  # about 10% of 700
    assert test_files(config(tmp_path)) == before  # no seed, no randomness
    for k in range(700, 760):
        save(str(tmp_path / f"{k:03d}.png"), gray(k % 256, (2, 2)) + np.uint8([[0, 0], [0, k // 256]]))
    after = test_files(config(tmp_path))
    assert before <= after and len(after) > len(before)  # the old test images stay in the test set
    assert len(test_files(config(tmp_path, test_split=0.5))) > 300


def test_transparent_palette_and_sixteen_bit_images_are_converted_as_stated(tmp_path):
    n = 110
    for k in range(n):
        save(str(tmp_path / "train" / f"gray{k}.png"), gray(200))
    rgba = np.zeros((6, 5, 4), np.uint8)
    rgba[...] = (255, 0, 0, 128)  # half-transparent red on black: (128, 0, 0)
    save(str(tmp_path / "test" / "rgba.png"), rgba, "RGBA")
    palette = Image.new("P", (5, 6))
    palette.putpalette([0, 0, 255] * 256)
    os.makedirs(tmp_path / "test", exist_ok=True)
    palette.save(tmp_path / "test" / "palette.gif")  # a palette image, all blue
    save(str(tmp_path / "test" / "wide.png"), np.full((6, 5), 32896, np.uint16))  # 128 of 255
    for k in range(50):
        save(str(tmp_path / "test" / f"gray{k}.bmp"), gray(10))
    data = tool.sources.load_data(config(tmp_path))
    assert data.shape == (6, 5, 3)  # colour images among them: three channels
    pixels = {tuple(int(v) for v in x[0, 0]) for x in data.x_test}
    assert pixels == {(128, 0, 0), (0, 0, 255), (128, 128, 128), (10, 10, 10)}
    one = tool.sources.load_data(config(tmp_path, channels=1))
    values = {int(x[0, 0, 0]) for x in one.x_test}
    # Pillow's luma: L = R * 299/1000 + G * 587/1000 + B * 114/1000
    assert values == {round(128 * 0.299), round(255 * 0.114), 128, 10}


def test_gray_images_give_one_channel_and_channels_3_repeats_it(tmp_path):
    write_split_folder(tmp_path)
    assert tool.sources.load_data(config(tmp_path)).shape == (6, 5, 1)
    data = tool.sources.load_data(config(tmp_path, channels=3))
    assert data.shape == (6, 5, 3)
    assert (data.x_train[..., 0] == data.x_train[..., 2]).all()


def test_every_supported_type_is_read(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 7, 3), dtype=np.uint8)
    for k in range(60):
        save(str(tmp_path / "train" / f"{k}.png"), image)
    for name, options in (("a.png", {}), ("b.bmp", {}), ("c.gif", {}), ("d.webp", {"lossless": True}),
                          ("e.jpg", {"quality": 100}), ("f.JPEG", {"quality": 100})):
        save(str(tmp_path / "test" / name), image, **options)
    for k in range(50):
        save(str(tmp_path / "test" / f"x{k}.png"), image)
    data = tool.sources.load_data(config(tmp_path))
    assert len(data.x_test) == 56 and not data.notes
    exact = [x for x in data.x_test if (x == image).all()]
    assert len(exact) >= 53  # PNG, BMP, lossless WebP (GIF's palette and JPEG are lossy)


def test_mixed_sizes_ask_for_image_size_which_resizes_with_lanczos(tmp_path):
    write_split_folder(tmp_path, size=(6, 5))
    save(str(tmp_path / "train" / "cat" / "big.png"), np.arange(120, dtype=np.uint8).reshape(12, 10))
    with pytest.raises(tool.errors.DataError, match=r"2 sizes \(6x5 \(110\), 12x10 \(1\)\).*--image-size 6x5"):
        tool.sources.load_data(config(tmp_path))
    data = tool.sources.load_data(config(tmp_path, image_size=[6, 5]))
    expected = np.asarray(Image.fromarray(np.arange(120, dtype=np.uint8).reshape(12, 10)).resize(
        (5, 6), Image.Resampling.LANCZOS))
    assert any((x[..., 0] == expected).all() for x in data.x_train)
    assert tool.sources.load_data(config(tmp_path, image_size=[3, 4])).shape == (3, 4, 1)


def test_unreadable_and_other_files_are_skipped_counted_and_named(tmp_path):
    write_split_folder(tmp_path)
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    noise = np.random.default_rng(0).integers(0, 256, (6, 5), dtype=np.uint8)
    save(str(tmp_path / "train" / "dog" / "cut.png"), noise)  # its header reads, its pixels do not
    whole = (tmp_path / "train" / "dog" / "cut.png").read_bytes()
    (tmp_path / "train" / "dog" / "cut.png").write_bytes(whole[:60])
    (tmp_path / "train" / "notes.txt").write_text("hello")
    (tmp_path / "train" / ".hidden.png").write_bytes(b"ignored")
    (tmp_path / "train" / ".git").mkdir()
    (tmp_path / "train" / ".git" / "object.png").write_bytes(b"ignored too")
    data = tool.sources.load_data(config(tmp_path))
    assert len(data.x_train) == 60
    assert len(data.notes) == 1
    assert data.notes[0].startswith(
        "skipped 3 of 113 files: 2 unreadable (train/cat/broken.png (UnidentifiedImageError: "
        f"cannot identify image file '{tmp_path}/train/cat/broken.png'), train/dog/cut.png (")
    assert data.notes[0].endswith("); 1 not an image (train/notes.txt)")
    with pytest.raises(tool.errors.DataError, match=r"1 image file could not be read \(train/cat/broken.png.*--strict allows none"):
        tool.sources.load_data(config(tmp_path, strict=True))


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or folder"),
    ("empty", r"no image files \(png, jpg, jpeg, bmp, gif, webp\).*\(0 other files\)"),
    ("text", r"no image files.*\(1 other files\)"),
    ("few", r"60 training and 10 test images; at least 50 of each are needed.*, in test/"),
    ("few-split", r"at least 50 of each.*raise --test-split \(0.1 now\)"),
    ("all-broken", "none of its 2 image files could be read"),
])
def test_bad_folders_get_one_line(tmp_path, case, message):
    root = tmp_path / "data"
    if case != "missing":
        root.mkdir()
    if case == "text":
        (root / "a.txt").write_text("x")
    if case == "few":
        write_split_folder(root, n_test=10)
    if case == "few-split":
        for k in range(100):
            save(str(root / f"{k}.png"), gray(k))
    if case == "all-broken":
        (root / "a.png").write_bytes(b"no")
        (root / "b.jpg").write_bytes(b"no")
    with pytest.raises(tool.errors.DataError, match=message):
        tool.sources.load_data(config(root))


def test_data_beyond_max_memory_are_refused_before_decoding(tmp_path, monkeypatch):
    write_split_folder(tmp_path, size=(20, 30))
    monkeypatch.setattr(tool.folders, "decode_image", lambda job: pytest.fail("decoded"))
    # 66,000 bytes of pixels, which a run holds about three times over
    with pytest.raises(tool.errors.DataError, match=r"110 images of 20x30x1 need about 0.2 MiB of memory "
                       r"to train on, more than --max-memory \(0.1 MiB\); use a smaller --image-size"):
        tool.sources.load_data(config(tmp_path, max_memory=100000))
    monkeypatch.setattr(tool.data, "available_memory", lambda: 2 * 1000)
    with pytest.raises(tool.errors.DataError, match=r"more than half the memory available"):
        tool.sources.load_data(config(tmp_path))


def test_a_conv_run_counts_the_feature_maps_of_its_training_batch(tmp_path, monkeypatch):
    """--max-memory counted the pixels only: a conv run of 512 images of 128x128x3 a batch
    rose 4.4 GiB above one of 64 a batch, past what the check let through."""
    write_split_folder(tmp_path, size=(20, 30))  # 110 images of 600 bytes: 0.2 MiB held
    for arch, batch, apply, limit in (("mlp", 64, None, 2**20), ("conv", 4, None, 2**20),
                                      ("conv", 64, "new.png", 2**20),  # --apply computes in parts
                                      ("conv", 512, None, 20 * 2**20)):  # a batch of all 110
        tool.sources.load_data(config(tmp_path, max_memory=limit, arch=arch, batch_size=batch,
                                      apply=apply))
    with pytest.raises(tool.errors.DataError, match=r"110 images of 20x30x1 need about 7.9 MiB of "
                       r"memory to train on, more than --max-memory \(1.0 MiB\); use a smaller "
                       r"--image-size, a smaller --batch-size or fewer images"):
        tool.sources.load_data(config(tmp_path, max_memory=2**20, arch="conv", batch_size=64))
    with pytest.raises(tool.errors.DataError, match=r"need about 1.2 MiB"):  # twice the maps
        tool.sources.load_data(config(tmp_path, max_memory=2**20, arch="conv", batch_size=4,
                                      filters=64))
    with pytest.raises(tool.errors.DataError, match=r"\(1.0 MiB\); raise --max-memory \(a resumed run "
                       r"keeps its data and flags\)$"):  # its --batch-size cannot change
        tool.sources.load_data(config(tmp_path, max_memory=2**20, arch="conv", batch_size=64,
                                      resume=True))
    # the batch counts at the size trained on: --image-size 8x8 of 64x64 images, not 64x64
    x = np.zeros((60, 64, 64, 3), np.uint8)
    npz = write_npz(tmp_path / "big.npz", x_train=x, x_test=x[:50])
    tool.sources.load_data(config(npz, max_memory=8 * 2**20, arch="conv", batch_size=64,
                                  image_size=[8, 8]))


def test_one_class_folder_or_loose_images_give_no_labels(tmp_path):
    write_split_folder(tmp_path, classes=("only",))
    data = tool.sources.load_data(config(tmp_path))
    assert data.y_train is None and "no labels (one class folder, only)" in data.summary()
    save(str(tmp_path / "train" / "loose.png"), gray(3))
    write_split_folder(tmp_path / "two", classes=("a", "b"))
    data = tool.sources.load_data(config(tmp_path / "two"))
    assert data.y_train is not None
    save(str(tmp_path / "two" / "train" / "loose.png"), gray(3))
    data = tool.sources.load_data(config(tmp_path / "two"))
    assert data.y_train is None and "1 images are not in a class folder" in data.summary()


def test_a_fashion_mnist_export_loads_back_as_the_idx_files_give_it(tmp_path):
    (x_train, y_train), (x_test, y_test) = write_dataset(str(tmp_path / "idx"), 120, 60)
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        for k, (image, label) in enumerate(zip(x, y)):
            save(str(tmp_path / "png" / split / f"{label}-{tool.data.CLASS_NAMES[label].replace('/', '-')}"
                     / f"{k:05d}.png"), image)
    idx = tool.sources.load_data(config("fashion-mnist", data_dir=str(tmp_path / "idx")))
    png = tool.sources.load_data(config(tmp_path / "png"))
    for split in ("train", "test"):
        a, b = ([(int(y), x.tobytes()) for x, y in zip(getattr(d, "x_" + split), getattr(d, "y_" + split))]
                for d in (idx, png))
        assert sorted(a) == sorted(b)  # the same pixels and labels, as sets
    assert png.shape == idx.shape == (28, 28, 1)


def slow_at_first(k):
    """k, after a pause for the first items, so that the first chunk ends last."""
    if k < 100:
        time.sleep(0.003)
    return k


def test_parallel_map_keeps_the_order_across_processes():
    assert list(tool.folders.parallel_map(slow_at_first, range(3500))) == list(range(3500))


# --- .npz files and MNIST --------------------------------------------------------------------------

def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_an_npz_file_loads_with_its_labels_and_rgb_shape(tmp_path):
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, (60, 4, 3, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (50, 4, 3, 3), dtype=np.uint8)
    path = write_npz(tmp_path / "d.npz", x_train=x_train, x_test=x_test,
                     y_train=np.arange(60) % 4, y_test=np.arange(50) % 4)
    data = tool.sources.load_data(config(path))
    np.testing.assert_array_equal(data.x_train, x_train)
    assert data.shape == (4, 3, 3) and data.class_names == ["0", "1", "2", "3"]
    gray = write_npz(tmp_path / "g.npz", x_train=x_train[..., 0], x_test=x_test[..., 0])
    data = tool.sources.load_data(config(gray))
    assert data.shape == (4, 3, 1) and data.y_train is None and "no labels" in data.summary()
    equal = write_npz(tmp_path / "e.npz", x_train=np.repeat(x_train[..., :1], 3, -1),
                      x_test=np.repeat(x_test[..., :1], 3, -1))
    assert tool.sources.load_data(config(equal)).shape == (4, 3, 1)  # three equal channels are gray


@pytest.mark.parametrize("arrays, message", [
    (dict(x_train=np.zeros((60, 4, 4), np.uint8)), r"no x_test in the file \(it holds x_train\)"),
    (dict(x_train=np.zeros((60, 4, 4)), x_test=np.zeros((60, 4, 4), np.uint8)),
     r"x_train holds float64; images must be uint8"),
    (dict(x_train=np.zeros((60, 4, 4, 2), np.uint8), x_test=np.zeros((60, 4, 4, 2), np.uint8)),
     r"shape \(60, 4, 4, 2\); expected N x H x W"),
    (dict(x_train=np.zeros((60, 4, 4), np.uint8), x_test=np.zeros((60, 5, 4), np.uint8)),
     "x_train holds images of .4, 4., x_test of .5, 4.; both must have the same shape"),
    (dict(x_train=np.zeros((60, 4, 4), np.uint8), x_test=np.zeros((60, 4, 4), np.uint8),
          y_train=np.zeros(59, int), y_test=np.zeros(60, int)),
     r"y_train has shape \(59,\), expected \(60,\)"),
    (dict(x_train=np.zeros((60, 4, 4), np.uint8), x_test=np.zeros((60, 4, 4), np.uint8),
          y_train=np.zeros(60, int)), "labels for one split only"),
    (dict(x_train=np.zeros((60, 4, 4), np.uint8), x_test=np.zeros((60, 4, 4), np.uint8),
          y_train=np.zeros(60), y_test=np.zeros(60)), "integer class numbers"),
    (dict(x_train=np.zeros((60, 4, 4), np.uint8), x_test=np.zeros((10, 4, 4), np.uint8)),
     "60 training and 10 test images; at least 50 of each"),
])
def test_bad_npz_files_get_one_line(tmp_path, arrays, message):
    with pytest.raises(tool.errors.DataError, match=message):
        tool.sources.load_data(config(write_npz(tmp_path / "d.npz", **arrays)))


def test_a_file_that_is_not_npz_gets_one_line(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(tool.errors.DataError, match="not a readable .npz file"):
        tool.sources.load_data(config(tmp_path / "d.npz"))
    # numpy took these for pickles, and its message advised loading them with allow_pickle
    (tmp_path / "notes.txt").write_text("x_train, x_test\n")
    np.save(tmp_path / "x.npy", np.zeros((60, 4, 4), np.uint8))
    for name in ("notes.txt", "x.npy"):
        with pytest.raises(tool.errors.DataError, match=r"^\S+: not an .npz file \(a zip archive of "
                           r"arrays, as numpy.savez writes\)$"):
            tool.sources.load_data(config(tmp_path / name))


def test_mnist_comes_from_data_dir_then_keras_cache_then_download(tmp_path, monkeypatch):
    (x_train, y_train), (x_test, y_test) = make_images(60, 0), make_images(50, 1)
    folder = tmp_path / "mine"
    folder.mkdir()
    write_npz(folder / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    data = tool.sources.load_data(config("mnist", data_dir=str(folder)))
    np.testing.assert_array_equal(data.x_train[..., 0], x_train)
    assert data.class_names == [str(d) for d in range(10)] and data.source == "MNIST"
    with pytest.raises(tool.errors.DataError, match="no mnist.npz there"):
        tool.sources.load_data(config("mnist", data_dir=str(tmp_path)))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    os.makedirs(tmp_path / "keras" / "datasets")
    os.replace(folder / "mnist.npz", tmp_path / "keras" / "datasets" / "mnist.npz")
    np.testing.assert_array_equal(tool.sources.load_data(config("mnist")).y_test, y_test)
    os.remove(tmp_path / "keras" / "datasets" / "mnist.npz")

    def offline():
        raise OSError("no network")
    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    with pytest.raises(tool.errors.DataError, match=r"MNIST not found and the download failed.*--data-dir"):
        tool.sources.load_data(config("mnist"))


def test_data_dir_with_a_path_dataset_is_refused(tmp_path):
    with pytest.raises(tool.errors.DataError, match="--data-dir is for --dataset fashion-mnist or mnist"):
        tool.sources.load_data(config(tmp_path, data_dir=str(tmp_path)))


@pytest.mark.parametrize("text, value", [("28x28", [28, 28]), ("32", [32, 32]), ("64X48", [64, 48])])
def test_image_size_flag(text, value):
    assert tool.cli.parse_size(text) == value


@pytest.mark.parametrize("text", ["0x28", "28x", "axb", "1x2x3"])
def test_image_size_flag_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        tool.cli.parse_size(text)


@pytest.mark.parametrize("text, value", [("8G", 8 * 2**30), ("500M", 500 * 2**20), ("1.5GiB", 3 * 2**29),
                                         ("1000", 1000)])
def test_max_memory_flag(text, value):
    assert tool.cli.parse_bytes(text) == value


# --- the scripts on such data ----------------------------------------------------------------------

def write_colour_folder(root, n_train=100, n_test=50, size=(8, 6)):
    """Two classes of colour images: red squares and blue ones, with noise."""
    rng = np.random.default_rng(3)
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(n):
            image = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
            image[2:6, 1:5, k % 2 * 2] = 250
            save(os.path.join(root, split, ("red", "blue")[k % 2], f"{k}.png"), image)


def test_ae_on_a_colour_folder_writes_colour_grids_and_labelled_figures(tmp_path, capsys):
    import ae
    write_colour_folder(tmp_path / "data")
    out = tmp_path / "run"
    code, err, stdout = main(capsys, ae, "--dataset", tmp_path / "data", "--out", out, "--epochs", 2,
                                   "--batch-size", 50, "--h-dim", 4, "--compare-pca", "--export-codes",
                                   "--fd-samples", 500)
    assert code == 0, err
    assert stdout.startswith(f"data: {tmp_path / 'data'} (train/ and test/): 100 training and 50 test "
                             "images of 8x6, 3 channels, 2 classes (blue, red)\n")
    grid = Image.open(out / "rec_epoch_002.png")
    assert grid.mode == "RGB" and grid.size == (60, 80)  # 10 images of 6 wide, 10 of 8 high
    pixels = np.asarray(grid)
    first = np.asarray(Image.open(tmp_path / "data" / "test" / "blue" / "1.png"))  # in path order
    np.testing.assert_array_equal(pixels[:8, :6], first)  # the first test image, in colour
    codes = np.load(out / "codes.npz")
    assert sorted(codes.files) == ["test_codes", "test_labels", "train_codes", "train_labels"]
    assert sorted(np.unique(codes["test_labels"])) == [0, 1]
    figures = json.load(open(out / "pca_vs_ae.json"))
    assert figures["pca"]["knn_accuracy"] > 0.9  # red and blue squares are easy to tell apart
    summary = json.load(open(out / "summary.json"))
    assert summary["data"]["shape"] == [8, 6, 3] and summary["data"]["classes"] == ["blue", "red"]
    assert summary["sample_fd"]["classifier_test_accuracy"] > 0.9
    assert summary["sample_fd"]["samples"] > summary["sample_fd"]["test_vs_train"] > 0
    assert "sample quality: Frechet distance of 500 samples to the test set" in stdout

    # the data change: --resume refuses, touching nothing
    save(str(tmp_path / "data" / "train" / "red" / "new.png"), np.zeros((8, 6, 3), np.uint8))
    before = sorted(os.listdir(out))
    code, err, _ = main(capsys, ae, "--out", out, "--resume", "--epochs", 3)
    assert code == 2 and len(err) == 1
    assert "--resume: the data differ from those of the run in" in err[0]
    assert "100 + 50 images of 8x6x3 then" in err[0] and "101 + 50 images of 8x6x3 now" in err[0]
    assert sorted(os.listdir(out)) == before
    code, err, _ = main(capsys, ae, "--out", out, "--resume", "--image-size", "4x3")
    assert code == 2 and "--image-size [4, 3] differs" in err[0]
    # one pixel changes: the refusal says what differs, the pixels' checksum
    os.remove(tmp_path / "data" / "train" / "red" / "new.png")
    changed = tmp_path / "data" / "test" / "blue" / "1.png"
    pixels = np.asarray(Image.open(changed)).copy()
    pixels[0, 0, 0] ^= 1
    save(str(changed), pixels)
    code, err, _ = main(capsys, ae, "--out", out, "--resume", "--epochs", 3)
    assert code == 2 and len(err) == 1
    sums = re.findall(r"images of 8x6x3, checksum ([0-9a-f]{12}) (?:then|now)", err[0])
    assert len(sums) == 2 and sums[0] != sums[1], err[0]


def test_vae_on_an_unlabelled_npz_reports_bits_per_dimension(tmp_path, capsys):
    import vae
    rng = np.random.default_rng(4)
    path = write_npz(tmp_path / "d.npz", x_train=rng.integers(0, 256, (100, 5, 4), dtype=np.uint8),
                     x_test=rng.integers(0, 256, (60, 5, 4), dtype=np.uint8))
    out = tmp_path / "run"
    code, err, stdout = main(capsys, vae, "--dataset", path, "--out", out, "--epochs", 1,
                                   "--batch-size", 50, "--iw-samples", 5)
    assert code == 0, err
    assert "100 training and 60 test images of 5x4, 1 channel, no labels" in stdout
    assert "no labels, so there is no classifier to measure sample quality with" in stdout
    with open(out / "history.csv") as f:
        row = list(csv.DictReader(f))[-1]
    assert float(row["test_bits_per_dim"]) == pytest.approx(float(row["test_loss"]) / (20 * np.log(2)))
    summary = json.load(open(out / "summary.json"))
    assert summary["test_nll_iw_bits_per_dim"] == pytest.approx(summary["test_nll_iw"] / (20 * np.log(2)))
    assert Image.open(out / "sample_epoch_001.png").size == (40, 50)


def test_a_gray_palette_counts_as_gray_and_a_coloured_one_as_colour(tmp_path):
    write_split_folder(tmp_path)
    image = Image.new("P", (5, 6))
    image.putpalette([v for k in range(256) for v in (k, k, k)])  # gray levels only
    image.save(tmp_path / "train" / "cat" / "palette.png")
    assert tool.sources.load_data(config(tmp_path)).shape == (6, 5, 1)
    image.putpalette([v for k in range(256) for v in (k, 0, 0)])
    image.save(tmp_path / "train" / "cat" / "palette.png")
    assert tool.sources.load_data(config(tmp_path)).shape == (6, 5, 3)


def test_a_linked_class_folder_is_followed_once_and_a_link_loop_ends(tmp_path):
    write_split_folder(tmp_path / "real", classes=("cat", "dog"))
    root = tmp_path / "data"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        os.symlink(tmp_path / "real" / split / "cat", root / split / "cat")
        os.symlink(tmp_path / "real" / split / "dog", root / split / "dog")
    os.symlink(root, root / "train" / "cat" / "loop")  # a folder linking back up
    data = tool.sources.load_data(config(root))
    assert data.class_names == ["cat", "dog"] and len(data.x_train) == 60 and len(data.x_test) == 50


def test_a_link_to_a_sibling_class_folder_is_not_read_twice(tmp_path):
    """c1/sib -> ../c2 and c2/sib -> ../c1: whichever the walk reaches first, each real folder
    is read once, under its own name, and the links skipped are named."""
    truth = write_split_folder(tmp_path, classes=("c1", "c2"))
    for split in ("train", "test"):
        os.symlink(tmp_path / split / "c2", tmp_path / split / "c1" / "sib")
        os.symlink(tmp_path / split / "c1", tmp_path / split / "c2" / "sib")
    data = tool.sources.load_data(config(tmp_path))
    assert data.x_train.shape[0] == 60 and data.x_test.shape[0] == 50
    assert values_and_labels(data.x_train, data.y_train) == {
        (v, c) for (s, v), c in truth.items() if s == "train"}
    assert "4 link to a folder read once (" in data.notes[0] and "/sib/ -> " in data.notes[0]


def test_the_channels_count_only_the_images_that_decode(tmp_path):
    """A truncated RGB file among gray ones: its header says colour, its pixels do not load;
    the data are gray, as they are once the file is removed (so --resume then works)."""
    write_split_folder(tmp_path, classes=("only",))
    broken = tmp_path / "train" / "only" / "broken.png"
    save(str(broken), np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8))
    broken.write_bytes(broken.read_bytes()[:60])  # the header whole, the pixels cut
    data = tool.sources.load_data(config(tmp_path))
    assert data.shape == (6, 5, 1) and "broken.png" in data.notes[0]
    broken.unlink()
    assert data.description()["sha256"] == tool.sources.load_data(config(tmp_path)).description()["sha256"]


def test_an_allocation_that_fails_is_one_line(tmp_path, capsys):
    """--image-size 3000000x3000000 --max-memory 5000T: no machine has the memory; one line."""
    write_split_folder(tmp_path / "data")
    code, err, _ = main(capsys, ae_script(), "--dataset", tmp_path / "data", "--out", tmp_path / "run",
                        "--image-size", "3000000x3000000", "--max-memory", "5000T")
    assert code == 2 and len(err) == 1 and "out of memory (Unable to allocate" in err[0], err
    assert not (tmp_path / "run").exists()


def test_names_that_are_not_utf8_are_printed_escaped_on_a_strict_terminal(tmp_path, monkeypatch):
    """A class folder named b'c\\xff' and standard output that takes only UTF-8
    (PYTHONIOENCODING=utf-8): the data line prints, escaped, where it raised UnicodeEncodeError."""
    import io
    import sys
    write_split_folder(tmp_path / "data", classes=("ok", os.fsdecode(b"c\xff")))
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="utf-8", errors="strict"))
    script = ae_script()
    tool.cli.run_main(script.SCRIPT, lambda c: print(tool.sources.load_data(c).summary()),
                      script.make_parser(), ["--dataset", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    sys.stdout.flush()
    assert "2 classes (c\\udcff, ok)" in raw.getvalue().decode()


def ae_script():
    import ae
    return ae


def test_a_train_folder_without_a_test_folder_is_named(tmp_path):
    write_split_folder(tmp_path)
    os.rename(tmp_path / "test", tmp_path / "other")
    with pytest.raises(tool.errors.DataError, match=r"has a train/ folder of images but no test/ one"):
        tool.sources.load_data(config(tmp_path))


def test_moving_an_image_between_splits_changes_the_data_description(tmp_path):
    write_split_folder(tmp_path, n_test=51, classes=("only",))
    before = tool.sources.load_data(config(tmp_path)).description()["sha256"]
    # the first test image becomes the last training one: the pixels, end to end, stay the same
    os.rename(tmp_path / "test" / "only" / "000.png", tmp_path / "train" / "only" / "zz.png")
    assert tool.sources.load_data(config(tmp_path)).description()["sha256"] != before


def test_npz_labels_are_renumbered_in_order_and_empty_images_refused(tmp_path):
    x = np.zeros((60, 4, 4), np.uint8)
    path = write_npz(tmp_path / "d.npz", x_train=x, x_test=x, y_train=np.arange(60) % 2 * 3_000_000_000,
                     y_test=np.arange(60) % 2 * 3_000_000_000)
    data = tool.sources.load_data(config(path))
    assert data.class_names == ["0", "3000000000"] and set(data.y_train) == {0, 1}
    empty = write_npz(tmp_path / "e.npz", x_train=np.zeros((60, 0, 5), np.uint8),
                      x_test=np.zeros((60, 0, 5), np.uint8))
    with pytest.raises(tool.errors.DataError, match=r"shape \(60, 0, 5\)"):
        tool.sources.load_data(config(empty))


@pytest.mark.parametrize("text", ["inf", "1e400", "0.5", "0"])
def test_max_memory_flag_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        tool.cli.parse_bytes(text)


@pytest.mark.parametrize("text", ["1", "-3"])
def test_fd_samples_needs_none_or_two_at_least(text):
    with pytest.raises(argparse.ArgumentTypeError):
        tool.cli.sample_count(text)


def test_small_limits_are_shown_in_a_unit_that_shows_them():
    """--max-memory 1k was "0.0 MiB" in the refusal."""
    assert [tool.data.size_text(n) for n in (500, 1024, 100000, 30 * 2**20, 2**31)] == [
        "500 bytes", "1.0 KiB", "0.1 MiB", "30.0 MiB", "2.0 GiB"]


def test_negative_labels_are_named_as_such(tmp_path):
    x = np.zeros((60, 4, 4), np.uint8)
    labels = np.arange(60) % 3 - 1
    path = write_npz(tmp_path / "d.npz", x_train=x, x_test=x, y_train=labels, y_test=labels)
    with pytest.raises(tool.errors.DataError, match=r"y_train must hold integer class numbers "
                       r"from 0 \(its smallest is -1\)"):
        tool.sources.load_data(config(path))


def test_strict_names_an_unreadable_folder_as_a_folder():
    skipped = {"unreadable": [], "unreadable folder": ["private/"]}
    with pytest.raises(tool.errors.DataError, match=r"root: 1 folder could not be read \(private/\)"):
        tool.folders.check_strict("root", skipped, config("root", strict=True))
    skipped["unreadable"] = ["a.png (OSError: truncated)", "b.png (OSError: truncated)"]
    with pytest.raises(tool.errors.DataError, match=r"2 image files and 1 folder could not be read"):
        tool.folders.check_strict("root", skipped, config("root", strict=True))


def test_images_pillow_calls_decompression_bombs_are_decoded_with_one_note(tmp_path, monkeypatch,
                                                                         recwarn):
    """Pillow's two-line DecompressionBombWarning for a large image reached stderr as is."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 30 pixels are "large" now
    write_split_folder(tmp_path, size=(40, 30))
    data = tool.sources.load_data(config(tmp_path))
    assert data.x_train.shape == (60, 40, 30, 1)
    assert "decoded 110 images of more than 1,000 pixels, which Pillow warns of" in data.notes[-1]
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
