"""Puts ``tests/`` on ``sys.path`` so that test modules can ``from helpers import ...`` under
any pytest import mode (``tests/`` is not a package), and pins XLA's convolution gradients:
measuring every convolution shape the suite traces would cost minutes, and
tests/test_conv_formulations.py tests the measured choice (cnnlab's default) itself."""

import os
import sys

os.environ.setdefault("CNNLAB_CONV_FORMULATION", "xla")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
