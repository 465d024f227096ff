"""Adaptation: the engine, its events, and one module per method behind one interface."""

from .base import (
    AdaptationContext,
    AdaptationMethod,
    CommonSettings,
    StepOutput,
    available_methods,
    get_method,
    register,
)
from .events import AdaptationEvent, AdaptationResult, CheckpointChoice

__all__ = [
    "AdaptationContext",
    "AdaptationEvent",
    "AdaptationMethod",
    "AdaptationResult",
    "CheckpointChoice",
    "CommonSettings",
    "StepOutput",
    "available_methods",
    "get_method",
    "register",
]
