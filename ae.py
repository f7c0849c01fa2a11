"""Train an MLP autoencoder on Fashion-MNIST and save reconstruction grids of the test set.

Usage: python ae.py [--epochs 100] [--h-dim 20] [--out images/ae]

Each epoch prints train and test binary cross-entropy per pixel, writes rec_epoch_NNN.png (test
originals in the even columns, their reconstructions to the right) and appends to history.csv.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of the log

import tensorflow as tf
import keras
from keras import layers

import utils


class AE(keras.Model):
    """784 -> 256 -> 128 -> h_dim -> 128 -> 256 -> 784, ReLU between, the decoder giving logits."""

    def __init__(self, h_dim=20):
        super().__init__()
        self.encoder = keras.Sequential([
            layers.Dense(256, activation="relu"),
            layers.Dense(128, activation="relu"),
            layers.Dense(h_dim),
        ])
        self.decoder = keras.Sequential([
            layers.Dense(128, activation="relu"),
            layers.Dense(256, activation="relu"),
            layers.Dense(784),
        ])

    def call(self, x):
        return self.decoder(self.encoder(x))


def compute_loss(model, x):
    """Binary cross-entropy between x and the reconstruction, mean over pixels and batch."""
    logits = model(x)
    bce = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits))
    return {"bce": bce}


def train(config):
    """Train an AE as config says, writing into config.out; return the history rows."""
    with utils.Run(config, "ae.py") as run:
        (x_train, _), (x_test, _) = utils.load_fashion_mnist(config.data_dir)
        x_train = tf.constant(x_train.reshape(-1, 784))  # uint8, scaled per batch in the step
        x_test = tf.constant(x_test.reshape(-1, 784), tf.float32) / 255.0
        x_probe = x_test[:50]  # the same test images in every epoch's grid

        keras.utils.set_random_seed(config.seed)
        model = AE(config.h_dim)
        model(x_probe)  # create the weights
        optimizer = keras.optimizers.Adam(config.lr)
        optimizer.build(model.trainable_variables)
        generator = tf.random.Generator.from_seed(config.seed)  # shuffling

        def train_step(x):
            with tf.GradientTape() as tape:
                losses = compute_loss(model, x)
            grads = tape.gradient(losses["bce"], model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return losses

        train_epoch = utils.compile_epoch(train_step, ["bce"], generator, config.batch_size)

        @tf.function(jit_compile=True)
        def evaluate(x):
            return compute_loss(model, x), tf.sigmoid(model(x_probe))

        first = run.restore(model=model, optimizer=optimizer, generator=generator)
        for epoch in run.epochs(first):
            start = time.perf_counter()
            train_losses = {k: float(v) for k, v in train_epoch(x_train).items()}
            seconds = time.perf_counter() - start
            test_losses, x_hat = evaluate(x_test)
            row = {"epoch": epoch, "seconds": round(seconds, 3),
                   "train_bce": train_losses["bce"], "test_bce": float(test_losses["bce"])}
            run.end_epoch(row, {"rec": utils.pair_grid(x_probe, x_hat)},
                          f"train bce {row['train_bce']:.4f}  test bce {row['test_bce']:.4f}")
        run.save_weights(model, "ae.weights.h5")
        return run.history


def main(argv=None):
    parser = utils.make_parser(__doc__.splitlines()[0], epochs=100, out="images/ae")
    parser.add_argument("--h-dim", type=utils.positive(int), default=20, metavar="N",
                        help="size of the code")
    utils.run_main("ae.py", train, parser, argv)


if __name__ == "__main__":
    main()
