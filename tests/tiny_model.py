"""A tiny model for the command-line tests (`tiny_model:make` as a module:callable spec)."""
from torch import nn


def make() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 30 * 30, 10))
