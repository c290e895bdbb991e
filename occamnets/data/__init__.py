"""Biased MNIST: generator, real MNIST sources that work offline, cache; splits on the device."""
from .biased_mnist import (FACTOR_NAMES, SPLITS, BiasedMNISTConfig, BiasedMNISTSplit, generate,
                           load, read_cached_config)
from .groups import BiasGroups, bias_groups
from .loaders import DeviceSplit, normalise

__all__ = ["FACTOR_NAMES", "SPLITS", "BiasGroups", "BiasedMNISTConfig", "BiasedMNISTSplit",
           "DeviceSplit", "bias_groups", "generate", "load", "normalise", "read_cached_config"]
