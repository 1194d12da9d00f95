"""bnfreeze: BatchNormalization that behaves as intended when Keras models are frozen.

>>> import bnfreeze
>>> sorted(bnfreeze.BN_MODES)
['adapt', 'affine', 'inference', 'train']
"""

from bnfreeze._errors import (
    BNFreezeError,
    DataError,
    ModeError,
    ModelError,
    SelectionError,
    UnsupportedLayerError,
)
from bnfreeze._freeze import freeze, unfreeze
from bnfreeze._modes import MODE_NAMES as BN_MODES
from bnfreeze._modes import BNMode
from bnfreeze._recalibrate import recalibrate
from bnfreeze._select import up_to

__version__ = "0.1.0"

__all__ = [
    "BNFreezeError",
    "BNMode",
    "BN_MODES",
    "DataError",
    "ModeError",
    "ModelError",
    "SelectionError",
    "UnsupportedLayerError",
    "__version__",
    "freeze",
    "recalibrate",
    "unfreeze",
    "up_to",
]
