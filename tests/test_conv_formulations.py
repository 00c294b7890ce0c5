"""cnnlab.native.conv_impl: every formulation equals lax.conv_general_dilated and its
autodiff; the per-shape choice is measured once, cached per machine and forced by the
environment. oneDNN's forms fall back to XLA's where oneDNN is unavailable; tests/test_onednn.py
tests them where it is."""

import contextlib
import itertools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import cnnlab.functional as F
from cnnlab.native import conv_impl, onednn

ATOL = RTOL = 2e-5
GEOMETRIES = [  # kernel, strides, padding, dilation
    ((3, 3), (1, 1), "SAME", (1, 1)),
    ((3, 3), (2, 2), "SAME", (1, 1)),
    ((7, 7), (2, 2), "VALID", (1, 1)),
    ((2, 3), (2, 1), ((1, 2), (0, 1)), (1, 1)),
    ((3, 3), (1, 1), "SAME", (2, 2)),
    ((3, 2), (3, 2), "VALID", (2, 1)),
    ((1, 1), (2, 2), "VALID", (1, 1)),
    ((4, 4), (3, 3), "SAME", (1, 1)),
]


def _case(geometry, seed=0, batch=2, hw=(11, 9), cin=3, cout=4):
    kernel_size, strides, padding, dilation = geometry
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, *hw, cin), np.float32))
    k = jnp.asarray(rng.standard_normal((*kernel_size, cin, cout), np.float32))
    spec = conv_impl.ConvSpec.make(x.shape, k.shape, strides=strides, padding=padding, dilation=dilation)
    g = jnp.asarray(rng.standard_normal((batch, *spec.out_hw, cout), np.float32))
    return x, k, g, spec


def _lax_grads(x, k, g, spec):
    def f(x, k):
        return lax.conv_general_dilated(x, k, spec.strides, spec.padding, rhs_dilation=spec.dilation,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    y, vjp = jax.vjp(f, x, k)
    assert y.shape == g.shape
    return vjp(g)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_every_formulation_equals_lax_autodiff(geometry):
    x, k, g, spec = _case(geometry)
    dx, dk = _lax_grads(x, k, g, spec)
    for name, fn in conv_impl.INPUT_GRADS.items():
        np.testing.assert_allclose(fn(g, k, spec), dx, atol=ATOL, rtol=RTOL, err_msg=name)
    for name, fn in conv_impl.KERNEL_GRADS.items():
        np.testing.assert_allclose(fn(x, g, spec), dk, atol=ATOL, rtol=RTOL, err_msg=name)
    y = lax.conv_general_dilated(x, k, spec.strides, spec.padding, rhs_dilation=spec.dilation,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_array_equal(conv_impl.xla_forward(x, k, spec), y)
    for name, fn in conv_impl.FORWARDS.items():
        np.testing.assert_allclose(fn(x, k, spec), y, atol=ATOL, rtol=RTOL, err_msg=name)


def _settings():
    """Every forced setting of two and of three parts whose forms can run here."""
    forms = [names if onednn.available() else [n for n in names if n != "onednn"]
             for names in conv_impl.TABLES.values()]
    return ([f"{dx}/{dw}" for dx, dw in itertools.product(*forms[1:])]
            + [f"onednn/{dx}/{dw}" for dx, dw in itertools.product(*forms[1:]) if len(forms[0]) > 1])


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("layer", [
    dict(strides=2, padding="same"),
    dict(dilation_rate=2, padding="same", padding_mode="reflect"),
    dict(strides=(2, 1), padding=((1, 2), (0, 1)), activation="relu"),
    dict(padding="valid", groups=3),  # groups > 1: XLA's, whatever is forced
], ids=str)
def test_forced_formulations_through_conv2d_match_xla(monkeypatch, data_format, layer):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 10, 9, 6), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, 6 // layer.get("groups", 1), 6), np.float32))
    b = jnp.asarray(rng.standard_normal((6,), np.float32))
    if data_format == "channels_first":
        x = x.transpose(0, 3, 1, 2)

    def loss(x, k, b):
        return jnp.sum(jnp.sin(F.conv2d(x, k, b, data_format=data_format, **layer)))

    monkeypatch.setenv(conv_impl.FORMULATION_ENV, "xla")
    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, k, b)
    for setting in _settings():
        monkeypatch.setenv(conv_impl.FORMULATION_ENV, setting)
        got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, k, b)  # retraced: new env
        if setting.count("/") == 1:
            np.testing.assert_array_equal(got[0], want[0])  # the forward is XLA's
        np.testing.assert_allclose(got[0], want[0], atol=ATOL, rtol=RTOL, err_msg=setting)
        for a, w in zip(got[1], want[1]):
            np.testing.assert_allclose(a, w, atol=ATOL, rtol=RTOL, err_msg=setting)


