"""A trained run as an ONNX model (an optional extra: ``pip install "cnnlab[onnx]"``).

``cnnlab export --format=onnx`` (:func:`export_onnx`) converts what
``cnnlab.load_run(...).predict`` computes after resizing (normalization, the model, the test-time mirror averaging
where the run sets ``eval_flip``, the softmax) with `jax2onnx <https://github.com/enpasos/jax2onnx>`_,
which turns the function's jaxpr into ONNX operators one primitive at a time. So any model that
runs in JAX exports, with or without branches, and no Keras is needed; the graph is checked by
running it in ONNX Runtime against JAX on the same random images before the file is written.

The ONNX model takes float32 ``[batch, height, width, 3]`` RGB images with values 0..255 (cast
uint8 images with ``.astype(np.float32)``) at the run's image size (resize them as
``Run.prepare`` does: the resize is not part of the graph); ``batch`` is dynamic. It returns
``[batch, num_classes]`` probabilities in the order of the run's ``classes.json``.

>>> import onnxruntime
>>> session = onnxruntime.InferenceSession("model.onnx")
>>> probs = session.run(None, {"images": images.astype("float32")})[0]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.functional.pooling import reduce_window_max_pooling
from cnnlab.native import conv_impl

#: ONNX Runtime's results may differ from XLA's in the last bits (another summation order).
CHECK_ATOL = 1e-4
INSTALL = 'cnnlab export --format=onnx needs jax2onnx and onnxruntime: pip install "cnnlab[onnx]".'


def check_installed() -> None:
    """Raises an ImportError saying how to install the extra when jax2onnx or onnxruntime is
    missing."""
    _jax2onnx()


def _jax2onnx():
    try:
        import jax2onnx
        import onnxruntime  # noqa: F401  (the export checks its graph in ONNX Runtime)
    except ImportError as err:
        if err.name not in ("jax2onnx", "onnxruntime", "onnx"):
            raise
        raise ImportError(INSTALL) from None
    return jax2onnx


def predict_function(run: Any):
    """``images float32 [N, H, W, 3] 0..255 -> probabilities [N, num_classes]``: what
    ``run.predict`` computes after resizing (:meth:`cnnlab.inference.Run.prepare`)."""
    from cnnlab.train.experiment import make_normalize
    from cnnlab.train.steps import eval_logits

    normalize = make_normalize(run.preprocessing)
    flip = bool(run.config.get("eval_flip", False))
    variables = jax.tree_util.tree_map(jnp.asarray, run.variables)

    def predict(images):
        return jax.nn.softmax(eval_logits(run.model, variables, normalize(images), flip=flip), axis=-1)

    return predict


def export_onnx(workdir: str, path: str, *, which: str = "best", opset: int = 18) -> Any:
    """Writes run ``workdir``'s ``which`` checkpoint to ``path`` (``.onnx``) and returns the
    ``onnx.ModelProto``; see the module docstring for its input and output.

    Raises:
      ImportError: jax2onnx or onnxruntime is missing (saying how to install them).
      ValueError: a ``path`` not ending in ``.onnx``, or a converted graph whose probabilities
        differ from JAX's by more than :data:`CHECK_ATOL` (nothing is written then).
    """
    from cnnlab.inference import check_exportable_views, load_run

    if not str(path).endswith(".onnx"):
        raise ValueError(f"export: {path!r} must end in .onnx.")
    jax2onnx = _jax2onnx()
    run = load_run(workdir, which=which)
    check_exportable_views(run.config)
    height, width = run.preprocessing["image_size"]
    predict = predict_function(run)
    spec = jax.ShapeDtypeStruct(("batch", height, width, 3), jnp.float32)
    # lax's convolution (no custom call, no measurement) for a symbolic batch size
    with conv_impl.formulation("xla", override_env=True), _nhwc_max_pooling():
        proto = jax2onnx.to_onnx(predict, [spec], model_name="cnnlab", opset=opset,
                                 input_names=["images"], output_names=["probabilities"])
    # jax2onnx annotates some intermediate values with a wrong dtype (float64 after a float32
    # `max`); the annotations are optional, ONNX Runtime infers the types itself.
    del proto.graph.value_info[:]
    _check(proto, jax.jit(predict), height, width)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return proto


def _check(proto: Any, predict, height: int, width: int) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n in (1, 3):
        images = rng.integers(0, 256, (n, height, width, 3)).astype(np.float32)
        got = session.run(None, {"images": images})[0]
        diff = float(np.abs(got - np.asarray(predict(images))).max())
        if not diff <= CHECK_ATOL:
            raise ValueError(f"export: the ONNX graph's probabilities differ from JAX's by {diff:.3g} "
                             f"(> {CHECK_ATOL}) on {n} random image(s); nothing was written.")


# --------------------------------------------------------------------------- jax2onnx adapter


@contextlib.contextmanager
def _nhwc_max_pooling() -> Iterator[None]:
    """jax2onnx (0.17) lowers ``reduce_window_max`` over ``[N, H, W, C]`` to a MaxPool with
    four spatial axes, which ONNX Runtime refuses ("Unsupported pooling size"); while the block
    runs, a window ``(1, kh, kw, 1)`` becomes Transpose -> 2-D MaxPool -> Transpose (MaxPool
    pads with -inf, as ``lax.reduce_window`` with ``-inf`` does). Other windows keep jax2onnx's
    lowering. (The one place cnnlab touches jax2onnx's plugin registry.) cnnlab's max pooling
    is traced as ``reduce_window_max`` meanwhile (not its CPU formulation of strided slices)."""
    from jax2onnx.plugins import plugin_system

    plugin_system.import_all_plugins()  # the registry fills as plugins are imported
    registry = plugin_system.PLUGIN_REGISTRY
    name = jax.lax.reduce_window_max_p.name
    original = registry[name]

    class NHWCMaxPool(type(original)):
        def lower(self, ctx: Any, eqn: Any) -> None:
            p = eqn.params
            dims, strides = tuple(p["window_dimensions"]), tuple(p["window_strides"])
            pads = tuple(tuple(int(v) for v in pair) for pair in p["padding"])
            dilation = tuple(p["window_dilation"])
            if (len(dims) != 4 or dims[0] != 1 or dims[3] != 1 or strides[0] != 1 or strides[3] != 1
                    or pads[0] != (0, 0) or pads[3] != (0, 0) or any(d != 1 for d in p["base_dilation"])
                    or dilation[0] != 1 or dilation[3] != 1):
                return original.lower(ctx, eqn)
            x = ctx.get_value_for_var(eqn.invars[0], name_hint=ctx.fresh_name("maxpool_in"))
            out_spec = ctx.get_value_for_var(eqn.outvars[0], name_hint=ctx.fresh_name("maxpool_out"))
            nchw = ctx.builder.Transpose(x, _outputs=[ctx.fresh_name("maxpool_nchw")], perm=[0, 3, 1, 2])
            pooled = ctx.builder.MaxPool(
                nchw, _outputs=[ctx.fresh_name("maxpool_pooled")], kernel_shape=list(dims[1:3]),
                strides=list(strides[1:3]), pads=[pads[1][0], pads[2][0], pads[1][1], pads[2][1]],
                dilations=list(dilation[1:3]))
            out_name = getattr(out_spec, "name", None) or ctx.fresh_name("maxpool_out")
            producer = getattr(out_spec, "producer", lambda: None)
            if callable(producer) and producer() is not None:
                out_name = ctx.fresh_name("maxpool_out")
            result = ctx.builder.Transpose(pooled, _outputs=[out_name], perm=[0, 2, 3, 1])
            result.type, result.shape = out_spec.type, out_spec.shape
            ctx.bind_value_for_var(eqn.outvars[0], result)

    replacement = NHWCMaxPool()
    replacement.__dict__.update(original.__dict__)
    registry[name] = replacement
    try:
        with reduce_window_max_pooling():
            yield
    finally:
        registry[name] = original
