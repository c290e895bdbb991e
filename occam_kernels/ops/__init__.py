"""torch.library registrations, autograd and backend dispatch of the public ops; one op a file."""
from .._backends import available_backends
from .compact import compact
from .exit_head import ExitHeadOutput, class_activation_maps, exit_head

__all__ = ["ExitHeadOutput", "available_backends", "class_activation_maps", "compact", "exit_head"]
