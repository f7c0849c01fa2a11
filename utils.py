"""Helpers shared by ae.py and vae.py: data, image grids, output files, the epoch loop.

Nothing here runs at import time beyond loading TensorFlow (quietly, see loading_tensorflow), so
tests can import it freely. The scripts import it before TensorFlow for that reason.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import csv
import errno
import functools
import glob
import gzip
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import zipfile

# TensorFlow's C++ libraries log while they load, before absl::InitializeLog() has run, and absl
# then writes every record to standard error whatever TF_CPP_MIN_LOG_LEVEL says (the level
# applies only once TensorFlow has started). Each of the two libraries carries its own copy of
# absl, so each record comes twice, the second when the second library loads: "oneDNN custom
# operations are on" on CPUs with AVX-512 VNNI, BF16 or AMX, the instructions a binary was not
# built for, "could not find cuda drivers". While TensorFlow loads, records below the level are
# held back as TensorFlow holds them back afterwards; every other line passes at once.
LOG_RECORD = re.compile(  # absl's "I1201 19:07:27.123456   42 port.cc:153] " (before its start
    # the time is "00:00:" and seconds since 1970), or TF's older
    # "2024-01-01 19:07:27.123456: I tensorflow/core/util/port.cc:113] "
    rb"(?:\d{4}-\d\d-\d\d [\d:.]+: )?([IWEF])(?:\d{4} [\d:.]+ +\d+)? \S+:\d+\] ")
SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}
ABSL_NOTICE = b"All log messages before absl::InitializeLog() is called are written to STDERR"
NO_GPU_NOISE = b"failed call to cuInit"  # an error record that means only "no GPU here"


def held_back(chunk, level, no_gpu):
    """What of a chunk of standard error to pass on while TensorFlow loads: the lines left once
    the records below level (with the lines that continue them in the same write: a record is
    written at once), absl's notice that it logs before its start, and, without a GPU, the
    failed search for one are taken out."""
    kept, holding = [], False
    for line in chunk.splitlines(keepends=True):
        record = LOG_RECORD.match(line)
        if record:
            holding = SEVERITY[record[1]] < level or (no_gpu and NO_GPU_NOISE in line)
        elif ABSL_NOTICE in line:
            holding = True
        if not holding:
            kept.append(line)
    return b"".join(kept)


def min_log_level():
    """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it: 0 for a value that is not a number."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def loading_tensorflow():
    """Around TensorFlow's import and its platform start: Ctrl-C gives one line and exit 130
    (nothing is written yet), and the C++ records TensorFlow logs while it loads are held back
    below TF_CPP_MIN_LOG_LEVEL (2 unless set: warnings and info) as TensorFlow holds them back
    once started (see LOG_RECORD). Standard error goes through a pipe meanwhile, from which a
    thread passes every other line on. Enter it before anything imports TensorFlow: a second
    import loads nothing and logs nothing."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    level, no_gpu = min_log_level(), not glob.glob("/dev/nvidia[0-9]*")
    main = threading.current_thread() is threading.main_thread()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_end, write_end = os.pipe()
    except (OSError, ValueError):  # no usable standard error: nothing to hold back
        yield
        return

    def interrupted(signum, frame):
        os.write(saved, f"{os.path.basename(sys.argv[0])}: interrupted\n".encode())
        os._exit(130)

    def forward():
        while chunk := os.read(read_end, 65536):  # whole writes: a record with its lines
            if kept := held_back(chunk, level, no_gpu):
                os.write(saved, kept)
        os.close(read_end)

    previous = signal.signal(signal.SIGINT, interrupted) if main else None
    forwarder = threading.Thread(target=forward, daemon=True)
    forwarder.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        if main:
            signal.signal(signal.SIGINT, previous)
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread reads to its end
        forwarder.join(timeout=5)
        os.close(saved)


with loading_tensorflow():
    import numpy as np
    import keras
    from keras import layers
    import tensorflow as tf
    tf.config.list_physical_devices()  # starts the platforms, which log, now
from PIL import Image, ImageOps  # noqa: E402

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
    exit_code = 2


class Diverged(UserError):
    """The loss stopped being finite."""
    exit_code = 3


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
        data = keras.datasets.fashion_mnist.load_data()
    except Exception:  # no network, proxy, disk full: all lead to the same advice
        raise DataError(HOW_TO_GET_DATA) from None
    check_downloaded(data)
    return data


def check_downloaded(data):
    """Check what keras.datasets.fashion_mnist.load_data() gave as read_idx checks a file: uint8
    images of 28x28 and as many labels, from 0 to 9."""
    where = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "datasets",
                         "fashion-mnist")
    for split, (images, labels) in zip(("train", "test"), data):
        images, labels = np.asarray(images), np.asarray(labels)
        if (images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28)
                or labels.shape != (len(images),) or len(labels) and labels.max() > 9):
            raise DataError(f"{where}: the downloaded {split} set is not Fashion-MNIST (images "
                            f"{images.dtype} {images.shape}, labels {labels.shape}); delete the "
                            "folder to download it again")


# ---------------------------------------------------------------------------------------------
# Any data set: --dataset fashion-mnist, mnist, a folder of images or an .npz file
# ---------------------------------------------------------------------------------------------

IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")  # a GIF or WebP: its first frame
RESAMPLE = Image.Resampling.LANCZOS  # Pillow's Lanczos filter, anti-aliased when shrinking
BACKGROUND = (0, 0, 0, 255)  # transparent pixels are composited on black, as Fashion-MNIST's is
MIN_IMAGES = 50  # per split: the reconstruction grids show 50 test images
SHOWN = 3  # skipped files named in the line that counts them
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
MNIST_FILE = "mnist.npz"
HOW_TO_GET_MNIST = (
    "MNIST not found and the download failed. On a machine with internet, "
    "python -c 'import keras; keras.datasets.mnist.load_data()' puts mnist.npz into "
    "~/.keras/datasets; copy it to the same place here, or pass --data-dir DIR for a folder "
    "holding mnist.npz.")


class Data:
    """Images as the models take them: uint8 arrays (n, height, width, channels), labels (n,)
    where the data have them, and where they came from."""

    def __init__(self, source, x_train, y_train, x_test, y_test, class_names=None, notes=(),
                 no_labels=None):
        self.source, self.notes, self.no_labels = source, list(notes), no_labels
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test
        self.class_names = class_names if y_train is not None else None
        self.shape = x_train.shape[1:]  # (height, width, channels)
        self.pixels = int(np.prod(self.shape))

    @functools.cache
    def description(self):
        """What identifies the data of a run (kept with it, so --resume can tell a change)."""
        digest = hashlib.sha256()
        for array in (self.x_train, self.y_train, self.x_test, self.y_test):
            if array is not None:  # the shape too: moving an image between splits is a change
                digest.update(repr(array.shape).encode())
                digest.update(np.ascontiguousarray(array).data)
        return {"source": self.source, "train": len(self.x_train), "test": len(self.x_test),
                "shape": list(self.shape), "classes": self.class_names,
                "sha256": digest.hexdigest()}

    def report(self, prog):
        """Say before training what the data are, and (on standard error) what was skipped."""
        print(self.summary(), flush=True)
        for note in self.notes:
            print(f"{prog}: {note}", file=sys.stderr, flush=True)

    def summary(self):
        """The line printed before training."""
        h, w, c = self.shape
        classes = self.no_labels or "no labels"
        if self.class_names:
            names = ", ".join(self.class_names[:10]) + ", ..." * (len(self.class_names) > 10)
            classes = f"{len(self.class_names)} classes ({names})"
        return (f"data: {self.source}: {len(self.x_train):,} training and {len(self.x_test):,} "
                f"test images of {h}x{w}, {c} channel{'s' * (c > 1)}, {classes}")


def load_data(config):
    """The data --dataset names, converted as --image-size and --channels say.

    Returns a Data; raises DataError with a one-line message (nothing decoded beyond
    --max-memory). Files skipped from a folder are listed in Data.notes.
    """
    dataset = config.dataset
    if config.data_dir and dataset not in ("fashion-mnist", "mnist"):
        raise DataError(f"--data-dir is for --dataset fashion-mnist or mnist; --dataset {dataset} "
                        "names the data itself")
    limit = memory_limit(config)
    if dataset == "fashion-mnist":
        (x_train, y_train), (x_test, y_test) = load_fashion_mnist(config.data_dir)
        return from_arrays("Fashion-MNIST", x_train, y_train, x_test, y_test, config, limit,
                           CLASS_NAMES)
    if dataset == "mnist":
        path = find_mnist(config.data_dir)
        if path is None:
            try:
                (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
            except Exception:
                raise DataError(HOW_TO_GET_MNIST) from None
            check_labels(f"MNIST as downloaded", x_train, y_train, x_test, y_test)
        else:
            (x_train, y_train), (x_test, y_test) = read_npz(path, config, limit)
        return from_arrays("MNIST", x_train, y_train, x_test, y_test, config, limit,
                           [str(d) for d in range(10)])
    if os.path.isdir(dataset):
        return read_image_folder(dataset, config, limit)
    if os.path.isfile(dataset):
        (x_train, y_train), (x_test, y_test) = read_npz(dataset, config, limit)
        names = None
        if y_train is not None:  # the classes are the label values found, numbered in order
            values = np.unique(np.concatenate([y_train, y_test]))
            names = [str(v) for v in values]
            y_train, y_test = np.searchsorted(values, y_train), np.searchsorted(values, y_test)
        return from_arrays(dataset, x_train, y_train, x_test, y_test, config, limit, names)
    raise DataError(f"--dataset {dataset}: no such file or folder (--dataset takes fashion-mnist, "
                    "mnist, a folder of images or an .npz file)")


def memory_limit(config):
    """The most memory the data, and what is computed from them at once, may take: --max-memory,
    else half of the memory available."""
    return config.max_memory or available_memory() // 2


def available_memory():
    """Bytes of memory available to a new allocation (Linux's MemAvailable), else the total."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def size_text(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# Bytes of memory a run takes per byte of its decoded pixels, beyond TensorFlow's own: the
# arrays as loaded, TensorFlow's copy of the training set, the test set as floats. Measured as
# the rise of peak memory from 5,500 to 22,000 images of 64x64x3: 3.3 for ae.py, 2.2 for vae.py.
MEMORY_PER_PIXEL_BYTE = 3.5


def run_bytes(n, pixels):
    """About the memory a run holds for n images of pixels bytes each."""
    return int(MEMORY_PER_PIXEL_BYTE * n * pixels)


def check_memory(where, n, shape, config, limit):
    """Refuse data whose run would need more than limit (see run_bytes; n x height x width x
    channels bytes of pixels)."""
    need = run_bytes(n, int(np.prod(shape)))
    if need > limit:
        raise DataError(f"{where}: {n:,} images of {'x'.join(map(str, shape))} need about "
                        f"{size_text(need)} of memory to train on, more than "
                        f"{limit_text(config, limit)}; use a smaller --image-size or fewer "
                        "images, or raise --max-memory")


def check_pca_memory(config, data):
    """Refuse --compare-pca, before a run starts, where its PCA (see pca_bytes), beside what the
    run holds (see run_bytes), would need more than the memory limit."""
    n, d = len(data.x_train), data.pixels
    pca = pca_bytes(n, d)
    held = run_bytes(n + len(data.x_test), d)
    limit = memory_limit(config)
    if pca + held > limit:
        raise UserError(f"--compare-pca: the PCA of {n:,} images of {d:,} values needs about "
                        f"{size_text(pca)} of memory beside the {size_text(held)} the run holds, "
                        f"more than {limit_text(config, limit)}; use a smaller --image-size, leave "
                        "out --compare-pca, or raise --max-memory")


def limit_text(config, limit):
    what = "--max-memory" if config.max_memory else "half the memory available"
    return f"{what} ({size_text(limit)})"


def check_counts(where, n_train, n_test, advice):
    if n_train < MIN_IMAGES or n_test < MIN_IMAGES:
        raise DataError(f"{where}: {n_train} training and {n_test} test images; at least "
                        f"{MIN_IMAGES} of each are needed (the grids show {MIN_IMAGES} test "
                        f"images){advice}")


def check_labels(where, x_train, y_train, x_test, y_test):
    """Labels: none, or for both splits, integers from 0, one per image."""
    if (y_train is None) != (y_test is None):
        raise DataError(f"{where}: labels for one split only; give y_train and y_test, or neither")
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if y is None:
            continue
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{where}: y_{split} has shape {y.shape}, expected ({len(x)},): one "
                            f"label per image of x_{split}")
        if y.dtype.kind not in "iu" or len(y) and y.min() < 0:
            raise DataError(f"{where}: y_{split} must hold integer class numbers from 0 "
                            f"(it holds {y.dtype})")


