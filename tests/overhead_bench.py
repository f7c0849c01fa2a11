"""The --overhead benchmark (python tests/benchmark.py --overhead): the time around the epochs
of `python ae.py` and `python vae.py` run with their default flags (see tests/benchmark.py)."""

import argparse
import os
import statistics
import sys
import tempfile

import tensorflow as tf

import ae
import vae
import tool.quality
import tool.sources
from bench_runs import best_seconds, cpu_model, run_script

SCRIPTS, Z_DIM = ("ae.py", "vae.py"), 10


def time_parts(run, out):
    """The parts of a script run's wall time, in seconds, and what it left in out."""
    seconds, stamps, wall = run["seconds"], run["stamps"], run["wall"]
    between = [b - a - s for a, b, s in zip(stamps, stamps[1:], seconds[1:])]
    files = [os.path.join(folder, name) for folder, _, names in os.walk(out) for name in names]
    return {"wall": wall, "train": sum(seconds), "epochs": len(seconds),
            "start": stamps[0] - seconds[0], "per_epoch": statistics.median(between),
            "end": wall - stamps[-1], "epoch": statistics.median(seconds[1:]),
            "files": len(files), "bytes": sum(os.path.getsize(p) for p in files)}


def evaluation_seconds(script, x_test):
    """Best time of the script's loss on the whole test set, XLA-compiled as in the scripts."""
    x = tf.constant(x_test.reshape(len(x_test), -1), tf.float32) / 255.0
    model = ae.AE(20, 784) if script == "ae.py" else vae.VAE(Z_DIM, 784)
    eps = tf.random.normal([len(x_test), Z_DIM])

    @tf.function(jit_compile=True)
    def evaluate():
        return ae.compute_loss(model, x, x) if script == "ae.py" else vae.compute_loss(model, x, eps)
    return best_seconds(lambda: [float(v) for v in evaluate().values()], repeats=20)


def overhead_benchmark(args):
    device = f"CPU: {cpu_model()}, {os.cpu_count()} cores"
    print(f"{device}; TensorFlow {tf.__version__}", flush=True)
    config = argparse.Namespace(dataset="fashion-mnist", data_dir=args.data_dir, image_size=None,
                                channels=None, test_split=0.1, strict=False, max_memory=None)
    data = tool.sources.load_data(config)
    tool.quality.SampleQuality(data, "benchmark")  # trained once per machine, then read from its cache
    if args.epochs_given and args.epochs < 2:
        sys.exit("benchmark: --overhead needs --epochs 2 or more (the time between two epochs)")
    extra = ["--epochs", str(args.epochs)] if args.epochs_given else []
    runs = {script: [] for script in SCRIPTS}
    for repeat in range(args.repeats):
        for script in SCRIPTS:
            with tempfile.TemporaryDirectory() as out:
                runs[script].append(time_parts(run_script(script, args.data_dir, out, *extra), out))
            r = runs[script][-1]
            print(f"run {repeat + 1}: python {script} {' '.join(extra)}: {r['wall']:.1f} s wall, "
                  f"{r['train']:.1f} s in epochs", flush=True)
    print("\n| command | wall | epochs | around the epochs | start-up | between epochs | end "
          "| test-set evaluation (in each epoch) | around training, evaluation counted outside "
          "| files | size |\n" + "|---" * 11 + "|")
    for script, figures in runs.items():
        r = sorted(figures, key=lambda r: (r["wall"] - r["train"]) / r["wall"])[len(figures) // 2]
        around = r["wall"] - r["train"]
        evaluation = evaluation_seconds(script, data.x_test)
        outside = around + evaluation * r["epochs"]
        command = f"python {script} {' '.join(extra)}".strip()
        print(f"| `{command}` | {r['wall']:.1f} s | "
              f"{r['train']:.1f} s ({r['epochs']} x {r['epoch']:.3f} s) | {around:.1f} s, "
              f"**{100 * around / r['wall']:.1f}%** | {r['start']:.1f} s | "
              f"{1000 * r['per_epoch']:.0f} ms | {r['end']:.1f} s | {1000 * evaluation:.0f} ms, "
              f"{100 * evaluation / r['epoch']:.1f}% of an epoch | {outside:.1f} s, "
              f"{100 * outside / r['wall']:.1f}% | {r['files']:,} | {r['bytes'] / 1e6:.1f} MB |")
    print(f"\n{device}; the run with the median share around the epochs of {args.repeats}; the "
          "target: at most 8% around the epochs (the test-set evaluation is in them)")
