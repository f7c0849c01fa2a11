"""The life of one training run in its output folder: check, lock, start, epochs, finish.

Before anything is written it checks the batch size against the data, --logdir and the
output folder; then it locks the folder (one process per folder), refuses to mix two runs
in it (unless --resume or --overwrite) and removes what interrupted writes left. Nothing is
written before the first epoch ends; --overwrite deletes the old run only then.

After every epoch it saves a checkpoint (model, optimizers, random generators, fixed probes,
the epoch, and the run's flags and history) and reports progress; run.json, history.csv, the
grids and TensorBoard summaries are written by a background writer (tool.writer) while the
next epoch trains; a failed write stops the run at the next epoch's end; all are written
before the run goes on to its end, or stops on a signal. --resume continues from the newest
checkpoint that reads whole, skipping damaged ones with a line each, and rebuilds
history.csv and run.json from it. A non-finite loss stops the run (Diverged, exit code 3)
before anything of that epoch is written. A failed write (full disk, no permission) stops it
with one line naming the last good checkpoint. The first SIGINT or SIGTERM stops it after
the epoch in progress is saved; a second one stops it at once (tool.stop).
"""

import concurrent.futures
import contextlib
import json
import math
import os
import sys
import time
from typing import Callable, NamedTuple

import tensorflow as tf

import utils
from utils import TMP_PREFIX
from tool import export, files
from tool.checkpoints import Checkpoints, checkpoint_prefixes
from tool.errors import DISK_ERRORS, Diverged, Stopped, UserError
from tool.files import check_folder, error_reason, remove, remove_leftovers
from tool.lock import lock_folder, unlock_refused
from tool.manifest import SAVED_MODEL, Manifest, files_of_run
from tool.progress import EpochReport, save_progress
from tool.resume import APPLY_ONLY, START_FLAGS, check_same_run, old_run_files, resume_command, resume_point
from tool.stop import Stop
from tool.writer import EpochFiles


NEW_CHECKPOINTS = TMP_PREFIX + "new-checkpoints"  # a replacing run's first, removed if left


class Script(NamedTuple):
    """What a script tells its runs: its name, the flags of its own that --resume may change,
    the files of its own that a run writes (glob patterns in --out), and for --apply, its model
    built for a run's flags and images of shape (h, w, c) (build_model(flags, shape)) and
    whether that run's model samples from a prior (generates(flags))."""
    prog: str
    resumable_flags: tuple = ()
    files: tuple = ()
    build_model: Callable = None
    generates: Callable = None

    @property
    def weights(self):
        """The file of the final weights: ae.weights.h5 for ae.py."""
        return os.path.splitext(self.prog)[0] + ".weights.h5"

    @property
    def keras(self):
        """The model's .keras file: ae.keras for ae.py."""
        return os.path.splitext(self.prog)[0] + ".keras"

    @property
    def written(self):
        """The files of its own a run writes over in a folder that holds no run."""
        return self.files + (self.weights, self.keras, SAVED_MODEL)


def check_start(config, data):
    """The checks before a run locks anything: the image size for --arch conv and the batch
    size against the data, --logdir and --out."""
    n_train = len(data.x_train)
    if config.arch == "conv" and min(data.shape[:2]) < utils.CONV_MIN_SIZE:
        h, w, _ = data.shape
        raise UserError(f"--arch conv needs images of at least {utils.CONV_MIN_SIZE}x"
                        f"{utils.CONV_MIN_SIZE} pixels (two 3x3 convolutions of stride 2), and "
                        f"these are {h}x{w}; use --image-size, or --arch mlp")
    if config.batch_size > n_train:
        raise UserError(f"--batch-size {config.batch_size} is more than the {n_train} "
                        f"training images; use at most {n_train}")
    if config.logdir:
        try:
            import tensorboard  # noqa: F401  (tf.summary needs it to write anything)
        except ImportError:
            raise UserError("--logdir needs TensorBoard: pip install tensorboard") from None
        check_folder(config.logdir, "--logdir")
    check_folder(config.out, "--out")


