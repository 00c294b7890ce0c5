"""cnnlab.backend and cnnlab.runtime: XLA:CPU's convolution kernels and malloc's mode, set by
``cnnlab.runtime.configure()`` (the commands call it), never by ``import cnnlab``."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from cnnlab import backend

FLAG = backend.EIGEN_CONVOLUTIONS_FLAG


def test_the_default_takes_convolutions_out_of_ynnpack_and_keeps_other_flags(monkeypatch):
    monkeypatch.setattr(backend, "_jaxlib_has_ynnpack", lambda: True)
    monkeypatch.setattr(backend, "_cpu_backend_started", lambda: False)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert backend.configure_xla_cpu(env) == "eigen"
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {FLAG}"
    env = {}
    assert backend.configure_xla_cpu(env) == "eigen" and env["XLA_FLAGS"] == FLAG


def test_a_late_import_warns_that_the_flag_cannot_apply(monkeypatch):
    monkeypatch.setattr(backend, "_jaxlib_has_ynnpack", lambda: True)
    monkeypatch.setattr(backend, "_cpu_backend_started", lambda: True)
    env = {}
    with pytest.warns(UserWarning, match="called after JAX started its backend"):
        assert backend.configure_xla_cpu(env) == "too-late"
    assert env == {}  # XLA_FLAGS keeps saying what the backend runs with (cache keys read it)


def test_the_users_own_choice_and_older_jaxlibs_are_left_alone(monkeypatch):
    monkeypatch.setattr(backend, "_jaxlib_has_ynnpack", lambda: True)
    own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
    assert backend.configure_xla_cpu(own) == "user" and own["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
    xla = {"CNNLAB_CPU_CONVOLUTIONS": "ynnpack"}
    assert backend.configure_xla_cpu(xla) == "ynnpack" and "XLA_FLAGS" not in xla
    monkeypatch.setattr(backend, "_jaxlib_has_ynnpack", lambda: False)
    old = {}
    assert backend.configure_xla_cpu(old) == "xla-default" and "XLA_FLAGS" not in old
    with pytest.raises(ValueError, match="CNNLAB_CPU_CONVOLUTIONS='mkl': must be one of eigen, ynnpack"):
        backend.configure_xla_cpu({"CNNLAB_CPU_CONVOLUTIONS": "mkl"})


_COMPILED = """
import re, cnnlab.runtime
mode = cnnlab.runtime.configure()["cpu_convolutions"]  # before JAX starts
import jax, jax.numpy as jnp
from cnnlab import functional as F
x, k = jnp.ones((4, 24, 24, 16)), jnp.ones((3, 3, 16, 32))
grad = jax.jit(jax.grad(lambda k: jnp.sum(F.conv2d(x, k, padding="same") ** 2)))
text = grad.lower(k).compile().as_text()
# Each computation's name -> its body; a YNNPACK call is a fusion of kind __ynn_fusion.
bodies = {m.group(1): m.group(0) for m in re.finditer(r"^%(\\S+) \\(.*?^}", text, re.M | re.S)}
ynn = re.findall(r"calls=%([\\w.]+), .*__ynn_fusion", text)
in_ynn = sum(" convolution(" in bodies.get(name, "") for name in ynn)
print(mode, text.count(" convolution("), in_ynn)
"""


@pytest.mark.parametrize("mode", ["eigen", "ynnpack"])
def test_the_choice_reaches_the_compiled_program(mode):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", _COMPILED], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**env, "CNNLAB_CPU_CONVOLUTIONS": mode, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    chosen, convs, convs_in_ynnpack = out.stdout.split()
    if not backend._jaxlib_has_ynnpack():
        pytest.skip("this jaxlib has no YNNPACK fusions")
    assert chosen == mode and int(convs) == 2  # the forward and the kernel gradient
    assert int(convs_in_ynnpack) == (0 if mode == "eigen" else 2)


def test_malloc_modes_and_what_is_left_alone(monkeypatch):
    calls = []

    class FakeLibc:
        @staticmethod
        def mallopt(param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(backend.ctypes, "CDLL", lambda name: FakeLibc)
    monkeypatch.setattr(backend.sys, "platform", "linux")
    monkeypatch.setattr(backend.platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert backend.configure_malloc({}) == "retain"
    assert dict(calls) == {backend._M_ARENA_MAX: 1, backend._M_MMAP_MAX: 0, backend._M_TRIM_THRESHOLD: 2**31 - 1}
    calls.clear()
    assert backend.configure_malloc({backend.MALLOC_ENV: "system"}) == "system"
    assert backend.configure_malloc({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}) == "user"
    monkeypatch.setattr(backend.platform, "libc_ver", lambda: ("", ""))
    assert backend.configure_malloc({}) == "not glibc"
    assert calls == []  # none of these touched malloc
    with pytest.raises(ValueError, match="CNNLAB_MALLOC='keep'"):
        backend.configure_malloc({backend.MALLOC_ENV: "keep"})


_PAGE_FAULTS = """
import ctypes, resource
import cnnlab.runtime
mode = cnnlab.runtime.configure()["malloc"]  # sets up malloc as CNNLAB_MALLOC says

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.restype, libc.memset.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 96 << 20  # a block like XLA's per-call temporaries: above glibc's largest mmap threshold


