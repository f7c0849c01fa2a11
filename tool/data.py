"""Images as the models take them (Data), what they may cost in memory, and the checks every
data source shares: enough images, labels that fit, one conversion of a Pillow image."""

import functools
import hashlib
import os
import sys

import numpy as np
from PIL import Image

from tool.errors import DataError
from utils import CONV_FILTERS


CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")


RESAMPLE = Image.Resampling.LANCZOS  # Pillow's Lanczos filter, anti-aliased when shrinking


BACKGROUND = (0, 0, 0, 255)  # transparent pixels are composited on black, as Fashion-MNIST's is


MIN_IMAGES = 50  # per split: the reconstruction grids show 50 test images


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
        self.x_held_out = None  # with --classes, the test images of the other classes

    def select_classes(self, classes):
        """These data with only the classes named in the list classes (class names or numbers)
        in both splits; the test images of the others become x_held_out, the anomalies."""
        if self.y_train is None:
            raise DataError(f"--classes needs labelled data; {self.source} has "
                            f"{self.no_labels or 'no labels'}")
        chosen = sorted({class_number(name, self.class_names) for name in classes})
        train, test = (np.isin(y, chosen) for y in (self.y_train, self.y_test))
        names = ", ".join(self.class_names[c] for c in chosen)
        where = f"{self.source}, classes {names}"
        check_counts(where, int(train.sum()), int(test.sum()), "; choose more classes with --classes")
        if test.all():
            raise DataError(f"--classes {','.join(classes)}: every test image is of those classes, "
                            "so none is left to score as an anomaly; leave out a class")
        selected = Data(where, self.x_train[train], self.y_train[train], self.x_test[test],
                        self.y_test[test], self.class_names, self.notes, self.no_labels)
        selected.x_held_out = self.x_test[~test]
        return selected

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


def class_number(name, class_names):
    """The number of the class a --classes item names: its number, or its name."""
    if name in class_names:
        return class_names.index(name)
    if name.isdigit() and int(name) < len(class_names):
        return int(name)
    raise DataError(f"--classes: the data have no class {name!r}; their classes are "
                    + ", ".join(f"{i} ({n})" for i, n in enumerate(class_names[:20]))
                    + ", ..." * (len(class_names) > 20))


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
    """n bytes as GiB from 1 GiB, as MiB down to what rounds to 0.1 MiB, then as KiB or bytes."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    if n >= 2**20 / 20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n:,} bytes"


# Bytes of memory a run takes per byte of its decoded pixels, beyond TensorFlow's own: the
# arrays as loaded, TensorFlow's copy of the training set, the test set as floats. Measured as
# the rise of peak memory from 5,500 to 22,000 images of 64x64x3: 3.3 for ae.py, 2.2 for vae.py.
MEMORY_PER_PIXEL_BYTE = 3.5


# And per byte of pixels of each image in a training batch of --arch conv at --filters 32, in
# proportion to --filters: the feature maps of the convolutions and their gradients (the MLP's
# are a few hundred values an image). Measured as the rise of peak memory from --batch-size 64 to
# 512 with images of 64x64x3 and 128x128x3: 135 and 207 for ae.py, 193 and 165 for vae.py; at
# 64x64x3 and --filters 64, 327 for ae.py and 330 for vae.py, and at --filters 128, 651 for ae.py.
CONV_BATCH_PER_PIXEL_BYTE = 210


def run_bytes(n, pixels, batch=0, filters=CONV_FILTERS):
    """About the memory a run holds for n images of pixels bytes each, trained on in batches of
    batch images through convolutions filters wide (batch 0: no convolutions)."""
    conv = CONV_BATCH_PER_PIXEL_BYTE * filters / CONV_FILTERS * batch * pixels
    return int(MEMORY_PER_PIXEL_BYTE * n * pixels + conv)


def conv_batch(config, n):
    """The images of a training batch whose feature maps count in run_bytes: --batch-size (at most
    n) for a --arch conv run, 0 otherwise (an MLP, or --apply, which computes in parts)."""
    if getattr(config, "arch", "mlp") != "conv" or getattr(config, "apply", None) is not None:
        return 0
    return min(config.batch_size, n)


def check_memory(where, n, shape, config, limit, converted=True):
    """Refuse data whose run would need more than limit (see run_bytes; n x height x width x
    channels bytes of pixels); a conv batch counts at the size trained on (converted)."""
    batch = conv_batch(config, n) if converted else 0
    need = run_bytes(n, int(np.prod(shape)), batch, getattr(config, "filters", CONV_FILTERS))
    if need > limit:
        smaller = ", a smaller --batch-size" if batch else ""
        advice = ("raise --max-memory (a resumed run keeps its data and flags)"
                  if getattr(config, "resume", False) else
                  f"use a smaller --image-size{smaller} or fewer images, or raise --max-memory")
        raise DataError(f"{where}: {n:,} images of {'x'.join(map(str, shape))} need about "
                        f"{size_text(need)} of memory to train on, more than "
                        f"{limit_text(config, limit)}; {advice}")


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
        if y.dtype.kind not in "iu":
            raise DataError(f"{where}: y_{split} must hold integer class numbers from 0 "
                            f"(it holds {y.dtype})")
        if len(y) and y.min() < 0:
            raise DataError(f"{where}: y_{split} must hold integer class numbers from 0 "
                            f"(its smallest is {y.min()})")


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
