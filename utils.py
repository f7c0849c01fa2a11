"""Helpers shared by ae.py and vae.py: image grids, the convolutional layers of --arch conv, the
epoch compiled into one call, and its row.

Everything around the tutorial (data sources, run folders, evaluation) lives in the tool/ package.
"""

import os
import tempfile

import numpy as np
import tensorflow as tf
from keras import layers
from PIL import Image


UMASK = os.umask(0o022)
os.umask(UMASK)  # read the process's umask (the only way is to set it) and put it back
TMP_PREFIX = ".tmp-"  # write_atomically's temporary files, removed at the next start if left


def write_atomically(path, write):
    """Call write(tmp_path), then rename over path, so path is never left half-written."""
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=TMP_PREFIX, suffix="-" + name)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # as open() would have made it, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def make_grid(images):
    """100 images (100, h, w) or (100, h, w, 3) -> one (10h, 10w[, 3]) array, image k at row
    k // 10, column k % 10."""
    images = np.asarray(images, np.uint8)
    h, w = images.shape[1:3]
    grid = images.reshape(10, 10, h, w, -1).transpose(0, 2, 1, 3, 4).reshape(10 * h, 10 * w, -1)
    return grid[..., 0] if grid.shape[2] == 1 else grid


def save_images(images, path):
    """Save 100 uint8 images, (100, h, w) gray or (100, h, w, 3) colour, as one PNG of 10x10 of
    them in row-major order: image k at row k // 10, column k % 10."""
    grid = make_grid(images)
    # compress_level 1: half the encoding time of the default for 10% more bytes, as this runs
    # every epoch
    write_atomically(path, lambda tmp: Image.fromarray(grid, "L" if grid.ndim == 2 else "RGB").save(
        tmp, format="PNG", compress_level=1))


def to_uint8(images, shape):
    """Pixels in [0, 1], (n, h * w * c) or any shape holding that many per image -> uint8 images
    (n, h, w) for one channel, (n, h, w, 3) for three."""
    pixels = np.nan_to_num(np.clip(np.asarray(images), 0.0, 1.0))  # a diverged model gives NaN
    h, w, c = shape
    return (pixels * 255.0 + 0.5).astype(np.uint8).reshape((-1, h, w) + (c,) * (c > 1))


