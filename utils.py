"""Helpers shared by ae.py and vae.py: data, image grids, output files, the epoch loop.

Nothing here runs at import time beyond importing TensorFlow, so tests can import it freely.
"""

import argparse
import csv
import gzip
import os
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
from PIL import Image

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
# Larger than any Fashion-MNIST file once decompressed (the training images are 47 MB);
# a bigger stream is not ours, and reading it in chunks up to this cap bounds memory.
MAX_IDX_BYTES = 64 * 2**20
HOW_TO_GET_DATA = (
    "Fashion-MNIST not found and the download failed. Install it offline with "
    "'apt-get install dataset-fashion-mnist' (Debian/Ubuntu, files in "
    f"{DEBIAN_DIR}), or put the four .gz files from "
    "https://github.com/zalandoresearch/fashion-mnist in a folder and pass --data-dir DIR "
    "(or set FASHION_MNIST_DIR)."
)


class UserError(Exception):
    """An expected mistake (bad data, bad flags, unwritable output): reported in one line."""


class DataError(UserError, ValueError):
    """Missing or malformed Fashion-MNIST files; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def read_idx(path, kind):
    """Read one gzip-compressed IDX file of unsigned bytes, checking everything it promises.

    Args:
        path: the .gz file.
        kind: "images" (magic 0x803, n x 28 x 28) or "labels" (magic 0x801, n).
    Returns:
        A uint8 array of shape (n, 28, 28) or (n,).
    Raises:
        DataError naming the file and what is wrong with it.
    """
    ndim = 3 if kind == "images" else 1
    try:
        with gzip.open(path, "rb") as f:
            chunks, size = [], 0
            while chunk := f.read(2**20):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_IDX_BYTES:
                    raise DataError(f"{path}: more than {MAX_IDX_BYTES} bytes once decompressed; "
                                    "not a Fashion-MNIST file")
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, ValueError) as e:  # gzip.BadGzipFile, zlib.error, truncation
        raise DataError(f"{path}: not a readable gzip file ({e or type(e).__name__})") from None
    data = b"".join(chunks)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: {len(data)} bytes, too short for an IDX header of {header}")
    magic = int.from_bytes(data[:4], "big")
    if magic != 0x800 + ndim:
        raise DataError(f"{path}: IDX magic number {magic:#x}, expected {0x800 + ndim:#x} "
                        f"(unsigned bytes, {ndim} dimension{'s' * (ndim > 1)})")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if dims[1:] != [28, 28][:ndim - 1]:
        raise DataError(f"{path}: images of {dims[1]}x{dims[2]} pixels, expected 28x28")
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"{path}: header promises {dims[0]} {kind} ({expected} bytes) "
                        f"but the file holds {len(data)} bytes")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def read_fashion_mnist_dir(data_dir):
    """Read the four Fashion-MNIST files in data_dir; see load_fashion_mnist."""
    arrays = {name: read_idx(os.path.join(data_dir, file), name.split("_")[1])
              for name, file in FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DataError(f"{os.path.join(data_dir, FILES[split + '_labels'])}: "
                            f"{len(labels)} labels for {len(images)} images")
    return ((arrays["train_images"], arrays["train_labels"]),
            (arrays["test_images"], arrays["test_labels"]))


def has_fashion_mnist(data_dir):
    return all(os.path.exists(os.path.join(data_dir, f)) for f in FILES.values())


def load_fashion_mnist(data_dir=None):
    """Load Fashion-MNIST without a network when it is on disk.

    Looks in this order: data_dir; $FASHION_MNIST_DIR; Keras's cache
    (~/.keras/datasets/fashion-mnist); /usr/share/datasets/fashion-mnist (Debian's
    dataset-fashion-mnist); finally keras.datasets.fashion_mnist.load_data(), which downloads.
    A folder named by data_dir or the variable must hold the files.

    Returns:
        ((x_train, y_train), (x_test, y_test)): uint8 arrays shaped like Keras's loader gives.
    Raises:
        DataError (a ValueError) with a one-line message.
    """
    named = data_dir or os.environ.get("FASHION_MNIST_DIR")
    if named:
        source = "--data-dir" if data_dir else "FASHION_MNIST_DIR"
        if not os.path.isdir(named):
            raise DataError(f"{named}: no such folder ({source})")
        missing = [f for f in FILES.values() if not os.path.exists(os.path.join(named, f))]
        if missing:
            raise DataError(f"{named}: missing {', '.join(missing)} ({source}); "
                            "the folder must hold the four Fashion-MNIST .gz files")
        return read_fashion_mnist_dir(named)
    keras_home = os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras"))
    for folder in (os.path.join(keras_home, "datasets", "fashion-mnist"), DEBIAN_DIR):
        if has_fashion_mnist(folder):
            return read_fashion_mnist_dir(folder)
    try:
        import keras
        return keras.datasets.fashion_mnist.load_data()
    except Exception:  # no network, proxy, disk full: all lead to the same advice
        raise DataError(HOW_TO_GET_DATA) from None


# ---------------------------------------------------------------------------------------------
# Images and output files
# ---------------------------------------------------------------------------------------------


def write_atomically(path, write):
    """Call write(tmp_path), then rename over path, so path is never left half-written."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_images(images, path):
    """Save 100 28x28 uint8 images as one 280x280 grayscale PNG, a 10x10 grid in row-major order.

    Image k lands at row k // 10, column k % 10.
    """
    images = np.asarray(images, np.uint8).reshape(10, 10, 28, 28)
    grid = images.transpose(0, 2, 1, 3).reshape(280, 280)
    # compress_level 1: half the encoding time of the default for 10% more bytes, as this runs
    # every epoch
    write_atomically(path, lambda tmp: Image.fromarray(grid, mode="L").save(
        tmp, format="PNG", compress_level=1))


