"""Formulations of a 2-D convolution and its gradients, chosen per shape.

XLA:CPU differentiates a strided convolution's input into a convolution over the output
gradient dilated with zeros (``lhs_dilation``), which its Eigen kernels run up to 6x slower
than the forward. ``"phase"`` forms the same sums sub-pixel: each of the ``sh * sw`` phases of
the input gradient is a stride-1 convolution of the output gradient with the kernel taps that
land on that phase (no multiplications by inserted zeros), and the phases are interleaved.
``"onednn"`` runs each part (forward, input gradient, kernel gradient) on oneDNN's convolutions,
what PyTorch runs on x86, through ``jax.ffi`` (:mod:`cnnlab.native.onednn`: built on first
use where a C++ compiler and oneDNN are installed, else absent and never chosen).

:func:`conv2d` runs the chosen forward and gradients behind a ``jax.custom_vjp``; ``"xla"`` is
exactly ``lax.conv_general_dilated`` and its autodiff. Matrix-product formulations
(im2col/col2im, per-tap products) were measured too and lost in the training step; the
numbers are in experiments/bench/README.md.

``CNNLAB_CONV_FORMULATION`` chooses: ``auto`` (the default) decides per shape and part by
measurement, like cuDNN's benchmark mode (:func:`choose`): on the CPU backend, the first time a
shape is traced each applicable formulation of each part is compiled and timed (interleaved,
the best of 7, in a thread of its own; a forward-only use times the forward alone), the fastest
is kept if it beats XLA's by 10%, and the choice is cached per machine (oneDNN's presence,
version, bfloat16 support and ISA limit included) in ``<cache root>/conv_formulations.json``,
one measurement per shape at a time across threads and processes (a lock file); a formulation
that fails to run on this CPU is skipped; a choice timed while other processes kept the CPUs
busy (:func:`others_busy`) is marked so and timed again by the first process that finds the
machine quiet, so a measurement taken under load is not kept for ever; :func:`pin_choices` makes a resumed run reuse the
choices it recorded (:func:`made_choices`); elsewhere (other backends,
multi-process runs, whose processes must compile the same program), and where nothing wins,
XLA's. A bfloat16 convolution on oneDNN where oneDNN has no bfloat16 primitives (an
AVX2-only CPU) computes in float32 and rounds to bfloat16. ``xla`` (or any all-``xla`` setting) uses lax's op alone (no custom VJP); ``onednn``
forces oneDNN for all three parts; ``<input grad>/<kernel grad>`` (``phase/xla``, the forward
XLA's) or ``<forward>/<input grad>/<kernel grad>`` (``onednn/phase/onednn``) forces each part;
forcing oneDNN where it is unavailable is an error that says why. Covered: 2-D float32 or
bfloat16 convolutions (input and kernel of one type) with ``groups == 1`` and default
precision, in either data format; anything else is XLA's (so is a form that does not apply to a
shape: ``phase`` to unstrided or dilated ones,
``onednn`` to negative padding or off the CPU backend). A custom VJP has no forward-mode
derivative: for ``jax.jvp``, ``jax.jacfwd`` or ``jax.hessian`` through cnnlab's convolutions,
set ``CNNLAB_CONV_FORMULATION=xla`` (reverse-over-reverse works in every form).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import json
import os
import platform
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnlab._files import cache_root, write_text_atomic

try:
    import fcntl
except ImportError:  # not POSIX: each process measures under its own lock
    fcntl = None
from cnnlab.native import onednn

Array = jax.Array
_DN = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """A 2-D NHWC convolution's static geometry (explicit padding, groups == 1)."""

    kernel_size: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dilation: tuple[int, int]
    in_hw: tuple[int, int]
    in_channels: int
    out_channels: int
    batch: int = 1
    dtype: str = "float32"  # of the input, kernel and output: "float32" or "bfloat16"

    @classmethod
    def make(cls, x_shape: Sequence[int], kernel_shape: Sequence[int], *,
             strides: Sequence[int], padding: str | Sequence[tuple[int, int]],
             dilation: Sequence[int], dtype: Any = "float32") -> ConvSpec:
        kh, kw, cin, cout = kernel_shape
        hw = (int(x_shape[1]), int(x_shape[2]))
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(
                hw, ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1), strides, padding)
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        return cls((int(kh), int(kw)), tuple(map(int, strides)), pads, tuple(map(int, dilation)),
                   hw, int(cin), int(cout), int(x_shape[0]), jnp.dtype(dtype).name)

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple(
            (n + lo + hi - (k - 1) * d - 1) // s + 1
            for n, (lo, hi), k, d, s in zip(self.in_hw, self.padding, self.kernel_size,
                                            self.dilation, self.strides)
        )


