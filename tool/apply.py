"""--apply: a trained run applied to new images (python ae.py --out RUN --apply IMAGES).

The model comes from the run's newest checkpoint that reads whole (a run still training can be
applied), the images are read by --dataset's rules and brought to the run's size and channels,
and the results are written into --to (default RUN/applied/NAME) as one folder, put in place
whole once everything in it is written: codes.npz, scores.csv (most unusual first, against the
threshold of the run's summary.json), most_unusual.png, with --save-reconstructions
reconstructions/, with --generate N generated/ and generated.png.
"""

import argparse
import contextlib
import csv
import json
import os
import sys

import numpy as np
import tensorflow as tf
from PIL import Image

import utils
from tool import folders, sources
from tool.data import DataError, memory_limit
from tool.errors import DISK_ERRORS, UserError
from tool.files import error_reason, write_folder_atomically, write_json
from tool.lock import check_unlocked
from tool.manifest import files_of_run, read_run_json
from tool.resume import START_FLAGS, resume_point


# The flags --apply takes; any other would be the run's, which --apply reads from the run
APPLY_FLAGS = {"apply", "to", "overwrite", "out", "save_reconstructions", "generate", "seed",
               "strict", "max_memory"}
MOST_UNUSUAL = 50  # images in most_unusual.png, beside their reconstructions


def add_flags(parser):
    """--apply and the flags that go with it."""
    group = parser.add_argument_group("applying a trained run to new images")
    group.add_argument("--apply", default=None, metavar="IMAGES",
                       help="score, encode and reconstruct IMAGES (a folder, an .npz or an image "
                       "file) with the run in --out, writing into --to")
    group.add_argument("--to", default=None, metavar="DIR",
                       help="--apply's output folder (default: OUT/applied/NAME of IMAGES); "
                       "--overwrite replaces it")
    group.add_argument("--save-reconstructions", action="store_true",
                       help="--apply: also write each image's reconstruction to reconstructions/")
    group.add_argument("--generate", type=int, default=0, metavar="N",
                       help="--apply: also write N images decoded from codes drawn from the prior "
                       "(vae.py, ae.py --adversarial)")


def check_flags(config, parser):
    """Refuse flags --apply does not take (the run's own flags are the run's), before anything
    is read."""
    if config.resume:
        raise UserError("--apply uses the run as it is; leave out --resume")
    for name, value in vars(config).items():
        if name not in APPLY_FLAGS and value != parser.get_default(name):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"--apply takes the run's own {flag}; leave it out")
    if config.generate < 0:
        raise UserError(f"--generate must be 0 or more, got {config.generate}")


def apply_run(config, script, parser):
    """Apply the run in config.out to the images config.apply names (see the module's
    docstring)."""
    check_flags(config, parser)
    images_path, out = config.apply.rstrip("/") or "/", config.out
    to = config.to or os.path.join(out, "applied", os.path.basename(os.path.realpath(images_path))
                                   or "images")
    if read_run_json(out) is None and not files_of_run(out, script.files):
        raise UserError(f"--out {out} holds no run of these scripts to apply; give the folder a "
                        "run was trained in")
    check_destination(to, out, images_path, config.overwrite)
    try:
        prefix, saved, skipped = resume_point(out, script.files)
    except UserError:
        raise UserError(f"--out {out} holds no checkpoint that reads whole, so no trained model "
                        "to apply; train one there first, or give another --out") from None
    for name, reason in skipped:
        print(f"{script.prog}: skipped checkpoint {name}: {reason}", file=sys.stderr, flush=True)
    flags, shape = saved["flags"], saved["data"]["shape"] if saved.get("data") else [28, 28, 1]
    if set(flags) != set(vars(config)) - START_FLAGS:
        raise UserError(f"--out {out} holds a run of the other script; apply it with that one")
    generates = script.generates(flags)
    if config.generate and not generates:
        raise UserError("--generate needs a model with a prior to sample: vae.py, or ae.py "
                        "--adversarial; this run has none")
    names, images, notes = read_images(images_path, shape, config)
    model = restore_model(script, flags, shape, prefix)
    epoch = saved["history"][-1]["epoch"] if saved["history"] else 0
    training = in_use(out)
    print(f"applying the run in {out} ({script.prog}, epoch {epoch}"
          f"{', still training: its newest checkpoint' if training else ''}) to {len(images):,} "
          f"image{'s' * (len(images) != 1)} of {images_path}", flush=True)
    for note in notes:
        print(note, flush=True)
    threshold = run_threshold(out, epoch)
    results = compute(model, images)
    made = make_folders(os.path.dirname(os.path.abspath(to)))
    try:
        write_folder_atomically(to, lambda tmp: write_results(
            tmp, names, images, results, threshold, config, shape, model if generates else None),
            replace=config.overwrite)
    except BaseException as e:
        for folder in reversed(made):  # nothing is left of what failed
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        if isinstance(e, FileExistsError):
            raise UserError(f"--to {to} was made by another process meanwhile; nothing was "
                            "written, choose another --to") from None
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            raise UserError(f"cannot write into --to {to} ({error_reason(e)}); nothing of it was "
                            "written") from None
        raise
    report(to, names, results["scores"], threshold)


