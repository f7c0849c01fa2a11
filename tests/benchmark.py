"""Benchmark: ae.py and vae.py against the machine's matmul limit and against PyTorch and JAX.

Usage: python tests/benchmark.py [--epochs 12] [--loop-epochs 4] [--repeats 2] [--data-dir DIR]
       python tests/benchmark.py --overhead [--epochs N] [--repeats 1] [--data-dir DIR]
       python tests/benchmark.py --folder [--epochs 12] [--repeats 2] [--data-dir DIR] [--export DIR]
       python tests/benchmark.py --one-class [--ae-epochs 100] [--vae-epochs 100] [--export DIR]
       python tests/benchmark.py --conv [--conv-epochs 4] [--loop-epochs 4] [--repeats 2]

Measures, in one run on this machine (not collected by pytest):
  1. float32 matmul rates: a 4096^3 tf.matmul, and the models' own products (each Dense layer's
     forward product at batch 512, e.g. 512 x 784 x 256, and its two gradient products, the
     transposes), XLA-compiled, best of 5;
  2. each model's FLOPs per epoch from its layer sizes: training, forward, weight gradients, and
     input gradients except for the first layer, 2 * (3 * forward MACs - first-layer MACs) *
     60000, and the test set's forward pass, 2 * forward MACs * 10000; the FLOP-limit time is
     that over the rate of the models' own products;
  3. the epoch of `python ae.py` / `python vae.py` run as users run them (the `seconds` column of
     their history.csv: one compiled call that trains and then evaluates the whole test set;
     median over the epochs after the first two), and peak memory (what runs around the epochs
     is --overhead's to measure);
  4. the same models and epochs (a fresh permutation, batches of 512, the short last batch kept,
     Adam 1e-3, then the loss of the 10,000 test images) run by: the tutorial's eager
     GradientTape loop over tf.data batches; a loop calling one XLA-compiled tf.function per
     batch (so Python's per-batch dispatch stays, and only the whole-epoch design is left out);
     PyTorch in eager mode and JAX with a whole epoch as one jitted lax.scan, each when installed
     (they are optional, never requirements).
Every contender gets --repeats runs, interleaved; a run's figure is its median epoch after the
first (compilation, warm-up), and the best run counts, as noise on a shared machine only ever
adds time.

With --overhead, it measures the time around training instead: `python ae.py` and `python
vae.py` run as users run them, with their default flags (100 and 1000 epochs; --epochs N for a
shorter check), and, from the moments their epoch lines appear, the whole process's wall time,
the epochs (the `seconds` column of history.csv: each epoch's one compiled call, its training
and then the whole test set's figures and the grids' images) and what is left: start-up (to the
end of epoch 1, less its call, whose compilation so counts in the epochs), the median work
between two epochs (checkpoint, history row, progress line; the files are written meanwhile),
and the end (final weights, progress.gif, the end-of-run figures). The target: the time around
the epochs at most 8% of the wall time, for both scripts. It also times the whole-test-set evaluation alone (the scripts' compute_loss on the
10,000 test images, XLA-compiled, best of 20), against the epoch, and gives the share around
training that counting it outside the epochs would give. The sample-quality
classifier is trained and cached before the runs, as it is once per machine; the files and bytes
each run leaves are counted (tests/overhead_bench.py).

With --folder, it measures your-own-images data instead: Fashion-MNIST written out as 70,000 PNG
files in class folders (train/ and test/), loaded by --dataset FOLDER (time and images per
second; the target is at most 15 s on a 2-core machine), checked to hold the same pixels and
labels as the IDX files, and `python ae.py` trained on the folder against the IDX files (the
seconds per epoch, and the peak memory, which may exceed the IDX run's by the decoded data;
tests/folder_bench.py).

With --one-class, it measures anomaly detection instead: the one-class table of Fashion-MNIST
for the scripts, PCA and scikit-learn's detectors (see tests/one_class.py).

With --conv, it measures the epoch of --arch conv against PyTorch and JAX (see tests/conv_bench.py).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tool.quiet  # noqa: E402,F401  (first: TensorFlow loads quietly)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import ae  # noqa: E402
import vae  # noqa: E402
import tool.data  # noqa: E402
import tool.quality  # noqa: E402
import tool.sources  # noqa: E402
import conv_bench  # noqa: E402  (tests/conv_bench.py)
import one_class  # noqa: E402  (tests/one_class.py)
from bench_runs import available, best_seconds, cpu_model, epoch_and_peak, run_script  # noqa: E402
from folder_bench import folder_benchmark  # noqa: E402
from overhead_bench import overhead_benchmark  # noqa: E402

BATCH = 512
WIDTHS = {"ae.py": [784, 256, 128, 20, 128, 256, 784],  # the Dense layers, input to output
          "vae.py": [784, 128, 20, 128, 784]}  # fc2 and fc3 side by side as one 128 -> 20
Z_DIM = 10


def matmul_rate(n=4096):
    """Best float32 FLOP/s of an n x n x n matmul."""
    a, b = tf.random.normal([n, n]), tf.random.normal([n, n])
    matmul = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)), jit_compile=True)
    return 2 * n ** 3 / best_seconds(lambda: float(matmul()))


def shape_rate(widths, batch=BATCH, calls=20):
    """Best float32 FLOP/s of a model's own products: per layer m -> n at batch b, x @ W
    (b x m x n), x^T @ dy (m x b x n) and dy @ W^T (b x n x m), 20 times in one call."""
    mats = [(tf.random.normal([batch, m]), tf.random.normal([m, n]), tf.random.normal([batch, n]))
            for m, n in zip(widths, widths[1:])]

    @tf.function(jit_compile=True)
    def products():
        total = 0.0
        for i in tf.range(calls):
            for x, w, dy in mats:
                s = tf.cast(i, tf.float32) * 1e-9  # a new input each time, so nothing is hoisted
                total += tf.reduce_sum(tf.matmul(x + s, w)) + tf.reduce_sum(tf.matmul(x + s, dy, transpose_a=True)) \
                    + tf.reduce_sum(tf.matmul(dy + s, w, transpose_b=True))
        return total

    flops = calls * sum(3 * 2 * batch * m * n for m, n in zip(widths, widths[1:]))
    return flops / best_seconds(lambda: float(products()))


def epoch_flops(widths, n=60000, n_test=10000):
    """An epoch's training and test-set evaluation."""
    macs = [m * k for m, k in zip(widths, widths[1:])]
    return 2 * (3 * sum(macs) - macs[0]) * n + 2 * sum(macs) * n_test


