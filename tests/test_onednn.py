"""cnnlab.native.onednn: oneDNN's forward, input gradient and kernel gradient equal
lax.conv_general_dilated and its autodiff over every geometry, through cnnlab's conv in both data
formats, under jit and vmap (batched kernels) and to second order; without oneDNN cnnlab falls
back to its pure-JAX forms.

Skipped where oneDNN cannot be built (the reason is shown), unless ``CNNLAB_REQUIRE_ONEDNN=1``
(CI, once it installed libdnnl-dev): then that is a failure."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fast_only
from jax import lax

import cnnlab.functional as F
from cnnlab.native import conv_impl, onednn

ATOL = RTOL = 2e-5
TARGETS = ("cnnlab_onednn_conv_forward", "cnnlab_onednn_conv_input_grad",
           "cnnlab_onednn_conv_kernel_grad")


@pytest.fixture
def needs_onednn():
    if onednn.available():
        return
    reason = f"oneDNN's convolutions are unavailable: {onednn.unavailable_reason()}"
    if os.environ.get("CNNLAB_REQUIRE_ONEDNN") == "1":
        pytest.fail(f"CNNLAB_REQUIRE_ONEDNN=1, but {reason}")
    pytest.skip(reason)


GEOMETRIES = [  # kernel, strides, padding, dilation, input H x W
    ((3, 3), (1, 1), "SAME", (1, 1), (11, 9)),
    ((3, 3), (1, 1), "VALID", (1, 1), (8, 8)),
    ((1, 1), (1, 1), "VALID", (1, 1), (7, 5)),
    ((1, 1), (2, 2), "VALID", (1, 1), (9, 9)),
    ((5, 5), (1, 1), "SAME", (1, 1), (13, 10)),
    ((5, 5), (2, 2), "SAME", (1, 1), (13, 11)),
    ((7, 7), (2, 2), "VALID", (1, 1), (23, 21)),
    ((3, 3), (2, 2), "SAME", (1, 1), (12, 12)),
    ((3, 3), (3, 3), "SAME", (1, 1), (14, 11)),
    ((4, 4), (3, 3), "SAME", (1, 1), (11, 9)),
    ((2, 3), (2, 1), ((1, 2), (0, 1)), (1, 1), (11, 9)),  # unequal strides, asymmetric padding
    ((3, 1), (1, 3), ((0, 3), (2, 0)), (1, 1), (10, 13)),
    ((3, 3), (1, 1), "SAME", (2, 2), (11, 9)),  # dilation
    ((3, 2), (3, 2), "VALID", (2, 1), (17, 9)),  # dilation and strides
    ((2, 2), (1, 1), ((3, 3), (1, 0)), (3, 2), (7, 6)),  # padding wider than the kernel
]


def _case(geometry, seed=0, batch=2, cin=3, cout=5):
    kernel_size, strides, padding, dilation, hw = geometry
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, *hw, cin), np.float32))
    k = jnp.asarray(rng.standard_normal((*kernel_size, cin, cout), np.float32))
    spec = conv_impl.ConvSpec.make(x.shape, k.shape, strides=strides, padding=padding, dilation=dilation)
    g = jnp.asarray(rng.standard_normal((batch, *spec.out_hw, cout), np.float32))
    return x, k, g, spec


def _lax(x, k, spec):
    return lax.conv_general_dilated(x, k, spec.strides, spec.padding, rhs_dilation=spec.dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_the_three_parts_equal_lax_and_its_autodiff(needs_onednn, geometry):
    x, k, g, spec = _case(geometry)
    y, vjp = jax.vjp(lambda x, k: _lax(x, k, spec), x, k)
    dx, dk = vjp(g)
    fwd = jax.jit(onednn.forward, static_argnums=2)
    input_grad = jax.jit(onednn.input_grad, static_argnums=2)
    kernel_grad = jax.jit(onednn.kernel_grad, static_argnums=2)
    np.testing.assert_allclose(fwd(x, k, spec), y, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(input_grad(g, k, spec), dx, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(kernel_grad(x, g, spec), dk, atol=ATOL, rtol=RTOL)
    # the conv_impl forms are these
    for table, args, want in ((conv_impl.FORWARDS, (x, k), y), (conv_impl.INPUT_GRADS, (g, k), dx),
                              (conv_impl.KERNEL_GRADS, (x, g), dk)):
        np.testing.assert_allclose(table["onednn"](*args, spec), want, atol=ATOL, rtol=RTOL)


def test_the_compiled_program_calls_onednn(needs_onednn):
    x, k, g, spec = _case(GEOMETRIES[7])

    def loss(x, k):
        return jnp.sum(conv_impl.conv2d(x, k, spec, "onednn/onednn/onednn") * g)

    text = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x, k).compile().as_text()
    for target in TARGETS:
        assert f'custom_call_target="{target}"' in text
    assert "convolution(" not in text  # no XLA convolution left


def test_a_batch_of_one_and_a_large_batch(needs_onednn):
    for batch in (1, 33):
        x, k, g, spec = _case(GEOMETRIES[5], batch=batch, cin=16, cout=24)
        y, vjp = jax.vjp(lambda x, k, spec=spec: _lax(x, k, spec), x, k)
        dx, dk = vjp(g)
        np.testing.assert_allclose(onednn.forward(x, k, spec), y, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(onednn.input_grad(g, k, spec), dx, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(onednn.kernel_grad(x, g, spec), dk, atol=1e-3, rtol=1e-4)


_SPLIT_PARTS = """
import sys, numpy as np
import cnnlab.runtime
cnnlab.runtime.configure()
import jax, jax.numpy as jnp
from cnnlab.native import conv_impl, onednn
assert onednn.available(), onednn.unavailable_reason()
out = {}
for i, (n, hw, cin, cout, ks, s) in enumerate([(32, (12, 12), 16, 24, (3, 3), (1, 1)),
                                               (33, (13, 11), 8, 5, (5, 5), (2, 2)),
                                               (7, (8, 8), 4, 4, (3, 3), (1, 1))]):
    rng = np.random.default_rng(i)
    x = jnp.asarray(rng.standard_normal((n, *hw, cin), np.float32))
    k = jnp.asarray(rng.standard_normal((*ks, cin, cout), np.float32))
    spec = conv_impl.ConvSpec.make(x.shape, k.shape, strides=s, padding="SAME", dilation=(1, 1))
    g = jnp.asarray(rng.standard_normal((n, *spec.out_hw, cout), np.float32))
    for name, part, args in (("forward", onednn.forward, (x, k)), ("input_grad", onednn.input_grad, (g, k)),
                             ("kernel_grad", onednn.kernel_grad, (x, g))):
        out[f"{name}{i}"] = np.asarray(jax.jit(part, static_argnums=2)(*args, spec))
