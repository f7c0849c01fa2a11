"""The --folder benchmark (python tests/benchmark.py --folder): Fashion-MNIST written out as PNG
files in class folders, loaded by --dataset FOLDER and trained on (see tests/benchmark.py)."""

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

import tensorflow as tf

import tool.data
import tool.sources
from bench_runs import cpu_model, epoch_and_peak, run_script


def export_pngs(root, data):
    """Write Fashion-MNIST as root/{train,test}/K-NAME/NNNNN.png, K the label; (files, seconds)."""
    start = time.perf_counter()
    from PIL import Image
    for split, (x, y) in zip(("train", "test"), data):
        for label, name in enumerate(tool.data.CLASS_NAMES):
            os.makedirs(os.path.join(root, split, f"{label}-{name.replace('/', '-')}"))
        for k, (image, label) in enumerate(zip(x, y)):
            name = tool.data.CLASS_NAMES[label].replace("/", "-")
            Image.fromarray(image).save(os.path.join(root, split, f"{label}-{name}", f"{k:05d}.png"))
    return sum(len(x) for x, _ in data), time.perf_counter() - start


def as_set(x, y):
    return sorted(zip(y.tolist(), (image.tobytes() for image in x.reshape(len(x), -1))))


def folder_benchmark(args):
    device = f"CPU: {cpu_model()}, {os.cpu_count()} cores"
    print(f"{device}; TensorFlow {tf.__version__}", flush=True)
    idx = tool.sources.load_fashion_mnist(args.data_dir)
    if args.export and os.path.exists(args.export):
        sys.exit(f"benchmark: --export {args.export} exists already; name a new folder")
    with (contextlib.nullcontext(args.export) if args.export else tempfile.TemporaryDirectory()) as root:
        n, seconds = export_pngs(root, idx)
        print(f"wrote {n:,} PNG files in {seconds:.1f} s", flush=True)
        config = argparse.Namespace(dataset=root, data_dir=None, image_size=None, channels=None,
                                    test_split=0.1, strict=False, max_memory=None)
        loads = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            data = tool.sources.load_data(config)
            loads.append(time.perf_counter() - start)
        same = (as_set(data.x_train, data.y_train) == as_set(*idx[0])
                and as_set(data.x_test, data.y_test) == as_set(*idx[1]))
        decoded = data.x_train.nbytes + data.x_test.nbytes
        del data
        load = statistics.median(loads)
        print(f"--dataset FOLDER: {n:,} images in {load:.2f} s (median of {args.repeats}: "
              f"{', '.join(f'{s:.2f}' for s in loads)}), {n / load:,.0f} images/s "
              f"({'within' if load <= 15 else 'over'} the 15 s target); pixels and labels the same "
              f"as the IDX files' (as sets): {same}", flush=True)
        runs = {"IDX files": [], "PNG folder": []}
        for _ in range(args.repeats):
            for name, extra in (("IDX files", []), ("PNG folder", ["--dataset", root])):
                with tempfile.TemporaryDirectory() as out:
                    runs[name].append(epoch_and_peak(run_script(
                        "ae.py", None if extra else args.data_dir, out, "--epochs", str(args.epochs),
                        *extra)))
        print("\n| ae.py data | s/epoch (best of runs) | peak RSS (largest) |\n|---|---|---|")
        for name, figures in runs.items():
            print(f"| {name} | {min(f[0] for f in figures):.3f} | "
                  f"{max(f[1] for f in figures) / 2**30:.2f} GiB |")
        extra = max(f[1] for f in runs["PNG folder"]) - max(f[1] for f in runs["IDX files"])
        print(f"\npeak memory of the folder run minus the IDX run: {extra / 2**20:+.0f} MiB; the decoded "
              f"data: {decoded / 2**20:.0f} MiB; {device}; {args.epochs} epochs per run, "
              f"{args.repeats} runs each")
