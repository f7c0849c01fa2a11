"""--arch conv: the convolutional models of both scripts, for any image size and channel count,
trained, resumed, exported and applied like the MLPs."""

import csv
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import ae
import utils
import vae
from conftest import eager_epoch, main, make_config
from test_runs import check_resume_from_two_epochs_before_the_end, read_history


def conv_model(script, shape, code=3, filters=32):
    return script.build_model({"h_dim": code, "z_dim": code, "arch": "conv", "filters": filters}, shape)


@pytest.mark.parametrize("shape", [(7, 7, 1), (13, 11, 3), (28, 28, 1), (30, 17, 3)])
@pytest.mark.parametrize("script", [ae, vae])
def test_conv_models_take_and_give_images_of_any_size_and_channels(script, shape):
    model = conv_model(script, shape)
    pixels = int(np.prod(shape))
    x = tf.random.uniform([5, pixels], seed=1)
    codes = model.codes(x)
    assert all(c.shape == (5, 3) for c in codes.values())
    assert model.reconstruct(x).shape == (5, pixels)
    assert model.decode(tf.zeros([4, 3])).shape == (4, pixels)
    assert model.score(x).shape == (5,)
    # convolutions, not the MLP: a 3x3 filter bank of 32 on the image's channels comes first
    assert any(w.shape == (3, 3, shape[2], 32) for w in model.weights)


@pytest.mark.parametrize("script", [ae, vae])
def test_filters_sets_the_width_of_every_convolution_and_of_the_decoders_map(script):
    """--filters F: F and 2F filters in the encoder, a map of F channels, 2F and F in the decoder
    (32: the tutorial's 32, 64; 32; 64, 32), whatever the image size and channels."""
    def widths(filters):
        model = conv_model(script, (13, 11, 3), filters=filters)
        x = tf.random.uniform([2, 13 * 11 * 3], seed=1)
        assert model.reconstruct(x).shape == (2, 13 * 11 * 3)
        kernels = [w.shape for w in model.weights if len(w.shape) == 4]  # encoder, then decoder
        dense_to_map = [w.shape[1] for w in model.weights if len(w.shape) == 2 and w.shape[1] % 16 == 0]
        return [k[3] for k in kernels[:2]] + [k[2] for k in kernels[2:]], dense_to_map
    assert widths(32) == ([32, 64, 64, 32, 3], [4 * 3 * 32])  # transposed kernels: (h, w, out, in)
    assert widths(8) == ([8, 16, 16, 8, 3], [4 * 3 * 8])


def test_the_decoder_crops_the_middle_of_its_map_to_the_images_size():
    """13x10 images: the decoder's map is 16x12 (4 x ceil(13 / 4) by 4 x ceil(10 / 4)), cropped
    by one row above and two below, one column on each side."""
    hidden, output = utils.conv_decoder((13, 10, 2))
    z = tf.random.normal([2, 5], seed=3)
    keras.utils.set_random_seed(4)
    uncropped = output[0](keras.Sequential(hidden)(z))
    assert uncropped.shape == (2, 16, 12, 2)
    cropped = keras.Sequential(output[1:])(uncropped)
    np.testing.assert_array_equal(cropped.numpy().reshape(2, 13, 10, 2), uncropped[:, 1:14, 1:11])


def test_an_image_too_small_for_two_strided_convolutions_is_refused_in_one_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (150, 6, 9), dtype=np.uint8)
    np.savez(tmp_path / "small.npz", x_train=x[:100], x_test=x[100:])
    out = tmp_path / "run"
    code, err, _ = main(capsys, ae, "--dataset", tmp_path / "small.npz", "--out", out,
                        "--arch", "conv", "--epochs", "1", "--batch-size", "10")
    assert code == 2 and len(err) == 1
    assert "--arch conv needs images of at least 7x7 pixels" in err[0] and "6x9" in err[0]
    assert not out.exists()
    # 7x9 is enough
    x = rng.integers(0, 256, (150, 7, 9), dtype=np.uint8)
    np.savez(tmp_path / "seven.npz", x_train=x[:100], x_test=x[100:])
    code, err, _ = main(capsys, vae, "--dataset", tmp_path / "seven.npz", "--out", out,
                        "--arch", "conv", "--epochs", "1", "--batch-size", "10", "--iw-samples", "2",
                        "--fd-samples", "0")
    assert code == 0, err