# --- TensorFlow loops: the tutorial's eager one, and one compiled call per batch ---------------

def tf_loss(script):
    if script == "ae.py":
        return ae.AE(20), lambda m, x: ae.compute_loss(m, x, x)["bce"]
    return vae.VAE(Z_DIM), lambda m, x: vae.compute_loss(m, x, tf.random.normal([tf.shape(x)[0], Z_DIM]))["loss"]


def tf_loop(script, x_train, x_test, epochs, compiled):
    model, loss_fn = tf_loss(script)
    optimizer = keras.optimizers.Adam(1e-3)
    x_test = tf.constant(x_test, tf.float32) / 255.0

    def evaluate():
        return loss_fn(model, x_test)

    def step(x):
        x = tf.cast(x, tf.float32) / 255.0
        with tf.GradientTape() as tape:
            loss = loss_fn(model, x)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    if compiled:
        step = tf.function(step, jit_compile=True)  # two shapes: full batches, the last one
        evaluate = tf.function(evaluate, jit_compile=True)
    data = tf.data.Dataset.from_tensor_slices(x_train).shuffle(len(x_train)).batch(BATCH)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for x in data:
            loss = step(x)
        float(loss), float(evaluate())
        times.append(time.perf_counter() - start)
    return times


# --- PyTorch, eager ----------------------------------------------------------------------------

