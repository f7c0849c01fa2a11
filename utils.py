"""Helpers shared by ae.py and vae.py: data, image grids, output files, the epoch loop.

Nothing here runs at import time beyond importing TensorFlow, so tests can import it freely.
"""

import argparse
import csv
import glob
import gzip
import json
import math
import os
import shutil
import signal
import sys
import tempfile

import numpy as np
import keras
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
        import keras
        return keras.datasets.fashion_mnist.load_data()
    except Exception:  # no network, proxy, disk full: all lead to the same advice
        raise DataError(HOW_TO_GET_DATA) from None


# ---------------------------------------------------------------------------------------------
# Images and output files
# ---------------------------------------------------------------------------------------------


UMASK = os.umask(0o022)
os.umask(UMASK)  # read the process's umask (the only way is to set it) and put it back


def write_atomically(path, write):
    """Call write(tmp_path), then rename over path, so path is never left half-written."""
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=".tmp-", suffix="-" + name)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # as open() would have made it, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def make_grid(images):
    """100 28x28 images -> one 280x280 array, image k at row k // 10, column k % 10."""
    images = np.asarray(images, np.uint8).reshape(10, 10, 28, 28)
    return images.transpose(0, 2, 1, 3).reshape(280, 280)


def save_images(images, path):
    """Save 100 28x28 uint8 images as one 280x280 grayscale PNG, a 10x10 grid in row-major order.

    Image k lands at row k // 10, column k % 10.
    """
    grid = make_grid(images)
    # compress_level 1: half the encoding time of the default for 10% more bytes, as this runs
    # every epoch
    write_atomically(path, lambda tmp: Image.fromarray(grid, mode="L").save(
        tmp, format="PNG", compress_level=1))


def to_uint8(images):
    """Pixels in [0, 1] (any shape with 784 per image) -> uint8 images of 28x28."""
    pixels = np.nan_to_num(np.clip(np.asarray(images), 0.0, 1.0))  # a diverged model gives NaN
    return (pixels * 255.0 + 0.5).astype(np.uint8).reshape(-1, 28, 28)


def pair_grid(originals, reconstructions):
    """50 originals and their reconstructions -> 100 images, originals in the even columns."""
    return np.stack([to_uint8(originals[:50]), to_uint8(reconstructions[:50])], 1).reshape(100, 28, 28)


def triplet_grid(noisy, outputs, clean):
    """30 noisy inputs, their outputs and the clean originals -> 100 images: each row holds three
    (noisy, output, clean) triplets side by side; the last column stays black."""
    triplets = np.stack([to_uint8(noisy[:30]), to_uint8(outputs[:30]), to_uint8(clean[:30])], 1)
    rows = triplets.reshape(10, 9, 28, 28)
    return np.concatenate([rows, np.zeros((10, 1, 28, 28), np.uint8)], 1).reshape(100, 28, 28)


def prepare_out_dir(out_dir):
    """Create out_dir and check it is writable before any training starts."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise UserError(f"cannot write to output folder {out_dir}: {e.strerror}; "
                        "choose another with --out") from None


def write_json(path, obj):
    """Write obj as indented JSON, replacing the file atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
    write_atomically(path, write)


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


