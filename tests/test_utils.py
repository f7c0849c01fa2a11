"""Unit tests for utils.py: the grid layout, the loader on files written here, output checks."""

import gzip
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import utils
import tool.checkpoints
import tool.cli
import tool.errors
import tool.files
import tool.quiet
import tool.sources
from conftest import eager_epoch, idx_bytes, write_dataset, write_gz


# --- save_images -------------------------------------------------------------------------------

def test_save_images_places_image_k_at_row_k_div_10_column_k_mod_10(tmp_path):
    images = np.zeros((100, 28, 28), np.uint8)
    for k in range(100):
        images[k] = k
        images[k, 0, 1] = 255  # a mark that shows orientation: top row, second pixel
    path = tmp_path / "grid.png"
    utils.save_images(images, str(path))
    img = Image.open(path)
    assert img.mode == "L" and img.size == (280, 280)
    grid = np.array(img)
    for k in range(100):
        r, c = divmod(k, 10)
        block = grid[28 * r:28 * r + 28, 28 * c:28 * c + 28]
        assert block[0, 1] == 255
        block[0, 1] = k
        assert (block == k).all(), f"image {k} not at row {r}, column {c}"


def test_save_images_rejects_wrong_count(tmp_path):
    with pytest.raises(ValueError):
        utils.save_images(np.zeros((99, 28, 28), np.uint8), str(tmp_path / "x.png"))


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("the old file\n")

    def write_half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("half a new fi")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        utils.write_atomically(str(path), write_half_then_fail)
    assert os.listdir(tmp_path) == ["history.csv"] and path.read_text() == "the old file\n"


def test_pair_grid_puts_originals_in_even_columns():
    originals = np.tile(np.arange(50)[:, None] / 255.0, (1, 784))
    reconstructions = 1.0 - originals
    grid = utils.pair_grid(originals, reconstructions, (28, 28, 1))
    assert grid.shape == (100, 28, 28)
    for k in range(100):
        r, c = divmod(k, 10)
        i = 5 * r + c // 2
        expected = i if c % 2 == 0 else 255 - i
        assert (grid[k] == expected).all()


# --- load_fashion_mnist ----------------------------------------------------------------------

def test_loader_reads_what_was_written(tmp_path):
    (x_train, y_train), (x_test, y_test) = write_dataset(str(tmp_path), n_train=30, n_test=20)
    (a, b), (c, d) = tool.sources.load_fashion_mnist(str(tmp_path))
    assert a.dtype == np.uint8 and a.shape == (30, 28, 28) and b.shape == (30,)
    assert c.shape == (20, 28, 28) and d.shape == (20,)
    np.testing.assert_array_equal(a, x_train)
    np.testing.assert_array_equal(b, y_train)
    np.testing.assert_array_equal(c, x_test)
    np.testing.assert_array_equal(d, y_test)


def corrupt(folder, file, payload, compress=True):
    path = os.path.join(folder, tool.sources.FILES[file])
    if compress:
        write_gz(path, payload)
    else:
        with open(path, "wb") as f:
            f.write(payload)
    return path


