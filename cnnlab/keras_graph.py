"""Any Keras 3 model as a Flax module of ``cnnlab.nn`` layers: functional graphs (branches,
merges, shared layers, several inputs or outputs), Sequential models and models nested in them.

:func:`import_model` reads the model's graph once into a :class:`Graph` (plain data: which
cnnlab layer each Keras layer becomes, which tensors it takes) and Keras' weights; the module
:class:`KerasGraph` replays the graph. Layers are ``cnnlab.nn`` layers built from the Keras
layer's config; ``keras.ops`` arithmetic on symbolic tensors (``x + 3.0`` in MobileNetV3) runs
as the same ``jax.numpy`` operation; ConvNeXt's own ``LayerScale`` and ``StochasticDepth`` are
here. Variables are Keras' weights under the Keras layer's name (a nested model's under its
name, then its layers'): ``params`` for trainable ones, ``batch_stats`` for BatchNormalization's
moving statistics and Normalization's mean and variance.

In training mode (``training=True``) BatchNormalization uses batch statistics and updates its
moving ones with the file's momentum, as Keras; a BatchNormalization layer frozen in Keras
(``trainable=False``) stays in inference mode, as Keras runs it.

>>> import keras
>>> from cnnlab import keras_graph
>>> module, variables = keras_graph.import_model(keras.applications.MobileNetV2(
...     input_shape=(32, 32, 3), weights=None, classes=10))
>>> probs = module.apply(variables, jnp.zeros((2, 32, 32, 3)))  # doctest: +SKIP

Private Keras API is read in one place, :func:`_producer` (which node made a symbolic tensor
and with which arguments).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnlab import nn as cnn

Array = jax.Array


class InteropError(ValueError):
    """A model (or layer, or argument) that cannot move between cnnlab and Keras."""


def keras_module():
    """Keras, on the JAX backend unless ``KERAS_BACKEND`` (read at Keras' import) says otherwise."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except ImportError as err:
        if err.name != "keras":
            raise ImportError(f"importing Keras failed: {err} (KERAS_BACKEND="
                              f"{os.environ['KERAS_BACKEND']!r}; cnnlab uses 'jax').") from None
        raise ImportError('cnnlab.interop needs Keras 3: pip install "cnnlab[keras]".') from None
    return keras


# --------------------------------------------------------------------------- application layers


class LayerScale(flax_nn.Module):
    """ConvNeXt's ``LayerScale`` (``keras.applications.convnext``): ``x * gamma``, ``gamma``
    of shape ``[projection_dim]`` initialized to ``init_values``."""

    init_values: float
    projection_dim: int

    @flax_nn.compact
    def __call__(self, x: Array) -> Array:
        gamma = self.param("gamma", lambda key, shape: jnp.full(shape, self.init_values, jnp.float32),
                           (self.projection_dim,))
        return x * gamma.astype(x.dtype)


class StochasticDepth(flax_nn.Module):
    """ConvNeXt's ``StochasticDepth``: in training, each example's residual branch is dropped
    with probability ``drop_path_rate`` (the kept ones scaled by ``1 / keep``); identity in
    inference. Draws from the ``"dropout"`` PRNG stream."""

    drop_path_rate: float

    @flax_nn.compact
    def __call__(self, x: Array, training: bool = False) -> Array:
        if not training or self.drop_path_rate == 0.0:
            return x
        keep = 1.0 - self.drop_path_rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jnp.floor(keep + jax.random.uniform(self.make_rng("dropout"), shape, x.dtype))
        return x / keep * mask


#: cnnlab layers by the Keras class name they stand for.
LAYERS: dict[str, type[flax_nn.Module]] = {
    **{name: getattr(cnn, name) for name in cnn.__all__ if isinstance(getattr(cnn, name), type)
       and issubclass(getattr(cnn, name), flax_nn.Module) and name != "PenaltiesMixin"},
    "LayerScale": LayerScale,
    "StochasticDepth": StochasticDepth,
}

#: ``keras.ops`` operations on symbolic tensors, by class name: the same ``jax.numpy`` function.
OPERATIONS: dict[str, Callable[..., Array]] = {
    "Add": jnp.add, "Subtract": jnp.subtract, "Multiply": jnp.multiply, "Divide": jnp.divide,
    "TrueDivide": jnp.true_divide, "Maximum": jnp.maximum, "Minimum": jnp.minimum,
    "Negative": jnp.negative, "Power": jnp.power, "Square": jnp.square, "Sqrt": jnp.sqrt,
    "Abs": jnp.abs, "Absolute": jnp.abs, "Exp": jnp.exp,
}

#: Keras config keys that describe storage or bookkeeping, not the computation.
_KERAS_ONLY = {"name", "trainable", "dtype", "input_shape", "batch_input_shape", "batch_shape",
               "synchronized", "autocast"}
#: Keras weights that are state, not trainable parameters (cnnlab's ``batch_stats``), and those
#: cnnlab does not keep (Normalization's adapt ``count``).
_STATE = {"moving_mean", "moving_variance", "mean", "variance"}
_DROPPED = {"count"}
#: cnnlab's weight names, in Keras' order, for layers whose Keras weights are unnamed
#: (``add_weight`` without a name gives ``variable``, ``variable_1``...).
_POSITIONAL = {"LayerScale": ("gamma",)}


# --------------------------------------------------------------------------- the graph


@dataclasses.dataclass(frozen=True)
class Ref:
    """Output ``index`` of node ``node`` of a :class:`Graph`; ``node=-1``: input ``index``."""

    node: int
    index: int


@dataclasses.dataclass(frozen=True, eq=False)
class Node:
    """One call in the graph: a cnnlab layer (``layer`` class and ``config``), a nested
    :class:`Graph` (``graph``), or a ``jax.numpy`` function (``op``), applied to ``args`` and
    ``kwargs`` (Keras' call arguments, with :class:`Ref` for tensors)."""

    name: str
    kind: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    layer: type[flax_nn.Module] | None = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    graph: Graph | None = None
    op: Callable[..., Array] | None = None
    training: bool = True  # False: a frozen BatchNormalization, always in inference mode

    @property
    def variables_name(self) -> str | None:
        """The name its variables live under (layers and nested graphs; operations have none)."""
        return None if self.op is not None else self.name


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """A Keras model as data: ``nodes`` in an order where every input comes first, the
    ``outputs`` structure (a :class:`Ref` or a list of them), and Keras' weights as
    ``{"params": {layer: {name: array}}, "batch_stats": {...}}``."""

    name: str
    num_inputs: int
    nodes: tuple[Node, ...]
    outputs: Any
    weights: Mapping[str, Any]

    def output_node(self) -> Node | None:
        """The node that makes the single output (None for several outputs or an input)."""
        if isinstance(self.outputs, Ref) and self.outputs.node >= 0:
            return self.nodes[self.outputs.node]
        return None


def _map(structure: Any, fn: Callable[[Any], Any], is_leaf: Callable[[Any], bool]) -> Any:
    if is_leaf(structure):
        return fn(structure)
    if isinstance(structure, (list, tuple)):
        return type(structure)(_map(s, fn, is_leaf) for s in structure)
    if isinstance(structure, Mapping):
        return {k: _map(v, fn, is_leaf) for k, v in structure.items()}
    return structure


def _is_ref(x: Any) -> bool:
    return isinstance(x, Ref)


class KerasGraph(flax_nn.Module):
    """Replays a :class:`Graph`: ``module.apply(variables, x)`` (one input) or
    ``module.apply(variables, x1, x2, ...)``, with ``training`` passed to the layers that take
    it. Returns the model's output (a list for several)."""

    graph: Graph
    dtype: Any = None  # compute dtype of the layers that have one (None: each layer's default)

    @flax_nn.compact
    def __call__(self, *inputs: Array, training: bool = False) -> Any:
        return replay(self.graph, inputs, training=training, dtype=self.dtype)


def replay(graph: Graph, inputs: Sequence[Array], *, training: bool, dtype: Any = None) -> Any:
    """Runs ``graph`` on ``inputs`` inside the ``@compact`` method of the module that calls it:
    its layers become that module's submodules, named as in Keras (a shared layer is one
    submodule, called once per use; a nested model a :class:`KerasGraph`)."""
    if len(inputs) != graph.num_inputs:
        raise ValueError(f"{graph.name!r} takes {graph.num_inputs} input(s), got {len(inputs)}.")
    values: dict[Ref, Any] = {Ref(-1, i): x for i, x in enumerate(inputs)}
    modules: dict[str, flax_nn.Module] = {}
    for k, node in enumerate(graph.nodes):
        args = _map(node.args, values.__getitem__, _is_ref)
        kwargs = _map(dict(node.kwargs), values.__getitem__, _is_ref)
        if node.op is not None:
            out = node.op(*args, **kwargs)
        else:
            module = modules.get(node.name)
            if module is None:
                module = modules[node.name] = _build(node, dtype)
            if node.graph is not None or _takes_training(module):
                kwargs["training"] = training and node.training
            out = module(*args, **kwargs)
        for i, value in enumerate(out if isinstance(out, (list, tuple)) else (out,)):
            values[Ref(k, i)] = value
    return _map(graph.outputs, values.__getitem__, _is_ref)


def _build(node: Node, dtype: Any) -> flax_nn.Module:
    if node.graph is not None:
        return KerasGraph(node.graph, dtype=dtype, name=node.name)
    config = dict(node.config)
    if dtype is not None and "dtype" in {f.name for f in dataclasses.fields(node.layer)}:
        config["dtype"] = dtype
    return node.layer(**config, name=node.name)


def _takes_training(module: flax_nn.Module) -> bool:
    return "training" in inspect.signature(type(module).__call__).parameters


# --------------------------------------------------------------------------- Keras -> Graph


def _producer(tensor: Any) -> tuple[Any, Any, int]:
    """``(operation, node, output index)`` of the Keras call that made a symbolic tensor.

    The one place that reads Keras' private graph structure (``KerasTensor._keras_history``,
    ``Operation._inbound_nodes``), as Keras' own ``Functional`` does."""
    operation, node_index, tensor_index = tensor._keras_history
    return operation, operation._inbound_nodes[node_index], tensor_index


def _unsupported(found: dict[str, list[str]], kind: str, name: str) -> None:
    found.setdefault(kind, []).append(name)


def _layer_node(layer: Any, kind: str, args: tuple, kwargs: dict, found: dict[str, list[str]]) -> Node:
    keras = keras_module()
    if isinstance(layer, keras.Model):
        return Node(layer.name, kind, args, kwargs, graph=_graph(layer, found))
    if kind == "TFSMLayer" or kind not in LAYERS:
        _unsupported(found, kind, layer.name)
        return Node(layer.name, kind, args, kwargs, op=_missing)
    cls = LAYERS[kind]
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "dtype", "param_dtype"}
    config = layer.get_config()
    defaults = {p.name: p.default for p in inspect.signature(type(layer).__init__).parameters.values()
                if p.default is not inspect.Parameter.empty}
    lacking = [f"{key}={value!r}" for key, value in config.items()
               if key not in fields and key not in _KERAS_ONLY and value != defaults.get(key, value)]
    if lacking:
        _unsupported(found, f"{kind}({', '.join(lacking)})", layer.name)
    kept = {k: _hashable(v) for k, v in config.items() if k in fields}
    training = not (kind == "BatchNormalization" and not layer.trainable)
    return Node(layer.name, kind, args, kwargs, layer=cls, config=kept, training=training)


