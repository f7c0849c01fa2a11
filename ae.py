"""Train an MLP autoencoder on Fashion-MNIST or your own images; save reconstruction grids.

Usage: python ae.py [--epochs 100] [--h-dim 20] [--out images/ae]
       [--loss bce|mse] [--noise SIGMA] [--adversarial] [--export-codes] [--compare-pca]
       [--dataset fashion-mnist|mnist|FOLDER|FILE.npz] [--image-size HxW] [--channels 1|3]

Each epoch prints train and test losses per pixel, writes rec_epoch_NNN.png (test originals in
the even columns, their reconstructions to the right) and appends to history.csv. The variants
the tutorial describes are flags: a denoising autoencoder (--noise), an adversarial autoencoder
whose codes follow N(0, I) (--adversarial, Makhzani et al. 2015), the codes as features
(--export-codes) and the comparison with PCA (--compare-pca). summary.json sums the run up.
"""

import argparse
import time

import tool.quiet  # noqa: F401  first: TensorFlow loads quietly, and Ctrl-C meanwhile is one line

import keras
import numpy as np
import tensorflow as tf
from keras import layers

import utils
from tool import anomaly, cli, codes, quality, sources
from tool.run import Run, Script

EVAL_NOISE_SEED = (2015, 0)  # the same test noise for every run, so runs compare


# --- The model ----------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="ae")
class AE(keras.Model):
    """pixels -> 256 -> 128 -> h_dim -> 128 -> 256 -> pixels, ReLU between, the decoder giving
    logits; pixels is height x width x channels (784 for Fashion-MNIST). With arch "conv", for
    images of image_shape (h, w, c), the encoder and decoder are convolutional (utils.conv_encoder
    and conv_decoder, filters wide) about the same code. Registered with Keras, so that
    keras.models.load_model("ae.keras") builds it again once ae is imported."""

    def __init__(self, h_dim=20, pixels=784, arch="mlp", image_shape=None,
                 filters=utils.CONV_FILTERS, **kwargs):
        super().__init__(**kwargs)
        self.h_dim, self.pixels, self.arch, self.image_shape = h_dim, pixels, arch, image_shape
        self.filters = filters
        self.rows_per_call = utils.rows_per_call(arch, image_shape, filters)
        if arch == "conv":
            hidden, output = utils.conv_decoder(image_shape, filters)
            self.encoder = keras.Sequential(utils.conv_encoder(image_shape, filters)
                                            + [layers.Dense(h_dim)])
            self.decoder = keras.Sequential(hidden + output)
            return
        self.encoder = keras.Sequential([
            layers.Dense(256, activation="relu"),
            layers.Dense(128, activation="relu"),
            layers.Dense(h_dim),
        ])
        self.decoder = keras.Sequential([
            layers.Dense(128, activation="relu"),
            layers.Dense(256, activation="relu"),
            layers.Dense(pixels),
        ])

    def call(self, x):
        return self.decoder(self.encoder(x))

    def get_config(self):  # what load_model passes to __init__
        return {**super().get_config(), "h_dim": self.h_dim, "pixels": self.pixels,
                "arch": self.arch, "image_shape": self.image_shape, "filters": self.filters}

    # What a user does with the trained model (tool.export offers it as a SavedModel too), on
    # images as rows x of pixels in [0, 1]

    code_size = property(lambda self: self.h_dim)

    def codes(self, x):
        return {"code": self.encoder(x)}

    def decode(self, z):
        """The logits of the images the codes z decode to."""
        return self.decoder(z)

    def reconstruct(self, x):
        """The logits of the reconstructions of x."""
        return self(x)

    def score(self, x):
        """The anomaly score of each image (row of x): how far its reconstruction is from it
        (utils.excess_bce, nats), higher for images unlike the training data."""
        return utils.excess_bce(x, self(x))


# --- The loss and the step ---------------------------------------------------------------------

def bce_from_logits(labels, logits):
    """Binary cross-entropy, mean over all elements."""
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))


