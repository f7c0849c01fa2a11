"""The tutorial's other autoencoders and measurements: denoising, adversarial, codes, PCA, beta,
the importance-weighted likelihood, the latent map and interpolations."""

import json

import numpy as np
import pytest
import keras
import tensorflow as tf
from PIL import Image

import ae
import utils
import tool.codes
import vae
from conftest import main, make_config


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


def test_the_denoiser_cleans_noisy_inputs_better_than_a_plain_autoencoder(autoencoders):
    plain, denoising = autoencoders["plain"][1], autoencoders["denoising"][1]
    assert denoising["test_bce_from_noisy"] < plain["test_bce_from_noisy"] - 0.005
    assert denoising["identity_bce_noisy"] == plain["identity_bce_noisy"]  # the same test noise


def test_triplet_grid_puts_noisy_output_clean_side_by_side():
    noisy, outputs, clean = (np.full((30, 784), v / 255.0) + np.arange(30)[:, None] / 255.0
                             for v in (0, 100, 200))
    grid = utils.triplet_grid(noisy, outputs, clean, (28, 28, 1))
    for k in range(100):
        r, c = divmod(k, 10)
        i, which = 3 * r + c // 3, c % 3
        expected = 0 if c == 9 else 100 * which + i  # the tenth column stays black
        assert (grid[k] == expected).all(), (r, c)


def test_denoising_run_writes_triplet_grids(autoencoders):
    out = autoencoders["denoising"][0]
    grid = np.array(Image.open(out / "rec_epoch_010.png")).reshape(10, 28, 10, 28)
    # the noisy inputs (columns 0, 3, 6) are the clean originals (2, 5, 8) plus noise
    noisy, clean = grid[:, :, 0:9:3].astype(float), grid[:, :, 2:9:3].astype(float)
    assert 0.2 * 255 < np.std(noisy - clean) < 0.5 * 255


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


def test_adversarial_codes_end_nearer_the_prior_than_a_plain_autoencoders(autoencoders):
    out, adversarial, _ = autoencoders["adversarial"]
    plain = autoencoders["denoising"][1]  # the same but for the adversarial part
    assert adversarial["code_mean_abs"] < plain["code_mean_abs"] / 1.5
    assert adversarial["code_std_dev_from_1"] < plain["code_std_dev_from_1"] / 3
    assert {"train_disc", "train_gen"} <= set(adversarial["final"])
    assert png(out / "sample_epoch_010.png") == ("L", (280, 280))


def test_with_batch_moments_appends_the_batch_mean_and_covariance():
    z = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32) * [1, 2, 3] + [0, 1, -1]
    z[:, 2] += z[:, 0]  # a correlated pair
    out = ae.with_batch_moments(tf.constant(z)).numpy()
    covariance = np.cov(z.T, bias=True)
    expected = np.concatenate([z.mean(axis=0), covariance[np.triu_indices(3)]])
    assert out.shape == (50, 3 + 3 + 6)
    np.testing.assert_allclose(out[:, :3], z)
    np.testing.assert_allclose(out[:, 3:], np.tile(expected, (50, 1)), rtol=1e-5, atol=1e-5)


def slope_at(discriminator, z):
    with tf.GradientTape() as tape:
        tape.watch(z)
        total = tf.reduce_sum(discriminator(z))
    return float(tf.reduce_mean(tf.reduce_sum(tf.square(tape.gradient(total, z)), axis=-1)))


def test_the_r1_penalty_keeps_the_discriminator_flat_at_the_prior(monkeypatch):
    x, z_prior = tf.random.uniform([64, 784], seed=2), tf.random.normal([64, 2], seed=4)
    slopes = {}
    for weight in (0.0, 10.0):
        monkeypatch.setattr(ae, "R1_WEIGHT", weight)
        keras.utils.set_random_seed(0)
        model, discriminator = ae.AE(2), ae.make_discriminator()
        model(x)
        discriminator(z_prior)
        optimizer = keras.optimizers.SGD(0.05)
        for _ in range(15):
            ae.discriminator_step(model, discriminator, optimizer, x, z_prior)
        slopes[weight] = slope_at(discriminator, z_prior)
    assert slopes[10.0] < slopes[0.0] / 2