def _missing(*args: Any, **kwargs: Any) -> Any:
    raise InteropError("an unsupported Keras layer was called")  # never: import_model refuses first


def _hashable(value: Any) -> Any:
    """Lists (Keras' JSON configs) as tuples, so layer fields compare and hash."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, Mapping):
        return flax.core.unfreeze(value)
    return value


def _graph(model: Any, found: dict[str, list[str]]) -> Graph:
    """The :class:`Graph` of a built Keras model; unsupported layers are added to ``found``."""
    keras = keras_module()
    if not model.built or not getattr(model, "inputs", None):
        raise InteropError(f"from_keras: build the model {model.name!r} first (give it a keras.Input).")
    inputs = list(model.inputs)
    is_tensor = keras.KerasTensor.__instancecheck__
    refs: dict[int, Ref] = {id(t): Ref(-1, i) for i, t in enumerate(inputs)}
    nodes: list[Node] = []
    weights: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}

    if isinstance(model, keras.Sequential):
        previous = Ref(-1, 0)
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            nodes.append(_layer_node(layer, type(layer).__name__, (previous,), {}, found))
            previous = Ref(len(nodes) - 1, 0)
        outputs: Any = previous
    else:
        seen_nodes: dict[int, int] = {}

        def call_tensors(node: Any) -> list[Any]:
            """The symbolic tensors a Keras call takes, in argument order."""
            tensors: list[Any] = []
            collect = lambda t: tensors.append(t)  # noqa: E731
            _map(tuple(node.arguments.args), collect, is_tensor)
            for k, v in node.arguments.kwargs.items():
                if k not in ("training", "mask"):
                    _map(v, collect, is_tensor)
            return tensors

        def known(tensor: Any) -> Ref | None:
            if id(tensor) not in refs:
                _, node, index = _producer(tensor)
                if id(node) not in seen_nodes:
                    return None
                refs[id(tensor)] = Ref(seen_nodes[id(node)], index)
            return refs[id(tensor)]

        def visit(output: Any) -> Ref:
            """Adds the calls ``output`` depends on, each after its inputs' (a depth-first walk
            on an explicit stack: a deep model, e.g. EfficientNetB7, exceeds Python's recursion
            limit), and returns its :class:`Ref`."""
            stack = [output]
            while stack:
                tensor = stack[-1]
                if known(tensor) is not None:
                    stack.pop()
                    continue
                operation, node, _ = _producer(tensor)
                pending = [t for t in call_tensors(node) if known(t) is None]
                if pending:
                    stack.extend(reversed(pending))
                    continue
                call_args = _map(tuple(node.arguments.args), known, is_tensor)
                call_kwargs = {k: _map(v, known, is_tensor) for k, v in node.arguments.kwargs.items()
                               if k not in ("training", "mask")}
                kind = type(operation).__name__
                if isinstance(operation, keras.layers.Layer):
                    nodes.append(_layer_node(operation, kind, call_args, call_kwargs, found))
                elif kind in OPERATIONS and not _op_attributes(operation):
                    nodes.append(Node(operation.name, kind, call_args, call_kwargs, op=OPERATIONS[kind]))
                else:
                    _unsupported(found, f"keras.ops.{kind}", operation.name)
                    nodes.append(Node(operation.name, kind, call_args, call_kwargs, op=_missing))
                seen_nodes[id(node)] = len(nodes) - 1
            return known(output)

        outputs = [visit(t) for t in model.outputs]
        outputs = outputs[0] if len(outputs) == 1 else outputs

    layers = {id(layer): layer for layer in model.layers}
    by_name = {layer.name: layer for layer in layers.values()}
    for node in nodes:
        if node.graph is not None:
            for collection, tree in node.graph.weights.items():
                if tree:
                    weights[collection][node.name] = tree
        elif node.layer is not None:
            for collection, name, value in _layer_weights(by_name[node.name]):
                weights[collection].setdefault(node.name, {})[name] = value
    return Graph(model.name, len(inputs), tuple(nodes), outputs, weights)


def _op_attributes(operation: Any) -> dict[str, Any]:
    """The settings a ``keras.ops`` operation object carries besides its name (an elementwise
    one has none; one with settings, e.g. an axis, is not replayed by its jnp function)."""
    return {k: v for k, v in vars(operation).items() if not k.startswith("_") and k not in ("name",)}


def _layer_weights(layer: Any) -> list[tuple[str, str, np.ndarray]]:
    """``[(collection, cnnlab name, array)]`` of a Keras layer's weights."""
    positional = _POSITIONAL.get(type(layer).__name__)
    out = []
    for i, w in enumerate(layer.weights):
        if w.name in _DROPPED:
            continue
        collection = "batch_stats" if w.name in _STATE and not w.trainable else "params"
        name = positional[i] if positional and i < len(positional) else w.name
        out.append((collection, name, np.asarray(w.numpy())))
    return out


