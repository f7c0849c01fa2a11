"""The expected mistakes (bad data, bad flags, an unwritable folder): one line each, an exit code."""


class UserError(Exception):
    """An expected mistake (bad data, bad flags, unwritable output): reported in one line."""
    exit_code = 2


class Diverged(UserError):
    """The loss stopped being finite."""
    exit_code = 3


class DataError(UserError, ValueError):
    """Missing or malformed Fashion-MNIST files; the message names the file."""
