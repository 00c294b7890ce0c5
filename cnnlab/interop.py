"""Whole models between cnnlab and Keras 3 (an optional extra: ``pip install "cnnlab[keras]"``).

cnnlab's layers have Keras' names, arguments and weight layouts, so they map one to one onto
Keras layers: :func:`to_keras` reads the ``cnnlab.nn`` layer calls of a Flax model and the
dataflow between them from its jaxpr (:mod:`cnnlab.layer_graph`) and rebuilds it, a chain as a
``keras.Sequential``, a model with skip connections or branches (ResNet, Inception: every
built-in model) as a functional ``keras.Model`` with ``Add``/``Concatenate`` layers;
:func:`from_keras` rebuilds a Keras chain as a :class:`Sequential` of ``cnnlab.nn`` layers;
``cnnlab export`` (:func:`export_main`) writes a trained run as a ``.keras`` file with its
preprocessing, test-time flip and softmax, or (``--format=onnx``, :mod:`cnnlab.onnx_export`) as
an ONNX file.

>>> import jax, jax.numpy as jnp
>>> from cnnlab import interop, models
>>> model = models.get_model("simple_cnn", num_classes=4, widths=(8,), dense_units=16)
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
>>> keras_model = interop.to_keras(model, variables, (32, 32, 3))
>>> module, variables = interop.from_keras(keras_model)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnlab import backend, keras_graph, layer_graph
from cnnlab import nn as cnn
from cnnlab.keras_graph import InteropError
from cnnlab.layer_graph import LayerGraph

Array = jax.Array

#: cnnlab's fields that describe storage or compute precision, not the layer (exports compute
#: in float32), and the Keras config keys with the same role.
_CNNLAB_ONLY = ("parent", "name", "dtype", "param_dtype", "rng_collection")
_KERAS_ONLY = ("name", "trainable", "dtype", "input_shape", "batch_input_shape", "batch_shape")
_STATS = ("moving_mean", "moving_variance")


_keras = keras_graph.keras_module  # Keras on the JAX backend, or a clear ImportError


class Rescaling(flax_nn.Module):
    """Keras ``Rescaling``: ``x * scale + offset`` in float32."""

    scale: Any = 1.0
    offset: Any = 0.0

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.result_type(x.dtype, jnp.float32))
        return x * jnp.asarray(self.scale, x.dtype) + jnp.asarray(self.offset, x.dtype)


#: The layers that map one to one, by class name, onto ``keras.layers``.
LAYERS: dict[str, type[flax_nn.Module]] = {
    **{name: getattr(cnn, name) for name in cnn.__all__ if isinstance(getattr(cnn, name), type)
       and issubclass(getattr(cnn, name), flax_nn.Module) and name != "PenaltiesMixin"},
    "Rescaling": Rescaling,
}


def _takes_training(layer: flax_nn.Module) -> bool:
    return "training" in inspect.signature(type(layer).__call__).parameters


class Sequential(flax_nn.Module):
    """A chain of layers, ``x -> layers[-1](...layers[0](x))``; ``training`` goes to those that
    take it (Dropout, BatchNormalization). Variables are named ``layers_<i>``."""

    layers: Sequence[flax_nn.Module]

    def __call__(self, x: Array, training: bool = False) -> Array:
        for layer in self.layers:
            x = layer(x, training=training) if _takes_training(layer) else layer(x)
        return x


# --------------------------------------------------------------------------- arguments


def _defaults(cls: type) -> dict[str, Any]:
    return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
            if p.default is not inspect.Parameter.empty}


def _identifier(value: Any) -> Any:
    """An activation/initializer/regularizer/constraint as both libraries read it: a name or
    Keras' ``{"class_name", "config"}`` dict (cnnlab's objects serialize to one)."""
    if isinstance(value, Mapping):
        return flax.core.unfreeze(value)
    if value is None or isinstance(value, (str, int, float, bool, tuple, list)):
        return value
    if hasattr(value, "get_config"):
        return {"class_name": type(value).__name__, "config": value.get_config()}
    raise InteropError(f"{value!r} has no name or config that Keras could read.")


def _keras_arguments(layer: flax_nn.Module, keras_cls: type, where: str) -> dict[str, Any]:
    """The Keras constructor arguments of a cnnlab layer (the fields with the same name)."""
    keras_args = set(inspect.signature(keras_cls.__init__).parameters)
    out = {}
    for field in dataclasses.fields(layer):
        name, value = field.name, getattr(layer, field.name)
        if name in _CNNLAB_ONLY:
            continue
        if name not in keras_args:
            if value != field.default:
                raise InteropError(f"{where}: Keras' {keras_cls.__name__} has no {name}={value!r}.")
            continue
        if isinstance(value, jax.Array):
            value = value.item()
        if name == "data_format":
            value = backend.standardize_data_format(value)
        out[name] = _identifier(value)
    if isinstance(out.get("padding"), (int, tuple, list)):
        raise InteropError(f"{where}: Keras has no explicit padding={out['padding']!r}.")
    return out


def _cnnlab_layer(keras_layer: Any) -> flax_nn.Module:
    """The cnnlab layer with a Keras layer's configuration."""
    kind, config = type(keras_layer).__name__, keras_layer.get_config()
    where = f"{kind} layer {keras_layer.name!r}"
    if kind == "Softmax" and config.get("axis", -1) == -1:
        return cnn.Activation("softmax")
    if kind not in LAYERS:
        raise InteropError(f"from_keras: {where} is not supported; cnnlab has {sorted(LAYERS)}.")
    cls = LAYERS[kind]
    fields = {f.name for f in dataclasses.fields(cls)} - set(_CNNLAB_ONLY)
    defaults = _defaults(type(keras_layer))
    for key, value in config.items():
        if key not in fields and key not in _KERAS_ONLY and value != defaults.get(key, value):
            raise InteropError(f"from_keras: {where} sets {key}={value!r}, which cnnlab's {kind} lacks.")
    try:
        return cls(**{k: v for k, v in config.items() if k in fields})
    except (TypeError, ValueError) as err:
        raise InteropError(f"from_keras: {where}: {err}") from None


