"""Argument validation shared by the functional layers (and re-used by `cnnlab.nn`).

Every helper raises ``ValueError`` naming the parameter and the bad value, so a mistake in a
layer argument is reported at the boundary, before any compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

from cnnlab import backend

PADDING_MODES = {
    "zeros": "constant",
    "constant": "constant",
    "reflect": "reflect",
    "symmetric": "symmetric",
    "circular": "wrap",
    "wrap": "wrap",
    "edge": "edge",
    "replicate": "edge",
}
STRING_PADDINGS = ("valid", "same", "causal")

Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def normalize_tuple(value: Any, n: int, name: str, *, allow_zero: bool = False) -> tuple[int, ...]:
    """Turns an int or a length-``n`` sequence of ints (NumPy ints too, as Keras' entries) into
    an ``n``-tuple of positive ints."""
    if isinstance(value, bool):
        raise ValueError(f"Invalid {name}={value!r}: expected an int or a tuple of {n} ints.")
    if isinstance(value, Integral):
        values = (value,) * n
    else:
        try:
            values = tuple(value)
        except TypeError:
            raise ValueError(
                f"Invalid {name}={value!r}: expected an int or a tuple of {n} ints."
            ) from None
        if len(values) != n:
            raise ValueError(
                f"Invalid {name}={value!r}: expected {n} values (one per spatial dimension), "
                f"got {len(values)}."
            )
    lowest = 0 if allow_zero else 1
    for v in values:
        if not _is_int(v) or v < lowest:
            kind = "non-negative" if allow_zero else "positive"
            raise ValueError(f"Invalid {name}={value!r}: every entry must be a {kind} int.")
    return tuple(int(v) for v in values)


def check_positive_int(value: Any, name: str) -> int:
    """Validates a strictly positive int (filters, groups, depth_multiplier...)."""
    if not _is_int(value) or value <= 0:
        raise ValueError(f"Invalid {name}={value!r}: expected a strictly positive int.")
    return int(value)


def check_padding(padding: Padding, n: int) -> str | tuple[tuple[int, int], ...]:
    """Normalizes ``padding`` to ``"valid" | "same" | "causal"`` or explicit ``((lo, hi), ...)``.

    Strings are case-insensitive (as in Keras). An int pads every spatial side by that amount; a
    sequence gives one int (symmetric) or one ``(lo, hi)`` pair per spatial dimension.
    """
    if isinstance(padding, str):
        mode = padding.lower()
        if mode not in STRING_PADDINGS:
            raise ValueError(
                f"Invalid padding={padding!r}: expected one of {STRING_PADDINGS}, an int, or a "
                "sequence of ints or (low, high) pairs."
            )
        if mode == "causal" and n != 1:
            raise ValueError(
                f"Invalid padding={padding!r}: 'causal' padding is only defined for 1-D "
                f"convolutions, got {n} spatial dimensions."
            )
        return mode
    if isinstance(padding, int) and not isinstance(padding, bool):
        if padding < 0:
            raise ValueError(f"Invalid padding={padding!r}: must be non-negative.")
        return ((padding, padding),) * n
    try:
        entries = list(padding)
    except TypeError:
        raise ValueError(f"Invalid padding={padding!r}.") from None
    if len(entries) != n:
        raise ValueError(
            f"Invalid padding={padding!r}: expected {n} entries (one per spatial dimension)."
        )
    pairs = []
    for entry in entries:
        pair = (entry, entry) if isinstance(entry, int) else tuple(entry)
        if len(pair) != 2 or any(
            isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in pair
        ):
            raise ValueError(
                f"Invalid padding={padding!r}: each entry must be a non-negative int or a "
                "(low, high) pair of non-negative ints."
            )
        pairs.append(pair)
    return tuple(pairs)


def check_padding_mode(padding_mode: str) -> str:
    """Maps a padding mode name to its ``jnp.pad`` mode; raises for unknown names."""
    key = str(padding_mode).lower()
    if key not in PADDING_MODES:
        raise ValueError(
            f"Invalid padding_mode={padding_mode!r}: expected one of {sorted(PADDING_MODES)}."
        )
    return PADDING_MODES[key]


def check_strides_dilation(strides: tuple[int, ...], dilation_rate: tuple[int, ...]) -> None:
    """Keras' ``Conv*D``/``Conv*DTranspose`` layers (not its ops, nor its depthwise and separable
    layers) reject ``strides > 1`` together with ``dilation_rate > 1``."""
    if max(strides) > 1 and max(dilation_rate) > 1:
        raise ValueError(
            "`strides > 1` is not supported together with `dilation_rate > 1`. Received: "
            f"strides={strides} and dilation_rate={dilation_rate}."
        )


def check_transpose_padding(
    padding: Any, output_padding: Any, strides: tuple[int, ...]
) -> tuple[str, tuple[int, ...] | None]:
    """``padding`` (``valid``/``same``) and ``output_padding`` (``None`` or non-negative ints,
    each below its stride) of a transposed convolution, normalized as Keras does."""
    n = len(strides)
    mode = check_padding(padding, n)
    if mode not in ("valid", "same"):
        raise ValueError(
            f"Invalid padding={padding!r} for a transposed convolution: expected 'valid' or 'same'."
        )
    if output_padding is None:
        return mode, None
    output_padding = normalize_tuple(output_padding, n, "output_padding", allow_zero=True)
    if any(op >= s for op, s in zip(output_padding, strides)):
        raise ValueError(
            f"Invalid output_padding={output_padding}: each entry must be smaller than its "
            f"stride, strides={strides}."
        )
    return mode, output_padding


def check_output_size(
    input_shape: tuple[int, ...], sizes: Sequence[int], windows: Sequence[int],
    strides: Sequence[int], detail: str,
) -> None:
    """Raises, as Keras' shape inference does, when a VALID window of (dilated) size ``windows``
    does not fit in the (padded) spatial ``sizes``."""
    out = tuple((s - w) // st + 1 for s, w, st in zip(sizes, windows, strides))
    if min(out) <= 0:
        raise ValueError(
            f"Computed output size would be zero or negative: input shape {tuple(input_shape)} "
            f"with {detail} gives spatial size {out}."
        )


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """XLA/TensorFlow ``SAME`` padding on the dilated kernel; the extra pixel goes high."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def spatial_axes(n: int, data_format: str | None) -> tuple[int, ...]:
    """The axes of the ``n`` spatial dimensions of ``[N, *spatial, C]`` or ``[N, C, *spatial]``."""
    if backend.standardize_data_format(data_format) == "channels_last":
        return tuple(range(1, n + 1))
    return tuple(range(2, n + 2))