def _error(found: dict[str, list[str]]) -> InteropError:
    counts = collections.OrderedDict(sorted(found.items(), key=lambda kv: (-len(kv[1]), kv[0])))
    lines = [f"  {kind}: {len(names)} (first: {names[0]!r})" for kind, names in counts.items()]
    return InteropError(
        f"from_keras: {sum(len(n) for n in found.values())} layer(s) of {len(found)} kind(s) cannot "
        "be imported:\n" + "\n".join(lines)
        + f"\ncnnlab has the layers {sorted(LAYERS)} and the keras.ops {sorted(OPERATIONS)}.")


def to_graph(keras_model: Any) -> Graph:
    """The :class:`Graph` of a built Keras model (weights included).

    Raises:
      InteropError: every unsupported layer class (or argument, or ``keras.ops`` operation), with
        how many layers have it and the first one's name, in one message.
    """
    found: dict[str, list[str]] = {}
    graph = _graph(keras_model, found)
    if found:
        raise _error(found)
    return graph


def variables_of(graph: Graph) -> dict[str, Any]:
    """The graph's Keras weights as Flax variables ``{"params", "batch_stats"}`` (jnp arrays)."""
    return jax.tree_util.tree_map(jnp.asarray, {k: dict(v) for k, v in graph.weights.items()})


