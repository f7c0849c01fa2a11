"""ae.py: the model, its loss against a hand computation, and a short run end to end."""

import csv
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import ae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shapes_and_unknown_batch_size():
    model = ae.AE(h_dim=7)
    step = tf.function(lambda x: model(x), input_signature=[tf.TensorSpec([None, 784])])
    assert step(tf.zeros([3, 784])).shape == (3, 784)
    assert model.encoder(tf.zeros([5, 784])).shape == (5, 7)


def test_loss_is_bce_per_pixel():
    model = ae.AE(h_dim=4)
    x = tf.random.uniform([6, 784], seed=3)
    logits = model(x).numpy()
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    xn = x.numpy().astype(np.float64)
    expected = -np.mean(xn * np.log(p) + (1 - xn) * np.log(1 - p))
    losses = ae.compute_loss(model, x, x)
    assert float(losses["bce"]) == pytest.approx(expected, rel=1e-5)
    assert float(losses["mse"]) == pytest.approx(np.mean((p - xn) ** 2), rel=1e-5)


def test_two_epochs_end_to_end(template_run):
    folder, history, out = template_run
    tmp_path = pathlib.Path(folder)
    assert "2/2" in out and "test_bce" in out and "epoch 1/2  train bce" not in out  # a progress bar
    assert [row["epoch"] for row in history] == [1, 2]
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "seconds", "train_bce", "test_bce", "test_mse"]
    assert float(rows[1]["test_bce"]) < float(rows[0]["test_bce"])
    assert float(rows[1]["train_bce"]) < float(rows[0]["train_bce"])
    for epoch in (1, 2):
        img = Image.open(tmp_path / f"rec_epoch_{epoch:03d}.png")
        assert img.mode == "L" and img.size == (280, 280)
    # the even columns hold the same test originals every epoch; the reconstructions change
    g1, g2 = (np.array(Image.open(tmp_path / f"rec_epoch_{e:03d}.png")).reshape(10, 28, 10, 28)
              for e in (1, 2))
    np.testing.assert_array_equal(g1[:, :, 0::2], g2[:, :, 0::2])
    assert not np.array_equal(g1[:, :, 1::2], g2[:, :, 1::2])


def run_script(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "ae.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_missing_data_is_one_line_and_exit_2(tmp_path):
    result = run_script("--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    # the whole of stderr: nothing from TensorFlow's start-up on a machine without a GPU
    assert result.stderr == f"ae.py: error: {tmp_path / 'nowhere'}: no such folder (--data-dir)\n"


def test_cli_unwritable_output_loses_nothing(tiny_data, tmp_path, capsys):
    data_dir, _ = tiny_data
    blocker = tmp_path / "images"
    blocker.write_bytes(b"not a folder")
    with pytest.raises(SystemExit) as info:
        ae.main(["--data-dir", data_dir, "--out", str(blocker / "ae")])
    assert info.value.code == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert blocker.read_bytes() == b"not a folder"


@pytest.mark.parametrize("flags", [["--h-dim", "0"], ["--epochs", "two"], ["--lr", "nan"]])
def test_cli_rejects_impossible_flags_in_one_line(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as info:
        ae.main([*flags, "--out", str(tmp_path)])
    err = capsys.readouterr().err.splitlines()
    assert info.value.code == 2 and len(err) == 1 and flags[0] in err[0]


def test_input_bce_is_the_mean_over_every_pixel_whatever_the_test_set_size():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.01, 0.99, (1500, 12)).astype(np.float32)  # not a multiple of the chunk
    x_in = rng.uniform(0.01, 0.99, (1500, 12)).astype(np.float32)
    expected = -np.mean(x * np.log(x_in) + (1 - x) * np.log(1 - x_in))
    assert ae.input_bce(x_in, x) == pytest.approx(expected, rel=1e-5)