def non_negative(text):
    """An argparse type: a finite float >= 0."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
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
    parser.add_argument("--out", default=out, metavar="DIR",
                        help="output folder for grids, history.csv, checkpoints and weights")
    parser.add_argument("--logdir", default=None, metavar="DIR",
                        help="also write TensorBoard summaries (losses, grids) to DIR")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its newest checkpoint, with its flags")
    start.add_argument("--overwrite", action="store_true",
                       help="delete the run already in --out and start afresh")
    return parser


def parse_config(parser, argv=None):
    """Parse the flags; with --resume, flags not given take the values the run in --out used."""
    config = parser.parse_args(argv)
    if config.resume:
        unset = object()
        given = parser.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(config)}))
        for name, value in read_run_flags(config.out).items():
            if getattr(given, name, None) is unset and name not in RESUMABLE_FLAGS:
                setattr(config, name, value)
    return config


def run_main(prog, train, parser, argv=None):
    """Parse the flags and run train(config); expected mistakes become one line on stderr."""
    try:
        return train(parse_config(parser, argv))
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # outside the epochs, where Run turns Ctrl-C into a clean stop
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
# One run's bookkeeping: checkpoints, resume, signals, divergence, progress, TensorBoard
# ---------------------------------------------------------------------------------------------

# Flags that may differ when a run is resumed: where things are, how long to go on, and what to
# measure at the end. Any other flag would change the run being continued.
RESUMABLE_FLAGS = {"epochs", "data_dir", "out", "logdir", "resume", "overwrite",
                   "eval_noise", "export_codes", "compare_pca", "iw_samples"}
# What a run writes into --out; --overwrite deletes these and nothing else.
RUN_FILES = ("run.json", "history.csv", "checkpoints", "*_epoch_[0-9]*.png", "*.weights.h5",
             "summary.json", "codes.npz", "pca_vs_ae.json", "pca_vs_ae.png", "interpolation.png")


def read_run_flags(out_dir):
    """The flags recorded in out_dir/run.json by the run there."""
    path = os.path.join(out_dir, "run.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"--resume: {out_dir} holds no run to continue (no run.json); "
                        "start without --resume") from None
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: cannot read {path} ({e}); start afresh with --overwrite") from None


class Run:
    """The bookkeeping of one training run in its output folder, around the training loop.

    It refuses to mix two runs in one folder (unless --resume or --overwrite), records the flags
    in run.json, and after every epoch writes the grids, history.csv, TensorBoard summaries and a
    checkpoint (model, optimizer, random generators, fixed probes, epoch), then reports progress.
    With --resume it restores the newest checkpoint and the history up to it, so the run goes on
    exactly as if never stopped. A non-finite loss stops the run (Diverged, exit code 3) before
    anything of that epoch is written. SIGINT and SIGTERM stop it cleanly between epochs.

    Use it as a context manager (it owns the signal handlers while training):

        with utils.Run(config, "ae.py") as run:
            first = run.restore(model=model, optimizer=optimizer, generator=generator)
            for epoch in run.epochs(first):
                ...
                run.end_epoch(row, grids, "train bce 0.2850  test bce 0.2865")
            run.save_weights(model, "ae.weights.h5")
    """

    def __init__(self, config, prog):
        self.config, self.prog, self.out = config, prog, config.out
        prepare_out_dir(self.out)
        self.history_path = os.path.join(self.out, "history.csv")
        flags = {k: v for k, v in sorted(vars(config).items()) if k not in RESUMABLE_FLAGS}
        if config.resume:
            saved = read_run_flags(self.out)
            for name in sorted(set(saved) | set(flags)):
                if saved.get(name) != flags.get(name):
                    raise UserError(
                        f"--resume: --{name.replace('_', '-')} {flags.get(name)} differs from the "
                        f"run in {self.out} ({saved.get(name)}); resume with the run's flags, or "
                        "start afresh with --overwrite")
        else:
            existing = sorted(p for pattern in RUN_FILES
                              for p in glob.glob(os.path.join(self.out, pattern)))
            if existing and not config.overwrite:
                names = ", ".join(os.path.basename(p) for p in existing[:3])
                raise UserError(f"{self.out} already holds a run ({names}{', ...' * (len(existing) > 3)}"
                                "); continue it with --resume, or delete it and start afresh with "
                                "--overwrite")
            for path in existing:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            write_json(os.path.join(self.out, "run.json"), flags)
        self.history = []
        self.writer = None
        if config.logdir:
            try:
                import tensorboard  # noqa: F401  (tf.summary needs it to write anything)
            except ImportError:
                raise UserError("--logdir needs TensorBoard: pip install tensorboard") from None
            try:
                self.writer = tf.summary.create_file_writer(config.logdir)
            except tf.errors.OpError as e:
                raise UserError(f"--logdir {config.logdir}: cannot write there ({e.message})") from None
        self.progbar = None
        self.signal = None

    def __enter__(self):
        def stop(signum, frame):
            self.signal = signum  # acted on between epochs, so no file is left half-written
        self.old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        self.restore_signal_handlers()
        if self.writer:
            self.writer.close()

    def restore_signal_handlers(self):
        for s, handler in self.old_handlers.items():
            signal.signal(s, handler)

    def restore(self, **objects):
        """Track objects (models, optimizers, tf.random.Generators, fixed probes held in
        tf.Variables) in the checkpoints; with --resume, load the newest checkpoint and the
        history up to it. Returns the first epoch to train."""
        self.epoch = tf.Variable(0, dtype=tf.int64)
        self.checkpoint = tf.train.Checkpoint(epoch=self.epoch, **objects)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(self.out, "checkpoints"), max_to_keep=3)
        if self.config.resume:
            path = self.manager.latest_checkpoint
            if path is None:
                raise UserError(f"--resume: no checkpoint in {self.out}/checkpoints; "
                                "start afresh with --overwrite")
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except (tf.errors.OpError, AssertionError, ValueError) as e:
                reason = str(e).strip().splitlines()[0]
                raise UserError(f"--resume: cannot restore {path} ({reason}); "
                                "start afresh with --overwrite") from None
            done = int(self.epoch)
            if os.path.exists(self.history_path):
                with open(self.history_path, newline="") as f:
                    self.history = [row for row in csv.DictReader(f) if int(row["epoch"]) <= done]
            print(f"resuming the run in {self.out} after epoch {done}", flush=True)
        return int(self.epoch) + 1

    def epochs(self, first):
        """The epochs first .. --epochs; stops with exit code 128 + signal number when SIGINT or
        SIGTERM arrived during the previous one. Once they are done, the signals act as usual."""
        for epoch in range(first, self.config.epochs + 1):
            if self.signal:
                self.interrupted()
            yield epoch
        if self.signal:  # during the last epoch: it is saved, the end-of-run work is left to --resume
            self.interrupted()
        self.restore_signal_handlers()  # the end-of-run work is not an epoch: Ctrl-C stops it at once

    def interrupted(self):
        name, done = signal.Signals(self.signal).name, int(self.epoch)
        if done:
            data = f" --data-dir {self.config.data_dir}" if self.config.data_dir else ""
            print(f"{self.prog}: stopped by {name} after epoch {done}, checkpoint saved; continue "
                  f"with: python {self.prog} --out {self.out}{data} --resume", file=sys.stderr,
                  flush=True)
        else:
            print(f"{self.prog}: stopped by {name} before the first epoch ended; nothing to resume",
                  file=sys.stderr, flush=True)
        sys.exit(128 + self.signal)

    def end_epoch(self, row, grids, figures):
        """Record a finished epoch: row (epoch, seconds, the losses) goes to history.csv and
        TensorBoard, grids ({name: 100 images}) to NAME_epoch_NNN.png; checkpoint; report."""
        epoch = row["epoch"]
        bad = [k for k, v in row.items() if not math.isfinite(v)]
        if bad:
            kept = self.manager.latest_checkpoint or "none, as no epoch finished"
            raise Diverged(f"epoch {epoch}: {bad[0]} is {row[bad[0]]}; training diverged, most "
                           f"likely because the learning rate ({self.config.lr}) is too high: "
                           f"try a smaller --lr. Last good checkpoint: {kept}")
        for name, images in grids.items():
            save_images(images, os.path.join(self.out, f"{name}_epoch_{epoch:03d}.png"))
        self.history.append(row)
        write_history(self.history_path, self.history)
        if self.writer:
            with self.writer.as_default(step=epoch):
                for name, value in row.items():
                    if name != "epoch":
                        tf.summary.scalar(name, value)
                for name, images in grids.items():
                    tf.summary.image(name, make_grid(images)[None, :, :, None])
        self.epoch.assign(epoch)
        self.manager.save(checkpoint_number=epoch)
        self.report(row, figures)

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
        write_atomically(os.path.join(self.out, name), model.save_weights)


# ---------------------------------------------------------------------------------------------
# Codes: PCA, nearest neighbours, statistics, scatter plots
# ---------------------------------------------------------------------------------------------

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
# tab10, the usual ten class colours
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def fit_pca(x, k):
    """Principal component analysis by SVD of the centred data.

    Args:
        x: (n, d) array; k: number of components.
    Returns:
        (mean, components): (d,) and (k, d), the components orthonormal, by falling variance.
        Codes are (x - mean) @ components.T; reconstructions codes @ components + mean.
    """
    x = np.asarray(x, np.float64)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:k]


def knn_accuracy(train_codes, train_labels, test_codes, test_labels, k=5, chunk=1000):
    """Accuracy of a k-nearest-neighbour vote (Euclidean; a tie goes to the nearer class)."""
    train_codes = np.asarray(train_codes, np.float32)
    train_sq = (train_codes ** 2).sum(1)
    correct = 0
    for start in range(0, len(test_codes), chunk):
        q = np.asarray(test_codes[start:start + chunk], np.float32)
        d2 = train_sq[None, :] - 2 * q @ train_codes.T  # + |q|^2, the same along each row
        nearest = np.argpartition(d2, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(d2, nearest, 1).argsort(1)
        votes = np.asarray(train_labels)[np.take_along_axis(nearest, order, 1)]  # nearest first
        for row, truth in zip(votes, test_labels[start:start + chunk]):
            counts = np.bincount(row, minlength=10)
            winners = np.flatnonzero(counts == counts.max())
            correct += next(c for c in row if c in winners) == truth
    return correct / len(test_codes)


def code_statistics(codes):
    """How far codes are from N(0, I), averaged over the code dimensions:
    {"code_mean_abs": mean |mean_d|, "code_std_dev_from_1": mean |std_d - 1|}."""
    codes = np.asarray(codes, np.float64)
    return {"code_mean_abs": float(np.abs(codes.mean(0)).mean()),
            "code_std_dev_from_1": float(np.abs(codes.std(0) - 1).mean())}


def first_two_directions(codes):
    """The codes themselves when 2-D, else their projection on their first two principal
    directions."""
    if codes.shape[1] == 2:
        return codes
    mean, components = fit_pca(codes, 2)
    return (codes - mean) @ components.T


def save_scatter_plots(panels, labels, path, size=400):
    """Scatter plots side by side, points coloured by class, with a legend of the class names.

    Args:
        panels: [(title, points of shape (n, 2))].
        labels: (n,) class of each point.
    """
    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default()
    top, margin, legend = 40, 10, 130
    image = Image.new("RGB", (len(panels) * (size + margin) + margin + legend, size + top + margin),
                      "white")
    draw = ImageDraw.Draw(image)
    for i, (title, points) in enumerate(panels):
        x0 = margin + i * (size + margin)
        draw.text((x0, 8), title, fill="black", font=font)
        draw.rectangle([x0, top, x0 + size, top + size], outline="black")
        lo, hi = np.percentile(points, [0.5, 99.5], axis=0)  # a few outliers don't squash the rest
        xy = np.clip((points - lo) / np.maximum(hi - lo, 1e-12), 0, 1) * (size - 8) + 4
        for (px, py), label in zip(xy, labels):
            px, py = x0 + px, top + size - py  # y grows upwards, as on a plot
            draw.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill=COLOURS[label])
    x0 = margin + len(panels) * (size + margin)
    for c, name in enumerate(CLASS_NAMES):
        y = top + 10 + 18 * c
        draw.rectangle([x0, y, x0 + 10, y + 10], fill=COLOURS[c])
        draw.text((x0 + 16, y - 1), name, fill="black", font=font)
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


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