def import_model(keras_model: Any) -> tuple[KerasGraph, dict[str, Any]]:
    """A :class:`KerasGraph` and its variables for a built Keras model.

    Args:
      keras_model: a functional, Sequential or nested Keras 3 model of layers cnnlab has
        (:data:`LAYERS`) and elementwise ``keras.ops`` (:data:`OPERATIONS`).

    Returns:
      ``(module, {"params", "batch_stats"})``; ``module.apply(variables, x)`` equals
      ``keras_model(x, training=False)``, and ``module.apply(variables, x, training=True,
      mutable=["batch_stats"])`` equals ``keras_model(x, training=True)`` (dropout aside).

    Raises:
      InteropError: unsupported layers (all of them in one message, see :func:`to_graph`), or
        Keras weights whose shapes are not those of the cnnlab layers.
    """
    graph = to_graph(keras_model)
    module, variables = KerasGraph(graph), variables_of(graph)
    check_weights(module, variables, [tuple(t.shape[1:]) for t in keras_model.inputs])
    return module, variables


def check_weights(module: KerasGraph, variables: Mapping[str, Any], input_shapes: Sequence[tuple]) -> None:
    """Raises InteropError unless ``variables`` has exactly the names and shapes the module
    creates for inputs of ``input_shapes`` (batch axis excluded; skipped if one is unknown)."""
    if any(None in s for s in input_shapes):
        return
    zeros = [jnp.zeros((1, *s), jnp.float32) for s in input_shapes]
    expected = jax.eval_shape(lambda: module.init(jax.random.key(0), *zeros))
    shapes = {k: jax.tree_util.tree_map(lambda a: a.shape, flax.core.unfreeze(expected.get(k, {})))
              for k in ("params", "batch_stats")}
    got = {k: jax.tree_util.tree_map(lambda a: tuple(a.shape), flax.core.unfreeze(variables.get(k, {})))
           for k in ("params", "batch_stats")}
    if shapes != got:
        raise InteropError(f"from_keras: the cnnlab layers' weights differ from Keras': {_diff(shapes, got)}")


