"""The --arch conv speed benchmark (python tests/benchmark.py --conv): the epoch of `python ae.py
--arch conv` and `python vae.py --arch conv` against the same models trained by PyTorch in eager
mode and by JAX (a whole epoch as one jitted lax.scan), each when installed.

Every contender runs the same work on Fashion-MNIST: a fresh permutation of the 60,000 training
images, batches of 512 (the short last batch kept), Adam 1e-3, then the loss of the 10,000 test
images (in parts of 1,000 outside the scripts). The layers are the scripts' (utils.conv_encoder and
conv_decoder): two 3x3 stride-2 convolutions of 32 and 64 filters (no padding), a Dense layer to
the code (20 for ae.py, a mean and a log-variance of 10 for vae.py); a Dense layer to a 7x7x32
map, two 3x3 stride-2 transposed convolutions of 64 and 32 filters and one of stride 1 to the
image. Contenders take turns, --repeats runs each; a run's figure is its median epoch after the
warm-up, and the best run counts, as noise on a shared machine only ever adds time.
"""

import statistics
import tempfile
import time

import numpy as np

BATCH, H_DIM, Z_DIM, TEST_PART = 512, 20, 10, 1000


def add_flags(parser):
    parser.add_argument("--conv", action="store_true",
                        help="measure the epoch of --arch conv against PyTorch and JAX instead")
    parser.add_argument("--conv-epochs", type=int, default=4,
                        help="with --conv: epochs of each script run (>= 3; the median of those "
                        "after the second counts)")
    parser.add_argument("--conv-jax-batches", type=int, default=4, metavar="N",
                        help="with --conv: time JAX on N batches of 512 and a test set in the same "
                        "proportion, its epoch scaled up (XLA's convolutions on a CPU take many "
                        "minutes per whole epoch); 0: whole epochs")


