"""The dataflow graph of a Flax model's ``cnnlab.nn`` layer calls, recovered from its jaxpr.

:func:`trace` runs ``module.apply`` under :func:`jax.make_jaxpr` with every call of a layer
(a module of ``layer_types``) wrapped between two marker equations, one on its input and one on
its output. Walking the jaxpr from the model input then gives, for every array, the node that
made it: the model input, a layer call, or one of the few array operations that models do
between layers and Keras has a layer for (a residual ``x + y``, ``jnp.concatenate`` along an
axis, an activation called as a function, a dtype cast that float32 inference ignores).
Everything else a layer computes (its parameters, its own arithmetic) hangs off its input
marker and is skipped. So the graph is read from what the model computes, not declared beside
it: a new model built from ``cnnlab.nn`` layers exports without a line of export code, and an
operation with no Keras equivalent is named instead of silently dropped.

>>> import jax, jax.numpy as jnp
>>> from cnnlab import interop, layer_graph, models
>>> model = models.get_model("resnet", num_classes=3, stem_filters=8, stage_filters=(8,), stage_depths=(1,))
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
>>> graph = layer_graph.trace(model, variables, (16, 16, 3), layer_types=tuple(interop.LAYERS.values()))
>>> [node.kind for node in graph.nodes if node.kind != "layer"]
['input', 'add']
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from cnnlab.native import conv_impl


class GraphError(ValueError):
    """A model whose dataflow between layers has no Keras equivalent."""


@dataclasses.dataclass(frozen=True)
class Node:
    """One array of the graph: ``kind`` ``"input"``, ``"layer"`` (``layer`` called on
    ``inputs[0]``; ``path`` its scope path, which names its variables; a layer called twice
    shares them), ``"add"`` (elementwise sum of ``inputs``), ``"concatenate"`` (along ``axis``,
    counting the batch axis) or ``"activation"`` (Keras' ``activation`` by name)."""

    kind: str
    inputs: tuple[int, ...] = ()
    layer: flax_nn.Module | None = None
    path: tuple[str, ...] = ()
    axis: int | None = None
    activation: str | None = None

    @property
    def where(self) -> str:
        return f"{type(self.layer).__name__} at {'/'.join(self.path) or '<root>'}"


@dataclasses.dataclass(frozen=True)
class LayerGraph:
    """``nodes`` in dataflow order (``nodes[0]`` the input); ``output`` the index of the model's
    output."""

    nodes: tuple[Node, ...]
    output: int

    @property
    def is_chain(self) -> bool:
        """Whether every node is a layer taking the previous node's output, the last one the
        output (what ``keras.Sequential`` holds)."""
        return (self.output == len(self.nodes) - 1
                and all(n.kind == "layer" and n.inputs == (i,) for i, n in enumerate(self.nodes[1:])))


#: Activations called as functions (``jax.nn.relu(x)``), by the name JAX gives their
#: ``jit``/``custom_jvp`` wrapper or primitive, and Keras' activation with the same values.
#: (``jax.nn.gelu`` is left out: its default is tanh-approximate, Keras' is exact.)
ACTIVATIONS = {"relu": "relu", "relu6": "relu6", "sigmoid": "sigmoid", "logistic": "sigmoid",
               "tanh": "tanh", "silu": "silu", "swish": "silu", "elu": "elu", "selu": "selu",
               "softplus": "softplus"}
#: Wrappers whose inner jaxpr is walked like the outer one.
_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "checkpoint", "remat")
#: Casts (a model may compute in bfloat16 and return float32): identity in float32 inference.
_PASS = ("convert_element_type", "copy", "copy_p", "optimization_barrier")

_boundary_p = jex_core.Primitive("cnnlab_layer_boundary")
_boundary_p.def_impl(lambda x, **_: x)
_boundary_p.def_abstract_eval(lambda aval, **_: aval)


