"""Whether a run folder may be continued or started in, and the command that continues a run."""

import os
import shlex
import shutil
import sys

from tool.checkpoints import LATER_FLAGS, DamagedCheckpoint, checkpoint_prefixes, read_checkpoint
from tool.errors import UserError
from tool.manifest import files_of_run, read_run_json, written_over

# Flags of both scripts that may differ when a run is resumed: where things are, how long to go
# on, and what to measure at the end (each script adds its own: Script.resumable_flags). Any
# other flag would change the run being continued.
RESUMABLE_FLAGS = {"epochs", "dataset", "data_dir", "max_memory", "strict", "logdir", "fd_samples",
                   "grid_every", "threshold_quantile"}
# Flags that say how to start, not what the run is: never saved with it.
# --apply's own flags (tool.apply): never saved with a run, nor in its summary.json
APPLY_ONLY = {"apply", "to", "save_reconstructions", "generate"}
START_FLAGS = {"out", "resume", "overwrite"} | APPLY_ONLY
# The data of runs saved before --dataset existed, whose checkpoints do not say
BEFORE_DATASET = {"source": "Fashion-MNIST", "shape": [28, 28, 1], "train": 60000, "test": 10000,
                  "sha256": "the data of runs before --dataset"}


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
    if files_of_run(out_dir, own_files):
        raise UserError(f"--resume: {out_dir} holds files of a run but no checkpoint to continue "
                        "from; to start afresh, --overwrite deletes those files")
    raise UserError(f"--resume: {out_dir} holds no run to continue; start one without --resume")


def check_same_run(script, out, flags, data, saved):
    """Refuse to continue the run saved in out's checkpoint (saved: what read_checkpoint gives)
    with flags (this process's, less START_FLAGS) or data (Data.description()) it was not run
    with, or by the other script."""
    if set(saved["flags"]) != set(flags):
        raise UserError(f"--resume: {out} holds a run of the other script, with "
                        f"flags {', '.join(sorted(saved['flags']))}")
    resumable = RESUMABLE_FLAGS | set(script.resumable_flags)
    for name in sorted(set(saved["flags"]) | set(flags)):
        ours, theirs = flags.get(name), saved["flags"].get(name)
        if name not in resumable and ours != theirs:
            raise UserError(
                f"--resume: --{name.replace('_', '-')} {ours} differs from the run in "
                f"{out} ({theirs}); leave it out to continue that run, or start "
                "a new one in another --out")
    before = saved.get("data")
    if before is None and (data["source"], data["shape"]) != ("Fashion-MNIST", [28, 28, 1]):
        before = BEFORE_DATASET
    if before and before["sha256"] != data["sha256"]:
        then, now = data_text(before), data_text(data)
        if then == now:  # the same source, counts and shape: the pixels or labels differ
            then, now = (f"{text}, checksum {d['sha256'][:12]}" for text, d in ((then, before), (now, data)))
        raise UserError(
            f"--resume: the data differ from those of the run in {out} "
            f"({then} then, {now} now); give the same "
            "data to continue it, or start a new run in another --out")


def old_run_files(script, out, flags, overwrite):
    """The files of a run already in out, which --overwrite replaces once the new run has an
    epoch; without --overwrite, a run there is refused with the commands that continue or
    replace it (only the latter for a run of the other script, whose flags differ from flags).
    Files that no run wrote but a run would write over are refused, with or without it."""
    old_run = files_of_run(out, script.files)
    clash = [] if old_run else written_over(out, script.written)
    if clash:
        names = ", ".join(os.path.relpath(p, out) for p in clash[:3])
        raise UserError(f"{out} holds files that no run of these scripts wrote, which a run would "
                        f"write over ({names}{', ...' * (len(clash) > 3)}); choose another --out")
    if old_run and not overwrite:
        names = ", ".join(os.path.basename(p) for p in old_run[:3])
        if not same_script(out, flags):
            raise UserError(f"{out} already holds a run of the other script ({names}"
                            f"{', ...' * (len(old_run) > 3)}); replace it (its files are deleted) "
                            "by adding --overwrite, or choose another --out")
        raise UserError(
            f"{out} already holds a run ({names}{', ...' * (len(old_run) > 3)});"
            f" continue it with: {command_line(script.prog, '--out', out, '--resume')}, "
            "or replace it (its files are deleted) by adding --overwrite")
    return old_run


def same_script(out, flags):
    """Whether the run.json in out, if readable, holds the flags of the script whose flags are
    flags (each script has flags of its own)."""
    run = read_run_json(out)  # flags added since (LATER_FLAGS) count as there
    return run is None or set(run["flags"]) | set(LATER_FLAGS) == set(flags) | set(LATER_FLAGS)


def resume_command(script, out, flags, checkpointed_flags):
    """The command that continues the run in out from its newest checkpoint, as this process
    would have: --resume, and the flags given now (flags) that the checkpoint does not hold yet
    (checkpointed_flags)."""
    args = ["--out", out, "--resume"]
    for name in sorted(RESUMABLE_FLAGS | set(script.resumable_flags)):
        value, flag = flags.get(name), name.replace("_", "-")
        if value is None or value == checkpointed_flags.get(name):
            continue  # the same, or the default of a flag with a value (--logdir)
        if isinstance(value, bool):  # an on/off flag: --strict, --no-strict
            args.append(f"--{'' if value else 'no-'}{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return command_line(script.prog, *args)


def command_line(prog, *args):
    """The shell command that runs prog with args, quoted to work when pasted."""
    python = "python"
    found = shutil.which("python")
    if not found or os.path.abspath(found) != os.path.abspath(sys.executable):
        python = sys.executable  # not the interpreter "python" would start
    script = sys.argv[0] if os.path.basename(sys.argv[0]) == prog else prog
    return shlex.join([python, script, *args])


def data_text(description):
    """Data as run.json describes them, in a few words."""
    h, w, c = description["shape"]
    return (f"{description['source']}, {description['train']:,} + {description['test']:,} images "
            f"of {h}x{w}x{c}")
