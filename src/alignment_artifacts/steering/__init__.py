"""Steering at inference: every mode as hooks installed by one context manager.

* ``modes``: the ``MODES`` table (one ``ModeSpec`` per mode: its hook function, default sites and
  layers, parameters and their ranges, whether it can be baked or exported as a control vector);
* ``config``: ``SteeringConfig``, the JSON-stable description of an intervention;
* ``gate``: the per-prompt gate and the pass protocol it follows;
* ``value``: ``Steering`` (a resolved config with its directions), whose ``apply(loaded)`` installs
  the hooks;
* ``weights``: a mode's weight edit on the residual writers, for export's bake and for modes defined
  on weights only (which ``apply`` runs by editing the weights for its block).

The path of one steered prompt, and how to add a mode: docs/steering-modes.md.
"""

from .config import CONFIG_VERSION, SteeringConfig
from .gate import Gate, gate_passes, gate_places
from .modes import MODES, PARAMS, STEERING_MODES, ModeSpec, Param, Term, format_advice, mode_spec
from .value import Steering, SteeringHandle, apply_steering

__all__ = [
    "CONFIG_VERSION", "MODES", "PARAMS", "STEERING_MODES", "Gate", "ModeSpec", "Param", "Steering",
    "SteeringConfig", "SteeringHandle", "Term", "apply_steering", "format_advice", "gate_passes", "gate_places",
    "mode_spec",
]