# --------------------------------------------------------------------------- cnnlab -> Keras


def _layer_weights(variables: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Array]:
    out: dict[str, Array] = {}
    for collection in ("params", "batch_stats"):
        tree = variables.get(collection, {})
        for key in path:
            tree = tree.get(key, {}) if isinstance(tree, Mapping) else {}
        out.update(tree)
    return out


def _graph(module, variables, input_shape) -> LayerGraph:
    try:
        return layer_graph.trace(module, variables, input_shape, layer_types=tuple(LAYERS.values()))
    except layer_graph.GraphError as err:
        raise InteropError(f"to_keras: {err}") from None


class _KerasGraph:
    """The Keras layers of a :class:`~cnnlab.layer_graph.LayerGraph` (one per cnnlab layer: a
    layer called twice is one shared Keras layer), applied to Keras tensors with
    :meth:`__call__`; :meth:`set_weights` once the model is built."""

    def __init__(self, graph: LayerGraph, variables: Mapping[str, Any]):
        keras = _keras()
        self.graph, self.layers, self.weights = graph, {}, {}
        for node in graph.nodes:
            if node.kind != "layer" or node.path in self.layers:
                continue
            where = f"to_keras: {node.where}"
            keras_cls = getattr(keras.layers, type(node.layer).__name__)
            try:
                layer = keras_cls(**_keras_arguments(node.layer, keras_cls, where))
            except (TypeError, ValueError) as err:
                raise InteropError(f"{where}: Keras refuses its arguments: {err}") from None
            self.layers[node.path] = layer
            self.weights[node.path] = _layer_weights(variables, node.path)

    def __call__(self, x: Any) -> Any:
        keras = _keras()
        values = [x]
        for node in self.graph.nodes[1:]:
            args = [values[i] for i in node.inputs]
            if node.kind == "layer":
                values.append(self.layers[node.path](args[0]))
            elif node.kind == "add":
                values.append(keras.layers.Add()(args))
            elif node.kind == "concatenate":
                values.append(keras.layers.Concatenate(axis=node.axis)(args))
            else:
                values.append(keras.layers.Activation(node.activation)(args[0]))
        return values[self.graph.output]

    def set_weights(self) -> None:
        for path, layer in self.layers.items():
            _set_weights(layer, self.weights[path])


