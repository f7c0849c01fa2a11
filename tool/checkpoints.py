"""A run folder's checkpoints: found from their own files, read back whole, written by one traced
call."""

import glob
import json
import os

import tensorflow as tf

from utils import write_atomically


# Flags added after runs were first saved: a run saved without them ran as these say.
LATER_FLAGS = {"dataset": "fashion-mnist", "image_size": None, "channels": None, "test_split": 0.1,
               "strict": False, "max_memory": None, "fd_samples": 10000, "grid_every": 1,
               "classes": None, "threshold_quantile": 0.99, "arch": "mlp",
               "filters": 32}


SAVED = {"flags": "run_flags/.ATTRIBUTES/VARIABLE_VALUE",
         "history": "run_history/.ATTRIBUTES/VARIABLE_VALUE",
         "data": "run_data/.ATTRIBUTES/VARIABLE_VALUE"}  # absent from runs saved before --dataset


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

    def move_to(self, directory):
        """Move the checkpoints and the state file into directory (the first checkpoint of a run
        that replaces another is written beside it, and moved in once the other is gone)."""
        os.makedirs(directory, exist_ok=True)
        for name in sorted(os.listdir(self.directory), key=lambda n: n.endswith(".index")):
            os.replace(os.path.join(self.directory, name), os.path.join(directory, name))
        os.rmdir(self.directory)
        self.kept = [os.path.join(directory, os.path.basename(p)) for p in self.kept]
        self.directory = directory

    def record(self):
        """The state file (a CheckpointState in protobuf text), listing the newest three."""
        state = [f'model_checkpoint_path: "{os.path.basename(self.latest)}"']
        state += [f'all_model_checkpoint_paths: "{os.path.basename(p)}"' for p in self.kept[-self.KEEP:]]

        def write(tmp):
            with open(tmp, "w") as f:
                f.write("\n".join(state) + "\n")
        write_atomically(os.path.join(self.directory, "checkpoint"), write)