np.savez(sys.argv[1], **out)
print(onednn.split_calls())
"""


def test_calls_split_over_xlas_threads_equal_the_openmp_teams_bitwise(needs_onednn, tmp_path):
    # The forward and the input gradient run in batch chunks on XLA's intra-op threads (where
    # the batch divides: 32 and 33 here, not 7); CNNLAB_ONEDNN_SPLIT=0 runs every call on
    # oneDNN's OpenMP team. Each chunk sums in the same order, so the results are identical.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpus < 2:  # XLA sizes its intra-op pool by the CPUs this process may run on
        pytest.skip("one schedulable CPU: XLA has no second thread to split over")
    results, counts = {}, {}
    for split in ("1", "0"):
        path = tmp_path / f"split{split}.npz"
        proc = subprocess.run([sys.executable, "-c", _SPLIT_PARTS, str(path)], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "CNNLAB_ONEDNN_SPLIT": split})
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts[split] = int(proc.stdout.split()[-1])
        results[split] = dict(np.load(path))
    assert counts == {"1": 4, "0": 0}  # forward and input gradient at batches 32 and 33
    assert results["1"].keys() == results["0"].keys()
    for name, want in results["0"].items():
        np.testing.assert_array_equal(results["1"][name], want, err_msg=name)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("layer", [
    dict(strides=2, padding="same"),
    dict(strides=(3, 2), padding="valid", kernel=(5, 3)),
    dict(padding="same", kernel=(1, 1)),
    dict(dilation_rate=2, padding="same", padding_mode="reflect"),
    dict(strides=(2, 1), padding=((1, 2), (0, 1)), activation="relu"),
], ids=str)
def test_cnnlab_conv2d_forced_to_onednn_matches_xla(needs_onednn, monkeypatch, data_format, layer):
    layer = dict(layer)
    kernel_size = layer.pop("kernel", (3, 3))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 11, 9, 6), np.float32))
    k = jnp.asarray(rng.standard_normal((*kernel_size, 6, 7), np.float32))
    b = jnp.asarray(rng.standard_normal((7,), np.float32))
    if data_format == "channels_first":
        x = x.transpose(0, 3, 1, 2)

    def loss(x, k, b):
        return jnp.sum(jnp.sin(F.conv2d(x, k, b, data_format=data_format, **layer)))

    monkeypatch.setenv(conv_impl.FORMULATION_ENV, "xla")
    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, k, b)
    monkeypatch.setenv(conv_impl.FORMULATION_ENV, "onednn")
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))  # a new function: traced anew
    assert all(target in step.lower(x, k, b).compile().as_text() for target in TARGETS)
    got = step(x, k, b)
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=RTOL)
    for a, w in zip(got[1], want[1]):
        np.testing.assert_allclose(a, w, atol=1e-4, rtol=RTOL)


def test_vmap_over_trials_with_their_own_kernels(needs_onednn, monkeypatch):
    # cnnlab's packed sweeps vmap the whole train step over K trials, each with its weights.
    trials, rng = 3, np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((trials, 2, 10, 9, 4), np.float32))
    k = jnp.asarray(rng.standard_normal((trials, 3, 3, 4, 5), np.float32))
    shared_x = x[0]

    def loss(x, k):
        return jnp.sum(jnp.tanh(F.conv2d(x, k, strides=2, padding="same")) ** 2)

    def run():  # traced anew at each call: the setting is read when tracing
        step = jax.value_and_grad(loss, argnums=(0, 1))
        text = jax.jit(jax.vmap(step)).lower(x, k).compile().as_text()
        return (text, jax.jit(jax.vmap(step))(x, k),
                jax.jit(jax.vmap(step, in_axes=(None, 0)))(shared_x, k))  # one input, K kernels

    monkeypatch.setenv(conv_impl.FORMULATION_ENV, "xla")
    _, *want = run()
    monkeypatch.setenv(conv_impl.FORMULATION_ENV, "onednn")
    text, *got = run()
    assert all(t in text for t in TARGETS)
    for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, w, atol=1e-4, rtol=RTOL)


def test_second_order_reverse_mode_stays_exact(needs_onednn):
    # each part's gradient is made of the other two: grad of a gradient (a gradient penalty)
    x, k, g, spec = _case(GEOMETRIES[10])

    def penalty(conv):
        def f(x, k):
            dx, dk = jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k))), (0, 1))(x, k)
            return jnp.sum(dx ** 2) + jnp.sum(jnp.cos(dk))
        return jax.grad(f, (0, 1))(x, k)

    got = penalty(lambda x, k: conv_impl.conv2d(x, k, spec, "onednn/onednn/onednn"))
    want = penalty(lambda x, k: _lax(x, k, spec))
    for a, w in zip(got, want):
        np.testing.assert_allclose(a, w, atol=1e-4, rtol=1e-4)


def test_negative_padding_and_empty_batches(needs_onednn):
    # negative (cropping) padding is XLA's in the oneDNN form; an empty batch gives zeros
    x, k, g, spec = _case(((3, 3), (1, 1), ((-1, 2), (1, 1)), (1, 1), (9, 9)))
    for name, part, args, ref in (
            ("forward", conv_impl.FORWARDS, (x, k), conv_impl.xla_forward),
            ("input", conv_impl.INPUT_GRADS, (g, k), conv_impl.INPUT_GRADS["xla"]),
            ("kernel", conv_impl.KERNEL_GRADS, (x, g), conv_impl.KERNEL_GRADS["xla"])):
        np.testing.assert_allclose(part["onednn"](*args, spec), ref(*args, spec), atol=ATOL, rtol=RTOL,
                                   err_msg=name)
    x, k, g, spec = _case(GEOMETRIES[0], batch=0)
    assert onednn.forward(x, k, spec).shape == (0, 11, 9, 5)
    np.testing.assert_array_equal(onednn.kernel_grad(x, g, spec), np.zeros(k.shape, np.float32))


def test_a_failed_build_leaves_nothing_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(onednn.ENV, raising=False)
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    state = onednn._load()  # what a fresh process would find
    assert state["reason"].startswith("building the oneDNN convolutions failed"), state
    # no partial library; the failure is recorded, so later processes do not build again
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [onednn.RECORD]
    monkeypatch.setattr(onednn, "_build", lambda path: pytest.fail("built again"))
    again = onednn._load()["reason"]
    assert again.startswith("building the oneDNN convolutions failed") and "remembered" in again
    monkeypatch.setenv("CXX", "no-such-compiler-here")  # another compiler: another key, tried anew
    assert "no C++ compiler (no-such-compiler-here)" in onednn._load()["reason"]


_DAMAGED = """
import json, sys
from cnnlab.native import onednn
print(json.dumps({"available": onednn.available(), "reason": onednn.unavailable_reason(),
                  "path": onednn._loaded().get("path"), "notes": onednn._loaded().get("notes")}))