def parse_size(text):
    """An argparse type: 'HxW' (or 'N' for N x N) in pixels."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        h = w = 0
    if len(parts) != 2 or h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"must be HEIGHTxWIDTH in pixels, like 28x28, got {text}")
    return [h, w]


def parse_bytes(text):
    """An argparse type: a number of bytes, with an optional K, M, G or T (powers of 1024)."""
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    number = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = number[-1:] if number[-1:] in units else ""
    try:
        value = float(number[:len(number) - len(unit)]) * units[unit]
    except ValueError:
        value = 0
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(f"must be a size like 8G or 500M, got {text}")
    return int(value)


def test_fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


# --- arrays: Fashion-MNIST, MNIST and .npz files ------------------------------------------------

def find_mnist(data_dir):
    """mnist.npz in data_dir (which must hold it), else in Keras's cache; None if not there."""
    if data_dir:
        path = os.path.join(data_dir, MNIST_FILE)
        if not os.path.isfile(path):
            raise DataError(f"--data-dir {data_dir}: no {MNIST_FILE} there")
        return path
    keras_home = os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras"))
    path = os.path.join(keras_home, "datasets", MNIST_FILE)
    return path if os.path.isfile(path) else None


def read_npz(path, config, limit):
    """x_train, x_test (uint8, n x H x W or n x H x W x C with C 1 or 3) and optional y_train,
    y_test from an .npz file, as Keras's mnist.npz holds them; shapes and types are checked
    from the headers before anything is loaded."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x_train", "x_test") if k not in npz.files]
            if missing:
                raise DataError(f"{path}: no {' or '.join(missing)} in the file (it holds "
                                f"{', '.join(npz.files) or 'nothing'}); an .npz needs x_train and "
                                "x_test, and may hold y_train and y_test, as Keras's mnist.npz")
            headers = {k: npy_header(npz, k) for k in ("x_train", "x_test")}
            for key, (shape, dtype) in headers.items():
                if dtype != np.uint8:
                    raise DataError(f"{path}: {key} holds {dtype}; images must be uint8 (0-255), "
                                    "for example (x * 255).round().astype('uint8') of images in [0, 1]")
                if (len(shape) not in (3, 4) or len(shape) == 4 and shape[3] not in (1, 3)
                        or 0 in shape[1:3]):
                    raise DataError(f"{path}: {key} has shape {shape}; expected N x H x W, or "
                                    "N x H x W x C with C = 1 or 3")
            (tr, _), (te, _) = headers["x_train"], headers["x_test"]
            if tuple(tr[1:]) + (1,) * (4 - len(tr)) != tuple(te[1:]) + (1,) * (4 - len(te)):
                raise DataError(f"{path}: x_train holds images of {tr[1:]}, x_test of {te[1:]}; "
                                "both must have the same shape")
            channels = tr[3] if len(tr) == 4 else 1
            check_memory(path, tr[0] + te[0], (*tr[1:3], channels), config, limit)  # loaded whole
            shape = (*(config.image_size or tr[1:3]), config.channels or channels)
            check_memory(path, tr[0] + te[0], shape, config, limit)
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in npz.files}
    except DataError:
        raise
    except Exception as e:  # not a zip, truncated, a pickled array: all unreadable here
        raise DataError(f"{path}: not a readable .npz file ({e or type(e).__name__})") from None
    check_labels(path, arrays["x_train"], arrays.get("y_train"), arrays["x_test"],
                 arrays.get("y_test"))
    return ((arrays["x_train"], arrays.get("y_train")), (arrays["x_test"], arrays.get("y_test")))


def npy_header(npz, key):
    """(shape, dtype) of an array in an .npz, read from its header only."""
    with npz.zip.open(key + ".npy") as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(f)
    return shape, dtype


def from_arrays(source, x_train, y_train, x_test, y_test, config, limit, class_names):
    """Data from uint8 image arrays, converted to --image-size and --channels where they differ.
    The default channels: 1 when every image is gray (a single channel, or three equal ones)."""
    x_train, x_test = (x if x.ndim == 4 else x[..., None] for x in (x_train, x_test))
    if config.channels:
        channels = config.channels
    else:
        channels = 1 if x_train.shape[3] == 1 or all(is_gray_rgb(x) for x in (x_train, x_test)) else 3
    size = tuple(config.image_size or x_train.shape[1:3])
    shape = (*size, channels)
    check_memory(source, len(x_train) + len(x_test), shape, config, limit)
    check_counts(source, len(x_train), len(x_test), "")
    if x_train.shape[1:] != shape:
        x_train, x_test = (convert_array(x, size, channels) for x in (x_train, x_test))
    if y_train is not None:
        y_train, y_test = y_train.astype(np.int64), y_test.astype(np.int64)
    return Data(source, x_train, y_train, x_test, y_test, class_names)


def is_gray_rgb(x):
    return x.shape[3] == 1 or bool(np.all(x[..., 0] == x[..., 1]) and np.all(x[..., 1] == x[..., 2]))


def convert_array(x, size, channels):
    """Every image of a uint8 array (n, h, w, c) through convert_image: (n, *size, channels)."""
    out = np.empty((len(x), *size, channels), np.uint8)
    mode = "L" if x.shape[3] == 1 else "RGB"
    for i, image in enumerate(x):
        pixels = image[..., 0] if mode == "L" else image
        out[i] = convert_image(Image.fromarray(pixels, mode), size, channels).reshape(*size, channels)
    return out


# --- a folder of images -------------------------------------------------------------------------

def convert_image(image, size, channels):
    """A Pillow image as the models take it: (height, width) for 1 channel, (height, width, 3)
    for 3, uint8. Transparent images are composited on black; palette, 1-bit and CMYK images
    converted; 16-bit ones scaled to 8 bits; colour becomes gray by Pillow's ITU-R 601-2 luma;
    other sizes are resized with the Lanczos filter (the aspect ratio is not kept)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # convert("L") would clip at 255
        wide = np.asarray(image).astype(np.int64)
        image = Image.fromarray(((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, BACKGROUND),
                                      image.convert("RGBA"))
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), RESAMPLE)
    return np.asarray(image)


def upright(image):
    """A photo as its camera's EXIF orientation says it is seen (JPEG and WebP files)."""
    if image.format in ("JPEG", "MPO", "WEBP"):
        return ImageOps.exif_transpose(image)
    return image


