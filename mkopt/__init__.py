"""mkopt: simulated overparameterization with Majority Kernels (train as if e times larger, deploy at size).

Example:
    >>> import torch, mkopt
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1)
    >>> mkopt.deploy(model).weight.shape
    torch.Size([2, 4])
"""

# What users call. The building blocks stay importable from their modules: mkopt.sampling
# (DirichletSampler, fill_dirichlet_), mkopt.parametrization (MajorityKernel, mix_copies,
# mean_of_copies), mkopt.fused (mix_regenerated), mkopt.expand (Expansion).
from .allocator import retain_freed_memory
from .deploy import collapse, collapse_state_dict, deploy
from .diagnostics import KernelCollapseWarning
from .expand import expand, expansion_of, is_expanded
from .modes import PROBABILITY_MODES, ProbabilityMode, register_probability_mode
from .optimizer import MKOptimizer
from . import optim  # noqa: E402  (mkopt.optim.SGD / Adam / AdamW / wrap: the params form)
from .targets import is_default_kernel, select_targets

__all__ = [
    "MKOptimizer",
    "optim",
    "deploy",
    "collapse",
    "collapse_state_dict",
    "expand",
    "expansion_of",
    "is_expanded",
    "select_targets",
    "is_default_kernel",
    "PROBABILITY_MODES",
    "ProbabilityMode",
    "register_probability_mode",
    "KernelCollapseWarning",
    "retain_freed_memory",
]
__version__ = "0.1.0"
