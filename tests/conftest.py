"""Puts ``tests/`` on ``sys.path`` so that test modules can ``from helpers import ...`` under
any pytest import mode (``tests/`` is not a package), and pins XLA's convolution gradients
(cnnlab's default) even where a developer's shell sets CNNLAB_CONV_FORMULATION=auto: measuring
every convolution shape the suite traces would cost minutes; tests/test_conv_formulations.py
tests the other settings."""

import os
import sys

os.environ["CNNLAB_CONV_FORMULATION"] = "xla"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
