"""What a run folder holds beside its checkpoints: JSON and CSV written whole, the checks before
anything is written, the clean-up after an interrupted write, and the words for a failed one."""

import csv
import errno
import glob
import io
import json
import os
import re
import shutil
import sys
import tempfile

import tensorflow as tf

from tool.errors import UserError
from utils import TMP_PREFIX, UMASK, write_atomically


def check_folder(folder, flag):
    """Refuse a folder that cannot be created or written, before anything is created: it names a
    file, or its nearest existing parent is a file or not writable."""
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "" if path == os.path.abspath(folder) else f" ({path})"
        raise UserError(f"{flag} {folder}: that path{where} is a file, not a folder; "
                        f"choose another {flag}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: {path} is not writable; choose another {flag}")


def write_json(path, obj):
    """Write obj as indented JSON, replacing the file atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
    write_atomically(path, write)


def history_text(rows):
    """The per-epoch rows as CSV text with a header; a column that older rows lack (from a run
    resumed by a newer version of the scripts) is empty in them."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))  # lines end in \r\n, as RFC 4180 has it
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write_history(path, rows):
    """Write the per-epoch rows as CSV, replacing the file atomically."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(history_text(rows))
    write_atomically(path, write)


def remove(path):
    """Delete a file, or a folder with everything in it."""
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def remove_leftovers(out_dir):
    """Delete what interrupted writes of a run leave: write_atomically's temporary files (named
    .tmp-XXXX-NAME) and the ckpt-N_temp folders of checkpoint saves."""
    folder = glob.escape(out_dir)
    for path in (glob.glob(os.path.join(folder, TMP_PREFIX + "*-*"))
                 + glob.glob(os.path.join(folder, "checkpoints", TMP_PREFIX + "*-checkpoint"))
                 + glob.glob(os.path.join(folder, "checkpoints", "ckpt-[0-9]*_temp"))):
        remove(path)


def error_reason(e):
    """One plain phrase for why a write failed (an OSError or a TensorFlow OpError)."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if isinstance(e, tf.errors.ResourceExhaustedError):
        return "no space left on the device"
    if isinstance(e, tf.errors.PermissionDeniedError):
        return "permission denied"
    message = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", str(e.message).strip())  # from a tf.function
    return message.splitlines()[0].split(" [Op:")[0]


def rebuild_history(prog, path, history):
    """history.csv as the checkpoint has it (the rows history), on resume; saying so where the
    file was missing or damaged (not merely longer, as after a crash)."""
    text = history_text(history)
    try:
        with open(path, newline="") as f:
            intact = f.read().startswith(text)
    except (OSError, UnicodeDecodeError):
        intact = False
    if not intact:
        print(f"{prog}: history.csv was missing or damaged; rebuilt from the "
              f"checkpoint (epochs 1-{history[-1]['epoch']})", file=sys.stderr, flush=True)
    write_history(path, history)


def write_folder_atomically(path, write, replace=True):
    """Call write(tmp_folder), then put the folder in place of path: a folder already at path is
    replaced (only with replace, else FileExistsError) once the new one is whole: moved aside,
    the new one renamed in, then deleted."""
    parent, name = os.path.split(path)
    tmp = tempfile.mkdtemp(dir=parent or ".", prefix=TMP_PREFIX, suffix="-" + name)
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~UMASK)  # as os.mkdir would have made it, not mkdtemp's 0700
        old = None
        if os.path.lexists(path) and not replace:
            raise FileExistsError(errno.EEXIST, "it exists", path)
        if os.path.lexists(path):
            old = tempfile.mkdtemp(dir=parent or ".", prefix=TMP_PREFIX, suffix="-old-" + name)
            os.replace(path, old)  # an empty folder's place
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old)
