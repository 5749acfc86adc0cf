"""The resource-governance layer: one client of the generic bilevel core.

Data path: call logs (`data`) -> response model fit (`calibrate`, `response`) ->
game (`game`) -> sessions and leader training (`session`), with `inverse` to learn
the follower's weights from observed actions.
"""

from . import actions as actions
from . import calibrate as calibrate
from . import data as data
from . import features as features
from . import game as game
from . import inverse as inverse
from . import response as response
from . import session as session
from .calibrate import calibration_report as calibration_report
from .calibrate import fit_response_model as fit_response_model
from .calibrate import leave_one_group_out as leave_one_group_out
from .data import CallRecords as CallRecords
from .game import GameConfig as GameConfig
from .game import SessionState as SessionState
from .inverse import fit_follower_weights as fit_follower_weights
from .response import ResponseModel as ResponseModel
from .session import LeaderPolicy as LeaderPolicy
from .session import rollout as rollout
from .session import train_policy as train_policy