@pytest.mark.parametrize("setting, expected", [
    ("phase/fft", r"CNNLAB_CONV_FORMULATION='phase/fft': .*input grad one of xla, phase"),
    ("fft/xla/xla", r"forward one of xla, onednn, the input grad one of xla, phase, onednn and the kernel grad one of xla, onednn"),
    ("xla/xla/xla/xla", r"<forward>/<input grad>/<kernel grad>"),
])
def test_a_bad_setting_names_the_choices(monkeypatch, setting, expected):
    monkeypatch.setenv(conv_impl.FORMULATION_ENV, setting)
    with pytest.raises(ValueError, match=expected):
        F.conv2d(jnp.ones((1, 5, 5, 1)), jnp.ones((3, 3, 1, 1)))


@pytest.fixture
def no_onednn(monkeypatch):
    """This process as one where oneDNN's convolutions are unavailable."""
    monkeypatch.setattr(onednn, "_state", {"reason": "unavailable for this test"})


def test_forcing_onednn_where_it_is_unavailable_says_why(monkeypatch, no_onednn):
    for setting in ("onednn", "xla/onednn", "onednn/xla/xla"):
        monkeypatch.setenv(conv_impl.FORMULATION_ENV, setting)
        with pytest.raises(ValueError, match=f"'{setting}': oneDNN's convolutions are unavailable: unavailable for this test"):
            F.conv2d(jnp.ones((1, 5, 5, 1)), jnp.ones((3, 3, 1, 1)))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(conv_impl.FORMULATION_ENV, "auto")
    monkeypatch.setattr(conv_impl, "_memory", {})
    # The machine's load unread (as where /proc/stat is absent): a test's choices never depend on
    # what else runs meanwhile. test_a_choice_timed_under_load_... sets it.
    monkeypatch.setattr(conv_impl, "_cpu_ticks", lambda: None)
    conv_impl._quiet_now.cache_clear()  # sampled anew under these counters
    return tmp_path / conv_impl.CACHE_FILE


FAKE_MS = {"fwd": {"xla": 10.0, "onednn": 9.5}, "dx": {"xla": 10.0, "phase": 8.0, "onednn": 8.5},
           "dw": {"xla": 10.0, "onednn": 9.5}}


def _fake_measure(calls, ms=FAKE_MS):
    def measure(spec, *, parts):
        calls.append((spec, tuple(parts)))
        names = conv_impl.applicable(spec)
        return {part: {n: ms[part][n] for n in names[part]} for part in parts}

    return measure