def trace(
    module: flax_nn.Module,
    variables: Mapping[str, Any],
    input_shape: Sequence[int],
    *,
    layer_types: Sequence[type[flax_nn.Module]],
) -> LayerGraph:
    """The graph of ``module``'s calls of ``layer_types`` on one ``[1, *input_shape]`` float32
    input, in inference mode (``training=False`` where ``__call__`` takes it).

    Raises:
      GraphError: a module that is neither a layer nor calls one (e.g. a ``flax.linen.Dense``),
        an operation between layers with no Keras layer (naming its primitive), or an output
        not computed from the input through layers.
    """
    layer_types = tuple(layer_types)
    calls: list[tuple[flax_nn.Module, tuple[str, ...]]] = []
    stack: list[list[int]] = []  # per open module call: [number of modules it called]
    inside = [0]  # depth of open layer calls: modules a layer uses are part of it

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or inside[0]:
            return next_fun(*args, **kwargs)
        layer = context.module
        path = tuple(layer.scope.path) if layer.scope else ()
        if stack:
            stack[-1][0] += 1
        if isinstance(layer, layer_types):
            index = len(calls)
            calls.append((layer, path))
            inside[0] += 1
            try:
                out = next_fun(_boundary_p.bind(args[0], call=index, side="in"), *args[1:], **kwargs)
            finally:
                inside[0] -= 1
            return _boundary_p.bind(out, call=index, side="out")
        stack.append([0])
        try:
            out = next_fun(*args, **kwargs)
        finally:
            (children,) = stack.pop()
        if not children and stack:
            raise GraphError(
                f"{type(layer).__module__}.{type(layer).__name__} at {'/'.join(path)} is not a cnnlab "
                f"layer with a Keras equivalent; those are {sorted(t.__name__ for t in layer_types)}.")
        return out

    kwargs = {"training": False} if "training" in inspect.signature(type(module).__call__).parameters else {}

    def forward(x):
        with flax_nn.intercept_methods(interceptor):
            return module.apply(variables, x, **kwargs)

    # lax's convolution, traced without measuring the formulations (the jaxpr is only read)
    with conv_impl.formulation("xla", override_env=True):
        closed = jax.make_jaxpr(forward)(jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return _Walk(calls, type(module).__name__).graph(closed)


class _Walk:
    """Maps the jaxpr's variables to graph nodes, equation by equation."""

    def __init__(self, calls, model_name: str):
        self.calls, self.model = calls, model_name
        self.nodes: list[Node] = [Node("input")]
        self.layer_input: dict[int, int] = {}

    def graph(self, closed: jex_core.ClosedJaxpr) -> LayerGraph:
        jaxpr = closed.jaxpr
        (out,) = self.walk(jaxpr, [0] + [None] * (len(jaxpr.invars) - 1))[:1]
        if out is None:
            raise GraphError(f"{self.model}'s output is not computed from its input by cnnlab layers.")
        if not any(n.kind == "layer" for n in self.nodes):
            raise GraphError(f"{self.model} calls no cnnlab.nn layer.")
        return LayerGraph(tuple(self.nodes), out)

    def add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def walk(self, jaxpr: jex_core.Jaxpr, inputs: list[int | None]) -> list[int | None]:
        env: dict[Any, int] = {v: i for v, i in zip(jaxpr.invars, inputs) if i is not None}

        def node_of(v):
            return env.get(v) if isinstance(v, jex_core.Var) else None

        for eqn in jaxpr.eqns:
            if eqn.primitive is _boundary_p:
                index = eqn.params["call"]
                layer, path = self.calls[index]
                if eqn.params["side"] == "in":
                    src = node_of(eqn.invars[0])
                    if src is None:
                        raise GraphError(
                            f"the input of {Node('layer', layer=layer, path=path).where} is not computed "
                            f"from {self.model}'s input by cnnlab layers and the operations Keras has "
                            "(add, concatenate, activations).")
                    self.layer_input[index] = src
                else:
                    env[eqn.outvars[0]] = self.add(Node("layer", (self.layer_input[index],), layer, path))
                continue
            srcs = [node_of(v) for v in eqn.invars]
            if all(s is None for s in srcs):
                continue  # parameters, constants, a layer's own arithmetic
            for v, node in zip(eqn.outvars, self.op(eqn, srcs)):
                if node is not None:
                    env[v] = node
        return [node_of(v) for v in jaxpr.outvars]

    def op(self, eqn: Any, srcs: list[int | None]) -> list[int | None]:
        name = eqn.primitive.name
        label = eqn.params.get("name", "")
        mapped = [s for s in srcs if s is not None]
        if name in _PASS and len(srcs) == 1:
            if not jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating):
                raise GraphError(f"{self.model} casts a layer's output to {eqn.outvars[0].aval.dtype}; "
                                 "only float casts are supported between layers.")
            return [srcs[0]]
        if name == "add" and len(mapped) == 2:
            return [self.add(Node("add", tuple(mapped)))]
        if name == "concatenate" and len(mapped) == len(srcs):
            return [self.add(Node("concatenate", tuple(mapped), axis=int(eqn.params["dimension"])))]
        activation = ACTIVATIONS.get(label if name in _CALLS else name)
        if activation and len(srcs) == 1 and len(eqn.outvars) == 1:
            return [self.add(Node("activation", (srcs[0],), activation=activation))]
        if name == "max" and len(mapped) == 1 and _is_zero([v for v, s in zip(eqn.invars, srcs) if s is None][0]):
            return [self.add(Node("activation", (mapped[0],), activation="relu"))]
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        if name in _CALLS and inner is not None:
            closed = inner if isinstance(inner, jex_core.ClosedJaxpr) else None
            jaxpr = closed.jaxpr if closed else inner
            return self.walk(jaxpr, srcs[len(srcs) - len(jaxpr.invars):])  # consts come first
        what = f"{name}[{label}]" if label else name
        raise GraphError(
            f"{self.model} applies `{what}` to a layer's output; between cnnlab layers only a sum "
            "of two arrays (Keras Add), jnp.concatenate (Concatenate), float casts and the "
            f"activations {sorted(set(ACTIVATIONS.values()))} called as functions have Keras layers.")


def _is_zero(v: Any) -> bool:
    return isinstance(v, jex_core.Literal) and not jnp.any(jnp.asarray(v.val) != 0)
