"""Finding the activation functions of a model, shared by the methods that change activations
(``autorep``: ReLU replacement; ``act_sparsity``: FATReLU, Hoyer, CATS, ReLU-fication).

Activations are modules here (``nn.ReLU``, ``nn.GELU``, transformers' ``GELUActivation``): a method
swaps a module in place (``replace``), so the model's own forward code does not change. A model whose
activations are plain function calls has nothing a method can swap; the error names what was found.
"""

from __future__ import annotations

from torch import nn

from effml.errors import EffmlError

# Class names that are elementwise activations (torch's and transformers').
ACTIVATION_NAMES = frozenset({
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Tanh", "Sigmoid",
    "Hardswish", "Hardtanh", "Softplus", "GELUActivation", "NewGELUActivation", "FastGELUActivation",
    "QuickGELUActivation", "GELUTanh", "PytorchGELUTanh", "SiLUActivation", "ReLUSquaredActivation",
    "ClippedGELUActivation", "AccurateGELUActivation", "LinearActivation",
})


def activation_types(model: nn.Module) -> list[str]:
    """The distinct activation class names in the model, sorted (for error messages)."""
    return sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in ACTIVATION_NAMES})


def find_activations(model: nn.Module, names: frozenset[str], method: str, wanted: str) -> dict[str, nn.Module]:
    """Every module whose class name is in ``names``, by its path; none is one line naming what the
    model has instead (``wanted`` says what the method needs, in words)."""
    found = {path: m for path, m in model.named_modules() if type(m).__name__ in names}
    if not found:
        have = activation_types(model)
        raise EffmlError(f"compressor {method} found no {wanted} module to change in {type(model).__name__}; "
                         f"its activation modules are: {', '.join(have) if have else 'none'}")
    return found


def replace(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (dotted) in ``model``."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)
