"""What the codes are worth: PCA to compare with, k-nearest-neighbour accuracy, how Gaussian they
are, and scatter plots of them."""

import math

import keras
import numpy as np
from PIL import Image

import utils

from tool.anomaly import held_out_figures
from tool.data import limit_text, memory_limit, run_bytes, size_text
from tool.errors import UserError
from tool.files import write_json
from utils import write_atomically


# tab10, the usual ten class colours
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


PCA_CHUNK = 4096  # rows fit_pca converts to float64 at a time


def pca_bytes(n, d):
    """About the most memory fit_pca takes for n rows of d values: its float64 matrix, min(n, d)
    x d, what LAPACK works in beside it (measured: 5 times the matrix, 6.0 GB for 20,000 images
    of 64x64x3), and a chunk of rows in float64 with its centred copy."""
    return 6 * 8 * min(n, d) * d + 2 * 8 * min(n, PCA_CHUNK) * d


def check_pca_memory(config, data):
    """Refuse --compare-pca, before a run starts, where its PCA (see pca_bytes), beside what the
    run holds (see run_bytes), would need more than the memory limit."""
    n, d = len(data.x_train), data.pixels
    pca = pca_bytes(n, d)
    held = run_bytes(n + len(data.x_test), d)
    limit = memory_limit(config)
    if pca + held > limit:
        raise UserError(f"--compare-pca: the PCA of {n:,} images of {d:,} values needs about "
                        f"{size_text(pca)} of memory beside the {size_text(held)} the run holds, "
                        f"more than {limit_text(config, limit)}; use a smaller --image-size, leave "
                        "out --compare-pca, or raise --max-memory")


def fit_pca(x, k, chunk=PCA_CHUNK):
    """Principal component analysis, exact: by SVD of the centred data where there are fewer rows
    than columns, else from the d x d scatter matrix, summed over chunks of rows, so memory grows
    with min(n, d) x d (see pca_bytes), never with a float copy of many rows.

    Args:
        x: (n, d) array of any numeric type (uint8 pixels too); k: number of components.
    Returns:
        (mean, components): (d,) and (k, d), the components orthonormal, by falling variance,
        each signed so that its largest coordinate is positive (an SVD's signs are arbitrary).
        Codes are (x - mean) @ components.T; reconstructions codes @ components + mean.
    """
    n, d = x.shape
    mean = sum(np.sum(x[i:i + chunk], 0, dtype=np.float64) for i in range(0, n, chunk)) / n
    if n < d:
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        components = vt[:k]
    else:
        scatter = np.zeros((d, d))
        for i in range(0, n, chunk):
            centred = x[i:i + chunk] - mean
            scatter += centred.T @ centred
        _, vectors = np.linalg.eigh(scatter)  # eigenvalues rising
        components = vectors[:, ::-1][:, :k].T
    largest = components[np.arange(len(components)), np.abs(components).argmax(1)]
    return mean, components * np.sign(largest)[:, None]