def torch_loop(script, x_train, x_test, epochs):
    import torch
    from torch import nn
    torch.manual_seed(0)
    x_all = torch.from_numpy(np.array(x_train))
    x_test = torch.from_numpy(np.array(x_test)).float() / 255.0
    code = H_DIM if script == "ae.py" else 2 * Z_DIM
    encoder = nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 32, 3, 2), nn.ReLU(),
                            nn.Conv2d(32, 64, 3, 2), nn.ReLU(), nn.Flatten(),
                            nn.Linear(6 * 6 * 64, code))
    decoder = nn.Sequential(
        nn.Linear(code if script == "ae.py" else Z_DIM, 7 * 7 * 32), nn.ReLU(),
        nn.Unflatten(1, (32, 7, 7)),
        nn.ConvTranspose2d(32, 64, 3, 2, padding=1, output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(64, 32, 3, 2, padding=1, output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(32, 1, 3, 1, padding=1), nn.Flatten())
    model = nn.ModuleList([encoder, decoder])

    def loss_fn(x):
        if script == "ae.py":
            return nn.functional.binary_cross_entropy_with_logits(decoder(encoder(x)), x)
        mu, log_var = encoder(x).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        rec = nn.functional.binary_cross_entropy_with_logits(decoder(z), x, reduction="sum") / len(x)
        return rec - 0.5 * torch.sum(1 + log_var - mu ** 2 - log_var.exp()) / len(x)

    return torch_train(model, loss_fn, x_all, x_test, epochs, TEST_PART)


def torch_train(model, loss_fn, x_all, x_test, epochs, test_part=None):
    """Epoch times of PyTorch training model on loss_fn(x) eagerly (both benchmarks): batches of
    a fresh permutation of the uint8 tensor x_all, Adam 1e-3, then the loss of x_test (in parts
    of test_part images, or at once)."""
    import torch
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    part = test_part or len(x_test)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for idx in torch.randperm(len(x_all)).split(BATCH):
            x = x_all[idx].float() / 255.0
            optimizer.zero_grad()
            loss = loss_fn(x)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            float(loss.detach())
            float(sum(loss_fn(x_test[i:i + part]) for i in range(0, len(x_test), part)))
        times.append(time.perf_counter() - start)
    return times


def jax_model(script):
    """The scripts' conv layers in JAX: (initial parameters, loss_fn(params, x, key))."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    keys = iter(jax.random.split(jax.random.PRNGKey(0), 16))
    code = H_DIM if script == "ae.py" else 2 * Z_DIM

    def kernel(h, w, i, o):
        return jax.random.normal(next(keys), (h, w, i, o)) * jnp.sqrt(2.0 / (h * w * i))

    def dense(m, n):
        return {"w": jax.random.normal(next(keys), (m, n)) * jnp.sqrt(2.0 / m), "b": jnp.zeros(n)}

    params = {"c1": kernel(3, 3, 1, 32), "b1": jnp.zeros(32), "c2": kernel(3, 3, 32, 64),
              "b2": jnp.zeros(64), "code": dense(6 * 6 * 64, code),
              "map": dense(H_DIM if script == "ae.py" else Z_DIM, 7 * 7 * 32),
              "t1": kernel(3, 3, 32, 64), "tb1": jnp.zeros(64), "t2": kernel(3, 3, 64, 32),
              "tb2": jnp.zeros(32), "t3": kernel(3, 3, 32, 1), "tb3": jnp.zeros(1)}
    numbers = ("NHWC", "HWIO", "NHWC")

    def encode(p, x):
        h = x.reshape(-1, 28, 28, 1)
        h = jax.nn.relu(lax.conv_general_dilated(h, p["c1"], (2, 2), "VALID",
                                                 dimension_numbers=numbers) + p["b1"])
        h = jax.nn.relu(lax.conv_general_dilated(h, p["c2"], (2, 2), "VALID",
                                                 dimension_numbers=numbers) + p["b2"])
        return h.reshape(len(x), -1) @ p["code"]["w"] + p["code"]["b"]

    def decode(p, z):
        h = jax.nn.relu(z @ p["map"]["w"] + p["map"]["b"]).reshape(-1, 7, 7, 32)
        h = jax.nn.relu(lax.conv_transpose(h, p["t1"], (2, 2), "SAME", dimension_numbers=numbers) + p["tb1"])
        h = jax.nn.relu(lax.conv_transpose(h, p["t2"], (2, 2), "SAME", dimension_numbers=numbers) + p["tb2"])
        h = lax.conv_transpose(h, p["t3"], (1, 1), "SAME", dimension_numbers=numbers) + p["tb3"]
        return h.reshape(len(z), -1)

    def bce(logits, x):
        return jnp.maximum(logits, 0) - logits * x + jnp.log1p(jnp.exp(-jnp.abs(logits)))

    def loss_fn(p, x, key):
        if script == "ae.py":
            return jnp.mean(bce(decode(p, encode(p, x)), x))
        mu, log_var = jnp.split(encode(p, x), 2, axis=1)
        z = mu + jnp.exp(0.5 * log_var) * jax.random.normal(key, mu.shape)
        kl = -0.5 * jnp.sum(1 + log_var - mu ** 2 - jnp.exp(log_var)) / len(x)
        return jnp.sum(bce(decode(p, z), x)) / len(x) + kl

    return params, loss_fn


def jax_loop(script, x_train, x_test, epochs):
    return jax_train(*jax_model(script), x_train, x_test, epochs, TEST_PART)


def jax_train(params, loss_fn, x_train, x_test, epochs, test_part=None):
    """Epoch times of JAX training params on loss_fn(params, x, key) (both benchmarks): each
    epoch one jitted call, a lax.scan over the batches of a fresh permutation with Adam 1e-3,
    then the test loss (in lax.map parts of test_part images, or at once)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def adam_step(state, x, key):
        p, m, v, t = state
        loss, grads = jax.value_and_grad(loss_fn)(p, x, key)
        t = t + 1
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, grads)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, grads)
        lr = 1e-3 * jnp.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        p = jax.tree.map(lambda p, m, v: p - lr * m / (jnp.sqrt(v) + 1e-7), p, m, v)
        return (p, m, v, t), loss

    n = len(x_train)
    n_full = n // BATCH * BATCH

    @jax.jit
    def epoch(state, x_all, x_test, key):
        key, perm_key, test_key = jax.random.split(key, 3)
        order = jax.random.permutation(perm_key, n)

        def body(state, idx_key):
            idx, k = idx_key
            return adam_step(state, x_all[idx].astype(jnp.float32) / 255.0, k)

        batches = order[:n_full].reshape(-1, BATCH)
        state, losses = lax.scan(body, state, (batches, jax.random.split(key, len(batches))))
        if n_full < n:
            state, _ = adam_step(state, x_all[order[n_full:]].astype(jnp.float32) / 255.0, key)
        if test_part is None:
            return state, losses.mean(), loss_fn(state[0], x_test, test_key)
        part = min(test_part, len(x_test))
        test = lax.map(lambda x: loss_fn(state[0], x, test_key), x_test.reshape(-1, part, x_test.shape[1]))
        return state, losses.mean(), test.mean()

    zeros = jax.tree.map(jnp.zeros_like, params)
    state, key, x_all = (params, zeros, zeros, 0), jax.random.PRNGKey(1), jnp.asarray(x_train)
    x_test = jnp.asarray(x_test, jnp.float32) / 255.0
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        key, sub = jax.random.split(key)
        state, loss, test_loss = epoch(state, x_all, x_test, sub)
        float(loss), float(test_loss)
        times.append(time.perf_counter() - start)
    return times


