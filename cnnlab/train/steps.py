"""The train state and the pure ``train_step``/``eval_step`` functions (jitted by the trainer).

Everything a step needs happens on device: augmentation, normalization, forward pass, loss
with the layers' sown penalties, backward pass, optimizer update, constraint projection, and
metric accumulation. A step with a non-finite loss leaves the state unchanged and records its
step number in ``state.nonfinite_step``, so the trainer can stop with the last good state.

The function that builds one trial's step is chosen by name (``config.train_step``, default
``"default"``: :func:`make_train_step`); a user registers another with :func:`register_step`
(same signature), and packing wraps whichever is chosen over the trials, e.g.::

    @register_step("with_param_norm")
    def make_step(model, tx, **kwargs):
        step = make_train_step(model, tx, **kwargs)

        def train_step(state, batch):
            state, metrics = step(state, batch)
            return state, {**metrics, "param_norm": optax.tree.norm(state.params)}

        return train_step

The returned metrics are logged in the per-step records (``metrics.jsonl``, TensorBoard).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import optax

from cnnlab import nn
from cnnlab._registry import Registry
from cnnlab.train import losses
from cnnlab.train import metrics as metrics_lib

Array = jax.Array
Batch = dict[str, Array]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; checkpointed whole for exact resume.

    ``rng`` is a raw ``uint32[2]`` key (serializable); per-step keys are ``fold_in(rng, step)``,
    so a resumed run draws the same randomness. ``epoch_sums`` accumulates the current epoch's
    training loss/accuracy on device (:func:`zero_sums`), and the loss's own metrics if it
    reports any.
    """

    step: Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: Array
    epoch_sums: dict[str, Array]
    nonfinite_step: Array


def zero_sums(loss_metrics: Sequence[str] = ()) -> dict[str, Any]:
    """``{"loss", "correct", "count"}`` at zero, plus ``"loss_metrics": {name: 0}`` for the
    metrics a loss reports (:func:`cnnlab.train.losses.metric_names`); a loss without metrics
    has exactly the sums of runs recorded before losses could report metrics, so they resume."""
    sums: dict[str, Any] = {
        "loss": jnp.zeros((), jnp.float32),
        "correct": jnp.zeros((), jnp.float32),
        "count": jnp.zeros((), jnp.float32),
    }
    if loss_metrics:
        sums["loss_metrics"] = {m: jnp.zeros((), jnp.float32) for m in loss_metrics}
    return sums


def create_train_state(
    model: flax_nn.Module,
    tx: optax.GradientTransformation,
    *,
    seed: int,
    image_shape: tuple[int, ...],
    loss_metrics: Sequence[str] = (),
) -> TrainState:
    """Initializes parameters, batch statistics and optimizer state from ``seed``; the epoch
    sums hold ``loss_metrics`` too (:func:`zero_sums`)."""
    rng = jax.random.PRNGKey(seed)
    init_rng, train_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init({"params": init_rng, "dropout": init_rng}, dummy, training=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=train_rng,
        epoch_sums=zero_sums(loss_metrics),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def chunk_unroll() -> bool | int:
    """``unroll`` for the ``lax.scan`` that runs ``steps_per_dispatch`` steps in one call.

    Fully unrolled on CPU: XLA's CPU backend runs convolutions inside a loop body about 25x
    slower than at the top level of a program (8 vs 192 images/s for StridedNet, see
    experiments/bench/README.md); a rolled loop elsewhere, so compile time does not grow with
    the chunk.
    """
    return True if jax.default_backend() == "cpu" else 1


def make_train_step(
    model: flax_nn.Module,
    tx: optax.GradientTransformation,
    *,
    num_classes: int,
    preprocess: Callable[[Array, Array, Array], tuple[Array, Array]],
    constraints: nn.penalties.ConstraintMap,
    label_smoothing: float = 0.0,
    loss_fn: losses.LossFn | None = None,
    loss_inputs: Callable[[Array], dict[str, Array]] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Any]]]:
    """Builds ``train_step(state, batch) -> (state, metrics)``.

    ``preprocess(key, images_uint8, int_labels) -> (float images, soft labels [B, K])`` does the
    on-device augmentation and normalization (mixup/cutmix may change the labels).
    ``loss_fn(float32 logits, targets, **inputs)`` is the per-example loss ``[B]``, or
    ``([B], {metric: [B]})`` (:func:`cnnlab.train.losses.make_loss`; default: softmax
    cross-entropy); ``loss_inputs(images) -> {keyword: [B, ...]}`` computes its extra inputs
    from the preprocessed images, without gradient (a teacher's logits). The metrics' ``ce`` is
    the loss's batch mean, ``loss`` that plus the penalties; the loss's own metrics are batch
    means in ``metrics["loss_metrics"]`` and are summed over the epoch in
    ``state.epoch_sums["loss_metrics"]`` (which must hold the same names: :func:`zero_sums`).
    """
    per_example_loss = loss_fn or optax.softmax_cross_entropy

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        step_rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, dropout_rng = jax.random.split(step_rng)
        labels = batch["label"]
        images, targets = preprocess(aug_rng, batch["image"], labels)
        # Training accuracy is scored against each example's dominant label: its own without
        # mixup/cutmix, the larger share of the mix with them.
        dominant = jnp.argmax(targets, -1)
        if label_smoothing:
            targets = optax.smooth_labels(targets, label_smoothing)
        extra = jax.lax.stop_gradient(loss_inputs(images)) if loss_inputs is not None else {}
        declared = sorted(state.epoch_sums.get("loss_metrics", {}))

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                training=True,
                rngs={"dropout": dropout_rng},
                mutable=["batch_stats", nn.LOSSES],
            )
            per_example, reported = losses.split_output(
                per_example_loss(logits.astype(jnp.float32), targets, **extra))
            if sorted(reported) != declared:
                raise ValueError(
                    f"the loss reports metrics {sorted(reported)}, but the train state sums "
                    f"{declared}: declare them with losses.register(..., metrics=...)")
            ce = jnp.mean(per_example)
            means = {m: jnp.mean(v) for m, v in reported.items()}
            penalty = nn.regularization_loss(updates.get(nn.LOSSES))
            return ce + penalty, (ce, means, logits, updates.get("batch_stats", {}))

        (loss, (ce, means, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = nn.apply_constraints(optax.apply_updates(state.params, updates), constraints)

        finite = jnp.isfinite(loss)
        correct = jnp.sum(jnp.argmax(logits, -1) == dominant).astype(jnp.float32)
        count = jnp.asarray(labels.shape[0], jnp.float32)
        sums = {
            "loss": state.epoch_sums["loss"] + ce * count,
            "correct": state.epoch_sums["correct"] + correct,
            "count": state.epoch_sums["count"] + count,
        }
        if means:
            sums["loss_metrics"] = {m: state.epoch_sums["loss_metrics"][m] + v * count
                                    for m, v in means.items()}
        new = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            epoch_sums=sums,
        )
        # A non-finite loss keeps the previous (good) state and records where it happened.
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, state)
        new = new.replace(
            nonfinite_step=jnp.where(
                (~finite) & (state.nonfinite_step < 0), state.step, state.nonfinite_step
            )
        )
        metrics = {"loss": loss, "ce": ce, "accuracy": correct / count}
        if means:
            metrics["loss_metrics"] = means
        return new, metrics

    return train_step