def _set_weights(layer: Any, arrays: Mapping[str, Array]) -> None:
    names = {w.name for w in layer.weights}
    if names != set(arrays):
        raise InteropError(f"Keras layer {layer.name!r} has weights {sorted(names)}, the cnnlab "
                           f"layer {sorted(arrays)}.")
    for w in layer.weights:
        value = np.asarray(arrays[w.name], np.float32)
        if tuple(w.shape) != value.shape:
            raise InteropError(f"Keras layer {layer.name!r}: {w.name} has shape {tuple(w.shape)}, the "
                               f"cnnlab weight {value.shape}.")
        w.assign(value)


def _keras_model(graph: LayerGraph, variables: Mapping[str, Any], input_shape, head=(), tail=(),
                 name: str | None = None) -> Any:
    """``head`` layers, the graph's and ``tail``'s, as a ``keras.Sequential`` where they form a
    chain (what :func:`from_keras` reads back), else as a functional ``keras.Model``."""
    keras = _keras()
    body = _KerasGraph(graph, variables)
    if graph.is_chain:
        layers = [body.layers[node.path] for node in graph.nodes[1:]]
        model = keras.Sequential([keras.Input(tuple(input_shape)), *head, *layers, *tail], name=name)
    else:
        inputs = x = keras.Input(tuple(input_shape))
        for layer in head:
            x = layer(x)
        x = body(x)
        for layer in tail:
            x = layer(x)
        model = keras.Model(inputs, x, name=name)
    body.set_weights()
    return model


def to_keras(module: flax_nn.Module, variables: Mapping[str, Any], input_shape: Sequence[int]) -> Any:
    """A Keras model with the layers, weights and dataflow of a Flax model of ``cnnlab.nn`` layers.

    A chain of layers (StridedNet, SimpleCNN, a :class:`Sequential`) becomes a
    ``keras.Sequential``; a model with skip connections or branches (ResNet's residual sums,
    Inception's concatenated branches) a functional ``keras.Model`` with ``Add`` and
    ``Concatenate`` layers where the Flax model sums or concatenates layer outputs
    (:func:`cnnlab.layer_graph.trace` reads them from the model's jaxpr).

    Args:
      module: a Flax model whose ``__call__`` applies ``cnnlab.nn`` layers, possibly inside its
        own submodules, and between them only ``x + y``, ``jnp.concatenate``, float casts and
        activation functions (``jax.nn.relu``, ...); it is traced once, not run.
      variables: its ``{"params", "batch_stats"}``.
      input_shape: one example's shape, e.g. ``(96, 96, 3)``.

    Returns:
      A built Keras model whose ``model(x, training=False)`` equals
      ``module.apply(variables, x, training=False)`` (in float32).

    Raises:
      InteropError: a layer without a Keras equivalent, an argument Keras lacks, or an
        operation between layers that Keras has no layer for, naming it.
    """
    return _keras_model(_graph(module, variables, input_shape), variables, input_shape)


# --------------------------------------------------------------------------- Keras -> cnnlab


