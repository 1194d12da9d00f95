"""Test set-up shared by every module: quiet TensorFlow, two logical CPUs, seeds."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# On JAX, the tests build the same small models again and again: XLA's compilation of a
# step already compiled is read from a cache. The nox sessions name one that lasts between
# runs (``.nox/.cache/jax-compilation``, see noxfile.py), shared by the workers (JAX
# writes an entry unlocked: a worker that reads the other's half-written file warns and
# compiles, see ``filterwarnings`` in pyproject.toml); a plain ``pytest`` gets a fresh
# directory per worker, removed at exit. Every compilation is kept, however quick. Set
# before Keras imports JAX.
if os.environ.get("KERAS_BACKEND") == "jax":
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _jax_cache = tempfile.mkdtemp(prefix="bnfreeze-tests-jax-cache-")
        atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _jax_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import settings

# Two logical CPU devices so MirroredStrategy tests have two replicas. This must happen
# before TensorFlow initialises its devices, i.e. at import of the first test module.
_cpus = tf.config.list_physical_devices("CPU")
with contextlib.suppress(RuntimeError):  # devices already initialised
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )

from bnfreeze._compat import keras  # noqa: E402  (after the device set-up)
from tests.helpers import BACKEND  # noqa: E402

#: Hypothesis profiles, chosen by ``HYPOTHESIS_PROFILE``. ``ci`` (the default, what ``nox``
#: runs) draws the examples each test asks for (``tests.helpers.examples(n)``: ``n``);
#: ``quick`` (``nox -s quick``, the inner loop) draws at most 4 per test.
settings.register_profile("ci", max_examples=100)
settings.register_profile("quick", max_examples=4)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def _settled_heap():
    """Everything alive before the first test (TensorFlow, Keras, the test modules) is moved
    out of the garbage collector's reach (``gc.freeze``). Keras 3's ``clear_session()`` runs
    ``gc.collect()``, which otherwise walks those ~300,000 objects before every test: 0.2 to
    0.8 s each, a third of the suite. What the tests create is still collected as before."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module", autouse=True)
def _settled_module_heap(_settled_heap: None) -> None:
    """The same at the start of each test module, for what the modules before it left alive
    (lazily imported Keras modules, applications, caches); their models are cleared first."""
    keras.backend.clear_session()
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _fresh_session():
    """Each test starts from a clear Keras session and fixed seeds."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield


@pytest.fixture
def mixed_float16():
    """Run the test under the mixed_float16 policy; float32 again afterwards."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


#: Test files moved to the front of the run, longest first. With ``--dist loadfile`` each
#: file runs whole on one worker and files are handed out in collection order, so a long
#: file collected late (the fine-tuning docs page takes as long as many files together)
#: is what the whole run waits for at its end, one worker idle. Started first, it runs
#: while the other worker takes the rest; the next longest follow (seconds of the two
#: workers' time on keras 3.15, 2026-12-04: 65, 43, 33, 25), so that what is left for the
#: end is short files (``nox -s quick``, which has no docs page, starts with them). Within
#: a file the order stays the same.
LONGEST_FIRST = (
    "test_doc_examples_long.py",
    "test_callbacks.py",
    "test_lr_multipliers.py",
    "test_freeze.py",
    "test_serialization.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    # tf.distribute exists where TensorFlow is the backend (JAX's keras.distribution is
    # tested in test_backend_recalibrate.py).
    if BACKEND != "tensorflow":
        skip = pytest.mark.skip(reason="TensorFlow only: tf.distribute")
        for item in items:
            if item.get_closest_marker("distributed"):
                item.add_marker(skip)
