"""cnnlab: Keras-exact convolutional layers in JAX/Flax, config-driven training and sweeps."""

__version__ = "0.1.0"
