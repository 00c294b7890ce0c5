"""cnnlab: Keras-exact convolutional layers in JAX/Flax, config-driven training and sweeps."""

from cnnlab import backend as _backend
from cnnlab._lazy import lazy_attributes

#: XLA:CPU's convolution kernels, chosen before JAX starts (``cnnlab.backend.configure_xla_cpu``).
CPU_CONVOLUTIONS = _backend.configure_xla_cpu()
#: How glibc's malloc is set up for XLA's per-call buffers (``cnnlab.backend.configure_malloc``).
MALLOC = _backend.configure_malloc()

__version__ = "0.1.0"

# Loaded on first use, so that ``import cnnlab`` starts neither JAX nor the trainer.
__getattr__, __dir__ = lazy_attributes(__name__, {"load_run": "cnnlab.inference", "Run": "cnnlab.inference"})
