"""Anomaly detection with a trained model: the threshold from the run's test set, and how well
a score tells the classes held out by --classes from the ones trained on (AUROC, average
precision)."""

import numpy as np

import utils


DEFAULT_QUANTILE = 0.99  # the threshold: the score exceeded by 1% of the run's test images


def scores_of(score, images, chunk=2000):
    """score (float rows in [0, 1] -> a tensor of one score per row) of uint8 images
    (n, h, w, c), chunk by chunk; a float64 NumPy array (n,)."""
    return utils.in_chunks(lambda x: np.asarray(score(x), np.float64), images, chunk)


def threshold(scores, quantile):
    """The score that a share 1 - quantile of the scores exceed (NumPy's quantile, linear between
    the two nearest scores)."""
    return float(np.quantile(scores, quantile))


def auroc(is_anomaly, scores):
    """Area under the ROC curve: the chance that an anomaly scores above a normal image, ties
    counting one half (the Mann-Whitney U statistic, from mid-ranks)."""
    is_anomaly = np.asarray(is_anomaly, bool)
    positives, negatives = int(is_anomaly.sum()), int((~is_anomaly).sum())
    if not positives or not negatives:
        raise ValueError("AUROC needs anomalies and normal images")
    ranks = mid_ranks(np.asarray(scores, np.float64))
    u = ranks[is_anomaly].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def mid_ranks(values):
    """Ranks from 1, tied values each taking the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]  # each run of equal values: [start, end)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def average_precision(is_anomaly, scores):
    """Average precision, the anomalies positive: the precision at each distinct score taken as
    the threshold, weighted by the share of anomalies it adds (scikit-learn's definition, tied
    scores entering together)."""
    is_anomaly = np.asarray(is_anomaly, bool)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    s, hits = np.asarray(scores, np.float64)[order], is_anomaly[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    true_pos = np.cumsum(hits)[last_of_tie]
    taken = np.flatnonzero(last_of_tie) + 1
    recall_gain = np.diff(np.r_[0, true_pos]) / max(1, hits.sum())
    return float(np.sum(recall_gain * true_pos / taken))


def detection_figures(score, data, quantile):
    """summary.json's anomaly figures for a model's score, printed in one line: the threshold on
    the run's test images, and, where --classes held classes out, how the score tells those test
    images (the anomalies) from the test images of the classes trained on."""
    normal = scores_of(score, data.x_test)
    figures = {"threshold_quantile": quantile, "anomaly_threshold": threshold(normal, quantile)}
    line = (f"anomaly threshold: score {figures['anomaly_threshold']:.2f}, exceeded by "
            f"{1 - quantile:.1%} of the test images")
    if data.x_held_out is not None:
        figures.update(held_out_figures(normal, scores_of(score, data.x_held_out)))
        line += (f";  the {figures['held_out_test_images']:,} test images of the other classes "
                 f"as anomalies: AUROC {figures['anomaly_auroc']:.4f}, average precision "
                 f"{figures['anomaly_average_precision']:.4f}")
    print(line, flush=True)
    return figures


def held_out_figures(normal, held_out):
    """AUROC and average precision of telling held-out images (positive) from normal ones."""
    labels = np.r_[np.zeros(len(normal), bool), np.ones(len(held_out), bool)]
    scores = np.r_[normal, held_out]
    return {"anomaly_auroc": auroc(labels, scores),
            "anomaly_average_precision": average_precision(labels, scores),
            "held_out_test_images": int(len(held_out))}