def jax_scaled(script, x_train, x_test, args):
    """JAX's epoch times on the first --conv-jax-batches batches of the training images and as
    large a share of the test images, scaled up to the whole epoch (as is, for 0)."""
    if not args.conv_jax_batches:
        return jax_loop(script, x_train, x_test, args.loop_epochs)
    n = args.conv_jax_batches * BATCH
    times = jax_loop(script, x_train[:n], x_test[:n * len(x_test) // len(x_train)], args.loop_epochs)
    return [t * len(x_train) / n for t in times]


def conv_benchmark(args, run_script, available, device, x_train, x_test):
    """The table: each script's conv epoch against PyTorch eager and JAX on the same work."""
    loops = {}
    if available("torch"):
        loops["PyTorch eager"] = lambda s: torch_loop(s, x_train, x_test, args.loop_epochs)
    if available("jax"):
        loops["JAX jit"] = lambda s: jax_scaled(s, x_train, x_test, args)
    # the end-of-run figures are left out: the epochs are what is timed
    end = ["--fd-samples", "0", "--iw-samples", "2"]
    results = {}  # (script, contender) -> [median seconds per epoch of each run]
    for repeat in range(args.repeats):
        for script in ("ae.py", "vae.py"):
            with tempfile.TemporaryDirectory() as out:
                run = run_script(script, args.data_dir, out, "--arch", "conv", "--epochs",
                                 str(args.conv_epochs), *end[:2 if script == "ae.py" else 4])
            results.setdefault((script, "script"), []).append(statistics.median(run["seconds"][2:]))
            for name, loop in loops.items():
                results.setdefault((script, name), []).append(statistics.median(loop(script)[1:]))
            print(f"run {repeat + 1}: {script} --arch conv: " + ", ".join(
                f"{name} {runs[-1]:.2f} s" for (s, name), runs in results.items() if s == script),
                flush=True)
    print("\n| command | s/epoch | " + " | ".join(f"{name} s/epoch" for name in loops)
          + (" | fastest peer / script |" if loops else " |"))
    print("|---" * (2 + len(loops) + bool(loops)) + "|")
    for script in ("ae.py", "vae.py"):
        best = {name: min(results[(script, name)]) for name in ["script", *loops]}
        cells = [f"{best['script']:.2f}"] + [f"{best[name]:.2f}" for name in loops]
        if loops:  # the target: at least 1.10x
            cells.append(f"{min(best[name] for name in loops) / best['script']:.2f}x")
        print(f"| `python {script} --arch conv` | " + " | ".join(cells) + " |")
    print(f"\nseconds per epoch (training, then the test set's loss); {device}; script runs of "
          f"{args.conv_epochs} epochs (median of epochs 3-{args.conv_epochs}), other runs of "
          f"{args.loop_epochs} (median of epochs 2-{args.loop_epochs}); best of {args.repeats} "
          "runs each" + (f"; JAX timed on {args.conv_jax_batches} batches of {BATCH} per epoch "
                         "and scaled to the whole epoch" if "JAX jit" in loops and args.conv_jax_batches else ""))