def torch_loop(script, x_train, x_test, epochs):
    import torch
    from torch import nn
    torch.manual_seed(0)
    x_all = torch.from_numpy(np.array(x_train))  # a writable copy, as torch wants
    x_test = torch.from_numpy(np.array(x_test)).float() / 255.0
    if script == "ae.py":
        model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                              nn.Linear(128, 20), nn.Linear(20, 128), nn.ReLU(),
                              nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 784))

        def loss_fn(x):
            return nn.functional.binary_cross_entropy_with_logits(model(x), x)
    else:
        encoder, heads = nn.Sequential(nn.Linear(784, 128), nn.ReLU()), nn.Linear(128, 2 * Z_DIM)
        decoder = nn.Sequential(nn.Linear(Z_DIM, 128), nn.ReLU(), nn.Linear(128, 784))
        model = nn.ModuleList([encoder, heads, decoder])

        def loss_fn(x):
            mu, log_var = heads(encoder(x)).chunk(2, dim=1)
            z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
            rec = nn.functional.binary_cross_entropy_with_logits(decoder(z), x, reduction="sum") / len(x)
            kl = -0.5 * torch.sum(1 + log_var - mu ** 2 - log_var.exp()) / len(x)
            return rec + kl
    return conv_bench.torch_train(model, loss_fn, x_all, x_test, epochs)


# --- JAX: a whole epoch as one jitted lax.scan -------------------------------------------------