IMAGES = np.random.default_rng(0).integers(0, 256, (30, 28, 28), dtype=np.uint8)
CASES = {
    "not gzip": (b"plain bytes, not gzip", False, "not a readable gzip file"),
    "empty file": (b"", False, "too short for an IDX header"),
    "truncated gzip": (gzip.compress(idx_bytes(IMAGES))[:200], False, "not a readable gzip file"),
    "short header": (b"\x00\x00\x08", True, "too short for an IDX header"),
    "wrong magic": (idx_bytes(IMAGES, magic=0x0801), True, "magic number 0x801, expected 0x803"),
    "float data": (idx_bytes(IMAGES, magic=0x0D03), True, "magic number 0xd03"),
    "not 28x28": (idx_bytes(np.zeros((30, 28, 27))), True, "28x27 pixels, expected 28x28"),
    "too few bytes": (idx_bytes(IMAGES)[:-1], True, "header promises 30 images"),
    "too many bytes": (idx_bytes(IMAGES) + b"\x00", True, "but the file holds"),
    "billions promised": (idx_bytes(IMAGES)[:4] + (2**32 - 1).to_bytes(4, "big") + idx_bytes(IMAGES)[8:],
                          True, "header promises 4294967295 images"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loader_names_the_file_and_the_fault(tmp_path, case):
    write_dataset(str(tmp_path), n_train=30, n_test=20)
    payload, compress, message = CASES[case]
    path = corrupt(str(tmp_path), "train_images", payload, compress)
    with pytest.raises(ValueError) as info:
        tool.sources.load_fashion_mnist(str(tmp_path))
    assert isinstance(info.value, tool.errors.DataError)
    assert path in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_loader_rejects_labels_with_images_magic(tmp_path):
    write_dataset(str(tmp_path), n_train=30, n_test=20)
    corrupt(str(tmp_path), "test_labels", idx_bytes(IMAGES[:20]))
    with pytest.raises(tool.errors.DataError, match="expected 0x801"):
        tool.sources.load_fashion_mnist(str(tmp_path))


def test_loader_rejects_unequal_counts(tmp_path):
    write_dataset(str(tmp_path), n_train=30, n_test=20)
    path = corrupt(str(tmp_path), "train_labels", idx_bytes(np.zeros(29)))
    with pytest.raises(tool.errors.DataError, match="29 labels for 30 images") as info:
        tool.sources.load_fashion_mnist(str(tmp_path))
    assert path in str(info.value)


def test_named_folder_missing_files_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    good = tmp_path / "good"
    write_dataset(str(good), n_train=30, n_test=20)
    monkeypatch.setattr(tool.sources, "DEBIAN_DIR", str(good))  # a fallback that would succeed
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(tool.errors.DataError, match="missing train-images-idx3-ubyte.gz"):
        tool.sources.load_fashion_mnist(str(empty))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(empty))
    with pytest.raises(tool.errors.DataError, match="FASHION_MNIST_DIR"):
        tool.sources.load_fashion_mnist()
    with pytest.raises(tool.errors.DataError, match="no such folder"):
        tool.sources.load_fashion_mnist(str(tmp_path / "nowhere"))


def test_search_order(tmp_path, monkeypatch):
    """--data-dir, then $FASHION_MNIST_DIR, then Keras's cache, then the Debian folder."""
    sizes = {"arg": 11, "env": 12, "cache": 13, "debian": 14}
    folders = {name: tmp_path / name for name in sizes}
    cache = tmp_path / "keras_home" / "datasets" / "fashion-mnist"
    folders["cache"] = cache
    for name, folder in folders.items():
        write_dataset(str(folder), n_train=sizes[name], n_test=5)
    monkeypatch.setattr(tool.sources, "DEBIAN_DIR", str(folders["debian"]))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(folders["env"]))

    def n_train(data_dir=None):
        return len(tool.sources.load_fashion_mnist(data_dir)[0][0])

    assert n_train(str(folders["arg"])) == 11
    assert n_train() == 12
    monkeypatch.delenv("FASHION_MNIST_DIR")
    assert n_train() == 13
    os.remove(cache / tool.sources.FILES["test_labels"])
    assert n_train() == 14


def test_nothing_found_and_download_fails_says_how_to_get_the_data(tmp_path, monkeypatch):
    import keras

    def offline():
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(tool.sources, "DEBIAN_DIR", str(tmp_path / "none"))
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(tool.errors.DataError) as info:
        tool.sources.load_fashion_mnist()
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert "--data-dir" in str(info.value)


def test_a_download_is_checked_like_a_file(tmp_path, monkeypatch):
    import keras
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(tool.sources, "DEBIAN_DIR", str(tmp_path / "none"))
    good = (np.zeros((5, 28, 28), np.uint8), np.zeros(5, np.uint8))
    bad = (np.zeros((5, 28, 27), np.uint8), np.zeros(5, np.uint8))
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", lambda: (good, good))
    assert tool.sources.load_fashion_mnist()[1][0].shape == (5, 28, 28)
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", lambda: (good, bad))
    with pytest.raises(tool.errors.DataError, match="downloaded test set is not Fashion-MNIST"):
        tool.sources.load_fashion_mnist()