@pytest.mark.parametrize("with_onednn", [False, True])
def test_auto_measures_a_shape_once_and_caches_the_choice_per_machine(fresh_cache, monkeypatch, with_onednn):
    if with_onednn and not onednn.available():
        pytest.skip(f"oneDNN: {onednn.unavailable_reason()}")
    if not with_onednn:
        monkeypatch.setattr(onednn, "_state", {"reason": "unavailable for this test"})
    x, k, g, spec = _case(GEOMETRIES[1])
    calls = []
    monkeypatch.setattr(conv_impl, "measure", _fake_measure(calls))

    def grads():
        return jax.grad(lambda x, k: jnp.sum(F.conv2d(x, k, strides=2, padding="same") ** 2), (0, 1))(x, k)

    first = grads()
    timed = ("fwd", "dx", "dw") if with_onednn else ("dx",)  # the parts with a choice
    assert calls == [(spec, timed)]
    # phase is 20% faster: kept; oneDNN only 5% in the forward and kernel grad: under the 10%
    # margin, so XLA's; in the input grad, slower than phase.
    cache = json.loads(fresh_cache.read_text())
    assert len(cache) == 1 and (f"onednn {onednn.version()}" if with_onednn else "onednn no") in next(iter(cache))
    entry = next(iter(cache.values()))
    assert (entry["fwd"], entry["dx"], entry["dw"]) == ("xla", "phase", "xla")
    names = conv_impl.applicable(spec)
    assert entry["ms"] == {part: {n: FAKE_MS[part][n] for n in names[part]} for part in timed}
    monkeypatch.setattr(conv_impl, "_memory", {})  # a new process: read from the file
    second = grads()
    assert len(calls) == 1
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    F.conv2d(x, k, strides=2, padding="same")  # no gradient: the forward, chosen already
    assert len(calls) == 1
    jax.grad(lambda k: jnp.sum(F.conv2d(x, k, padding="same")))(k)  # unstrided: only oneDNN can differ
    assert len(calls) == 1 + with_onednn
    F.conv2d(x[:1], k, strides=2, padding="same")  # a new shape, forward only: only the forward timed
    if with_onednn:
        assert [parts for _, parts in calls[1:]] == [("fwd", "dx", "dw"), ("fwd",)]
        assert calls[2][0].batch == 1
    else:
        assert len(calls) == 1


def test_onednn_is_chosen_where_it_wins(fresh_cache, monkeypatch):
    if not onednn.available():
        pytest.skip(f"oneDNN: {onednn.unavailable_reason()}")
    x, k, g, spec = _case(GEOMETRIES[1])
    fast = {"fwd": {"xla": 10.0, "onednn": 5.0}, "dx": {"xla": 10.0, "phase": 8.0, "onednn": 4.0},
            "dw": {"xla": 10.0, "onednn": 3.0}}
    calls = []
    monkeypatch.setattr(conv_impl, "measure", _fake_measure(calls, fast))
    loss = jax.jit(lambda x, k: jnp.sum(F.conv2d(x, k, strides=2, padding="same") * g))
    text = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x, k).compile().as_text()
    for target in ("cnnlab_onednn_conv_forward", "cnnlab_onednn_conv_input_grad", "cnnlab_onednn_conv_kernel_grad"):
        assert f'custom_call_target="{target}"' in text
    assert conv_impl.choose(spec) == ("onednn", "onednn", "onednn")
    got = jax.value_and_grad(loss, (0, 1))(x, k)[1]
    for a, w in zip(got, _lax_grads(x, k, g, spec)):
        np.testing.assert_allclose(a, w, atol=ATOL, rtol=RTOL)


