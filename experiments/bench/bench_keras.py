"""Keras 3 ``model.fit`` / ``model.evaluate`` on the backend in ``KERAS_BACKEND`` (jax or
tensorflow; run.py sets it, and runs the TensorFlow one with the TensorFlow virtualenv).

The tutorial's model (as ``_keras_stridednet`` in tests/test_train.py: L2 5e-4 on conv kernels,
he_normal, softmax output) behind a ``Rescaling(1/255)`` layer, so it takes the uint8 batches
like the others; Adam 1e-4, categorical cross-entropy on integer labels
(``sparse_categorical_crossentropy``), accuracy. Defaults otherwise: ``jit_compile="auto"``,
``steps_per_execution=1``, ``shuffle=True``, numpy arrays in.

Timing: a callback marked ``async_safe`` (so Keras keeps its default asynchronous callback
dispatch and does not block the loop) records when each step's logs become available (Keras
converts them to floats in a worker thread, which waits for that step's result); windows and
the first step are read from those times.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def build(keras, classes: int, *, preprocessing=None, head_initializer: str = "glorot_uniform"):
    """The tutorial's StridedNet in Keras behind ``preprocessing`` layers (default:
    ``Rescaling(1/255)``, for uint8 batches); also used by experiments/sweeps/bench.py."""
    from keras import layers

    reg = keras.regularizers.l2(common.WEIGHT_DECAY)
    conv = dict(kernel_initializer="he_normal", kernel_regularizer=reg)
    if preprocessing is None:
        preprocessing = [layers.Rescaling(1.0 / 255)]
    m = keras.Sequential([keras.Input((96, 96, 3)), *preprocessing])
    m.add(layers.Conv2D(16, (7, 7), strides=(2, 2), padding="valid", **conv))
    for w in (32, 64, 128):
        m.add(layers.Conv2D(w, (3, 3), padding="same", **conv))
        m.add(layers.Activation("relu"))
        m.add(layers.BatchNormalization(axis=-1))
        m.add(layers.Conv2D(w, (3, 3), strides=(2, 2), padding="same", **conv))
        m.add(layers.Activation("relu"))
        m.add(layers.BatchNormalization(axis=-1))
        m.add(layers.Dropout(0.25))
    m.add(layers.Flatten())
    m.add(layers.Dense(512, kernel_initializer="he_normal"))
    m.add(layers.Activation("relu"))
    m.add(layers.BatchNormalization())
    m.add(layers.Dropout(0.5))
    m.add(layers.Dense(classes, kernel_initializer=head_initializer))
    m.add(layers.Activation("softmax"))
    return m


def main() -> None:
    args = common.parser(__doc__).parse_args()
    common.check_args(args)
    backend = os.environ.get("KERAS_BACKEND")
    if backend not in ("jax", "tensorflow"):
        raise SystemExit("set KERAS_BACKEND=jax or KERAS_BACKEND=tensorflow")
    t0 = time.perf_counter()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras

    import_s = time.perf_counter() - t0
    x_train, y_train, x_eval, y_eval = common.make_data(args)

    done_at: dict[int, float] = {}
    cpu_at: dict[int, float] = {}

    class StepTimes(keras.callbacks.Callback):
        async_safe = True  # keep Keras' asynchronous callback dispatch (its default)

        def on_train_batch_end(self, batch, logs=None):
            done_at[batch + 1] = time.perf_counter()  # logs are floats here: step done
            cpu_at[batch + 1] = common.cpu_seconds()

    t_build = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    model = build(keras, common.NUM_CLASSES)
    model.compile(optimizer=keras.optimizers.Adam(common.LEARNING_RATE),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x_train, y_train, batch_size=args.batch, epochs=1, verbose=0,
                        callbacks=[StepTimes()])
    n = args.warmup + args.steps
    if sorted(done_at) != list(range(1, n + 1)):
        raise RuntimeError(f"expected {n} step times, got {sorted(done_at)[:5]}...")
    first_step_s = done_at[1] - t_build
    train_rates = common.window_rates(done_at, args.batch, args.window, args.warmup, args.steps)

    def eval_pass():
        t = time.perf_counter()
        model.evaluate(x_eval, y_eval, batch_size=args.batch, verbose=0)
        return time.perf_counter() - t

    eval_first_s = eval_pass()
    eval_rates = [len(y_eval) / eval_pass() for _ in range(args.eval_repeats)]
    extra = {"keras": keras.__version__, "backend": backend,
             "final_loss": float(history.history["loss"][-1])}
    if backend == "jax":
        import jax

        extra["jax"] = jax.__version__
        extra["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    else:
        extra["tensorflow"] = tf.__version__
    common.report(f"keras-{backend}", args, import_s=import_s, first_step_s=first_step_s,
                  train_rates=train_rates, eval_rates=eval_rates, eval_first_s=eval_first_s,
                  train_cpu_ms_per_img=common.cpu_ms_per_image(cpu_at, args.batch, args.warmup, args.steps),
                  extra=extra)


if __name__ == "__main__":
    main()