#: Builders of one trial's train step by name (``config.train_step``); same signature as
#: :func:`make_train_step`.
STEPS = Registry("train step", {"default": make_train_step})


def register_step(name: str) -> Callable[[Callable], Callable]:
    """Decorator registering a train-step builder (the signature of :func:`make_train_step`)
    as ``config.train_step = name``; packing wraps it over packed trials as it wraps the
    default (see the module docstring)."""

    def decorator(make_step: Callable) -> Callable:
        STEPS.register(name, make_step, module=make_step.__module__)
        return make_step

    return decorator


def make_eval_step(
    model: flax_nn.Module,
    *,
    num_classes: int,
    normalize: Callable[[Array], Array],
    metrics: Sequence[str] = metrics_lib.DEFAULT_METRICS,
    flip: bool = False,
    views: str = "single",
) -> Callable[[Any, Any, Batch], dict[str, Array]]:
    """Builds ``eval_step(params, batch_stats, batch) -> sums`` over the masked batch: the sums
    of the registered ``metrics`` plus ``count`` and the confusion matrix ``[true, predicted]``,
    so a split's metrics count every image exactly once. ``flip``, ``views``:
    :func:`eval_logits`'s test-time augmentation."""

    def eval_step(params, batch_stats, batch: Batch) -> dict[str, Array]:
        logits = eval_logits(model, {"params": params, "batch_stats": batch_stats},
                             normalize(batch["image"]), flip=flip, views=views)
        return metrics_lib.batch_sums(metrics, logits, batch["label"],
                                      batch["mask"].astype(jnp.float32), num_classes)

    return eval_step


#: ``eval_views``: the crops, as ``(top, left, size)`` fractions of the image, each resized back
#: to the image size: the image alone, its four corners and centre at 87.5%, or its centre at
#: 100%, 90% and 80% (three scales).
EVAL_VIEWS = {
    "single": ((0.0, 0.0, 1.0),),
    "crops5": tuple((t, left, 0.875) for t, left in ((0.0, 0.0), (0.0, 0.125), (0.125, 0.0),
                                                   (0.125, 0.125), (0.0625, 0.0625))),
    "scales3": ((0.0, 0.0, 1.0), (0.05, 0.05, 0.9), (0.1, 0.1, 0.8)),
}


def view_images(images: Array, views: str) -> list[Array]:
    """The ``eval_views`` crops of ``[N, H, W, C]`` images, each resized (bilinear, antialiased)
    back to ``H x W``."""
    if views not in EVAL_VIEWS:
        raise ValueError(f"eval_views={views!r}: expected one of {', '.join(EVAL_VIEWS)}")
    _, h, w, _ = images.shape
    out = []
    for top, left, size in EVAL_VIEWS[views]:
        if size == 1.0:
            out.append(images)
            continue
        y, x = int(round(top * h)), int(round(left * w))
        ch, cw = int(round(size * h)), int(round(size * w))
        crop = images[:, y:y + ch, x:x + cw]
        out.append(jax.image.resize(crop, images.shape, "bilinear").astype(images.dtype))
    return out


def eval_logits(model: flax_nn.Module, variables: Any, images: Array, *, flip: bool = False,
                views: str = "single") -> Array:
    """float32 inference logits of ``[N, H, W, C]`` images, averaged over the test-time views:
    ``views`` (``config.eval_views``: :data:`EVAL_VIEWS` crops) and, with ``flip``
    (``config.eval_flip``), each one's left-right mirror."""
    total, count = None, 0
    for view in view_images(images, views):
        for x in ((view, view[:, :, ::-1]) if flip else (view,)):
            logits = model.apply(variables, x, training=False).astype(jnp.float32)
            total = logits if total is None else total + logits
            count += 1
    return total if count == 1 else total / count