def test_a_convolutional_epoch_trains_as_a_plain_eager_loop_does():
    """The oracle: the tutorial's loop, one eager step per batch of the same permutation, for
    the convolutional VAE, its epoch compiled as a graph without XLA on a CPU."""
    config = vae.make_parser().parse_args(["--z-dim", "3", "--arch", "conv"])
    x_train = np.random.default_rng(0).integers(0, 256, (50, 13 * 11 * 3), dtype=np.uint8)
    assert not utils.use_xla("conv") and not tf.config.list_physical_devices("GPU")

    def setup():
        keras.utils.set_random_seed(1)
        model = conv_model(vae, (13, 11, 3))
        optimizer = keras.optimizers.Adam(config.lr)
        optimizer.build(model.trainable_variables)
        return model, optimizer, tf.random.Generator.from_seed(2)

    model, optimizer, generator = setup()
    epoch = utils.compile_epoch(vae.make_train_step(config, model, optimizer, generator),
                                ["loss"], generator, 16, xla=utils.use_xla("conv"))
    compiled = float(epoch(tf.constant(x_train))[0]["loss"])

    model2, optimizer2, generator2 = setup()
    step = vae.make_train_step(config, model2, optimizer2, generator2)
    # batches of 16, 16, 16, then 2
    eager = eager_epoch(step, generator2, x_train, 16, "loss", xla=utils.use_xla("conv"))
    assert compiled == pytest.approx(eager, rel=1e-4)
    for a, b in zip(model.weights, model2.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_log_px_given_z_is_the_negated_bce_of_each_decoding(arch):
    model = vae.build_model({"z_dim": 2, "arch": arch, "filters": 32}, (8, 7, 1))
    for layer in model.fc5.weights:  # biases other than their initial zeros
        layer.assign(tf.random.normal(layer.shape, seed=8))
    x = tf.random.uniform([3, 56], seed=5)
    z = tf.random.normal([4, 3, 2], seed=6)
    expected = -tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.broadcast_to(x, [4, 3, 56]), logits=tf.reshape(model.decode(tf.reshape(z, [12, 2])),
                                                                 [4, 3, 56])), axis=-1)
    np.testing.assert_allclose(vae.log_px_given_z(model, x, z), expected, rtol=1e-4)


def test_mean_in_chunks_weights_each_chunk_by_its_size():
    x = tf.reshape(tf.range(10, dtype=tf.float32), [10, 1])
    fn = lambda rows: {"mean": tf.reduce_mean(rows), "square": tf.reduce_mean(rows ** 2)}  # noqa: E731
    for chunk in (None, 3, 4, 10, 20):  # the last chunk short, or all at once
        result = utils.mean_in_chunks(fn, chunk, x)
        assert float(result["mean"]) == pytest.approx(4.5)
        assert float(result["square"]) == pytest.approx(28.5)


# --- whole runs -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def conv_runs(tiny_data, tmp_path_factory):
    """Three-epoch --arch conv runs of both scripts on the tiny data, ae.py's an adversarial
    denoiser with both end-of-run extras, vae.py's of --filters 8, each call of the models on at
    most 30 images: {script: (out, config)}."""
    runs, compile_epoch, xla = {}, utils.compile_epoch, []

    def spy(*args, **kwargs):  # how each run's epoch is compiled
        xla.append(kwargs.get("xla", True))
        return compile_epoch(*args, **kwargs)

    utils.compile_epoch = spy
    rows_per_call = utils.rows_per_call  # parts of 30 of the 100 test images: 30, 30, 30, 10
    utils.rows_per_call = lambda arch, shape, filters: None if arch == "mlp" else 30
    try:
        for script, flags in ((ae, dict(h_dim=4, adversarial=True, noise=0.3, compare_pca=True,
                                        export_codes=True)),
                              (vae, dict(z_dim=3, filters=8))):
            out = tmp_path_factory.mktemp(script.__name__) / "run"
            config = make_config(script, tiny_data[0], out, epochs=3, arch="conv", lr=3e-3, **flags)
            script.train(config)
            runs[script] = out, config
    finally:
        utils.compile_epoch, utils.rows_per_call = compile_epoch, rows_per_call
    runs["xla"] = xla
    return runs


