"""A folder of images as data: its files listed, decoded in parallel, split by a hash of each
path, and labelled by their class folders."""

import collections
import concurrent.futures
import hashlib
import os
import signal
import sys
import warnings

import numpy as np
from PIL import Image, ImageOps

from tool.data import Data, check_counts, check_memory, convert_image
from tool.errors import DataError, raise_stopped
from tool.progress import progress


IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")  # a GIF or WebP: its first frame


SHOWN = 3  # skipped files named in the line that counts them


GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def upright(image):
    """A photo as its camera's EXIF orientation says it is seen (JPEG and WebP files)."""
    if image.format in ("JPEG", "MPO", "WEBP"):
        return ImageOps.exif_transpose(image)
    return image


def probe_image(path):
    """(height, width, gray) of an image file, from its header; or the reason it is unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # see large_notes
            image = Image.open(path)
        with image:
            width, height = image.size
            if image.format in ("JPEG", "MPO", "WEBP") and image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width  # rotated by a quarter turn
            gray = image.mode in GRAY_MODES
            if image.mode in ("P", "PA"):
                palette = np.asarray(image.getpalette() or [0], np.int64)
                palette = palette[:len(palette) // 3 * 3].reshape(-1, 3)
                gray = bool(np.all(palette == palette[:, :1]))
            return height, width, gray
    except Exception as e:  # Pillow raises several kinds for a file it cannot read
        return f"{type(e).__name__}: {e}"


def decode_image(job):
    """The pixels of one image file as convert_image gives them, or the reason it is unreadable."""
    path, size, channels = job
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # see large_notes
            with Image.open(path) as image:
                return convert_image(upright(image), size, channels)
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def parallel_map(fn, items, chunk=1000):
    """fn over items, in order, on a process per CPU where the system can fork (Linux), else here.

    Decoding an image takes Pillow about 0.1 ms of Python, so threads would only take turns;
    processes forked from this one start at once and share its memory until they write."""
    items = list(items)
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if workers < 2 or len(items) <= chunk or not sys.platform.startswith("linux"):
        yield from map(fn, items)
        return
    import multiprocessing
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("fork"), initializer=start_worker)

    # SIGTERM too ends the workers (below) before this process
    before = signal.signal(signal.SIGTERM, raise_stopped)
    try:
        chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
        for results in pool.map(map_list, [fn] * len(chunks), chunks):
            yield from results
    except concurrent.futures.process.BrokenProcessPool:
        raise DataError("a process decoding the images died (out of memory, or killed); try "
                        "again, or with a smaller --image-size or fewer images") from None
    finally:  # a Ctrl-C, SIGTERM or an error: the workers stop now, not after their chunks
        signal.signal(signal.SIGTERM, before)
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)


def start_worker():
    """In each worker: Ctrl-C is the parent's to answer; and the worker goes when the parent
    does, even by kill -9 (Linux's PR_SET_PDEATHSIG)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # terminate() ends it at once, quietly
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def map_list(fn, items):
    return [fn(item) for item in items]


def in_test_split(path, fraction):
    """Whether a file goes to the test set: a stable hash of its path relative to the folder,
    so that the split does not depend on --seed, and adding files moves none of the others."""
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def list_files(root):
    """(files, unreadable, links): every file under root, recursively, as sorted paths relative
    to root with '/' between folders, hidden files and folders (a name starting with '.') left
    out; the folders that could not be read; and the linked folders not followed. A link to a
    folder is followed, unless that folder is under root (it is read as itself, under its own
    name, whatever order the walk takes) or was read already: each real folder is read once."""
    def relative(path):
        path = os.path.relpath(path, root)
        return "" if path == "." else path.replace(os.sep, "/") + "/"

    real = set()
    for folder, dirs, _ in os.walk(root):
        real.add(os.path.realpath(folder))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    found, unreadable, links, seen = [], [], [], set()
    for folder, dirs, files in os.walk(root, followlinks=True,
                                       onerror=lambda e: unreadable.append(
                                           os.path.relpath(e.filename, root).replace(os.sep, "/") + "/")):
        seen.add(os.path.realpath(folder))
        kept = []
        for d in (d for d in dirs if not d.startswith(".")):
            path = os.path.join(folder, d)
            target = os.path.realpath(path)
            if target in seen or os.path.islink(path) and target in real:
                links.append(f"{relative(path)} -> {relative(target) or './'}")
            else:
                kept.append(d)
        dirs[:] = kept
        found += [relative(folder) + f for f in files if not f.startswith(".")]
    return sorted(found), unreadable, links


def read_image_folder(root, config, limit):
    """A folder of images (PNG, JPEG, BMP, GIF, WebP; recursively) as Data.

    With train/ and test/ folders in it, those are the splits; otherwise --test-split of the
    images go to the test set (see in_test_split). The name of the folder an image is in, right
    under the folder (or train/, test/), is its class; labels exist when every image has one
    and there are two classes or more.
    """
    files, unreadable_folders, links = list_files(root)
    by_folders = has_split_folders(root, files)
    skipped = {"unreadable": [], "unreadable folder": unreadable_folders, "not an image": [],
               "outside train/ and test/": [], "link to a folder read once": links}
    images = image_files(root, files, by_folders, skipped, config)
    readable = probe_images(root, images, skipped, config)
    size, channels = choose_shape(root, readable, config)
    n_test = sum(split == "test" for (_, split, _), _ in readable)
    advice = (", in test/" if by_folders else
              f"; add images, or raise --test-split ({config.test_split} now)")
    check_counts(root, len(readable) - n_test, n_test, advice)
    check_memory(root, len(readable), (*size, channels), config, limit)
    x, decoded, test = decode_images(root, readable, size, channels, skipped, config)
    if len(decoded) < len(readable) and channels != channels_of(decoded, config):
        # the colour came from images that then did not decode: the others again, in gray
        x, decoded, test = decode_images(root, decoded, size, 1, skipped, config)
    check_counts(root, len(x[False]), len(x[True]), advice)
    class_names, labels, no_labels = class_labels(decoded, test)
    layout = "train/ and test/" if by_folders else f"test split {config.test_split}"
    return Data(f"{root} ({layout})", x[False], labels[False], x[True], labels[True], class_names,
                skipped_notes(skipped, len(files)) + large_notes(decoded), no_labels)


def read_all_images(root, size, channels, config, limit):
    """(paths relative to root, uint8 images (n, *size, channels), notes) of every image file
    under root (what --apply reads: no split, no labels), brought to size and channels; the
    notes say what was skipped and how many were resized or converted."""
    files, unreadable_folders, links = list_files(root)
    skipped = {"unreadable": [], "unreadable folder": unreadable_folders, "not an image": [],
               "link to a folder read once": links}
    skipped["not an image"] = [f for f in files if not f.lower().endswith(IMAGE_TYPES)]
    images = [(f, "train", None) for f in files if f.lower().endswith(IMAGE_TYPES)]
    if not images:
        raise DataError(f"{root}: no image files ({', '.join(t[1:] for t in IMAGE_TYPES)}) in the "
                        f"folder or below it ({len(files)} other files)")
    readable = probe_images(root, images, skipped, config)
    check_memory(root, len(readable), (*size, channels), config, limit)
    x, decoded, _ = decode_images(root, readable, size, channels, skipped, config)
    if not len(decoded):
        raise DataError(f"{root}: none of its {len(images)} image files could be decoded "
                        f"({skipped['unreadable'][0]})")
    resized = sum((h, w) != tuple(size) for _, (h, w, _) in decoded)
    converted = sum(gray != (channels == 1) for _, (_, _, gray) in decoded)
    changed = [f"{n:,} resized to {size[0]}x{size[1]}" for n in [resized] if n] + [
        f"{n:,} converted to {'gray' if channels == 1 else 'RGB'}" for n in [converted] if n]
    notes = [f"{root}: of {len(decoded):,} images, {' and '.join(changed)}, as the run was "
             "trained"] if changed else []
    return ([f for (f, _, _), _ in decoded], x[False],
            notes + skipped_notes(skipped, len(files)) + large_notes(decoded))


def has_split_folders(root, files):
    """Whether the folder's own train/ and test/ folders are its splits (one without the other
    is refused)."""
    top = {f.split("/", 1)[0] for f in files if "/" in f}
    if len({"train", "test"} & top) == 1:
        (only,), (other,) = {"train", "test"} & top, {"train", "test"} - top
        raise DataError(f"{root}: has a {only}/ folder of images but no {other}/ one; add "
                        f"{other}/, or rename {only}/ to have its images split by --test-split")
    return {"train", "test"} <= top


def image_files(root, files, by_folders, skipped, config):
    """[(relative path, split, class folder or None)] of the image files among files; the others
    are added to skipped."""
    images = []
    for f in files:
        parts = f.split("/")
        if by_folders:
            if parts[0] not in ("train", "test"):
                skipped["outside train/ and test/"].append(f)
                continue
            split, parts = parts[0], parts[1:]
        else:
            split = "test" if in_test_split(f, config.test_split) else "train"
        if not f.lower().endswith(IMAGE_TYPES):
            skipped["not an image"].append(f)
            continue
        images.append((f, split, parts[0] if len(parts) > 1 else None))
    if not images:
        raise DataError(f"{root}: no image files ({', '.join(t[1:] for t in IMAGE_TYPES)}) in the "
                        f"folder or below it ({len(files)} other files)")
    return images


def probe_images(root, images, skipped, config):
    """[(image, (height, width, gray))] of the images whose headers read (see probe_image); the
    others are added to skipped (refused with --strict)."""
    probes = list(progress(parallel_map(probe_image, [os.path.join(root, f) for f, _, _ in images]),
                           len(images), "reading image headers", every=10.0))
    readable = []
    for image, probe in zip(images, probes):
        if isinstance(probe, str):
            skipped["unreadable"].append(f"{image[0]} ({probe})")
        else:
            readable.append((image, probe))
    check_strict(root, skipped, config)
    if not readable:
        raise DataError(f"{root}: none of its {len(images)} image files could be read "
                        f"({skipped['unreadable'][0]})")
    return readable


def choose_shape(root, readable, config):
    """(size, channels) of the data: --image-size, or the one size all images have; and
    channels_of the images."""
    sizes = collections.Counter((h, w) for _, (h, w, _) in readable)
    if config.image_size:
        size = tuple(config.image_size)
    elif len(sizes) == 1:
        size = next(iter(sizes))
    else:
        found = ", ".join(f"{h}x{w} ({n:,})" for (h, w), n in sizes.most_common(5))
        (h, w), _ = sizes.most_common(1)[0]
        raise DataError(f"{root}: images of {len(sizes)} sizes ({found}{', ...' * (len(sizes) > 5)});"
                        f" choose the one to resize them all to, for example --image-size {h}x{w}")
    return size, channels_of(readable, config)


def channels_of(readable, config):
    """--channels, or 1 when every image of readable [(image, (height, width, gray))] is gray,
    else 3."""
    return config.channels or (1 if all(gray for _, (_, _, gray) in readable) else 3)


def decode_images(root, readable, size, channels, skipped, config):
    """The pixels of the readable images, decoded straight into the two splits' arrays, so the
    data are in memory once: ({False: training images, True: test images}, the images that
    decoded, whether each is a test image). Those that do not decode are added to skipped."""
    test = np.array([split == "test" for (_, split, _), _ in readable])
    slot = np.where(test, np.cumsum(test) - 1, np.cumsum(~test) - 1)
    n_test = int(test.sum())
    x = {False: np.empty((len(readable) - n_test, *size, channels), np.uint8),
         True: np.empty((n_test, *size, channels), np.uint8)}
    jobs = [(os.path.join(root, f), size, channels) for (f, _, _), _ in readable]
    kept = np.ones(len(readable), bool)
    for i, pixels in enumerate(progress(parallel_map(decode_image, jobs), len(jobs),
                                        "decoding images", every=10.0)):
        if isinstance(pixels, str):
            skipped["unreadable"].append(f"{readable[i][0][0]} ({pixels})")
            kept[i] = False
        else:
            x[bool(test[i])][slot[i]] = pixels.reshape(x[True].shape[1:])
    check_strict(root, skipped, config)
    if not kept.all():  # unreadable beyond the header: rare, worth a copy
        x = {t: x[t][kept[test == t]] for t in (False, True)}
        readable, test = [r for r, k in zip(readable, kept) if k], test[kept]
    return x, readable, test


def class_labels(readable, test):
    """(class names, {False: training labels, True: test labels}, why there are none): the
    class folders' names in order, where every image is in one and there are two or more."""
    classes = np.array([c or "" for (_, _, c), _ in readable], object)
    class_names, labels, no_labels = None, {False: None, True: None}, None
    names = sorted(set(classes) - {""})
    if "" in set(classes) and names:
        no_labels = f"no labels ({int((classes == '').sum()):,} images are not in a class folder)"
    elif len(names) == 1:
        no_labels = f"no labels (one class folder, {names[0]})"
    elif len(names) > 1:
        class_names = names
        number = {name: k for k, name in enumerate(names)}
        index = np.array([number[c] for c in classes], np.int64)
        labels = {t: index[test == t].astype(np.int64) for t in (False, True)}
    return class_names, labels, no_labels


def large_notes(decoded):
    """The line naming the images Pillow warns of as possible decompression bombs, if any (its
    warning, two lines on standard error, is held back: they are the user's own images)."""
    large = [f for (f, _, _), (h, w, _) in decoded if h * w > Image.MAX_IMAGE_PIXELS]
    if not large:
        return []
    return [f"decoded {len(large):,} image{'s' * (len(large) > 1)} of more than "
            f"{Image.MAX_IMAGE_PIXELS:,} pixels, which Pillow warns of as possible decompression "
            f"bombs ({', '.join(large[:SHOWN])}{', ...' * (len(large) > SHOWN)})"]


def skipped_notes(skipped, n_files):
    """The line that counts the files skipped, by reason, naming the first few; or none."""
    summary_skips = {k: v for k, v in skipped.items() if v}
    if not summary_skips:
        return []
    counts = "; ".join(f"{len(v):,} {k} ({', '.join(v[:SHOWN])}{', ...' * (len(v) > SHOWN)})"
                       for k, v in summary_skips.items())
    return [f"skipped {sum(map(len, summary_skips.values())):,} of {n_files:,} files: {counts}"]


def check_strict(root, skipped, config):
    """--strict: refuse the data where an image file, or a folder, could not be read."""
    kinds = (("image file", skipped["unreadable"]), ("folder", skipped["unreadable folder"]))
    bad = skipped["unreadable"] + skipped["unreadable folder"]
    if config.strict and bad:
        what = " and ".join(f"{len(v)} {kind}{'s' * (len(v) > 1)}" for kind, v in kinds if v)
        raise DataError(f"{root}: {what} could not be read "
                        f"({', '.join(bad[:SHOWN])}{', ...' * (len(bad) > SHOWN)}); --strict "
                        "allows none: remove or fix them, or leave out --strict to skip them")