def xla_forward(x: Array, kernel: Array, spec: ConvSpec, precision=None) -> Array:
    """``[N, H, W, C_in] -> [N, Ho, Wo, C_out]``: lax's convolution."""
    return lax.conv_general_dilated(x, kernel, spec.strides, spec.padding,
                                    rhs_dilation=spec.dilation, dimension_numbers=_DN,
                                    precision=precision)


def _onednn_applies(spec: ConvSpec) -> bool:
    """oneDNN's forms run on XLA:CPU, with non-negative padding (else they are XLA's)."""
    return (all(p >= 0 for pads in spec.padding for p in pads)
            and jax.default_backend() == "cpu" and onednn.available())


def _on_onednn(part: Any, a: Array, b: Array, spec: ConvSpec) -> Array:
    """``part(a, b, spec)`` of :mod:`cnnlab.native.onednn`; a bfloat16 one on a CPU where
    oneDNN has no bfloat16 convolutions (AVX2 only) computes in float32 and rounds the result
    to bfloat16, as XLA's bfloat16 convolutions do on such a CPU."""
    if spec.dtype == "bfloat16" and not onednn.supports_bfloat16():
        f32 = dataclasses.replace(spec, dtype="float32")
        out = part(a.astype(jnp.float32), b.astype(jnp.float32), f32)
        return out.astype(jnp.bfloat16)
    return part(a, b, spec)


def _onednn_forward(x: Array, kernel: Array, spec: ConvSpec) -> Array:
    """oneDNN's forward convolution (:func:`cnnlab.native.onednn.forward`)."""
    if not _onednn_applies(spec):
        return xla_forward(x, kernel, spec)
    return _on_onednn(onednn.forward, x, kernel, spec)


FORWARDS = {"xla": xla_forward, "onednn": _onednn_forward}


# --------------------------------------------------------------------------- input gradient


def _xla_input_grad(g: Array, kernel: Array, spec: ConvSpec) -> Array:
    """What lax's autodiff gives: the forward's transpose in the input."""
    x = jax.ShapeDtypeStruct((g.shape[0], *spec.in_hw, spec.in_channels), g.dtype)
    return jax.linear_transpose(lambda x: xla_forward(x, kernel, spec), x)(g)[0]