def probe_image(path):
    """(height, width, gray) of an image file, from its header; or the reason it is unreadable."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.format in ("JPEG", "MPO", "WEBP") and image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width  # rotated by a quarter turn
            gray = image.mode in GRAY_MODES
            if image.mode in ("P", "PA"):
                palette = np.asarray(image.getpalette() or [0], np.int64)
                palette = palette[:len(palette) // 3 * 3].reshape(-1, 3)
                gray = bool(np.all(palette == palette[:, :1]))
            return height, width, gray
    except Exception as e:  # Pillow raises several kinds for a file it cannot read
        return f"{type(e).__name__}: {e}"


def decode_image(job):
    """The pixels of one image file as convert_image gives them, or the reason it is unreadable."""
    path, size, channels = job
    try:
        with Image.open(path) as image:
            return convert_image(upright(image), size, channels)
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def parallel_map(fn, items, chunk=1000):
    """fn over items, in order, on a process per CPU where the system can fork (Linux), else here.

    Decoding an image takes Pillow about 0.1 ms of Python, so threads would only take turns;
    processes forked from this one start at once and share its memory until they write."""
    items = list(items)
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if workers < 2 or len(items) <= chunk or not sys.platform.startswith("linux"):
        yield from map(fn, items)
        return
    import multiprocessing
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("fork"), initializer=start_worker)

    def stop(signum, frame):  # SIGTERM too ends the workers (below) before this process
        raise SystemExit(128 + signum)
    before = signal.signal(signal.SIGTERM, stop)
    try:
        chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
        for results in pool.map(map_list, [fn] * len(chunks), chunks):
            yield from results
    except concurrent.futures.process.BrokenProcessPool:
        raise DataError("a process decoding the images died (out of memory, or killed); try "
                        "again, or with a smaller --image-size or fewer images") from None
    finally:  # a Ctrl-C, SIGTERM or an error: the workers stop now, not after their chunks
        signal.signal(signal.SIGTERM, before)
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)


def start_worker():
    """In each worker: Ctrl-C is the parent's to answer; and the worker goes when the parent
    does, even by kill -9 (Linux's PR_SET_PDEATHSIG)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def map_list(fn, items):
    return [fn(item) for item in items]


def in_test_split(path, fraction):
    """Whether a file goes to the test set: a stable hash of its path relative to the folder,
    so that the split does not depend on --seed, and adding files moves none of the others."""
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def list_files(root):
    """(files, unreadable): every file under root, recursively, following linked folders (each
    real folder once), as sorted paths relative to root with '/' between folders, hidden files
    and folders (a name starting with '.') left out; and the folders that could not be read."""
    found, unreadable, seen = [], [], set()
    for folder, dirs, files in os.walk(root, followlinks=True,
                                       onerror=lambda e: unreadable.append(e.filename)):
        seen.add(os.path.realpath(folder))
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and os.path.realpath(os.path.join(folder, d)) not in seen]
        relative = os.path.relpath(folder, root)
        prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
        found += [prefix + f for f in files if not f.startswith(".")]
    return sorted(found), [os.path.relpath(f, root).replace(os.sep, "/") + "/" for f in unreadable]


def read_image_folder(root, config, limit):
    """A folder of images (PNG, JPEG, BMP, GIF, WebP; recursively) as Data.

    With train/ and test/ folders in it, those are the splits; otherwise --test-split of the
    images go to the test set (see in_test_split). The name of the folder an image is in, right
    under the folder (or train/, test/), is its class; labels exist when every image has one
    and there are two classes or more.
    """
    files, unreadable_folders = list_files(root)
    top = {f.split("/", 1)[0] for f in files if "/" in f}
    by_folders = {"train", "test"} <= top
    if len({"train", "test"} & top) == 1:
        (only,), (other,) = {"train", "test"} & top, {"train", "test"} - top
        raise DataError(f"{root}: has a {only}/ folder of images but no {other}/ one; add "
                        f"{other}/, or rename {only}/ to have its images split by --test-split")
    skipped = {"unreadable": unreadable_folders, "not an image": [], "outside train/ and test/": []}
    images = []  # (relative path, split, class folder or None)
    for f in files:
        parts = f.split("/")
        if by_folders:
            if parts[0] not in ("train", "test"):
                skipped["outside train/ and test/"].append(f)
                continue
            split, parts = parts[0], parts[1:]
        else:
            split = "test" if in_test_split(f, config.test_split) else "train"
        if not f.lower().endswith(IMAGE_TYPES):
            skipped["not an image"].append(f)
            continue
        images.append((f, split, parts[0] if len(parts) > 1 else None))
    if not images:
        raise DataError(f"{root}: no image files ({', '.join(t[1:] for t in IMAGE_TYPES)}) in the "
                        f"folder or below it ({len(files)} other files)")

    probes = list(progress(parallel_map(probe_image, [os.path.join(root, f) for f, _, _ in images]),
                           len(images), "reading image headers", every=10.0))
    readable = []
    for image, probe in zip(images, probes):
        if isinstance(probe, str):
            skipped["unreadable"].append(f"{image[0]} ({probe})")
        else:
            readable.append((image, probe))
    check_strict(root, skipped, config)
    if not readable:
        raise DataError(f"{root}: none of its {len(images)} image files could be read "
                        f"({skipped['unreadable'][0]})")
    sizes = collections.Counter((h, w) for _, (h, w, _) in readable)
    if config.image_size:
        size = tuple(config.image_size)
    elif len(sizes) == 1:
        size = next(iter(sizes))
    else:
        found = ", ".join(f"{h}x{w} ({n:,})" for (h, w), n in sizes.most_common(5))
        (h, w), _ = sizes.most_common(1)[0]
        raise DataError(f"{root}: images of {len(sizes)} sizes ({found}{', ...' * (len(sizes) > 5)});"
                        f" choose the one to resize them all to, for example --image-size {h}x{w}")
    channels = config.channels or (1 if all(gray for _, (_, _, gray) in readable) else 3)
    n_test = sum(split == "test" for (_, split, _), _ in readable)
    advice = (", in test/" if by_folders else
              f"; add images, or raise --test-split ({config.test_split} now)")
    check_counts(root, len(readable) - n_test, n_test, advice)
    check_memory(root, len(readable), (*size, channels), config, limit)

    # decoded straight into the two splits' arrays, so the data are in memory once
    test = np.array([split == "test" for (_, split, _), _ in readable])
    slot = np.where(test, np.cumsum(test) - 1, np.cumsum(~test) - 1)
    x = {False: np.empty((len(readable) - n_test, *size, channels), np.uint8),
         True: np.empty((n_test, *size, channels), np.uint8)}
    jobs = [(os.path.join(root, f), size, channels) for (f, _, _), _ in readable]
    kept = np.ones(len(readable), bool)
    for i, pixels in enumerate(progress(parallel_map(decode_image, jobs), len(jobs),
                                        "decoding images", every=10.0)):
        if isinstance(pixels, str):
            skipped["unreadable"].append(f"{readable[i][0][0]} ({pixels})")
            kept[i] = False
        else:
            x[bool(test[i])][slot[i]] = pixels.reshape(x[True].shape[1:])
    check_strict(root, skipped, config)
    if not kept.all():  # unreadable beyond the header: rare, worth a copy
        x = {t: x[t][kept[test == t]] for t in (False, True)}
        readable, test = [r for r, k in zip(readable, kept) if k], test[kept]
    check_counts(root, len(x[False]), len(x[True]), advice)

    classes = np.array([c or "" for (_, _, c), _ in readable], object)
    class_names, labels, notes, no_labels = None, {False: None, True: None}, [], None
    names = sorted(set(classes) - {""})
    if "" in set(classes) and names:
        no_labels = f"no labels ({int((classes == '').sum()):,} images are not in a class folder)"
    elif len(names) == 1:
        no_labels = f"no labels (one class folder, {names[0]})"
    elif len(names) > 1:
        class_names = names
        number = {name: k for k, name in enumerate(names)}
        index = np.array([number[c] for c in classes], np.int64)
        labels = {t: index[test == t].astype(np.int64) for t in (False, True)}
    layout = "train/ and test/" if by_folders else f"test split {config.test_split}"
    summary_skips = {k: v for k, v in skipped.items() if v}
    if summary_skips:
        counts = "; ".join(f"{len(v):,} {k} ({', '.join(v[:SHOWN])}{', ...' * (len(v) > SHOWN)})"
                           for k, v in summary_skips.items())
        notes.insert(0, f"skipped {sum(map(len, summary_skips.values())):,} of {len(files):,} "
                        f"files: {counts}")
    return Data(f"{root} ({layout})", x[False], labels[False], x[True], labels[True], class_names,
                notes, no_labels)


def check_strict(root, skipped, config):
    if config.strict and skipped["unreadable"]:
        bad = skipped["unreadable"]
        raise DataError(f"{root}: {len(bad)} image file{'s' * (len(bad) > 1)} could not be read "
                        f"({', '.join(bad[:SHOWN])}{', ...' * (len(bad) > SHOWN)}); --strict "
                        "allows none: remove or fix them, or leave out --strict to skip them")


# ---------------------------------------------------------------------------------------------
# Images and output files
# ---------------------------------------------------------------------------------------------


UMASK = os.umask(0o022)
os.umask(UMASK)  # read the process's umask (the only way is to set it) and put it back


TMP_PREFIX = ".tmp-"  # write_atomically's temporary files, removed at the next start if left


def write_atomically(path, write):
    """Call write(tmp_path), then rename over path, so path is never left half-written."""
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=TMP_PREFIX, suffix="-" + name)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # as open() would have made it, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def make_grid(images):
    """100 images (100, h, w) or (100, h, w, 3) -> one (10h, 10w[, 3]) array, image k at row
    k // 10, column k % 10."""
    images = np.asarray(images, np.uint8)
    h, w = images.shape[1:3]
    grid = images.reshape(10, 10, h, w, -1).transpose(0, 2, 1, 3, 4).reshape(10 * h, 10 * w, -1)
    return grid[..., 0] if grid.shape[2] == 1 else grid


def save_images(images, path):
    """Save 100 uint8 images, (100, h, w) gray or (100, h, w, 3) colour, as one PNG of 10x10 of
    them in row-major order: image k at row k // 10, column k % 10."""
    grid = make_grid(images)
    # compress_level 1: half the encoding time of the default for 10% more bytes, as this runs
    # every epoch
    write_atomically(path, lambda tmp: Image.fromarray(grid, "L" if grid.ndim == 2 else "RGB").save(
        tmp, format="PNG", compress_level=1))


def to_uint8(images, shape):
    """Pixels in [0, 1], (n, h * w * c) or any shape holding that many per image -> uint8 images
    (n, h, w) for one channel, (n, h, w, 3) for three."""
    pixels = np.nan_to_num(np.clip(np.asarray(images), 0.0, 1.0))  # a diverged model gives NaN
    h, w, c = shape
    return (pixels * 255.0 + 0.5).astype(np.uint8).reshape((-1, h, w) + (c,) * (c > 1))


