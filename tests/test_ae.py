"""ae.py: the model, its loss against a hand computation, and a short run end to end."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import ae
from conftest import make_config

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


def test_two_epochs_end_to_end(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    history = ae.train(make_config(ae, data_dir, tmp_path, h_dim=8))
    assert [row["epoch"] for row in history] == [1, 2]
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "seconds", "train_bce", "test_bce", "test_mse"]
    assert [float(r["test_bce"]) for r in rows] == pytest.approx([r["test_bce"] for r in history])
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


def test_same_seed_same_history(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    runs = [ae.train(make_config(ae, data_dir, tmp_path / str(i), epochs=1, h_dim=8)) for i in range(2)]
    assert runs[0][0]["test_bce"] == runs[1][0]["test_bce"]
    assert runs[0][0]["train_bce"] == runs[1][0]["train_bce"]


def run_script(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "ae.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_missing_data_is_one_line_and_exit_2(tmp_path):
    result = run_script("--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"ae.py: error: {tmp_path / 'nowhere'}: no such folder (--data-dir)")


def test_cli_unwritable_output_loses_nothing(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    blocker = tmp_path / "images"
    blocker.write_bytes(b"not a folder")
    result = run_script("--data-dir", data_dir, "--out", str(blocker / "ae"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "is a file, not a folder" in result.stderr.strip().splitlines()[-1]
    assert blocker.read_bytes() == b"not a folder"


def test_cli_rejects_impossible_flags(tmp_path):
    result = run_script("--h-dim", "0", "--out", str(tmp_path))
    assert result.returncode == 2 and "--h-dim" in result.stderr and "Traceback" not in result.stderr