# --- outputs and flags -------------------------------------------------------------------------

def test_unwritable_output_folder_is_reported(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    with pytest.raises(tool.errors.UserError, match="is a file, not a folder"):
        tool.files.check_folder(str(blocker / "out"), "--out")
    assert blocker.read_text() == "keep me"


def test_history_is_replaced_whole(tmp_path):
    path = str(tmp_path / "history.csv")
    tool.files.write_history(path, [{"epoch": 1, "loss": 0.5}])
    tool.files.write_history(path, [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.1 + 0.2}])
    # every digit of a float, so a history rebuilt from the checkpoint is the same file
    assert open(path).read().splitlines() == ["epoch,loss", "1,0.5", "2,0.30000000000000004"]
    assert os.listdir(tmp_path) == ["history.csv"]


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--batch-size", "-1"], ["--lr", "0"],
                                   ["--lr", "nan"], ["--lr", "inf"], ["--epochs", "two"]])
def test_parser_rejects_impossible_values(flags, capsys):
    parser = tool.cli.make_parser("test", epochs=3, out="x")
    with pytest.raises(SystemExit) as info:
        parser.parse_args(flags)
    err = capsys.readouterr().err.splitlines()
    assert info.value.code == 2 and len(err) == 1 and flags[0] in err[0]  # no usage block


