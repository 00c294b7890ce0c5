"""Whole models between cnnlab and Keras 3 (an optional extra: ``pip install "cnnlab[keras]"``).

cnnlab's layers have Keras' names, arguments and weight layouts, so a chain of them maps one to
one onto a ``keras.Sequential``: :func:`to_keras` records the ``cnnlab.nn`` layer calls of a Flax
model, :func:`from_keras` rebuilds a Keras chain as a :class:`Sequential` of ``cnnlab.nn`` layers,
and ``cnnlab export`` (:func:`export_main`) writes a trained run as a ``.keras`` file with its
preprocessing and a softmax. Branches and skip connections (ResNet, Inception) are refused.

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
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnlab import backend, keras_graph
from cnnlab import nn as cnn
from cnnlab.keras_graph import InteropError

Array = jax.Array

#: cnnlab's fields that describe storage or compute precision, not the layer (exports compute
#: in float32), and the Keras config keys with the same role.
_CNNLAB_ONLY = ("parent", "name", "dtype", "param_dtype", "rng_collection")
_KERAS_ONLY = ("name", "trainable", "dtype", "input_shape", "batch_input_shape", "batch_shape")
_STATS = ("moving_mean", "moving_variance")


def _keras():
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


@dataclasses.dataclass
class _Call:
    layer: flax_nn.Module
    path: tuple[str, ...]
    inputs: Array
    outputs: Array

    @property
    def where(self) -> str:
        return f"{type(self.layer).__name__} at {'/'.join(self.path) or '<root>'}"


def _trace(module: flax_nn.Module, variables: Mapping[str, Any], input_shape: Sequence[int]) -> list[_Call]:
    """The ``cnnlab.nn`` layer calls of ``module`` on a random input, checked to form a chain."""
    calls: list[_Call] = []
    stack: list[list[int]] = []  # per open module call: [number of modules it called]

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        layer = context.module
        if stack:
            stack[-1][0] += 1
        path = tuple(layer.scope.path) if layer.scope else ()
        stack.append([0])
        try:
            out = next_fun(*args, **kwargs)
        finally:
            (children,) = stack.pop()
        if type(layer) in LAYERS.values():
            calls.append(_Call(layer, path, args[0], out))
        elif not children and stack:
            raise InteropError(
                f"to_keras: {type(layer).__module__}.{type(layer).__name__} at {'/'.join(path)} is not a "
                f"cnnlab layer with a Keras equivalent; those are {sorted(LAYERS)}.")
        return out

    x = jax.random.normal(jax.random.key(0), (1, *input_shape), jnp.float32)
    kwargs = {"training": False} if "training" in inspect.signature(type(module).__call__).parameters else {}
    with flax_nn.intercept_methods(interceptor):
        y = module.apply(variables, x, **kwargs)
    if not calls:
        raise InteropError(f"to_keras: {type(module).__name__} calls no cnnlab.nn layer.")
    previous = x
    for i, call in enumerate(calls):
        if not _same(call.inputs, previous):
            after = calls[i - 1].where if i else "the model input"
            raise InteropError(
                f"to_keras: the input of {call.where} is not the output of {after}: only chains of "
                "layers are supported, not skip connections, branches or array operations "
                "between layers.")
        previous = call.outputs
    if not _same(y, previous):
        raise InteropError(f"to_keras: {type(module).__name__}'s output is not the output of its last "
                           f"layer ({calls[-1].where}); only chains of layers are supported.")
    return calls


def _same(a: Any, b: Any) -> bool:
    return (isinstance(a, jax.Array) and isinstance(b, jax.Array) and a.shape == b.shape
            and bool(jnp.array_equal(a.astype(jnp.float32), b.astype(jnp.float32))))


def _layer_weights(variables: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Array]:
    out: dict[str, Array] = {}
    for collection in ("params", "batch_stats"):
        tree = variables.get(collection, {})
        for key in path:
            tree = tree.get(key, {}) if isinstance(tree, Mapping) else {}
        out.update(tree)
    return out


def _keras_layers(module, variables, input_shape) -> list[tuple[Any, dict[str, Array]]]:
    """``[(unbuilt Keras layer, its weights by Keras name)]`` for the chain of ``module``."""
    keras = _keras()
    out = []
    for call in _trace(module, variables, input_shape):
        where = f"to_keras: {call.where}"
        keras_cls = getattr(keras.layers, type(call.layer).__name__)
        try:
            layer = keras_cls(**_keras_arguments(call.layer, keras_cls, where))
        except (TypeError, ValueError) as err:
            raise InteropError(f"{where}: Keras refuses its arguments: {err}") from None
        out.append((layer, _layer_weights(variables, call.path)))
    return out


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


def _keras_sequential(input_shape, head, layers, tail=()) -> Any:
    keras = _keras()
    model = keras.Sequential([keras.Input(tuple(input_shape)), *head, *(k for k, _ in layers), *tail])
    for layer, arrays in layers:
        _set_weights(layer, arrays)
    return model


def to_keras(module: flax_nn.Module, variables: Mapping[str, Any], input_shape: Sequence[int]) -> Any:
    """A ``keras.Sequential`` with the layers and weights of a chain of ``cnnlab.nn`` layers.

    Args:
      module: a Flax model whose ``__call__`` applies ``cnnlab.nn`` layers one after another
        (StridedNet, SimpleCNN, a :class:`Sequential`); it is run once to record them.
      variables: its ``{"params", "batch_stats"}``.
      input_shape: one example's shape, e.g. ``(96, 96, 3)``.

    Returns:
      A built Keras model whose ``model(x, training=False)`` equals
      ``module.apply(variables, x, training=False)`` (in float32).

    Raises:
      InteropError: a layer without a Keras equivalent, an argument Keras lacks, or a model that
        is not a chain (a skip connection or branch), naming it.
    """
    return _keras_sequential(input_shape, (), _keras_layers(module, variables, input_shape))


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


def export_keras(workdir: str, path: str, *, which: str = "best") -> Any:
    """Writes a run as a Keras 3 file: ``Resizing`` to ``data.image_size``, the training
    normalization (``Rescaling``, and ``Normalization`` for ``mean_std``), the model (averaged
    with its output on the mirrored images where the run sets ``eval_flip``), a softmax.

    It takes uint8 or float 0..255 ``[N, H, W, 3]`` images of any size; on images of the run's
    size its probabilities equal ``cnnlab.load_run(workdir, which=which).predict``'s. Other sizes
    are resized by Keras' filter of the same name (antialiased), close to but not bit-equal with
    Pillow's. Returns the Keras model.
    """
    keras = _keras()
    from cnnlab.inference import load_run

    if not str(path).endswith(".keras"):
        raise InteropError(f"export: {path!r} must end in .keras (Keras 3's model format).")
    run = load_run(workdir, which=which)
    pre = run.preprocessing
    height, width = pre["image_size"]
    head = [keras.layers.Resizing(height, width, interpolation=_INTERPOLATION[pre["resample"]],
                                  crop_to_aspect_ratio=pre["resize"] == "crop",
                                  pad_to_aspect_ratio=pre["resize"] == "pad",
                                  fill_value=float(pre["pad_value"]), antialias=True),
            keras.layers.Rescaling(1.0 / 255.0)]
    if pre["normalization"] == "mean_std":
        head.append(keras.layers.Normalization(mean=pre["mean"], variance=np.square(pre["std"])))
    layers = _keras_layers(run.model, run.variables, (height, width, 3))
    if not run.config.get("eval_flip", False):
        keras_model = _keras_sequential((None, None, 3), head, layers, [keras.layers.Activation("softmax")])
    else:  # the run's test-time mirror averaging (config.eval_flip), as run.predict does
        body = _keras_sequential((height, width, 3), (), layers)
        images = keras.Input((None, None, 3))
        x = images
        for layer in head:
            x = layer(x)
        logits = keras.layers.Average()([body(x), body(keras.ops.flip(x, axis=2))])
        keras_model = keras.Model(images, keras.layers.Activation("softmax")(logits))
    keras_model.save(path)
    return keras_model


def export_main(argv: list[str]) -> None:
    """``cnnlab export --workdir=RUN [--which=best|latest] [--format=keras] OUT.keras``."""
    parser = argparse.ArgumentParser(
        prog="cnnlab export",
        description="Write a trained run as a model file of another library (preprocessing and "
                    "softmax included).")
    parser.add_argument("--workdir", required=True, help="run directory written by `cnnlab train`")
    parser.add_argument("--which", choices=("best", "latest"), default="best",
                        help="checkpoint to export (best falls back to latest when there is none)")
    parser.add_argument("--format", choices=("keras",), default="keras", help="file format: keras (Keras 3)")
    parser.add_argument("output", metavar="OUT.keras", help="file to write")
    args = parser.parse_args(argv)
    export_keras(args.workdir, args.output, which=args.which)
    print(f"Wrote {args.output} (Keras 3; input: uint8 RGB images of any size; output: class "
          "probabilities in the order of the run's classes.json).")