def test_the_discriminator_learns_to_tell_prior_from_codes_and_the_encoder_to_fool_it():
    """The labels' direction: prior samples are real (1), codes fake (0), and the encoder's
    update raises the discriminator's belief that its codes are real."""
    tf.random.set_seed(0)
    config = ae.make_parser().parse_args(["--adversarial", "--h-dim", "2", "--lr", "0.01"])
    model, discriminator = ae.AE(2), ae.make_discriminator()
    x = tf.random.uniform([64, 784], seed=2)
    model(x)
    discriminator(tf.zeros([1, 2]))
    optimizers = ae.make_optimizers(config, model, 10, discriminator)
    z_prior = tf.random.normal([64, 2], seed=4)
    for _ in range(20):
        ae.discriminator_step(model, discriminator, optimizers["disc_optimizer"], x, z_prior)
    real, fake = discriminator(z_prior), discriminator(model.encoder(x))
    assert float(tf.reduce_mean(real)) > float(tf.reduce_mean(fake))
    for _ in range(5):
        ae.generator_step(model, discriminator, optimizers["gen_optimizer"], x)
    assert float(tf.reduce_mean(discriminator(model.encoder(x)))) > float(tf.reduce_mean(fake))


def spy_gradients(monkeypatch, optimizer):
    """Record the gradients optimizer is asked to apply."""
    seen = []
    real = optimizer.apply_gradients

    def apply(pairs):
        pairs = list(pairs)
        seen.append([g.numpy() for g, _ in pairs])
        return real(pairs)

    monkeypatch.setattr(optimizer, "apply_gradients", apply)
    return seen


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_the_training_step_descends_the_loss_chosen(monkeypatch, loss):
    config = ae.make_parser().parse_args(["--h-dim", "3", "--loss", loss])
    model = ae.AE(3)
    x = tf.random.uniform([8, 784], seed=1)
    model(x)
    optimizers = ae.make_optimizers(config, model, 10)
    with tf.GradientTape() as tape:  # the oracle: the chosen loss by hand
        p = tf.sigmoid(model(x))
        by_hand = {"bce": -tf.reduce_mean(x * tf.math.log(p) + (1 - x) * tf.math.log(1 - p)),
                   "mse": tf.reduce_mean((p - x) ** 2)}[loss]
    expected = tape.gradient(by_hand, model.trainable_variables)
    seen = spy_gradients(monkeypatch, optimizers["optimizer"])
    ae.make_train_step(config, model, optimizers, tf.random.Generator.from_seed(1))(x)
    for got, want in zip(seen[0], expected):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=1e-7)


def test_code_statistics():
    rng = np.random.default_rng(0)
    codes = rng.normal([3.0, -1.0], [2.0, 0.5], size=(200_000, 2))
    stats = tool.codes.code_statistics(codes)
    assert stats["code_mean_abs"] == pytest.approx((3 + 1) / 2, abs=0.01)
    assert stats["code_std_dev_from_1"] == pytest.approx((1 + 0.5) / 2, abs=0.01)


# --- codes and PCA -----------------------------------------------------------------------------

def test_pca_reconstructs_data_in_a_k_dimensional_subspace_exactly():
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(50, 3)))[0].T  # 3 orthonormal directions in 50-D
    x = 5.0 + rng.normal(size=(400, 3)) @ basis
    mean, components = tool.codes.fit_pca(x, 3)
    reconstruction = ((x - mean) @ components.T) @ components + mean
    np.testing.assert_allclose(reconstruction, x, atol=1e-9)
    np.testing.assert_allclose(components @ components.T, np.eye(3), atol=1e-12)
    _, two = tool.codes.fit_pca(x, 2)
    assert np.abs(((x - mean) @ two.T) @ two + mean - x).max() > 0.01  # one direction short


@pytest.mark.parametrize("n, d", [(500, 40), (30, 40)])  # the scatter matrix; the SVD of fewer rows
def test_pca_of_uint8_pixels_in_chunks_is_the_svd_of_the_centred_floats(n, d):
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(n, 5)) @ rng.normal(size=(5, d)) * 20 + 128
         + rng.normal(size=(n, d)) * 3).clip(0, 255).astype(np.uint8)
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = 4
    for chunk in (7, 4096):
        mean, components = tool.codes.fit_pca(x, k, chunk=chunk)
        np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
        signs = np.sign((components * vt[:k]).sum(1))  # the same direction, either way round
        np.testing.assert_allclose(components, vt[:k] * signs[:, None], atol=1e-8)
        top = components[np.arange(k), np.abs(components).argmax(1)]
        assert (top > 0).all()  # signed as the docstring says, so runs agree