def knn_accuracy(train_codes, train_labels, test_codes, test_labels, k=5, chunk=256):
    """Accuracy of a k-nearest-neighbour vote (Euclidean; of training codes at the same distance
    the earlier one counts, and a tied vote goes to the nearer class).

    The distances of a chunk of test codes to every training code, as |t|^2 - 2 q.t in float32,
    are fast but rounded: they only shortlist every code that may be among the k nearest (within
    a bound of the rounding of the k-th), and the k nearest are then taken by exact distances, so
    that duplicate codes (common in icon sets) tie exactly, however many there are, and the
    figure does not hang on rounding or on the chunk size. 256 test codes at a time against
    60,000 training ones keep those distances small enough to be fast.
    """
    train_codes, train_labels = np.asarray(train_codes, np.float64), np.asarray(train_labels)
    train_32 = train_codes.astype(np.float32)  # for the shortlist: half the time of float64
    train_sq = (train_32 ** 2).sum(1)
    largest = np.sqrt(train_sq.max())
    correct = 0
    for start in range(0, len(test_codes), chunk):
        q = np.asarray(test_codes[start:start + chunk], np.float64)
        rounded = train_sq[None, :] - 2 * q.astype(np.float32) @ train_32.T  # + |q|^2 for each row
        kth = np.partition(rounded, k - 1, axis=1)[:, k - 1]
        # float32 moves these sums of 2 x dims terms by far less (about 1e-6 of their size)
        slack = 1e-4 * (largest ** 2 + 2 * largest * np.linalg.norm(q, axis=1))
        for query, row, bound, truth in zip(q, rounded, kth + slack, test_labels[start:start + chunk]):
            near = np.flatnonzero(row <= bound)
            exact = ((train_codes[near] - query) ** 2).sum(1)
            votes = train_labels[near[np.lexsort((near, exact))[:k]]]  # nearest first
            counts = np.bincount(votes)
            winners = np.flatnonzero(counts == counts.max())
            correct += next(c for c in votes if c in winners) == truth
    return correct / len(test_codes)


def code_statistics(codes):
    """How far codes (n, d) are from N(0, I): averaged over the code dimensions, the mean's
    distance from 0 ("code_mean_abs"), the standard deviation's from 1 ("code_std_dev_from_1")
    and the Kolmogorov-Smirnov distance of each dimension's values to N(0, 1) ("code_ks"); and
    the mean |correlation| between two different dimensions ("code_abs_correlation"), which
    N(0, I) has none of."""
    codes = np.asarray(codes, np.float64)
    n, d = codes.shape
    normal_cdf = np.frompyfunc(lambda v: 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))), 1, 1)
    cdf = normal_cdf(np.sort(codes, axis=0)).astype(np.float64)  # (n, d), each column sorted
    steps = np.arange(n + 1)[:, None] / n
    ks = np.maximum(steps[1:] - cdf, cdf - steps[:-1]).max(0)  # the largest gap of the two CDFs
    correlation = np.corrcoef(codes, rowvar=False) if d > 1 else np.ones((1, 1))
    off_diagonal = np.abs(correlation[~np.eye(d, dtype=bool)])
    return {"code_mean_abs": float(np.abs(codes.mean(0)).mean()),
            "code_std_dev_from_1": float(np.abs(codes.std(0) - 1).mean()),
            "code_ks": float(ks.mean()),
            "code_abs_correlation": float(np.nan_to_num(off_diagonal).mean()) if d > 1 else 0.0}


def first_two_directions(codes):
    """The codes themselves when 2-D, else their projection on their first two principal
    directions."""
    if codes.shape[1] == 2:
        return codes
    mean, components = fit_pca(codes, 2)
    return (codes - mean) @ components.T


