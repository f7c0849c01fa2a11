"""The data --dataset names: Fashion-MNIST from its IDX files, MNIST, an .npz file, or a folder of
images (tool.folders), all as tool.data.Data."""

import gzip
import os

import keras
import numpy as np
from PIL import Image

from tool import folders
from tool.data import CLASS_NAMES, Data, check_counts, check_labels, check_memory, convert_image, memory_limit
from tool.errors import DataError


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


MNIST_FILE = "mnist.npz"


HOW_TO_GET_MNIST = (
    "MNIST not found and the download failed. On a machine with internet, "
    "python -c 'import keras; keras.datasets.mnist.load_data()' puts mnist.npz into "
    "~/.keras/datasets; copy it to the same place here, or pass --data-dir DIR for a folder "
    "holding mnist.npz.")


def load_data(config):
    """The data --dataset names, converted as --image-size and --channels say, with --classes
    only the classes it names.

    Returns a Data; raises DataError with a one-line message (nothing decoded beyond
    --max-memory). Files skipped from a folder are listed in Data.notes.
    """
    data = load_dataset(config)
    return data.select_classes(config.classes) if getattr(config, "classes", None) else data


def load_dataset(config):
    """The data --dataset names, converted as --image-size and --channels say."""
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
            check_labels("MNIST as downloaded", x_train, y_train, x_test, y_test)
        else:
            (x_train, y_train), (x_test, y_test) = read_npz(path, config, limit)
        return from_arrays("MNIST", x_train, y_train, x_test, y_test, config, limit,
                           [str(d) for d in range(10)])
    if os.path.isdir(dataset):
        return folders.read_image_folder(dataset, config, limit)
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
        if not looks_like_npz(path):  # numpy takes any other file for a pickle it may not load
            raise DataError(f"{path}: not an .npz file (a zip archive of arrays, as numpy.savez "
                            "writes)")
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
            check_memory(path, tr[0] + te[0], (*tr[1:3], channels), config, limit,
                         converted=False)  # loaded whole
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


def looks_like_npz(path):
    """Whether the file at path begins as a zip archive does (an .npz, maybe a damaged one)."""
    with open(path, "rb") as f:
        return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


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
