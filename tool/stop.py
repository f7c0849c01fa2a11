"""What SIGINT and SIGTERM do during a run's epochs: the first lets the epoch in progress finish
and be saved, the second stops the process at once, saying what is kept and how to continue."""

import os
import signal
import sys


class Stop:
    """SIGINT and SIGTERM during the epochs of run: the first stops the run once the epoch in
    progress is saved (Run.epochs looks at self.signal); the second stops it at once (stop_now),
    unless the files of an epoch are being written (self.writing), which it then waits for."""

    def __init__(self, run):
        self.run = run
        self.signal = None  # the first signal received
        self.writing = False
        self.old_handlers = {}

    def install(self):
        self.old_handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def uninstall(self):
        for s, handler in self.old_handlers.items():
            signal.signal(s, handler)

    def on_signal(self, signum, frame):
        if self.signal is None:
            self.signal = signum
            again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            fresh_line = "\n" * sys.stdout.isatty()  # after the progress bar's
            print(f"{fresh_line}{self.run.prog}: stopping after this epoch, once it is saved; "
                  f"{again} again to stop now", file=sys.stderr, flush=True)
        elif not self.writing:  # while writing, the epoch is as good as saved: stop after it
            self.stop_now(signum)

    def stop_now(self, signum):
        """Exit at once, from a signal handler: the epoch in progress runs on another thread,
        which only exiting the process stops. The main thread writes nothing now (see
        on_signal); the background writer finishes the last epoch's files first."""
        run = self.run
        run.files.settle()
        done = int(run.epoch) or run.resumed_epoch
        saved = (f"the checkpoint of epoch {done} is kept; continue with: "
                 f"{run.resume_command()}" if done
                 else "no epoch had finished, so there is nothing to resume")
        print(f"{run.prog}: stopped by {signal.Signals(signum).name} during epoch {done + 1}, "
              f"which is lost; {saved}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + signum)

    def exit_after(self):
        """Exit, on the first signal, once the epoch in progress is saved, saying how to
        continue."""
        name, done = signal.Signals(self.signal).name, int(self.run.epoch)
        if done:
            print(f"{self.run.prog}: stopped by {name} after epoch {done}, checkpoint saved; "
                  f"continue with: {self.run.resume_command()}", file=sys.stderr, flush=True)
        else:
            print(f"{self.run.prog}: stopped by {name} before the first epoch ended; nothing to "
                  "resume", file=sys.stderr, flush=True)
        sys.exit(128 + self.signal)
