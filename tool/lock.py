"""One process per run folder: an OS lock on FOLDER/.lock, which the kernel drops on any exit."""

import errno
import os

from tool.errors import UserError


LOCK_FILE = ".lock"  # kept after the run: removing it could let two runs lock different files



if os.name == "nt":
    import msvcrt

    def try_lock(f):
        f.seek(2**20)  # a byte past the process id, which then stays readable
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
else:
    import fcntl

    def try_lock(f):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def lock_folder(folder):
    """Create folder if needed and lock it for this process: an exclusive OS lock on
    folder/.lock, which the kernel drops on any exit (kill -9 included). The file holds the
    process id, to name it to a second process. Returns the open file; closing it unlocks.
    Its attribute created lists what locking created (folders, then the lock file), for
    unlock_refused."""
    missing = []
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    lock_path = os.path.join(folder, LOCK_FILE)
    try:
        os.makedirs(folder, exist_ok=True)
        new_lock = not os.path.lexists(lock_path)
        f = open(lock_path, "a+")
    except OSError as e:
        raise UserError(f"cannot write to output folder {folder}: {e.strerror}; "
                        "choose another with --out") from None
    take_lock(f, folder)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    f.created = missing[::-1] + [lock_path] * new_lock
    return f


def unlock_refused(f, *empty):
    """Unlock a folder whose run was refused, removing what lock_folder created there (the lock
    file while still locked, then the folders it made, where empty) and the folders empty names,
    where empty: a refused command leaves nothing behind."""
    for path in empty:
        try:
            os.rmdir(path)
        except OSError:
            pass  # not empty, or not there
    for path in reversed(f.created):
        try:
            os.rmdir(path) if os.path.isdir(path) else os.remove(path)
        except OSError:
            break  # not empty (or gone): what is left stays
    f.close()


def take_lock(f, folder):
    """Lock the open lock file f of folder, or close it and raise UserError naming the holder."""
    try:
        try_lock(f)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            f.close()
            raise UserError(f"cannot lock {folder} ({e.strerror}): its file system does not "
                            "support locks; choose an --out on a local disk") from None
        f.seek(0)
        holder = f.read().strip()
        f.close()
        who = f"process {holder}" if holder.isdigit() else "another process"
        raise UserError(f"{folder} is in use by {who}, another run writing there; wait for it to "
                        "end, or choose another --out") from None


def check_unlocked(folder):
    """Raise UserError if another process holds folder's lock; create nothing."""
    try:
        f = open(os.path.join(folder, LOCK_FILE))
    except OSError:
        return  # no lock file: nobody has locked the folder
    take_lock(f, folder)
    f.close()
