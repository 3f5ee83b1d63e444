"""Test-only start-up hook: on PYTHONPATH only where a test puts it (tests/faults.py:
``fault_env``); installs the faults named in ``FEDASR_TEST_FAULTS`` in this process."""

import os

if os.environ.get("FEDASR_TEST_FAULTS"):
    import importlib.util
    import sys

    _spec = importlib.util.spec_from_file_location(
        "fedasr_test_faults", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "faults.py"))
    _faults = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _faults
    _spec.loader.exec_module(_faults)
    _faults.install_from_env()
