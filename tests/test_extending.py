"""Extending cnnlab from a user's own package: a model (its typed arguments in --help), a loss
with its own field, an optimizer with its own field, an augmentation op and a metric, each in one
file of the user's, imported by the user's config file, without editing cnnlab."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

USER_MODULE = '''
"""A user's extensions: one model, one loss, one optimizer, one augmentation op, one metric."""
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import optax

from cnnlab import models, nn
from cnnlab.data import register_augment
from cnnlab.schema import Field, in_range
from cnnlab.train import losses, metrics, optim


@models.register("tiny_net", traceable=("dropout",))
class TinyNet(flax_nn.Module):
    num_classes: int
    width: int = 8  # filters of the convolution
    dropout: float = 0.1  # dropout rate before the logits

    @flax_nn.compact
    def __call__(self, x, training=False):
        x = nn.Conv2D(self.width, 3, strides=2, activation="relu")(x)
        x = nn.GlobalAveragePooling2D()(x)
        x = nn.Dropout(self.dropout)(x, training=training)
        return nn.Dense(self.num_classes)(x)


@losses.register("poly1", epsilon=Field(1.0, float, in_range(-1, 10), "weight of the first polynomial term",
                                        traceable=True))
def poly1(logits, targets, *, epsilon):
    pt = jnp.sum(targets * jax.nn.softmax(logits), -1)
    return -jnp.sum(targets * jax.nn.log_softmax(logits), -1) + epsilon * (1 - pt)


@optim.register_optimizer("lion", b1=Field(0.9, float, in_range(0, 1), "update interpolation", traceable=True),
                          b2=Field(0.99, float, in_range(0, 1), "momentum decay"))
def lion(learning_rate, *, b1, b2):
    return optax.lion(learning_rate, b1=b1, b2=b2)


@register_augment("invert", p=Field(0.5, float, in_range(0, 1), "probability of inverting", traceable=True))
def invert(key, images, labels, *, p):
    flip = jax.random.bernoulli(key, p, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, 255 - images, images), labels


@metrics.register("top2_accuracy")
def top2_accuracy(logits, labels, mask):
    hit = jnp.any(jax.lax.top_k(logits, 2)[1] == labels[:, None], axis=-1)
    return {"top2": jnp.sum(hit * mask)}
'''

USER_CONFIG = '''
"""The user's experiment.

    cnnlab train --config=my_config.py --workdir=runs/mine
"""
import my_extensions  # noqa: F401  (registers tiny_net, invert, top2_accuracy)
from cnnlab import sweep

def get_config():
    c = sweep.config_from_file({smoke!r})
    c.num_epochs = 2
    c.progress = False
    c.data.image_size = 16
    c.data.synthetic_per_class = 40
    c.model.name = "tiny_net"
    c.model.kwargs = {{"width": 8}}
    c.data.augment.ops = ("keras_affine", "invert")
    c.data.augment.invert.p = 0.25
    c.loss.name = "poly1"
    c.loss.poly1.epsilon = 2.0
    c.optimizer.name = "lion"
    c.optimizer.learning_rate = 3e-4
    c.optimizer.lion.b1 = 0.95
    c.metrics = ("loss", "accuracy", "top2_accuracy")
    c.checkpoint.best_metric = "val/top2_accuracy"
    return c
'''


def _cnnlab(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_user_model_op_and_metric_train_evaluate_and_pack(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "my_extensions.py").write_text(textwrap.dedent(USER_MODULE))
    (user / "my_config.py").write_text(USER_CONFIG.format(smoke=str(ROOT / "configs" / "smoke.py")))
    run = tmp_path / "run"

    out = _cnnlab("train", f"--config={user / 'my_config.py'}", f"--workdir={run}")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "epoch"][-1]
    assert {"val/top2_accuracy", "test/top2_accuracy", "test/accuracy"} <= set(last)
    assert last["test/top2_accuracy"] >= last["test/accuracy"]
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["name"] == "tiny_net" and config["data"]["augment"]["ops"] == ["keras_affine", "invert"]
    assert config["loss"] == {"name": "poly1", "label_smoothing": 0.0, "poly1": {"epsilon": 2.0}}
    assert config["optimizer"]["name"] == "lion" and config["optimizer"]["lion"] == {"b1": 0.95, "b2": 0.99}
    assert "adam" not in config["optimizer"]  # only the chosen optimizer's section is recorded
    assert [e["module"] for e in json.loads((run / "extensions.json").read_text())] == ["my_extensions"]

    # Another process, elsewhere, re-evaluates the run: the recorded extensions are imported.
    out = _cnnlab("eval", f"--workdir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "val/top2_accuracy=" in out.stdout

    # The user's declared traceable fields (model dropout, the op's p) pack like built-in ones.
    check = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(user)!r})
        import my_config
        from cnnlab.sweep.space import apply_point
        from cnnlab.train import pack_key
        from cnnlab.train.experiment import resolve
        from cnnlab.train.packing import varying
        base = my_config.get_config()
        configs = [resolve(apply_point(base, {{"data.augment.invert.p": p, "model.kwargs.dropout": d,
                                               "loss.poly1.epsilon": e, "optimizer.lion.b1": b1}}))
                   for p, d, e, b1 in ((0.25, 0.1, 2.0, 0.95), (0.75, 0.0, 0.5, 0.9))]
        assert len({{pack_key(c) for c in configs}}) == 1
        print(sorted(varying(configs)))
    """)
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == ("['data.augment.invert.p', 'loss.poly1.epsilon', 'model.kwargs.dropout', "
                                  "'optimizer.lion.b1']")

    # --help lists the user's model arguments (typed, with their docs) and the loss's field.
    out = _cnnlab("train", "--help", f"--config={user / 'my_config.py'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "model.kwargs.width (int, 8): filters of the convolution" in out.stdout
    assert "model.kwargs.dropout (float, 0.1): dropout rate before the logits (traceable)" in out.stdout
    assert "loss.poly1.epsilon (float, 1.0): weight of the first polynomial term (traceable)" in out.stdout
    assert "optimizer.lion.b1 (float, 0.9): update interpolation (traceable)" in out.stdout
    assert "optimizer.lion.b2 (float, 0.99): momentum decay" in out.stdout
    # and a bad value of either is one clean line before anything is written
    out = _cnnlab("train", f"--config={user / 'my_config.py'}", f"--workdir={tmp_path / 'bad'}",
                  "--config.model.kwargs.width=wide")
    assert out.returncode == 2 and "'model.kwargs.width': invalid value 'wide' (must be int)" in out.stderr
    assert not (tmp_path / "bad").exists()
