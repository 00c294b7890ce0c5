"""Model ``keras``: a Keras 3 ``.keras`` file (architecture and weights) trained by cnnlab.

    cnnlab train --config=configs/smoke.py --config.model.name=keras \
        --config.model.kwargs.path=model.keras --workdir=runs/keras

The file's graph is replayed with ``cnnlab.nn`` layers (:mod:`cnnlab.keras_graph`: any
functional, Sequential or nested model of the layers the ``keras.applications`` use); the
variables carry the Keras layers' names. Logits: a final softmax (an ``Activation("softmax")``
or ``Softmax`` layer, or the ``activation`` of the last ``Dense``) is dropped, since cnnlab's
losses take logits. Output size: it must equal ``num_classes`` (the data's classes), else an
error says so; with ``new_head=True`` a last ``Dense`` of another size is replaced by a fresh
one (``num_classes`` units, the Dense's initializers, drawn from the run's seed).

Initial weights: ``model.init`` returns the file's weights (the fresh head aside), so a run, its
resumes, packed trials and ``cnnlab.load_run`` need nothing but ``model.kwargs.path``; the
file must stay where the config says. BatchNormalization keeps the file's momentum and epsilon.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as flax_nn
import jax
import jax.numpy as jnp

from cnnlab import keras_graph
from cnnlab.models.registry import register


def check_keras_path(path: Any) -> str | None:
    """``None`` for an existing ``.keras`` file, else why not (the config check of
    ``model.kwargs.path``, so a bad path is refused before the run records anything)."""
    if not path:
        return "is required: the .keras file to train (architecture and weights)"
    if not str(path).endswith(".keras"):
        return "must be a .keras file, as Keras 3's model.save writes"
    if not os.path.isfile(path):
        return "no such file"
    return None


_CHECKED = {"check": check_keras_path}


def _is_softmax(node: keras_graph.Node) -> bool:
    if node.kind == "Softmax":
        return True
    return node.kind == "Activation" and node.config.get("activation") in ("softmax", {"class_name": "softmax"})


def classifier_graph(graph: keras_graph.Graph, num_classes: int, new_head: bool) -> keras_graph.Graph:
    """``graph`` giving ``num_classes`` logits: its final softmax dropped and, with
    ``new_head``, a last Dense of another size replaced by one of ``num_classes`` units whose
    file weights are dropped (so ``init`` draws them)."""
    if graph.num_inputs != 1 or not isinstance(graph.outputs, keras_graph.Ref):
        raise ValueError(f"model 'keras': {graph.name!r} must have one input and one output, "
                         f"not {graph.num_inputs} and {graph.outputs!r}.")
    nodes, weights, out = list(graph.nodes), graph.weights, graph.outputs
    last = graph.output_node()
    if last is not None and _is_softmax(last) and isinstance(last.args[0], keras_graph.Ref):
        out = last.args[0]
        last = nodes[out.node] if out.node >= 0 else None
    if last is not None and last.kind == "Dense":
        config = dict(last.config)
        if config.get("activation") == "softmax":
            config["activation"] = None
        if config["units"] != num_classes:
            if not new_head:
                raise ValueError(
                    f"model 'keras': the file's last Dense {last.name!r} has {config['units']} units "
                    f"but the data has num_classes={num_classes}; set model.kwargs.new_head=True to "
                    "replace it by a fresh Dense of num_classes units.")
            config["units"] = num_classes
            params = {k: v for k, v in weights["params"].items() if k != last.name}
            weights = {**weights, "params": params}
        nodes[out.node] = dataclasses.replace(last, config=config)
    return dataclasses.replace(graph, nodes=tuple(nodes), outputs=out, weights=weights)


def _overlay(variables: Any, weights: Mapping[str, Any], where: str = "") -> Any:
    """``variables`` with every array of ``weights`` put in place (same names and shapes)."""
    out = dict(variables)
    for key, value in weights.items():
        if key not in out:
            raise ValueError(f"model 'keras': the file has weights {where}{key} the model lacks.")
        if isinstance(value, Mapping):
            out[key] = _overlay(out[key], value, f"{where}{key}/")
        else:
            if tuple(out[key].shape) != tuple(value.shape):
                raise ValueError(f"model 'keras': {where}{key} has shape {value.shape} in the file, "
                                 f"{out[key].shape} in the model.")
            out[key] = jnp.asarray(value, out[key].dtype)
    return out


@register("keras")
class KerasFile(flax_nn.Module):
    """A ``.keras`` file's model mapping ``[N, H, W, C]`` images to ``num_classes`` logits."""

    num_classes: int
    path: str = dataclasses.field(default="", metadata=_CHECKED)  # the .keras file to train (required)
    new_head: bool = False  # replace a last Dense whose size is not num_classes by a fresh one
    dtype: Any = None  # compute dtype (set by mixed_precision; parameters stay float32)

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("model 'keras' needs model.kwargs.path, the .keras file to train.")
        super().__post_init__()

    def graph(self) -> keras_graph.Graph:
        """The file's graph, made to give ``num_classes`` logits (:func:`classifier_graph`)."""
        return classifier_graph(keras_graph.load_graph(self.path), self.num_classes, self.new_head)

    @flax_nn.compact
    def __call__(self, x: jax.Array, training: bool = False) -> jax.Array:
        y = keras_graph.replay(self.graph(), (x,), training=training, dtype=self.dtype)
        if y.ndim != 2 or y.shape[-1] != self.num_classes:
            raise ValueError(f"model 'keras': the file's model gives outputs of shape {y.shape[1:]}, "
                             f"not ({self.num_classes},) logits for num_classes={self.num_classes}.")
        return y.astype(jnp.float32)

    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Flax's ``init``, then the file's weights in place of the drawn ones."""
        variables = flax.core.unfreeze(super().init(rngs, *args, **kwargs))
        weights = {k: v for k, v in self.graph().weights.items() if v}
        return _overlay(variables, weights)