def test_written_files_get_the_usual_permissions(tmp_path):
    utils.save_images(np.zeros((100, 28, 28), np.uint8), str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").stat().st_mode & 0o777 == 0o666 & ~utils.UMASK


# --- compile_epoch ---------------------------------------------------------------------------

def test_checkpoints_keep_the_newest_three_and_restore_whole(tmp_path):
    directory = str(tmp_path / "checkpoints")
    value, history = tf.Variable([1.0, 2.0]), tf.Variable("", dtype=tf.string)
    checkpoint = tf.train.Checkpoint(value=value, run_history=history)
    checkpoints = tool.checkpoints.Checkpoints(checkpoint, directory)
    for epoch in range(1, 6):
        value.assign([epoch, -epoch])
        history.assign(f"rows 1-{epoch}")
        checkpoints.save(epoch)
    assert {f.split(".")[0] for f in os.listdir(directory) if f != "checkpoint"} == {"ckpt-3", "ckpt-4", "ckpt-5"}
    assert tf.train.latest_checkpoint(directory) == os.path.join(directory, "ckpt-5")
    state = tf.train.get_checkpoint_state(directory)
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == ["ckpt-3", "ckpt-4", "ckpt-5"]
    restored = tf.train.Checkpoint(value=tf.Variable([0.0, 0.0]), run_history=tf.Variable("", dtype=tf.string))
    restored.restore(os.path.join(directory, "ckpt-4")).assert_existing_objects_matched()
    assert restored.value.numpy().tolist() == [4.0, -4.0]
    assert restored.run_history.numpy() == b"rows 1-4"
    # continued from ckpt-4 (a resume): the newer ckpt-5 is written again, the oldest goes
    again = tool.checkpoints.Checkpoints(checkpoint, directory, [os.path.join(directory, f"ckpt-{e}") for e in (3, 4)])
    again.save(5)
    again.save(6)
    assert {f.split(".")[0] for f in os.listdir(directory) if f != "checkpoint"} == {"ckpt-4", "ckpt-5", "ckpt-6"}


def test_compile_epoch_uses_each_example_once_and_weights_the_short_batch():
    """Batches of 4 from 10 examples: 4, 4, then 2. Each example's value is its index, so the
    epoch's mean is exact only when every example counts once, the last two included."""
    n, seen = 10, tf.Variable(tf.zeros([10]))

    def train_step(x):
        index = tf.cast(tf.round(x[:, 0] * 255.0), tf.int32)
        seen.scatter_add(tf.IndexedSlices(tf.ones_like(x[:, 0]), index))
        return {"value": tf.reduce_mean(x[:, 0] * 255.0)}

    x_train = tf.constant(np.repeat(np.arange(n, dtype=np.uint8)[:, None], 784, 1))
    # after, in the same call, sees the epoch's updates done (as the test figures must)
    epoch = utils.compile_epoch(train_step, ["value"], tf.random.Generator.from_seed(3), 4,
                                after=lambda: seen.read_value() * 1)
    losses, after = epoch(x_train)
    assert float(losses["value"]) == pytest.approx(np.arange(n).mean(), rel=1e-6)
    np.testing.assert_array_equal(seen.numpy(), np.ones(n))
    np.testing.assert_array_equal(after, np.ones(n))
    np.testing.assert_array_equal(epoch(x_train)[1], 2 * np.ones(n))
    np.testing.assert_array_equal(seen.numpy(), 2 * np.ones(n))


def test_compile_epoch_trains_as_a_plain_eager_loop_does():
    """The oracle: the tutorial's loop, one eager step per batch of the same permutation."""
    import ae
    config = ae.make_parser().parse_args(["--h-dim", "3"])
    x_train = np.random.default_rng(0).integers(0, 256, (50, 784), dtype=np.uint8)

    def setup():
        keras.utils.set_random_seed(1)
        model = ae.AE(3)
        model(tf.zeros([1, 784]))
        optimizers = ae.make_optimizers(config, model, 4)
        return model, optimizers, tf.random.Generator.from_seed(2)

    model, optimizers, generator = setup()
    epoch = utils.compile_epoch(ae.make_train_step(config, model, optimizers, generator), ["bce"],
                                generator, 16)
    compiled = float(epoch(tf.constant(x_train))[0]["bce"])

    model2, optimizers2, generator2 = setup()
    step = ae.make_train_step(config, model2, optimizers2, generator2)
    # batches of 16, 16, 16, then 2
    eager = eager_epoch(step, generator2, x_train, 16, "bce", xla=True)
    assert compiled == pytest.approx(eager, rel=1e-4)
    for a, b in zip(model.weights, model2.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


def loading_tensorflow_stderr(writes, level=None):
    """What reaches standard error of a process that writes writes (byte strings, each one
    write, as TensorFlow's C++ logging writes a record) inside tool.quiet.loading_tensorflow()."""
    import subprocess
    import sys
    script = ("import os, sys; sys.path.insert(0, sys.argv[1]); import tool.quiet\n"
              "with tool.quiet.loading_tensorflow():\n"
              f"    for chunk in {writes!r}:\n"
              "        os.write(2, chunk)\n"
              "    print('UserWarning: a real one', file=sys.stderr)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = str(level)
    result = subprocess.run([sys.executable, "-c", script, root], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return result.stderr


START_UP_RECORDS = [  # as TensorFlow 2.21 writes them on an AVX-512 CPU, and older releases
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    b"I0000 00:00:1796152101.048849    1977 port.cc:153] oneDNN custom operations are on.\n",
    b"I0000 00:00:1796152140.419577    2000 cpu_feature_guard.cc:227] This TensorFlow binary is "
    b"optimized to use available CPU instructions.\nTo enable the following instructions: AVX2 "
    b"AVX512F, in other operations, rebuild TensorFlow with the appropriate compiler flags.\n",
    b"2023-10-24 10:56:05.523404: W tensorflow/core/util/port.cc:111] a warning of an old release\n",
]
ERROR_RECORD = b"E0000 00:00:1796152142.656909    2000 some_kernel.cc:52] a real error\n"


def test_loading_tensorflow_holds_back_the_records_below_the_log_level():
    """Records below TF_CPP_MIN_LOG_LEVEL (2 by default: info and warnings), with the lines that
    continue them, are dropped, whatever they say; an error record and a Python warning pass."""
    stderr = loading_tensorflow_stderr(START_UP_RECORDS + [ERROR_RECORD])
    assert stderr == ERROR_RECORD.decode() + "UserWarning: a real one\n"


def test_loading_tensorflow_passes_what_the_log_level_asks_for():
    """TF_CPP_MIN_LOG_LEVEL=0 set by the user: TensorFlow's info records reach them (the real
    ones of its import too)."""
    stderr = loading_tensorflow_stderr(START_UP_RECORDS[1:3], level=0)
    assert stderr.endswith(b"".join(START_UP_RECORDS[1:3]).decode() + "UserWarning: a real one\n")
