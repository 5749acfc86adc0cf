"""Deployment: the governed OpenAI client, crash-safe call logs, probes, graders and the
surrogate server (a simulator of an OpenAI-compatible API, for offline use).

Data path: `Governor` decides a = (c, p, u) -> `GovernedClient` applies it to real
calls -> `CallLog` records them -> `stackjax.governance.data.load` reads them back
for calibration. `probes` collects calibration data on purpose; `surrogate` stands
in for a real API offline.
"""

from . import graders as graders
from . import probes as probes
from .calllog import CallLog as CallLog
from .calllog import read_log as read_log
from .calllog import redact as redact
from .client import AsyncGovernedClient as AsyncGovernedClient
from .client import BudgetExhausted as BudgetExhausted
from .client import GovernedClient as GovernedClient
from .client import TurnResult as TurnResult
from .governor import Decision as Decision
from .governor import Governor as Governor
from .graders import LLMJudge as LLMJudge
from .probes import run_probes as run_probes
from .surrogate import SurrogateConfig as SurrogateConfig
from .surrogate import SurrogateServer as SurrogateServer
