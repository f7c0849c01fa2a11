"""A run folder you can trust: nothing touched before a run can start, one process per folder,
--resume with the run's own flags, damaged checkpoints and files, a full disk, Ctrl-C."""

import errno
import glob
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import ae
import utils
import tool.checkpoints
import tool.errors
import tool.files
import tool.lock
import tool.progress
import tool.resume
import tool.run
import tool.sources
import vae
from conftest import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--h-dim", "6", "--batch-size", "100", "--fd-samples", "0"]


def snapshot(folder):
    """Every file under folder with a hash of its bytes."""
    found = {}
    for path in glob.glob(os.path.join(folder, "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def epochs_in(out):
    with open(os.path.join(out, "history.csv")) as f:
        return [int(line.split(",")[0]) for line in f.read().splitlines()[1:]]


def stop_after(monkeypatch, epoch, sig):
    """Send this process sig as epoch ends, as Ctrl-C or a job scheduler would."""
    real = tool.progress.EpochReport.__call__

    def report(self, row, figures):
        real(self, row, figures)
        if row["epoch"] == epoch:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(tool.progress.EpochReport, "__call__", report)


# --- 1, 2: nothing touched before the run can start --------------------------------------------

def test_overwrite_with_a_mistake_keeps_the_old_run(finished_run, tmp_path, capsys):
    data_dir, out = finished_run
    before = snapshot(out)
    for mistake in (["--data-dir", tmp_path / "typo"], ["--batch-size", 601],
                    ["--logdir", os.path.join(out, "run.json", "tb")]):
        code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", out, "--overwrite",
                            *TINY, *mistake)
        assert code == 2 and len(err) == 1, err
        assert snapshot(out) == before


def test_overwrite_deletes_the_old_run_only_once_an_epoch_is_done(finished_run, monkeypatch, capsys):
    data_dir, out = finished_run
    before = snapshot(out)
    real = ae.compute_loss
    monkeypatch.setattr(ae, "compute_loss",
                        lambda model, x_in, x: {k: v * np.nan for k, v in real(model, x_in, x).items()})
    code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", out, "--overwrite", *TINY)
    assert code == 3 and "diverged" in err[0]
    assert snapshot(out) == before  # the new run failed in its first epoch: the old one stays


def test_a_failed_start_leaves_no_run_behind(tiny_data, tmp_path, monkeypatch, capsys):
    data_dir, _ = tiny_data
    out = str(tmp_path / "run")
    code, err, _ = main(capsys, ae, "--data-dir", tmp_path / "nowhere", "--out", out, *TINY)
    assert code == 2 and "no such folder" in err[0]
    real = ae.compute_loss  # a failure inside the first epoch
    monkeypatch.setattr(ae, "compute_loss",
                        lambda model, x_in, x: {k: v * np.nan for k, v in real(model, x_in, x).items()})
    code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", out, *TINY)
    assert code == 3 and "no epoch finished" in err[-1]
    assert not os.path.exists(out)  # the folder it made, its .lock and checkpoints/ went with it
    # no epoch finished, so the folder holds no run: the corrected command is not refused
    config = ae.make_parser().parse_args(["--data-dir", data_dir, "--out", out, *TINY])
    with tool.run.Run(config, ae.SCRIPT, tool.sources.load_data(config)):
        pass


# --- 3: one process per folder -------------------------------------------------------------------

def test_a_second_process_is_refused_and_touches_nothing(finished_run, capsys):
    data_dir, out = finished_run
    before = snapshot(out)
    held = tool.lock.lock_folder(out)
    try:
        for extra in (["--resume", "--epochs", 3], ["--overwrite"], []):
            code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", out, *TINY, *extra)
            assert code == 2 and len(err) == 1
            assert f"in use by process {os.getpid()}" in err[0], err
        assert snapshot(out) == before
    finally:
        held.close()
    code, _, _ = main(capsys, ae, "--out", out, "--resume", "--epochs", 3)
    assert code == 0 and epochs_in(out) == [1, 2, 3]


def test_the_lock_goes_with_a_killed_process(tmp_path):
    """The lock is the kernel's (flock on --out/.lock): kill -9 of its holder frees it."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write('4242'); f.flush(); print('locked', flush=True); "
         "time.sleep(60)", str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(tool.errors.UserError, match="in use by process 4242"):
        tool.lock.lock_folder(str(out))
    holder.kill()
    holder.wait()
    tool.lock.lock_folder(str(out)).close()


# --- 4: --resume continues the same run ---------------------------------------------------------

def test_resume_takes_every_flag_from_the_run(tiny_data, tmp_path, monkeypatch, capsys):
    data_dir, _ = tiny_data
    out = str(tmp_path / "sp ü" / "run 1")
    stop_after(monkeypatch, 2, signal.SIGTERM)
    code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", out, "--epochs", 4,
                        "--export-codes", "--eval-noise", 0.1, *TINY)
    assert code == 143 and "stopped by SIGTERM after epoch 2" in err[-1]
    assert epochs_in(out) == [1, 2]
    monkeypatch.undo()
    command = shlex.split(err[-1].split("continue with: ")[1])
    assert command[2:] == ["--out", out, "--resume"]  # the command to paste, quoted
    code, err, _ = main(capsys, ae, *command[2:])
    assert code == 0, err
    assert epochs_in(out) == [1, 2, 3, 4]  # towards the run's --epochs, not the default 100
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["flags"]["h_dim"] == 6 and summary["eval_noise"] == 0.1
    assert summary["flags"]["data_dir"] == data_dir
    assert np.load(os.path.join(out, "codes.npz"))["test_codes"].shape[1] == 6


def test_resume_may_change_what_the_readme_allows(finished_run, capsys):
    data_dir, out = finished_run
    code, err, _ = main(capsys, ae, "--out", out, "--resume", "--epochs", 3, "--lr", 0.01)
    assert code == 2 and "--lr 0.01 differs" in err[0]
    code, err, _ = main(capsys, ae, "--out", out, "--resume", "--epochs", 3, "--compare-pca")
    assert code == 0, err
    assert epochs_in(out) == [1, 2, 3] and os.path.exists(os.path.join(out, "pca_vs_ae.json"))
    assert json.load(open(os.path.join(out, "run.json")))["flags"]["epochs"] == 3
    # an on/off flag the run now holds switches off again
    os.remove(os.path.join(out, "pca_vs_ae.json"))
    code, err, text = main(capsys, ae, "--out", out, "--resume", "--epochs", 4, "--no-compare-pca")
    assert code == 0, err
    assert epochs_in(out) == [1, 2, 3, 4] and not os.path.exists(os.path.join(out, "pca_vs_ae.json"))
    assert json.load(open(os.path.join(out, "run.json")))["flags"]["compare_pca"] is False


def test_the_resume_command_printed_gives_the_flags_changed_since_the_checkpoint(monkeypatch):
    """Stopped before the first checkpoint of a resumed run: the command to paste carries what
    was given then (on/off flags either way), and parsed back it gives those values. (The
    interpreter's folder first on PATH, as in an activated virtual environment: "python" is the
    one running, whichever way the suite was started.)"""
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    config = ae.make_parser().parse_args([])
    checkpointed = dict(vars(config), epochs=3, compare_pca=True, strict=False, eval_noise=0.3)
    now = dict(checkpointed, epochs=5, compare_pca=False, strict=True, eval_noise=0.1)
    command = shlex.split(tool.resume.resume_command(ae.SCRIPT, "runs/ae 1", now, checkpointed))
    assert command[:5] == ["python", "ae.py", "--out", "runs/ae 1", "--resume"]
    assert sorted(command[5:]) == sorted(["--epochs", "5", "--no-compare-pca", "--strict",
                                          "--eval-noise", "0.1"])
    pasted = ae.make_parser().parse_args(command[2:])
    assert (pasted.epochs, pasted.compare_pca, pasted.strict, pasted.eval_noise) == (5, False, True, 0.1)


def test_the_command_printed_names_the_interpreter_running_when_python_is_another(monkeypatch,
                                                                                     tmp_path):
    """Where "python" on PATH is not this interpreter (a virtual environment not activated), the
    command starts with this one's path, so that pasted it runs with the same packages."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shlex.split(tool.resume.command_line("ae.py", "--resume"))[0] == sys.executable


# --- 5, 6: damaged checkpoints and files --------------------------------------------------------

def truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def damage_state_file(how, checkpoints):
    state = os.path.join(checkpoints, "checkpoint")
    if how == "deleted":
        os.remove(state)
    else:
        with open(state, "w") as f:
            f.write("" if how == "empty" else "model_checkpoint_path: garbage {{{")


@pytest.mark.parametrize("how", ["deleted", "empty", "garbled"])
def test_resume_does_not_trust_the_state_file(finished_run, capsys, how):
    data_dir, out = finished_run
    damage_state_file(how, os.path.join(out, "checkpoints"))
    code, err, out_text = main(capsys, ae, "--out", out, "--resume")
    assert code == 0 and not err, err
    assert "after epoch 2" in out_text and epochs_in(out) == [1, 2]


def test_resume_skips_a_damaged_newest_checkpoint(finished_run, capsys):
    data_dir, out = finished_run
    checkpoints = os.path.join(out, "checkpoints")
    for path in glob.glob(os.path.join(checkpoints, "ckpt-2.data-*")):
        truncate(path)
    os.makedirs(os.path.join(checkpoints, "ckpt-3_temp"))  # an interrupted save's leftovers
    code, err, out_text = main(capsys, ae, "--out", out, "--resume", "--epochs", 3)
    assert code == 0, err
    assert len(err) == 1 and "skipped checkpoint ckpt-2: unreadable" in err[0]
    assert "after epoch 1" in out_text and epochs_in(out) == [1, 2, 3]
    assert not os.path.exists(os.path.join(checkpoints, "ckpt-3_temp"))
    # with every checkpoint damaged the advice says what --overwrite would delete
    for path in glob.glob(os.path.join(checkpoints, "*.data-*")):
        truncate(path)
    code, err, _ = main(capsys, ae, "--out", out, "--resume", "--epochs", 4)
    assert code == 2 and len(err) == 1 and "deletes" in err[0]


@pytest.mark.parametrize("damage", ["deleted", "cut in half", "random bytes", "wrong header"])
def test_history_survives_the_loss_of_history_csv(finished_run, capsys, damage):
    data_dir, out = finished_run
    path = os.path.join(out, "history.csv")
    text = open(path).read()
    if damage == "deleted":
        os.remove(path)
    else:
        damaged = {"cut in half": text[:len(text) * 3 // 4],
                   "random bytes": os.urandom(300).decode("latin-1"),
                   "wrong header": text.replace("epoch", "epoque")}[damage]
        with open(path, "w", encoding="latin-1") as f:
            f.write(damaged)
    code, err, _ = main(capsys, ae, "--out", out, "--resume")
    assert code == 0 and len(err) == 1 and "history.csv" in err[0], err
    assert open(path).read() == text  # rebuilt exactly


@pytest.mark.parametrize("content", ["[1, 2]", '{"h_dim": "20"}', "\x00\xff"])
def test_a_damaged_run_json_does_not_stop_resume(finished_run, capsys, content):
    data_dir, out = finished_run
    path = os.path.join(out, "run.json")
    flags = json.load(open(path))
    with open(path, "w", encoding="latin-1") as f:
        f.write(content)
    code, err, _ = main(capsys, ae, "--out", out, "--resume")
    assert code == 0, err
    assert json.load(open(path)) == flags


# --- 7: a full disk, a read-only folder ---------------------------------------------------------

@pytest.mark.parametrize("fault", ["checkpoint", "grid"])
def test_a_full_disk_stops_with_one_line_and_resume_works_later(finished_run, monkeypatch, capsys, fault):
    data_dir, out = finished_run
    if fault == "checkpoint":
        def write(self, prefix, options=None):
            raise tf.errors.ResourceExhaustedError(None, None, "ckpt-3_temp; No space left on device [Op:SaveV2]")
        monkeypatch.setattr(tf.train.Checkpoint, "write", write)
    else:
        def save_images(images, path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        monkeypatch.setattr(utils, "save_images", save_images)
    code, err, _ = main(capsys, ae, "--out", out, "--resume", "--epochs", 4)
    assert code == 2 and len(err) == 1, err
    last = "ckpt-2" if fault == "checkpoint" else "ckpt-3"
    assert out in err[0] and "space left on" in err[0] and last in err[0]
    assert "Traceback" not in err[0] and "[Op:" not in err[0]
    if fault == "checkpoint":  # once there is space again, the command given continues the run
        monkeypatch.undo()
        code, err, _ = main(capsys, ae, *shlex.split(err[0].split("continue with: ")[1])[2:])
        assert code == 0, err
        assert epochs_in(out) == [1, 2, 3, 4]


# --- 8: flags the parser must refuse ------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--seed", "-5"], ["--seed", str(2**40)], ["--batch-size", "601"]])
def test_flags_that_would_crash_later_are_refused_first(tiny_data, tmp_path, capsys, flags):
    data_dir, _ = tiny_data
    out = tmp_path / "run"
    code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", out, *flags)
    assert code == 2 and len(err) == 1 and flags[0] in err[0]
    assert not out.exists()


# --- 9: Ctrl-C at any moment --------------------------------------------------------------------

SLOW_SECOND_EPOCH = """
import sys, time
sys.path.insert(0, {root!r})
import ae, utils
compile_epoch = utils.compile_epoch
def slow(*args, **kwargs):
    train_epoch, calls = compile_epoch(*args, **kwargs), []
    def epoch(x):
        calls.append(1)
        if len(calls) == 2:  # said, so that the test's Ctrl-C surely comes during this epoch
            print("the second epoch begins", flush=True)
            time.sleep(60)
        return train_epoch(x)
    return epoch
utils.compile_epoch = slow
save_images = utils.save_images
def slow_save(images, path):  # the first epoch's grid is still being written when Ctrl-C comes
    time.sleep(1 if path.endswith("_001.png") else 0)
    save_images(images, path)
utils.save_images = slow_save
sys.argv[0] = "ae.py"
ae.main()
"""


def test_ctrl_c_answers_at_once_and_twice_stops_at_once(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    out = str(tmp_path / "run")
    child = subprocess.Popen([sys.executable, "-c", SLOW_SECOND_EPOCH.format(root=ROOT),
                              "--data-dir", data_dir, "--out", out, "--epochs", "3", *TINY],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().startswith("data: Fashion-MNIST: 600 training")
    assert child.stdout.readline().startswith("epoch 1/3")
    assert child.stdout.readline() == "the second epoch begins\n"  # a minute long
    child.send_signal(signal.SIGINT)
    assert "stopping after this epoch" in child.stderr.readline()  # at once
    asked = time.monotonic()
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=30)
    assert time.monotonic() - asked < 5  # not after the minute-long epoch
    assert child.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "ae.py: stopped by SIGINT during epoch 2, which is lost; the checkpoint of epoch 1 is "
        f"kept; continue with: {tool.resume.command_line('ae.py', '--out', out, '--resume')}"]
    assert epochs_in(out) == [1] and tool.resume.resume_point(out)[0].endswith("ckpt-1")
    assert os.path.exists(os.path.join(out, "rec_epoch_001.png"))  # written before the exit
    assert not glob.glob(os.path.join(glob.escape(out), ".tmp-*"))  # and nothing half-written


def test_the_files_of_an_epoch_are_written_while_the_next_one_trains(tiny_data, tmp_path,
                                                                      monkeypatch, capsys):
    data_dir, _ = tiny_data
    out = str(tmp_path / "run")
    events, reported = [], threading.Event()
    save_images, report = utils.save_images, tool.progress.EpochReport.__call__

    def slow_save(images, path):
        reported.wait(10)  # written in line with the epochs, this would wait the 10 s out
        time.sleep(2 if path.endswith("_003.png") else 0)  # the last grid, needed by the end
        events.append(os.path.basename(path))
        save_images(images, path)

    def reporting(self, row, figures):
        events.append(row["epoch"])
        reported.set()
        report(self, row, figures)
    monkeypatch.setattr(utils, "save_images", slow_save)
    monkeypatch.setattr(tool.progress.EpochReport, "__call__", reporting)
    code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", out, "--epochs", 3, *TINY)
    assert code == 0, err
    assert events.index(1) < events.index("rec_epoch_001.png")
    with Image.open(os.path.join(out, "progress.gif")) as gif:  # made once all grids are there
        assert gif.n_frames == 3


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_tensorflow_loads_is_one_line(tmp_path, sig):
    """SIGTERM there ended the process with no line."""
    child = subprocess.Popen([sys.executable, os.path.join(ROOT, "ae.py"), "--out",
                              str(tmp_path / "run")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    time.sleep(0.8)  # importing TensorFlow takes seconds
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + sig, err
    assert err.strip().splitlines() == [f"ae.py: stopped by {signal.Signals(sig).name} while "
                                        "TensorFlow loaded, so nothing was written"]
    assert not os.path.exists(tmp_path / "run")


def test_progress_reports_the_share_done_and_the_time_left(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    items = list(tool.progress.progress(range(4), 4, "estimate", every=0.0))
    assert items == [0, 1, 2, 3]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("estimate: 25% done, about ") and lines[0].endswith(" s left")
    assert len(lines) == 3  # none once everything is done


# --- 10: plain sentences -------------------------------------------------------------------------

def test_an_unwritable_logdir_is_one_plain_sentence(tiny_data, tmp_path, monkeypatch, capsys):
    data_dir, _ = tiny_data
    out = str(tmp_path / "run")

    def refuse(logdir):
        raise tf.errors.PermissionDeniedError(
            None, None, "{{function_node __wrapped__CreateSummaryFileWriter}} ... "
            "[Op:CreateSummaryFileWriter] name: ")
    monkeypatch.setattr(tf.summary, "create_file_writer", refuse)
    code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", out, "--logdir",
                        tmp_path / "tb", *TINY)
    assert code == 2 and len(err) == 1
    assert err[0].endswith("cannot write there (permission denied)") and "{{" not in err[0]


def test_a_refused_start_deletes_nothing_of_someone_elses(tiny_data, tmp_path, capsys):
    data_dir, _ = tiny_data
    out = tmp_path / "project"
    (out / "checkpoints" / "model_temp").mkdir(parents=True)
    (out / "checkpoints" / "model_temp" / "weights.bin").write_bytes(b"theirs")
    (out / "history.csv").write_text("theirs\n")
    before = snapshot(str(out))
    code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", out, *TINY)
    assert code == 2 and "holds files that no run of these scripts wrote" in err[0]
    assert "--resume" not in err[0]  # no run of ours there: nothing to resume
    assert snapshot(str(out)) == before
    assert not (out / ".lock").exists()  # a refused command leaves nothing behind


def test_a_folder_of_look_alike_files_is_no_run_and_overwrite_deletes_none(tiny_data, tmp_path,
                                                                          capsys):
    """A folder of the user's own files with names like a run's is not taken for a run: no advice
    to resume, and --overwrite (which deleted all six) deletes none of them."""
    data_dir, _ = tiny_data
    out = tmp_path / "mine"
    names = ["summary.json", "history.csv", "codes.npz", "holiday_epoch_2019.png",
             "resnet50.weights.h5", "checkpoints/ckpt-2024-notes.txt"]
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine")
    before = snapshot(str(out))
    for extra in ([], ["--overwrite"]):
        code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", out, *TINY, *extra)
        assert code == 2 and len(err) == 1 and "--resume" not in err[0], err
        assert snapshot(str(out)) == before
    (out / "summary.json").unlink()
    (out / "history.csv").unlink()
    (out / "codes.npz").unlink()  # nothing a run writes is left: a run starts, beside the rest
    code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", out, *TINY, "--epochs", 1)
    assert code == 0, err
    kept = {k: v for k, v in before.items() if k not in ("summary.json", "history.csv", "codes.npz")}
    assert {k: v for k, v in snapshot(str(out)).items() if k in kept} == kept


def test_overwrite_keeps_the_users_files_in_a_run_folder(finished_run, capsys):
    """--overwrite deletes what the run wrote (run.json lists it) and its checkpoints; a file of
    the user's there stays, whatever its name."""
    data_dir, out = finished_run
    mine = ["holiday_epoch_2019.png", "resnet50.weights.h5", "checkpoints/ckpt-2024-notes.txt",
            "rec_epoch_1999.png"]
    for name in mine:
        with open(os.path.join(out, name), "w") as f:
            f.write("mine")
    code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", out, *TINY, "--epochs", 1,
                        "--overwrite")
    assert code == 0, err
    for name in mine:
        with open(os.path.join(out, name)) as f:
            assert f.read() == "mine"
    assert epochs_in(out) == [1] and not os.path.exists(os.path.join(out, "rec_epoch_002.png"))
    names = set(os.listdir(os.path.join(out, "checkpoints"))) - {"checkpoint", "ckpt-2024-notes.txt"}
    assert "ckpt-1.index" in names and all(n.startswith("ckpt-1.") for n in names), names
    with open(os.path.join(out, "run.json")) as f:
        assert "rec_epoch_001.png" in json.load(f)["files"]


def test_an_edited_file_list_never_reaches_outside_the_run(finished_run, capsys):
    """run.json's list names a file outside the folder, the folder itself and a folder in it:
    --overwrite deletes none of them."""
    data_dir, out = finished_run
    outside = os.path.join(os.path.dirname(out), "outside.txt")
    with open(outside, "w") as f:
        f.write("mine")
    os.makedirs(os.path.join(out, "notes"))
    with open(os.path.join(out, "notes", "a.txt"), "w") as f:
        f.write("mine")
    with open(os.path.join(out, "run.json")) as f:
        run = json.load(f)
    run["files"] += ["../outside.txt", outside, ".", "", "notes"]
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(run, f)
    code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", out, *TINY, "--epochs", 1,
                        "--overwrite")
    assert code == 0, err
    assert os.path.exists(outside) and os.path.exists(os.path.join(out, "notes", "a.txt"))


def test_overwrite_on_a_full_disk_keeps_the_old_run_whole(finished_run, monkeypatch, capsys):
    """The new run's first checkpoint cannot be written: the old run is still all there, and the
    message says so, with no "Last good checkpoint: none"."""
    data_dir, out = finished_run
    before = snapshot(out)

    def write(self, prefix, options=None):
        raise tf.errors.ResourceExhaustedError(None, None, "No space left on device [Op:SaveV2]")
    monkeypatch.setattr(tf.train.Checkpoint, "write", write)
    code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", out, *TINY, "--overwrite")
    assert code == 2 and len(err) == 1, err
    assert "no space left" in err[0] and "the run that was there is untouched" in err[0]
    assert "none" not in err[0]
    assert snapshot(out) == before and not glob.glob(os.path.join(glob.escape(out), ".tmp-*"))
    monkeypatch.undo()
    code, err, _ = main(capsys, ae, "--out", out, "--resume", "--epochs", 3)  # it still resumes
    assert code == 0 and epochs_in(out) == [1, 2, 3], err


def test_a_refused_start_in_a_new_folder_leaves_no_folder(tiny_data, tmp_path, monkeypatch, capsys):
    data_dir, _ = tiny_data

    def refuse(logdir):
        raise tf.errors.PermissionDeniedError(None, None, "denied")
    monkeypatch.setattr(tf.summary, "create_file_writer", refuse)
    out = tmp_path / "new" / "run"
    code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", out, "--logdir",
                        tmp_path / "tb", *TINY)
    assert code == 2 and "cannot write there" in err[0]
    assert not (tmp_path / "new").exists()


def test_another_scripts_run_is_not_offered_for_resume(finished_run, capsys):
    """vae.py --out <a run of ae.py> suggested vae.py ... --resume, which then failed."""
    data_dir, out = finished_run
    code, err, _ = main(capsys, vae, "--data-dir", data_dir, "--out", out, "--epochs", 1)
    assert code == 2 and len(err) == 1 and "holds a run of the other script" in err[0], err
    assert "--resume" not in err[0] and "--overwrite" in err[0]


def test_paths_that_cannot_work_are_refused_before_anything_is_written(tiny_data, tmp_path, capsys):
    """An --out that is not valid UTF-8 (TensorFlow cannot write a checkpoint there: epoch 1 was
    lost), and an --out inside the --dataset folder (the run's grids would become its data)."""
    data_dir, _ = tiny_data
    bad = os.path.join(str(tmp_path), "o_bad\udcff")  # the bytes o_bad\xff, as Python holds them
    code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", bad, *TINY)
    assert code == 2 and len(err) == 1 and "not valid UTF-8" in err[0] and "o_bad\\xff" in err[0]
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    code, err, _ = main(capsys, ae, "--dataset", images, "--out", images / "a" / "run", *TINY)
    assert code == 2 and len(err) == 1 and "is inside --dataset" in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["images"] and os.listdir(images) == ["a"]
    assert os.listdir(images / "a") == []


def test_resume_recreates_the_grids_a_kill_lost(finished_run, capsys):
    """kill -9 just after an epoch's line, before the background writer wrote its grid: the
    grid was lost for good; a resume makes it again from the checkpoint."""
    data_dir, out = finished_run
    grid = os.path.join(out, "rec_epoch_002.png")
    with Image.open(grid) as image:
        before = np.asarray(image, np.int64)
    os.remove(grid)
    code, err, _ = main(capsys, ae, "--out", out, "--resume", "--epochs", 3)
    assert code == 0, err
    with Image.open(grid) as image:
        assert np.abs(np.asarray(image, np.int64) - before).max() <= 1  # eager, not compiled
    assert os.path.exists(os.path.join(out, "rec_epoch_003.png"))


def test_resume_with_the_other_script_is_one_line(finished_run, capsys):
    data_dir, out = finished_run
    code, err, _ = main(capsys, vae, "--out", out, "--resume")
    assert code == 2 and len(err) == 1 and "holds a run of the other script" in err[0], err
