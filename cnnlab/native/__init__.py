"""cnnlab's fast convolution paths, kept apart from the pure-lax layers of ``cnnlab.functional``.

:mod:`cnnlab.native.conv_impl` chooses, per shape, between ``lax.conv_general_dilated`` and
faster formulations of each part of a convolution (measured, cached, pinned per run);
:mod:`cnnlab.native.onednn` builds oneDNN's convolutions as XLA custom calls on first use,
validates the library before loading it and falls back (saying why) when it cannot. Nothing
here runs at import: the build, the measurements and their caches happen on the first
convolution traced under ``CNNLAB_CONV_FORMULATION=auto`` (the default) or a forced oneDNN
form; with ``CNNLAB_CONV_FORMULATION=xla`` cnnlab's convolutions are lax's op alone.
"""