def compute_loss(model, x_in, x):
    """Losses of reconstructing x from x_in (the same, or a corrupted x), means over pixels and
    batch: "bce", binary cross-entropy on the logits, and "mse", squared error of the sigmoid
    outputs (the tutorial's choice for real-valued inputs)."""
    logits = model(x_in)
    return {"bce": bce_from_logits(x, logits),
            "mse": tf.reduce_mean(tf.square(tf.sigmoid(logits) - x))}


def reconstruction_step(model, optimizer, x_in, x, loss):
    """One update of encoder and decoder on the loss named by loss ("bce" or "mse")."""
    with tf.GradientTape() as tape:
        losses = compute_loss(model, x_in, x)
    grads = tape.gradient(losses[loss], model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return losses


# --- The variants: the denoiser and the adversarial autoencoder ---------------------------------

def corrupt(x, sigma, noise):
    """The denoising autoencoder's input: x plus sigma times standard normal noise, kept in [0, 1]."""
    return tf.clip_by_value(x + sigma * noise, 0.0, 1.0)


def with_batch_moments(z):
    """Each row of z (codes, or prior samples) with the first two moments of its batch appended:
    the mean and the upper triangle of the covariance, h + h (h + 1) / 2 numbers for h-dimensional
    codes. One code at a time hardly shows a shifted mean, a wrong scale or a correlation between
    two dimensions; a batch's moments show them at once (features of the batch for the
    discriminator, as in Salimans et al. 2016)."""
    h = z.shape[-1]
    mean = tf.reduce_mean(z, axis=0, keepdims=True)
    centred = z - mean
    covariance = tf.matmul(centred, centred, transpose_a=True) / tf.cast(tf.shape(z)[0], z.dtype)
    upper = [i * h + j for i in range(h) for j in range(i, h)]
    moments = tf.concat([mean, tf.gather(tf.reshape(covariance, [1, -1]), upper, axis=1)], axis=1)
    return tf.concat([z, tf.tile(moments, [tf.shape(z)[0], 1])], axis=1)


def make_discriminator():
    """The adversarial autoencoder's discriminator: a code, with its batch's moments appended
    (with_batch_moments), -> 256 -> 256 -> the logit that it came from the prior."""
    return keras.Sequential([
        layers.Lambda(with_batch_moments),
        layers.Dense(256, activation="relu"),
        layers.Dense(256, activation="relu"),
        layers.Dense(1),
    ])


R1_WEIGHT = 1.0


def discriminator_step(model, discriminator, optimizer, x_in, z_prior):
    """One update of the discriminator only: prior samples are real (1), codes are fake (0).
    Returns its cross-entropy; the update also takes an R1 penalty (Mescheder et al. 2018),
    R1_WEIGHT / 2 times the squared gradient of the batch's summed logits at each prior sample
    (averaged over the samples; through the batch moments too, so it also flattens the
    discriminator's response to them), which keeps it from growing steep where the codes should
    go and leaving the encoder no slope to follow."""
    z = model.encoder(x_in)
    with tf.GradientTape() as tape:
        with tf.GradientTape() as at_prior:
            at_prior.watch(z_prior)
            real = discriminator(z_prior)
            real_sum = tf.reduce_sum(real)
        slope = at_prior.gradient(real_sum, z_prior)
        fake = discriminator(z)
        loss = bce_from_logits(tf.ones_like(real), real) + bce_from_logits(tf.zeros_like(fake), fake)
        penalty = R1_WEIGHT / 2 * tf.reduce_mean(tf.reduce_sum(tf.square(slope), axis=-1))
        objective = loss + penalty
    grads = tape.gradient(objective, discriminator.trainable_variables)
    optimizer.apply_gradients(zip(grads, discriminator.trainable_variables))
    return loss


def generator_step(model, discriminator, optimizer, x_in):
    """One update of the encoder only, towards codes the discriminator takes for the prior's."""
    with tf.GradientTape() as tape:
        fake = discriminator(model.encoder(x_in))
        loss = bce_from_logits(tf.ones_like(fake), fake)
    grads = tape.gradient(loss, model.encoder.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.encoder.trainable_variables))
    return loss


