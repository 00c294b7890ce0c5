"""Puts ``tests/`` on ``sys.path`` so that test modules can ``from helpers import ...`` under
any pytest import mode (``tests/`` is not a package), and pins lax's own convolution gradients
(``CNNLAB_CONV_FORMULATION=xla``, inherited by the subprocesses tests start): cnnlab's default,
``auto``, measures each strided convolution shape it traces, which over the suite's many shapes
would cost minutes; tests/test_conv_formulations.py tests ``auto`` and the forced forms. cnnlab is imported first, as a user's program would, so that its
XLA:CPU settings apply in every test process."""

import os
import sys

os.environ["CNNLAB_CONV_FORMULATION"] = "xla"

import cnnlab  # noqa: E402,F401  (XLA:CPU's settings, before any test module starts JAX)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