"""


def _fresh_process(env):
    run = subprocess.run([sys.executable, "-c", _DAMAGED], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, (run.returncode, run.stderr[-3000:])  # -7 would be SIGBUS
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stderr


@pytest.mark.parametrize("damage", fast_only(["cut short", "empty", "garbage"], "cut short"))
def test_a_damaged_library_is_rebuilt_never_loaded(needs_onednn, tmp_path, damage):
    # A library cut short with its ELF header intact used to kill every later process with
    # SIGBUS; an empty or garbage one turned oneDNN off for good.
    env = {**os.environ, "CNNLAB_CACHE_DIR": str(tmp_path)}
    first, _ = _fresh_process(env)
    assert first["available"], first
    lib = first["path"]
    data = open(lib, "rb").read()
    with open(lib, "wb") as f:
        f.write({"cut short": data[: len(data) // 2], "empty": b"", "garbage": b"\x7fELF" + b"x" * 999}[damage])
    second, stderr = _fresh_process(env)
    assert second["available"] and second["path"] == lib, second
    assert "rebuilding it" in stderr and stderr.count("rebuilding it") == 1
    assert open(lib, "rb").read() == data or onednn._fingerprint(onednn.Path(lib))["size"] > 0


def test_a_read_only_cache_builds_in_a_temporary_one_and_says_so(needs_onednn, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    env = {**os.environ, "CNNLAB_CACHE_DIR": str(blocker / "cache")}  # cannot be created, even by root
    got, stderr = _fresh_process(env)
    assert got["available"], got
    assert got["path"].startswith(str(onednn.fallback_root())), got
    assert "cannot be written" in stderr and "instead" in stderr


def test_build_errors_name_the_missing_piece():
    header = "conv.cc:26:10: fatal error: oneapi/dnnl/dnnl.hpp: No such file or directory"
    assert "libdnnl-dev" in onednn._explain(header, 1) and "headers" in onednn._explain(header, 1)
    library = "/usr/bin/ld: cannot find -ldnnl: No such file or directory"
    assert "library is missing" in onednn._explain(library, 1)
    other = "In function 'f':\nconv.cc:3:1: error: expected ';'\n"
    assert onednn._explain(other, 1) == ("building the oneDNN convolutions failed (exit 1) | "
                                         "conv.cc:3:1: error: expected ';'")


def test_without_onednn_cnnlab_falls_back_to_its_jax_forms(tmp_path):
    script = """