# The adversarial game's rates (see make_optimizers): the encoder's generator update at 1.2 times
# --lr, the discriminator's at --lr / 5, both falling linearly to 1% over the first 20 epochs
GENERATOR_RATE, DISCRIMINATOR_SLOWDOWN = 1.2, 5
ADVERSARIAL_DECAY_EPOCHS = 20


def make_optimizers(config, model, steps_per_epoch, discriminator=None):
    """Adam for the reconstruction. For the adversarial game, what measuring codes and
    reconstructions after 20 epochs on several seeds chose (see the README): Adam with beta_1 =
    0.5 (Radford et al. 2016) for both players; the encoder's generator update six times as fast
    as the discriminator (GENERATOR_RATE and 1 / DISCRIMINATOR_SLOWDOWN times --lr); and both rates falling linearly to 1% over the
    first 20 epochs, then held, which damps the swings of the code means that a constant rate
    leaves. The discriminator's batch moments and R1 penalty do the rest (discriminator_step)."""
    optimizers = {"optimizer": keras.optimizers.Adam(config.lr)}
    optimizers["optimizer"].build(model.trainable_variables)
    if discriminator is not None:
        def decaying(lr):
            return keras.optimizers.schedules.PolynomialDecay(
                lr, ADVERSARIAL_DECAY_EPOCHS * steps_per_epoch, end_learning_rate=lr / 100)
        optimizers["disc_optimizer"] = keras.optimizers.Adam(decaying(config.lr / DISCRIMINATOR_SLOWDOWN),
                                                             beta_1=0.5)
        optimizers["disc_optimizer"].build(discriminator.trainable_variables)
        optimizers["gen_optimizer"] = keras.optimizers.Adam(decaying(config.lr * GENERATOR_RATE),
                                                            beta_1=0.5)
        optimizers["gen_optimizer"].build(model.encoder.trainable_variables)
    return optimizers


def make_train_step(config, model, optimizers, rng, discriminator=None):
    """The step of one batch x: reconstruction update; with --adversarial, then the
    discriminator's and the encoder's updates. Noise comes from rng (a tf.random.Generator)."""
    def train_step(x):
        x_in = x
        if config.noise:
            x_in = corrupt(x, config.noise, rng.normal(tf.shape(x)))
        losses = reconstruction_step(model, optimizers["optimizer"], x_in, x, config.loss)
        if discriminator is not None:
            z_prior = rng.normal([tf.shape(x)[0], config.h_dim])
            losses["disc"] = discriminator_step(model, discriminator, optimizers["disc_optimizer"],
                                                x_in, z_prior)
            losses["gen"] = generator_step(model, discriminator, optimizers["gen_optimizer"], x_in)
        return losses
    return train_step


# --- Training ----------------------------------------------------------------------------------

