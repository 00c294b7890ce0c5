"""A hand-written Flax linen + optax training loop: what a JAX user writes without cnnlab.

StridedNet with flax.linen.Conv/BatchNorm/Dense/Dropout, optax.adam(1e-4), L2 5e-4 on conv
kernels added to the loss, softmax cross-entropy on logits, one ``jax.jit`` train step with
the state donated, images normalized (``/255``) inside the step. Prints one JSON line.

``--model cnnlab`` keeps this plain loop and swaps in ``cnnlab.models.StridedNet`` (cnnlab's
layers: its convolution formulations, dropout and batch norm) with the same L2 added by hand:
cnnlab's layers without cnnlab's trainer (system name ``cnnlab-layers``).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--model", choices=("flax", "cnnlab"), default="flax",
                   help="flax.linen layers (default) or cnnlab's StridedNet in the same loop")
    args = p.parse_args()
    common.check_args(args)
    t0 = time.perf_counter()
    from functools import partial
    from typing import Any

    if args.model == "cnnlab":  # before JAX starts its backend: a library user's one opt-in call
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        import cnnlab.runtime

        cnnlab.runtime.configure()
        import cnnlab.models

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax.training import train_state

    import_s = time.perf_counter() - t0
    x_train, y_train, x_eval, y_eval = common.make_data(args)

    class StridedNet(nn.Module):
        num_classes: int

        @nn.compact
        def __call__(self, x, train: bool):
            init = nn.initializers.he_normal()
            bn = partial(nn.BatchNorm, use_running_average=not train, momentum=0.99, epsilon=1e-3)
            x = nn.Conv(16, (7, 7), strides=(2, 2), padding="VALID", kernel_init=init)(x)
            for w in (32, 64, 128):
                x = bn()(nn.relu(nn.Conv(w, (3, 3), padding="SAME", kernel_init=init)(x)))
                x = nn.Conv(w, (3, 3), strides=(2, 2), padding="SAME", kernel_init=init)(x)
                x = bn()(nn.relu(x))
                x = nn.Dropout(0.25, deterministic=not train)(x)
            x = x.reshape((x.shape[0], -1))
            x = bn()(nn.relu(nn.Dense(512, kernel_init=init)(x)))
            x = nn.Dropout(0.5, deterministic=not train)(x)
            return nn.Dense(self.num_classes, kernel_init=init)(x)

    class TrainState(train_state.TrainState):
        batch_stats: Any
        key: jax.Array

    class CnnlabStridedNet(nn.Module):
        """cnnlab's StridedNet behind this loop's ``train=`` call (L2 added by the loop)."""

        num_classes: int

        @nn.compact
        def __call__(self, x, train: bool):
            net = cnnlab.models.StridedNet(num_classes=self.num_classes, kernel_initializer="he_normal",
                                           weight_decay=0.0, name="net")
            return net(x, training=train)

    t_build = time.perf_counter()
    model = (CnnlabStridedNet if args.model == "cnnlab" else StridedNet)(common.NUM_CLASSES)
    key = jax.random.PRNGKey(args.seed)
    variables = model.init(key, jnp.zeros((1, 96, 96, 3)), train=False)
    state = TrainState.create(
        apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"],
        tx=optax.adam(common.LEARNING_RATE, eps=1e-7), key=jax.random.PRNGKey(args.seed + 1),
    )

    def l2(params):
        if args.model == "cnnlab":
            params = params["net"]
        return sum(jnp.sum(p["kernel"] ** 2) for name, p in params.items() if name.startswith("Conv"))

    @partial(jax.jit, donate_argnums=0)
    def train_step(state, images, labels):
        dropout_key = jax.random.fold_in(state.key, state.step)
        x = images.astype(jnp.float32) / 255.0

        def loss_fn(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats}, x, train=True,
                rngs={"dropout": dropout_key}, mutable=["batch_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return ce + common.WEIGHT_DECAY * l2(params), (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
        return state, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

    @jax.jit
    def eval_step(state, images, labels):
        logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                                images.astype(jnp.float32) / 255.0, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
        return loss, jnp.sum(jnp.argmax(logits, -1) == labels)

    b = args.batch
    done_at: dict[int, float] = {}
    cpu_at: dict[int, float] = {}
    first_step_s = None
    for i in range(args.warmup + args.steps):
        state, metrics = train_step(state, x_train[i * b:(i + 1) * b], y_train[i * b:(i + 1) * b])
        step = i + 1
        if step == 1 or step % args.window == 0:
            jax.block_until_ready(metrics["loss"])
            done_at[step] = time.perf_counter()
            cpu_at[step] = common.cpu_seconds()
            if step == 1:
                first_step_s = done_at[1] - t_build
    train_rates = common.window_rates(done_at, b, args.window, args.warmup, args.steps)

    def eval_pass():
        t = time.perf_counter()
        total, correct = 0.0, 0
        for i in range(0, len(y_eval), b):
            loss, c = eval_step(state, x_eval[i:i + b], y_eval[i:i + b])
            total, correct = total + loss, correct + c
        float(total), int(correct)
        return time.perf_counter() - t

    eval_first_s = eval_pass()
    eval_rates = [len(y_eval) / eval_pass() for _ in range(args.eval_repeats)]
    common.report("cnnlab-layers" if args.model == "cnnlab" else "flax", args, import_s=import_s, first_step_s=first_step_s,
                  train_rates=train_rates, eval_rates=eval_rates, eval_first_s=eval_first_s,
                  train_cpu_ms_per_img=common.cpu_ms_per_image(cpu_at, b, args.warmup, args.steps),
                  extra={"jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                         "final_loss": float(metrics["loss"]), "np": np.__version__})


if __name__ == "__main__":
    main()