def to_uint8(images):
    """Pixels in [0, 1] (any shape with 784 per image) -> uint8 images of 28x28."""
    return (np.clip(np.asarray(images), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).reshape(-1, 28, 28)


def pair_grid(originals, reconstructions):
    """50 originals and their reconstructions -> 100 images, originals in the even columns."""
    return np.stack([to_uint8(originals[:50]), to_uint8(reconstructions[:50])], 1).reshape(100, 28, 28)


def prepare_out_dir(out_dir):
    """Create out_dir and check it is writable before any training starts."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise UserError(f"cannot write to output folder {out_dir}: {e.strerror}; "
                        "choose another with --out") from None


def write_history(path, rows):
    """Write the per-epoch rows (dicts with the same keys) as CSV, replacing the file atomically."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    write_atomically(path, write)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def positive(type_):
    """An argparse type: type_(text), accepted only when finite and > 0."""
    def parse(text):
        value = type_(text)
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value
    parse.__name__ = type_.__name__
    return parse


def make_parser(description, epochs, out):
    """The flags both scripts take; each adds its own."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=positive(int), default=epochs, metavar="N",
                        help="training epochs")
    parser.add_argument("--batch-size", type=positive(int), default=512, metavar="N",
                        help="training batch size")
    parser.add_argument("--lr", type=positive(float), default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=22, help="random seed (weights, shuffling, noise)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="folder with the four Fashion-MNIST .gz files (default: "
                        "$FASHION_MNIST_DIR, Keras's cache, " + DEBIAN_DIR + ", then download)")
    parser.add_argument("--out", default=out, metavar="DIR", help="output folder for grids and history")
    return parser


def run_main(prog, train, config):
    """Run train(config); expected mistakes become one line on stderr and exit code 2."""
    try:
        return train(config)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# Training: whole epochs compiled
# ---------------------------------------------------------------------------------------------


def compile_epoch(train_step, names, generator, batch_size):
    """Build a compiled function that runs one epoch of train_step over a shuffled data set.

    The data stay in memory as uint8; each epoch draws a fresh permutation from generator (whose
    state is checkpointable), and XLA compiles the whole loop over batches into one call. The
    last, smaller batch is kept, as tf.data's batch() keeps it.

    Args:
        train_step: fn(x) for a float batch x in [0, 1] of shape (b, 784), returning a dict of
            scalar losses (the keys in names), each a mean over the batch.
        names: the keys of train_step's dict.
        generator: a tf.random.Generator.
        batch_size: examples per step.
    Returns:
        train_epoch(x_train) -> dict of the losses averaged over the epoch's examples.
    """
    @tf.function(jit_compile=True)
    def train_epoch(x_train):
        n = x_train.shape[0]
        n_full, rest = divmod(n, batch_size)
        order = tf.argsort(generator.uniform([n]))

        def step(totals, idx):
            x = tf.cast(tf.gather(x_train, idx), tf.float32) / 255.0
            losses = train_step(x)
            size = tf.cast(tf.shape(idx)[0], tf.float32)
            return {k: totals[k] + losses[k] * size for k in names}

        totals = {k: tf.zeros([]) for k in names}
        batches = tf.reshape(order[:n_full * batch_size], [n_full, batch_size])
        for i in tf.range(n_full):
            totals = step(totals, batches[i])
        if rest:
            totals = step(totals, order[n_full * batch_size:])
        return {k: v / n for k, v in totals.items()}

    return train_epoch
