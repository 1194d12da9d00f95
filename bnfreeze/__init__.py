"""bnfreeze: BatchNormalization that behaves as intended when Keras models are frozen.

>>> import bnfreeze
>>> sorted(bnfreeze.BN_MODES)
['adapt', 'affine', 'inference', 'train']
"""

from bnfreeze import _startup  # noqa: F401  (first: the command's quiet TensorFlow import)
from bnfreeze import callbacks as callbacks
from bnfreeze._audit import audit
from bnfreeze._errors import (
    ArgumentError,
    ArgumentTypeError,
    BackendError,
    BNFreezeError,
    DataError,
    FindingsError,
    ModeError,
    ModelError,
    SavedFormatError,
    SelectionError,
    UnsupportedLayerError,
)
from bnfreeze._fold import fold
from bnfreeze._fold_report import FoldReport
from bnfreeze._freeze import freeze, unfreeze
from bnfreeze._lr import layer_decay, lr_multipliers, set_lr_multipliers
from bnfreeze._modes import MODE_NAMES as BN_MODES
from bnfreeze._modes import BNMode
from bnfreeze._phases import LayerDivergence, PhaseComparison, compare_phases
from bnfreeze._recalibrate import recalibrate
from bnfreeze._report import AuditReport, Behaviour, Finding, LayerRecord
from bnfreeze._select import exclude, last, starting_at, up_to
from bnfreeze._version import __version__ as __version__

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "AuditReport",
    "BNFreezeError",
    "BNMode",
    "BN_MODES",
    "BackendError",
    "Behaviour",
    "DataError",
    "Finding",
    "FindingsError",
    "FoldReport",
    "LayerDivergence",
    "LayerRecord",
    "ModeError",
    "ModelError",
    "PhaseComparison",
    "SavedFormatError",
    "SelectionError",
    "UnsupportedLayerError",
    "__version__",
    "audit",
    "compare_phases",
    "exclude",
    "fold",
    "freeze",
    "last",
    "layer_decay",
    "lr_multipliers",
    "recalibrate",
    "set_lr_multipliers",
    "starting_at",
    "unfreeze",
    "up_to",
]
