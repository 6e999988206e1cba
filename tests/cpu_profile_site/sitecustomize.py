"""Counts Python starts for tests/cpu_profile.py, which puts this folder on ``PYTHONPATH`` (as
coverage.py reaches subprocesses): every Python process a profiled test starts, and theirs,
appends the test's id to the file named by ``TRAINER_CPU_PROFILE_STARTS`` as it starts."""

import os

_starts = os.environ.get("TRAINER_CPU_PROFILE_STARTS")
_test = os.environ.get("TRAINER_CPU_PROFILE_TEST")
if _starts and _test:
    try:
        with open(_starts, "a") as _out:  # one short line per append: lines stay whole
            _out.write(_test + "\n")
    except OSError:
        pass  # a count missed, never a process failed