def test_auto_really_measures_and_off_the_cpu_uses_xla(fresh_cache, monkeypatch):
    x, k, g, spec = _case(GEOMETRIES[1])
    times = conv_impl.measure(spec)
    names = conv_impl.applicable(spec)
    assert {part: set(t) for part, t in times.items()} == {
        part: set(n) if len(n) > 1 else set() for part, n in names.items()}  # one form: nothing to time
    assert set(names["dx"]) >= {"xla", "phase"}
    assert all(t > 0 for part in times.values() for t in part.values())
    dx, dk = jax.grad(lambda x, k: jnp.sum(F.conv2d(x, k, strides=2, padding="same") * g), (0, 1))(x, k)
    want = _lax_grads(x, k, g, spec)
    np.testing.assert_allclose(dx, want[0], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(dk, want[1], atol=ATOL, rtol=RTOL)
    assert len(json.loads(fresh_cache.read_text())) == 1
    monkeypatch.setattr(conv_impl, "_memory", {})
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert conv_impl.choose(spec) == ("xla", "xla", "xla")  # the cached choice is not used either
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert conv_impl.choose(spec) == ("xla", "xla", "xla")
    assert conv_impl.choose(spec, ("dw",)) == ("xla",)


@pytest.mark.slow
def test_cnnlab_train_chooses_by_measurement_when_asked(tmp_path):
    import os
    import subprocess
    import sys

    from helpers import ROOT, SMOKE

    env = {**os.environ, "CNNLAB_CACHE_DIR": str(tmp_path / "cache"), conv_impl.FORMULATION_ENV: "auto"}
    proc = subprocess.run(
        [sys.executable, "-m", "cnnlab", "train", f"--config={SMOKE}", f"--workdir={tmp_path / 'run'}",
         "--config.num_epochs=1", "--config.progress=False", "--config.model.name=stridednet",
         "--config.model.kwargs.widths=(8,)", "--config.model.kwargs.stem_filters=4",
         "--config.model.kwargs.dense_units=16", "--config.data.image_size=40"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen = json.loads((tmp_path / "cache" / conv_impl.CACHE_FILE).read_text())
    trained = [e for e in chosen.values() if "dx" in e]
    if onednn.available():
        # every convolution has a choice: stridednet's three trained shapes each measured once,
        # the forward-only ones (initialization, evaluation) for their forward alone
        assert len(trained) == 3 and all(e["fwd"] in conv_impl.FORWARDS for e in chosen.values())
    else:
        assert len(chosen) == len(trained) == 2  # the strided convolutions (the stem and one 3x3/2)
    assert all(e["dx"] in conv_impl.INPUT_GRADS and e["dw"] in conv_impl.KERNEL_GRADS for e in trained)


def test_measuring_while_a_program_is_traced_times_real_runs():
    # Called while a train step is traced (where `auto` measures), the timed calls must run,
    # not be traced into that program (which timed ~0.5 ms for every shape).
    times = {}

    def step(x):
        for batch in (1, 64):
            spec = conv_impl.ConvSpec.make((batch, 45, 45, 16), (3, 3, 16, 32), strides=(2, 2),
                                           padding="SAME", dilation=(1, 1))  # strided: timed with or without oneDNN
            times[batch] = conv_impl.measure(spec, parts=("dx",), rounds=3)["dx"]["xla"]
        return x

    jax.jit(step)(jnp.ones(2))
    assert times[64] > 5 * times[1], times


def test_xla_and_unstrided_convolutions_are_exactly_lax_conv_general_dilated(monkeypatch, fresh_cache, no_onednn):
    x, k = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 2))

    def jaxpr(**kwargs):
        return str(jax.make_jaxpr(lambda k: F.conv2d(x, k, **kwargs))(k))

    for setting in ("xla", "xla/xla", "xla/xla/xla"):
        monkeypatch.setenv(conv_impl.FORMULATION_ENV, setting)
        assert "conv_general_dilated" in jaxpr(strides=2) and "custom_vjp" not in jaxpr(strides=2)
    monkeypatch.delenv(conv_impl.FORMULATION_ENV)  # the default: auto
    assert "custom_vjp" in jaxpr(strides=2)
    assert "custom_vjp" not in jaxpr() and "custom_vjp" not in jaxpr(strides=2, dilation_rate=2)
    # forward-mode autodiff works where no alternative applies
    jax.jvp(lambda k: F.conv2d(x, k), (k,), (k,))


def test_a_formulation_that_fails_to_run_is_skipped_when_measured(fresh_cache, monkeypatch):
    # e.g. oneDNN refusing a primitive for this CPU's ISA: the next formulation is used, and
    # why is kept; XLA's own form must run.
    x, k, g, spec = _case(GEOMETRIES[1])

    def refused(x, kernel, spec):
        raise RuntimeError("could not create a primitive descriptor (test)")

    monkeypatch.setitem(conv_impl.FORWARDS, "broken", refused)
    monkeypatch.setattr(conv_impl, "applicable",
                        lambda spec: {"fwd": ["xla", "broken"], "dx": ["xla"], "dw": ["xla"]})
    times = conv_impl.measure(spec, parts=("fwd",), rounds=1)
    assert set(times["fwd"]) == {"xla"}
    assert "could not create a primitive" in conv_impl.failed[(conv_impl._spec_key(spec), "fwd", "broken")]
    assert conv_impl.choose(spec) == ("xla", "xla", "xla")
    monkeypatch.setitem(conv_impl.FORWARDS, "xla", refused)
    with pytest.raises(RuntimeError, match="primitive descriptor"):
        conv_impl.measure(spec, parts=("fwd",), rounds=1)


@pytest.mark.parametrize("damage", ["[1, 2]", '{"KEY": {"fwd": 3, "dx": ["phase"], "dw": null}}',
                                    '{"KEY": {"fwd": "nonesuch", "dx": "phase", "dw": "xla"}}', "{not json"])
def test_a_damaged_cache_is_measured_again_not_trusted(fresh_cache, monkeypatch, damage):
    x, k, g, spec = _case(GEOMETRIES[1])
    key = f"{conv_impl._machine_key()}|{conv_impl._spec_key(spec)}"
    fresh_cache.write_text(damage.replace("KEY", key.replace('"', '\\"')))
    calls = []
    monkeypatch.setattr(conv_impl, "measure", _fake_measure(calls))
    dx, dk = jax.grad(lambda x, k: jnp.sum(F.conv2d(x, k, strides=2, padding="same") * g), (0, 1))(x, k)
    assert calls and all(p in ("fwd", "dx", "dw") for _, parts in calls for p in parts)
    entry = json.loads(fresh_cache.read_text())[key]
    assert all(entry[p] in conv_impl.TABLES[p] for p in ("fwd", "dx", "dw"))
    want = _lax_grads(x, k, g, spec)
    np.testing.assert_allclose(dx, want[0], atol=ATOL, rtol=RTOL)


def test_a_choice_timed_under_load_is_timed_again_when_the_machine_is_quiet(fresh_cache, monkeypatch):
    x, k, g, spec = _case(GEOMETRIES[1])
    key = f"{conv_impl._machine_key()}|{conv_impl._spec_key(spec)}"
    load = {"others": 0.9}

    @contextlib.contextmanager
    def others_busy():
        yield [load["others"]]

    monkeypatch.setattr(conv_impl, "others_busy", others_busy)
    monkeypatch.setattr(conv_impl, "_quiet_now", lambda: load["others"] <= conv_impl.BUSY)
    calls = []
    # under load phase looks 20% slower than XLA's; on the quiet machine 20% faster
    loaded = {**FAKE_MS, "dx": {"xla": 10.0, "phase": 12.0, "onednn": 12.0}}
    monkeypatch.setattr(conv_impl, "measure", _fake_measure(calls, loaded))
    assert conv_impl.choose(spec, ("dx",)) == ("xla",)
    assert json.loads(fresh_cache.read_text())[key]["busy"] == 0.9

    def new_process():  # started after every measurement so far
        monkeypatch.setattr(conv_impl, "_memory", {})
        monkeypatch.setattr(conv_impl, "_STARTED", time.time() + 0.01)
        return conv_impl.choose(spec, ("dx",))

    assert new_process() == ("xla",) and len(calls) == 1  # still busy: the provisional choice holds
    load["others"] = 0.0
    monkeypatch.setattr(conv_impl, "measure", _fake_measure(calls))
    assert conv_impl.choose(spec, ("dx",)) == ("xla",) and len(calls) == 1  # this process keeps its choice
    monkeypatch.setattr(conv_impl, "_memory", {})  # a process started before that measurement:
    monkeypatch.setattr(conv_impl, "_STARTED", 0.0)
    assert conv_impl.choose(spec, ("dx",)) == ("xla",) and len(calls) == 1  # its sibling's choice
    assert new_process() == ("phase",) and len(calls) == 2  # quiet: timed again, and kept
    entry = json.loads(fresh_cache.read_text())[key]
    assert entry["busy"] == 0.0 and entry["dx"] == "phase"
    assert new_process() == ("phase",) and len(calls) == 2
    # an entry from before loads were recorded is timed again once, as if timed under load
    legacy = json.loads(fresh_cache.read_text())
    legacy[key] = {"dx": "xla"}
    fresh_cache.write_text(json.dumps(legacy))
    assert new_process() == ("phase",) and len(calls) == 3


def test_others_busy_counts_the_cpu_time_of_other_processes():
    if conv_impl._cpu_ticks() is None:
        pytest.skip("the machine's CPU counters (/proc/stat) cannot be read here")
    burn = "import time\nend = time.time() + 1.0\nwhile time.time() < end: pass"
    with conv_impl.others_busy() as busy:
        subprocess.run([sys.executable, "-c", burn], check=True)
    # one process spinning for a second on this machine's CPUs (more if others run too)
    assert 0.8 / os.cpu_count() <= busy[0] <= 1.0


def test_pinned_choices_win_over_measurement_and_other_machines_are_ignored(fresh_cache, monkeypatch):
    # What a run records (made_choices) and its resume pins: no new measurement can change it.
    x, k, g, spec = _case(GEOMETRIES[1])
    key = f"{conv_impl._machine_key()}|{conv_impl._spec_key(spec)}"
    conv_impl.pin_choices({key: {"fwd": "xla", "dx": "phase", "dw": "xla"},
                           "another machine|" + conv_impl._spec_key(spec): {"fwd": "onednn"},
                           key + "x": {"fwd": "nonesuch"}})
    monkeypatch.setattr(conv_impl, "measure", lambda *a, **kw: pytest.fail("measured a pinned shape"))
    assert conv_impl.choose(spec) == ("xla", "phase", "xla")
    assert conv_impl.made_choices() == {key: {"fwd": "xla", "dx": "phase", "dw": "xla"}}


def test_threads_measuring_one_shape_at_once_measure_it_once_and_agree(fresh_cache, monkeypatch):
    import concurrent.futures
    import threading
    import time

    x, k, g, spec = _case(GEOMETRIES[1])
    calls, lock = [], threading.Lock()
    flip = iter(["phase", "xla", "phase", "xla"])

    def slow_measure(spec, *, parts):
        with lock:
            calls.append(parts)
            winner = next(flip)
        time.sleep(0.2)  # both threads are in choose() now
        return {p: ({"xla": 10.0, "phase": 1.0} if winner == "phase" else {"xla": 1.0, "phase": 10.0})
                if p == "dx" else {} for p in parts}

    monkeypatch.setattr(conv_impl, "measure", slow_measure)
    monkeypatch.setattr(onednn, "_state", {"reason": "unavailable for this test"})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda _: conv_impl.choose(spec), range(2)))
    assert len(calls) == 1 and got[0] == got[1]