def to_float(images):
    """uint8 images (n, h, w, c) -> float32 (n, h * w * c) in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def pair_grid(originals, reconstructions, shape):
    """50 originals and their reconstructions -> 100 images, originals in the even columns."""
    pairs = np.stack([to_uint8(originals[:50], shape), to_uint8(reconstructions[:50], shape)], 1)
    return pairs.reshape(100, *pairs.shape[2:])


def triplet_grid(noisy, outputs, clean, shape):
    """30 noisy inputs, their outputs and the clean originals -> 100 images: each row holds three
    (noisy, output, clean) triplets side by side; the last column stays black."""
    triplets = np.stack([to_uint8(x[:30], shape) for x in (noisy, outputs, clean)], 1)
    rows = triplets.reshape(10, 9, *triplets.shape[2:])
    return np.concatenate([rows, np.zeros_like(rows[:, :1])], 1).reshape(100, *rows.shape[2:])


# --- The convolutional layout (--arch conv): TensorFlow's convolutional VAE tutorial's ----------

CONV_MIN_SIZE = 7  # the smallest height and width two 3x3 convolutions of stride 2 take
CONV_FILTERS = 32  # the tutorial's width: --filters


def conv_encoder(shape, filters=CONV_FILTERS):
    """The encoder's layers from images as rows (n, h * w * c) to features: two 3x3 convolutions
    of stride 2 with filters and 2 * filters filters (32 and 64: the tutorial's), ReLU, without
    padding, flattened."""
    return [layers.Reshape(shape),
            layers.Conv2D(filters, 3, strides=2, activation="relu"),
            layers.Conv2D(2 * filters, 3, strides=2, activation="relu"),
            layers.Flatten()]


def conv_decoder(shape, filters=CONV_FILTERS):
    """The decoder's layers from a code to the logits of images as rows (n, h * w * c), as two
    lists, (hidden, output): a Dense layer to a map of ceil(h / 4) x ceil(w / 4) x filters (ReLU),
    two 3x3 transposed convolutions of stride 2 with 2 * filters and filters filters (ReLU; with
    32, the tutorial's 32, 64 and 32); then one of stride 1 to the image's channels, cropped to
    h x w where h or w is not a multiple of 4, flattened."""
    h, w, c = shape
    map_h, map_w = -(-h // 4), -(-w // 4)
    crop_h, crop_w = 4 * map_h - h, 4 * map_w - w
    hidden = [layers.Dense(map_h * map_w * filters, activation="relu"),
              layers.Reshape((map_h, map_w, filters)),
              layers.Conv2DTranspose(2 * filters, 3, strides=2, padding="same", activation="relu"),
              layers.Conv2DTranspose(filters, 3, strides=2, padding="same", activation="relu")]
    output = [layers.Conv2DTranspose(c, 3, padding="same"),
              layers.Cropping2D(((crop_h // 2, crop_h - crop_h // 2),
                                 (crop_w // 2, crop_w - crop_w // 2))),
              layers.Flatten()]
    return hidden, output


def rows_per_call(arch, shape, filters=CONV_FILTERS):
    """How many images one call of a model should take, where a call on a whole data set would
    hold too much: all (None) for the MLP, as the tutorial; for convolutions, as many as keep a
    map of filters channels of the image's size to about 64 MB."""
    return None if arch == "mlp" else max(1, 2**24 // (shape[0] * shape[1] * filters))


def use_xla(arch):
    """Whether a model of arch trains compiled by XLA: the MLP always; convolutions only on a
    GPU, as XLA's convolutions on a CPU run many times slower than TensorFlow's own graph (one
    epoch of --arch conv on Fashion-MNIST: more than 150 s against 13 s on a 2-core AMD EPYC)."""
    return arch == "mlp" or bool(tf.config.list_physical_devices("GPU"))


def compile_epoch(train_step, names, rng, batch_size, after=None, xla=True):
    """Build a compiled function that runs one epoch of train_step over a shuffled data set.

    The data stay in memory as uint8; each epoch draws a fresh permutation from rng (whose
    state is checkpointable), and the whole loop over batches is compiled into one call. The
    last, smaller batch is kept, as tf.data's batch() keeps it.

    Args:
        train_step: fn(x) for a float batch x in [0, 1] of shape (b, pixels), returning a dict
            of scalar losses (the keys in names), each a mean over the batch.
        names: the keys of train_step's dict.
        rng: a tf.random.Generator.
        batch_size: examples per step.
        after: fn() run in the same call once the epoch's updates are done (the test-set
            figures and the grids' images), so that they cost no second call; or None.
        xla: whether XLA compiles the call (use_xla), else it runs as a TensorFlow graph.
    Returns:
        train_epoch(x_train) -> (dict of the losses averaged over the epoch's examples, what
        after returned, or None), as NumPy values: fetched before it returns, so that timing it
        times the work also where the call only queues it (a GPU).
    """
    @tf.function(jit_compile=xla)
    def compiled(x_train):
        n = x_train.shape[0]
        n_full, rest = divmod(n, batch_size)
        order = tf.argsort(rng.uniform([n]))

        def step(totals, idx):
            x = tf.cast(tf.gather(x_train, idx), tf.float32) / 255.0
            losses = train_step(x)
            size = tf.cast(tf.shape(idx)[0], tf.float32)
            return {k: totals[k] + losses[k] * size for k in names}

        totals = {k: tf.zeros([]) for k in names}
        batches = tf.reshape(order[:n_full * batch_size], [n_full, batch_size])
        for i in tf.range(n_full):
            totals = step(totals, batches[i])
        if rest:
            totals = step(totals, order[n_full * batch_size:])
        return {k: v / n for k, v in totals.items()}, (after() if after else None)

    return lambda x_train: tf.nest.map_structure(
        lambda t: t.numpy() if isinstance(t, tf.Tensor) else t, compiled(x_train))


def in_chunks(fn, images, chunk=None):
    """fn (returning a NumPy array) of uint8 images (n, h, w, c) as floats (n, pixels) in
    [0, 1], converted and computed chunk (default 10,000) images at a time (no float copy of a
    whole training set); the rows joined."""
    chunk = chunk or 10000
    return np.concatenate([fn(to_float(images[i:i + chunk])) for i in range(0, len(images), chunk)])


def as_tensors(x_train, x_test):
    """uint8 images (n, h, w, c) as the compiled epoch takes them: the training set as uint8
    rows (n, pixels), scaled per batch in the step, and the test set as float rows in [0, 1]."""
    return (tf.constant(x_train.reshape(len(x_train), -1)),
            tf.constant(x_test.reshape(len(x_test), -1), tf.float32) / 255.0)


def excess_bce(x, logits):
    """Per image (row of x): the binary cross-entropy of pixels x in [0, 1] against the logits,
    summed over pixels, less what x's own gray pixels cost at best (their entropy): the KL
    divergence of Bernoulli(sigmoid(logits)) from Bernoulli(x), 0 for a perfect reconstruction
    however gray the image is. In nats per image."""
    entropy = -(tf.math.xlogy(x, x) + tf.math.xlogy(1.0 - x, 1.0 - x))
    return tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits) - entropy,
                         axis=-1)


def history_row(epoch, seconds, **splits):
    """An epoch's row of history.csv: its number, its seconds, then each split's losses as
    SPLIT_NAME (train_bce, test_bce, ...), in the order given."""
    row = {"epoch": epoch, "seconds": round(seconds, 3)}
    for split, losses in splits.items():
        row.update({f"{split}_{k}": float(v) for k, v in losses.items()})
    return row


def mean_in_chunks(fn, chunk, *rows):
    """fn(*rows), a dict of means over the rows, computed chunk rows at a time and averaged by
    the chunks' sizes; at once where chunk is None (rows_per_call)."""
    n = rows[0].shape[0]
    if chunk is None or chunk >= n:
        return fn(*rows)
    totals = None
    for start in range(0, n, chunk):
        part = fn(*(r[start:start + chunk] for r in rows))
        size = min(chunk, n - start)
        totals = {k: v * size + (totals[k] if totals else 0.0) for k, v in part.items()}
    return {k: v / n for k, v in totals.items()}


def decode_prior(decode, n, z_dim, seed, chunk=None):
    """Images decoded from n codes z ~ N(0, I) drawn from a stateless seed: sigmoid(decode(z)),
    chunk (default 10,000) codes at a time, as a NumPy array (n, pixels) in [0, 1]."""
    chunk = chunk or 10000
    z = tf.random.stateless_normal([n, z_dim], seed=seed)
    return np.concatenate([tf.sigmoid(decode(z[i:i + chunk])).numpy() for i in range(0, n, chunk)])