def to_float(images):
    """uint8 images (n, h, w, c) -> float32 (n, h * w * c) in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def pair_grid(originals, reconstructions, shape):
    """50 originals and their reconstructions -> 100 images, originals in the even columns."""
    pairs = np.stack([to_uint8(originals[:50], shape), to_uint8(reconstructions[:50], shape)], 1)
    return pairs.reshape(100, *pairs.shape[2:])


def triplet_grid(noisy, outputs, clean, shape):
    """30 noisy inputs, their outputs and the clean originals -> 100 images: each row holds three
    (noisy, output, clean) triplets side by side; the last column stays black."""
    triplets = np.stack([to_uint8(x[:30], shape) for x in (noisy, outputs, clean)], 1)
    rows = triplets.reshape(10, 9, *triplets.shape[2:])
    return np.concatenate([rows, np.zeros_like(rows[:, :1])], 1).reshape(100, *rows.shape[2:])


def check_folder(folder, flag):
    """Refuse a folder that cannot be created or written, before anything is created: it names a
    file, or its nearest existing parent is a file or not writable."""
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "" if path == os.path.abspath(folder) else f" ({path})"
        raise UserError(f"{flag} {folder}: that path{where} is a file, not a folder; "
                        f"choose another {flag}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: {path} is not writable; choose another {flag}")


def write_json(path, obj):
    """Write obj as indented JSON, replacing the file atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
    write_atomically(path, write)


def history_text(rows):
    """The per-epoch rows as CSV text with a header; a column that older rows lack (from a run
    resumed by a newer version of the scripts) is empty in them."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))  # lines end in \r\n, as RFC 4180 has it
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write_history(path, rows):
    """Write the per-epoch rows as CSV, replacing the file atomically."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(history_text(rows))
    write_atomically(path, write)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def non_negative(text):
    """An argparse type: a finite float >= 0."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def sample_count(text):
    """An argparse type: 0, or a number of samples with a covariance (2 or more)."""
    value = int(text)
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"must be 0 (none) or at least 2, got {text}")
    return value


def positive(type_):
    """An argparse type: type_(text), accepted only when finite and > 0."""
    def parse(text):
        value = type_(text)
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value
    parse.__name__ = type_.__name__
    return parse


def seed(text):
    """An argparse type: an integer from 0 to 2**32 - 1, the seeds NumPy and Keras accept."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {2**32 - 1}, got {text}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with errors in one line: the usage is what --help is for."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def make_parser(description, epochs, out):
    """The flags both scripts take; each adds its own."""
    parser = ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=positive(int), default=epochs, metavar="N",
                        help="training epochs")
    parser.add_argument("--batch-size", type=positive(int), default=512, metavar="N",
                        help="training batch size (at most the number of training images)")
    parser.add_argument("--lr", type=positive(float), default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=seed, default=22,
                        help="random seed (weights, shuffling, noise), 0 to 2**32 - 1")
    parser.add_argument("--dataset", default="fashion-mnist", metavar="DATA",
                        help="fashion-mnist, mnist, a folder of images (PNG, JPEG, BMP, GIF, WebP; "
                        "sub-folders are classes; train/ and test/ folders, if there, are the "
                        "split) or an .npz file with x_train, x_test and optionally y_train, y_test")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="folder with the four Fashion-MNIST .gz files, or mnist.npz (default: "
                        "$FASHION_MNIST_DIR, Keras's cache, " + DEBIAN_DIR + ", then download)")
    parser.add_argument("--image-size", type=parse_size, default=None, metavar="HxW",
                        help="resize every image to H x W pixels (Lanczos filter; default: the "
                        "images' own size, when they all have one)")
    parser.add_argument("--channels", type=int, choices=[1, 3], default=None,
                        help="1 (gray) or 3 (RGB); default 1 when every image is gray, else 3")
    parser.add_argument("--test-split", type=test_fraction, default=0.1, metavar="F",
                        help="share of a folder's images that form the test set, chosen by a hash "
                        "of each file's path (without train/ and test/ folders)")
    parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                        help="stop at an unreadable image file instead of skipping it")
    parser.add_argument("--max-memory", type=parse_bytes, default=None, metavar="BYTES",
                        help="refuse data whose run needs more memory (about 3.5 bytes per byte "
                        "of pixels), like 8G (default: half of the memory available)")
    parser.add_argument("--out", default=out, metavar="DIR",
                        help="output folder for grids, history.csv, checkpoints and weights")
    parser.add_argument("--fd-samples", type=sample_count, default=10000, metavar="N",
                        help="images generated for summary.json's sample_fd, their Frechet distance "
                        "to the test set (0: leave it out)")
    parser.add_argument("--grid-every", type=positive(int), default=1, metavar="N",
                        help="write the epoch's grids every N epochs (and after the last)")
    parser.add_argument("--logdir", default=None, metavar="DIR",
                        help="also write TensorBoard summaries (losses, grids) to DIR")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its newest checkpoint, with its flags")
    start.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --out (its files are deleted once the "
                       "new run's first epoch is done)")
    return parser


def parse_config(parser, argv=None):
    """Parse the flags; with --resume, every flag not given takes the value saved with the run in
    --out (in its newest checkpoint that reads whole)."""
    config = parser.parse_args(argv)
    if config.resume:
        unset = object()
        given = parser.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(config)}))
        check_unlocked(config.out)  # "in use" says more than what a run in progress holds
        _, saved, _ = resume_point(config.out)
        for name, value in saved["flags"].items():
            if getattr(given, name, None) is unset:
                setattr(config, name, value)
    return config


# errno values that mean the disk, not the code: full, over quota, read-only, no permission
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def run_main(prog, train, parser, argv=None):
    """Parse the flags and run train(config); expected mistakes become one line on stderr."""
    try:
        return train(parse_config(parser, argv))
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"{prog}: error: cannot write{where}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # outside the epochs, where Run turns Ctrl-C into a clean stop
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
# The run folder: checks, lock, checkpoints, resume, signals, divergence, progress, TensorBoard
# ---------------------------------------------------------------------------------------------

# Flags that may differ when a run is resumed: where things are, how long to go on, and what to
# measure at the end. Any other flag would change the run being continued.
RESUMABLE_FLAGS = {"epochs", "dataset", "data_dir", "max_memory", "strict", "logdir", "eval_noise",
                   "export_codes", "compare_pca", "iw_samples", "fd_samples", "grid_every"}
# Flags added after runs were first saved: a run saved without them ran as these say.
LATER_FLAGS = {"dataset": "fashion-mnist", "image_size": None, "channels": None, "test_split": 0.1,
               "strict": False, "max_memory": None, "fd_samples": 10000, "grid_every": 1}
# Flags that say how to start, not what the run is: never saved with it.
START_FLAGS = {"out", "resume", "overwrite"}
# What a run writes into --out; --overwrite deletes these and nothing else.
RUN_FILES = ("run.json", "history.csv", "checkpoints/checkpoint", "checkpoints/ckpt-[0-9]*",
             "*_epoch_[0-9]*.png", "progress.gif", "*.weights.h5", "summary.json", "codes.npz",
             "pca_vs_ae.json", "pca_vs_ae.png", "interpolation.png")
LOCK_FILE = ".lock"  # kept after the run: removing it could let two runs lock different files
SAVED = {"flags": "run_flags/.ATTRIBUTES/VARIABLE_VALUE",
         "history": "run_history/.ATTRIBUTES/VARIABLE_VALUE",
         "data": "run_data/.ATTRIBUTES/VARIABLE_VALUE"}  # absent from runs saved before --dataset


def run_files(out_dir):
    """The files of a run in out_dir (see RUN_FILES), sorted."""
    folder = glob.escape(out_dir)
    return sorted(p for pattern in RUN_FILES for p in glob.glob(os.path.join(folder, pattern)))


if os.name == "nt":
    import msvcrt

    def try_lock(f):
        f.seek(2**20)  # a byte past the process id, which then stays readable
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
else:
    import fcntl

    def try_lock(f):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def lock_folder(folder):
    """Create folder if needed and lock it for this process: an exclusive OS lock on
    folder/.lock, which the kernel drops on any exit (kill -9 included). The file holds the
    process id, to name it to a second process. Returns the open file; closing it unlocks."""
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(os.path.join(folder, LOCK_FILE), "a+")
    except OSError as e:
        raise UserError(f"cannot write to output folder {folder}: {e.strerror}; "
                        "choose another with --out") from None
    take_lock(f, folder)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def take_lock(f, folder):
    """Lock the open lock file f of folder, or close it and raise UserError naming the holder."""
    try:
        try_lock(f)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            f.close()
            raise UserError(f"cannot lock {folder} ({e.strerror}): its file system does not "
                            "support locks; choose an --out on a local disk") from None
        f.seek(0)
        holder = f.read().strip()
        f.close()
        who = f"process {holder}" if holder.isdigit() else "another process"
        raise UserError(f"{folder} is in use by {who}, another run writing there; wait for it to "
                        "end, or choose another --out") from None


def check_unlocked(folder):
    """Raise UserError if another process holds folder's lock; create nothing."""
    try:
        f = open(os.path.join(folder, LOCK_FILE))
    except OSError:
        return  # no lock file: nobody has locked the folder
    take_lock(f, folder)
    f.close()


def checkpoint_prefixes(out_dir):
    """The checkpoints in out_dir/checkpoints, newest first, found from their own files: the
    'checkpoint' state file is not trusted, as a crash or a full disk can damage it."""
    found = []
    for index in glob.glob(os.path.join(glob.escape(out_dir), "checkpoints", "ckpt-*.index")):
        number = os.path.basename(index)[len("ckpt-"):-len(".index")]
        if number.isdigit():
            found.append((int(number), index[:-len(".index")]))
    return [prefix for _, prefix in sorted(found, reverse=True)]


class DamagedCheckpoint(Exception):
    """A checkpoint that does not read back whole."""


