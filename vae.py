"""Train a variational autoencoder on Fashion-MNIST or your own images; save reconstruction and
sample grids.

Usage: python vae.py [--epochs 1000] [--z-dim 10] [--out images/vae] [--beta 1] [--iw-samples 1000]
       [--dataset fashion-mnist|mnist|FOLDER|FILE.npz] [--image-size HxW] [--channels 1|3]

Each epoch prints the train and test negative ELBO in nats per image (reconstruction + KL) and
the test figure in bits per dimension (comparable across image sizes), writes
rec_epoch_NNN.png (test originals and reconstructions side by side) and sample_epoch_NNN.png
(100 images decoded from one fixed set of z ~ N(0, I)), with --z-dim 2 also manifold_epoch_NNN.png
(the decoded latent plane), and appends to history.csv. At the end it writes interpolation.png
and summary.json with an importance-weighted estimate of the test negative log-likelihood.
"""

import math
import time

import tool.quiet  # noqa: F401  first: TensorFlow loads quietly, and Ctrl-C meanwhile is one line

import keras
import tensorflow as tf
from keras import layers

import utils
from tool import anomaly, cli, quality, sources
from tool.progress import progress
from tool.run import Run, Script

LOSSES = ("rec", "kl", "loss")  # history.csv's order


# --- The model ----------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="vae")
class VAE(keras.Model):
    """Encoder pixels -> 128 -> (mu, log_var) of size z_dim; decoder z_dim -> 128 -> pixels
    logits; pixels is height x width x channels (784 for Fashion-MNIST). With arch "conv", for
    images of image_shape (h, w, c), the encoder's features and the decoder are convolutional
    (utils.conv_encoder and conv_decoder, filters wide), as in TensorFlow's convolutional VAE
    tutorial. Registered with Keras, so that keras.models.load_model("vae.keras") builds it again
    once vae is imported."""

    def __init__(self, z_dim=10, pixels=784, arch="mlp", image_shape=None,
                 filters=utils.CONV_FILTERS, **kwargs):
        super().__init__(**kwargs)
        self.z_dim, self.pixels, self.arch, self.image_shape = z_dim, pixels, arch, image_shape
        self.filters = filters
        self.rows_per_call = utils.rows_per_call(arch, image_shape, filters)
        conv = arch == "conv"
        hidden, output = utils.conv_decoder(image_shape, filters) if conv else (None, None)
        self.fc1 = (keras.Sequential(utils.conv_encoder(image_shape, filters)) if conv
                    else layers.Dense(128, activation="relu"))
        self.fc2 = layers.Dense(z_dim)  # mu
        self.fc3 = layers.Dense(z_dim)  # log_var
        self.fc4 = keras.Sequential(hidden) if conv else layers.Dense(128, activation="relu")
        self.fc5 = keras.Sequential(output) if conv else layers.Dense(pixels)

    def encode(self, x):
        h = self.fc1(x)
        return self.fc2(h), self.fc3(h)

    def reparameterize(self, mu, log_var, eps):
        """z = mu + sigma * eps with eps ~ N(0, I): the noise enters from outside, so gradients
        flow through mu and log_var (Kingma & Welling 2014, section 2.4)."""
        return mu + tf.exp(0.5 * log_var) * eps

    def decode(self, z):
        """Logits of the pixels."""
        return self.fc5(self.fc4(z))

    def call(self, x, eps):
        mu, log_var = self.encode(x)
        return self.decode(self.reparameterize(mu, log_var, eps)), mu, log_var

    def get_config(self):  # what load_model passes to __init__
        return {**super().get_config(), "z_dim": self.z_dim, "pixels": self.pixels,
                "arch": self.arch, "image_shape": self.image_shape, "filters": self.filters}

    def build(self, input_shape):
        """Create the weights for rows of input_shape[-1] pixels (what load_model calls)."""
        self.decode(self.encode(tf.zeros([1, input_shape[-1]]))[0])

    # What a user does with the trained model (tool.export offers it as a SavedModel too), on
    # images as rows x of pixels in [0, 1]

    code_size = property(lambda self: self.z_dim)

    def codes(self, x):
        """The mean and log-variance of q(z | x)."""
        mu, log_var = self.encode(x)
        return {"mean": mu, "log_var": log_var}

    def reconstruct(self, x):
        """The logits of the reconstructions of x, decoded from the means of their codes."""
        return self.decode(self.encode(x)[0])

    def score(self, x):
        """The anomaly score of each image (row of x): its negative ELBO with z at the code's
        mean, less the image's own entropy (utils.excess_bce plus the KL term, nats), higher
        for images unlike the training data."""
        mu, log_var = self.encode(x)
        return utils.excess_bce(x, self.decode(mu)) + kl_divergence(mu, log_var)