import json, os
import jax, jax.numpy as jnp, numpy as np
import cnnlab.functional as F
from cnnlab.native import conv_impl, onednn

assert not onednn.available() and "CNNLAB_ONEDNN=0" in onednn.unavailable_reason()
x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 12, 12, 3), np.float32))
k = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 3, 4), np.float32))
loss = lambda x, k: jnp.sum(F.conv2d(x, k, strides=2, padding="same") ** 2)
text = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x, k).compile().as_text()
assert "cnnlab_onednn" not in text
grads = jax.grad(loss, (0, 1))(x, k)
os.environ["CNNLAB_CONV_FORMULATION"] = "xla"
want = jax.grad(loss, (0, 1))(x, k)
for a, w in zip(grads, want):
    np.testing.assert_allclose(a, w, atol=2e-5, rtol=2e-5)
(entry,) = json.load(open(os.path.join(os.environ["CNNLAB_CACHE_DIR"], "conv_formulations.json"))).values()
assert entry["fwd"] == entry["dw"] == "xla" and set(entry["ms"]) == {"dx"}, entry
os.environ["CNNLAB_CONV_FORMULATION"] = "onednn"
try:
    F.conv2d(x, k)
except ValueError as e:
    assert "unavailable: turned off by CNNLAB_ONEDNN=0" in str(e), e
else:
    raise AssertionError("forcing oneDNN without it did not fail")
