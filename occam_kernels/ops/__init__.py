"""torch.library registrations, autograd and backend dispatch of the public ops; one op a file."""
from ._backends import available_backends
from .compact import compact

__all__ = ["available_backends", "compact"]
