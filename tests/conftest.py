"""Shared fixtures: tiny Fashion-MNIST-shaped IDX files written by the tests themselves."""

import argparse
import gzip
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import utils  # noqa: E402


def idx_bytes(array, magic=None):
    """The IDX encoding of a uint8 array: magic, big-endian dimensions, then the bytes."""
    array = np.asarray(array, np.uint8)
    magic = 0x800 + array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_gz(path, payload):
    with gzip.open(path, "wb") as f:
        f.write(payload)


def make_images(n, seed):
    """n 28x28 images, each one of ten smooth class prototypes plus noise: easy to learn."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28] / 27.0
    prototypes = np.stack([np.sin((k % 5 + 1) * np.pi * xx) * np.cos((k // 5 + 1) * np.pi * yy)
                           for k in range(10)])
    labels = rng.integers(0, 10, n)
    images = 0.5 + 0.45 * prototypes[labels] + 0.05 * rng.standard_normal((n, 28, 28))
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), labels.astype(np.uint8)


def write_dataset(folder, n_train=600, n_test=100):
    """Write the four Fashion-MNIST files into folder; return the arrays written."""
    os.makedirs(folder, exist_ok=True)
    (x_train, y_train), (x_test, y_test) = make_images(n_train, 0), make_images(n_test, 1)
    for name, array in (("train_images", x_train), ("train_labels", y_train),
                        ("test_images", x_test), ("test_labels", y_test)):
        write_gz(os.path.join(folder, utils.FILES[name]), idx_bytes(array))
    return (x_train, y_train), (x_test, y_test)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fashion"))
    return folder, write_dataset(folder)


def make_config(data_dir, out, **overrides):
    """The namespace a script's parser would give, for a short run on tiny data."""
    values = dict(epochs=2, batch_size=64, lr=1e-3, seed=1, data_dir=data_dir, out=str(out),
                  logdir=None, resume=False, overwrite=False)
    values.update(overrides)
    return argparse.Namespace(**values)


def pytest_configure(config):
    # Keras's own save_weights converts variables with np.array(x), which NumPy 2 flags; not ours.
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation:DeprecationWarning")