def _chain(keras_model: Any) -> list[Any]:
    """The layers of a Sequential or single-path functional Keras model, in order."""
    keras = _keras()
    if not keras_model.built or not getattr(keras_model, "inputs", None):
        raise InteropError("from_keras: build the model first (give it a keras.Input).")
    if len(keras_model.inputs) != 1 or len(keras_model.outputs) != 1:
        raise InteropError("from_keras: only models with one input and one output are supported.")
    layers = [layer for layer in keras_model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if isinstance(keras_model, keras.Sequential):  # a chain by construction
        return layers
    previous = keras_model.inputs[0]
    for layer in layers:
        try:
            ok = layer.input is previous
        except (AttributeError, ValueError):  # a shared layer or one with several inputs
            ok = False
        if not ok:
            raise InteropError(f"from_keras: {type(layer).__name__} layer {layer.name!r} does not take "
                               "the previous layer's output; only chains of layers are supported.")
        previous = layer.output
    if keras_model.outputs[0] is not previous:
        raise InteropError("from_keras: the model's output is not its last layer's output.")
    return layers


def from_keras(keras_model: Any) -> tuple[flax_nn.Module, dict[str, Any]]:
    """A cnnlab module and its variables for a Keras 3 model.

    A chain of Keras layers (the tutorial's StridedNet) becomes a :class:`Sequential` of
    ``cnnlab.nn`` layers with variables ``layers_<i>``; any other model (branches, merges,
    shared layers, nested models, ``keras.ops`` arithmetic: the ``keras.applications``) a
    :class:`cnnlab.keras_graph.KerasGraph` with variables under the Keras layers' names
    (:func:`cnnlab.keras_graph.import_model`).

    Args:
      keras_model: a built Keras model.

    Returns:
      ``(module, {"params", "batch_stats"})`` with Keras' weights and BatchNormalization
      statistics; ``module.apply(variables, x)`` equals ``keras_model(x, training=False)``,
      and with ``training=True, mutable=["batch_stats"]`` ``keras_model(x, training=True)``.

    Raises:
      InteropError: the unsupported layers, each class with its count and first layer name.
    """
    try:
        return _from_chain(keras_model)
    except InteropError:  # not a chain, or layers or weights only the graph import has
        return keras_graph.import_model(keras_model)


def compare_with_keras(keras_model: Any, module: flax_nn.Module, variables: Mapping[str, Any],
                       inputs: Any) -> dict[str, float]:
    """How far an imported model's outputs are from Keras': ``{"inference": r, "training": r}``,
    each ``max|cnnlab - keras| / max|keras|`` over the outputs on ``inputs`` (an array, or a list
    for several inputs), in inference mode and in training mode (batch statistics; dropout is
    random on both sides, so set a Keras model's dropout rates to 0 before importing it to
    compare training mode). Both sides run as one jitted XLA program each (Keras through
    ``stateless_call``), so the differences are rounding, not op-by-op dispatch."""
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    infer = jax.jit(lambda v, xs: module.apply(v, *xs))(variables, inputs)
    train, _ = jax.jit(lambda v, xs: module.apply(v, *xs, training=True, mutable=["batch_stats"]))(
        variables, inputs)
    trainable = [w.value for w in keras_model.trainable_variables]
    frozen = [w.value for w in keras_model.non_trainable_variables]

    @functools.partial(jax.jit, static_argnums=1)
    def keras_out(xs, training):
        return keras_model.stateless_call(trainable, frozen, xs if len(xs) > 1 else xs[0],
                                          training=training)[0]

    def rel(got, expected):
        got, expected = np.asarray(got), np.asarray(expected)
        if got.shape != expected.shape:
            raise InteropError(f"compare_with_keras: output shape {got.shape} here, {expected.shape} in Keras")
        return float(np.max(np.abs(got - expected)) / max(float(np.max(np.abs(expected))), 1e-30))

    out = {}
    for mode, got in (("inference", infer), ("training", train)):
        expected = keras_out(inputs, mode == "training")
        pairs = zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected), strict=True)
        out[mode] = max(rel(g, e) for g, e in pairs)
    return out


def _from_chain(keras_model: Any) -> tuple[Sequential, dict[str, Any]]:
    chain = _chain(keras_model)
    layers = [_cnnlab_layer(keras_layer) for keras_layer in chain]
    params, stats = {}, {}
    for i, keras_layer in enumerate(chain):
        for w in keras_layer.weights:
            target = stats if w.name in _STATS else params
            target.setdefault(f"layers_{i}", {})[w.name] = jnp.asarray(np.asarray(w.numpy()))
    module = Sequential(tuple(layers))
    variables = {"params": params, "batch_stats": stats}
    input_shape = tuple(keras_model.inputs[0].shape[1:])
    if None not in input_shape:  # a cnnlab layer that names or shapes a weight differently fails here
        expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, *input_shape), jnp.float32))
        shapes = jax.tree_util.tree_map(lambda a: a.shape, {k: expected.get(k, {}) for k in variables})
        if shapes != jax.tree_util.tree_map(lambda a: a.shape, variables):
            raise InteropError(f"from_keras: the cnnlab layers' weights {shapes} differ from Keras'.")
    return module, variables


# --------------------------------------------------------------------------- cnnlab export

#: Pillow's filters (``data.resample``) by the Keras ``Resizing`` interpolation closest to them.
_INTERPOLATION = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic",
                  "lanczos": "lanczos3", "box": "area", "hamming": "bilinear"}


#: The name of the trained network nested in a ``cnnlab export`` Keras file.
EXPORT_BODY = "cnnlab_model"


