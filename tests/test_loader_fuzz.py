"""Property-based test: the loader meets mutated files with its one clear error, nothing else."""

import gzip
import tracemalloc

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

import tool.errors
import tool.sources
from conftest import idx_bytes, write_dataset

N_TRAIN, N_TEST = 6, 4
GOOD = {
    "train_images": idx_bytes(np.random.default_rng(0).integers(0, 256, (N_TRAIN, 28, 28))),
    "train_labels": idx_bytes(np.arange(N_TRAIN) % 10),
    "test_images": idx_bytes(np.random.default_rng(1).integers(0, 256, (N_TEST, 28, 28))),
    "test_labels": idx_bytes(np.arange(N_TEST) % 10),
}


@st.composite
def mutations(draw):
    """(file, bytes to write in place of the good .gz file)."""
    name = draw(st.sampled_from(sorted(GOOD)))
    raw = GOOD[name]
    kind = draw(st.sampled_from(["truncate", "truncate_gz", "flip_header", "count", "magic",
                                 "not_gzip", "empty", "append"]))
    if kind == "truncate":  # the decompressed stream cut at any byte
        data = gzip.compress(raw[:draw(st.integers(0, len(raw) - 1))])
    elif kind == "truncate_gz":  # the compressed file itself cut at any byte
        packed = gzip.compress(raw)
        data = packed[:draw(st.integers(0, len(packed) - 1))]
    elif kind == "flip_header":
        header = bytearray(raw[:16 if name.endswith("images") else 8])
        for i in draw(st.lists(st.integers(0, len(header) - 1), min_size=1, max_size=4, unique=True)):
            header[i] = draw(st.integers(0, 255).filter(lambda b, old=header[i]: b != old))
        data = gzip.compress(bytes(header) + raw[len(header):])
    elif kind == "count":  # promise more (up to billions) or fewer items than present
        count = draw(st.integers(0, 2**32 - 1).filter(lambda c: c != int.from_bytes(raw[4:8], "big")))
        data = gzip.compress(raw[:4] + count.to_bytes(4, "big") + raw[8:])
    elif kind == "magic":
        magic = draw(st.integers(0, 2**32 - 1).filter(lambda m: m != int.from_bytes(raw[:4], "big")))
        data = gzip.compress(magic.to_bytes(4, "big") + raw[4:])
    elif kind == "not_gzip":
        data = draw(st.binary(min_size=1, max_size=200).filter(lambda b: not b.startswith(b"\x1f\x8b")))
    elif kind == "empty":
        data = b""
    else:  # extra bytes after the data the header promises
        data = gzip.compress(raw + draw(st.binary(min_size=1, max_size=100)))
    return name, data


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=mutations())
def test_every_mutation_ends_in_the_loaders_error(tmp_path, mutation):
    name, data = mutation
    for good_name, raw in GOOD.items():
        with open(tmp_path / tool.sources.FILES[good_name], "wb") as f:
            f.write(gzip.compress(raw))
    path = str(tmp_path / tool.sources.FILES[name])
    with open(path, "wb") as f:
        f.write(data)
    tracemalloc.start()
    try:
        tool.sources.load_fashion_mnist(str(tmp_path))
    except tool.errors.DataError as e:  # a ValueError
        message = str(e)
    else:
        raise AssertionError(f"mutated {name} loaded without error")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert message.startswith(path) and "\n" not in message
    # never more than the data present allows: the files are a few kB, the reads 1 MiB at most
    assert peak < 4 * 2**20, f"{peak} bytes allocated"


def test_the_unmutated_files_load(tmp_path):
    write_dataset(str(tmp_path), n_train=N_TRAIN, n_test=N_TEST)
    (x_train, _), (x_test, _) = tool.sources.load_fashion_mnist(str(tmp_path))
    assert x_train.shape == (N_TRAIN, 28, 28) and x_test.shape == (N_TEST, 28, 28)
