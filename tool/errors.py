"""The expected mistakes (bad data, bad flags, an unwritable folder): one line each, an exit code;
and the signals that stop a run outside its epochs."""

import errno
import signal

# errno values that mean the disk, not the code: full, over quota, read-only, no permission
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class UserError(Exception):
    """An expected mistake (bad data, bad flags, unwritable output): reported in one line."""
    exit_code = 2

    def __init__(self, message, exit_code=None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class Diverged(UserError):
    """The loss stopped being finite."""
    exit_code = 3


class DataError(UserError, ValueError):
    """Missing or malformed Fashion-MNIST files; the message names the file."""


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM outside a run's epochs (where tool.stop.Stop answers them)."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self):
        return signal.Signals(self.signum).name


def raise_stopped(signum, frame):
    """A signal handler: SIGTERM, like SIGINT, raises an exception that unwinds what runs."""
    raise Stopped(signum)
