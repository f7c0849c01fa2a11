"""A quiet TensorFlow start: its import with the C++ start-up records held back (see LOG_RECORD).

Import this module before anything else imports TensorFlow (the scripts import it first): the
records come only while TensorFlow's libraries load, and a second import loads nothing.
"""

import contextlib
import glob
import os
import re
import signal
import sys
import threading


# TensorFlow's C++ libraries log while they load, before absl::InitializeLog() has run, and absl
# then writes every record to standard error whatever TF_CPP_MIN_LOG_LEVEL says (the level
# applies only once TensorFlow has started). Each of the two libraries carries its own copy of
# absl, so each record comes twice, the second when the second library loads: "oneDNN custom
# operations are on" on CPUs with AVX-512 VNNI, BF16 or AMX, the instructions a binary was not
# built for, "could not find cuda drivers". While TensorFlow loads, records below the level are
# held back as TensorFlow holds them back afterwards; every other line passes at once.
LOG_RECORD = re.compile(  # absl's "I1201 19:07:27.123456   42 port.cc:153] " (before its start
    # the time is "00:00:" and seconds since 1970), or TF's older
    # "2024-01-01 19:07:27.123456: I tensorflow/core/util/port.cc:113] "
    rb"(?:\d{4}-\d\d-\d\d [\d:.]+: )?([IWEF])(?:\d{4} [\d:.]+ +\d+)? \S+:\d+\] ")


SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}


ABSL_NOTICE = b"All log messages before absl::InitializeLog() is called are written to STDERR"


NO_GPU_NOISE = b"failed call to cuInit"  # an error record that means only "no GPU here"


def held_back(chunk, level, no_gpu):
    """What of a chunk of standard error to pass on while TensorFlow loads: the lines left once
    the records below level (with the lines that continue them in the same write: a record is
    written at once), absl's notice that it logs before its start, and, without a GPU, the
    failed search for one are taken out."""
    kept, holding = [], False
    for line in chunk.splitlines(keepends=True):
        record = LOG_RECORD.match(line)
        if record:
            holding = SEVERITY[record[1]] < level or (no_gpu and NO_GPU_NOISE in line)
        elif ABSL_NOTICE in line:
            holding = True
        if not holding:
            kept.append(line)
    return b"".join(kept)


def min_log_level():
    """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it: 0 for a value that is not a number."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def loading_tensorflow():
    """Around TensorFlow's import and its platform start: Ctrl-C or SIGTERM gives one line and
    exit 130 or 143 (nothing is written yet), and the C++ records TensorFlow logs while it loads
    are held back below TF_CPP_MIN_LOG_LEVEL (2 unless set: warnings and info) as TensorFlow
    holds them back once started (see LOG_RECORD). Standard error goes through a pipe meanwhile,
    from which a thread passes every other line on. Enter it before anything imports
    TensorFlow: a second import loads nothing and logs nothing."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    level, no_gpu = min_log_level(), not glob.glob("/dev/nvidia[0-9]*")
    main = threading.current_thread() is threading.main_thread()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_end, write_end = os.pipe()
    except (OSError, ValueError):  # no usable standard error: nothing to hold back
        yield
        return

    def stopped(signum, frame):
        os.write(saved, f"{os.path.basename(sys.argv[0])}: stopped by {signal.Signals(signum).name}"
                 " while TensorFlow loaded, so nothing was written\n".encode())
        os._exit(128 + signum)

    def forward():
        while chunk := os.read(read_end, 65536):  # whole writes: a record with its lines
            if kept := held_back(chunk, level, no_gpu):
                os.write(saved, kept)
        os.close(read_end)

    previous = ({s: signal.signal(s, stopped) for s in (signal.SIGINT, signal.SIGTERM)}
                if main else {})
    forwarder = threading.Thread(target=forward, daemon=True)
    forwarder.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread reads to its end
        forwarder.join(timeout=5)
        os.close(saved)


with loading_tensorflow():
    import numpy  # noqa: F401
    import keras  # noqa: F401
    import tensorflow as tf
    tf.config.list_physical_devices()  # starts the platforms, which log, now
