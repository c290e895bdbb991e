"""Biased MNIST: generator, real MNIST sources that work offline, cache and loaders."""
from .biased_mnist import (FACTOR_NAMES, BiasedMNISTConfig, BiasedMNISTSplit, generate, load,
                           load_splits)
from .loaders import BiasedMNISTDataset, DeviceSplit

__all__ = ["FACTOR_NAMES", "BiasedMNISTConfig", "BiasedMNISTDataset", "BiasedMNISTSplit",
           "DeviceSplit", "generate", "load", "load_splits"]
