"""Models: loading (builtins, folders, GGUF, hub), the architecture adapter, generation, hooks."""

from .adapter import ARCHITECTURES, SITES, SUPPORTED_MODEL_TYPES, ArchitectureSpec, ModelAdapter
from .builtin import BUILTINS, DEFAULT_MODEL, builtin_status, get_builtin
from .chat import format_chat
from .generation import GenerationConfig, GenerationOutput, generate
from .hooks import site_hooks
from .loading import LoadedModel, ModelInfo, load_model, loaded_from, wrap_model

__all__ = [
    "ARCHITECTURES", "BUILTINS", "DEFAULT_MODEL", "SITES", "SUPPORTED_MODEL_TYPES", "ArchitectureSpec",
    "GenerationConfig", "GenerationOutput", "LoadedModel", "ModelAdapter", "ModelInfo", "builtin_status",
    "format_chat", "generate", "get_builtin", "load_model", "loaded_from", "site_hooks", "wrap_model",
]
