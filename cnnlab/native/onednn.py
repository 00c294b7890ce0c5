"""oneDNN's 2-D convolutions on XLA:CPU, through ``jax.ffi`` (one formulation of
:mod:`cnnlab.native.conv_impl`).

XLA:CPU runs convolutions on Eigen kernels, about half as fast on x86 as oneDNN's (what
PyTorch runs). ``onednn/conv.cc`` binds oneDNN's forward, backward-data (input gradient) and
backward-weights (kernel gradient) convolutions as XLA FFI handlers for float32 or bfloat16
NHWC inputs and HWIO kernels (bfloat16 accumulates in float32 inside oneDNN, on AMX or AVX-512
BF16 where the CPU has them). On first use it is compiled with the C++ compiler (``$CXX``,
else ``g++``) against oneDNN and JAX's FFI headers into ``<cache root>/onednn/<hash of the
source, jaxlib version and command>/``, then loaded and registered; a failure leaves cnnlab on
its pure-JAX formulations, and :func:`unavailable_reason` says why.

Which oneDNN: Intel's PyPI build ``onednn-cpu-gomp`` with its headers ``onednn-devel-cpu-gomp``
(oneDNN 3.2, GNU OpenMP; cnnlab's dependencies on Linux x86-64) where both are installed, else
the system's (Debian/Ubuntu: ``apt-get install libdnnl-dev``, oneDNN 2.x). ``CNNLAB_ONEDNN=0``
turns oneDNN off; ``CNNLAB_ONEDNN=system`` skips the PyPI build.

oneDNN runs its own OpenMP threads (libgomp), which by default spin for a while after each
convolution, taking a core from XLA's threads; unless ``OMP_WAIT_POLICY`` is set, the library
is loaded with it set to ``PASSIVE`` (libgomp reads it as it loads; the environment is then
restored). The setting is read once per process, like ``CNNLAB_ONEDNN``. A forward or
input-gradient call splits its batch into chunks that XLA's intra-op threads and the calling
thread run one thread each (bitwise the team's result), so an op XLA runs beside it does not
stall oneDNN's team; ``CNNLAB_ONEDNN_SPLIT=0`` turns that off, :func:`split_calls` counts it.

:func:`forward`, :func:`input_grad` and :func:`kernel_grad` are jittable, reverse-mode
differentiable (each one's gradient is made of the other two) and vmappable (one call per
batch element: ``vmap_method="sequential"``); they have no forward-mode derivative.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cnnlab._files import cache_root, write_text_atomic
from cnnlab._notices import said, say_once

Array = jax.Array
#: ``cnnlab.native.conv_impl.ConvSpec`` (not imported: conv_impl imports this module).
ConvSpec = Any

ENV = "CNNLAB_ONEDNN"
SOURCE = Path(__file__).with_name("onednn") / "conv.cc"
_TARGETS = {
    "forward": "cnnlab_onednn_conv_forward",
    "input_grad": "cnnlab_onednn_conv_input_grad",
    "kernel_grad": "cnnlab_onednn_conv_kernel_grad",
}
_lock = threading.Lock()
_state: dict[str, Any] = {}  # once loaded: "reason" (None when available), "version", ...


#: Intel's PyPI distributions of oneDNN (library, headers) that cnnlab builds against first.
WHEEL_LIBRARY, WHEEL_HEADERS = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"


def _setting() -> str:
    """``CNNLAB_ONEDNN`` read once for all its uses: ``"off"``, ``"system"`` or ``"on"``."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    return "system" if value == "system" else "on"


