"""Task families. Each gives per-agent seeded training samplers and one shared evaluation set."""

from .sinusoid import SinusoidTasks

__all__ = ["SinusoidTasks"]
