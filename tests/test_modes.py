"""The tutorial's other autoencoders and measurements: denoising, adversarial, codes, PCA, beta,
the importance-weighted likelihood, the latent map and interpolations."""

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import ae
import utils
import vae
from conftest import make_config


def png(path):
    img = Image.open(path)
    return img.mode, img.size


# --- denoising ---------------------------------------------------------------------------------

def test_noise_goes_into_the_inputs_and_not_the_targets(monkeypatch):
    config = ae.make_parser().parse_args(["--noise", "0.5", "--h-dim", "4"])
    model = ae.AE(4)
    x = tf.random.uniform([8, 784], seed=1)
    model(x)
    optimizers = ae.make_optimizers(config, model, steps_per_epoch=10)
    seen = {}
    real = ae.compute_loss

    def spy(model, x_in, x_target):
        seen["in"], seen["target"] = x_in.numpy(), x_target.numpy()
        return real(model, x_in, x_target)

    monkeypatch.setattr(ae, "compute_loss", spy)
    step = ae.make_train_step(config, model, optimizers, tf.random.Generator.from_seed(3))
    step(x)
    np.testing.assert_array_equal(seen["target"], x.numpy())
    assert not np.allclose(seen["in"], x.numpy())
    assert seen["in"].min() >= 0 and seen["in"].max() <= 1  # clipped
    assert 0.3 < np.std(seen["in"] - x.numpy()) < 0.5  # about sigma, less what clipping removed


def test_corrupt_adds_scaled_noise_and_clips():
    x = tf.constant([[0.0, 0.5, 1.0, 0.2]])
    noise = tf.constant([[-1.0, 0.5, 1.0, 2.0]])
    np.testing.assert_allclose(ae.corrupt(x, 0.2, noise), [[0.0, 0.6, 1.0, 0.6]], rtol=1e-6)


def test_denoising_run_writes_triplet_grids_and_the_noisy_figures(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    ae.train(make_config(ae, data_dir, tmp_path, noise=0.3, h_dim=6))
    grid = np.array(Image.open(tmp_path / "rec_epoch_002.png")).reshape(10, 28, 10, 28)
    assert (grid[:, :, 9] == 0).all()  # three triplets a row, the tenth column empty
    # the noisy inputs (columns 0, 3, 6) differ from the clean originals (2, 5, 8)
    assert not np.array_equal(grid[:, :, 0::3][:, :, :3], grid[:, :, 2::3][:, :, :3])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["flags"]["noise"] == 0.3
    assert summary["test_bce_from_noisy"] < summary["identity_bce_noisy"]


# --- adversarial -------------------------------------------------------------------------------

def snapshot(variables):
    return [v.numpy().copy() for v in variables]


def changed(before, variables):
    return [not np.array_equal(b, v.numpy()) for b, v in zip(before, variables)]


def test_each_adversarial_update_touches_only_its_players_variables():
    config = ae.make_parser().parse_args(["--adversarial", "--h-dim", "3"])
    model, discriminator = ae.AE(3), ae.make_discriminator()
    x = tf.random.uniform([16, 784], seed=2)
    model(x)
    discriminator(tf.zeros([1, 3]))
    optimizers = ae.make_optimizers(config, model, 10, discriminator)
    enc, dec, disc = (model.encoder.trainable_variables, model.decoder.trainable_variables,
                      discriminator.trainable_variables)

    before = snapshot(enc + dec + disc)
    ae.discriminator_step(model, discriminator, optimizers["disc_optimizer"], x,
                          tf.random.normal([16, 3], seed=4))
    moved = changed(before, enc + dec + disc)
    assert not any(moved[:len(enc) + len(dec)]) and all(moved[len(enc) + len(dec):])

    before = snapshot(enc + dec + disc)
    ae.generator_step(model, discriminator, optimizers["gen_optimizer"], x)
    moved = changed(before, enc + dec + disc)
    assert all(moved[:len(enc)]) and not any(moved[len(enc):])


def test_adversarial_run_writes_samples_and_game_losses(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    history = ae.train(make_config(ae, data_dir, tmp_path, adversarial=True, h_dim=4))
    assert {"train_disc", "train_gen"} <= set(history[0])
    assert png(tmp_path / "sample_epoch_002.png") == ("L", (280, 280))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["code_mean_abs"] >= 0 and summary["code_std_dev_from_1"] >= 0


def test_code_statistics():
    rng = np.random.default_rng(0)
    codes = rng.normal([3.0, -1.0], [2.0, 0.5], size=(200_000, 2))
    stats = utils.code_statistics(codes)
    assert stats["code_mean_abs"] == pytest.approx((3 + 1) / 2, abs=0.01)
    assert stats["code_std_dev_from_1"] == pytest.approx((1 + 0.5) / 2, abs=0.01)


# --- codes and PCA -----------------------------------------------------------------------------

def test_pca_reconstructs_data_in_a_k_dimensional_subspace_exactly():
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(50, 3)))[0].T  # 3 orthonormal directions in 50-D
    x = 5.0 + rng.normal(size=(400, 3)) @ basis
    mean, components = utils.fit_pca(x, 3)
    reconstruction = ((x - mean) @ components.T) @ components + mean
    np.testing.assert_allclose(reconstruction, x, atol=1e-9)
    np.testing.assert_allclose(components @ components.T, np.eye(3), atol=1e-12)
    _, two = utils.fit_pca(x, 2)
    assert np.abs(((x - mean) @ two.T) @ two + mean - x).max() > 0.01  # one direction short