def make_folders(folder):
    """Make folder and the folders above it that are missing; return those made, outermost first."""
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for path in reversed(missing):
        os.mkdir(path)
    return missing[::-1]


def check_destination(to, out, images_path, overwrite):
    """Refuse a --to that is a file, that exists (without --overwrite), that holds the run or
    the images, or that is one of the run's own files or folders."""
    if os.path.isfile(to):
        raise UserError(f"--to {to} is a file; give a folder to write the results into")
    real_to, run, images = (os.path.realpath(p) for p in (to, out, images_path))
    for what, path in (("the run in --out", run), ("--apply's images", images)):
        if os.path.commonpath([real_to, path]) == real_to:
            raise UserError(f"--to {to} holds {what}; choose another --to")
    if os.path.commonpath([real_to, images]) == images:
        raise UserError(f"--to {to} is inside --apply's images; choose another --to")
    if os.path.commonpath([real_to, run]) == run:  # inside the run: only under applied/
        parts = os.path.relpath(real_to, run).split(os.sep)
        if parts[0] != "applied" or len(parts) < 2 or parts[1].startswith("."):
            raise UserError(f"--to {to} is inside the run's folder, among the files the run owns; "
                            f"choose a folder under {os.path.join(out, 'applied')} or outside the run")
    if os.path.exists(to) and not overwrite:
        raise UserError(f"--to {to} already exists; replace it by adding --overwrite, or choose "
                        "another --to")


def in_use(out):
    try:
        check_unlocked(out)
        return False
    except UserError:
        return True


def read_images(path, shape, config):
    """(names, uint8 images (n, *shape), notes) of a folder, an .npz file (x_train then x_test,
    named x_train/K) or one image file, brought to shape (h, w, c)."""
    size, channels = tuple(shape[:2]), shape[2]
    limit = memory_limit(config)
    if os.path.isdir(path):
        return folders.read_all_images(path, size, channels, config, limit)
    if not os.path.isfile(path):
        raise UserError(f"--apply {path}: no such file or folder (--apply takes a folder of "
                        "images, an .npz file or one image file)")
    if path.lower().endswith(folders.IMAGE_TYPES):
        pixels = folders.decode_image((path, size, channels))
        if isinstance(pixels, str):
            raise DataError(f"--apply {path}: not a readable image ({pixels})")
        return [os.path.basename(path)], pixels.reshape(1, *shape), []
    if os.access(path, os.R_OK) and not sources.looks_like_npz(path):  # unreadable: read_npz says so
        raise DataError(f"--apply {path}: neither an image file ({', '.join(folders.IMAGE_TYPES)}) "
                        "nor an .npz file (a zip archive of arrays, as numpy.savez writes)")
    conversion = argparse.Namespace(**{**vars(config), "image_size": list(size), "channels": channels})
    (x_train, _), (x_test, _) = sources.read_npz(path, conversion, limit)
    own = x_train.shape[1:3] + ((x_train.shape[3] if x_train.ndim == 4 else 1),)
    data = sources.from_arrays(path, x_train, None, x_test, None, conversion, limit, None)
    names = [f"x_train/{i}" for i in range(len(x_train))] + [f"x_test/{i}" for i in range(len(x_test))]
    notes = [f"{path}: its images of {'x'.join(map(str, own))} brought to the run's "
             f"{'x'.join(map(str, shape))}"] if own != tuple(shape) else []
    return names, np.concatenate([data.x_train, data.x_test]), notes


