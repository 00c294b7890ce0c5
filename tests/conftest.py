"""Puts ``tests/`` on ``sys.path`` so that test modules can ``from helpers import ...`` under
any pytest import mode (``tests/`` is not a package)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