def _phase_input_grad(g: Array, kernel: Array, spec: ConvSpec) -> Array:
    """Sub-pixel form of a strided convolution's input gradient: each of the ``sh * sw`` phases
    of the (padded) input is a stride-1 convolution of ``dy`` with the kernel taps that land on
    it, so no zero-stuffed gradient is convolved; the phases are then interleaved. Unstrided or
    dilated convolutions use XLA's form."""
    if not _phase_applies(spec):
        return _xla_input_grad(g, kernel, spec)
    n, (ho, wo), (sh, sw) = g.shape[0], spec.out_hw, spec.strides
    (plo, phi), (qlo, qhi) = spec.padding
    hq, wq = -(-(spec.in_hw[0] + plo + phi) // sh), -(-(spec.in_hw[1] + qlo + qhi) // sw)
    cin = spec.in_channels
    rows = []
    for rh in range(sh):
        row = []
        for rw in range(sw):
            sub = kernel[rh::sh, rw::sw]  # the taps t = r + m * s, m = 0..M-1
            mh, mw = sub.shape[:2]
            if mh == 0 or mw == 0:
                row.append(jnp.zeros((n, hq, wq, cin), g.dtype))
                continue
            # dx_phase[q] = sum_m dy[q - m] w[r + m s]: a correlation with the flipped taps.
            w = jnp.flip(sub, (0, 1)).swapaxes(2, 3)
            row.append(lax.conv_general_dilated(
                g, w, (1, 1), ((mh - 1, hq - ho), (mw - 1, wq - wo)), dimension_numbers=_DN))
        rows.append(jnp.stack(row))
    phases = jnp.stack(rows)  # [sh, sw, N, Hq, Wq, C]
    full = phases.transpose(2, 3, 0, 4, 1, 5).reshape(n, hq * sh, wq * sw, cin)
    return full[:, plo:plo + spec.in_hw[0], qlo:qlo + spec.in_hw[1]]


def _phase_applies(spec: ConvSpec) -> bool:
    return spec.strides != (1, 1) and spec.dilation == (1, 1)


def _onednn_input_grad(g: Array, kernel: Array, spec: ConvSpec) -> Array:
    """oneDNN's backward-data convolution (:func:`cnnlab.native.onednn.input_grad`)."""
    if not _onednn_applies(spec):
        return _xla_input_grad(g, kernel, spec)
    return _on_onednn(onednn.input_grad, g, kernel, spec)


# --------------------------------------------------------------------------- kernel gradient


def _xla_kernel_grad(x: Array, g: Array, spec: ConvSpec) -> Array:
    """What lax's autodiff gives: the forward's transpose in the kernel."""
    k = jax.ShapeDtypeStruct((*spec.kernel_size, spec.in_channels, spec.out_channels), x.dtype)
    return jax.linear_transpose(lambda k: xla_forward(x, k, spec), k)(g)[0]


def _onednn_kernel_grad(x: Array, g: Array, spec: ConvSpec) -> Array:
    """oneDNN's backward-weights convolution (:func:`cnnlab.native.onednn.kernel_grad`)."""
    if not _onednn_applies(spec):
        return _xla_kernel_grad(x, g, spec)
    return _on_onednn(onednn.kernel_grad, x, g, spec)


INPUT_GRADS = {"xla": _xla_input_grad, "phase": _phase_input_grad, "onednn": _onednn_input_grad}
KERNEL_GRADS = {"xla": _xla_kernel_grad, "onednn": _onednn_kernel_grad}
#: Each part's formulations, by name: the forward, the input gradient, the kernel gradient.
TABLES = {"fwd": FORWARDS, "dx": INPUT_GRADS, "dw": KERNEL_GRADS}
PARTS = tuple(TABLES)


def applicable(spec: ConvSpec) -> dict[str, list[str]]:
    """Per part, the names of the formulations that apply to ``spec`` (XLA's first); the
    others would run XLA's form under another name."""
    ours = ["onednn"] if _onednn_applies(spec) else []
    phase = ["phase"] if _phase_applies(spec) else []
    return {"fwd": ["xla", *ours], "dx": ["xla", *phase, *ours], "dw": ["xla", *ours]}


# --------------------------------------------------------------------------- the op


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: Array, kernel: Array, spec: ConvSpec, formulation: str) -> Array:
    """The convolution of ``spec`` by ``formulation``: ``"<forward>/<input grad>/<kernel
    grad>"`` (names in :data:`FORWARDS`, :data:`INPUT_GRADS`, :data:`KERNEL_GRADS`) or
    ``"auto"`` (:func:`choose`, made when the convolution is traced: the forward alone when it
    is not differentiated)."""
    fwd = choose(spec, ("fwd",))[0] if formulation == "auto" else formulation.split("/")[0]
    return FORWARDS[fwd](x, kernel, spec)


def _fwd(x, kernel, spec, formulation):
    fwd = choose(spec)[0] if formulation == "auto" else formulation.split("/")[0]
    return FORWARDS[fwd](x, kernel, spec), (x, kernel)


def _bwd(spec, formulation, res, g):
    x, kernel = res
    _, dx, dw = choose(spec) if formulation == "auto" else formulation.split("/")
    return INPUT_GRADS[dx](g, kernel, spec), KERNEL_GRADS[dw](x, g, spec)


conv2d.defvjp(_fwd, _bwd)


# --------------------------------------------------------------------------- choice