def save_scatter_plots(panels, labels, class_names, path, size=400):
    """Scatter plots side by side; where there are labels, points coloured by class (the ten
    colours repeat beyond ten classes) with a legend of the class names.

    Args:
        panels: [(title, points of shape (n, 2))].
        labels: (n,) class of each point, or None.
        class_names: the name of each class number, or None.
    """
    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default()
    top, margin = 40, 10
    legend = 130 if labels is not None else 0
    image = Image.new("RGB", (len(panels) * (size + margin) + margin + legend, size + top + margin),
                      "white")
    draw = ImageDraw.Draw(image)
    for i, (title, points) in enumerate(panels):
        x0 = margin + i * (size + margin)
        draw.text((x0, 8), title, fill="black", font=font)
        draw.rectangle([x0, top, x0 + size, top + size], outline="black")
        lo, hi = np.percentile(points, [0.5, 99.5], axis=0)  # a few outliers don't squash the rest
        xy = np.clip((points - lo) / np.maximum(hi - lo, 1e-12), 0, 1) * (size - 8) + 4
        for k, (px, py) in enumerate(xy):
            px, py = x0 + px, top + size - py  # y grows upwards, as on a plot
            colour = COLOURS[labels[k] % len(COLOURS)] if labels is not None else COLOURS[0]
            draw.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill=colour)
    if labels is not None:
        x0 = margin + len(panels) * (size + margin)
        shown = (size - 20) // 18
        for c, name in enumerate(class_names[:shown]):
            y = top + 10 + 18 * c
            draw.rectangle([x0, y, x0 + 10, y + 10], fill=COLOURS[c % len(COLOURS)])
            draw.text((x0 + 16, y - 1), name[:18], fill="black", font=font)
        if len(class_names) > shown:
            draw.text((x0 + 16, top + 10 + 18 * shown), f"... {len(class_names)} in all",
                      fill="black", font=font)
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def compare_with_pca(encode, ae_figures, data, h_dim, path):
    """ae.py --compare-pca: PCA with h_dim components against the autoencoder (its encode(images)
    of uint8 images, a NumPy array, and its test figures ae_figures) on the test set: reconstruction
    BCE and MSE, with --classes how well PCA's squared error tells the held-out classes, and,
    where the data have labels, 5-nearest-neighbour accuracy on the codes. Writes pca_vs_ae.json
    and .png, at path(name)."""
    y_train, y_test = data.y_train, data.y_test
    # the PCA of the pixels as stored (0-255, no float copy of the training set): the same
    # directions as that of the pixels / 255, and 255 times the mean
    mean, components = fit_pca(data.x_train.reshape(len(data.x_train), -1), h_dim)
    mean = mean / 255.0
    pca_train, pca_test = (utils.in_chunks(lambda x: (x - mean) @ components.T, images)
                           for images in (data.x_train, data.x_test))
    x_test_f = utils.to_float(data.x_test)
    # PCA's reconstructions are not probabilities: clipped to [0, 1], and BCE taken as Keras
    # takes it on probabilities (clipped to [1e-7, 1 - 1e-7])
    pca_rec = np.clip(pca_test @ components + mean, 0.0, 1.0).astype(np.float32)
    ae_train, ae_test = encode(data.x_train), encode(data.x_test)
    figures = {
        "pca": {"bce": float(np.mean(keras.losses.binary_crossentropy(x_test_f, pca_rec))),
                "mse": float(np.mean((pca_rec - x_test_f) ** 2))},
        "ae": dict(ae_figures),
    }
    if data.x_held_out is not None:  # PCA's squared error as the anomaly score
        def pca_error(x):
            return np.sum((np.clip((x - mean) @ components.T @ components + mean, 0, 1) - x) ** 2, 1)
        figures["pca"].update(held_out_figures(utils.in_chunks(pca_error, data.x_test),
                                                       utils.in_chunks(pca_error, data.x_held_out)))
    if y_train is not None and len(np.unique(y_train)) > 1:
        figures["pca"]["knn_accuracy"] = knn_accuracy(pca_train, y_train, pca_test, y_test, k=5)
        figures["ae"]["knn_accuracy"] = knn_accuracy(ae_train, y_train, ae_test, y_test, k=5)
    write_json(path("pca_vs_ae.json"), figures)
    note = "" if h_dim == 2 else f" (first 2 principal directions of {h_dim}-D codes)"
    save_scatter_plots([(f"PCA{note}", first_two_directions(pca_test)),
                              (f"autoencoder{note}", first_two_directions(ae_test))],
                             y_test, data.class_names, path("pca_vs_ae.png"))
    for name in ("pca", "ae"):
        f = figures[name]
        accuracy = (f"  5-NN accuracy {f['knn_accuracy']:.4f}" if "knn_accuracy" in f
                    else "  (no labels, so no 5-NN accuracy)")
        print(f"{name:>3} with {h_dim} dimensions: test bce {f['bce']:.4f}  mse "
              f"{f['mse']:.4f}{accuracy}", flush=True)
    return figures