def restore_model(script, flags, shape, prefix):
    """The run's model, built for images of shape, with the weights of the checkpoint prefix."""
    model = script.build_model(flags, shape)
    status = tf.train.Checkpoint(model=model).restore(prefix)
    status.expect_partial().assert_existing_objects_matched()
    return model


def run_threshold(out, epoch):
    """The anomaly threshold the run's summary.json holds for the epoch applied, else None (a
    run still training, or one finished before there were thresholds)."""
    try:
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        if summary["final"]["epoch"] == epoch:
            return float(summary["anomaly_threshold"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def compute(model, images, chunk=2000):
    """The codes ({name: (n, d)}), scores (n,) and reconstructions (n, pixels) of images, in
    parts of chunk images, or fewer where the model says (a conv model's rows_per_call)."""
    parts = {"codes": [], "scores": [], "reconstructions": []}
    chunk = min(chunk, model.rows_per_call or chunk)
    for i in range(0, len(images), chunk):
        x = utils.to_float(images[i:i + chunk])
        parts["codes"].append({k: v.numpy() for k, v in model.codes(x).items()})
        parts["scores"].append(np.asarray(model.score(x), np.float64))
        parts["reconstructions"].append(tf.sigmoid(model.reconstruct(x)).numpy())
    return {"codes": {k: np.concatenate([c[k] for c in parts["codes"]]) for k in parts["codes"][0]},
            "scores": np.concatenate(parts["scores"]),
            "reconstructions": np.concatenate(parts["reconstructions"])}


def write_results(folder, names, images, results, threshold, config, shape, sampler):
    """Everything --apply writes, into folder."""
    scores = results["scores"]
    np.savez(os.path.join(folder, "codes.npz"), paths=np.array(names), **results["codes"])
    order = np.argsort(-scores, kind="stable")
    with open(os.path.join(folder, "scores.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "score", "above_threshold"])
        for i in order:
            above = "" if threshold is None else str(bool(scores[i] > threshold)).lower()
            writer.writerow([names[i], f"{scores[i]:.6g}", above])
    top = order[:MOST_UNUSUAL]
    originals, reconstructions = utils.to_float(images[top]), results["reconstructions"][top]
    if len(top) < MOST_UNUSUAL:  # fewer images: black ones fill the grid
        fill = np.zeros((MOST_UNUSUAL - len(top), originals.shape[1]), np.float32)
        originals, reconstructions = np.r_[originals, fill], np.r_[reconstructions, fill]
    utils.save_images(utils.pair_grid(originals, reconstructions, shape),
                      os.path.join(folder, "most_unusual.png"))
    if config.save_reconstructions:
        save_each(os.path.join(folder, "reconstructions"), names,
                  utils.to_uint8(results["reconstructions"], shape))
    if config.generate:
        z = tf.random.stateless_normal([config.generate, sampler.code_size], seed=[config.seed, 4])
        generated = utils.to_uint8(tf.sigmoid(sampler.decode(z)), shape)
        save_each(os.path.join(folder, "generated"), [f"{i:05d}" for i in range(len(generated))],
                  generated)
        grid = np.zeros((100, *generated.shape[1:]), np.uint8)
        grid[:len(generated[:100])] = generated[:100]
        utils.save_images(grid, os.path.join(folder, "generated.png"))
    write_json(os.path.join(folder, "apply.json"), {
        "run": os.path.abspath(config.out), "images": os.path.abspath(config.apply),
        "count": len(names), "anomaly_threshold": threshold,
        "above_threshold": None if threshold is None else int((scores > threshold).sum())})


def save_each(folder, names, images):
    """Each image as folder/NAME.png (NAME's folders made as needed)."""
    for name, image in zip(names, images):
        path = os.path.join(folder, os.path.splitext(name)[0] + ".png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(image).save(path)


def report(to, names, scores, threshold):
    """The lines --apply ends with."""
    i = int(np.argmax(scores))
    above = ("the run has no threshold yet (it is set when training ends)" if threshold is None
             else f"{int((scores > threshold).sum()):,} above the run's threshold {threshold:.2f}")
    print(f"scores: {above}; the most unusual is {names[i]} ({scores[i]:.2f}). Written to {to}: "
          "scores.csv (most unusual first), codes.npz, most_unusual.png", flush=True)