FORMULATION_ENV = "CNNLAB_CONV_FORMULATION"
#: The element types given the formulations (input and kernel alike); others are XLA's.
COVERED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
CACHE_FILE = "conv_formulations.json"
#: An alternative is kept only if its best time is below this fraction of XLA's.
MARGIN = 0.9
#: The share of the machine's CPU time that other processes may take while a shape is timed
#: (:func:`others_busy`) for its choice to be kept for good; above it the choice is provisional.
BUSY = 0.2
_STARTED = time.time()  # entries timed after this process started are its siblings': kept


def _cpu_ticks() -> tuple[float, float] | None:
    """``(busy, total)`` CPU seconds of the whole machine since boot (Linux ``/proc/stat``), or
    None where they cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    hz = os.sysconf("SC_CLK_TCK")  # /proc/stat's unit; both exist on Linux alone
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / hz, sum(fields) / hz


@contextlib.contextmanager
def others_busy() -> Iterator[list[float]]:
    """Measures, over the ``with`` block, the share of the machine's CPU time that processes
    other than this one used (0 to 1); yields a list that holds it at the block's end (empty
    where the machine's counters cannot be read)."""
    share: list[float] = []
    before, own = _cpu_ticks(), time.process_time()
    try:
        yield share
    finally:
        after = _cpu_ticks()
        if before is not None and after is not None and after[1] > before[1]:
            others = (after[0] - before[0]) - (time.process_time() - own)
            share.append(round(min(max(others / (after[1] - before[1]), 0.0), 1.0), 3))
_XLA = ("xla", "xla", "xla")
_memory: dict[str, dict[str, str]] = {}


def has_alternatives(spec: ConvSpec) -> bool:
    """Whether any formulation but XLA's applies to some part (``phase``: strided, undilated;
    ``onednn``: where available); ``auto`` leaves the other convolutions to lax's op alone,
    with no custom VJP and no measurement."""
    return any(len(names) > 1 for names in applicable(spec).values())


_scoped_mode: contextvars.ContextVar[str | None] = contextvars.ContextVar("conv_formulation", default=None)
_forced_mode: contextvars.ContextVar[str | None] = contextvars.ContextVar("forced_conv_formulation", default=None)


def formulation_setting() -> str:
    """The formulation setting in force: that of an enclosing ``formulation(..., override_env=
    True)``, else ``CNNLAB_CONV_FORMULATION`` where set (an override), else the one of the
    enclosing :func:`formulation` scope (a run's ``conv_formulation``), else ``auto``."""
    mode = (_forced_mode.get() or os.environ.get(FORMULATION_ENV, "").strip() or _scoped_mode.get()
            or "auto")
    return mode.strip().lower() or "auto"


@contextlib.contextmanager
def formulation(mode: str | None, *, override_env: bool = False) -> Iterator[None]:
    """Convolutions traced inside the block (this thread/context) use formulation setting
    ``mode`` (as ``CNNLAB_CONV_FORMULATION`` takes it; ``None``: leave it as it is), unless the
    environment variable overrides it; ``override_env``: whatever the environment says (e.g.
    ``formulation("xla", override_env=True)``: lax's op with no measurement and no custom call,
    what ``cnnlab summary`` traces to read shapes and XLA's FLOP count)."""
    if mode is None:
        yield
        return
    var = _forced_mode if override_env else _scoped_mode
    token = var.set(mode)
    try:
        yield
    finally:
        var.reset(token)


def check_setting(mode: str) -> str | None:
    """Why ``mode`` is not a valid formulation setting, or None (for config checks; whether
    oneDNN is available is checked where the setting is used)."""
    try:
        parse_setting(mode, check_available=False)
        return None
    except ValueError as e:
        return str(e)


def forced_formulations() -> tuple[str, str, str] | None:
    """The formulations the setting (:func:`formulation_setting`) forces, ``(forward, input
    grad, kernel grad)``, or None under ``auto``; a bad setting raises a ValueError naming it."""
    mode = formulation_setting()
    try:
        return parse_setting(mode)
    except ValueError as e:
        where = FORMULATION_ENV if os.environ.get(FORMULATION_ENV, "").strip() else "conv_formulation"
        raise ValueError(f"{where}={mode!r}: {e}") from None


