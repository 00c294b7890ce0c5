"""Package-wide defaults, named after their Keras counterparts.

The only global state in cnnlab: the default image data format used when a layer or
function receives ``data_format=None``. It starts as ``"channels_last"`` and can be
changed with :func:`set_image_data_format` or the ``CNNLAB_IMAGE_DATA_FORMAT``
environment variable (read once, at import).
"""

from __future__ import annotations

import os

_VALID_DATA_FORMATS = ("channels_last", "channels_first")


def _check_data_format(value: str) -> str:
    fmt = str(value).lower()
    if fmt not in _VALID_DATA_FORMATS:
        raise ValueError(
            f"Invalid data_format {value!r}: expected one of {_VALID_DATA_FORMATS} (or None "
            "for the package default)."
        )
    return fmt


_IMAGE_DATA_FORMAT = _check_data_format(os.environ.get("CNNLAB_IMAGE_DATA_FORMAT", "channels_last"))


def image_data_format() -> str:
    """Returns the default data format: ``"channels_last"`` or ``"channels_first"``."""
    return _IMAGE_DATA_FORMAT


def set_image_data_format(data_format: str) -> None:
    """Sets the default data format used where ``data_format=None``."""
    global _IMAGE_DATA_FORMAT
    _IMAGE_DATA_FORMAT = _check_data_format(data_format)


def standardize_data_format(data_format: str | None) -> str:
    """Resolves ``None`` to the package default and validates the value (case-insensitive)."""
    if data_format is None:
        return _IMAGE_DATA_FORMAT
    return _check_data_format(data_format)


def epsilon() -> float:
    """Keras' fuzz factor (1e-7), used by constraints and some activations."""
    return 1e-7
