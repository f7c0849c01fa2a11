"""The one-class benchmark (python tests/benchmark.py --one-class): each Fashion-MNIST class in
turn as the normal one, trained on its 6,000 training images, all 10,000 test images scored,
the other classes' as anomalies; AUROC per class and the mean.

Contenders: `python ae.py --classes C` (its anomaly score, and with --compare-pca PCA's squared
reconstruction error), `python vae.py --classes C`, run as users run them; and, when
scikit-learn is installed (optional, never a requirement), IsolationForest, a one-class SVM and
the distance to the k-th nearest training image in pixels (k = 1 and 5), on the same images
scaled to [0, 1]. Run from benchmark.py, which passes its arguments.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def script_aurocs(script, c, epochs, data_dir, folder, extra=()):
    """({name: AUROC}, the run's folder) of one run of script with class c as the normal one."""
    out = os.path.join(folder, f"{script[:-3]}-{c}")
    command = [sys.executable, os.path.join(ROOT, script), "--classes", str(c), "--epochs",
               str(epochs), "--fd-samples", "0", "--out", out, *extra]
    if data_dir:
        command += ["--data-dir", data_dir]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=folder)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    figures = {script: summary["anomaly_auroc"]}
    if "pca_vs_ae" in summary:
        figures["PCA"] = summary["pca_vs_ae"]["pca"]["anomaly_auroc"]
    return figures, out


def candidate_scores(script, out, x_train, x_test):
    """{name: scores of x_test} of the anomaly scores tried for the model of the run in out
    (loaded from its .keras file), the script's own score among them; floats in [0, 1]."""
    import keras
    import tensorflow as tf
    import ae  # noqa: F401  (registers the models with Keras)
    import vae
    import utils
    model = keras.models.load_model(os.path.join(out, script[:-3] + ".keras"))
    x = tf.constant(x_test, tf.float32)
    logits = model.reconstruct(x)
    bce = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits), -1)
    scores = {"summed BCE": bce, "BCE less the image's entropy": utils.excess_bce(x, logits),
              "squared error": tf.reduce_sum(tf.square(tf.sigmoid(logits) - x), -1)}
    codes = model.codes(x)
    first = codes["code" if "code" in codes else "mean"].numpy()
    train_codes = model.codes(tf.constant(x_train, tf.float32))
    train = train_codes["code" if "code" in train_codes else "mean"].numpy()
    precision = np.linalg.inv(np.cov(train.T) + 1e-6 * np.eye(train.shape[1]))
    centred = first - train.mean(0)
    scores["code distance (Mahalanobis)"] = np.einsum("ij,jk,ik->i", centred, precision, centred)
    if "log_var" in codes:
        kl = vae.kl_divergence(codes["mean"], codes["log_var"])
        scores["negative ELBO"] = bce + kl
        scores["KL term"] = kl
    scores["the script's score"] = model.score(x)
    return {name: np.asarray(v, np.float64) for name, v in scores.items()}


def peer_aurocs(x_train, x_test, is_anomaly):
    """{name: AUROC} of scikit-learn's detectors fitted on x_train (floats in [0, 1])."""
    from sklearn.ensemble import IsolationForest
    from sklearn.metrics import roc_auc_score
    from sklearn.neighbors import NearestNeighbors
    from sklearn.svm import OneClassSVM
    figures = {
        "IsolationForest": -IsolationForest(random_state=0).fit(x_train).score_samples(x_test),
        "one-class SVM": -OneClassSVM(gamma="scale", nu=0.1).fit(x_train).score_samples(x_test),
    }
    distances, _ = NearestNeighbors(n_neighbors=5).fit(x_train).kneighbors(x_test)
    figures["1-NN distance"], figures["5-NN distance"] = distances[:, 0], distances[:, 4]
    return {name: float(roc_auc_score(is_anomaly, scores)) for name, scores in figures.items()}


