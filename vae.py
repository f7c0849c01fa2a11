"""Train a variational autoencoder on Fashion-MNIST; save reconstruction and sample grids.

Usage: python vae.py [--epochs 1000] [--z-dim 10] [--out images/vae]

Each epoch prints the train and test negative ELBO in nats per image (reconstruction + KL), writes
rec_epoch_NNN.png (test originals and reconstructions side by side) and sample_epoch_NNN.png
(100 images decoded from one fixed set of z ~ N(0, I)), and appends to history.csv.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of the log

import tensorflow as tf
import keras
from keras import layers

import utils


class VAE(keras.Model):
    """Encoder 784 -> 128 -> (mu, log_var) of size z_dim; decoder z_dim -> 128 -> 784 logits."""

    def __init__(self, z_dim=10):
        super().__init__()
        self.fc1 = layers.Dense(128, activation="relu")
        self.fc2 = layers.Dense(z_dim)  # mu
        self.fc3 = layers.Dense(z_dim)  # log_var
        self.fc4 = layers.Dense(128, activation="relu")
        self.fc5 = layers.Dense(784)

    def encode(self, x):
        h = self.fc1(x)
        return self.fc2(h), self.fc3(h)

    def reparameterize(self, mu, log_var, eps):
        """z = mu + sigma * eps with eps ~ N(0, I): the noise enters from outside, so gradients
        flow through mu and log_var (Kingma & Welling 2014, section 2.4)."""
        return mu + tf.exp(0.5 * log_var) * eps

    def decode(self, z):
        """Logits of the 784 pixels."""
        return self.fc5(self.fc4(z))

    def call(self, x, eps):
        mu, log_var = self.encode(x)
        return self.decode(self.reparameterize(mu, log_var, eps)), mu, log_var


def kl_divergence(mu, log_var):
    """KL(N(mu, diag(exp(log_var))) || N(0, I)) per example, in nats, in closed form
    (Kingma & Welling 2014, appendix B)."""
    return -0.5 * tf.reduce_sum(1.0 + log_var - tf.square(mu) - tf.exp(log_var), axis=-1)


def compute_loss(model, x, eps):
    """Negative ELBO: BCE summed over pixels plus KL, each averaged over the batch (nats/image)."""
    logits, mu, log_var = model(x, eps)
    rec = tf.reduce_mean(tf.reduce_sum(
        tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits), axis=-1))
    kl = tf.reduce_mean(kl_divergence(mu, log_var))
    return {"loss": rec + kl, "rec": rec, "kl": kl}


def train(config):
    """Train a VAE as config says, writing into config.out; return the history rows."""
    with utils.Run(config, "vae.py") as run:
        (x_train, _), (x_test, _) = utils.load_fashion_mnist(config.data_dir)
        x_train = tf.constant(x_train.reshape(-1, 784))  # uint8, scaled per batch in the step
        x_test = tf.constant(x_test.reshape(-1, 784), tf.float32) / 255.0
        x_probe = x_test[:50]  # the same test images in every epoch's grid

        keras.utils.set_random_seed(config.seed)
        model = VAE(config.z_dim)
        generator = tf.random.Generator.from_seed(config.seed)  # shuffling and eps
        # Fixed probes, drawn once and kept in the checkpoints: z for the sample grid, eps for a
        # test ELBO that changes only when the model does.
        z_sample = tf.Variable(generator.normal([100, config.z_dim]), trainable=False)
        eps_test = tf.Variable(generator.normal([x_test.shape[0], config.z_dim]), trainable=False)
        model(x_probe, eps_test[:50])  # create the weights
        optimizer = keras.optimizers.Adam(config.lr)
        optimizer.build(model.trainable_variables)

        def train_step(x):
            eps = generator.normal([tf.shape(x)[0], config.z_dim])
            with tf.GradientTape() as tape:
                losses = compute_loss(model, x, eps)
            grads = tape.gradient(losses["loss"], model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return losses

        train_epoch = utils.compile_epoch(train_step, ["loss", "rec", "kl"], generator,
                                          config.batch_size)

        @tf.function(jit_compile=True)
        def evaluate(x):
            x_hat = tf.sigmoid(model(x_probe, eps_test[:50])[0])
            samples = tf.sigmoid(model.decode(z_sample))
            return compute_loss(model, x, eps_test), x_hat, samples

        first = run.restore(model=model, optimizer=optimizer, generator=generator,
                            z_sample=z_sample, eps_test=eps_test)
        for epoch in run.epochs(first):
            start = time.perf_counter()
            train_losses = {k: float(v) for k, v in train_epoch(x_train).items()}
            seconds = time.perf_counter() - start
            test_losses, x_hat, samples = evaluate(x_test)
            row = {"epoch": epoch, "seconds": round(seconds, 3)}
            for split, losses in (("train", train_losses), ("test", test_losses)):
                row.update({f"{split}_{k}": float(losses[k]) for k in ("rec", "kl", "loss")})
            grids = {"rec": utils.pair_grid(x_probe, x_hat), "sample": utils.to_uint8(samples)}
            run.end_epoch(row, grids, f"train loss {row['train_loss']:.2f}  test loss "
                          f"{row['test_loss']:.2f} = rec {row['test_rec']:.2f} + kl "
                          f"{row['test_kl']:.2f} (nats/image)")
        run.save_weights(model, "vae.weights.h5")
        return run.history


def main(argv=None):
    parser = utils.make_parser(__doc__.splitlines()[0], epochs=1000, out="images/vae")
    parser.add_argument("--z-dim", type=utils.positive(int), default=10, metavar="N",
                        help="size of the latent code z")
    utils.run_main("vae.py", train, parser, argv)


if __name__ == "__main__":
    main()
