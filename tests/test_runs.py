"""Runs you can trust: exact resume, refusals, the divergence guard, signals, weights, TensorBoard."""

import argparse
import csv
import errno
import glob
import os
import pathlib
import shutil
import shlex
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import ae
import utils
import tool.checkpoints
import tool.cli
import tool.errors
import tool.files
import tool.folders
import tool.progress
import tool.resume
import vae
from conftest import main, make_config


def read_history(out):
    with open(os.path.join(out, "history.csv"), newline="") as f:
        return list(csv.DictReader(f))


def without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def check_resume_from_two_epochs_before_the_end(script, config, whole, tmp_path):
    """A copy of the finished run in whole (made by config), as if stopped two epochs before its
    end (without the checkpoints, grids and history rows of its last two epochs), continued with
    --resume: the same history and last grids as the uninterrupted run. (What a run's first
    epochs write does not depend on how many epochs follow, so the copy stands for a shorter run.)"""
    n = config.epochs
    split = tmp_path / "split"
    shutil.copytree(whole, split)
    for name in (f"checkpoints/ckpt-{e}.*" for e in (n - 1, n)):
        for path in glob.glob(str(split / name)):
            os.remove(path)
    for path in glob.glob(str(split / f"*_epoch_{n - 1:03d}.png")) + glob.glob(str(split / f"*_epoch_{n:03d}.png")):
        os.remove(path)
    tool.files.write_history(str(split / "history.csv"), read_history(whole)[:n - 2])
    assert tool.resume.resume_point(str(split))[0].endswith(f"ckpt-{n - 2}")
    script.train(argparse.Namespace(**dict(vars(config), out=str(split), resume=True)))
    rows_whole, rows_split = read_history(whole), read_history(split)
    assert [r["epoch"] for r in rows_split] == [str(e) for e in range(1, n + 1)]  # none lost or doubled
    for a, b in zip(rows_whole, rows_split):
        for key in a:
            if key.startswith(("test_", "train_")):
                assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-6, abs=0), (a, b)
    # the fixed probes came back from the checkpoint: the last grids are the same
    grids = sorted(glob.glob(str(whole / f"*_epoch_{n:03d}.png")))
    assert grids
    for grid in grids:
        with open(grid, "rb") as f1, open(split / os.path.basename(grid), "rb") as f2:
            assert f1.read() == f2.read(), grid


def test_resumed_adversarial_denoiser_matches_an_uninterrupted_one(autoencoders, tmp_path):
    """Three optimizers, two decaying rates, the discriminator, the noise."""
    whole, _, config = autoencoders["adversarial"]
    check_resume_from_two_epochs_before_the_end(ae, config, whole, tmp_path)


