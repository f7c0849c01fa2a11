"""Benchmark: how close ae.py and vae.py train to the machine's float32 matmul limit.

Usage: python tests/benchmark.py [--epochs 12] [--eager-epochs 3] [--data-dir DIR]

Measures, in one run on this machine (not collected by pytest):
  1. the achievable float32 matmul rate (4096^3 tf.matmul in a tf.function, best of 5);
  2. each model's training FLOPs per epoch from its layer sizes: forward, weight gradients, and
     input gradients except for the first layer: 2 * (3 * forward MACs - first-layer MACs) * 60000;
  3. the steady training epoch of `python ae.py` / `python vae.py` run as users run them (the
     `seconds` column of their history.csv, median over the epochs after the first two; each
     script runs twice, interleaved, and the faster run counts, as noise only adds time);
  4. what runs around training per epoch (test-set evaluation, grids, history row, checkpoint):
     the median time between two epoch lines of the script's output, minus its training
     seconds; and, of that, the checkpoint alone (the same tf.train.CheckpointManager save of
     model, optimizer and generator, timed here, median of 20);
  5. the same models trained by a plain eager GradientTape loop over tf.data batches, like the
     tutorial's code (without its per-step image saving, so the comparison favours it);
  6. the peak resident memory of each script's process.
Then prints a table; the FLOP-limit time is 2. / 1.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import ae  # noqa: E402
import utils  # noqa: E402
import vae  # noqa: E402

N_TRAIN = 60000


def matmul_rate(n=4096, repeats=5):
    """Best float32 FLOP/s of an n x n x n matmul."""
    a = tf.random.normal([n, n])
    b = tf.random.normal([n, n])
    matmul = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))
    float(matmul(a, b))  # trace and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        float(matmul(a, b))  # the result fetched, so the work is done
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def training_flops(model, n=N_TRAIN):
    """2 * (3 * forward MACs - first-layer MACs) * n, from the Dense kernels' shapes."""
    kernels = [v for v in model.trainable_variables if len(v.shape) == 2]
    macs = [int(k.shape[0]) * int(k.shape[1]) for k in kernels]
    return 2 * (3 * sum(macs) - macs[0]) * n


def run_script(script, epochs, data_dir, out):
    """Run `python script` as a user would; return training seconds, epoch wall times, peak RSS."""
    cmd = [sys.executable, os.path.join(ROOT, script), "--epochs", str(epochs), "--out", out]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stamps = []
    for line in proc.stdout:
        if line.startswith("epoch "):
            stamps.append(time.perf_counter())
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"benchmark: {' '.join(cmd)} failed with exit code {proc.returncode}")
    with open(os.path.join(out, "history.csv")) as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    walls = [b - a for a, b in zip(stamps, stamps[1:])]  # walls[i]: epoch i + 2
    peak_bytes = usage.ru_maxrss * 1024  # kilobytes on Linux
    return seconds[2:], walls[1:], peak_bytes


def checkpoint_seconds(model, repeats=20):
    """Median time of one CheckpointManager.save of model, Adam and a generator, as the scripts
    save after every epoch."""
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=tf.Variable(0),
                                     generator=tf.random.Generator.from_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        manager = tf.train.CheckpointManager(checkpoint, folder, max_to_keep=3)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            manager.save()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def eager_epochs(model, loss_fn, x_train, epochs, batch_size=512):
    """The tutorial's loop: tf.data batches, eager GradientTape, Adam; seconds per epoch."""
    optimizer = keras.optimizers.Adam(1e-3)
    data = tf.data.Dataset.from_tensor_slices(x_train).shuffle(batch_size * 5).batch(batch_size)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for x in data:
            x = tf.cast(x, tf.float32) / 255.0
            with tf.GradientTape() as tape:
                loss = loss_fn(model, x)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
        float(loss)
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12, help="epochs of each script (>= 4)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each script; the best counts")
    parser.add_argument("--eager-epochs", type=int, default=3, help="epochs of the eager loops")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: as the scripts)")
    args = parser.parse_args()

    devices = tf.config.list_physical_devices("GPU")
    device = f"GPU: {tf.config.experimental.get_device_details(devices[0]).get('device_name', devices[0].name)}" \
        if devices else f"CPU: {os.cpu_count()} cores"
    print(f"device {device}, TensorFlow {tf.__version__}", flush=True)
    # The scripts run first, in their own processes, while this one has not yet started
    # TensorFlow's thread pools (which, once busy, slow a neighbour on a small machine).
    # Each script runs --repeats times, interleaved; a run's figure is its median epoch, and the
    # best run counts (noise from a shared machine only ever adds time), as for the matmul rate.
    runs = {"ae.py": [], "vae.py": []}
    for _ in range(args.repeats):
        for script in runs:
            with tempfile.TemporaryDirectory() as out:
                seconds, walls, peak = run_script(script, args.epochs, args.data_dir, out)
            runs[script].append((statistics.median(seconds), statistics.median(walls), peak))
            print(f"{script}: {runs[script][-1][0]:.3f} s per training epoch", flush=True)
    scripts = {script: min(results) for script, results in runs.items()}
    rate = matmul_rate()
    print(f"float32 matmul 4096^3: {rate / 1e9:.0f} GFLOP/s", flush=True)

    (x_train, _), _ = utils.load_fashion_mnist(args.data_dir)
    x_train = tf.constant(x_train.reshape(-1, 784))
    z_dim = 10
    eps = lambda x: tf.random.normal([tf.shape(x)[0], z_dim])
    models = {
        "ae.py": (ae.AE(20), lambda m, x: ae.compute_loss(m, x, x)["bce"]),
        "vae.py": (vae.VAE(z_dim), lambda m, x: vae.compute_loss(m, x, eps(x))["loss"]),
    }
    rows = []
    for script, (model, loss_fn) in models.items():
        eager = statistics.median(eager_epochs(model, loss_fn, x_train, args.eager_epochs))
        checkpoint_s = checkpoint_seconds(model)
        flops = training_flops(model)
        train_s, wall_s, _ = scripts[script]
        peak = max(run[2] for run in runs[script])
        limit_s = flops / rate
        around = 100 * (wall_s - train_s) / train_s
        rows.append((script, train_s, flops / 1e9, limit_s, train_s / limit_s, around,
                     around - 100 * checkpoint_s / train_s, eager, eager / train_s, peak / 2**30))
        print(f"{script}: eager loop {eager:.2f} s per epoch", flush=True)

    print()
    print("| script | s/epoch (median) | GFLOP/epoch | FLOP-limit s | ratio | around training "
          "| without checkpoint | eager loop s/epoch | speed-up | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.1f} | {r[3]:.3f} | {r[4]:.2f}x | +{r[5]:.1f}% "
              f"| +{r[6]:.1f}% | {r[7]:.2f} | {r[8]:.1f}x | {r[9]:.2f} GB |")
    print(f"\n{device}; matmul {rate / 1e9:.0f} GFLOP/s; script epochs {args.epochs} "
          f"(median of epochs 3-{args.epochs}, best of {args.repeats} runs), "
          f"eager epochs {args.eager_epochs}")


if __name__ == "__main__":
    main()
