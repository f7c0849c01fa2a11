"""vae.py: the model, the closed-form KL against Monte Carlo, the loss by hand, a short run end
to end (beta, the latent map, the importance-weighted bound, TensorBoard)."""

import csv
import glob
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import vae
from conftest import make_config


def test_shapes_and_unknown_batch_size():
    model = vae.VAE(z_dim=3)
    step = tf.function(lambda x, eps: model(x, eps),
                       input_signature=[tf.TensorSpec([None, 784]), tf.TensorSpec([None, 3])])
    logits, mu, log_var = step(tf.zeros([5, 784]), tf.zeros([5, 3]))
    assert logits.shape == (5, 784) and mu.shape == (5, 3) and log_var.shape == (5, 3)


def test_reparameterize_with_zero_noise_returns_the_mean():
    model = vae.VAE(z_dim=3)
    mu, log_var = tf.constant([[1.0, -2.0, 0.5]]), tf.constant([[0.3, -1.0, 2.0]])
    np.testing.assert_allclose(model.reparameterize(mu, log_var, tf.zeros([1, 3])), mu)
    z = model.reparameterize(mu, log_var, tf.ones([1, 3]))
    np.testing.assert_allclose(z, mu + np.exp(0.5 * log_var), rtol=1e-6)


def test_closed_form_kl_matches_monte_carlo():
    rng = np.random.default_rng(0)
    mu = rng.normal(0, 1.5, (4, 6))
    log_var = rng.normal(0, 1.0, (4, 6))
    closed = vae.kl_divergence(tf.constant(mu), tf.constant(log_var)).numpy()
    # KL = E_q[log q(z) - log p(z)], estimated from samples of q
    n = 200_000
    sigma = np.exp(0.5 * log_var)
    eps = rng.standard_normal((n, 4, 6))
    z = mu + sigma * eps
    log_q = -0.5 * (eps ** 2 + log_var + np.log(2 * np.pi))
    log_p = -0.5 * (z ** 2 + np.log(2 * np.pi))
    terms = (log_q - log_p).sum(-1)
    estimate, stderr = terms.mean(0), terms.std(0) / np.sqrt(n)
    assert np.all(np.abs(closed - estimate) < 5 * stderr), (closed, estimate, stderr)
    assert np.all(closed > 0)


def test_loss_is_summed_bce_plus_kl_averaged_over_the_batch():
    model = vae.VAE(z_dim=4)
    x = tf.random.uniform([6, 784], seed=5)
    eps = tf.random.normal([6, 4], seed=6)
    losses = vae.compute_loss(model, x, eps)
    logits, mu, log_var = (t.numpy().astype(np.float64) for t in model(x, eps))
    p = 1 / (1 + np.exp(-logits))
    xn = x.numpy().astype(np.float64)
    rec = -np.sum(xn * np.log(p) + (1 - xn) * np.log(1 - p), axis=1).mean()
    kl = (-0.5 * np.sum(1 + log_var - mu ** 2 - np.exp(log_var), axis=1)).mean()
    assert float(losses["rec"]) == pytest.approx(rec, rel=1e-5)
    assert float(losses["kl"]) == pytest.approx(kl, rel=1e-4)
    assert float(losses["loss"]) == pytest.approx(rec + kl, rel=1e-5)


def test_two_epochs_end_to_end_with_beta_a_2d_map_the_iw_bound_and_tensorboard(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    history = vae.train(make_config(vae, data_dir, tmp_path, z_dim=2, beta=2.0, iw_samples=50,
                                    logdir=str(tmp_path / "tb")))
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0]) == ["epoch", "seconds", "train_rec", "train_kl", "train_loss",
                             "test_rec", "test_kl", "test_loss", "beta", "test_bits_per_dim"]
    assert float(rows[1]["test_loss"]) < float(rows[0]["test_loss"])
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert [row["beta"] for row in history] == [2.0, 2.0]
    for name in ("rec", "sample", "manifold"):  # the latent map, as the codes are 2-D
        for epoch in (1, 2):
            img = Image.open(tmp_path / f"{name}_epoch_{epoch:03d}.png")
            assert img.mode == "L" and img.size == (280, 280)
    img = Image.open(tmp_path / "interpolation.png")
    assert img.mode == "L" and img.size == (280, 280)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_nll_iw"] < summary["test_neg_elbo"]
    # TensorBoard got every column of history.csv and every grid, for each epoch
    tags = {}
    for path in glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, set()).add(event.step)
    expected = (set(history[0]) - {"epoch"}) | {"rec", "sample", "manifold"}
    assert expected <= set(tags) and all(tags[t] == {1, 2} for t in expected)
