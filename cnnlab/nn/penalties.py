"""Regularization penalties and weight constraints, the way Keras applies them.

Keras adds a layer's weight and activity penalties to ``layer.losses`` and projects a weight
with its constraint after every optimizer update. In cnnlab, layers *sow* their penalties into
the ``"losses"`` collection on every call (sum them with :func:`regularization_loss`), and
declare their constraints, which :func:`collect_constraints` finds once and
:func:`apply_constraints` applies to a parameter tree after each update.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from cnnlab import constraints as constraints_lib
from cnnlab import regularizers as regularizers_lib

Array = jax.Array
ConstraintMap = dict[tuple[str, ...], Callable[[Array], Array]]

LOSSES = "losses"


def _keep_last(_previous: Any, value: Any) -> Any:
    return value


def _add(previous: Any, value: Any) -> Any:
    return previous + value


def _zero() -> Array:
    return jnp.zeros((), jnp.float32)


class PenaltiesMixin:
    """Shared by every cnnlab layer that owns weights: sows penalties, declares constraints.

    A subclass lists its weights in ``_weight_specs()`` as ``{param_name: (regularizer,
    constraint)}`` (identifiers as Keras accepts them).
    """

    def _weight_specs(self) -> Mapping[str, tuple[Any, Any]]:
        raise NotImplementedError

    def param_constraints(self) -> dict[str, Callable[[Array], Array]]:
        """``{param_name: constraint}`` for the weights that declared one."""
        found = {}
        for name, (_, constraint) in self._weight_specs().items():
            fn = constraints_lib.get(constraint)
            if fn is not None:
                found[name] = fn
        return found

    def sow_weight_penalties(self, params: Mapping[str, Array]) -> None:
        """Sows ``regularizer(weight)`` for each regularized weight (once per apply, as Keras)."""
        for name, (regularizer, _) in self._weight_specs().items():
            fn = regularizers_lib.get(regularizer)
            if fn is not None and name in params:
                value = jnp.asarray(fn(params[name]), jnp.float32)
                self.sow(LOSSES, f"{name}_regularizer", value, init_fn=_zero, reduce_fn=_keep_last)

    def sow_activity_penalty(self, activity_regularizer: Any, outputs: Array) -> None:
        """Sows ``regularizer(outputs) / batch_size`` (Keras 3 divides by the batch size)."""
        fn = regularizers_lib.get(activity_regularizer)
        if fn is None:
            return
        value = jnp.asarray(fn(outputs), jnp.float32)
        if outputs.ndim > 0 and outputs.shape[0]:
            value = value / outputs.shape[0]
        self.sow(LOSSES, "activity_regularizer", value, init_fn=_zero, reduce_fn=_add)


def l2_or_none(weight_decay: float | Array | None) -> dict[str, Any] | None:
    """The kernel regularizer of a model's ``weight_decay`` field: Keras' ``L2(weight_decay)``
    (``weight_decay * sum(w**2)``), or ``None`` (no penalty sown) for a Python zero. A traced
    ``weight_decay`` gives the same penalty as the same Python value."""
    if not isinstance(weight_decay, jax.Array) and not weight_decay:
        return None
    return {"class_name": "L2", "config": {"l2": weight_decay}}


def regularization_loss(losses: Mapping[str, Any] | None) -> Array:
    """Sums every penalty in a ``"losses"`` collection (what Keras adds from ``model.losses``)."""
    leaves = jax.tree_util.tree_leaves(losses or {})
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return sum(jnp.sum(leaf) for leaf in leaves)


def collect_constraints(module: nn.Module, *args: Any, **kwargs: Any) -> ConstraintMap:
    """Finds every constraint declared by the layers of ``module``.

    Traces ``module.init(key, *args, **kwargs)`` abstractly (no parameters are allocated) and
    returns ``{(*module_path, param_name): constraint}`` for use with
    :func:`apply_constraints`.
    """
    found: ConstraintMap = {}

    def interceptor(next_fun, call_args, call_kwargs, context):
        layer = context.module
        if context.method_name == "__call__" and isinstance(layer, PenaltiesMixin):
            for name, fn in layer.param_constraints().items():
                found[(*layer.scope.path, name)] = fn
        return next_fun(*call_args, **call_kwargs)

    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda: module.init(rngs, *args, **kwargs))
    return found


def apply_constraints(params: Mapping[str, Any], constraints: ConstraintMap) -> Any:
    """Projects each constrained weight of ``params`` (a ``params`` collection tree)."""
    if not constraints:
        return params
    flat = traverse_util.flatten_dict(params)
    for path, fn in constraints.items():
        if path not in flat:
            raise KeyError(f"Constrained parameter {'/'.join(path)} is not in the parameter tree.")
        flat[path] = fn(flat[path])
    return traverse_util.unflatten_dict(flat)