def read_checkpoint(prefix):
    """Read every tensor of a checkpoint back (TensorFlow checks each one's checksum) and return
    what the run saved in it: {"flags": {...}, "history": [rows]}. Raises DamagedCheckpoint."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as e:  # IndexError when truncated, OpError on a bad checksum, and others
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DamagedCheckpoint(f"unreadable: {reason}") from None
    try:
        saved = {key: json.loads(reader.get_tensor(name)) for key, name in SAVED.items()
                 if key != "data" or reader.has_tensor(name)}
        saved["flags"] = {**LATER_FLAGS, **saved["flags"]}
        return saved
    except Exception:
        raise DamagedCheckpoint("it holds no flags and history (written by an older version of "
                                "these scripts?)") from None


def resume_point(out_dir):
    """Where --resume continues the run in out_dir: (prefix, saved, skipped) for the newest
    checkpoint that reads whole, what it saved, and [(name, reason)] for newer ones that do not.
    Raises UserError when there is none."""
    skipped = []
    for prefix in checkpoint_prefixes(out_dir):
        try:
            return prefix, read_checkpoint(prefix), skipped
        except DamagedCheckpoint as e:
            skipped.append((os.path.basename(prefix), str(e)))
    if skipped:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped)
        raise UserError(f"--resume: no checkpoint in {os.path.join(out_dir, 'checkpoints')} reads "
                        f"whole ({reasons}); to start afresh instead, --overwrite deletes them "
                        "with the rest of the run's files")
    if run_files(out_dir):
        raise UserError(f"--resume: {out_dir} holds files of a run but no checkpoint to continue "
                        "from; to start afresh, --overwrite deletes those files")
    raise UserError(f"--resume: {out_dir} holds no run to continue; start one without --resume")


def remove(path):
    """Delete a file, or a folder with everything in it."""
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def remove_leftovers(out_dir):
    """Delete what interrupted writes of a run leave: write_atomically's temporary files (named
    .tmp-XXXX-NAME) and the ckpt-N_temp folders of checkpoint saves."""
    folder = glob.escape(out_dir)
    for path in (glob.glob(os.path.join(folder, TMP_PREFIX + "*-*"))
                 + glob.glob(os.path.join(folder, "checkpoints", TMP_PREFIX + "*-checkpoint"))
                 + glob.glob(os.path.join(folder, "checkpoints", "ckpt-[0-9]*_temp"))):
        remove(path)


def command_line(prog, *args):
    """The shell command that runs prog with args, quoted to work when pasted."""
    python = "python"
    found = shutil.which("python")
    if not found or os.path.abspath(found) != os.path.abspath(sys.executable):
        python = sys.executable  # not the interpreter "python" would start
    script = sys.argv[0] if os.path.basename(sys.argv[0]) == prog else prog
    return shlex.join([python, script, *args])


def data_text(description):
    """Data as run.json describes them, in a few words."""
    h, w, c = description["shape"]
    return (f"{description['source']}, {description['train']:,} + {description['test']:,} images "
            f"of {h}x{w}x{c}")


def error_reason(e):
    """One plain phrase for why a write failed (an OSError or a TensorFlow OpError)."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if isinstance(e, tf.errors.ResourceExhaustedError):
        return "no space left on the device"
    if isinstance(e, tf.errors.PermissionDeniedError):
        return "permission denied"
    message = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", str(e.message).strip())  # from a tf.function
    return message.splitlines()[0].split(" [Op:")[0]


class Checkpoints:
    """A run's checkpoints, ckpt-EPOCH in directory, the newest three kept and listed in the
    'checkpoint' state file that tf.train.latest_checkpoint reads: what tf.train.CheckpointManager
    does, but written by one traced tf.function. The manager writes eagerly, walking every
    object in Python: about 45 ms per save on a 2-core CPU against 9 ms traced, 35 s or more of a
    default vae.py run. kept: the checkpoints there already (prefixes), oldest first."""

    KEEP = 3

    def __init__(self, checkpoint, directory, kept=()):
        self.directory, self.kept = directory, list(kept)
        os.makedirs(directory, exist_ok=True)
        checkpoint.save_counter  # noqa: B018  (created here, saved as CheckpointManager saves it)
        # traced at the first save: by then every variable the checkpoint tracks exists
        self.write = tf.function(lambda prefix: checkpoint.write(prefix))

    @property
    def latest(self):
        return self.kept[-1] if self.kept else None

    def save(self, epoch):
        """Write ckpt-EPOCH; then list it, and only then delete those beyond the newest three."""
        prefix = os.path.join(self.directory, f"ckpt-{epoch}")
        self.write(tf.constant(prefix))
        self.kept = [p for p in self.kept if p != prefix] + [prefix]
        self.record()
        for old in self.kept[:-self.KEEP]:  # the index last: while it is there, the rest is found
            for path in sorted(glob.glob(glob.escape(old) + ".*"), key=lambda p: p.endswith(".index")):
                os.remove(path)
        self.kept = self.kept[-self.KEEP:]

    def record(self):
        """The state file (a CheckpointState in protobuf text), listing the newest three."""
        state = [f'model_checkpoint_path: "{os.path.basename(self.latest)}"']
        state += [f'all_model_checkpoint_paths: "{os.path.basename(p)}"' for p in self.kept[-self.KEEP:]]

        def write(tmp):
            with open(tmp, "w") as f:
                f.write("\n".join(state) + "\n")
        write_atomically(os.path.join(self.directory, "checkpoint"), write)