def one_class_benchmark(args):
    """Print the table (markdown), and with --export write it as one_class.json there."""
    import tool.quiet  # noqa: F401
    from tool.sources import load_fashion_mnist
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(args.data_dir)
    try:
        import sklearn  # noqa: F401
        peers = True
    except ImportError:
        peers = False
        print("scikit-learn is not installed: the table has the scripts and PCA only")
    from tool.anomaly import auroc
    rows, candidates, started = {}, {}, time.perf_counter()
    x_test_f = x_test.reshape(-1, 784) / 255.0
    with tempfile.TemporaryDirectory() as folder:
        for c in args.classes:
            row = {}
            x_train_c = x_train[y_train == c].reshape(-1, 784) / 255.0
            for script, epochs, extra in (
                    ("ae.py", args.ae_epochs, ["--compare-pca", *args.ae_flags.split()]),
                    ("vae.py", args.vae_epochs, ["--iw-samples", "10", *args.vae_flags.split()])):
                figures, out = script_aurocs(script, c, epochs, args.data_dir, folder, extra)
                row.update(figures)
                for name, scores in candidate_scores(script, out, x_train_c, x_test_f).items():
                    candidates.setdefault((script, name), []).append(auroc(y_test != c, scores))
            if peers:
                row.update(peer_aurocs(x_train_c, x_test_f, y_test != c))
            rows[c] = row
            print(f"class {c}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    print_table(rows)
    print("\nThe scores tried, mean AUROC over the classes (each script's own is the last):")
    for (script, name), aurocs in candidates.items():
        print(f"  {script} {name}: {statistics.mean(aurocs):.4f}")
    print(f"AUROC, the other classes' test images as anomalies; ae.py {args.ae_epochs} epochs "
          f"{args.ae_flags or '(default flags)'}, vae.py {args.vae_epochs} epochs "
          f"{args.vae_flags or '(default flags)'}; {args.machine}; "
          f"{time.perf_counter() - started:.0f} s in all")
    if args.export:
        os.makedirs(args.export, exist_ok=True)
        with open(os.path.join(args.export, "one_class.json"), "w") as f:
            json.dump({"aurocs": {str(c): row for c, row in rows.items()},
                       "scores_tried": {f"{s} {n}": v for (s, n), v in candidates.items()}}, f, indent=1)


def print_table(rows):
    """The markdown table: AUROC per class, the mean, and on how many classes the best script
    is ahead of each other detector."""
    from tool.data import CLASS_NAMES
    names = list(next(iter(rows.values())))
    print("| normal class | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for c, row in rows.items():
        best = max(row.values())
        print(f"| {c} {CLASS_NAMES[c]} | " + " | ".join(
            (f"**{row[n]:.3f}**" if row[n] == best else f"{row[n]:.3f}") for n in names) + " |")
    means = {n: statistics.mean(row[n] for row in rows.values()) for n in names}
    print("| mean | " + " | ".join(f"{means[n]:.4f}" for n in names) + " |")
    scripts = [n for n in names if n.endswith(".py")]
    best_script = max(scripts, key=means.get)
    ahead = {n: sum(row[best_script] > row[n] for row in rows.values()) for n in names
             if n not in scripts}
    print(f"{best_script} (mean {means[best_script]:.4f}) is ahead on: " + ", ".join(
        f"{n} {k} of {len(rows)} classes" for n, k in ahead.items()))
    return means


def add_flags(parser):
    parser.add_argument("--one-class", action="store_true",
                        help="the one-class anomaly table instead (see tests/one_class.py)")
    parser.add_argument("--classes", type=lambda t: [int(c) for c in t.split(",")],
                        default=list(range(10)), help="--one-class: the normal classes to try")
    parser.add_argument("--ae-epochs", type=int, default=100, help="--one-class: ae.py's epochs")
    parser.add_argument("--vae-epochs", type=int, default=100, help="--one-class: vae.py's epochs")
    parser.add_argument("--ae-flags", default="", help="--one-class: more flags for ae.py")
    parser.add_argument("--vae-flags", default="", help="--one-class: more flags for vae.py")
