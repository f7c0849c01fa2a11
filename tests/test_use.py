"""Using a trained run: the .keras file and the SavedModel, --apply, the anomaly score, its
threshold, AUROC and average precision, and --classes."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import ae
import utils
import vae
from conftest import main, make_config, make_images
from tool import anomaly, sources
from tool.lock import lock_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trained(script, out):
    """The model of the finished run in out, as trained: its final weights loaded into a model
    built in this process."""
    flags = json.load(open(os.path.join(out, "run.json")))["flags"]
    model = script.build_model(flags, [28, 28, 1])
    model.load_weights(os.path.join(out, script.SCRIPT.weights))
    return model


@pytest.fixture(scope="module")
def vae_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "run"
    vae.train(make_config(vae, tiny_data[0], out, z_dim=3))
    return str(out)


def images_of(tiny_data, n=20):
    return tiny_data[1][1][0][:n, :, :, None]  # test images, uint8 (n, 28, 28, 1)


def python(code, cwd):
    """Run code in a fresh Python (isolated: no project on its path); its standard output."""
    done = subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# --- the files that load anywhere ---------------------------------------------------------------

@pytest.fixture(scope="module")
def loaded_elsewhere(template_run, vae_run, tiny_data, tmp_path_factory):
    """What one fresh Python made of the two runs' files: first from each SavedModel, before
    anything of the project is importable or imported, then from each .keras file after
    importing the scripts. ({run: {name: array}}, what it printed)."""
    folder = tmp_path_factory.mktemp("elsewhere")
    np.save(folder / "images.npy", images_of(tiny_data))
    runs = {"ae": template_run[0], "vae": vae_run}
    printed = python(
        "import sys, numpy as np, tensorflow as tf\n"
        f"runs = {runs!r}\n"
        "x = np.load('images.npy')\n"
        "for name, out in runs.items():\n"
        "    m = tf.saved_model.load(out + '/saved_model')\n"
        "    codes = m.encode(x)\n"
        "    arrays = dict(rec=m.reconstruct(x)['images'], score=m.score(x)['score'],\n"
        "                  decoded=m.decode(codes[sorted(codes)[0]])['images'], **codes)\n"
        "    if hasattr(m, 'sample'):\n"
        "        arrays['sample'] = m.sample(tf.constant(7), tf.constant(5, tf.int64))['images']\n"
        "    np.savez(name + '-saved.npz', **arrays)\n"
        "    print(name, list(m.signatures))\n"
        "print('project imported:', any(k in sys.modules for k in ('ae', 'vae', 'utils', 'tool')))\n"
        "try:\n"
        "    import ae\n"
        "    print('project importable')\n"
        "except ImportError:\n"
        f"    sys.path.insert(0, {ROOT!r})\n"
        "import ae, vae, keras\n"
        "f = x.reshape(len(x), -1).astype('float32') / 255\n"
        "for name, out in runs.items():\n"
        "    m = keras.models.load_model(f'{out}/{name}.keras')\n"
        "    np.savez(name + '-keras.npz', rec=m.reconstruct(f), score=m.score(f), **m.codes(f))\n",
        folder)
    return {f"{name}-{kind}": dict(np.load(folder / f"{name}-{kind}.npz"))
            for name in runs for kind in ("saved", "keras")}, printed


@pytest.mark.parametrize("script", ["ae", "vae"])
def test_the_keras_file_loads_in_a_fresh_process_with_the_trained_outputs(
        script, loaded_elsewhere, template_run, vae_run, tiny_data):
    module, out = (ae, template_run[0]) if script == "ae" else (vae, vae_run)
    got, model = loaded_elsewhere[0][script + "-keras"], trained(module, out)
    x = utils.to_float(images_of(tiny_data))
    np.testing.assert_allclose(got["rec"], model.reconstruct(x), atol=1e-5)
    for name, value in model.codes(x).items():
        np.testing.assert_allclose(got[name], value, atol=1e-5)
    np.testing.assert_allclose(got["score"], model.score(x), rtol=1e-5)


@pytest.mark.parametrize("script", ["ae", "vae"])
def test_the_saved_model_serves_uint8_images_without_the_project(script, loaded_elsewhere,
                                                                  template_run, vae_run, tiny_data):
    module, out = (ae, template_run[0]) if script == "ae" else (vae, vae_run)
    arrays, printed = loaded_elsewhere
    assert f"{script} ['encode', " in printed and "serving_default" in printed  # encode first
    assert "project imported: False" in printed and "project importable" not in printed
    got, model = arrays[script + "-saved"], trained(module, out)
    images = images_of(tiny_data)
    x = utils.to_float(images)
    codes = {k: v.numpy() for k, v in model.codes(x).items()}
    for name, value in codes.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5)
    np.testing.assert_allclose(got["score"], model.score(x), rtol=1e-5)
    assert got["rec"].dtype == np.uint8 and got["rec"].shape == images.shape
    expected = utils.to_uint8(tf.sigmoid(model.reconstruct(x)), (28, 28, 1)).reshape(images.shape)
    assert np.abs(got["rec"].astype(int) - expected).max() <= 1  # float rounding at .5
    decoded = utils.to_uint8(tf.sigmoid(model.decode(codes[sorted(codes)[0]])), (28, 28, 1))
    assert np.abs(got["decoded"].astype(int) - decoded.reshape(images.shape)).max() <= 1
    assert (script == "vae") == ("sample" in got)  # a plain autoencoder has no prior
    if script == "vae":
        z = tf.random.stateless_normal([7, 3], seed=[5, 0])
        sample = utils.to_uint8(tf.sigmoid(model.decode(z)), (28, 28, 1)).reshape(7, 28, 28, 1)
        assert np.abs(got["sample"].astype(int) - sample).max() <= 1


def test_resume_of_a_finished_run_writes_the_models_it_lacks(finished_run, capsys):
    data_dir, out = finished_run
    os.remove(os.path.join(out, "ae.keras"))
    subprocess.run(["rm", "-r", os.path.join(out, "saved_model")], check=True)
    code, err, _ = main(capsys, ae, "--out", out, "--data-dir", data_dir, "--resume")
    assert code == 0, err
    assert os.path.isfile(os.path.join(out, "saved_model", "saved_model.pb"))
    files = json.load(open(os.path.join(out, "run.json")))["files"]
    assert "ae.keras" in files and "saved_model" in files


# --- the score, its threshold, and how well it tells the held-out classes ---------------------

def test_the_score_is_the_cross_entropy_less_the_images_own_entropy():
    model = ae.AE(3, 4)
    x = np.array([[0.0, 1.0, 0.5, 0.2], [0.3, 0.3, 0.9, 1.0]], np.float32)
    p = tf.sigmoid(model(x)).numpy().astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(x > 0, x * np.log(x / p), 0) + np.where(x < 1, (1 - x) * np.log((1 - x) / (1 - p)), 0)
    np.testing.assert_allclose(model.score(x), kl.sum(1), rtol=1e-5)
    # gray pixels reconstructed exactly cost nothing, however gray
    assert abs(float(utils.excess_bce(tf.constant([[0.5, 0.5]]), tf.zeros([1, 2]))[0])) < 1e-6


def test_the_vae_score_adds_the_kl_term_at_the_codes_mean():
    model = vae.VAE(2, 4)
    model.build([None, 4])
    x = tf.constant([[0.1, 0.9, 0.5, 0.0]])
    mu, log_var = model.encode(x)
    expected = utils.excess_bce(x, model.decode(mu)) + vae.kl_divergence(mu, log_var)
    np.testing.assert_allclose(model.score(x), expected, rtol=1e-6)


def test_auroc_and_average_precision_of_a_hand_computed_example_with_ties():
    labels, scores = [1, 0, 1, 0, 1], [3, 1, 2, 2, 0]
    # anomalies score 3, 2, 0; normal 1, 2: of six pairs, 3 > 1, 3 > 2, 2 > 1 and 2 = 2 (a half)
    assert anomaly.auroc(labels, scores) == pytest.approx(3.5 / 6)
    # thresholds 3, 2 (two images, one anomaly), 1, 0: recall 1/3 at precision 1, 2/3 at 2/3,
    # 2/3 again, then 1 at 3/5
    assert anomaly.average_precision(labels, scores) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert anomaly.auroc([0, 1], [5, 5]) == 0.5
    with pytest.raises(ValueError):
        anomaly.auroc([1, 1], [1, 2])


def test_the_threshold_is_exceeded_by_the_share_asked(template_run, tiny_data):
    out = template_run[0]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["threshold_quantile"] == 0.99
    scores = trained(ae, out).score(utils.to_float(tiny_data[1][1][0][..., None])).numpy()
    assert summary["anomaly_threshold"] == pytest.approx(np.quantile(scores, 0.99), rel=1e-5)
    assert (scores > summary["anomaly_threshold"]).mean() == pytest.approx(0.01, abs=1 / len(scores))
    assert anomaly.threshold(np.arange(101.0), 0.9) == 90.0


def test_classes_keeps_those_classes_in_both_splits_and_holds_the_others_out(tiny_data):
    data_dir, ((x_train, y_train), (x_test, y_test)) = tiny_data
    # 5 is Sandal, named twice; 7 and 8 held out with 6 and 9
    config = make_config(ae, data_dir, "unused", classes=["0", "1", "2", "3", "4", "5", "Sandal"])
    data = sources.load_data(config)
    chosen_train, chosen_test = y_train < 6, y_test < 6
    assert len(data.x_held_out) == (y_test >= 6).sum() > 0
    np.testing.assert_array_equal(data.x_train[..., 0], x_train[chosen_train])
    np.testing.assert_array_equal(data.y_test, y_test[chosen_test])
    np.testing.assert_array_equal(data.x_held_out[..., 0], x_test[~chosen_test])
    assert data.source.endswith("Coat, Sandal")


@pytest.mark.parametrize("classes, message", [
    ("11", "no class '11'"), ("Hat", "no class 'Hat'"), ("3", "at least 50"),
    ("0,1,2,3,4,5,6,7,8,9", "none is left")])
def test_classes_that_cannot_work_are_one_line(tiny_data, tmp_path, capsys, classes, message):
    code, err, _ = main(capsys, ae, "--data-dir", tiny_data[0], "--out", tmp_path / "o",
                        "--classes", classes, "--batch-size", "10")
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not os.path.exists(tmp_path / "o")


def test_a_one_class_run_measures_the_held_out_classes_as_anomalies(tmp_path, capsys):
    # two kinds of image: smooth prototypes (trained on) and checkerboards (held out)
    smooth, _ = make_images(400, 0)
    board = ((np.indices((28, 28)).sum(0) % 2) * 255).astype(np.uint8)
    x = np.concatenate([smooth, np.repeat(board[None], 200, 0)])
    y = np.r_[np.zeros(400, np.int64), np.ones(200, np.int64)]
    test = np.arange(600) % 3 == 0
    np.savez(tmp_path / "d.npz", x_train=x[~test], y_train=y[~test], x_test=x[test], y_test=y[test])
    code, err, printed = main(capsys, ae, "--dataset", tmp_path / "d.npz", "--out", tmp_path / "o",
                              "--classes", "0", "--epochs", "3", "--batch-size", "50",
                              "--fd-samples", "0", "--compare-pca", "--h-dim", "4")
    assert code == 0, err
    summary = json.load(open(tmp_path / "o" / "summary.json"))
    assert summary["held_out_test_images"] == test[400:].sum() and summary["anomaly_auroc"] > 0.99
    assert summary["pca_vs_ae"]["pca"]["anomaly_auroc"] > 0.99
    assert "AUROC" in printed


# --- --apply --------------------------------------------------------------------------------------

def test_apply_gives_the_codes_of_export_codes_and_scores_by_hand(tiny_data, tmp_path, capsys):
    (x_train, y_train), (x_test, y_test) = tiny_data[1]
    np.savez(tmp_path / "d.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    out = tmp_path / "run"
    code, err, _ = main(capsys, ae, "--dataset", tmp_path / "d.npz", "--out", out, "--epochs", "2",
                        "--batch-size", "100", "--fd-samples", "0", "--export-codes", "--h-dim", "5")
    assert code == 0, err
    code, err, printed = main(capsys, ae, "--out", out, "--apply", tmp_path / "d.npz")
    assert code == 0, err
    applied = out / "applied" / "d.npz"
    got = np.load(applied / "codes.npz")
    exported = np.load(out / "codes.npz")
    test_rows = [i for i, p in enumerate(got["paths"]) if p.startswith("x_test/")]
    assert [got["paths"][i] for i in test_rows[:2]] == ["x_test/0", "x_test/1"]
    np.testing.assert_allclose(got["code"][test_rows], exported["test_codes"], atol=1e-5)
    rows = list(csv.DictReader(open(applied / "scores.csv")))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and len(rows) == 700
    model = trained(ae, str(out))
    by_name = {r["path"]: float(r["score"]) for r in rows}
    x = x_test[:5].reshape(5, -1) / 255.0
    p = tf.sigmoid(model(x.astype(np.float32))).numpy().astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(x > 0, x * np.log(x / p), 0) + np.where(x < 1, (1 - x) * np.log((1 - x) / (1 - p)), 0)
    np.testing.assert_allclose([by_name[f"x_test/{i}"] for i in range(5)], kl.sum(1), rtol=1e-4)
    threshold = json.load(open(out / "summary.json"))["anomaly_threshold"]
    assert all((r["above_threshold"] == "true") == (float(r["score"]) > threshold) for r in rows)
    assert Image.open(applied / "most_unusual.png").size == (280, 280)


def test_apply_to_a_folder_converts_and_writes_reconstructions_and_samples(vae_run, tmp_path, capsys):
    images = tmp_path / "new"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "sub" / "red.png")
    Image.new("L", (28, 28), 128).save(images / "gray.png")
    code, err, printed = main(capsys, vae, "--out", vae_run, "--apply", images, "--to",
                              tmp_path / "res", "--save-reconstructions", "--generate", "3")
    assert code == 0, err
    assert "1 resized to 28x28 and 1 converted to gray" in printed
    assert sorted(os.listdir(tmp_path / "res" / "generated")) == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(tmp_path / "res" / "reconstructions" / "sub" / "red.png").size == (28, 28)
    codes = np.load(tmp_path / "res" / "codes.npz")
    assert sorted(codes.files) == ["log_var", "mean", "paths"] and list(codes["paths"]) == ["gray.png", "sub/red.png"]


def test_apply_while_the_run_trains_says_so_and_has_no_threshold_yet(template_run, tmp_path, capsys):
    import shutil
    out = str(tmp_path / "run")
    shutil.copytree(template_run[0], out)
    os.remove(os.path.join(out, "summary.json"))
    Image.new("L", (28, 28), 0).save(tmp_path / "one.png")
    lock = lock_folder(out)
    try:
        code, err, printed = main(capsys, ae, "--out", out, "--apply", tmp_path / "one.png")
    finally:
        lock.close()
    assert code == 0, err
    assert "still training" in printed and "no threshold yet" in printed
    rows = list(csv.DictReader(open(os.path.join(out, "applied", "one.png", "scores.csv"))))
    assert [r["path"] for r in rows] == ["one.png"] and rows[0]["above_threshold"] == ""


def test_apply_mistakes_are_one_line_and_write_nothing(template_run, tmp_path, capsys):
    out = template_run[0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    Image.new("L", (28, 28), 0).save(tmp_path / "one.png")
    before = sorted(os.listdir(out))
    for args, message in [
            (["--out", tmp_path / "empty", "--apply", tmp_path / "one.png"], "holds no run"),
            (["--out", out, "--apply", tmp_path / "empty", "--to", tmp_path / "r"], "no image files"),
            (["--out", out, "--apply", tmp_path / "nothing", "--to", tmp_path / "r"], "no such file"),
            (["--out", out, "--apply", tmp_path / "one.png", "--to", tmp_path / "file"], "is a file"),
            (["--out", out, "--apply", tmp_path / "file", "--to", tmp_path / "r"],  # was numpy's
             "neither an image file (.png, .jpg"),  # advice to load it as a pickle
            (["--out", out, "--apply", tmp_path / "one.png", "--to", out], "holds the run"),
            (["--out", out, "--apply", tmp_path / "one.png", "--to", tmp_path], "holds --apply's"),
            (["--out", out, "--apply", tmp_path / "one.png", "--to", os.path.join(out, "checkpoints")],
             "inside the run's folder"),
            (["--out", out, "--apply", tmp_path / "one.png", "--to", os.path.join(out, "codes.npz")],
             "inside the run's folder"),  # a file the run may write later
            (["--out", out, "--apply", tmp_path / "one.png", "--to", os.path.join(out, ".tmp-a-b")],
             "inside the run's folder"),  # what a resume clears away
            (["--out", out, "--to", tmp_path / "r"], "go with --apply"),
            (["--out", out, "--apply", tmp_path / "one.png", "--generate", "2", "--to", tmp_path / "r"],
             "needs a model with a prior"),
            (["--out", out, "--apply", tmp_path / "one.png", "--epochs", "3", "--to", tmp_path / "r"],
             "leave it out")]:
        code, err, _ = main(capsys, ae, *args)
        assert code == 2 and len(err) == 1 and message in err[0], (args, err)
    code, err, _ = main(capsys, vae, "--out", out, "--apply", tmp_path / "one.png", "--to", tmp_path / "r")
    assert code == 2 and len(err) == 1 and "other script" in err[0], err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text(open(os.path.join(out, "run.json")).read())
    code, err, _ = main(capsys, ae, "--out", tmp_path / "broken", "--apply", tmp_path / "one.png")
    assert code == 2 and len(err) == 1 and "no checkpoint" in err[0] and "--resume" not in err[0], err
    assert sorted(os.listdir(tmp_path / "broken")) == ["run.json"]
    assert sorted(os.listdir(out)) == before and not os.path.exists(tmp_path / "r")
    code, err, _ = main(capsys, ae, "--out", out, "--apply", tmp_path / "one.png", "--to", tmp_path / "r")
    assert code == 0, err
    code, err, _ = main(capsys, ae, "--out", out, "--apply", tmp_path / "one.png", "--to", tmp_path / "r")
    assert code == 2 and "already exists" in err[0] and "--overwrite" in err[0]


def test_apply_to_the_current_folder_names_its_results_after_it(template_run, tmp_path, capsys,
                                                                 monkeypatch):
    import shutil
    out = str(tmp_path / "run")
    shutil.copytree(template_run[0], out)
    (tmp_path / "shots").mkdir()
    Image.new("L", (28, 28), 0).save(tmp_path / "shots" / "one.png")
    monkeypatch.chdir(tmp_path / "shots")
    for _ in range(2):  # the second replaces the first's results, and only them
        code, err, _ = main(capsys, ae, "--out", out, "--apply", ".", "--overwrite")
        assert code == 0, err
    assert os.listdir(os.path.join(out, "applied")) == ["shots"]


def test_apply_on_a_full_disk_leaves_no_half_written_results(template_run, tmp_path, capsys,
                                                              monkeypatch):
    import errno
    Image.new("L", (28, 28), 0).save(tmp_path / "one.png")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)  # most_unusual.png, after codes and scores
    to = tmp_path / "a" / "b"
    code, err, _ = main(capsys, ae, "--out", template_run[0], "--apply", tmp_path / "one.png",
                        "--to", to)
    assert code == 2 and len(err) == 1 and "No space left" in err[0] and "nothing" in err[0], err
    assert not os.path.exists(tmp_path / "a")  # not even the folders made for it


def test_ctrl_c_during_apply_is_one_line_and_leaves_nothing(template_run, tmp_path, capsys,
                                                             monkeypatch):
    from tool import apply
    Image.new("L", (28, 28), 0).save(tmp_path / "one.png")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(apply, "write_results", interrupted)  # once the folder is being written
    code, err, _ = main(capsys, ae, "--out", template_run[0], "--apply", tmp_path / "one.png",
                        "--to", tmp_path / "a" / "r")
    assert code == 130 and err == ["ae.py: stopped by SIGINT; --apply wrote nothing"], err
    assert not os.path.exists(tmp_path / "a")
