"""Model families ditmesh knows, as data (`ModelAdapter`); importing registers them."""

from ditmesh.models import flux, sd3, sdxl, wan  # noqa: F401 - registration
from ditmesh.models.base import ModelAdapter, adapter_for, denoisers, register

__all__ = ["ModelAdapter", "adapter_for", "denoisers", "register"]