def wheel_dirs() -> tuple[str, str] | None:
    """``(include dir, lib dir)`` of the PyPI oneDNN where both distributions are installed and
    ``CNNLAB_ONEDNN`` is not ``system``; else None (the system's oneDNN is used)."""
    if _setting() == "system":
        return None
    from importlib import metadata

    def find(dist: str, suffix: str) -> Path | None:
        try:
            files = metadata.files(dist) or []
        except metadata.PackageNotFoundError:
            return None
        for f in files:
            if f"/{f}".endswith(f"/{suffix}"):
                path = Path(f.locate()).resolve()
                return path if path.exists() else None
        return None

    header = find(WHEEL_HEADERS, "oneapi/dnnl/dnnl.hpp")
    library = find(WHEEL_LIBRARY, "libdnnl.so")
    if header is None or library is None:
        return None
    return str(header.parents[2]), str(library.parent)


def _build_command(source: Path, output: str) -> list[str]:
    cxx = shlex.split(os.environ.get("CXX", "g++"))
    dirs = wheel_dirs()
    wheel = [] if dirs is None else [f"-I{dirs[0]}", f"-L{dirs[1]}", f"-Wl,-rpath,{dirs[1]}"]
    return [*cxx, "-O2", "-shared", "-fPIC", "-std=c++17", *wheel, f"-I{jax.ffi.include_dir()}",
            str(source), "-o", output, "-ldnnl"]


