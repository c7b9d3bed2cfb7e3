"""Test harness: 8 CPU devices so every sharding path is exercised without accelerators, compiled fast
(XLA backend optimisation level 0, XLA:CPU's loop emitters; tests/cpu_env.py says why and where not),
and one persistent XLA compilation cache for the session."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_env import xla_flags  # noqa: E402  (tests/cpu_env.py: the subprocesses use it too)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

assert jax.device_count() == 8, f"conftest expected 8 CPU devices, got {jax.device_count()}"

import pytest  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402

_CACHE_OPTIONS = {"jax_compilation_cache_dir": None, "jax_persistent_cache_min_compile_time_secs": 0.0,
                  "jax_persistent_cache_min_entry_size_bytes": 0}


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent XLA compilation cache shared by every test of the session, on every xdist worker
    (and by the subprocesses a test starts with these options in its environment): the same program built by
    different jit wrappers (the demo's three fine-tuning runs, a resumed run, orbax's many small copy
    programs) is compiled once. Speed only; results do not depend on it. Yields the options."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one cache for the session's workers: their basetemps' parent
        directory = tmp_path_factory.getbasetemp().parent / "xla_cache"
        directory.mkdir(exist_ok=True)
    else:
        directory = tmp_path_factory.mktemp("xla_cache")
    options = dict(_CACHE_OPTIONS, jax_compilation_cache_dir=str(directory))
    previous = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield options
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


# The longest test files first: with `-n 2 --dist loadfile` (pytest.ini) each file runs whole on one
# worker, in this order, so the long ones do not start last and leave the other worker idle.
LONGEST_FIRST = ("test_topology.py", "test_finetune.py", "test_pretrain.py", "test_crash_safety.py", "test_models.py",
                 "test_aot.py", "test_workdir_lock.py", "test_bench_multihost.py", "test_evaluate.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
