"""The generators' figures: how Gaussian the codes are, and the Frechet distance of samples."""

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest

import tool.codes
import tool.data
import tool.quality


# --- code statistics ------------------------------------------------------------------------------

def test_a_standard_normal_sample_scores_near_zero():
    codes = np.random.default_rng(0).standard_normal((20000, 8))
    stats = tool.codes.code_statistics(codes)
    assert stats["code_mean_abs"] < 0.02 and stats["code_std_dev_from_1"] < 0.02
    assert stats["code_ks"] < 0.01 and stats["code_abs_correlation"] < 0.02


def test_a_shifted_or_scaled_sample_has_the_kolmogorov_smirnov_distance_of_its_law():
    rng = np.random.default_rng(1)
    shifted = rng.standard_normal((20000, 4)) + 0.5
    # sup |Phi(x - 0.5) - Phi(x)| is at x = 0.25: Phi(0.25) - Phi(-0.25) = 0.1974
    assert tool.codes.code_statistics(shifted)["code_ks"] == pytest.approx(0.1974, abs=0.01)
    wide = rng.standard_normal((20000, 4)) * 2
    # sup |Phi(x / 2) - Phi(x)| where the densities cross, x = sqrt(8 ln 2 / 3) = 1.3595:
    # Phi(1.3595) - Phi(0.6797) = 0.9130 - 0.7517 = 0.1613
    assert tool.codes.code_statistics(wide)["code_ks"] == pytest.approx(0.1613, abs=0.01)


def test_correlated_dimensions_show_in_the_mean_absolute_correlation():
    rng = np.random.default_rng(2)
    a, b, c = rng.standard_normal((3, 20000))
    codes = np.stack([a, 0.6 * a + 0.8 * b, -c], 1)  # corr(a, .) = 0.6, the others 0
    stats = tool.codes.code_statistics(codes)
    assert stats["code_abs_correlation"] == pytest.approx(0.6 / 3, abs=0.02)
    assert stats["code_ks"] < 0.02  # each dimension alone is still N(0, 1)


# --- the Frechet distance ---------------------------------------------------------------------------

