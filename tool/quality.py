"""Sample quality as a number: the Frechet distance of generated images to the test set in the
features of a small classifier trained once per data set (FID with a small network)."""

import hashlib
import json
import os
import sys
import time
import zipfile

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from tool.files import write_json
from tool.progress import Progress
from utils import to_float, write_atomically


CLASSIFIER = "s2conv32-s2conv64-dense128-v3"  # in the cache key: another network is trained anew


CLASSIFIER_EPOCHS, CLASSIFIER_RATE = 5, 2e-3


def make_classifier(shape, n_classes):
    """Two 3x3 stride-2 convolutions (32 and 64 filters), a dense layer of 128 (the features
    the distance uses) and the class logits. Strides in place of full-size convolutions and
    pooling: the full-size layers took most of the time on a CPU. Each layer's initial weights
    have a seed of their own, so the classifier of a data set is the same whatever ran before."""
    def seeded(k):
        return dict(kernel_initializer=keras.initializers.GlorotUniform(seed=k))
    return keras.Sequential([
        keras.Input(shape),
        layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", **seeded(1)),
        layers.Conv2D(64, 3, strides=2, padding="same", activation="relu", **seeded(2)),
        layers.Flatten(),
        layers.Dense(128, activation="relu", name="features", **seeded(3)),
        layers.Dense(n_classes, **seeded(4)),
    ])


def scaled(x):
    """uint8 images to float32 in [0, 1], batch by batch, for tf.data."""
    return tf.cast(x, tf.float32) / 255.0


class SampleQuality:
    """The features of a classifier trained once per data set (weights cached in
    $KERAS_HOME/autoencoder-classifiers, keyed by the data's SHA-256), the test set's feature
    statistics, and the Fréchet distance of generated images to them (FID with a small network
    in place of Inception: Heusel et al. 2017)."""

    def __init__(self, data, prog):
        folder = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")),
                              "autoencoder-classifiers")
        key = hashlib.sha256((data.description()["sha256"] + CLASSIFIER).encode()).hexdigest()[:20]
        weights, facts, test = (os.path.join(folder, key + suffix)
                                for suffix in (".weights.h5", ".json", ".test-features.npz"))
        self.shape = data.shape
        model = make_classifier(data.shape, len(data.class_names))
        try:
            model.load_weights(weights)
            with open(facts) as f:
                self.facts = read_facts(json.load(f))
            trained = False
        except (OSError, ValueError, KeyError, TypeError):  # not there yet, or damaged: train again,
            model = make_classifier(data.shape, len(data.class_names))  # from the seeded start
            self.facts = self.train(model, data, prog)
            trained = True
        features = keras.Model(model.inputs[0], model.get_layer("features").output)
        # traced once, for any number of images: twice as fast as calling the model eagerly on a
        # CPU, with the same numbers
        self.features = tf.function(lambda x: features(x, training=False), autograph=False,
                                    input_signature=[tf.TensorSpec([None, *data.shape], tf.float32)])
        width = features.output.shape[-1]
        self.test = None if trained else read_statistics(test, width, weights)
        if self.test is not None:
            return
        self.test = self.statistics(data.x_test)  # kept too: half the time of a distance
        if trained:
            self.facts["test_vs_train"] = frechet_distance(*self.statistics(data.x_train), *self.test)
        try:
            os.makedirs(folder, exist_ok=True)
            if trained:
                write_atomically(weights, model.save_weights)
                write_json(facts, self.facts)
            # with the digest of the weights they come from: another process's weights do not match
            kept = dict(mean=self.test[0], cov=self.test[1], weights=file_digest(weights))
            write_atomically(test, lambda tmp: np.savez(tmp, **kept))
        except OSError as e:
            print(f"{prog}: cannot write into {folder} ({e.strerror}); what is missing there will "
                  "be made again next time", file=sys.stderr, flush=True)

    def train(self, model, data, prog):
        print(f"{prog}: training the classifier that measures sample quality, once for these "
              f"data ({CLASSIFIER_EPOCHS} epochs)", flush=True)
        keras.utils.set_random_seed(0)
        model.compile(optimizer=keras.optimizers.Adam(CLASSIFIER_RATE),
                      jit_compile=False,  # XLA's convolutions are slow on CPUs
                      steps_per_execution=50,  # the same steps in fewer calls (17 s, not 25 s)
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        train = (tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train))
                 .shuffle(len(data.x_train), seed=0).batch(128).map(lambda x, y: (scaled(x), y)))
        steps = -(-len(data.x_train) // 128)
        model.fit(train, epochs=CLASSIFIER_EPOCHS, shuffle=False, verbose=0,  # shuffled above
                  callbacks=[FitProgress(steps, CLASSIFIER_EPOCHS, "training the classifier")])
        test = tf.data.Dataset.from_tensor_slices((data.x_test, data.y_test)).batch(1000).map(
            lambda x, y: (scaled(x), y))
        return {"classifier": CLASSIFIER, "test_accuracy": float(model.evaluate(test, verbose=0)[1])}

    def statistics(self, images):
        """Mean and covariance of the features of images: uint8 (n, h, w, c), or floats in
        [0, 1] with h * w * c values per image."""
        def floats(chunk):  # converted chunk by chunk: a float copy of the training set is big
            chunk = to_float(chunk) if chunk.dtype == np.uint8 else chunk.astype(np.float32, copy=False)
            return chunk.reshape(-1, *self.shape)
        images = np.asarray(images)
        features = np.concatenate([self.features(floats(images[i:i + 1000])).numpy()
                                   for i in range(0, len(images), 1000)]).astype(np.float64)
        return features.mean(0), np.cov(features, rowvar=False)

    def of(self, samples):
        """{"samples": the distance of samples (floats in [0, 1]) to the test set, "test_vs_train":
        that of the training set, the floor, "classifier_test_accuracy"}."""
        return {"samples": frechet_distance(*self.statistics(samples), *self.test),
                "test_vs_train": self.facts["test_vs_train"],
                "classifier_test_accuracy": self.facts["test_accuracy"]}


class FitProgress(keras.callbacks.Callback):
    """How far model.fit is over its epochs of steps batches (tool.progress.Progress)."""

    def __init__(self, steps, epochs, what):
        super().__init__()
        self.steps, self.epoch = steps, 0
        self.shown = Progress(steps * epochs, what)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):  # batch: the last of the steps run
        self.shown.update(self.epoch * self.steps + min(batch + 1, self.steps))


