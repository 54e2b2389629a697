"""mkopt: simulated overparameterization with Majority Kernels (train as if e times larger, deploy at size).

Example:
    >>> import torch, mkopt
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = mkopt.MKOptimizer(torch.optim.SGD, model, e=3, lr=0.1)
    >>> mkopt.deploy(model).weight.shape
    torch.Size([2, 4])
"""

from .allocator import retain_freed_memory
from .deploy import collapse, collapse_state_dict, deploy
from .diagnostics import KernelCollapseWarning
from .expand import Expansion, expand, expansion_of, is_expanded
from .fused import mix_regenerated
from .modes import PROBABILITY_MODES, ProbabilityMode, register_probability_mode
from .optimizer import MKOptimizer
from . import optim  # noqa: E402  (mkopt.optim.SGD / Adam / AdamW / wrap: the params form)
from .parametrization import MajorityKernel, mean_of_copies, mix_copies
from .sampling import DirichletSampler, fill_dirichlet_
from .targets import is_default_kernel, select_targets

__all__ = [
    "MKOptimizer",
    "optim",
    "PROBABILITY_MODES",
    "ProbabilityMode",
    "register_probability_mode",
    "KernelCollapseWarning",
    "deploy",
    "collapse",
    "collapse_state_dict",
    "expand",
    "expansion_of",
    "is_expanded",
    "Expansion",
    "MajorityKernel",
    "mix_copies",
    "mix_regenerated",
    "mean_of_copies",
    "DirichletSampler",
    "fill_dirichlet_",
    "select_targets",
    "is_default_kernel",
    "retain_freed_memory",
]
__version__ = "0.1.0"