def test_knn_accuracy_on_separable_and_on_mixed_classes():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 300)
    codes = labels[:, None] * 10.0 + rng.normal(size=(300, 2))
    assert utils.knn_accuracy(codes[:200], labels[:200], codes[200:], labels[200:]) == 1.0
    shuffled = rng.permutation(labels)
    assert utils.knn_accuracy(codes[:200], shuffled[:200], codes[200:], shuffled[200:]) < 0.6


def test_export_codes_and_compare_pca(tiny_data, tmp_path):
    data_dir, ((x_train, y_train), (x_test, y_test)) = tiny_data
    ae.train(make_config(ae, data_dir, tmp_path, h_dim=3, export_codes=True, compare_pca=True))
    codes = np.load(tmp_path / "codes.npz")
    assert codes["train_codes"].shape == (len(x_train), 3)
    assert codes["test_codes"].shape == (len(x_test), 3)
    np.testing.assert_array_equal(codes["train_labels"], y_train)
    np.testing.assert_array_equal(codes["test_labels"], y_test)
    figures = json.loads((tmp_path / "pca_vs_ae.json").read_text())
    for method in ("pca", "ae"):
        assert set(figures[method]) == {"bce", "mse", "knn_accuracy"}
        assert 0 <= figures[method]["knn_accuracy"] <= 1 and figures[method]["mse"] > 0
    mode, (width, height) = png(tmp_path / "pca_vs_ae.png")
    assert mode == "RGB" and width > 2 * height
    assert json.loads((tmp_path / "summary.json").read_text())["pca_vs_ae"] == figures


# --- VAE: beta, importance weighting, latent map, interpolation --------------------------------

def test_log_mean_exp_matches_direct_computation_and_stays_finite():
    a = np.random.default_rng(3).normal(size=(7, 5)) * 3
    np.testing.assert_allclose(vae.log_mean_exp(tf.constant(a), axis=0),
                               np.log(np.mean(np.exp(a), axis=0)), rtol=1e-12)
    big = tf.constant([[-1000.0, -1001.0], [-1000.0, -999.0]])
    np.testing.assert_allclose(vae.log_mean_exp(big, axis=0),
                               [-1000.0, -1000.0 + np.log((np.exp(-1) + np.exp(1)) / 2)], rtol=1e-6)


def test_iw_estimate_agrees_with_a_direct_computation():
    model = vae.VAE(z_dim=2)
    x = tf.cast(tf.random.uniform([3, 784], seed=5) > 0.5, tf.float32)
    eps = tf.random.normal([4, 3, 2], seed=6, dtype=tf.float32)
    model(x, eps[0])
    mu, log_var = (t.numpy().astype(np.float64) for t in model.encode(x))
    xn = x.numpy().astype(np.float64)
    expected = []
    for i in range(3):
        log_w = []
        for k in range(4):
            z = mu[i] + np.exp(0.5 * log_var[i]) * eps[k, i].numpy()
            p = 1 / (1 + np.exp(-model.decode(z[None].astype(np.float32)).numpy()[0].astype(np.float64)))
            log_px = np.sum(xn[i] * np.log(p) + (1 - xn[i]) * np.log(1 - p))
            log_pz = np.sum(-0.5 * (z ** 2 + np.log(2 * np.pi)))
            sigma = np.exp(0.5 * log_var[i])
            log_qz = np.sum(-0.5 * (((z - mu[i]) / sigma) ** 2 + np.log(2 * np.pi)) - np.log(sigma))
            log_w.append(log_px + log_pz - log_qz)
        expected.append(-np.log(np.mean(np.exp(log_w))))
    np.testing.assert_allclose(vae.iw_nll(model, x, eps).numpy(), expected, rtol=1e-4)


def test_vae_run_modes_and_iw_bound(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    history = vae.train(make_config(vae, data_dir, tmp_path, z_dim=2, beta=2.0, iw_samples=50))
    assert [row["beta"] for row in history] == [2.0, 2.0]
    for name in ("rec", "sample", "manifold"):
        assert png(tmp_path / f"{name}_epoch_002.png") == ("L", (280, 280))
    assert png(tmp_path / "interpolation.png") == ("L", (280, 280))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["iw_samples"] == 50 and summary["flags"]["beta"] == 2.0
    assert summary["test_neg_elbo"] == pytest.approx(history[-1]["test_loss"])
    assert summary["test_nll_iw"] < summary["test_neg_elbo"]


def test_latent_grid_walks_the_normal_quantiles():
    z = vae.latent_grid().numpy()
    assert z.shape == (100, 2)
    assert z[0, 0] == pytest.approx(-1.6449, abs=1e-3) and z[0, 1] == pytest.approx(1.6449, abs=1e-3)
    assert z[99, 0] == pytest.approx(1.6449, abs=1e-3) and z[99, 1] == pytest.approx(-1.6449, abs=1e-3)
    assert np.all(np.diff(z[:10, 0]) > 0) and np.all(z[:10, 1] == z[0, 1])