def test_resumed_vae_matches_an_uninterrupted_one_and_a_seed_its_run(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    config = make_config(vae, data_dir, tmp_path / "whole", epochs=4, seed=7, z_dim=3)
    vae.train(config)
    check_resume_from_two_epochs_before_the_end(vae, config, tmp_path / "whole", tmp_path)
    first = without_seconds(read_history(tmp_path / "whole")[:1])
    for seed, same in ((7, True), (8, False)):  # the same seed, the same run; another, another
        vae.train(make_config(vae, data_dir, tmp_path / f"seed {seed}", epochs=1, seed=seed, z_dim=3))
        assert (without_seconds(read_history(tmp_path / f"seed {seed}")) == first) == same


def test_the_seed_reaches_the_random_stream_not_only_the_weights(tiny_data, tmp_path, monkeypatch):
    """With the weights' initialisation held the same, another --seed still gives another run of
    ae.py: its shuffling (and noise, prior draws) follows the seed too."""
    data_dir, _ = tiny_data
    real = keras.utils.set_random_seed
    monkeypatch.setattr(keras.utils, "set_random_seed", lambda seed: real(0))
    rows = []
    for seed in (1, 2):
        out = tmp_path / f"seed {seed}"
        ae.train(make_config(ae, data_dir, out, epochs=1, h_dim=4, seed=seed))
        rows.append(without_seconds(read_history(out)))
    assert rows[0] != rows[1]


@pytest.mark.parametrize("script", [ae, vae], ids=["ae", "vae"])
def test_the_learning_rate_reaches_the_optimizer(script, tiny_data, tmp_path):
    """The same seed with another --lr gives another first epoch (a constant rate would not)."""
    data_dir, _ = tiny_data
    rows = []
    for lr in (1e-3, 3e-3):
        out = tmp_path / f"lr {lr}"
        script.train(make_config(script, data_dir, out, epochs=1, lr=lr))
        rows.append(without_seconds(read_history(out)))
    assert rows[0] != rows[1]


def test_resume_refuses_a_different_model(finished_run):
    data_dir, out = finished_run
    with pytest.raises(tool.errors.UserError, match=r"--h-dim 7 differs from the run .* \(6\)"):
        ae.train(make_config(ae, data_dir, out, epochs=3, h_dim=7, resume=True))
    assert len(read_history(out)) == 2


def test_a_second_run_does_not_mix_with_the_first(finished_run):
    data_dir, out = finished_run
    tmp_path = pathlib.Path(out)
    (tmp_path / "notes.txt").write_text("mine")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(tool.errors.UserError, match="already holds a run.*--resume.*--overwrite"):
        ae.train(make_config(ae, data_dir, tmp_path, epochs=1, h_dim=6))
    assert sorted(os.listdir(tmp_path)) == before
    first = read_history(tmp_path)[0]
    ae.train(make_config(ae, data_dir, tmp_path, epochs=1, h_dim=6, overwrite=True))
    again = read_history(tmp_path)
    assert [r["epoch"] for r in again] == ["1"]
    assert without_seconds(again) == without_seconds([first])  # the same seed, the same run
    assert not os.path.exists(tmp_path / "rec_epoch_002.png")
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's own files go


def test_resume_drops_history_rows_newer_than_the_checkpoint(finished_run):
    data_dir, out = finished_run
    tmp_path = pathlib.Path(out)
    rows = read_history(tmp_path)
    tool.files.write_history(str(tmp_path / "history.csv"), rows + [dict(rows[-1], epoch="3")])
    ae.train(make_config(ae, data_dir, tmp_path, epochs=3, h_dim=6, resume=True))
    assert [r["epoch"] for r in read_history(tmp_path)] == ["1", "2", "3"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(finished_run, monkeypatch, capsys):
    data_dir, out = finished_run
    tmp_path = pathlib.Path(out)
    checkpoints = sorted(os.listdir(tmp_path / "checkpoints"))
    real = ae.compute_loss
    monkeypatch.setattr(ae, "compute_loss",
                        lambda model, x_in, x: {k: v * np.nan for k, v in real(model, x_in, x).items()})
    with pytest.raises(SystemExit) as info:
        ae.main(["--data-dir", data_dir, "--out", str(tmp_path), "--epochs", "3", "--resume"])
    assert info.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epoch 3: train_bce is nan" in err[0] and "--lr" in err[0]
    assert "ckpt-2" in err[0]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == checkpoints
    assert [r["epoch"] for r in read_history(tmp_path)] == ["1", "2"]
    assert not os.path.exists(tmp_path / "rec_epoch_003.png")


def test_saved_weights_load_into_a_new_model(tiny_data, finished_run):
    _, (_, (x_test, _)) = tiny_data
    tmp_path = pathlib.Path(finished_run[1])
    model = ae.AE(h_dim=6)
    x = tf.constant(x_test[:4].reshape(-1, 784), tf.float32) / 255.0
    model(x)  # build it, as load_weights needs
    before = model.encoder(x).numpy()
    model.load_weights(str(tmp_path / "ae.weights.h5"))
    after = model.encoder(x).numpy()
    assert after.shape == (4, 6) and not np.allclose(before, after)
    # the checkpointed model of the last epoch holds the same weights
    restored = ae.AE(h_dim=6)
    restored(x)
    tf.train.Checkpoint(model=restored).restore(
        tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))).expect_partial()
    np.testing.assert_array_equal(restored.encoder(x).numpy(), after)


def test_signals_act_as_usual_once_the_epochs_are_done(finished_run, tmp_path, monkeypatch, capsys):
    data_dir, out = finished_run
    before = signal.getsignal(signal.SIGINT)
    seen = {}
    real = tool.files.write_json

    def spy(path, obj):  # summary.json is written after the epochs
        seen.setdefault(os.path.basename(path), signal.getsignal(signal.SIGINT))
        return real(path, obj)

    monkeypatch.setattr(tool.files, "write_json", spy)
    ae.train(make_config(ae, data_dir, out, h_dim=6, resume=True))  # no epoch left: the end only
    assert seen["summary.json"] is before and signal.getsignal(signal.SIGINT) is before

    def interrupted(config):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        tool.cli.run_main(ae.SCRIPT, interrupted, ae.make_parser(), ["--out", str(tmp_path / "x")])
    assert info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "ae.py: stopped by SIGINT before training began, so nothing was written"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_end_of_run_figures_says_resume_finishes_them(
        tiny_data, tmp_path, monkeypatch, capsys, request, sig):
    """SIGTERM in the importance-weighted estimate ended with exit 143 and no line; SIGINT said
    only "interrupted". Now one line says what stopped and the command that finishes it."""
    data_dir, _ = tiny_data
    out = tmp_path / "run"
    real = vae.test_nll_iw
    # Ctrl-C as a terminal sends it: a suite started in the background of a script inherits
    # SIGINT ignored, and the end-of-run figures keep the handler the process started with
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, before))

    def signalled(*args):
        os.kill(os.getpid(), sig)
        return real(*args)
    monkeypatch.setattr(vae, "test_nll_iw", signalled)
    code, err, _ = main(capsys, vae, "--data-dir", data_dir, "--out", out, "--epochs", 1,
                        "--batch-size", 100, "--fd-samples", 0, "--iw-samples", 5)
    assert code == 128 + sig and len(err) == 1, err
    name = signal.Signals(sig).name
    assert f"stopped by {name} during the end-of-run figures; every epoch is saved" in err[0]
    command = err[0].split("this finishes them: ")[1]
    assert not (out / "summary.json").exists()
    monkeypatch.undo()
    code, err, _ = main(capsys, vae, *shlex.split(command)[2:])
    assert code == 0 and (out / "summary.json").exists(), err


