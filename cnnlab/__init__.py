"""cnnlab: Keras-exact convolutional layers in JAX/Flax, config-driven training and sweeps."""

from cnnlab._lazy import lazy_attributes

# Importing cnnlab changes no process state; cnnlab.runtime.configure() makes the CPU settings
# the cnnlab commands make for themselves.

__version__ = "0.1.0"

# Loaded on first use, so that ``import cnnlab`` starts neither JAX nor the trainer.
__getattr__, __dir__ = lazy_attributes(__name__, {"load_run": "cnnlab.inference", "Run": "cnnlab.inference",
                                                         "summary": "cnnlab.model_summary"})