class Run:
    """The life of one training run in its output folder: check, lock, start, epochs, finish.

    Before anything is written it checks the batch size against the data, --logdir and the
    output folder; then it locks the folder (one process per folder), refuses to mix two runs
    in it (unless --resume or --overwrite) and removes what interrupted writes left. Nothing is
    written before the first epoch ends; --overwrite deletes the old run only then.

    After every epoch it saves a checkpoint (model, optimizers, random generators, fixed probes,
    the epoch, and the run's flags and history) and reports progress; run.json, history.csv, the
    grids and TensorBoard summaries are written by a background writer while the next epoch
    trains (one epoch's files at a time; a failed write stops the run at the next epoch's end;
    all are written before the run goes on to its end, or stops on a signal). --resume continues from the newest checkpoint
    that reads whole, skipping damaged ones with a line each, and rebuilds history.csv and
    run.json from it. A non-finite loss stops the run (Diverged, exit code 3) before anything of
    that epoch is written. A failed write (full disk, no permission) stops it with one line
    naming the last good checkpoint. The first SIGINT or SIGTERM stops it after the epoch in
    progress is saved; a second one stops it at once.

    Use it as a context manager (it owns the lock and the signal handlers):

        with utils.Run(config, "ae.py", data) as run:
            first = run.restore(model=model, optimizer=optimizer, generator=generator)
            for epoch in run.epochs(first):
                losses, test = run.call(train_epoch, x_train)
                ...
                run.end_epoch(row, grids, "train bce 0.2850  test bce 0.2865")
            run.save_weights(model, "ae.weights.h5")
    """

    def __init__(self, config, prog, data):
        self.config, self.prog, self.out = config, prog, config.out
        n_train = len(data.x_train)
        if config.batch_size > n_train:
            raise UserError(f"--batch-size {config.batch_size} is more than the {n_train} "
                            f"training images; use at most {n_train}")
        if config.logdir:
            try:
                import tensorboard  # noqa: F401  (tf.summary needs it to write anything)
            except ImportError:
                raise UserError("--logdir needs TensorBoard: pip install tensorboard") from None
            check_folder(config.logdir, "--logdir")
        check_folder(self.out, "--out")
        self.flags = {k: v for k, v in sorted(vars(config).items()) if k not in START_FLAGS}
        self.data = data.description()
        self.lock = lock_folder(self.out)
        try:
            self.old_run, self.resume_from, self.history = [], None, []
            self.resumed_epoch = 0  # the epoch of the checkpoint --resume continues from
            self.resumed_data = None  # what the checkpoint --resume continues from says of its data
            self.checkpointed_flags = None  # the flags in the newest checkpoint, once there is one
            if config.resume:
                self.resume_from, saved, skipped = resume_point(self.out)
                if set(saved["flags"]) != set(self.flags):
                    raise UserError(f"--resume: {self.out} holds a run of the other script, with "
                                    f"flags {', '.join(sorted(saved['flags']))}")
                for name in sorted(set(saved["flags"]) | set(self.flags)):
                    ours, theirs = self.flags.get(name), saved["flags"].get(name)
                    if name not in RESUMABLE_FLAGS and ours != theirs:
                        raise UserError(
                            f"--resume: --{name.replace('_', '-')} {ours} differs from the run in "
                            f"{self.out} ({theirs}); leave it out to continue that run, or start "
                            "a new one in another --out")
                before = saved.get("data")
                if before is None and (self.data["source"], self.data["shape"]) != (
                        "Fashion-MNIST", [28, 28, 1]):  # a run saved before --dataset existed
                    before = {"source": "Fashion-MNIST", "shape": [28, 28, 1], "train": 60000,
                              "test": 10000, "sha256": "the data of runs before --dataset"}
                if before and before["sha256"] != self.data["sha256"]:
                    raise UserError(
                        f"--resume: the data differ from those of the run in {self.out} "
                        f"({data_text(before)} then, {data_text(self.data)} now); give the same "
                        "data to continue it, or start a new run in another --out")
                for name, reason in skipped:
                    print(f"{prog}: skipped checkpoint {name}: {reason}", file=sys.stderr, flush=True)
                self.history = saved["history"]
                self.resumed_data = saved.get("data")
                self.checkpointed_flags = saved["flags"]
                self.resumed_epoch = self.history[-1]["epoch"] if self.history else 0
            else:
                self.old_run = run_files(self.out)
                if self.old_run and not config.overwrite:
                    names = ", ".join(os.path.basename(p) for p in self.old_run[:3])
                    raise UserError(
                        f"{self.out} already holds a run ({names}{', ...' * (len(self.old_run) > 3)});"
                        f" continue it with: {command_line(prog, '--out', self.out, '--resume')}, "
                        "or replace it (its files are deleted) by adding --overwrite")
            remove_leftovers(self.out)  # the folder is this run's, or one to be replaced
            self.writer = None
            if config.logdir:
                try:
                    self.writer = tf.summary.create_file_writer(config.logdir)
                except tf.errors.OpError as e:
                    raise UserError(f"--logdir {config.logdir}: cannot write there "
                                    f"({error_reason(e)})") from None
        except BaseException:
            self.lock.close()
            raise
        self.progbar = None
        self.signal = None
        self.writing = False  # while the files of an epoch are written, a second signal waits
        self.wrote = False  # whether this process has written run.json yet

    def __enter__(self):
        self.pool = concurrent.futures.ThreadPoolExecutor(1)  # the epochs (see call)
        self.files = concurrent.futures.ThreadPoolExecutor(1)  # the background writer
        self.pending = None  # the last epoch's files while the background writer has them
        self.old_handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, exc_type, *exc):
        self.restore_signal_handlers()
        try:
            if exc_type is None:
                self.flush()
            elif self.pending:  # the run failed: its last files are still written, errors aside
                concurrent.futures.wait([self.pending])
        finally:
            self.pool.shutdown()
            self.files.shutdown()
            if self.writer:
                self.writer.close()
            self.lock.close()

    def restore_signal_handlers(self):
        for s, handler in self.old_handlers.items():
            signal.signal(s, handler)

    def on_signal(self, signum, frame):
        """The first SIGINT or SIGTERM: stop once the epoch in progress is saved. The second: stop
        now, losing only that epoch (after the files being written, if any, are complete)."""
        if self.signal is None:
            self.signal = signum
            again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            fresh_line = "\n" * sys.stdout.isatty()  # after the progress bar's
            print(f"{fresh_line}{self.prog}: stopping after this epoch, once it is saved; {again} "
                  "again to stop now", file=sys.stderr, flush=True)
        elif not self.writing:  # while writing, the epoch is as good as saved: stop after it
            self.stop_now(signum)

    def stop_now(self, signum):
        """Exit at once, from a signal handler: the epoch in progress runs on another thread,
        which only exiting the process stops. The main thread writes nothing now (see
        on_signal); the background writer finishes the last epoch's files first."""
        if self.pending:
            concurrent.futures.wait([self.pending])
        done = int(self.epoch) if hasattr(self, "epoch") else self.resumed_epoch
        saved = (f"the checkpoint of epoch {done} is kept; continue with: "
                 f"{self.resume_command()}" if done
                 else "no epoch had finished, so there is nothing to resume")
        print(f"{self.prog}: stopped by {signal.Signals(signum).name} during epoch {done + 1}, "
              f"which is lost; {saved}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + signum)

    def resume_command(self):
        """The command that continues this run from its newest checkpoint, as this process would
        have: --resume, and the flags given now that the checkpoint does not hold yet."""
        args = ["--out", self.out, "--resume"]
        for name in sorted(RESUMABLE_FLAGS):
            value, flag = self.flags.get(name), name.replace("_", "-")
            if value is None or value == self.checkpointed_flags.get(name):
                continue  # the same, or the default of a flag with a value (--logdir)
            if isinstance(value, bool):  # an on/off flag: --strict, --no-strict
                args.append(f"--{'' if value else 'no-'}{flag}")
            else:
                args += [f"--{flag}", str(value)]
        return command_line(self.prog, *args)

    def call(self, fn, *args):
        """fn(*args) on a worker thread, so that the main thread can answer a signal at once:
        Python runs signal handlers only on the main thread and only between bytecodes, and a
        compiled epoch is one call that can last minutes."""
        return self.pool.submit(fn, *args).result()

    def restore(self, **objects):
        """Track objects (models, optimizers, tf.random.Generators, fixed probes held in
        tf.Variables) in the checkpoints; with --resume, load them from the checkpoint chosen,
        rebuild history.csv and run.json from it, and return the first epoch to train."""
        self.epoch = tf.Variable(0, dtype=tf.int64)
        self.saved_flags = tf.Variable("", dtype=tf.string)
        self.saved_history = tf.Variable("", dtype=tf.string)
        self.saved_data = tf.Variable(json.dumps(self.data), dtype=tf.string)
        tracked = dict(epoch=self.epoch, run_flags=self.saved_flags, run_history=self.saved_history,
                       **objects)
        self.checkpoint = tf.train.Checkpoint(run_data=self.saved_data, **tracked)
        self.checkpoints = None  # Checkpoints, from the first one saved or resumed
        if self.resume_from:
            # a run saved before --dataset existed holds no run_data: its data are Fashion-MNIST
            reading = self.checkpoint if self.resumed_data else tf.train.Checkpoint(**tracked)
            try:
                reading.restore(self.resume_from).assert_existing_objects_matched()
            except (tf.errors.OpError, AssertionError, ValueError) as e:
                reason = str(e).strip().splitlines()[0]
                raise UserError(f"--resume: {self.resume_from} does not fit this script's model "
                                f"({reason})") from None
            prefixes = checkpoint_prefixes(self.out)
            self.checkpoints = Checkpoints(self.checkpoint, os.path.join(self.out, "checkpoints"),
                                           prefixes[prefixes.index(self.resume_from):][::-1])
            with self.writing_files():
                self.checkpoints.record()  # the state file may be missing or damaged
            done = int(self.epoch)
            self.history = [row for row in self.history if row["epoch"] <= done]
            self.rebuild_files()
            print(f"resuming the run in {self.out} after epoch {done}", flush=True)
        return int(self.epoch) + 1

    def rebuild_files(self):
        """On resume: run.json and history.csv as the checkpoint has them; say so where
        history.csv was missing or damaged (not merely longer, as after a crash)."""
        with self.writing_files():
            self.saved_data.assign(json.dumps(self.data))  # an older run's checkpoint lacks it
            write_json(os.path.join(self.out, "run.json"), self.run_json())
            path = os.path.join(self.out, "history.csv")
            if not self.history:
                return
            text = history_text(self.history)
            try:
                with open(path, newline="") as f:
                    intact = f.read().startswith(text)
            except (OSError, UnicodeDecodeError):
                intact = False
            if not intact:
                print(f"{self.prog}: history.csv was missing or damaged; rebuilt from the "
                      f"checkpoint (epochs 1-{self.history[-1]['epoch']})", file=sys.stderr, flush=True)
            write_history(path, self.history)

    def run_json(self):
        """run.json: the run's flags and what identifies its data."""
        return {"flags": self.flags, "data": self.data}

    def epochs(self, first):
        """The epochs first .. --epochs; stops with exit code 128 + signal number when SIGINT or
        SIGTERM arrived during the previous one. Once they are done, the signals act as usual."""
        for epoch in range(first, self.config.epochs + 1):
            if self.signal:
                self.interrupted()
            yield epoch
        if self.signal:  # during the last epoch: it is saved, the end-of-run work is left to --resume
            self.interrupted()
        self.flush()  # the end-of-run work reads the grids
        self.restore_signal_handlers()  # the end-of-run work is not an epoch: Ctrl-C stops it at once

    def interrupted(self):
        self.flush()
        name, done = signal.Signals(self.signal).name, int(self.epoch)
        if done:
            print(f"{self.prog}: stopped by {name} after epoch {done}, checkpoint saved; continue "
                  f"with: {self.resume_command()}",
                  file=sys.stderr, flush=True)
        else:
            print(f"{self.prog}: stopped by {name} before the first epoch ended; nothing to resume",
                  file=sys.stderr, flush=True)
        sys.exit(128 + self.signal)

    @contextlib.contextmanager
    def writing_files(self):
        """Around writes into the run folder: a second signal waits for them, and a failed write
        (full disk, no permission) becomes one line that names the last good checkpoint."""
        self.writing = True
        try:
            yield
        except (OSError, tf.errors.OpError) as e:
            remove_leftovers(self.out)
            last = self.checkpoints and self.checkpoints.latest
            if last:
                after = (f"the last good checkpoint is {last}; once the cause is fixed, continue "
                         f"with: {self.resume_command()}")
            else:
                after = "no epoch was saved; once the cause is fixed, start the run again"
            raise UserError(f"cannot write into {self.out} ({error_reason(e)}); {after}") from None
        finally:
            self.writing = False

    def end_epoch(self, row, grids, figures):
        """Record a finished epoch: checkpoint (with row added to the history) and report;
        then, on the background writer, run.json, history.csv, grids ({name: 100 images} as
        NAME_epoch_NNN.png) and TensorBoard. The previous epoch's files are written first."""
        epoch = row["epoch"]
        bad = [k for k, v in row.items() if not math.isfinite(v)]
        if bad:
            kept = (self.checkpoints and self.checkpoints.latest) or "none, as no epoch finished"
            raise Diverged(f"epoch {epoch}: {bad[0]} is {row[bad[0]]}; training diverged, most "
                           f"likely because the learning rate ({self.config.lr}) is too high: "
                           f"try a smaller --lr. Last good checkpoint: {kept}")
        self.flush()
        with self.writing_files():
            for path in self.old_run:  # --overwrite: the old run goes once the new one has an epoch
                remove(path)
            self.old_run = []
            if self.checkpoints is None:
                self.checkpoints = Checkpoints(self.checkpoint, os.path.join(self.out, "checkpoints"))
            self.epoch.assign(epoch)
            self.saved_flags.assign(json.dumps(self.flags))
            self.saved_history.assign(json.dumps(self.history + [row]))
            self.checkpoints.save(epoch)
            self.checkpointed_flags = self.flags
            self.history.append(row)
        grids = grids if epoch % self.config.grid_every == 0 or epoch == self.config.epochs else {}
        self.writing = True  # until self.pending holds the job, so a second signal waits
        self.pending = self.files.submit(self.write_files, row, list(self.history), grids,
                                         not self.wrote)
        self.writing = False
        self.wrote = True
        self.report(row, figures)

    def write_files(self, row, history, grids, run_json):
        """On the background writer: the files of the epoch of row, history being the rows up
        to it, and run.json if this process has not written it yet."""
        epoch = row["epoch"]
        if run_json:
            write_json(os.path.join(self.out, "run.json"), self.run_json())
        write_history(os.path.join(self.out, "history.csv"), history)
        for name, images in grids.items():
            save_images(images, os.path.join(self.out, f"{name}_epoch_{epoch:03d}.png"))
        if self.writer:
            with self.writer.as_default(step=epoch):
                for name, value in row.items():
                    if name != "epoch":
                        tf.summary.scalar(name, value)
                for name, images in grids.items():
                    grid = make_grid(images)
                    tf.summary.image(name, (grid[..., None] if grid.ndim == 2 else grid)[None])
            self.writer.flush()  # so a stop at once loses no finished epoch's summaries

    def flush(self):
        """Wait for the background writer to finish the last epoch's files; a failed write
        stops the run here, in one line (see writing_files)."""
        if self.pending:
            with self.writing_files():  # a second signal meanwhile waits for it
                self.pending.result()
            self.pending = None

    def report(self, row, figures):
        """A progress bar over the epochs on a terminal; one line per epoch otherwise."""
        if sys.stdout.isatty():
            if self.progbar is None:
                names = [k for k in row if k not in ("epoch", "seconds")]
                self.progbar = keras.utils.Progbar(self.config.epochs, stateful_metrics=names,
                                                   unit_name="epoch")
            self.progbar.update(row["epoch"], [(k, v) for k, v in row.items()
                                               if k not in ("epoch", "seconds")])
        else:
            print(f"epoch {row['epoch']}/{self.config.epochs}  {figures}  ({row['seconds']:.2f} s)",
                  flush=True)

    def save_weights(self, model, name):
        """The final weights, loadable with model.load_weights(path) into a built model."""
        with self.writing_files():
            write_atomically(os.path.join(self.out, name), model.save_weights)

    def save_progress(self, grid):
        """progress.gif: the grids named grid (NAME_epoch_NNN.png) over the run, as the folder
        holds them, at most PROGRESS_FRAMES spread evenly from the first to the last, each with
        its epoch written above it."""
        found = []
        for path in glob.glob(os.path.join(glob.escape(self.out), f"{grid}_epoch_*.png")):
            number = os.path.basename(path)[len(grid) + len("_epoch_"):-len(".png")]
            if number.isdigit():
                found.append((int(number), path))
        chosen = spread(sorted(found), PROGRESS_FRAMES)
        with self.writing_files():
            save_progress_gif([path for _, path in chosen], [epoch for epoch, _ in chosen],
                              os.path.join(self.out, "progress.gif"))


PROGRESS_FRAMES = 100


def spread(items, n):
    """At most n of items, evenly spread, the first and the last among them."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def save_progress_gif(paths, epochs, path, band=14):
    """An animated GIF of the images at paths, each with a band above it saying its epoch; the
    last frame stays longer. To keep 100 frames within a few MB, gray frames keep 32 levels (each
    value to the middle of its step of 8) and colour frames an adaptive palette of 64 colours."""
    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default()
    frames = []
    for image_path, epoch in zip(paths, epochs):
        with Image.open(image_path) as image:
            image.load()
        frame = Image.new(image.mode, (image.width, image.height + band), 0)
        frame.paste(image, (0, band))
        ImageDraw.Draw(frame).text((3, 1), f"epoch {epoch}", fill="white" if frame.mode == "RGB" else 255,
                                   font=font)
        frames.append(frame.quantize(64) if frame.mode == "RGB" else frame.point(lambda v: v // 8 * 8 + 4))
    if not frames:
        return
    durations = [100] * (len(frames) - 1) + [1500]
    write_atomically(path, lambda tmp: frames[0].save(
        tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0))


def progress(items, total, what, every=10.0):
    """Yield items, showing how far a long computation is: a Keras progress bar on a terminal,
    otherwise a line every `every` seconds with the share done and the time left."""
    bar = keras.utils.Progbar(total) if sys.stdout.isatty() else None
    start = last = time.perf_counter()
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if bar:
            bar.update(done)
        elif now - last >= every and done < total:
            left = (now - start) / done * (total - done)
            print(f"{what}: {done / total:.0%} done, about {left:.0f} s left", flush=True)
            last = now


# ---------------------------------------------------------------------------------------------
# Codes: PCA, nearest neighbours, statistics, scatter plots
# ---------------------------------------------------------------------------------------------

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
# tab10, the usual ten class colours
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


PCA_CHUNK = 4096  # rows fit_pca converts to float64 at a time


def pca_bytes(n, d):
    """About the most memory fit_pca takes for n rows of d values: its float64 matrix, min(n, d)
    x d, what LAPACK works in beside it (measured: 5 times the matrix, 6.0 GB for 20,000 images
    of 64x64x3), and a chunk of rows in float64 with its centred copy."""
    return 6 * 8 * min(n, d) * d + 2 * 8 * min(n, PCA_CHUNK) * d


def fit_pca(x, k, chunk=PCA_CHUNK):
    """Principal component analysis, exact: by SVD of the centred data where there are fewer rows
    than columns, else from the d x d scatter matrix, summed over chunks of rows, so memory grows
    with min(n, d) x d (see pca_bytes), never with a float copy of many rows.

    Args:
        x: (n, d) array of any numeric type (uint8 pixels too); k: number of components.
    Returns:
        (mean, components): (d,) and (k, d), the components orthonormal, by falling variance,
        each signed so that its largest coordinate is positive (an SVD's signs are arbitrary).
        Codes are (x - mean) @ components.T; reconstructions codes @ components + mean.
    """
    n, d = x.shape
    mean = sum(np.sum(x[i:i + chunk], 0, dtype=np.float64) for i in range(0, n, chunk)) / n
    if n < d:
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        components = vt[:k]
    else:
        scatter = np.zeros((d, d))
        for i in range(0, n, chunk):
            centred = x[i:i + chunk] - mean
            scatter += centred.T @ centred
        _, vectors = np.linalg.eigh(scatter)  # eigenvalues rising
        components = vectors[:, ::-1][:, :k].T
    largest = components[np.arange(len(components)), np.abs(components).argmax(1)]
    return mean, components * np.sign(largest)[:, None]


def knn_accuracy(train_codes, train_labels, test_codes, test_labels, k=5, chunk=256):
    """Accuracy of a k-nearest-neighbour vote (Euclidean; of training codes at the same distance
    the earlier one counts, and a tied vote goes to the nearer class).

    The distances of a chunk of test codes to every training code, as |t|^2 - 2 q.t in float32,
    are fast but rounded: they only shortlist every code that may be among the k nearest (within
    a bound of the rounding of the k-th), and the k nearest are then taken by exact distances, so
    that duplicate codes (common in icon sets) tie exactly, however many there are, and the
    figure does not hang on rounding or on the chunk size. 256 test codes at a time against
    60,000 training ones keep those distances small enough to be fast.
    """
    train_codes, train_labels = np.asarray(train_codes, np.float64), np.asarray(train_labels)
    train_32 = train_codes.astype(np.float32)  # for the shortlist: half the time of float64
    train_sq = (train_32 ** 2).sum(1)
    largest = np.sqrt(train_sq.max())
    correct = 0
    for start in range(0, len(test_codes), chunk):
        q = np.asarray(test_codes[start:start + chunk], np.float64)
        rounded = train_sq[None, :] - 2 * q.astype(np.float32) @ train_32.T  # + |q|^2 for each row
        kth = np.partition(rounded, k - 1, axis=1)[:, k - 1]
        # float32 moves these sums of 2 x dims terms by far less (about 1e-6 of their size)
        slack = 1e-4 * (largest ** 2 + 2 * largest * np.linalg.norm(q, axis=1))
        for query, row, bound, truth in zip(q, rounded, kth + slack, test_labels[start:start + chunk]):
            near = np.flatnonzero(row <= bound)
            exact = ((train_codes[near] - query) ** 2).sum(1)
            votes = train_labels[near[np.lexsort((near, exact))[:k]]]  # nearest first
            counts = np.bincount(votes)
            winners = np.flatnonzero(counts == counts.max())
            correct += next(c for c in votes if c in winners) == truth
    return correct / len(test_codes)


def code_statistics(codes):
    """How far codes (n, d) are from N(0, I): averaged over the code dimensions, the mean's
    distance from 0 ("code_mean_abs"), the standard deviation's from 1 ("code_std_dev_from_1")
    and the Kolmogorov-Smirnov distance of each dimension's values to N(0, 1) ("code_ks"); and
    the mean |correlation| between two different dimensions ("code_abs_correlation"), which
    N(0, I) has none of."""
    codes = np.asarray(codes, np.float64)
    n, d = codes.shape
    normal_cdf = np.frompyfunc(lambda v: 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))), 1, 1)
    cdf = normal_cdf(np.sort(codes, axis=0)).astype(np.float64)  # (n, d), each column sorted
    steps = np.arange(n + 1)[:, None] / n
    ks = np.maximum(steps[1:] - cdf, cdf - steps[:-1]).max(0)  # the largest gap of the two CDFs
    correlation = np.corrcoef(codes, rowvar=False) if d > 1 else np.ones((1, 1))
    off_diagonal = np.abs(correlation[~np.eye(d, dtype=bool)])
    return {"code_mean_abs": float(np.abs(codes.mean(0)).mean()),
            "code_std_dev_from_1": float(np.abs(codes.std(0) - 1).mean()),
            "code_ks": float(ks.mean()),
            "code_abs_correlation": float(np.nan_to_num(off_diagonal).mean()) if d > 1 else 0.0}


def first_two_directions(codes):
    """The codes themselves when 2-D, else their projection on their first two principal
    directions."""
    if codes.shape[1] == 2:
        return codes
    mean, components = fit_pca(codes, 2)
    return (codes - mean) @ components.T


def save_scatter_plots(panels, labels, class_names, path, size=400):
    """Scatter plots side by side; where there are labels, points coloured by class (the ten
    colours repeat beyond ten classes) with a legend of the class names.

    Args:
        panels: [(title, points of shape (n, 2))].
        labels: (n,) class of each point, or None.
        class_names: the name of each class number, or None.
    """
    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default()
    top, margin = 40, 10
    legend = 130 if labels is not None else 0
    image = Image.new("RGB", (len(panels) * (size + margin) + margin + legend, size + top + margin),
                      "white")
    draw = ImageDraw.Draw(image)
    for i, (title, points) in enumerate(panels):
        x0 = margin + i * (size + margin)
        draw.text((x0, 8), title, fill="black", font=font)
        draw.rectangle([x0, top, x0 + size, top + size], outline="black")
        lo, hi = np.percentile(points, [0.5, 99.5], axis=0)  # a few outliers don't squash the rest
        xy = np.clip((points - lo) / np.maximum(hi - lo, 1e-12), 0, 1) * (size - 8) + 4
        for k, (px, py) in enumerate(xy):
            px, py = x0 + px, top + size - py  # y grows upwards, as on a plot
            colour = COLOURS[labels[k] % len(COLOURS)] if labels is not None else COLOURS[0]
            draw.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill=colour)
    if labels is not None:
        x0 = margin + len(panels) * (size + margin)
        shown = (size - 20) // 18
        for c, name in enumerate(class_names[:shown]):
            y = top + 10 + 18 * c
            draw.rectangle([x0, y, x0 + 10, y + 10], fill=COLOURS[c % len(COLOURS)])
            draw.text((x0 + 16, y - 1), name[:18], fill="black", font=font)
        if len(class_names) > shown:
            draw.text((x0 + 16, top + 10 + 18 * shown), f"... {len(class_names)} in all",
                      fill="black", font=font)
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


# ---------------------------------------------------------------------------------------------
# Sample quality: the Fréchet distance in the features of a classifier trained on the data
# ---------------------------------------------------------------------------------------------

CLASSIFIER = "conv32-conv64-dense128-v2"  # in the cache key: another network is trained anew
CLASSIFIER_EPOCHS = 4


def make_classifier(shape, n_classes):
    """Two 3x3 convolutions (32 and 64 filters, each followed by 2x2 max pooling), a dense layer
    of 128 (the features the distance uses) and the class logits. Each layer's initial weights
    have a seed of their own, so the classifier of a data set is the same whatever ran before."""
    def seeded(k):
        return dict(kernel_initializer=keras.initializers.GlorotUniform(seed=k))
    return keras.Sequential([
        keras.Input(shape),
        layers.Conv2D(32, 3, padding="same", activation="relu", **seeded(1)),
        layers.MaxPooling2D(padding="same"),
        layers.Conv2D(64, 3, padding="same", activation="relu", **seeded(2)),
        layers.MaxPooling2D(padding="same"),
        layers.Flatten(),
        layers.Dense(128, activation="relu", name="features", **seeded(3)),
        layers.Dense(n_classes, **seeded(4)),
    ])


def scaled(x):
    """uint8 images to float32 in [0, 1], batch by batch, for tf.data."""
    return tf.cast(x, tf.float32) / 255.0


class SampleQuality:
    """The features of a classifier trained once per data set (weights cached in
    $KERAS_HOME/autoencoder-classifiers, keyed by the data's SHA-256), the test set's feature
    statistics, and the Fréchet distance of generated images to them (FID with a small network
    in place of Inception: Heusel et al. 2017)."""

    def __init__(self, data, prog):
        folder = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")),
                              "autoencoder-classifiers")
        key = hashlib.sha256((data.description()["sha256"] + CLASSIFIER).encode()).hexdigest()[:20]
        weights, facts, test = (os.path.join(folder, key + suffix)
                                for suffix in (".weights.h5", ".json", ".test-features.npz"))
        self.shape = data.shape
        model = make_classifier(data.shape, len(data.class_names))
        try:
            model.load_weights(weights)
            with open(facts) as f:
                self.facts = json.load(f)
            if not {"test_accuracy", "test_vs_train"} <= set(self.facts):
                raise KeyError("test_vs_train")
            trained = False
        except (OSError, ValueError, KeyError, TypeError):  # not there yet, or damaged: train again
            self.facts = self.train(model, data, prog)
            trained = True
        features = keras.Model(model.inputs[0], model.get_layer("features").output)
        # traced once, for any number of images: twice as fast as calling the model eagerly on a
        # CPU, with the same numbers
        self.features = tf.function(lambda x: features(x, training=False), autograph=False,
                                    input_signature=[tf.TensorSpec([None, *data.shape], tf.float32)])
        width = features.output.shape[-1]
        self.test = None if trained else read_statistics(test, width, weights)
        if self.test is not None:
            return
        self.test = self.statistics(data.x_test)  # kept too: half the time of a distance
        if trained:
            self.facts["test_vs_train"] = frechet_distance(*self.statistics(data.x_train), *self.test)
        try:
            os.makedirs(folder, exist_ok=True)
            if trained:
                write_atomically(weights, model.save_weights)
                write_json(facts, self.facts)
            # with the digest of the weights they come from: another process's weights do not match
            kept = dict(mean=self.test[0], cov=self.test[1], weights=file_digest(weights))
            write_atomically(test, lambda tmp: np.savez(tmp, **kept))
        except OSError as e:
            print(f"{prog}: cannot write into {folder} ({e.strerror}); what is missing there will "
                  "be made again next time", file=sys.stderr, flush=True)

    def train(self, model, data, prog):
        print(f"{prog}: training the classifier that measures sample quality, once for these "
              f"data ({CLASSIFIER_EPOCHS} epochs)", flush=True)
        keras.utils.set_random_seed(0)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False,  # XLA's
                      # convolutions are slow on CPUs
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        train = (tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train))
                 .shuffle(len(data.x_train), seed=0).batch(128).map(lambda x, y: (scaled(x), y)))
        model.fit(train, epochs=CLASSIFIER_EPOCHS, shuffle=False, verbose=0)  # shuffled above
        test = tf.data.Dataset.from_tensor_slices((data.x_test, data.y_test)).batch(1000).map(
            lambda x, y: (scaled(x), y))
        return {"classifier": CLASSIFIER, "test_accuracy": float(model.evaluate(test, verbose=0)[1])}

    def statistics(self, images):
        """Mean and covariance of the features of images: uint8 (n, h, w, c), or floats in
        [0, 1] with h * w * c values per image."""
        def floats(chunk):  # converted chunk by chunk: a float copy of the training set is big
            chunk = to_float(chunk) if chunk.dtype == np.uint8 else chunk.astype(np.float32, copy=False)
            return chunk.reshape(-1, *self.shape)
        images = np.asarray(images)
        features = np.concatenate([self.features(floats(images[i:i + 1000])).numpy()
                                   for i in range(0, len(images), 1000)]).astype(np.float64)
        return features.mean(0), np.cov(features, rowvar=False)

    def of(self, samples):
        """{"samples": the distance of samples (floats in [0, 1]) to the test set, "test_vs_train":
        that of the training set, the floor, "classifier_test_accuracy"}."""
        return {"samples": frechet_distance(*self.statistics(samples), *self.test),
                "test_vs_train": self.facts["test_vs_train"],
                "classifier_test_accuracy": self.facts["test_accuracy"]}


def file_digest(path):
    """The SHA-256 of a file's bytes, in hex."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_statistics(path, width, weights):
    """The (mean, covariance) of width features that SampleQuality kept at path from the
    classifier in the file weights; None where they are missing, damaged, of another size or
    from other weights."""
    try:
        with np.load(path) as f:
            mean, cov, digest = f["mean"], f["cov"], str(f["weights"])
        same_weights = digest == file_digest(weights)
    except (OSError, ValueError, KeyError, EOFError, TypeError, AttributeError, zipfile.BadZipFile):
        return None
    if (not same_weights or mean.shape != (width,) or cov.shape != (width, width)
            or mean.dtype != np.float64 or cov.dtype != np.float64
            or not (np.isfinite(mean).all() and np.isfinite(cov).all())):
        return None
    return mean, cov


def frechet_distance(mean1, cov1, mean2, cov2):
    """The Fréchet (2-Wasserstein) distance between N(mean1, cov1) and N(mean2, cov2):
    |mean1 - mean2|^2 + tr(cov1 + cov2 - 2 (cov1^1/2 cov2 cov1^1/2)^1/2), with symmetric
    eigendecompositions for the square roots (the trace equals that of (cov1 cov2)^1/2)."""
    values, vectors = np.linalg.eigh(cov1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = root1 @ cov2 @ root1
    roots = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None))
    return float(np.sum((np.asarray(mean1) - mean2) ** 2) + np.trace(cov1) + np.trace(cov2)
                 - 2 * roots.sum())


def sample_quality(data, prog, samples_fn, n):
    """summary.json's sample_fd for n images from samples_fn(n) (floats in [0, 1]), printed too;
    None, with a line saying why, where the data have no labels or n is 0."""
    if not n:
        return None
    if data.y_train is None:
        print(f"{prog}: the data have no labels, so there is no classifier to measure sample "
              "quality with: sample_fd left out", flush=True)
        return None
    start = time.perf_counter()
    quality = SampleQuality(data, prog)
    figures = quality.of(samples_fn(n))
    figures["seconds"] = round(time.perf_counter() - start, 1)
    print(f"sample quality: Frechet distance of {n:,} samples to the test set "
          f"{figures['samples']:.2f} (the training set's: {figures['test_vs_train']:.2f}), in the "
          f"features of a classifier of test accuracy {figures['classifier_test_accuracy']:.4f} "
          f"({figures['seconds']:.1f} s)", flush=True)
    return figures


# ---------------------------------------------------------------------------------------------
# Training: whole epochs compiled
# ---------------------------------------------------------------------------------------------


def compile_epoch(train_step, names, generator, batch_size, after=None):
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
        after: fn() run in the same call once the epoch's updates are done (the test-set
            figures and the grids' images), so that they cost no second call; or None.
    Returns:
        train_epoch(x_train) -> (dict of the losses averaged over the epoch's examples, what
        after returned, or None), as NumPy values: fetched before it returns, so that timing it
        times the work also where the call only queues it (a GPU).
    """
    @tf.function(jit_compile=True)
    def compiled(x_train):
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
        return {k: v / n for k, v in totals.items()}, (after() if after else None)

    return lambda x_train: tf.nest.map_structure(
        lambda t: t.numpy() if isinstance(t, tf.Tensor) else t, compiled(x_train))