# --- The loss and the step ----------------------------------------------------------------------


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


def make_train_step(config, model, optimizer, rng):
    """The step of one batch x: one update on rec + beta * kl (the negative ELBO for beta = 1,
    Higgins et al. 2017 otherwise), eps drawn from rng (a tf.random.Generator); returns the
    losses of compute_loss."""
    def train_step(x):
        eps = rng.normal([tf.shape(x)[0], config.z_dim])
        with tf.GradientTape() as tape:
            losses = compute_loss(model, x, eps)
            objective = losses["rec"] + config.beta * losses["kl"]
        grads = tape.gradient(objective, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return losses
    return train_step


# --- The grids: the latent plane and interpolations -------------------------------------------

def latent_grid(n=10):
    """z of the latent-plane map: the normal distribution's quantiles 5% .. 95% along each axis,
    z_1 growing to the right and z_2 upwards (as in the Keras and TensorFlow VAE examples)."""
    q = tf.math.ndtri(tf.linspace(0.05, 0.95, n))
    z1, z2 = tf.meshgrid(q, q[::-1])
    return tf.stack([tf.reshape(z1, [-1]), tf.reshape(z2, [-1])], axis=1)


def save_interpolations(model, x_test, shape, path):
    """For 10 pairs of test images (2k, 2k + 1), 10 decodings along the line between their means."""
    mu, _ = model.encode(x_test[:20])
    a, b = mu[0::2, None, :], mu[1::2, None, :]
    t = tf.linspace(0.0, 1.0, 10)[None, :, None]
    z = tf.reshape((1 - t) * a + t * b, [100, -1])
    utils.save_images(utils.to_uint8(tf.sigmoid(model.decode(z)), shape), path)


# --- Training ---------------------------------------------------------------------------------

def train(config):
    """Train a VAE as config says, writing into config.out; return the history rows."""
    started = time.perf_counter()
    data = sources.load_data(config)
    with Run(config, SCRIPT, data) as run:
        data.report(SCRIPT.prog)
        x_train, x_test = utils.as_tensors(data.x_train, data.x_test)
        x_probe = x_test[:50]  # the same test images in every epoch's grid
        keras.utils.set_random_seed(config.seed)
        model = VAE(config.z_dim, data.pixels, config.arch, data.shape, config.filters)
        rng = tf.random.Generator.from_seed(config.seed)  # shuffling and eps
        # Fixed probes, drawn once and kept in the checkpoints: z for the sample grid, eps for a
        # test ELBO that changes only when the model does.
        z_sample = tf.Variable(rng.normal([100, config.z_dim]), trainable=False)
        eps_test = tf.Variable(rng.normal([x_test.shape[0], config.z_dim]), trainable=False)
        z_plane = latent_grid() if config.z_dim == 2 else None
        model(x_probe, eps_test[:50])  # create the weights
        optimizer = keras.optimizers.Adam(config.lr)
        optimizer.build(model.trainable_variables)

        def evaluate():  # the test figures and the grids' images, in the epoch's compiled call
            decoded = {"sample": tf.sigmoid(model.decode(z_sample))}
            if z_plane is not None:
                decoded["manifold"] = tf.sigmoid(model.decode(z_plane))
            losses = utils.mean_in_chunks(lambda x, eps: compute_loss(model, x, eps),
                                          model.rows_per_call, x_test, eps_test)
            return {"losses": losses,
                    "x_hat": tf.sigmoid(model(x_probe, eps_test[:50])[0]), "decoded": decoded}

        def grids_of(test):  # the epoch's grids, from what evaluate() gave
            rec = utils.pair_grid(x_probe, test["x_hat"], data.shape)
            return {"rec": rec, **{k: utils.to_uint8(v, data.shape) for k, v in test["decoded"].items()}}

        train_epoch = utils.compile_epoch(make_train_step(config, model, optimizer, rng),
                                          ["loss", "rec", "kl"], rng, config.batch_size, evaluate,
                                          xla=utils.use_xla(config.arch))
        # the generator of random numbers is "generator" in every run's checkpoints
        first = run.restore(model=model, optimizer=optimizer, generator=rng, z_sample=z_sample,
                            eps_test=eps_test)
        run.recreate_grids(lambda: grids_of(evaluate()))
        for epoch in run.epochs(first):
            (train_losses, test), seconds = run.call(train_epoch, x_train)
            row = utils.history_row(epoch, seconds, train={k: train_losses[k] for k in LOSSES},
                                    test={k: test["losses"][k] for k in LOSSES})
            row["beta"] = config.beta
            row["test_bits_per_dim"] = bits_per_dim(row["test_loss"], data.pixels)
            run.end_epoch(row, grids_of(test), f"train loss {row['train_loss']:.2f}  test loss "
                          f"{row['test_loss']:.2f} = rec {row['test_rec']:.2f} + kl "
                          f"{row['test_kl']:.2f} (nats/image; {row['test_bits_per_dim']:.4f} "
                          "bits/dim)")
        run.save_final(model, "sample", sample=True)
        evaluate_run(config, model, data, x_test, run, started)
        return run.history


# --- After training: the test likelihood papers report ----------------------------------------

def bits_per_dim(nats, pixels):
    """A negative log-likelihood in nats per image as bits per pixel value, as papers report it:
    comparable across image sizes and channels."""
    return nats / (pixels * math.log(2))


def log_mean_exp(a, axis=0):
    """log(mean(exp(a))) along axis, stable for large |a|: reduce_logsumexp takes the maximum
    out before exponentiating."""
    return tf.reduce_logsumexp(a, axis) - tf.math.log(tf.cast(tf.shape(a)[axis], a.dtype))


def log_px_given_z(model, x, z):
    """log p(x | z) for images x (n, pixels) and codes z (K, n, z_dim), (K, n): sum_j x_j l_j -
    softplus(l_j) over the logits l of z's decoding, the binary cross-entropy negated."""
    flat = tf.reshape(z, [-1, tf.shape(z)[-1]])
    if model.arch == "conv":
        logits = tf.reshape(model.decode(flat), [tf.shape(z)[0], tf.shape(x)[0], -1])
        return tf.reduce_sum(x * logits - tf.nn.softplus(logits), axis=-1)
    # The MLP's logits are l = h W + b, so the first sum is h . (W x) + b . x: x need not meet
    # each of the K samples' logits (about a tenth less time)
    h = model.fc4(flat)
    softplus = tf.reshape(tf.reduce_sum(tf.nn.softplus(model.fc5(h)), axis=-1), tf.shape(z)[:2])
    h = tf.reshape(h, [tf.shape(z)[0], tf.shape(x)[0], -1])
    wx = tf.matmul(x, model.fc5.kernel, transpose_b=True)
    return tf.reduce_sum(h * wx, axis=-1) + tf.linalg.matvec(x, model.fc5.bias) - softplus


def log_importance_weights(model, x, eps):
    """log p(x, z_k) - log q(z_k | x) for z_k = mu + sigma * eps[k]; eps has shape (K, n, z_dim),
    the result (K, n)."""
    mu, log_var = model.encode(x)
    z = model.reparameterize(mu, log_var, eps)
    log_px_z = log_px_given_z(model, x, z)
    log_2pi = math.log(2 * math.pi)
    log_pz = -0.5 * tf.reduce_sum(tf.square(z) + log_2pi, axis=-1)
    log_qz = -0.5 * tf.reduce_sum(tf.square(eps) + log_var + log_2pi, axis=-1)
    return log_px_z + log_pz - log_qz


def iw_nll(model, x, eps):
    """Importance-weighted estimate of -log p(x) per image from K = len(eps) samples of q
    (Burda et al. 2016): -log (1/K) sum_k p(x, z_k) / q(z_k | x). It is an upper bound of the
    true negative log-likelihood that tightens as K grows, the ELBO being the K = 1 case."""
    return -log_mean_exp(log_importance_weights(model, x, eps), axis=0)


def test_nll_iw(model, x_test, samples, seed, drawn_pixels=20000 * 784, decoded=None):
    """Mean importance-weighted negative log-likelihood of the test set. The noise is drawn for
    chunks of images that decode about drawn_pixels pixels each, from a stateless seed per chunk;
    each chunk is computed in parts of about `decoded` decodings (one part per call), which runs
    about a third faster on a CPU than whole chunks and leaves the noise, so the figure, as it was
    (default: the model's rows_per_call where it has one, else 5000)."""
    chunk = max(1, drawn_pixels // x_test.shape[1] // samples)
    part = max(1, (decoded or model.rows_per_call or 5000) // samples)
    estimate = tf.function(iw_nll, jit_compile=utils.use_xla(model.arch))
    total = 0.0
    starts = range(0, len(x_test), chunk)
    for i, start in progress(enumerate(starts), len(starts), "importance-weighted estimate"):
        x = x_test[start:start + chunk]
        eps = tf.random.stateless_normal([samples, x.shape[0], model.z_dim], seed=[seed, i])
        for j in range(0, x.shape[0], part):
            total += float(tf.reduce_sum(estimate(model, x[j:j + part], eps[:, j:j + part])))
    return total / len(x_test)


def evaluate_run(config, model, data, x_test, run, started):
    """The end of a run: interpolation.png, the importance-weighted estimate of the test
    likelihood and the sample Frechet distance; all in summary.json."""
    save_interpolations(model, x_test, data.shape, run.path("interpolation.png"))
    final = run.history[-1] if run.history else None
    summary = run.summary(test_neg_elbo=float(final["test_loss"]) if final else None,
                          iw_samples=config.iw_samples,
                          test_nll_iw=test_nll_iw(model, x_test, config.iw_samples, config.seed))
    for name in ("test_neg_elbo", "test_nll_iw"):
        if summary[name] is not None:
            summary[name + "_bits_per_dim"] = bits_per_dim(summary[name], data.pixels)
    summary.update(anomaly.detection_figures(model.score, data, config.threshold_quantile))
    print(f"test negative log-likelihood, importance-weighted with {config.iw_samples} "
          f"samples: {summary['test_nll_iw']:.2f} nats/image, "
          f"{summary['test_nll_iw_bits_per_dim']:.4f} bits/dim (negative ELBO "
          f"{summary['test_neg_elbo']:.2f})", flush=True)
    summary["sample_fd"] = quality.sample_quality(  # decoded z ~ N(0, I)
        data, SCRIPT.prog, lambda n: utils.decode_prior(model.decode, n, config.z_dim, [config.seed, 3],
                                                   model.rows_per_call),
        config.fd_samples)
    run.write_summary(summary, started)


# --- The command line -------------------------------------------------------------------------

def make_parser():
    parser = cli.make_parser(__doc__.splitlines()[0], epochs=1000, out="images/vae")
    parser.add_argument("--z-dim", type=cli.positive(int), default=10, metavar="N",
                        help="size of the latent code z (2 adds the latent-plane map)")
    parser.add_argument("--beta", type=cli.positive(float), default=1.0, metavar="B",
                        help="weight of the KL term in the training loss (beta-VAE)")
    parser.add_argument("--iw-samples", type=cli.positive(int), default=1000, metavar="K",
                        help="samples per test image for the importance-weighted likelihood")
    return parser


def build_model(flags, shape):
    """The VAE of a run with these flags, built for images of shape (h, w, c)."""
    pixels = math.prod(shape)
    model = VAE(flags["z_dim"], pixels, flags["arch"], shape, flags["filters"])
    model.build([None, pixels])
    return model


# What vae.py tells its runs: the flags of its own that --resume may change, the files of its
# own, its model for --apply and whether that samples
SCRIPT = Script("vae.py", resumable_flags=("iw_samples",), files=("interpolation.png",),
                build_model=build_model, generates=lambda flags: True)
main = cli.script_main(SCRIPT, train, make_parser)  # main(argv=None): the flags, then train

if __name__ == "__main__":
    main()
