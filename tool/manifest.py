"""Which files in a folder a run of these scripts wrote: the list kept in run.json ("files"), and
the checkpoints by TensorFlow's own names, so that --overwrite replaces those and nothing else,
whatever the names of the others."""

import glob
import json
import os
import re

from tool.checkpoints import DamagedCheckpoint, checkpoint_prefixes, read_checkpoint
from tool.files import write_json

SAVED_MODEL = "saved_model"  # the one folder a run writes beside checkpoints/ (tool.export)
# The names of a checkpoint's files (ckpt-EPOCH.index, its data shards) and of the state file
CHECKPOINT_FILE = re.compile(r"ckpt-\d+\.(index|data-\d+-of-\d+)|checkpoint")
# What a run of either script wrote before run.json listed its files (each script adds its own,
# Script.files); also the names a new run writes over
BEFORE_THE_LIST = ("run.json", "history.csv", "*_epoch_[0-9]*.png", "progress.gif", "*.weights.h5",
                   "summary.json")


def read_run_json(out):
    """The run.json a run of these scripts wrote in out (a dict with its flags and data), or
    None where there is none, or what is there is not one."""
    try:
        with open(os.path.join(out, "run.json")) as f:
            run = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(run, dict) and isinstance(run.get("flags"), dict) and "data" in run:
        return run
    return None


def checkpoint_files(out):
    """The files in out/checkpoints with the names of a checkpoint's."""
    folder = os.path.join(out, "checkpoints")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [os.path.join(folder, n) for n in names if CHECKPOINT_FILE.fullmatch(n)]


def holds_a_run(out):
    """Whether out holds a run of these scripts: its run.json, or a checkpoint that reads as
    one of theirs (when run.json is lost)."""
    if read_run_json(out) is not None:
        return True
    for prefix in checkpoint_prefixes(out):
        try:
            read_checkpoint(prefix)
            return True
        except DamagedCheckpoint:
            pass
    return False


def files_of_run(out, own=()):
    """The files of the run in out, sorted: those its run.json lists (for a run written before
    the list, the names BEFORE_THE_LIST and own match), and its checkpoints; [] where out holds
    no run of these scripts. The only folder it gives is the SavedModel's (saved_model, listed
    by name)."""
    if not holds_a_run(out):
        return []
    run = read_run_json(out)
    if run is not None and isinstance(run.get("files"), list):
        listed = [os.path.join(out, name) for name in run["files"] if inside(name)]
    else:
        folder = glob.escape(out)
        listed = [p for pattern in BEFORE_THE_LIST + tuple(own)
                  for p in glob.glob(os.path.join(folder, pattern))]
    saved_model = os.path.join(out, SAVED_MODEL)
    return sorted(p for p in set(listed) | set(checkpoint_files(out)) if os.path.lexists(p)
                  and (not os.path.isdir(p) or p == saved_model and not os.path.islink(p)))


def inside(name):
    """Whether a name run.json lists is a file in the run folder (a damaged or edited list
    never reaches outside it)."""
    return (isinstance(name, str) and not os.path.isabs(name)
            and os.path.normpath(name).split(os.sep)[0] not in ("..", "."))


def written_over(out, own=()):
    """The files in out, where it holds no run, that a new run would write over: run.json,
    history.csv, summary.json, progress.gif, the script's own files (own: its weights and the
    rest) and files with a checkpoint's names."""
    names = ["run.json", "history.csv", "summary.json", "progress.gif", *own]  # a folder too
    return sorted([os.path.join(out, n) for n in names if os.path.lexists(os.path.join(out, n))]
                  + checkpoint_files(out))


class Manifest:
    """run.json of a run in out: its flags, what identifies its data (Data.description()), and
    the names of the files it wrote there beside its checkpoints (names)."""

    def __init__(self, out, flags, data):
        self.out, self.flags, self.data = out, flags, data
        self.names = set()

    def add(self, *names):
        self.names.update(names)

    def json(self):
        return {"flags": self.flags, "data": self.data, "files": sorted(self.names)}

    def write(self):
        write_json(os.path.join(self.out, "run.json"), self.json())
