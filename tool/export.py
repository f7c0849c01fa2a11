"""A trained model in the two forms a user loads without the training code: Keras's own .keras
file (keras.models.load_model, after importing the script that defines the model), and a
TensorFlow SavedModel (tf.saved_model.load, no project code at all) whose endpoints take and give
uint8 images as they come out of a PNG.

The models give what the endpoints need, on float rows in [0, 1]: codes(x) ({name: (n, d)}),
reconstruct(x) and decode(z) (logits), score(x) (one anomaly score per image) and code_size.
"""

import keras
import tensorflow as tf

from tool.files import write_folder_atomically
from utils import write_atomically


def save_models(model, shape, keras_path, saved_model_path, sample=False):
    """Write model (trained on images of shape (h, w, c)) as keras_path (.keras) and as a
    SavedModel folder at saved_model_path, each whole or not at all; with sample, the
    SavedModel's sample endpoint decodes codes drawn from N(0, I)."""
    write_atomically(keras_path, model.save)
    write_folder_atomically(saved_model_path,
                            lambda tmp: export_archive(model, shape, sample).write_out(tmp, verbose=False))


def export_archive(model, shape, sample=False):
    """The SavedModel's endpoints, encode first (the serving default):
    encode(images) -> the codes (model.codes's names, float32 (n, d) each);
    decode(codes) -> {"images"}; reconstruct(images) -> {"images"}; score(images) -> {"score"}
    (float32 (n,), higher for images unlike the training data); with sample,
    sample(count, seed) -> {"images"}, decoded from count codes drawn from N(0, I) with the
    stateless seed. Images are uint8 (n, h, w, c)."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    images = tf.TensorSpec([None, *shape], tf.uint8, name="images")
    codes = tf.TensorSpec([None, model.code_size], tf.float32, name="codes")

    def rows(images):  # uint8 images as the model takes them
        return tf.reshape(tf.cast(images, tf.float32) / 255.0, [tf.shape(images)[0], -1])

    def pictures(logits):  # logits as uint8 images, rounded as the grids round them
        pixels = tf.clip_by_value(tf.sigmoid(logits), 0.0, 1.0) * 255.0 + 0.5
        return {"images": tf.reshape(tf.cast(pixels, tf.uint8), [-1, *shape])}

    archive.add_endpoint("encode", lambda images: model.codes(rows(images)), [images])
    archive.add_endpoint("decode", lambda codes: pictures(model.decode(codes)), [codes])
    archive.add_endpoint("reconstruct", lambda images: pictures(model.reconstruct(rows(images))),
                         [images])
    archive.add_endpoint("score", lambda images: {"score": model.score(rows(images))}, [images])
    if sample:
        def draw(count, seed):
            z = tf.random.stateless_normal([count, model.code_size], seed=tf.stack([seed, tf.zeros_like(seed)]))
            return pictures(model.decode(z))
        archive.add_endpoint("sample", draw, [tf.TensorSpec([], tf.int32, name="count"),
                                              tf.TensorSpec([], tf.int64, name="seed")])
    return archive
