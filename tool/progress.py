"""How far a long computation is (a progress bar, or a line every few seconds), and progress.gif,
a run's grids over its epochs."""

import os
import sys
import time

import keras
from PIL import Image

from utils import write_atomically


class Progress:
    """How far a long computation of total steps is: a Keras progress bar on a terminal,
    otherwise a line every `every` seconds with the share done and the time left."""

    def __init__(self, total, what, every=10.0):
        self.total, self.what, self.every = total, what, every
        self.bar = keras.utils.Progbar(total) if sys.stdout.isatty() else None
        self.start = self.last = time.perf_counter()

    def update(self, done):
        now = time.perf_counter()
        if self.bar:
            self.bar.update(done)
        elif now - self.last >= self.every and done < self.total:
            left = (now - self.start) / done * (self.total - done)
            print(f"{self.what}: {done / self.total:.0%} done, about {left:.0f} s left", flush=True)
            self.last = now


def progress(items, total, what, every=10.0):
    """Yield items, showing how far they are (see Progress)."""
    shown = Progress(total, what, every)
    for done, item in enumerate(items, 1):
        yield item
        shown.update(done)


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


def save_progress(out, names, grid, path):
    """progress.gif at path: the grids named grid (NAME_epoch_NNN.png) among names (the files of
    the run in out), at most PROGRESS_FRAMES spread evenly from the first to the last, each with
    its epoch written above it (those still there)."""
    found = []
    for name in names:
        number = name[len(grid) + len("_epoch_"):-len(".png")]
        path_of = os.path.join(out, name)
        if (name.startswith(grid + "_epoch_") and name.endswith(".png") and number.isdigit()
                and os.path.exists(path_of)):
            found.append((int(number), path_of))
    chosen = spread(sorted(found), PROGRESS_FRAMES)
    save_progress_gif([image for _, image in chosen], [epoch for epoch, _ in chosen], path)


class EpochReport:
    """An epoch's figures: a progress bar over the epochs on a terminal; one line per epoch
    otherwise."""

    def __init__(self, epochs):
        self.epochs = epochs
        self.progbar = None  # on a terminal, from the first epoch

    def __call__(self, row, figures):
        if sys.stdout.isatty():
            if self.progbar is None:
                names = [k for k in row if k not in ("epoch", "seconds")]
                self.progbar = keras.utils.Progbar(self.epochs, stateful_metrics=names,
                                                   unit_name="epoch")
            self.progbar.update(row["epoch"], [(k, v) for k, v in row.items()
                                               if k not in ("epoch", "seconds")])
        else:
            print(f"epoch {row['epoch']}/{self.epochs}  {figures}  ({row['seconds']:.2f} s)",
                  flush=True)