def test_pca_of_many_rows_takes_no_float_copy_of_them():
    """The PCA of a big training set (--compare-pca) must not need a float64 copy of it (8 times
    its uint8 pixels), only the d x d scatter matrix and a chunk."""
    import tracemalloc
    x = np.random.default_rng(5).integers(0, 256, (20000, 64), dtype=np.uint8)
    tracemalloc.start()
    tool.codes.fit_pca(x, 3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < x.size * 8 / 2, peak


def test_compare_pca_beyond_the_memory_limit_is_refused_before_the_run_starts(tiny_data, tmp_path, capsys):
    data_dir, _ = tiny_data  # the PCA alone fits in 30 MiB; beside the data, it does not
    out = tmp_path / "run"
    code, err, _ = main(capsys, ae, "--data-dir", data_dir, "--out", out, "--max-memory", "30M",
                        "--compare-pca")
    assert code == 2 and len(err) == 1
    assert err[0].startswith("ae.py: error: --compare-pca: the PCA of 600 images of 784 values "
                             "needs about 28.7 MiB of memory beside the 1.8 MiB the run holds, more "
                             "than --max-memory (30.0 MiB)")
    assert not out.exists()


def test_knn_accuracy_on_separable_and_on_mixed_classes():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 300)
    codes = labels[:, None] * 10.0 + rng.normal(size=(300, 2))
    assert tool.codes.knn_accuracy(codes[:200], labels[:200], codes[200:], labels[200:]) == 1.0
    shuffled = rng.permutation(labels)
    assert tool.codes.knn_accuracy(codes[:200], shuffled[:200], codes[200:], shuffled[200:]) < 0.6


def test_knn_counts_all_k_neighbours():
    """Two codes of class 0 nearest, three of class 1 next: five neighbours vote 1, while
    counting three (0, 0, 1) or four (a tie, to the nearer class) would give 0."""
    train = np.array([[1.0], [-1.0], [2.0], [-2.0], [2.5], [50.0], [-50.0]])
    labels = np.array([0, 0, 1, 1, 1, 0, 0])
    assert tool.codes.knn_accuracy(train, labels, np.zeros((1, 1)), np.array([1]), k=5) == 1.0
    assert tool.codes.knn_accuracy(train, labels, np.zeros((1, 1)), np.array([0]), k=3) == 1.0


