"""Biased MNIST: generator, real MNIST sources that work offline, cache; splits on the device."""
from .biased_mnist import (FACTOR_NAMES, SPLITS, BiasedMNISTConfig, BiasedMNISTSplit, generate,
                           load, read_cached_config)
from .loaders import DeviceSplit, normalise

__all__ = ["FACTOR_NAMES", "SPLITS", "BiasedMNISTConfig", "BiasedMNISTSplit", "DeviceSplit",
           "generate", "load", "normalise", "read_cached_config"]