def make_models(config, data, x_probe):
    """The autoencoder, with --adversarial its discriminator (else None), built, and their
    optimizers (see make_optimizers)."""
    keras.utils.set_random_seed(config.seed)
    model = AE(config.h_dim, data.pixels, config.arch, data.shape, config.filters)
    model(x_probe)  # create the weights
    discriminator = None
    if config.adversarial:
        discriminator = make_discriminator()
        discriminator(tf.zeros([1, config.h_dim]))
    steps_per_epoch = -(-len(data.x_train) // config.batch_size)
    return model, discriminator, make_optimizers(config, model, steps_per_epoch, discriminator)


def train(config):
    """Train an AE as config says, writing into config.out; return the history rows."""
    started = time.perf_counter()
    data = sources.load_data(config)
    if config.compare_pca:
        codes.check_pca_memory(config, data)
    with Run(config, SCRIPT, data) as run:
        data.report(SCRIPT.prog)
        x_train, x_test = utils.as_tensors(data.x_train, data.x_test)
        # Test inputs: clean, or with noise drawn once (stateless, from the seed) for a denoiser
        x_test_in = x_test
        if config.noise:
            x_test_in = corrupt(x_test, config.noise,
                                tf.random.stateless_normal(x_test.shape, seed=[config.seed, 1]))
        x_probe, x_probe_in = x_test[:50], x_test_in[:50]  # the same images in every epoch's grid
        model, discriminator, optimizers = make_models(config, data, x_probe)
        rng = tf.random.Generator.from_seed(config.seed)  # shuffling and noise
        z_prior = tf.random.stateless_normal([100, config.h_dim], seed=[config.seed, 2])

        def evaluate():  # the test figures and the grids' images, in the epoch's compiled call
            decoded = {"sample": tf.sigmoid(model.decoder(z_prior))} if config.adversarial else {}
            losses = utils.mean_in_chunks(lambda x_in, x: compute_loss(model, x_in, x),
                                          model.rows_per_call, x_test_in, x_test)
            return {"losses": losses,
                    "x_hat": tf.sigmoid(model(x_probe_in)), "decoded": decoded}

        def grids_of(test):  # the epoch's grids, from what evaluate() gave
            rec = (utils.triplet_grid(x_probe_in, test["x_hat"], x_probe, data.shape) if config.noise
                   else utils.pair_grid(x_probe, test["x_hat"], data.shape))
            return {"rec": rec, **{k: utils.to_uint8(v, data.shape) for k, v in test["decoded"].items()}}

        names = [config.loss] + (["disc", "gen"] if config.adversarial else [])
        train_step = make_train_step(config, model, optimizers, rng, discriminator)
        train_epoch = utils.compile_epoch(train_step, names, rng, config.batch_size, evaluate,
                                          xla=utils.use_xla(config.arch))
        players = {"discriminator": discriminator} if discriminator is not None else {}
        # the generator of random numbers is "generator" in every run's checkpoints
        first = run.restore(model=model, generator=rng, **optimizers, **players)
        run.recreate_grids(lambda: grids_of(evaluate()))
        for epoch in run.epochs(first):
            (train_losses, test), seconds = run.call(train_epoch, x_train)
            row = utils.history_row(epoch, seconds, train=train_losses, test=test["losses"])
            figures = (f"train {config.loss} {row['train_' + config.loss]:.4f}  test bce "
                       f"{row['test_bce']:.4f}  test mse {row['test_mse']:.4f}")
            if config.adversarial:
                figures += f"  disc {row['train_disc']:.3f}  gen {row['train_gen']:.3f}"
            run.end_epoch(row, grids_of(test), figures)
        run.save_final(model, "sample" if config.adversarial else "rec", sample=config.adversarial)
        evaluate_run(config, model, data, x_test, run, started)
        return run.history


# --- After training: what every run measures ------------------------------------------------------

def input_bce(x_in, x, chunk=1000):
    """The BCE of the inputs x_in themselves as reconstructions of x (what doing nothing scores),
    as Keras takes BCE on probabilities, averaged over all pixels; computed in chunks of images."""
    return float(np.mean(np.concatenate([keras.losses.binary_crossentropy(x[i:i + chunk],
                                                                          x_in[i:i + chunk])
                                         for i in range(0, x.shape[0], chunk)])))


def encode(model, images):
    """Codes of uint8 images (n, h, w, c); a NumPy array (n, h_dim)."""
    return utils.in_chunks(lambda x: model.encoder(x).numpy(), images, model.rows_per_call)


def evaluate_run(config, model, data, x_test, run, started):
    """The end of a run: denoising from fixed noise, how Gaussian the codes are, with
    --export-codes codes.npz, with --compare-pca the comparison, and the sample Frechet
    distance; all in summary.json."""
    x_noisy = corrupt(x_test, config.eval_noise,
                      tf.random.stateless_normal(x_test.shape, seed=EVAL_NOISE_SEED))
    loss = tf.function(lambda x_in, x: compute_loss(model, x_in, x), jit_compile=utils.use_xla(config.arch))
    test_bce_from_noisy = utils.mean_in_chunks(loss, model.rows_per_call, x_noisy, x_test)["bce"]
    summary = run.summary(eval_noise=config.eval_noise,
                          test_bce_from_noisy=float(test_bce_from_noisy),
                          identity_bce_noisy=float(input_bce(x_noisy, x_test)),
                          **codes.code_statistics(encode(model, data.x_test)))
    summary.update(anomaly.detection_figures(model.score, data, config.threshold_quantile))
    if config.export_codes:
        export_codes(model, data, run.path("codes.npz"))
    if config.compare_pca:
        x_test_f = utils.to_float(data.x_test)
        ae_figures = utils.mean_in_chunks(lambda x_in, x: compute_loss(model, x_in, x),
                                          model.rows_per_call, x_test_f, x_test_f)
        ae_figures = {k: float(v) for k, v in ae_figures.items()}
        summary["pca_vs_ae"] = codes.compare_with_pca(lambda images: encode(model, images),
                                                      ae_figures, data, config.h_dim, run.path)
    print(f"test bce from noisy inputs (sigma {config.eval_noise}): "
          f"{summary['test_bce_from_noisy']:.4f} (the noisy input itself: "
          f"{summary['identity_bce_noisy']:.4f});  codes: mean |mean| "
          f"{summary['code_mean_abs']:.3f}, mean |std - 1| {summary['code_std_dev_from_1']:.3f}, "
          f"Kolmogorov-Smirnov distance to N(0, 1) {summary['code_ks']:.3f}, "
          f"mean |correlation| {summary['code_abs_correlation']:.3f}", flush=True)
    # what the adversarial autoencoder generates; for a plain one, a contrast
    summary["sample_fd"] = quality.sample_quality(
        data, SCRIPT.prog, lambda n: utils.decode_prior(model.decoder, n, config.h_dim, [config.seed, 3],
                                                   model.rows_per_call),
        config.fd_samples)
    run.write_summary(summary, started)


def export_codes(model, data, path):
    """codes.npz at path: the train and test codes, with their labels if the data have them."""
    arrays = {"train_codes": encode(model, data.x_train), "test_codes": encode(model, data.x_test)}
    if data.y_train is not None:
        arrays.update(train_labels=data.y_train, test_labels=data.y_test)
    utils.write_atomically(path, lambda tmp: np.savez(tmp, **arrays))


# --- The command line ------------------------------------------------------------------------------

def make_parser():
    parser = cli.make_parser(__doc__.splitlines()[0], epochs=100, out="images/ae")
    parser.add_argument("--h-dim", type=cli.positive(int), default=20, metavar="N",
                        help="size of the code")
    parser.add_argument("--loss", choices=["bce", "mse"], default="bce",
                        help="training loss: binary cross-entropy, or squared error of the "
                        "sigmoid outputs (for real-valued inputs)")
    parser.add_argument("--noise", type=cli.non_negative, default=0.0, metavar="SIGMA",
                        help="denoising autoencoder: train on clip(x + SIGMA * N(0, 1), 0, 1) "
                        "to reconstruct x")
    parser.add_argument("--eval-noise", type=cli.non_negative, default=0.3, metavar="SIGMA",
                        help="noise of the test inputs for summary.json's test_bce_from_noisy")
    parser.add_argument("--adversarial", action="store_true",
                        help="adversarial autoencoder: a discriminator pushes the codes to N(0, I)")
    parser.add_argument("--export-codes", action=argparse.BooleanOptionalAction, default=False,
                        help="write the train and test codes (with their labels, if any) to codes.npz")
    parser.add_argument("--compare-pca", action=argparse.BooleanOptionalAction, default=False,
                        help="compare with PCA of --h-dim components: pca_vs_ae.json and .png")
    return parser


def build_model(flags, shape):
    """The autoencoder of a run with these flags, built for images of shape (h, w, c)."""
    pixels = int(np.prod(shape))
    model = AE(flags["h_dim"], pixels, flags["arch"], shape, flags["filters"])
    model(tf.zeros([1, pixels]))
    return model


# What ae.py tells its runs: the flags of its own that --resume may change, the files of its
# own, its model for --apply and whether that samples
SCRIPT = Script("ae.py", resumable_flags=("eval_noise", "export_codes", "compare_pca"),
                files=("codes.npz", "pca_vs_ae.json", "pca_vs_ae.png"), build_model=build_model,
                generates=lambda flags: flags["adversarial"])
main = cli.script_main(SCRIPT, train, make_parser)  # main(argv=None): the flags, then train

if __name__ == "__main__":
    main()