def parse_setting(mode: str, *, check_available: bool = True) -> tuple[str, str, str] | None:
    """``(forward, input grad, kernel grad)`` for a formulation setting, None for ``auto``."""
    mode = mode.strip().lower() or "auto"
    if mode == "auto":
        return None
    if mode in ("xla", "onednn"):
        forms = (mode,) * 3
    else:
        forms = tuple(mode.split("/"))
        if len(forms) == 2:
            forms = ("xla", *forms)
        if len(forms) != 3 or any(f not in t for f, t in zip(forms, TABLES.values())):
            raise ValueError(
                "expected auto, xla, onednn, <input grad>/<kernel grad> "
                f"or <forward>/<input grad>/<kernel grad>, with the forward one of {', '.join(FORWARDS)}, "
                f"the input grad one of {', '.join(INPUT_GRADS)} and the kernel grad one of "
                f"{', '.join(KERNEL_GRADS)}")
    if check_available and "onednn" in forms and not onednn.available():
        raise ValueError("oneDNN's convolutions are unavailable: "
                         f"{onednn.unavailable_reason()}")
    return forms


def native_bfloat16() -> tuple[bool, str]:
    """``(native, why)``: whether bfloat16 convolutions run natively here (what
    ``mixed_precision="auto"`` decides on): off the CPU backend, yes; on the CPU,
    :func:`cnnlab.native.onednn.native_bfloat16`, unless ``CNNLAB_CONV_FORMULATION``
    forces formulations without oneDNN (XLA:CPU emulates bfloat16 convolutions)."""
    if jax.default_backend() != "cpu":
        return True, f"the {jax.default_backend()} backend computes bfloat16 natively"
    forced = forced_formulations()
    if forced is not None and "onednn" not in forced:
        return False, (f"conv formulation {formulation_setting()!r} leaves oneDNN's "
                       "bfloat16 convolutions unused")
    return onednn.native_bfloat16()


def _machine_key() -> str:
    import jaxlib

    limits = onednn.isa_limits()
    bf16 = "bf16" if onednn.supports_bfloat16() else "no-bf16"
    return "|".join([jax.default_backend(), platform.machine(), platform.processor() or "?",
                     f"jaxlib {jaxlib.__version__}", os.environ.get("XLA_FLAGS", ""),
                     f"onednn {onednn.version() or 'no'} {bf16} isa {limits.get('onednn', 'all')}"])


def _spec_key(spec: ConvSpec) -> str:
    return json.dumps(dataclasses.astuple(spec))


_unwritable: set[str] = set()  # cache roots found read-only or uncreatable in this process


def _cache_dir() -> Path:
    """The cache root, or (where it cannot be written) a temporary one of this user's."""
    root = cache_root()
    return onednn.fallback_root() if str(root) in _unwritable else root


def _cache_unwritable(error: OSError) -> None:
    root = cache_root()
    if str(root) not in _unwritable:
        _unwritable.add(str(root))
        onednn.announce(f"the cache {root} cannot be written ({error.strerror or error}): "
                        f"convolution formulations are cached in {onednn.fallback_root()} instead")


def _cache_path() -> str:
    return str(_cache_dir() / CACHE_FILE)