def jax_loop(script, x_train, x_test, epochs):
    import jax
    import jax.numpy as jnp

    def dense(key, m, n):
        return {"w": jax.random.normal(key, (m, n)) * jnp.sqrt(2.0 / m), "b": jnp.zeros(n)}

    keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))
    if script == "ae.py":
        sizes = [784, 256, 128, 20, 128, 256, 784]
        params = [dense(next(keys), m, n) for m, n in zip(sizes, sizes[1:])]

        def loss_fn(params, x, key):
            h = x
            for i, layer in enumerate(params):
                h = h @ layer["w"] + layer["b"]
                if i not in (2, len(params) - 1):  # the code and the logits stay linear
                    h = jax.nn.relu(h)
            return jnp.mean(jnp.maximum(h, 0) - h * x + jnp.log1p(jnp.exp(-jnp.abs(h))))
    else:
        params = [dense(next(keys), 784, 128), dense(next(keys), 128, 2 * Z_DIM),
                  dense(next(keys), Z_DIM, 128), dense(next(keys), 128, 784)]

        def loss_fn(params, x, key):
            h = jax.nn.relu(x @ params[0]["w"] + params[0]["b"])
            mu, log_var = jnp.split(h @ params[1]["w"] + params[1]["b"], 2, axis=1)
            z = mu + jnp.exp(0.5 * log_var) * jax.random.normal(key, mu.shape)
            logits = jax.nn.relu(z @ params[2]["w"] + params[2]["b"]) @ params[3]["w"] + params[3]["b"]
            rec = jnp.sum(jnp.maximum(logits, 0) - logits * x + jnp.log1p(jnp.exp(-jnp.abs(logits)))) / len(x)
            kl = -0.5 * jnp.sum(1 + log_var - mu ** 2 - jnp.exp(log_var)) / len(x)
            return rec + kl

    return conv_bench.jax_train(params, loss_fn, x_train, x_test, epochs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12, help="epochs of each script run (>= 4)")
    parser.add_argument("--loop-epochs", type=int, default=4,
                        help="epochs of each other contender's run (>= 2; the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of every contender; the best counts")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: as the scripts)")
    parser.add_argument("--overhead", action="store_true",
                        help="measure the time around training in default runs instead")
    parser.add_argument("--folder", action="store_true",
                        help="measure loading a folder of PNG files and training on it instead")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="with --folder: write the PNG files into DIR (a new folder) and keep "
                        "them (default: a temporary folder); with --one-class: write "
                        "one_class.json there")
    one_class.add_flags(parser)
    conv_bench.add_flags(parser)
    args = parser.parse_args()
    if args.one_class:
        args.machine = f"CPU: {cpu_model()}, {os.cpu_count()} cores"
        return one_class.one_class_benchmark(args)
    args.epochs_given = "--epochs" in sys.argv[1:] or any(a.startswith("--epochs=") for a in sys.argv[1:])
    if args.folder:
        return folder_benchmark(args)
    if args.overhead:
        return overhead_benchmark(args)

    gpus = tf.config.list_physical_devices("GPU")
    device = (f"GPU: {tf.config.experimental.get_device_details(gpus[0]).get('device_name', gpus[0].name)}"
              if gpus else f"CPU: {cpu_model()}, {os.cpu_count()} cores")
    print(f"{device}; TensorFlow {tf.__version__}", flush=True)
    (x_train, _), (x_test, _) = tool.sources.load_fashion_mnist(args.data_dir)
    x_train, x_test = x_train.reshape(-1, 784), x_test.reshape(-1, 784)
    if args.conv:
        return conv_bench.conv_benchmark(args, run_script, available, device, x_train, x_test)
    loops = {"eager": lambda s: tf_loop(s, x_train, x_test, args.loop_epochs, compiled=False),
             "per-step": lambda s: tf_loop(s, x_train, x_test, args.loop_epochs, compiled=True)}
    if available("torch"):
        loops["PyTorch"] = lambda s: torch_loop(s, x_train, x_test, args.loop_epochs)
    if available("jax"):
        loops["JAX"] = lambda s: jax_loop(s, x_train, x_test, args.loop_epochs)

    results = {}  # (script, contender) -> [(train s, wall s, peak bytes)]
    for repeat in range(args.repeats):
        for script in WIDTHS:
            # the script first, in its own process, while this one's thread pools are idle
            with tempfile.TemporaryDirectory() as out:
                figures = epoch_and_peak(run_script(script, args.data_dir, out, "--epochs",
                                                    str(args.epochs)))
            results.setdefault((script, "script"), []).append(figures)
            for name, loop in loops.items():
                figure = statistics.median(loop(script)[1:])
                results.setdefault((script, name), []).append((figure, None))
            print(f"run {repeat + 1}: {script}: " + ", ".join(
                f"{name} {runs[-1][0]:.3f} s" for (s, name), runs in results.items() if s == script),
                flush=True)

    cube = matmul_rate()
    print(f"\nfloat32 matmul 4096^3: {cube / 1e9:.0f} GFLOP/s", flush=True)
    peers = [name for name in loops if name in ("PyTorch", "JAX")]
    print("\n| script | s/epoch | GFLOP/epoch | own-shapes GFLOP/s | FLOP-limit s | ratio "
          "| peak RSS | eager loop | per-step tf.function | "
          + " | ".join(peers) + (" | fastest peer / script" if peers else "") + " |")
    print("|---" * (9 + len(peers) + bool(peers)) + "|")
    for script, widths in WIDTHS.items():
        best = {name: min(runs, key=lambda run: run[0]) for (s, name), runs in results.items()
                if s == script}
        train_s = best["script"][0]
        peak = max(run[1] for run in results[(script, "script")])
        rate = shape_rate(widths)
        limit_s = epoch_flops(widths) / rate
        cells = [f"{train_s:.3f}", f"{epoch_flops(widths) / 1e9:.1f}", f"{rate / 1e9:.0f}",
                 f"{limit_s:.3f}", f"{train_s / limit_s:.2f}x", f"{peak / 2**30:.2f} GiB"]
        cells += [f"{best[name][0]:.3f} ({best[name][0] / train_s:.1f}x)" for name in ("eager", "per-step")]
        cells += [f"{best[name][0]:.3f}" for name in peers]
        if peers:
            fastest = min(best[name][0] for name in peers)
            cells.append(f"{fastest / train_s:.2f}x")  # the target: at least 1.10x
        print(f"| {script} | " + " | ".join(cells) + " |")
    print(f"\nseconds per epoch (training, then the test set's loss); {device}; script runs of {args.epochs} epochs (median of "
          f"epochs 3-{args.epochs}), other runs of {args.loop_epochs} (median of epochs "
          f"2-{args.loop_epochs}); best of {args.repeats} runs each")


if __name__ == "__main__":
    main()