def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mean1, mean2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = np.sum((mean1 - mean2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)  # 5 + 1 + 0 + 4
    assert tool.quality.frechet_distance(mean1, np.diag(var1), mean2, np.diag(var2)) == pytest.approx(expected)
    assert expected == 10


def test_frechet_distance_of_full_covariances_matches_the_eigenvalues_of_their_product():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 6, 6))
    cov1, cov2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)  # they do not commute
    mean1, mean2 = rng.standard_normal((2, 6))
    # tr((cov1 cov2)^1/2) is the sum of the square roots of cov1 cov2's (real, positive) eigenvalues
    root_trace = np.sum(np.sqrt(np.linalg.eigvals(cov1 @ cov2).real))
    expected = np.sum((mean1 - mean2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * root_trace
    assert tool.quality.frechet_distance(mean1, cov1, mean2, cov2) == pytest.approx(expected, rel=1e-9)
    assert tool.quality.frechet_distance(mean2, cov2, mean1, cov1) == pytest.approx(expected, rel=1e-9)
    assert tool.quality.frechet_distance(mean1, cov1, mean1, cov1) == pytest.approx(0, abs=1e-9)


# --- the classifier and the distance of samples --------------------------------------------------------

def labelled_data(n_train=300, n_test=100):
    """Two classes of 8x8 images: a bright left half, or a bright right half."""
    rng = np.random.default_rng(4)

    def make(n):
        y = np.arange(n) % 2
        x = rng.integers(0, 40, (n, 8, 8, 1)).astype(np.uint8)
        for i, label in enumerate(y):
            x[i, :, label * 4:label * 4 + 4] += 200
        return x, y
    (x_train, y_train), (x_test, y_test) = make(n_train), make(n_test)
    return tool.data.Data("test", x_train, y_train, x_test, y_test, ["left", "right"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A classifier trained on labelled_data() in a Keras home of its own: (home, SampleQuality,
    what it printed)."""
    home = tmp_path_factory.mktemp("keras")
    os.environ["KERAS_HOME"], before = str(home), os.environ["KERAS_HOME"]
    try:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            quality = tool.quality.SampleQuality(labelled_data(), "vae.py")
    finally:
        os.environ["KERAS_HOME"] = before
    return home, quality, printed.getvalue()


def test_sample_quality_trains_once_then_reads_the_cache(trained, monkeypatch, capsys):
    home, first, printed = trained
    assert "training the classifier" in printed
    assert first.facts["test_accuracy"] > 0.95
    folder = home / "autoencoder-classifiers"
    cached = sorted(os.listdir(folder))
    assert len(cached) == 3
    monkeypatch.setenv("KERAS_HOME", str(home))
    data = labelled_data()
    computed = []  # the feature statistics computed, by number of images
    statistics = tool.quality.SampleQuality.statistics
    monkeypatch.setattr(tool.quality.SampleQuality, "statistics",
                        lambda self, images: computed.append(len(images)) or statistics(self, images))
    second = tool.quality.SampleQuality(data, "vae.py")
    assert capsys.readouterr().out == ""  # read, not trained
    assert computed == []  # the test set's statistics read too
    assert second.facts == first.facts
    assert all(np.array_equal(a, b) for a, b in zip(second.test, first.test))
    test = data.x_test.reshape(len(data.x_test), -1) / 255.0
    assert second.of(test)["samples"] == pytest.approx(first.of(test)["samples"], abs=1e-6)
    # damaged statistics are computed again, and kept again; the classifier is not trained
    (stats,) = [name for name in cached if name.endswith(".test-features.npz")]
    (folder / stats).write_bytes(b"garbage")
    computed.clear()
    third = tool.quality.SampleQuality(data, "vae.py")
    assert capsys.readouterr().out == "" and computed == [len(data.x_test)]
    assert all(np.allclose(a, b) for a, b in zip(third.test, first.test))
    # and so are statistics of another size, or kept from other weights
    (weights,) = [name for name in cached if name.endswith(".weights.h5")]
    mean, cov = first.test
    for kept in (dict(mean=mean[:5], cov=cov[:5, :5], weights=tool.quality.file_digest(folder / weights)),
                 dict(mean=mean, cov=cov, weights="0" * 64)):
        np.savez(folder / stats, **kept)
        computed.clear()
        tool.quality.SampleQuality(data, "vae.py")
        assert computed == [len(data.x_test)]
    assert tool.quality.read_statistics(folder / stats, len(mean), folder / weights) is not None
    # a damaged cache is trained again
    for name in cached:
        (folder / name).write_bytes(b"garbage")
    tool.quality.SampleQuality(data, "vae.py")
    assert "training the classifier" in capsys.readouterr().out


def test_samples_nearer_the_data_score_better(trained):
    _, quality, _ = trained
    data = labelled_data()
    test = data.x_test.reshape(len(data.x_test), -1) / 255.0
    # the test set itself is at distance 0; the training set near it; noise far away
    assert quality.of(test)["samples"] == pytest.approx(0, abs=1e-4)
    noise = np.random.default_rng(5).uniform(0, 1, (1000, 64))
    figures = quality.of(noise)
    assert figures["samples"] > 10 * figures["test_vs_train"] > 0
    blurred = 0.5 * test + 0.5 * test.mean(0)  # each image halfway to the mean image
    one_class = test[data.y_test == 0]  # the left class only
    assert quality.of(test)["samples"] < quality.of(blurred)["samples"]
    assert quality.of(test)["samples"] < quality.of(one_class)["samples"]


def test_sample_sets_of_any_size_and_float_type_reuse_one_traced_function(trained, capfd):
    _, quality, _ = trained
    rng = np.random.default_rng(6)
    traced = quality.features.experimental_get_tracing_count()
    for n in (60, 70, 1100, 1200):
        for dtype in (np.float32, np.float64):
            assert quality.of(rng.uniform(0, 1, (n, 64)).astype(dtype))["samples"] > 0
    assert quality.features.experimental_get_tracing_count() == traced == 1
    assert capfd.readouterr().err == ""  # nothing from TensorFlow


def test_the_classifier_is_the_same_whatever_ran_before(trained, tmp_path, monkeypatch):
    import keras
    keras.random.normal([100])  # what a run does before: draws from the global random state
    keras.layers.Dense(3).build((None, 4))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert tool.quality.SampleQuality(labelled_data(), "ae.py").facts == trained[1].facts


def test_a_cache_of_another_classifier_is_trained_anew(trained, tmp_path, monkeypatch, capsys):
    """The stride-2 network's weights have the shapes of the pooled one's before it: a cache
    written by another network loaded into this one without complaint."""
    home, first, _ = trained
    shutil.copytree(home / "autoencoder-classifiers", tmp_path / "autoencoder-classifiers")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (facts,) = (tmp_path / "autoencoder-classifiers").glob("*.json")
    # and damaged facts beside weights that load: they crashed the end of a run, or the
    # classifier was trained on from those weights, not from its seeded start
    for kept in (dict(first.facts, classifier="conv32-conv64-dense128-v2"),
                 list(first.facts), dict(first.facts, test_accuracy=None, test_vs_train="x")):
        facts.write_text(json.dumps(kept))
        again = tool.quality.SampleQuality(labelled_data(), "vae.py")
        assert "training the classifier" in capsys.readouterr().out
        assert json.loads(facts.read_text()) == again.facts == first.facts, kept

def test_without_labels_the_figure_is_left_out_and_the_output_says_so(capsys):
    data = labelled_data()
    data = tool.data.Data("test", data.x_train, None, data.x_test, None)
    assert tool.quality.sample_quality(data, "vae.py", lambda n: pytest.fail("generated"), 100) is None
    assert "no labels" in capsys.readouterr().out
    assert tool.quality.sample_quality(labelled_data(), "vae.py", lambda n: pytest.fail("generated"), 0) is None



def test_training_the_classifier_shows_how_far_it_is(tmp_path, monkeypatch, capsys):
    """A newcomer's first run waited minutes after one line with no progress shown."""
    import tool.progress
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(tool.quality, "Progress",
                        lambda total, what: tool.progress.Progress(total, what, every=0.0))
    tool.quality.SampleQuality(labelled_data(), "vae.py")
    lines = [line for line in capsys.readouterr().out.splitlines() if "% done" in line]
    assert lines and all(line.startswith("training the classifier: ") and line.endswith(" s left")
                         for line in lines)