@functools.cache
def _compiler_id(cxx: str) -> str:
    """The compiler's own version line (part of the build's cache key), or "" if it will not say."""
    try:
        out = subprocess.run([*shlex.split(cxx), "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else ""
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def _library_path(root: Path | None = None) -> Path:
    """Where this source, built for this jaxlib with this command and compiler, lives under
    ``root`` (default: the cache root)."""
    import jaxlib

    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(f"jaxlib {jaxlib.__version__}\0".encode())
    digest.update("\0".join(_build_command(SOURCE, "")).encode())
    digest.update(_compiler_id(os.environ.get("CXX", "g++")).encode())
    return (root or cache_root()) / "onednn" / digest.hexdigest()[:16] / "libcnnlab_onednn.so"


#: Beside the library: ``{"size", "sha256"}`` of the good build, or ``{"failed": reason}``.
RECORD = "build.json"


def _record_path(path: Path) -> Path:
    return path.with_name(RECORD)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(_record_path(path).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _fingerprint(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _intact(path: Path) -> bool:
    """Whether the library is the one its build recorded (a file cut short but with its ELF
    header intact would crash the process that loads it with SIGBUS)."""
    record = _read_record(path)
    try:
        return bool(record.get("sha256")) and _fingerprint(path) == {
            "size": record.get("size"), "sha256": record.get("sha256")}
    except OSError:
        return False


def _build(path: Path) -> None:
    """Compiles into a temporary file beside ``path``, flushes it to disk and renames it there,
    then records its size and hash; so a killed build never leaves a partial library behind,
    and a damaged one is found before it is loaded. A failed build is recorded with its reason
    (remembered until the source, the command or the compiler changes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run(_build_command(SOURCE, tmp), capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            reason = _explain(proc.stderr, proc.returncode)
            write_text_atomic(_record_path(path), json.dumps({"failed": reason}))
            raise RuntimeError(reason)
        os.chmod(tmp, 0o755)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        fingerprint = _fingerprint(Path(tmp))
        os.replace(tmp, path)
        write_text_atomic(_record_path(path), json.dumps(fingerprint))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fallback_root() -> Path:
    """A cache root of this user's under the temporary directory, for a read-only cache."""
    return Path(tempfile.gettempdir()) / f"cnnlab-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def announced() -> list[str]:
    """Every fallback this process announced (what ``environment.json`` records)."""
    return said("fallback")


def announce(message: str) -> None:
    """Prints ``cnnlab: <message>`` to stderr once per process (fallbacks say why)."""
    say_once(message, topic="fallback")


def _explain(stderr: str, returncode: int) -> str:
    """The compiler's errors, in one line; the usual missing pieces by name."""
    if "dnnl.hpp" in stderr and "No such file" in stderr:
        return "oneDNN's headers are missing (oneapi/dnnl/dnnl.hpp; Debian/Ubuntu: libdnnl-dev)"
    if "cannot find -ldnnl" in stderr:
        return "oneDNN's library is missing (libdnnl.so; Debian/Ubuntu: libdnnl-dev)"
    if "ffi.h" in stderr and "No such file" in stderr:
        return f"JAX's FFI headers are missing ({jax.ffi.include_dir()})"
    lines = [line for line in stderr.splitlines() if "error" in line.lower()] or stderr.splitlines()
    return (f"building the oneDNN convolutions failed (exit {returncode})"
            + "".join(f" | {line}" for line in lines[-5:]))


def _load() -> dict[str, Any]:
    if _setting() == "off":
        return {"reason": f"turned off by {ENV}={os.environ[ENV]}"}
    cxx = shlex.split(os.environ.get("CXX", "g++")) or ["g++"]
    notes: list[str] = []
    try:
        path = _ready_library(cxx, notes)
        policy = _wait_policy()
        lib = _load_library(path, policy)
        capsules = {t: jax.ffi.pycapsule(getattr(lib, t)) for t in _TARGETS.values()}
        lib.cnnlab_onednn_version.restype = ctypes.c_char_p
        version = lib.cnnlab_onednn_version().decode()
        lib.cnnlab_onednn_supports_type.argtypes = [ctypes.c_int]
        bfloat16 = lib.cnnlab_onednn_supports_type(1) == 1
        lib.cnnlab_onednn_split_calls.restype = ctypes.c_int64
        split_calls = lib.cnnlab_onednn_split_calls
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        reason = f"{type(e).__name__}: {e}" if isinstance(e, AttributeError) else str(e)
        announce(f"oneDNN's convolutions are unavailable ({reason}); convolutions run on XLA's "
                 "formulations")
        return {"reason": reason, "notes": notes}
    for target, capsule in capsules.items():
        jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    return {"reason": None, "version": version, "path": str(path), "omp_wait_policy": policy,
            "bfloat16": bfloat16, "split_calls": split_calls, "notes": notes}


def _ready_library(cxx: list[str], notes: list[str]) -> Path:
    """The path of an intact library, built now if needed: a damaged one (size or hash not
    the recorded ones) is rebuilt, a read-only or uncreatable cache falls back to a temporary
    one, and a build that failed before raises its remembered reason. Each fallback is said."""
    path = _library_path()
    for attempt in range(2):
        failed = _read_record(path).get("failed")
        if failed:
            raise RuntimeError(f"{failed} (remembered from an earlier build; it is retried when the "
                               f"source, command or compiler changes, or after deleting {path.parent})")
        if path.exists() and _intact(path):
            return path
        if path.exists():
            why = ("is not the build it recorded (damaged)" if _read_record(path)
                   else "has no build record (damaged, or built by an older cnnlab)")
            note = f"the oneDNN library {path} {why}: rebuilding it"
            notes.append(note)
            announce(note)
        if shutil.which(cxx[0]) is None:
            raise RuntimeError(f"no C++ compiler ({cxx[0]}) to build the oneDNN convolutions")
        try:
            if path.exists():
                path.unlink()
            _build(path)
            return path
        except OSError as e:
            if attempt:
                raise
            temp = _library_path(fallback_root())
            note = (f"the cache {path.parent} cannot be written ({e.strerror or e}): building "
                    f"the oneDNN library in {temp.parent} instead")
            notes.append(note)
            announce(note)
            path = temp
    raise AssertionError("unreachable")


def _wait_policy() -> str:
    """OpenMP's wait policy for oneDNN's threads: the user's ``OMP_WAIT_POLICY``, else
    ``PASSIVE``; ``"preloaded"`` when libgomp is already loaded (it read the policy then)."""
    try:
        with open("/proc/self/maps") as f:
            if "libgomp" in f.read():
                return "preloaded"
    except OSError:
        pass
    return os.environ.get("OMP_WAIT_POLICY", "PASSIVE")


def _load_library(path: Path, policy: str) -> ctypes.CDLL:
    """Loads the library (and libgomp, which reads ``OMP_WAIT_POLICY`` as it loads) with the
    wait policy set; the environment is left as it was, for the processes this one starts."""
    own = "OMP_WAIT_POLICY" not in os.environ and policy != "preloaded"
    if own:
        os.environ["OMP_WAIT_POLICY"] = policy
    try:
        return ctypes.CDLL(str(path))
    finally:
        if own:
            del os.environ["OMP_WAIT_POLICY"]


def _loaded() -> dict[str, Any]:
    with _lock:
        if not _state:
            _state.update(_load())
        return _state


def available() -> bool:
    """Whether oneDNN's convolutions can run here (built, or built now, and loaded)."""
    return _loaded()["reason"] is None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (a missing compiler, header or library, the build's
    errors, or ``CNNLAB_ONEDNN=0``); None when it is True."""
    return _loaded()["reason"]


def split_calls() -> int:
    """How many oneDNN calls of this process ran split in batch chunks on XLA's intra-op
    threads (the forward and the input gradient, where the batch divides; ``conv.cc`` says
    why; ``CNNLAB_ONEDNN_SPLIT=0`` turns it off); 0 when oneDNN is unavailable."""
    count = _loaded().get("split_calls")
    return 0 if count is None else int(count())


def version() -> str | None:
    """oneDNN's version (``"3.2.0"``, ``"2.6.3"``), or None when unavailable."""
    return _loaded().get("version")


def supports_bfloat16() -> bool:
    """Whether oneDNN creates bfloat16 convolutions on this CPU (under ``ONEDNN_MAX_CPU_ISA``):
    oneDNN 3.2 needs AVX-512 (native on AVX512_BF16 and AMX, emulated on plain AVX-512) or
    AVX2 VNNI-2, so an AVX2-only CPU has none. Where it does not, cnnlab's bfloat16
    convolutions on oneDNN compute in float32 and round the result to bfloat16
    (:mod:`cnnlab.native.conv_impl`). False when oneDNN is unavailable."""
    return bool(_loaded().get("bfloat16"))


#: ``ONEDNN_MAX_CPU_ISA`` values (oneDNN 3.2; ``DNNL_MAX_CPU_ISA`` is the old name) that keep
#: the CPU's own bfloat16 instructions.
_BF16_ISAS = ("ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
              "AVX512_CORE_AMX_FP16")
#: The CPU flags (``/proc/cpuinfo``) of native bfloat16 arithmetic.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def isa_limits(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The CPU ISA limits set in the environment: ``ONEDNN_MAX_CPU_ISA`` (or its old name
    ``DNNL_MAX_CPU_ISA``) for oneDNN, ``--xla_cpu_max_isa`` in ``XLA_FLAGS`` for XLA (both
    emulate an older CPU on a newer one); ``{}`` when neither is set."""
    env = os.environ if environ is None else environ
    limits = {}
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if env.get(name, "").strip():
            limits["onednn"] = env[name].strip().upper()
            break
    for flag in env.get("XLA_FLAGS", "").split():
        if flag.startswith("--xla_cpu_max_isa="):
            limits["xla"] = flag.split("=", 1)[1].strip().upper()
    return limits


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bfloat16(flags: set[str] | None = None, environ: dict[str, str] | None = None, *,
                    probe: bool = True) -> tuple[bool, str]:
    """``(native, why)``: whether this CPU computes bfloat16 in hardware for cnnlab (AMX or
    AVX-512 BF16, not hidden by an ISA limit, and oneDNN's bfloat16 convolutions available),
    with the reason in words. ``flags``/``environ``: another CPU's flags and environment (default:
    this process's); ``probe``: also ask this process's oneDNN library whether it creates
    bfloat16 convolutions (False for a hypothetical CPU)."""
    flags = cpu_flags() if flags is None else flags
    have = [f for f in BF16_CPU_FLAGS if f in flags]
    if not have:
        return False, "the CPU has no native bfloat16 (neither amx_bf16 nor avx512_bf16)"
    limits = isa_limits(environ)
    if limits.get("onednn", "ALL") not in _BF16_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={limits['onednn']} hides the CPU's bfloat16 ({have[0]})"
    if "xla" in limits and not any(t in limits["xla"] for t in ("BF16", "AMX")):
        return False, f"--xla_cpu_max_isa={limits['xla']} hides the CPU's bfloat16 ({have[0]})"
    if probe and not supports_bfloat16():
        reason = unavailable_reason() or "oneDNN refuses bfloat16 convolutions here"
        return False, f"the CPU has {have[0]}, but oneDNN's bfloat16 convolutions are not usable ({reason})"
    return True, f"the CPU has {' and '.join(have)}"


# --------------------------------------------------------------------------- the ops


def _call(part: str, shape: tuple[int, ...], a: Array, b: Array, spec: ConvSpec) -> Array:
    if not available():
        raise RuntimeError(f"oneDNN convolutions are unavailable: {unavailable_reason()}")
    (plo, phi), (qlo, qhi) = spec.padding
    return jax.ffi.ffi_call(_TARGETS[part], jax.ShapeDtypeStruct(shape, a.dtype),
                            vmap_method="sequential")(
        a, b, strides=np.asarray(spec.strides, np.int64),
        padding_lo=np.asarray((plo, qlo), np.int64), padding_hi=np.asarray((phi, qhi), np.int64),
        dilation=np.asarray(spec.dilation, np.int64))


def _in_shape(n: int, spec: ConvSpec) -> tuple[int, ...]:
    return (n, *spec.in_hw, spec.in_channels)


def _kernel_shape(spec: ConvSpec) -> tuple[int, ...]:
    return (*spec.kernel_size, spec.in_channels, spec.out_channels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def forward(x: Array, kernel: Array, spec: ConvSpec) -> Array:
    """``x [N, H, W, C_in]``, ``kernel [KH, KW, C_in, C_out]`` -> ``[N, Ho, Wo, C_out]``, the
    convolution of ``spec`` (float32 or bfloat16, both of one type; non-negative padding)."""
    return _call("forward", (x.shape[0], *spec.out_hw, spec.out_channels), x, kernel, spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def input_grad(g: Array, kernel: Array, spec: ConvSpec) -> Array:
    """``g [N, Ho, Wo, C_out]`` (the output's cotangent) -> ``[N, H, W, C_in]``: the input's."""
    return _call("input_grad", _in_shape(g.shape[0], spec), g, kernel, spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def kernel_grad(x: Array, g: Array, spec: ConvSpec) -> Array:
    """``x [N, H, W, C_in]``, ``g [N, Ho, Wo, C_out]`` -> ``[KH, KW, C_in, C_out]``: the
    kernel's cotangent."""
    return _call("kernel_grad", _kernel_shape(spec), x, g, spec)


# The three are bilinear and each one's transposes are the other two, so every order of
# reverse-mode derivative stays in oneDNN.
def _forward_bwd(spec, res, ct):
    x, kernel = res
    return input_grad(ct, kernel, spec), kernel_grad(x, ct, spec)


def _input_grad_bwd(spec, res, ct):
    g, kernel = res
    return forward(ct, kernel, spec), kernel_grad(ct, g, spec)


def _kernel_grad_bwd(spec, res, ct):
    x, g = res
    return input_grad(g, ct, spec), forward(x, ct, spec)


forward.defvjp(lambda x, k, spec: (forward(x, k, spec), (x, k)), _forward_bwd)
input_grad.defvjp(lambda g, k, spec: (input_grad(g, k, spec), (g, k)), _input_grad_bwd)
kernel_grad.defvjp(lambda x, g, spec: (kernel_grad(x, g, spec), (x, g)), _kernel_grad_bwd)