def test_a_full_disk_at_the_end_names_the_folder_the_checkpoint_and_the_command(
        finished_run, monkeypatch, capsys):
    data_dir, out = finished_run

    def full(path, **arrays):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(np, "savez", full)
    code, err, _ = main(capsys, ae, "--out", out, "--resume", "--export-codes")
    assert code == 2 and len(err) == 1, err
    assert f"cannot write into {out} (No space left on device) during the end-of-run" in err[0]
    assert "ckpt-2" in err[0] and "--export-codes" in err[0].split("this finishes them: ")[1]


def test_sigterm_while_the_images_are_decoded_is_one_line(tmp_path, monkeypatch, capsys):
    for k in range(700):  # about 70 in the test split, more than the 50 needed
        path = tmp_path / "data" / f"{k:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((4, 4), k % 256, np.uint8)).save(path)
    real = tool.folders.decode_image

    def decode(job):
        if job[0].endswith("007.png"):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(job)
    monkeypatch.setattr(tool.folders, "decode_image", decode)
    code, err, _ = main(capsys, ae, "--dataset", tmp_path / "data", "--out", tmp_path / "run")
    assert code == 143 and err == ["ae.py: stopped by SIGTERM before training began, so nothing "
                                   "was written"]
    assert not (tmp_path / "run").exists()


# --- --grid-every and progress.gif -----------------------------------------------------------------

def test_grid_every_keeps_every_nth_grid_and_the_last_and_the_gif_shows_them_in_order(tiny_data, tmp_path):
    from PIL import Image
    data_dir, _ = tiny_data
    out = tmp_path / "run"
    ae.train(make_config(ae, data_dir, out, epochs=5, grid_every=2, h_dim=4))
    assert sorted(p.name for p in out.glob("*.png")) == [
        "rec_epoch_002.png", "rec_epoch_004.png", "rec_epoch_005.png"]
    with Image.open(out / "progress.gif") as gif:
        assert gif.n_frames == 3
        bands = []
        for frame, epoch in enumerate((2, 4, 5)):
            gif.seek(frame)
            pixels = np.asarray(gif.convert("L"))
            grid = np.asarray(Image.open(out / f"rec_epoch_{epoch:03d}.png"))
            # the grid below the band, at 32 gray levels
            np.testing.assert_array_equal(pixels[14:], grid // 8 * 8 + 4)
            bands.append(pixels[:14])
        assert all(band.any() for band in bands) and not (bands[0] == bands[1]).all()  # "epoch N"


def test_progress_gif_spreads_at_most_100_frames_over_a_long_run(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28]
    for epoch in range(1, 251):  # objects on black, as Fashion-MNIST's: blobs that move and sharpen
        centres = rng.uniform(8, 20, (100, 2, 1, 1))
        width = 3 + 20 / epoch
        blobs = np.exp(-((yy - centres[:, 0]) ** 2 + (xx - centres[:, 1]) ** 2) / (2 * width ** 2))
        images = (255 * blobs * (blobs > 0.2) + rng.uniform(0, 20, blobs.shape) * (blobs > 0.2))
        utils.save_images(images.clip(0, 255).astype(np.uint8), str(tmp_path / f"sample_epoch_{epoch:03d}.png"))
    chosen = tool.progress.spread(list(range(1, 251)), 100)
    assert len(chosen) == 100 and chosen[0] == 1 and chosen[-1] == 250
    assert all(a < b for a, b in zip(chosen, chosen[1:]))
    assert tool.progress.spread([1, 2, 3], 100) == [1, 2, 3]
    tool.progress.save_progress_gif([str(tmp_path / f"sample_epoch_{e:03d}.png") for e in chosen], chosen,
                            str(tmp_path / "progress.gif"))
    with Image.open(tmp_path / "progress.gif") as gif:
        assert gif.n_frames == 100 and gif.size == (280, 294)
        gif.seek(99)
        last = np.asarray(gif.convert("L"))[14:]
    np.testing.assert_array_equal(last, np.asarray(Image.open(tmp_path / "sample_epoch_250.png")) // 8 * 8 + 4)
    assert os.path.getsize(tmp_path / "progress.gif") < 4 * 2**20  # a few MB
