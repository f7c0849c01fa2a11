"""The background writer of a run's epoch files: run.json, history.csv, the grids and TensorBoard,
written while the next epoch trains, one epoch's files at a time."""

import concurrent.futures
import os

import tensorflow as tf

import utils
from tool.errors import UserError
from tool.files import error_reason, write_history, write_json


class EpochFiles:
    """Writes an epoch's files on a thread of its own (submit); wait() returns once they are
    written, raising what failed. logdir: where TensorBoard summaries go, or None."""

    def __init__(self, out, logdir):
        self.out = out
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.pending = None  # the last epoch's files while the thread has them
        self.tensorboard = None
        if logdir:
            try:
                self.tensorboard = tf.summary.create_file_writer(logdir)
            except tf.errors.OpError as e:
                self.pool.shutdown()
                raise UserError(f"--logdir {logdir}: cannot write there "
                                f"({error_reason(e)})") from None

    def submit(self, row, history, grids, run_json):
        """Start writing the files of the epoch of row: history (the rows up to it), grids
        ({name: 100 images} as NAME_epoch_NNN.png), and run_json (a dict)."""
        self.pending = self.pool.submit(self.write, row, history, grids, run_json)

    def write(self, row, history, grids, run_json):
        epoch = row["epoch"]
        write_json(os.path.join(self.out, "run.json"), run_json)
        write_history(os.path.join(self.out, "history.csv"), history)
        for name, images in grids.items():
            utils.save_images(images, os.path.join(self.out, f"{name}_epoch_{epoch:03d}.png"))
        if self.tensorboard:
            with self.tensorboard.as_default(step=epoch):
                for name, value in row.items():
                    if name != "epoch":
                        tf.summary.scalar(name, value)
                for name, images in grids.items():
                    grid = utils.make_grid(images)
                    tf.summary.image(name, (grid[..., None] if grid.ndim == 2 else grid)[None])
            self.tensorboard.flush()  # so a stop at once loses no finished epoch's summaries

    def wait(self):
        """Wait for the last epoch's files; raise what failed in writing them."""
        if self.pending:
            try:
                self.pending.result()
            finally:
                self.pending = None

    def settle(self):
        """Wait for the last epoch's files, whatever comes of them (a run that failed, or a
        stop at once: they are still written, errors aside)."""
        if self.pending:
            concurrent.futures.wait([self.pending])

    def close(self):
        self.pool.shutdown()
        if self.tensorboard:
            self.tensorboard.close()
