"""stackjax: differentiable bilevel (Stackelberg) optimisation in JAX."""

from ._best_response import BestResponseInfo as BestResponseInfo
from ._best_response import best_response as best_response
from ._leader import LeaderSolution as LeaderSolution
from ._leader import solve_leader as solve_leader
from ._version import __version__ as __version__
from .stats import NonInferiority as NonInferiority
from .stats import welch_noninferiority as welch_noninferiority