_OTHER_PROCESS = """
import json, sys
from cnnlab.native import conv_impl
spec = conv_impl.ConvSpec.make((2, 11, 9, 3), (3, 3, 3, 4), strides=(2, 2), padding="SAME", dilation=(1, 1))
print(json.dumps(conv_impl.choose(spec)))
"""


def test_two_processes_measuring_at_once_keep_one_choice(fresh_cache):
    # Each process measures for real (timing noise may rank phase and xla either way): the file
    # lock makes the second one wait and take the first one's choice.
    import os
    import subprocess
    import sys

    env = {**os.environ, "CNNLAB_ONEDNN": "0"}
    procs = [subprocess.Popen([sys.executable, "-c", _OTHER_PROCESS], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert json.loads(outs[0].strip().splitlines()[-1]) == json.loads(outs[1].strip().splitlines()[-1])
    assert len(json.loads(fresh_cache.read_text())) == 1


@pytest.mark.slow
def test_a_resumed_run_compiles_the_formulations_its_run_recorded(fresh_cache, monkeypatch, tmp_path):
    # The run records its choices; a resume in a new process whose machine cache is gone (or
    # would now measure otherwise) compiles the recorded ones: no timing noise in resumes.
    from helpers import tiny_config

    from cnnlab.train import StopTraining, rundir, train_and_evaluate

    monkeypatch.setattr(onednn, "_state", {"reason": "unavailable for this test"})
    calls = []
    monkeypatch.setattr(conv_impl, "measure", _fake_measure(calls))  # phase wins the input grad
    c = tiny_config()
    c.model.name = "stridednet"  # strided convolutions: the input gradient has a choice
    c.model.kwargs = {"widths": (8,), "dense_units": 16, "stem_filters": 4}
    c.data.image_size = 24
    workdir = str(tmp_path / "run")

    def stop(epoch, record):
        raise StopTraining

    train_and_evaluate(c, workdir, on_epoch_end=stop)
    recorded = json.loads((tmp_path / "run" / rundir.FORMULATIONS_FILE).read_text())
    assert calls and any(e.get("dx") == "phase" for e in recorded.values())
    fresh_cache.unlink()
    monkeypatch.setattr(conv_impl, "_memory", {})
    monkeypatch.setattr(conv_impl, "measure", lambda *a, **kw: pytest.fail("measured again on resume"))
    train_and_evaluate(c, workdir)
    assert {k: v for k, v in conv_impl.made_choices().items() if k in recorded} == recorded


def test_an_unwritable_cache_falls_back_to_a_temporary_one_and_says_so(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(blocker / "cache"))  # uncreatable, even by root
    monkeypatch.setenv(conv_impl.FORMULATION_ENV, "auto")
    monkeypatch.setattr(conv_impl, "_memory", {})
    monkeypatch.setattr(conv_impl, "_unwritable", set())
    monkeypatch.setattr(onednn, "fallback_root", lambda: tmp_path / "fallback")
    monkeypatch.setattr(onednn, "_state", {"reason": "unavailable for this test"})
    calls = []
    monkeypatch.setattr(conv_impl, "measure", _fake_measure(calls))
    x, k, g, spec = _case(GEOMETRIES[1])
    assert conv_impl.choose(spec) == ("xla", "phase", "xla")
    assert "cannot be written" in capsys.readouterr().err
    assert (tmp_path / "fallback" / conv_impl.CACHE_FILE).exists()


_PURE_LAX = """
import jax, jax.numpy as jnp
import cnnlab.functional as F
from cnnlab.native import conv_impl, onednn
g = jax.grad(lambda k: jnp.sum(F.conv2d(jnp.ones((2, 9, 9, 3)), k, strides=2, padding="same")))
g(jnp.ones((3, 3, 3, 4)))
print(onednn._state == {}, conv_impl._memory == {})
"""


def test_functional_stays_pure_lax_unless_the_fast_path_is_on(tmp_path):
    # Under CNNLAB_CONV_FORMULATION=xla nothing of the native package runs: no oneDNN build or
    # load, no measurement, no cache file.
    import os
    import subprocess
    import sys

    env = {**os.environ, conv_impl.FORMULATION_ENV: "xla", "CNNLAB_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", _PURE_LAX], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "True"]
    assert list(tmp_path.iterdir()) == []