def read_facts(facts):
    """The facts kept beside a classifier's weights, checked: ValueError where they are not
    this network's (another network's weights of the same shapes load without complaint) or are
    damaged."""
    if not (isinstance(facts, dict) and facts.get("classifier") == CLASSIFIER
            and all(isinstance(facts.get(k), float) for k in ("test_accuracy", "test_vs_train"))):
        raise ValueError("not this classifier's facts")
    return facts


def file_digest(path):
    """The SHA-256 of a file's bytes, in hex."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_statistics(path, width, weights):
    """The (mean, covariance) of width features that SampleQuality kept at path from the
    classifier in the file weights; None where they are missing, damaged, of another size or
    from other weights."""
    try:
        with np.load(path) as f:
            mean, cov, digest = f["mean"], f["cov"], str(f["weights"])
        same_weights = digest == file_digest(weights)
    except (OSError, ValueError, KeyError, EOFError, TypeError, AttributeError, zipfile.BadZipFile):
        return None
    if (not same_weights or mean.shape != (width,) or cov.shape != (width, width)
            or mean.dtype != np.float64 or cov.dtype != np.float64
            or not (np.isfinite(mean).all() and np.isfinite(cov).all())):
        return None
    return mean, cov


def frechet_distance(mean1, cov1, mean2, cov2):
    """The Fréchet (2-Wasserstein) distance between N(mean1, cov1) and N(mean2, cov2):
    |mean1 - mean2|^2 + tr(cov1 + cov2 - 2 (cov1^1/2 cov2 cov1^1/2)^1/2), with symmetric
    eigendecompositions for the square roots (the trace equals that of (cov1 cov2)^1/2)."""
    values, vectors = np.linalg.eigh(cov1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = root1 @ cov2 @ root1
    roots = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None))
    return float(np.sum((np.asarray(mean1) - mean2) ** 2) + np.trace(cov1) + np.trace(cov2)
                 - 2 * roots.sum())


def sample_quality(data, prog, samples_fn, n):
    """summary.json's sample_fd for n images from samples_fn(n) (floats in [0, 1]), printed too;
    None, with a line saying why, where the data have no labels or n is 0."""
    if not n:
        return None
    if data.y_train is None:
        print(f"{prog}: the data have no labels, so there is no classifier to measure sample "
              "quality with: sample_fd left out", flush=True)
        return None
    if len(np.unique(data.y_train)) < 2:
        print(f"{prog}: the data hold one class, so there is no classifier to measure sample "
              "quality with: sample_fd left out", flush=True)
        return None
    start = time.perf_counter()
    quality = SampleQuality(data, prog)
    figures = quality.of(samples_fn(n))
    figures["seconds"] = round(time.perf_counter() - start, 1)
    print(f"sample quality: Frechet distance of {n:,} samples to the test set "
          f"{figures['samples']:.2f} (the training set's: {figures['test_vs_train']:.2f}), in the "
          f"features of a classifier of test accuracy {figures['classifier_test_accuracy']:.4f} "
          f"({figures['seconds']:.1f} s)", flush=True)
    return figures