print("ok")
"""
    env = {**os.environ, "CNNLAB_ONEDNN": "0", "CNNLAB_CACHE_DIR": str(tmp_path),
           conv_impl.FORMULATION_ENV: "auto"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert not (tmp_path / "onednn").exists()  # nothing was built


def _pypi_onednn_installed() -> bool:
    from importlib import metadata

    try:
        metadata.version(onednn.WHEEL_LIBRARY), metadata.version(onednn.WHEEL_HEADERS)
    except metadata.PackageNotFoundError:
        return False
    return True


def test_the_pypi_onednn_is_built_against_where_installed_and_system_skips_it(monkeypatch):
    monkeypatch.delenv(onednn.ENV, raising=False)
    dirs = onednn.wheel_dirs()
    assert (dirs is not None) == _pypi_onednn_installed()
    command = onednn._build_command(onednn.SOURCE, "out.so")
    if dirs is not None:
        include, lib = dirs
        assert os.path.isfile(os.path.join(include, "oneapi", "dnnl", "dnnl.hpp"))
        assert os.path.isfile(os.path.join(lib, "libdnnl.so"))
        assert [f"-I{include}", f"-L{lib}", f"-Wl,-rpath,{lib}"] == [
            a for a in command if a in (f"-I{include}", f"-L{lib}", f"-Wl,-rpath,{lib}")]
        assert command.index(f"-I{include}") < command.index(f"-I{jax.ffi.include_dir()}")
    monkeypatch.setenv(onednn.ENV, "system")
    assert onednn.wheel_dirs() is None
    assert not any(a.startswith(("-L", "-Wl,-rpath")) for a in onednn._build_command(onednn.SOURCE, "o"))


def test_the_pypi_onednn_is_the_one_loaded_where_installed(needs_onednn):
    if not _pypi_onednn_installed() or os.environ.get(onednn.ENV, "").lower() == "system":
        pytest.skip("oneDNN from PyPI is not in use here")
    assert int(onednn.version().split(".")[0]) >= 3, onednn.version()


@pytest.mark.skipif(not os.path.isfile("/usr/include/oneapi/dnnl/dnnl.hpp"),
                    reason="no system oneDNN (libdnnl-dev)")
def test_the_system_onednn_also_builds_and_equals_lax(tmp_path):
    # CNNLAB_ONEDNN=system: the oneDNN 2 code paths of conv.cc, built and checked on all parts.
    script = """
import jax, jax.numpy as jnp, numpy as np
from cnnlab.native import conv_impl, onednn
assert onednn.available(), onednn.unavailable_reason()
assert onednn.wheel_dirs() is None
x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 13, 11, 3), np.float32))
k = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 3, 5), np.float32))
spec = conv_impl.ConvSpec.make(x.shape, k.shape, strides=(2, 1), padding="SAME", dilation=(1, 1))
g = jnp.asarray(np.random.default_rng(2).standard_normal((2, *spec.out_hw, 5), np.float32))
def output_and_gradients(form):
    loss = lambda x, k: jnp.sum(conv_impl.conv2d(x, k, spec, form) * g)
    return (conv_impl.conv2d(x, k, spec, form), *jax.grad(loss, (0, 1))(x, k))
got, want = output_and_gradients("onednn/onednn/onednn"), output_and_gradients("xla/xla/xla")
for a, w in zip(got, want):
    np.testing.assert_allclose(a, w, atol=1e-4, rtol=1e-4)