def _read_cache() -> dict[str, Any]:
    try:
        with open(_cache_path()) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def measure(spec: ConvSpec, *, parts: Sequence[str] = PARTS,
            rounds: int = 7) -> dict[str, dict[str, float]]:
    """The fastest of ``rounds`` interleaved timings (ms) of every formulation of each of
    ``parts`` (``"fwd"``, ``"dx"``, ``"dw"``) that applies to ``spec`` (in its dtype); a part with
    one formulation is not timed (empty). A formulation that fails to compile or run (oneDNN
    refusing a primitive on this CPU, say) is left out, and why is kept in :data:`failed`;
    XLA's must run. Runs in a thread of its own: called while a program
    is being traced, the timed calls would otherwise be traced into it instead of running."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_measure, spec, tuple(parts), rounds).result()


#: ``{(spec key, part, formulation): why}`` of the formulations that failed to run when
#: measured in this process (skipped: the next fastest is used).
failed: dict[tuple[str, str, str], str] = {}


def _measure(spec: ConvSpec, parts: tuple[str, ...], rounds: int) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)

    def normal(*shape: int) -> Array:
        return jnp.asarray(rng.standard_normal(shape, np.float32), spec.dtype)

    x = normal(spec.batch, *spec.in_hw, spec.in_channels)
    kernel = normal(*spec.kernel_size, spec.in_channels, spec.out_channels)
    g = normal(spec.batch, *spec.out_hw, spec.out_channels)
    args = {"fwd": (x, kernel), "dx": (g, kernel), "dw": (x, g)}
    names = applicable(spec)
    calls = {(part, name): (jax.jit(functools.partial(TABLES[part][name], spec=spec)), args[part])
             for part in parts
             if len(names[part]) > 1  # a part with one formulation has nothing to choose
             for name in names[part]}
    for key, (fn, a) in list(calls.items()):
        try:
            jax.block_until_ready(fn(*a))  # compile, and run once
        except Exception as e:  # noqa: BLE001  (a form this CPU cannot run: e.g. oneDNN's
            if key[1] == "xla":  # primitive refused for its ISA; XLA's must run)
                raise
            del calls[key]
            failed[(_spec_key(spec), *key)] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    best = {key: float("inf") for key in calls}
    for _ in range(rounds):
        for key, (fn, a) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*a))
            best[key] = min(best[key], time.perf_counter() - start)
    out: dict[str, dict[str, float]] = {part: {} for part in parts}
    for (part, name), seconds in best.items():
        out[part][name] = round(seconds * 1e3, 4)
    return out


def _fastest(times: dict[str, float]) -> str:
    if len(times) < 2:
        return "xla"
    best = min(times, key=times.get)
    return best if times[best] < MARGIN * times["xla"] else "xla"


def choose(spec: ConvSpec, parts: Sequence[str] = PARTS) -> tuple[str, ...]:
    """The formulations of ``parts`` (``"fwd"``, ``"dx"``, ``"dw"``: forward, input grad,
    kernel grad) for ``spec`` in ``auto`` mode: XLA's off the CPU backend and in multi-process
    runs; else cached per machine, else measured now (:func:`measure`, the parts not chosen
    yet) and cached."""
    if jax.default_backend() != "cpu" or jax.process_count() > 1:
        return ("xla",) * len(parts)  # processes of one program could measure differently: their programs must match
    key = f"{_machine_key()}|{_spec_key(spec)}"
    entry = _memory.get(key, {})
    if any(part not in entry for part in parts):
        with _measuring():  # one measurement per shape at a time, across threads and processes
            entry = {**_valid_entry(_read_cache().get(key)), **_memory.get(key, {})}
            # Timed under load (or before loads were recorded) by an earlier process, and not yet
            # used in this one: time again every part it holds, if the machine is quiet now.
            retimed = (bool(entry) and key not in _memory and entry.get("busy", 1.0) > BUSY
                       and entry.get("at", 0.0) < _STARTED and _quiet_now())
            wanted = [part for part in PARTS if part in entry or part in parts] if retimed else parts
            if retimed:
                entry = {}
            missing = [part for part in wanted if part not in entry]
            names = applicable(spec)
            timed = [part for part in missing if len(names[part]) > 1]
            # the load the entry's earlier parts were timed under (unrecorded: provisional)
            earlier = entry.get("busy", 1.0) if any(part in entry for part in PARTS) else 0.0
            with others_busy() as busy:
                times = measure(spec, parts=timed) if timed else {}
            entry = {**entry, **{part: _fastest(times.get(part, {})) for part in missing}}
            if timed:
                entry["ms"] = {**entry.get("ms", {}), **times}
                entry["busy"] = max([earlier, *busy])
                entry["at"] = round(time.time(), 3)
                cache = _read_cache()  # another process may have written meanwhile
                cache[key] = entry if retimed else {**_valid_entry(cache.get(key)), **entry}
                text = json.dumps(cache, indent=1, sort_keys=True)
                try:
                    write_text_atomic(_cache_path(), text)
                except OSError as e:  # a read-only cache: a temporary one
                    _cache_unwritable(e)
                    try:
                        write_text_atomic(_cache_path(), text)
                    except OSError:
                        pass  # nowhere to write: the next process measures again
            _memory[key] = entry
    return tuple(entry[part] for part in parts)


def _valid_entry(entry: Any) -> dict[str, Any]:
    """A cached entry's choices that name known formulations (a damaged or hand-edited cache
    is measured again instead of breaking every trace)."""
    if not isinstance(entry, dict):
        return {}
    valid = {part: entry[part] for part in PARTS
             if isinstance(entry.get(part), str) and entry[part] in TABLES[part]}
    if valid and isinstance(entry.get("ms"), dict):
        valid["ms"] = entry["ms"]
    for field in ("busy", "at"):  # the load it was timed under and when (time.time())
        if valid and isinstance(entry.get(field), (int, float)):
            valid[field] = float(entry[field])
    return valid


@functools.cache
def _quiet_now(seconds: float = 0.2) -> bool:
    """Whether other processes leave the machine's CPUs idle enough to time on, over a short
    sample (True where that cannot be read); sampled once per process, not once per shape."""
    with others_busy() as busy:
        time.sleep(seconds)
    return not busy or busy[0] <= BUSY


_thread_lock = threading.Lock()


@contextlib.contextmanager
def _measuring():
    """Holds this process's measurement lock and, where the cache directory allows,
    ``<cache root>/conv_formulations.lock`` (``flock``): a shape is measured once, and every
    thread and process on the machine then uses that measurement's choice."""
    with _thread_lock:
        try:
            try:
                os.makedirs(_cache_dir(), exist_ok=True)
            except OSError as e:
                _cache_unwritable(e)
                os.makedirs(_cache_dir(), exist_ok=True)
            fd = os.open(str(_cache_dir() / (CACHE_FILE + ".lock")), os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                os.close(fd)
                fd = None
        except OSError:
            fd = None  # a read-only cache: this process's lock alone
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the flock


def made_choices() -> dict[str, dict[str, str]]:
    """``{machine and shape key: {part: formulation}}`` of every choice this process made or
    read (what a run records, so that its resume compiles the same formulations)."""
    return {key: {p: e[p] for p in PARTS if p in e} for key, e in _memory.items()}


def pin_choices(choices: dict[str, Any]) -> None:
    """Makes this process use ``choices`` (from :func:`made_choices`, e.g. a run's record)
    for the shapes it has not chosen yet, where they were made on this machine and name
    formulations that exist: a resumed run then computes what the uninterrupted one did,
    whatever a later measurement would say."""
    machine = _machine_key() + "|"
    for key, entry in (choices or {}).items():
        if isinstance(key, str) and key.startswith(machine) and key not in _memory:
            valid = _valid_entry(entry)
            if valid:
                _memory[key] = valid


def convolve(x: Array, kernel: Array, *, strides: Sequence[int], padding: Any,
             dilation: Sequence[int], channels_last: bool, groups: int, precision: Any,
             dimension_numbers: Any) -> Array:
    """``lax.conv_general_dilated`` (what cnnlab's convolutions call), with the forward and
    gradient formulations of ``CNNLAB_CONV_FORMULATION`` where covered; ``xla``: exactly lax's
    op."""
    forced = forced_formulations()
    covered = (x.ndim == 4 and groups == 1 and precision is None and x.dtype in COVERED_DTYPES
               and kernel.dtype == x.dtype)
    if covered and forced != _XLA:
        nhwc_shape = x.shape if channels_last else (x.shape[0], *x.shape[2:], x.shape[1])
        spec = ConvSpec.make(nhwc_shape, kernel.shape, strides=strides, padding=padding,
                             dilation=dilation, dtype=x.dtype)
        if forced is not None or has_alternatives(spec):
            nhwc = x if channels_last else x.transpose(0, 2, 3, 1)
            y = conv2d(nhwc, kernel, spec, "auto" if forced is None else "/".join(forced))
            return y if channels_last else y.transpose(0, 3, 1, 2)
    return lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
                                    dimension_numbers=dimension_numbers,
                                    feature_group_count=groups, precision=precision)