def cycle():  # allocate, touch every page, free
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    libc.free(block)


cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(mode, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, size)
"""


def test_retained_memory_spares_repeated_large_blocks_their_page_faults():
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc only")
    faults = {}
    for mode in ("system", "retain"):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        env[backend.MALLOC_ENV] = mode
        out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], cwd=ROOT, capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        got_mode, count, size = out.stdout.split()
        assert got_mode == mode
        faults[mode] = int(count)
    # Handed back on free, each of the 5 blocks is fresh pages again; retained, it is reused.
    assert faults["system"] > 5 * int(size) // 4096 // 2, faults
    assert faults["retain"] < int(size) // 4096 // 10, faults


_IMPORT_ONLY = """
import ctypes, json, os, resource, subprocess, sys
before = dict(os.environ)
import cnnlab, cnnlab.functional, cnnlab.nn, cnnlab.models, cnnlab.train, cnnlab.sweep, cnnlab.interop
import cnnlab.runtime
import numpy as np


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


a = np.ones(400 * 2**20 // 8)  # 400 MB
peak = rss_mb()
del a
child = subprocess.run([sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
                       capture_output=True, text=True).stdout
print(json.dumps({"same_env": dict(os.environ) == before, "child_env_same": json.loads(child) == before,
                  "peak": peak, "after_free": rss_mb(), "runtime": cnnlab.runtime.state()}))
"""


def test_importing_cnnlab_changes_no_process_state():
    # No environment variable (a child process sees the parent's environment as it was) and no
    # mallopt: a freed 400 MB array goes back to the system, as without cnnlab.
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", _IMPORT_ONLY], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["same_env"] and got["child_env_same"]
    assert got["peak"] - got["after_free"] > 350, got
    assert got["runtime"] == {"cpu_convolutions": "not configured", "malloc": "not configured"}


def test_configure_is_the_opt_in_and_runs_once(monkeypatch):
    from cnnlab import runtime

    monkeypatch.setattr(runtime, "_state", {})
    monkeypatch.setattr(backend, "_jaxlib_has_ynnpack", lambda: True)
    monkeypatch.setattr(backend, "_cpu_backend_started", lambda: False)
    monkeypatch.setattr(backend, "configure_malloc", lambda environ=None: "system")
    env = {}
    assert runtime.configure(env) == {"cpu_convolutions": "eigen", "malloc": "system"}
    assert env["XLA_FLAGS"] == FLAG
    env2 = {}
    assert runtime.configure(env2)["cpu_convolutions"] == "eigen" and env2 == {}  # once per process
    assert runtime.state() == {"cpu_convolutions": "eigen", "malloc": "system"}