def test_knn_among_duplicate_codes_takes_the_earliest_whatever_the_chunk():
    """Icon sets hold many copies of one image, so codes repeat: of codes at the same distance,
    the earlier ones count, however many test codes go at a time."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        point = rng.normal(size=20) * 30  # large codes: rounded distances of copies may differ
        far = rng.normal(size=(500, 20)) * 30 + 1000
        # more copies than any fixed shortlist would hold
        train = np.concatenate([far[:250], np.tile(point, (5, 1)), far[250:], np.tile(point, (100, 1))])
        labels = np.concatenate([np.zeros(250, int), np.full(5, 3), np.zeros(250, int), np.ones(100, int)])
        for test in (np.tile(point, (40, 1)), point + rng.normal(size=(40, 20)) * 1e-3):
            for chunk in (1, 7, 256):
                assert tool.codes.knn_accuracy(train, labels, test, np.full(40, 3), chunk=chunk) == 1.0


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
    # PCA's figures as NumPy's SVD of the pixels in [0, 1] gives them
    x, t = (a.reshape(len(a), -1) / 255.0 for a in (x_train, x_test))
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    rec = np.clip((t - x.mean(0)) @ vt[:3].T @ vt[:3] + x.mean(0), 0, 1)
    p = np.clip(rec, 1e-7, 1 - 1e-7)
    assert figures["pca"]["mse"] == pytest.approx(np.mean((rec - t) ** 2), rel=1e-4)
    assert figures["pca"]["bce"] == pytest.approx(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)),
                                                  rel=1e-3)
    mode, (width, height) = png(tmp_path / "pca_vs_ae.png")
    assert mode == "RGB" and width > 2 * height
    assert json.loads((tmp_path / "summary.json").read_text())["pca_vs_ae"] == figures


# --- VAE: beta, importance weighting, latent map, interpolation --------------------------------

@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_the_vae_step_descends_rec_plus_beta_kl(monkeypatch, beta):
    config = vae.make_parser().parse_args(["--z-dim", "3", "--beta", str(beta)])
    model = vae.VAE(3)
    x = tf.random.uniform([8, 784], seed=1)
    model(x, tf.zeros([8, 3]))
    optimizer = keras.optimizers.Adam(config.lr)
    generator = tf.random.Generator.from_seed(5)
    twin = tf.random.Generator.from_state(generator.state.read_value(), generator.algorithm)
    eps = twin.normal([8, 3])  # what the step will draw
    with tf.GradientTape() as tape:  # the oracle: the beta-VAE objective by hand
        logits, mu, log_var = model(x, eps)
        p = tf.sigmoid(logits)
        rec = -tf.reduce_mean(tf.reduce_sum(x * tf.math.log(p) + (1 - x) * tf.math.log(1 - p), 1))
        kl = tf.reduce_mean(0.5 * tf.reduce_sum(mu ** 2 + tf.exp(log_var) - 1 - log_var, 1))
        objective = rec + beta * kl
    expected = tape.gradient(objective, model.trainable_variables)
    seen = spy_gradients(monkeypatch, optimizer)
    vae.make_train_step(config, model, optimizer, generator)(x)
    for got, want in zip(seen[0], expected):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=1e-6)



def test_log_mean_exp_matches_direct_computation_and_stays_finite():
    a = np.random.default_rng(3).normal(size=(7, 5)) * 3
    np.testing.assert_allclose(vae.log_mean_exp(tf.constant(a), axis=0),
                               np.log(np.mean(np.exp(a), axis=0)), rtol=1e-12)
    big = tf.constant([[-1000.0, -1001.0], [-1000.0, -999.0]])
    np.testing.assert_allclose(vae.log_mean_exp(big, axis=0),
                               [-1000.0, -1000.0 + np.log((np.exp(-1) + np.exp(1)) / 2)], rtol=1e-6)


def test_iw_estimate_agrees_with_a_direct_computation():
    model = vae.VAE(z_dim=2)
    x = tf.random.uniform([3, 784], seed=5)  # pixels in [0, 1], not only 0 and 1
    eps = tf.random.normal([4, 3, 2], seed=6, dtype=tf.float32)
    model(x, eps[0])
    for layer in (model.fc4, model.fc5):  # biases other than their initial zeros
        layer.bias.assign(tf.random.normal(layer.bias.shape, seed=8))
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


def test_iw_estimate_of_a_test_set_is_the_mean_over_every_image_in_any_parts():
    model = vae.VAE(z_dim=2)
    x = tf.random.uniform([7, 784], seed=7)
    model(x, tf.zeros([7, 2]))
    # noise drawn for chunks of 3 images (3 x 4 samples x 784 pixels), as the estimate draws it
    eps = [tf.random.stateless_normal([4, len(x[i:i + 3]), 2], seed=[9, k])
           for k, i in enumerate(range(0, 7, 3))]
    expected = np.mean(np.concatenate([vae.iw_nll(model, x[i:i + 3], e).numpy()
                                       for i, e in zip(range(0, 7, 3), eps)]))
    for decoded in (4, 8, 12):  # parts of 1, 2 (the last one short) and 3 images
        estimate = vae.test_nll_iw(model, x, 4, 9, drawn_pixels=3 * 4 * 784, decoded=decoded)
        assert estimate == pytest.approx(expected, rel=1e-6)


def test_latent_grid_walks_the_normal_quantiles():
    z = vae.latent_grid().numpy()
    assert z.shape == (100, 2)
    assert z[0, 0] == pytest.approx(-1.6449, abs=1e-3) and z[0, 1] == pytest.approx(1.6449, abs=1e-3)
    assert z[99, 0] == pytest.approx(1.6449, abs=1e-3) and z[99, 1] == pytest.approx(-1.6449, abs=1e-3)
    assert np.all(np.diff(z[:10, 0]) > 0) and np.all(z[:10, 1] == z[0, 1])
