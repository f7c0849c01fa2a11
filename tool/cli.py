"""The command line both scripts share: the flags' types, the parser, --resume's saved flags, and
main(), which turns expected mistakes into one line and an exit code."""

import argparse
import math
import os
import signal
import sys

from tool.apply import add_flags as add_apply_flags, apply_run
from tool.errors import DISK_ERRORS, Stopped, UserError, raise_stopped
from tool.lock import check_unlocked
from tool.resume import resume_point
from tool.sources import DEBIAN_DIR
from utils import CONV_FILTERS, CONV_MIN_SIZE


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


def class_list(text):
    """An argparse type: class names or numbers, separated by commas."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"must be class names or numbers separated by commas, "
                                         f"like 0 or 0,2, got {text!r}")
    return names


def quantile(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, like 0.99, got {text}")
    return value


def test_fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with errors in one line: the usage is what --help is for."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_model_flags(parser):
    """--arch and --filters: which model, and how wide its convolutions are."""
    parser.add_argument("--arch", choices=["mlp", "conv"], default="mlp",
                        help="the model: the tutorial's MLP, or convolutional (the layers of "
                        "TensorFlow's convolutional VAE tutorial, for images of at least "
                        f"{CONV_MIN_SIZE}x{CONV_MIN_SIZE})")
    parser.add_argument("--filters", type=positive(int), default=CONV_FILTERS, metavar="F",
                        help="--arch conv's width: F and 2F filters in the encoder's convolutions, "
                        "a map of F channels and transposed convolutions of 2F and F in the "
                        "decoder (32: the tutorial's)")


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
    add_model_flags(parser)
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
    parser.add_argument("--classes", type=class_list, default=None, metavar="LIST",
                        help="train and test on these classes of labelled data only (numbers or "
                        "names, like 0 or 0,2); the other classes' test images are scored as "
                        "anomalies at the end (summary.json's anomaly_auroc)")
    parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                        help="stop at an unreadable image file instead of skipping it")
    parser.add_argument("--max-memory", type=parse_bytes, default=None, metavar="BYTES",
                        help="refuse data whose run needs more memory (about 3.5 bytes per byte "
                        "of pixels, and for --arch conv 210 per pixel byte of a batch at --filters "
                        "32, more for wider), like 8G (default: half of the memory available)")
    parser.add_argument("--out", default=out, metavar="DIR",
                        help="output folder for grids, history.csv, checkpoints and weights")
    parser.add_argument("--fd-samples", type=sample_count, default=10000, metavar="N",
                        help="images generated for summary.json's sample_fd, their Frechet distance "
                        "to the test set (0: leave it out)")
    parser.add_argument("--grid-every", type=positive(int), default=1, metavar="N",
                        help="write the epoch's grids every N epochs (and after the last)")
    parser.add_argument("--threshold-quantile", type=quantile, default=0.99, metavar="Q",
                        help="the anomaly threshold in summary.json: the score exceeded by a "
                        "share 1 - Q of the test images")
    parser.add_argument("--logdir", default=None, metavar="DIR",
                        help="also write TensorBoard summaries (losses, grids) to DIR")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its newest checkpoint, with its flags")
    start.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --out (its files are deleted once the "
                       "new run's first epoch is done)")
    add_apply_flags(parser)
    return parser


def parse_config(parser, script, argv=None):
    """Parse the flags of script (a tool.run.Script); with --resume, every flag not given takes
    the value saved with the run in --out (in its newest checkpoint that reads whole)."""
    config = parser.parse_args(argv)
    check_paths(config)
    if config.apply is None and (config.to or config.generate or config.save_reconstructions):
        raise UserError("--to, --generate and --save-reconstructions go with --apply IMAGES; add "
                        "it, or leave them out")
    if (config.filters != CONV_FILTERS and config.arch != "conv" and not config.resume
            and config.apply is None):  # a run's own flags: what is refused there says so
        raise UserError("--filters sets the width of --arch conv; add --arch conv, or leave "
                        "--filters out")
    if config.resume:
        unset = object()
        given = parser.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(config)}))
        check_unlocked(config.out)  # "in use" says more than what a run in progress holds
        _, saved, _ = resume_point(config.out, script.files)
        for name, value in saved["flags"].items():
            if getattr(given, name, None) is unset:
                setattr(config, name, value)
    return config


def shown(path):
    """A path as printed: bytes that are not UTF-8 (surrogateescape'd by Python) as \\xNN."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_paths(config):
    """Refuse, before anything is read or written: an --out or --logdir whose name is not valid
    UTF-8 (TensorFlow writes its checkpoints and summaries only to such paths), and an --out
    inside the --dataset folder (the run's own grids would become its data)."""
    for flag, path in (("--out", config.out), ("--logdir", config.logdir)):
        try:
            (path or "").encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"{flag} {shown(path)}: the name is not valid UTF-8, which TensorFlow "
                            f"needs for the files it writes; choose another {flag}") from None
    if config.dataset not in ("fashion-mnist", "mnist") and os.path.isdir(config.dataset):
        data, out = os.path.realpath(config.dataset), os.path.realpath(config.out)
        if os.path.commonpath([data, out]) == data:
            raise UserError(f"--out {shown(config.out)} is inside --dataset {shown(config.dataset)}:"
                            " the run's own images would be read as its data; choose an --out "
                            "outside that folder")


def run_main(script, train, parser, argv=None):
    """A script's main(): parse the flags and run train(config); expected mistakes become one
    line on stderr and an exit code."""
    prog = script.prog
    for stream in (sys.stdout, sys.stderr):  # names that are not UTF-8 are printed escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    signal.signal(signal.SIGTERM, raise_stopped)  # what runs unwinds, as for Ctrl-C
    applying = False
    try:
        config = parse_config(parser, script, argv)
        applying = config.apply is not None
        if applying:
            return apply_run(config, script, parser)
        return train(config)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"{prog}: error: cannot write{where}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    except MemoryError as e:  # numpy's message says how much, for what shape
        print(f"{prog}: error: out of memory ({e}); use a smaller --image-size or fewer images",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # before the run began (Run answers it from then on)
        stop = e if isinstance(e, Stopped) else Stopped()
        what = ("; --apply wrote nothing" if applying
                else " before training began, so nothing was written")
        print(f"{prog}: stopped by {stop.name}{what}", file=sys.stderr)
        sys.exit(128 + stop.signum)


def script_main(script, train, make_parser):
    """A script's main(argv=None): its flags (make_parser(), argv or the command line), then
    train(config), through run_main."""
    def main(argv=None):
        return run_main(script, train, make_parser(), argv)
    return main
