"""Knowledge distillation from a teacher run: the built-in loss ``loss.name = "distill"``.

    cnnlab train --config=configs/smoke.py --workdir=runs/student \\
        --config.loss.name=distill --config.loss.distill.teacher=runs/smoke

The student learns from the labels and from the teacher's softened predictions (Hinton et al.
2015, "Distilling the Knowledge in a Neural Network")::

    loss = (1 - weight) * CE(student, targets) + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

``T`` is ``loss.distill.temperature``; ``T^2`` keeps the distillation term's gradients on the
scale of the cross-entropy's as ``T`` changes. The teacher is any cnnlab run with a checkpoint
(``loss.distill.which``: its best or its latest), for the same classes and image size; it sees
the student's augmented images, normalized its own way (its ``preprocessing.json``), in
inference mode, without gradient. Besides ``train/loss`` the run logs ``train/ce`` and
``train/kd`` (the KL divergence, without ``T^2``). Temperature and weight are traceable: packed
sweep trials may differ in them (and share one copy of the teacher's weights).

It is written as any loss needing extra inputs is (:mod:`cnnlab.train.losses`): a setup that
loads the teacher once, and a loss that receives its logits.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnlab.data.config import image_hw
from cnnlab.schema import Field, greater_than, in_range, invalid
from cnnlab.train import losses
from cnnlab.train.experiment import load_trained

TEACHER_KEY = "loss.distill.teacher"


def _renormalize(student: dict[str, Any], teacher: dict[str, Any]):
    """``images -> images``: from the student's normalization to the teacher's (records of
    :func:`cnnlab.train.experiment.normalization_record`; each is affine per channel); the
    teacher's own arithmetic when the student's is ``scale``, the identity when they agree."""
    if student == teacher:
        return lambda x: x

    def stats(record):
        return (np.asarray(record["mean"], np.float32), np.asarray(record["std"], np.float32))

    def to_unit(x):  # back to x / 255
        if student["normalization"] == "scale":
            return x
        mean, std = stats(student)
        return x * std + mean

    def convert(x):
        unit = to_unit(x)
        if teacher["normalization"] == "scale":
            return unit
        mean, std = stats(teacher)
        return (unit - mean) / std

    return convert


def setup_teacher(config: Any, *, num_classes: int, image_shape: tuple[int, ...],
                  normalization: dict[str, Any]) -> losses.LossInputs:
    """Loads the teacher run (``loss.distill.teacher``) for the student's ``config``: its
    model, the weights of its ``loss.distill.which`` checkpoint, and its normalization;
    ``apply(variables, images) -> {"teacher_logits": float32 [B, num_classes]}``.

    Raises:
      ConfigError: naming ``loss.distill.teacher``, when it is no cnnlab run with a checkpoint,
        or was trained for another number of classes or another image size.
    """
    values = losses.loss_values(config)
    path = values["teacher"]
    try:
        trained = load_trained(path, which=values["which"])
    except (OSError, ValueError) as e:
        raise invalid(TEACHER_KEY, path, f"not a cnnlab run directory with a checkpoint: {e}") from None
    if len(trained.class_names) != num_classes:
        raise invalid(TEACHER_KEY, path, f"the teacher predicts {len(trained.class_names)} classes, "
                      f"the student {num_classes}")
    teacher_hw, student_hw = tuple(image_hw(trained.config.data.image_size)), tuple(image_shape[:2])
    if teacher_hw != student_hw:
        raise invalid(TEACHER_KEY, path, f"the teacher was trained on {teacher_hw} images, the "
                      f"student trains on {student_hw}")
    model, convert = trained.model, _renormalize(normalization, trained.normalization)

    def apply(variables: Any, images: jax.Array) -> dict[str, jax.Array]:
        logits = model.apply(variables, convert(images), training=False)
        return {"teacher_logits": logits.astype(jnp.float32)}

    return losses.LossInputs(apply, trained.variables)


@losses.register(
    "distill",
    metrics=("ce", "kd"),
    inputs=setup_teacher,
    teacher=Field(None, str, convert=os.path.abspath,
                  doc="the teacher: a cnnlab run directory (required; recorded as an absolute path)"),
    which=Field("best", str, choices=("best", "latest"), doc="the teacher's checkpoint"),
    temperature=Field(4.0, float, greater_than(0), "T: both distributions are softmax(logits / T)",
                      traceable=True),
    weight=Field(0.5, float, in_range(0, 1, hi_open=False),
                 "share of the distillation term: (1 - weight) * ce + weight * T^2 * kd", traceable=True),
)
def distill(logits: jax.Array, targets: jax.Array, *, teacher_logits: jax.Array, temperature: Any,
            weight: Any, teacher: str, which: str) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``((1 - weight) * ce + weight * T^2 * kd [B], {"ce", "kd"})`` of float32 logits ``[B, K]``,
    soft targets ``[B, K]`` and the teacher's logits ``[B, K]``: ``ce`` the cross-entropy with
    the targets, ``kd`` = KL(softmax(teacher / T) || softmax(student / T)). (``teacher`` and
    ``which`` are the setup's.)"""
    del teacher, which
    ce = optax.softmax_cross_entropy(logits, targets)
    log_p_teacher = jax.nn.log_softmax(teacher_logits / temperature)
    log_p_student = jax.nn.log_softmax(logits / temperature)
    kd = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return (1.0 - weight) * ce + weight * temperature**2 * kd, {"ce": ce, "kd": kd}
