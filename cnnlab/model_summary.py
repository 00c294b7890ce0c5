"""A model's layers, parameter counts and FLOPs, like Keras' ``model.summary()``.

>>> import cnnlab
>>> from cnnlab import models
>>> s = cnnlab.summary(models.get_model("stridednet", num_classes=4), (96, 96, 3))  # prints the table
>>> s.total_params, s.trainable_params, s.non_trainable_params, s.flops
(2658820, 2656900, 1920, 104629600)

``cnnlab summary --config=<file.py>`` (or ``--workdir=<run dir>``) prints it for a config's or
a trained run's model. (The module is not called ``summary.py``: importing a submodule of that
name would replace the ``cnnlab.summary`` function by the module.)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as flax_nn
import jax
import jax.numpy as jnp

from cnnlab import nn
from cnnlab.native import conv_impl

#: Collections that are not variables (what layers sow on a call): never counted.
SOWN = (nn.LOSSES, "intermediates")
TRAINABLE = "params"


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """One row: a layer call. ``name`` is the module's Flax path (``"/"``-joined, ``""`` for
    the model itself), ``type`` its class; ``output_shape`` has ``None`` for the batch; ``params``
    and ``non_trainable`` count the variables the module owns itself (not its children's);
    ``flops`` are per image, None for a layer without multiply-adds."""

    name: str
    type: str
    output_shape: Any
    params: int
    non_trainable: int
    flops: int | None


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """What :func:`summary` found; ``str()`` (or :meth:`table`) is the printed table.

    ``flops`` is the sum of the layers' counts: 2 per multiply-add of the convolutions (plain,
    grouped, depthwise, separable, transposed) and dense layers, padding positions included,
    nothing else (biases, activations, normalization, pooling are left out), as Keras-world
    FLOP counters report. ``xla_flops`` is XLA's own count of the whole forward pass
    (``HloCostAnalysis`` of the jitted ``module.apply`` lowered for one image, lax's
    convolutions): it adds the element-wise operations and leaves out the products with a
    convolution's padding, so the two differ by a few percent, more where the feature maps are
    small (StridedNet at 96x96: 104.6 M here, 98.5 M by XLA: 6.8 M products with padding
    fewer, 0.6 M element-wise operations more; configs/tutorial_fast.py's ResNet at 48x48:
    13.9 M and 11.5 M). Both are per image, in inference mode."""

    model: str
    input_shape: tuple[int, ...]
    layers: tuple[LayerSummary, ...]
    trainable_params: int
    non_trainable_params: int
    param_bytes: int
    flops: int
    xla_flops: float | None

    @property
    def total_params(self) -> int:
        return self.trainable_params + self.non_trainable_params

    def table(self) -> str:
        """The per-layer table and the totals, as plain text."""
        head = ("Layer", "Type", "Output shape", "Params", "FLOPs")
        rows = [(layer.name or "(model)", layer.type, _shape_text(layer.output_shape),
                 f"{layer.params + layer.non_trainable:,}",
                 "-" if layer.flops is None else f"{layer.flops:,}") for layer in self.layers]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

        def line(cells):
            left = [c.ljust(w) for c, w in zip(cells[:3], widths)]
            return "  ".join(left + [c.rjust(w) for c, w in zip(cells[3:], widths[3:])]).rstrip()

        rule = "  ".join("-" * w for w in widths)
        out = [f'Model: "{self.model}", input {_shape_text((None, *self.input_shape))}',
               rule, line(head), rule, *map(line, rows), rule,
               f"Total params: {self.total_params:,} ({_size_text(self.param_bytes)})",
               f"Trainable params: {self.trainable_params:,}",
               f"Non-trainable params: {self.non_trainable_params:,}"
               + (" (batch-norm statistics and other state)" if self.non_trainable_params else ""),
               f"FLOPs per image: {self.flops:,} ({_si(self.flops)}; convolution and dense "
               "multiply-adds x 2)"]
        if self.xla_flops is not None:
            diff = f", {self.xla_flops / self.flops - 1:+.1%}" if self.flops else ""
            out.append(f"XLA cost analysis: {self.xla_flops:,.0f} FLOPs per image ({_si(self.xla_flops)}{diff}; "
                       "every operation, padding excluded)")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (f"ModelSummary(model={self.model!r}, layers={len(self.layers)}, total_params="
                f"{self.total_params}, trainable_params={self.trainable_params}, flops={self.flops})")


def summary(
    module: flax_nn.Module,
    input_shape: Sequence[int],
    *,
    variables: Mapping[str, Any] | None = None,
    xla_flops: bool = True,
    print_fn: Callable[[str], Any] | None = print,
) -> ModelSummary:
    """Prints and returns a model's per-layer table: every layer call with its Flax path,
    class, output shape, parameters and FLOPs, then total, trainable and non-trainable
    parameters and the forward pass's FLOPs per image.

    Nothing is computed or allocated: shapes come from ``jax.eval_shape`` (the convolutions
    traced as lax's op, :func:`cnnlab.native.conv_impl.formulation`), and XLA's count from the
    lowered program (no compilation). The rows are the calls of modules that call no other
    module (the layers), plus any module owning variables of its own; a layer called twice has
    two rows and its variables counted once.

    Args:
      module: a Flax module taking ``[N, *input_shape]`` (and ``training``, given False when
        its ``__call__`` takes it): a cnnlab model, a ``cnnlab.interop.Sequential``, a layer.
      input_shape: one example's shape, e.g. ``(96, 96, 3)``.
      variables: its variables (or their shapes); default: those ``module.init`` would make.
      xla_flops: also count the forward's FLOPs with XLA's cost analysis.
      print_fn: what prints the table (None: nothing printed).

    Returns:
      A :class:`ModelSummary`: trainable parameters are the ``"params"`` collection,
      non-trainable ones every other collection (BatchNormalization's moving mean and
      variance, as Keras counts them), the penalties layers sow (``"losses"``) excepted; its
      ``flops`` and ``xla_flops`` are explained there.
    """
    x = jax.ShapeDtypeStruct((1, *map(int, input_shape)), jnp.float32)
    kwargs = {"training": False} if "training" in inspect.signature(type(module).__call__).parameters else {}
    with conv_impl.formulation("xla", override_env=True):  # no measurement; a custom call would hide its FLOPs
        if variables is None:
            variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, **kwargs), x)
        variables = {k: v for k, v in variables.items() if k not in SOWN}
        calls = _trace(module, variables, x, kwargs)
        cost = _xla_flops(module, variables, x, kwargs) if xla_flops else None
    layers, seen = [], set()
    for call in calls:
        own = {k: _own(variables.get(k, {}), call.path) for k in variables}
        counted = call.path not in seen
        seen.add(call.path)
        if call.children and not any(own.values()):
            continue  # a container (the model, a block): its layers have rows
        trainable = sum(_size(a) for a in own.get(TRAINABLE, {}).values()) if counted else 0
        state = sum(_size(a) for k, c in own.items() if k != TRAINABLE for a in c.values()) if counted else 0
        layers.append(LayerSummary("/".join(call.path), type(call.layer).__name__, _batchless(call.output),
                                   trainable, state, _layer_flops(call, own.get(TRAINABLE, {}))))
    leaves = jax.tree_util.tree_leaves(variables)
    result = ModelSummary(
        model=type(module).__name__,
        input_shape=tuple(x.shape[1:]),
        layers=tuple(layers),
        trainable_params=sum(_size(a) for a in jax.tree_util.tree_leaves(variables.get(TRAINABLE, {}))),
        non_trainable_params=sum(_size(a) for k, v in variables.items() if k != TRAINABLE
                                 for a in jax.tree_util.tree_leaves(v)),
        param_bytes=sum(_size(a) * jnp.dtype(a.dtype).itemsize for a in leaves),
        flops=sum(layer.flops or 0 for layer in layers),
        xla_flops=cost,
    )
    if print_fn is not None:
        print_fn(result.table())
    return result


# --------------------------------------------------------------------------- the layer calls


@dataclasses.dataclass
class _Call:
    layer: flax_nn.Module
    path: tuple[str, ...]
    input: Any
    output: Any
    children: int = 0


def _trace(module, variables, x, kwargs) -> list[_Call]:
    """Every module ``__call__`` of one forward pass (shapes only), in the order they start
    (a container before its layers)."""
    calls: list[_Call] = []
    stack: list[_Call] = []

    def interceptor(next_fun, args, kw, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kw)
        layer = context.module
        if stack:
            stack[-1].children += 1
        call = _Call(layer, tuple(layer.scope.path) if layer.scope else (), _shapes(args[0] if args else None), None)
        calls.append(call)
        stack.append(call)
        try:
            out = next_fun(*args, **kw)
        finally:
            stack.pop()
        call.output = _shapes(out)
        return out

    def forward(variables, x):
        with flax_nn.intercept_methods(interceptor):
            return module.apply(variables, x, **kwargs)

    jax.eval_shape(forward, variables, x)
    return calls


def _shapes(tree: Any) -> Any:
    """The shapes of the arrays of ``tree`` (tuples of ints; other leaves as None)."""
    return jax.tree_util.tree_map(lambda a: tuple(a.shape) if hasattr(a, "shape") else None, tree)


def _own(tree: Any, path: tuple[str, ...]) -> dict[str, Any]:
    """The arrays directly at ``path`` of a collection (a module's own variables)."""
    for key in path:
        tree = tree.get(key, {}) if isinstance(tree, Mapping) else {}
    if not isinstance(tree, Mapping):
        return {}
    return {k: v for k, v in tree.items() if not isinstance(v, Mapping)}


def _size(a: Any) -> int:
    return math.prod(a.shape)


def _batchless(shapes: Any) -> Any:
    return jax.tree_util.tree_map(lambda s: (None, *s[1:]) if s else s, shapes,
                                  is_leaf=lambda s: isinstance(s, tuple) and all(isinstance(d, int) for d in s))


# --------------------------------------------------------------------------- FLOPs

#: Per layer class, the multiply-adds per image from ``(input shape, output shape, params)``
#: (shapes with the batch of 1; a kernel's layout as Keras').
_MACS: dict[type, Callable[[tuple, tuple, Mapping[str, Any]], int]] = {
    # [*k, C/groups, filters]: each output element sums prod(k) * C/groups products
    nn.Conv1D: lambda i, o, p: math.prod(o) * math.prod(p["kernel"].shape[:-1]),
    nn.Conv2D: lambda i, o, p: math.prod(o) * math.prod(p["kernel"].shape[:-1]),
    nn.Conv3D: lambda i, o, p: math.prod(o) * math.prod(p["kernel"].shape[:-1]),
    # [kh, kw, C, M]: each of the C * M outputs per position sums kh * kw products
    nn.DepthwiseConv2D: lambda i, o, p: math.prod(o) * math.prod(p["kernel"].shape[:2]),
    # the depthwise part at every output position, then the 1x1 [C * M -> filters]
    nn.SeparableConv2D: lambda i, o, p: (math.prod(o) // p["pointwise_kernel"].shape[-1]) * (
        _size(p["depthwise_kernel"]) + _size(p["pointwise_kernel"])),
    # [kh, kw, filters, C]: every input element is scattered through kh * kw * filters products
    nn.Conv2DTranspose: lambda i, o, p: math.prod(i) * math.prod(p["kernel"].shape[:-1]),
    # [in, units] on the last axis
    nn.Dense: lambda i, o, p: math.prod(o) * p["kernel"].shape[0],
    flax_nn.Dense: lambda i, o, p: math.prod(o) * p["kernel"].shape[0],
    flax_nn.Conv: lambda i, o, p: math.prod(o) * math.prod(p["kernel"].shape[:-1]),
}


def _layer_flops(call: _Call, params: Mapping[str, Any]) -> int | None:
    """2 x the layer's multiply-adds per image, None for a layer without (or unknown)."""
    macs = next((_MACS[c] for c in type(call.layer).__mro__ if c in _MACS), None)
    if macs is None or not isinstance(call.input, tuple) or not isinstance(call.output, tuple):
        return None
    return 2 * macs(call.input, call.output, params)


def _xla_flops(module, variables, x, kwargs) -> float | None:
    """XLA's cost analysis of the forward for one image (None where the backend has none)."""
    lowered = jax.jit(lambda v, x: module.apply(v, x, **kwargs)).lower(variables, x)
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return None if flops is None or flops < 0 else float(flops)


# --------------------------------------------------------------------------- text


def _shape_text(shape: Any) -> str:
    if isinstance(shape, tuple) and all(d is None or isinstance(d, int) for d in shape):
        return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
    leaves = jax.tree_util.tree_leaves(shape, is_leaf=lambda s: isinstance(s, tuple) and all(
        d is None or isinstance(d, int) for d in s))
    return ", ".join(_shape_text(s) for s in leaves) or "-"


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _size_text(nbytes: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"