def export_keras(workdir: str, path: str, *, which: str = "best") -> Any:
    """Writes a run as a Keras 3 file: ``Resizing`` to ``data.image_size``, the training
    normalization (``Rescaling``, and ``Normalization`` for ``mean_std``), the model as one
    nested Keras model named :data:`EXPORT_BODY` (averaged with its output on the mirrored
    images where the run sets ``eval_flip``), a softmax. ``config.init_from`` takes the nested
    model alone (:func:`trained_network`).

    It takes uint8 or float 0..255 ``[N, H, W, 3]`` images of any size; on images of the run's
    size its probabilities equal ``cnnlab.load_run(workdir, which=which).predict``'s. Other sizes
    are resized by Keras' filter of the same name (antialiased), close to but not bit-equal with
    Pillow's. Returns the Keras model.
    """
    keras = _keras()
    from cnnlab.inference import check_exportable_views, load_run

    if not str(path).endswith(".keras"):
        raise InteropError(f"export: {path!r} must end in .keras (Keras 3's model format).")
    run = load_run(workdir, which=which)
    check_exportable_views(run.config)
    pre = run.preprocessing
    height, width = pre["image_size"]
    head = [keras.layers.Resizing(height, width, interpolation=_INTERPOLATION[pre["resample"]],
                                  crop_to_aspect_ratio=pre["resize"] == "crop",
                                  pad_to_aspect_ratio=pre["resize"] == "pad",
                                  fill_value=float(pre["pad_value"]), antialias=True),
            keras.layers.Rescaling(1.0 / 255.0)]
    if pre["normalization"] == "mean_std":
        head.append(keras.layers.Normalization(mean=pre["mean"], variance=np.square(pre["std"])))
    graph = _graph(run.model, run.variables, (height, width, 3))
    # The trained network is one nested model (EXPORT_BODY), which init_from takes back alone.
    body = _keras_model(graph, run.variables, (height, width, 3), name=EXPORT_BODY)
    images = keras.Input((None, None, 3))
    x = images
    for layer in head:
        x = layer(x)
    logits = body(x)
    if run.config.get("eval_flip", False):  # the run's test-time mirror averaging, as run.predict
        logits = keras.layers.Average()([logits, body(keras.ops.flip(x, axis=2))])
    keras_model = keras.Model(images, keras.layers.Activation("softmax")(logits))
    keras_model.save(path)
    return keras_model


def trained_network(keras_model: Any) -> Any:
    """The trained network of a ``cnnlab export`` file (its nested :data:`EXPORT_BODY` model,
    without the preprocessing head, mirror averaging and softmax around it); any other Keras
    model as it is."""
    nested = [layer for layer in keras_model.layers if layer.name == EXPORT_BODY]
    return nested[0] if len(nested) == 1 else keras_model


def export_main(argv: list[str]) -> None:
    """``cnnlab export --workdir=RUN [--which=best|latest] [--format=keras|onnx] OUT``.

    ``--format=onnx`` without its extra installed exits with code 2 and one line saying how to
    install it (:mod:`cnnlab.onnx_export`)."""
    parser = argparse.ArgumentParser(
        prog="cnnlab export",
        description="Write a trained run as a model file of another library (normalization, "
                    "test-time flip and softmax included; the Keras file also resizes).")
    parser.add_argument("--workdir", required=True, help="run directory written by `cnnlab train`")
    parser.add_argument("--which", choices=("best", "latest"), default="best",
                        help="checkpoint to export (best falls back to latest when there is none)")
    parser.add_argument("--format", choices=("keras", "onnx"), default="keras",
                        help="file format: keras (Keras 3, OUT.keras) or onnx (OUT.onnx)")
    parser.add_argument("output", metavar="OUT", help="file to write (OUT.keras or OUT.onnx)")
    args = parser.parse_args(argv)
    if args.format == "onnx":
        from cnnlab import onnx_export

        try:
            onnx_export.check_installed()
        except ImportError as err:
            print(f"cnnlab export: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        onnx_export.export_onnx(args.workdir, args.output, which=args.which)
        print(f"Wrote {args.output} (ONNX; input 'images': float32 [batch, height, width, 3] RGB "
              "0..255 at the run's image size; output 'probabilities' in the order of the run's "
              "classes.json).")
        return
    export_keras(args.workdir, args.output, which=args.which)
    print(f"Wrote {args.output} (Keras 3; input: uint8 RGB images of any size; output: class "
          "probabilities in the order of the run's classes.json).")