def test_a_convolutional_epoch_on_a_cpu_is_a_graph_without_xla(conv_runs):
    """XLA's convolutions on a CPU are many times slower than TensorFlow's graph (oneDNN)."""
    assert not tf.config.list_physical_devices("GPU")
    assert conv_runs["xla"] == [False, False]
    assert utils.use_xla("mlp")


@pytest.mark.parametrize("script", [ae, vae])
def test_a_convolutional_run_resumes_exactly(script, conv_runs, tmp_path, monkeypatch):
    out, config = conv_runs[script]
    monkeypatch.setattr(utils, "rows_per_call", lambda arch, shape, filters: 30)  # as the runs had it
    check_resume_from_two_epochs_before_the_end(script, config, out, tmp_path)


def test_a_convolutional_run_learns_and_writes_what_an_mlp_run_does(conv_runs):
    out, _ = conv_runs[ae]
    rows = read_history(out)
    assert float(rows[-1]["test_bce"]) < float(rows[0]["test_bce"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flags"]["arch"] == "conv"
    assert 0 < summary["pca_vs_ae"]["ae"]["bce"] < np.log(2)  # what an untrained model scores
    with np.load(out / "codes.npz") as codes:
        assert codes["train_codes"].shape == (600, 4) and codes["test_codes"].shape == (100, 4)
    for name in ("progress.gif", "ae.keras", "saved_model", "pca_vs_ae.png", "rec_epoch_003.png",
                 "sample_epoch_003.png"):
        assert (out / name).exists(), name
    out, _ = conv_runs[vae]
    summary = json.loads((out / "summary.json").read_text())
    assert np.isfinite(summary["test_nll_iw"]) and summary["test_nll_iw"] < summary["test_neg_elbo"] + 1


@pytest.mark.parametrize("script", [ae, vae])
def test_a_convolutional_runs_test_loss_is_that_of_the_whole_test_set_at_once(script, conv_runs,
                                                                             tiny_data):
    """The test figures come from parts of 30 images: together, the whole test set's."""
    out, config = conv_runs[script]
    flags = json.loads((out / "run.json").read_text())["flags"]
    model = script.build_model(flags, [28, 28, 1])
    model.load_weights(out / script.SCRIPT.weights)
    x = tf.constant(tiny_data[1][1][0].reshape(100, -1), tf.float32) / 255.0
    last = read_history(out)[-1]
    if script is ae:  # a denoiser: the test inputs are noisy, drawn once from the seed
        x_in = ae.corrupt(x, config.noise, tf.random.stateless_normal(x.shape, seed=[config.seed, 1]))
        expected = {"test_bce": ae.compute_loss(model, x_in, x)["bce"]}
    else:  # the test set's eps, kept in the checkpoints
        eps = tf.Variable(tf.zeros([100, config.z_dim]))
        tf.train.Checkpoint(eps_test=eps).restore(
            tf.train.latest_checkpoint(str(out / "checkpoints"))).expect_partial()
        losses = vae.compute_loss(model, x, eps)
        expected = {"test_loss": losses["loss"], "test_kl": losses["kl"]}
    for name, value in expected.items():
        assert float(last[name]) == pytest.approx(float(value), rel=1e-5), name


def test_resume_refuses_another_arch_or_width(conv_runs, capsys):
    out, _ = conv_runs[ae]
    code, err, _ = main(capsys, ae, "--out", out, "--resume", "--arch", "mlp", "--epochs", "4")
    assert code == 2 and len(err) == 1 and "--arch mlp differs from the run" in err[0], err
    code, err, _ = main(capsys, ae, "--out", out, "--resume", "--filters", "16", "--epochs", "4")
    assert code == 2 and len(err) == 1 and "--filters 16 differs from the run" in err[0], err
    assert len(read_history(out)) == 3
    out, _ = conv_runs[vae]  # of --filters 8, which the user does not give again
    code, err, _ = main(capsys, vae, "--out", out, "--resume", "--arch", "mlp", "--epochs", "4")
    assert code == 2 and len(err) == 1 and "--arch mlp differs from the run" in err[0], err


def test_filters_without_arch_conv_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    code, err, _ = main(capsys, vae, "--out", out, "--filters", "64", "--epochs", "1")
    assert code == 2 and err == ["vae.py: error: --filters sets the width of --arch conv; add "
                                 "--arch conv, or leave --filters out"]
    assert not out.exists()


@pytest.mark.parametrize("script", [ae, vae])
def test_a_conv_model_of_another_width_loads_from_its_keras_file_as_it_was(script, tmp_path):
    model = conv_model(script, (9, 8, 1), filters=8)
    x = tf.random.uniform([3, 72], seed=2)
    expected = model.reconstruct(x).numpy()
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.filters == 8
    np.testing.assert_allclose(loaded.reconstruct(x), expected, rtol=1e-5)


@pytest.mark.parametrize("script", [ae, vae])
def test_a_convolutional_model_loads_from_its_files_and_applies(script, conv_runs, tiny_data,
                                                                tmp_path, capsys):
    out, config = conv_runs[script]
    images = tiny_data[1][1][0][:, :, :, None]
    x = tf.constant(images.reshape(100, -1), tf.float32) / 255.0
    flags = json.loads((out / "run.json").read_text())["flags"]
    trained = script.build_model(flags, [28, 28, 1])
    trained.load_weights(out / script.SCRIPT.weights)
    loaded = keras.models.load_model(out / script.SCRIPT.keras)
    assert loaded.arch == "conv" and loaded.filters == flags["filters"] == config.filters
    saved = tf.saved_model.load(str(out / "saved_model"))
    expected = trained.score(x).numpy()
    np.testing.assert_allclose(loaded.score(x), expected, rtol=1e-5)
    np.testing.assert_allclose(saved.score(images)["score"], expected, rtol=1e-5)
    name = sorted(trained.codes(x))[0]
    np.testing.assert_allclose(saved.encode(images)[name], trained.codes(x)[name], rtol=1e-5, atol=1e-6)
    np.savez(tmp_path / "x.npz", x_train=images[:50, :, :, 0], x_test=images[50:, :, :, 0])
    code, err, _ = main(capsys, script, "--out", out, "--apply", tmp_path / "x.npz",
                        "--to", tmp_path / "applied")
    assert code == 0, err
    with open(tmp_path / "applied" / "scores.csv", newline="") as f:
        scores = {row["path"]: float(row["score"]) for row in csv.DictReader(f)}
    for i in range(100):
        assert scores[f"x_{'train' if i < 50 else 'test'}/{i % 50}"] == pytest.approx(expected[i], rel=1e-5)


def test_a_run_from_before_arch_continues_as_the_mlp_it_was(tiny_data, tmp_path, monkeypatch, capsys):
    """Runs written before --arch and --filters existed hold neither in their checkpoints and
    run.json."""
    def strip(obj):  # every "arch" and "filters", at any depth (run.json's flags)
        return ({k: strip(v) for k, v in obj.items() if k not in ("arch", "filters")}
                if isinstance(obj, dict) else obj)

    def without_arch(write):
        return lambda obj, *args, **kwargs: write(strip(obj), *args, **kwargs)

    out = tmp_path / "old"
    with monkeypatch.context() as patch:
        patch.setattr(json, "dumps", without_arch(json.dumps))
        patch.setattr(json, "dump", without_arch(json.dump))
        ae.train(make_config(ae, tiny_data[0], out, h_dim=3, epochs=1))
    assert not {"arch", "filters"} & set(json.loads((out / "run.json").read_text())["flags"])
    args = ["--data-dir", tiny_data[0], "--out", out, "--h-dim", "3", "--batch-size", "100",
            "--seed", "1", "--fd-samples", "0"]
    code, err, _ = main(capsys, ae, *args, "--epochs", "2")
    assert code == 2 and "continue it with" in err[0] and "other script" not in err[0], err
    code, err, _ = main(capsys, ae, "--out", out, "--resume", "--epochs", "2")
    assert code == 0, err
    assert [row["epoch"] for row in read_history(out)] == ["1", "2"]
