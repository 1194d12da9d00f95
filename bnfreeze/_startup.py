"""Imported first by ``bnfreeze/__init__.py``, before anything imports TensorFlow.

In the ``bnfreeze`` command (the console script or ``python -m bnfreeze``, which import
the package before running ``main``), Keras and TensorFlow are imported here with
TensorFlow's start-up logging held back: see :func:`bnfreeze._cli.quiet_start`. In any
other process this does nothing.
"""

from bnfreeze._cli import quiet_start

quiet_start()
