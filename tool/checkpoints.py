"""A run folder's checkpoints: found from their own files, read back whole, written by one traced
call; and where --resume continues."""

import glob
import json
import os

import tensorflow as tf

from tool.errors import UserError
from utils import write_atomically


# Flags added after runs were first saved: a run saved without them ran as these say.
LATER_FLAGS = {"dataset": "fashion-mnist", "image_size": None, "channels": None, "test_split": 0.1,
               "strict": False, "max_memory": None, "fd_samples": 10000, "grid_every": 1}


# What a run of either script writes into --out; each script adds its own (Script.files), and
# --overwrite deletes these and nothing else.
RUN_FILES = ("run.json", "history.csv", "checkpoints/checkpoint", "checkpoints/ckpt-[0-9]*",
             "*_epoch_[0-9]*.png", "progress.gif", "*.weights.h5", "summary.json")


SAVED = {"flags": "run_flags/.ATTRIBUTES/VARIABLE_VALUE",
         "history": "run_history/.ATTRIBUTES/VARIABLE_VALUE",
         "data": "run_data/.ATTRIBUTES/VARIABLE_VALUE"}  # absent from runs saved before --dataset


def run_files(out_dir, own=()):
    """The files of a run in out_dir (see RUN_FILES; own: the script's own names), sorted."""
    folder = glob.escape(out_dir)
    return sorted(p for pattern in RUN_FILES + tuple(own)
                  for p in glob.glob(os.path.join(folder, pattern)))


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


def resume_point(out_dir, own_files=()):
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
    if run_files(out_dir, own_files):
        raise UserError(f"--resume: {out_dir} holds files of a run but no checkpoint to continue "
                        "from; to start afresh, --overwrite deletes those files")
    raise UserError(f"--resume: {out_dir} holds no run to continue; start one without --resume")


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