def _diff(expected: Mapping[str, Any], got: Mapping[str, Any]) -> str:
    flat_e = dict(jax.tree_util.tree_flatten_with_path(expected, is_leaf=lambda x: isinstance(x, tuple))[0])
    flat_g = dict(jax.tree_util.tree_flatten_with_path(got, is_leaf=lambda x: isinstance(x, tuple))[0])
    parts = []
    for path in sorted(set(flat_e) | set(flat_g), key=str)[:200]:
        e, g = flat_e.get(path), flat_g.get(path)
        if e != g:
            parts.append(f"{jax.tree_util.keystr(path)}: cnnlab {e}, Keras {g}")
    return "; ".join(parts[:10])


# --------------------------------------------------------------------------- .keras files

_FILES: dict[tuple[str, int, int], Graph] = {}


def load_graph(path: str) -> Graph:
    """The :class:`Graph` (weights included) of a Keras 3 ``.keras`` file, read once per
    process and file version (path, size and modification time; a rewritten file is read
    again). ConvNeXt's ``LayerScale`` and ``StochasticDepth`` load without custom objects.

    Raises:
      FileNotFoundError: no such file. InteropError: unsupported layers (see :func:`to_graph`).
    """
    path = os.path.abspath(os.fspath(path))
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _FILES:
        keras = keras_module()
        from keras.src.applications import convnext

        custom = {"LayerScale": convnext.LayerScale, "StochasticDepth": convnext.StochasticDepth}
        # Keras creates and reads its weights with JAX operations: run them now, also when the
        # first call comes from inside a trace (the trainer's jitted init).
        with jax.ensure_compile_time_eval():
            keras_model = keras.saving.load_model(path, compile=False, custom_objects=custom)
            graph = to_graph(keras_model)
        _FILES.clear()  # one file's graph at a time: a process trains one model
        _FILES[key] = graph
    return _FILES[key]