print(onednn.version())
"""
    if shutil.which(os.environ.get("CXX", "g++").split()[0]) is None:
        pytest.skip("no C++ compiler")
    env = {**os.environ, onednn.ENV: "system", "CNNLAB_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.fullmatch(r"\d+\.\d+\.\d+", proc.stdout.strip()), proc.stdout


def _bf16_relative_error(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[5], GEOMETRIES[12]], ids=str)
def test_bfloat16_parts_equal_float32_lax_to_bfloat16_rounding(needs_onednn, geometry):
    # bfloat16 operands (mixed precision): oneDNN accumulates in float32 and rounds the result
    # once, so each part is within a few bfloat16 ulps (2**-8) of float32 lax on the same
    # bfloat16-valued operands.
    x, k, g, spec = _case(geometry, batch=4, cin=16, cout=24)
    x, k, g = (a.astype(jnp.bfloat16) for a in (x, k, g))
    spec16 = conv_impl.ConvSpec.make(x.shape, k.shape, strides=spec.strides, padding=spec.padding,
                                     dilation=spec.dilation, dtype=jnp.bfloat16)
    assert spec16.dtype == "bfloat16"
    f32 = [a.astype(jnp.float32) for a in (x, k, g)]
    y, vjp = jax.vjp(lambda x, k: _lax(x, k, spec), *f32[:2])
    dx, dk = vjp(f32[2])
    # cnnlab's oneDNN formulations: oneDNN's bfloat16 primitives where the CPU has them, else
    # (an AVX2-only CPU, or ONEDNN_MAX_CPU_ISA=AVX2) its float32 ones rounded to bfloat16.
    forms = (conv_impl.FORWARDS["onednn"], conv_impl.INPUT_GRADS["onednn"],
             conv_impl.KERNEL_GRADS["onednn"])
    for form, (a, b), want in zip(forms, ((x, k), (g, k), (x, g)), (y, dx, dk)):
        got = form(a, b, spec16)
        assert got.dtype == jnp.bfloat16
        assert _bf16_relative_error(got, want) < 4e-3
        # rounded once from float32 (what the fallback computes): at most an ulp or two away
        exact = form(a.astype(jnp.float32), b.astype(jnp.float32), spec).astype(jnp.bfloat16)
        assert _bf16_relative_error(got, exact) < 8e-3
    if onednn.supports_bfloat16():
        np.testing.assert_array_equal(onednn.forward(x, k, spec16), forms[0](x, k, spec16))
    else:  # the raw primitive is refused; cnnlab never sends it
        with pytest.raises(Exception, match="primitive descriptor"):
            jax.block_until_ready(onednn.forward(x, k, spec16))


_AVX2_ONLY = """
import json, jax, jax.numpy as jnp, numpy as np
import cnnlab.functional as F
from cnnlab.native import conv_impl, onednn
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((4, 12, 12, 8)), jnp.bfloat16)
k = jnp.asarray(rng.standard_normal((3, 3, 8, 8)), jnp.bfloat16)
loss = lambda x, k: jnp.sum(F.conv2d(x, k, strides=2, padding="same").astype(jnp.float32))
compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x, k).compile()
_, (dx, dk) = compiled(x, k)
f32 = jax.grad(lambda x, k: jnp.sum(F.conv2d(x, k, strides=2, padding="same")), (0, 1))(
    x.astype(jnp.float32), k.astype(jnp.float32))
err = [float(np.linalg.norm(np.float32(a) - b) / np.linalg.norm(b)) for a, b in zip((dx, dk), f32)]
print(json.dumps({"supports": onednn.supports_bfloat16(), "native": onednn.native_bfloat16(),
                  "dtypes": [str(dx.dtype), str(dk.dtype)], "err": err,
                  "custom_calls": compiled.as_text().count("cnnlab_onednn_conv")}))
"""


def test_without_native_bfloat16_onednn_falls_back_to_float32_rounded(needs_onednn, tmp_path):
    # An AVX2-only CPU, emulated on any newer one: oneDNN refuses bfloat16 convolutions, and
    # cnnlab's bfloat16 convolutions forced onto oneDNN compute in float32, rounded to bfloat16.
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", conv_impl.FORMULATION_ENV: "onednn",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX2").strip()}
    run = subprocess.run([sys.executable, "-c", _AVX2_ONLY], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["supports"] is False
    assert got["native"][0] is False and "ONEDNN_MAX_CPU_ISA=AVX2" in got["native"][1]
    assert got["dtypes"] == ["bfloat16", "bfloat16"]
    assert max(got["err"]) < 4e-3
    assert got["custom_calls"] >= 3  # the float32 primitives, in the compiled program


def test_bfloat16_cnnlab_conv_runs_onednn_and_mixed_types_are_refused(needs_onednn, monkeypatch):
    monkeypatch.setenv(conv_impl.FORMULATION_ENV, "onednn")
    x, k, g, spec = _case(GEOMETRIES[7], batch=4, cin=8, cout=8)
    x16, k16 = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)

    def loss(x, k):
        return jnp.sum(F.conv2d(x, k, strides=spec.strides, padding="same").astype(jnp.float32)
                       * g)

    compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x16, k16).compile()
    text = compiled.as_text()
    for target in TARGETS:
        assert f'custom_call_target="{target}"' in text
    _, (dx, dk) = compiled(x16, k16)
    assert dx.dtype == dk.dtype == jnp.bfloat16
    want_dx, want_dk = jax.grad(lambda x, k: jnp.sum(_lax(x, k, spec) * g), (0, 1))(
        x16.astype(jnp.float32), k16.astype(jnp.float32))
    assert _bf16_relative_error(dx, want_dx) < 4e-3
    assert _bf16_relative_error(dk, want_dk) < 4e-3
    # one float32 and one bfloat16 operand: the handler refuses (cnnlab's conv never sends it)
    with pytest.raises(Exception, match="must all be float32 or all bfloat16"):
        jax.block_until_ready(onednn.forward(x16, k, spec))
