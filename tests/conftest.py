"""Puts ``tests/`` on ``sys.path`` so that test modules can ``from helpers import ...`` under
any pytest import mode (``tests/`` is not a package), and pins lax's own convolution gradients
(``CNNLAB_CONV_FORMULATION=xla``, inherited by the subprocesses tests start): cnnlab's default,
``auto``, measures each strided convolution shape it traces, which over the suite's many shapes
would cost minutes; tests/test_conv_formulations.py tests ``auto`` and the forced forms. cnnlab.runtime.configure() runs first, as the cnnlab commands do, so that
their XLA:CPU settings apply in every test process (and, through XLA_FLAGS, its subprocesses)."""

import os
import sys

os.environ["CNNLAB_CONV_FORMULATION"] = "xla"

import cnnlab.runtime  # noqa: E402

cnnlab.runtime.configure()  # the commands' XLA:CPU and malloc settings, before any test starts JAX

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