def finishing_error(exc, out):
    """(what happened, exit code) where exc, a signal or a failed write, stopped the end-of-run
    work of the run in out; None for another exception, or none."""
    if isinstance(exc, KeyboardInterrupt):
        stop = exc if isinstance(exc, Stopped) else Stopped()
        return f"stopped by {stop.name}", 128 + stop.signum
    if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:  # codes.npz, a figure, ...
        return f"cannot write into {out} ({error_reason(exc)})", 2
    return None


class Run:
    """A training run in its output folder (see the module's docstring).

    Use it as a context manager (it owns the lock and the signal handlers), as train() in
    ae.py and vae.py does: run.restore(...), then for each epoch of run.epochs(first),
    run.call(train_epoch, x_train) and run.end_epoch(row, grids, figures); run.save_final(...)."""

    def __init__(self, config, script, data):
        check_start(config, data)
        self.config, self.script, self.prog, self.out = config, script, script.prog, config.out
        self.flags = {k: v for k, v in sorted(vars(config).items()) if k not in START_FLAGS}
        self.data = data.description()
        self.history = []  # the rows of the epochs done
        self.old_run = []  # --overwrite: the files of the run to replace once this one has an epoch
        self.resume_from = None  # the checkpoint --resume continues from
        self.resumed_epoch = 0  # its epoch
        self.resumed_data = None  # what it says of its data
        self.checkpointed_flags = None  # the flags in the newest checkpoint, once there is one
        # what the checkpoints hold beside the objects given to restore()
        self.epoch = tf.Variable(0, dtype=tf.int64)
        self.saved_flags = tf.Variable("", dtype=tf.string)
        self.saved_history = tf.Variable("", dtype=tf.string)
        self.saved_data = tf.Variable(json.dumps(self.data), dtype=tf.string)
        self.checkpoint = None  # the tf.train.Checkpoint, once restore() knows what it tracks
        self.checkpoints = None  # Checkpoints, from the first one saved or resumed
        self.report = EpochReport(config.epochs)
        self.finishing = False  # once the epochs are done, for the end-of-run figures
        self.manifest = Manifest(self.out, self.flags, self.data)  # run.json
        self.stop = Stop(self)
        self.epoch_thread = concurrent.futures.ThreadPoolExecutor(1)  # the epochs (see call)
        self.lock = lock_folder(self.out)
        try:
            if config.resume:
                self.start_resumed()
            else:
                self.old_run = old_run_files(script, self.out, self.flags, config.overwrite)
            remove_leftovers(self.out)  # the folder is this run's, or one to be replaced
            self.files = EpochFiles(self.out, config.logdir)
        except BaseException:
            unlock_refused(self.lock)
            self.epoch_thread.shutdown()
            raise

    def start_resumed(self):
        """--resume: the checkpoint to continue from, checked against this run's flags and data."""
        self.resume_from, saved, skipped = resume_point(self.out, self.script.files)
        check_same_run(self.script, self.out, self.flags, self.data, saved)
        for name, reason in skipped:
            print(f"{self.prog}: skipped checkpoint {name}: {reason}", file=sys.stderr, flush=True)
        self.history = saved["history"]
        self.resumed_data = saved.get("data")
        self.checkpointed_flags = saved["flags"]
        self.resumed_epoch = self.history[-1]["epoch"] if self.history else 0
        checkpoints = os.path.join(self.out, "checkpoints")
        self.manifest.add(*(os.path.relpath(p, self.out) for p in files_of_run(self.out, self.script.files)
                            if os.path.dirname(p) != checkpoints))

    def __enter__(self):
        self.stop.install()
        return self

    def __exit__(self, exc_type, exc, traceback):
        self.stop.uninstall()
        try:
            if exc_type is None:
                self.flush()
            else:  # the run failed: its last files are still written, errors aside
                self.files.settle()
        finally:
            self.epoch_thread.shutdown()
            self.files.close()
            if exc_type is not None and not self.history:  # failed before any epoch was saved:
                unlock_refused(self.lock, os.path.join(self.out, "checkpoints"))  # nothing is left
            else:
                self.lock.close()
        error = self.finishing and finishing_error(exc, self.out)
        if error:
            raise UserError(f"{error[0]} during the end-of-run figures; every epoch is saved (the "
                            f"last checkpoint is {self.checkpoints.latest}), and this finishes "
                            f"them: {self.resume_command()}", exit_code=error[1]) from None

    def resume_command(self):  # the command that continues this run from its newest checkpoint
        return resume_command(self.script, self.out, self.flags, self.checkpointed_flags)

    def call(self, fn, *args):
        """(fn(*args), its seconds) on a worker thread, so the main one answers signals."""
        start = time.perf_counter()
        result = self.epoch_thread.submit(fn, *args).result()
        return result, time.perf_counter() - start

    def restore(self, **objects):
        """Track objects (models, optimizers, tf.random.Generators, fixed probes held in
        tf.Variables) in the checkpoints; with --resume, load them from the checkpoint chosen,
        rebuild history.csv and run.json from it, and return the first epoch to train."""
        tracked = dict(epoch=self.epoch, run_flags=self.saved_flags, run_history=self.saved_history,
                       **objects)
        self.checkpoint = tf.train.Checkpoint(run_data=self.saved_data, **tracked)
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

    def recreate_grids(self, make):
        """On resume: the grids of the newest checkpoint's epoch, from make() ({name: 100
        images}), where they are missing (a kill -9 before the background writer wrote them)."""
        epoch = int(self.epoch)
        if not (self.resume_from and epoch and (epoch % self.config.grid_every == 0
                                                or epoch == self.checkpointed_flags["epochs"])):
            return
        for name, images in make().items():
            file = f"{name}_epoch_{epoch:03d}.png"
            if not os.path.exists(os.path.join(self.out, file)):
                with self.writing_files():
                    utils.save_images(images, self.path(file))

    def rebuild_files(self):
        """On resume: run.json and history.csv as the checkpoint has them."""
        with self.writing_files():
            self.saved_data.assign(json.dumps(self.data))  # an older run's checkpoint lacks it
            self.manifest.add("run.json", "history.csv")
            self.manifest.write()
            if self.history:
                files.rebuild_history(self.prog, os.path.join(self.out, "history.csv"), self.history)

    def path(self, name):
        """The path of the file name in the run folder, listed in run.json before it is written."""
        if name not in self.manifest.names:
            self.manifest.add(name)
            with self.writing_files():
                self.manifest.write()
        return os.path.join(self.out, name)

    def epochs(self, first):
        """The epochs first .. --epochs; stops with exit code 128 + signal number when SIGINT or
        SIGTERM arrived during the previous one. Once they are done, the signals act as usual."""
        for epoch in range(first, self.config.epochs + 1):
            if self.stop.signal:
                self.interrupted()
            yield epoch
        if self.stop.signal:  # during the last epoch: it is saved, the end-of-run work is left to --resume
            self.interrupted()
        self.flush()  # the end-of-run work reads the grids
        self.stop.uninstall()  # the end-of-run work is not an epoch: Ctrl-C stops it at once
        self.finishing = True

    def interrupted(self):
        self.flush()
        self.stop.exit_after()

    @contextlib.contextmanager
    def writing_files(self):
        """Around writes into the run folder: a second signal waits for them, and a failed write
        (full disk, no permission) becomes one line that names the last good checkpoint."""
        self.stop.writing = True
        try:
            yield
        except (OSError, tf.errors.OpError) as e:
            remove_leftovers(self.out)
            last = self.checkpoints and not self.old_run and self.checkpoints.latest
            if self.old_run:
                after = ("the run that was there is untouched (it is replaced only once this one "
                         "has an epoch saved); once the cause is fixed, start this one again")
            elif last:
                after = (f"the last good checkpoint is {last}; once the cause is fixed, continue "
                         f"with: {self.resume_command()}")
            else:
                after = "no epoch was saved; once the cause is fixed, start the run again"
            raise UserError(f"cannot write into {self.out} ({error_reason(e)}); {after}") from None
        finally:
            self.stop.writing = False

    def end_epoch(self, row, grids, figures):
        """Record a finished epoch: checkpoint (with row added to the history) and report;
        then, on the background writer, run.json, history.csv, grids ({name: 100 images} as
        NAME_epoch_NNN.png) and TensorBoard. The previous epoch's files are written first."""
        epoch = row["epoch"]
        bad = [k for k, v in row.items() if not math.isfinite(v)]
        if bad:
            kept = (self.checkpoints and self.checkpoints.latest) or "none, as no epoch finished" + (
                f"; the run that was in {self.out} is untouched" if self.old_run else "")
            raise Diverged(f"epoch {epoch}: {bad[0]} is {row[bad[0]]}; training diverged, most "
                           f"likely because the learning rate ({self.config.lr}) is too high: "
                           f"try a smaller --lr. Last good checkpoint: {kept}")
        self.flush()
        checkpoints = os.path.join(self.out, "checkpoints")
        with self.writing_files():
            if self.checkpoints is None:  # replacing a run (--overwrite): written beside it first
                self.checkpoints = Checkpoints(self.checkpoint, os.path.join(
                    self.out, NEW_CHECKPOINTS) if self.old_run else checkpoints)
            self.epoch.assign(epoch)
            self.saved_flags.assign(json.dumps(self.flags))
            self.saved_history.assign(json.dumps(self.history + [row]))
            self.checkpoints.save(epoch)
            if self.old_run:  # the new run's first checkpoint is on disk: the old run goes
                for path in self.old_run:
                    remove(path)
                self.old_run = []
                self.checkpoints.move_to(checkpoints)
            self.checkpointed_flags = self.flags
            self.history.append(row)
        grids = grids if epoch % self.config.grid_every == 0 or epoch == self.config.epochs else {}
        self.manifest.add("run.json", "history.csv", *(f"{name}_epoch_{epoch:03d}.png" for name in grids))
        self.stop.writing = True  # until the writer holds the job, so a second signal waits
        self.files.submit(row, list(self.history), grids, self.manifest.json())
        self.stop.writing = False
        self.report(row, figures)

    def flush(self):
        """Wait for the background writer's last epoch's files (a failed write: writing_files)."""
        with self.writing_files():  # a second signal meanwhile waits for it
            self.files.wait()

    def save_final(self, model, grid, sample=False):
        """The end of the epochs: the final weights (ae.weights.h5 for ae.py), the model as
        ae.keras and saved_model/ (tool.export; with sample, it samples from the prior), and
        progress.gif of the grids named grid."""
        weights, keras_file, saved_model, gif = (self.path(name) for name in (
            self.script.weights, self.script.keras, SAVED_MODEL, "progress.gif"))
        with self.writing_files():
            utils.write_atomically(weights, model.save_weights)
            export.save_models(model, self.data["shape"], keras_file, saved_model, sample)
            save_progress(self.out, sorted(self.manifest.names), grid, gif)

    def summary(self, **figures):
        """summary.json: the flags, the data, the last epoch's row, the training time, figures."""
        flags = {k: v for k, v in vars(self.config).items() if k not in APPLY_ONLY}
        return {"flags": flags, "data": self.data,
                "final": self.history[-1] if self.history else None,
                "train_seconds": round(sum(float(r["seconds"]) for r in self.history), 1),
                **figures}

    def write_summary(self, summary, started):
        """summary.json, with the seconds since started (time.perf_counter()) added."""
        summary["total_seconds"] = round(time.perf_counter() - started, 1)
        files.write_json(self.path("summary.json"), summary)
