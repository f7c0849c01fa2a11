"""Shared fixtures: tiny Fashion-MNIST-shaped IDX files written by the tests themselves."""

import atexit
import contextlib
import gzip
import io
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keras's home (its data cache, the scripts' classifier cache) in a folder of the tests' own,
# removed when they end
os.environ["KERAS_HOME"] = tempfile.mkdtemp(prefix="keras-home-")
atexit.register(shutil.rmtree, os.environ["KERAS_HOME"], ignore_errors=True)

import tool.quiet  # noqa: E402,F401  (first: TensorFlow loads quietly)
import tool.sources  # noqa: E402


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
        write_gz(os.path.join(folder, tool.sources.FILES[name]), idx_bytes(array))
    return (x_train, y_train), (x_test, y_test)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fashion"))
    return folder, write_dataset(folder)


class Terminal(io.StringIO):
    """Standard output as a terminal has it (where the scripts show a progress bar)."""

    def isatty(self):
        return True


@pytest.fixture(scope="session")
def template_run(tiny_data, tmp_path_factory):
    """A two-epoch ae.py run (--h-dim 6 --batch-size 100), as on a terminal: (its folder, the
    history train returned, what it printed)."""
    import ae
    out = str(tmp_path_factory.mktemp("template") / "run")
    terminal = Terminal()
    with contextlib.redirect_stdout(terminal):
        history = ae.train(make_config(ae, tiny_data[0], out, h_dim=6))
    return out, history, terminal.getvalue()


@pytest.fixture
def finished_run(tiny_data, template_run, tmp_path):
    """A copy of a finished two-epoch ae.py run (--h-dim 6 --batch-size 100) in tmp_path/run:
    (data folder, run folder)."""
    out = str(tmp_path / "run")
    shutil.copytree(template_run[0], out)
    return tiny_data[0], out


@pytest.fixture(scope="session")
def autoencoders(tiny_data, tmp_path_factory):
    """The same ten epochs (a learning rate and a step count at which the tiny data are learnt)
    as a plain, an adversarial (also denoising: three optimizers, two decaying rates, noise) and
    a denoising autoencoder: {name: (out folder, summary, config)}."""
    import ae
    data_dir, _ = tiny_data
    runs = {}
    for name, flags in (("plain", {}), ("adversarial", {"adversarial": True, "noise": 0.5}),
                        ("denoising", {"noise": 0.5})):
        out = tmp_path_factory.mktemp(name)
        config = make_config(ae, data_dir, out, h_dim=4, epochs=10, batch_size=20, lr=3e-3,
                             eval_noise=0.5, **flags)
        ae.train(config)
        runs[name] = out, json.loads((out / "summary.json").read_text()), config
    return runs


def eager_epoch(step, generator, x_train, batch_size, loss, xla):
    """The oracle of a compiled epoch: the tutorial's loop, one eager step per batch (the short
    last one kept) of the permutation compile_epoch draws from generator's state (drawn compiled
    as the epoch is, with or without XLA, as XLA turns the state into numbers its own way);
    the epoch's mean of the step's loss."""
    import tensorflow as tf
    n = len(x_train)
    order = tf.function(lambda: tf.argsort(generator.uniform([n])), jit_compile=xla,
                        autograph=False)().numpy()
    total = 0.0
    for start in range(0, n, batch_size):
        batch = order[start:start + batch_size]
        total += float(step(tf.constant(x_train[batch], tf.float32) / 255.0)[loss]) * len(batch)
    return total / n


def main(capsys, script, *args):
    """Run script's main in this process: (exit code, stderr lines, stdout)."""
    code = 0
    try:
        script.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def make_config(script, data_dir, out, **overrides):
    """The flags script's parser gives by default, for a short run on tiny data, changed by
    overrides (h_dim=6 for --h-dim 6)."""
    config = script.make_parser().parse_args(["--data-dir", data_dir, "--out", str(out)])
    # 600 / 100: no short batch, half the compile time; the sample Frechet distance has its own tests
    values = dict(epochs=2, batch_size=100, seed=1, iw_samples=20, fd_samples=0)
    values.update(overrides)
    for name, value in values.items():
        if hasattr(config, name) or name in overrides:
            setattr(config, name, value)
    return config


def pytest_configure(config):
    # Keras's own save_weights converts variables with np.array(x), which NumPy 2 flags; not ours.
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation:DeprecationWarning")
