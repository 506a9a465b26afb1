"""libgomp's idle spin: alpaca2 sets a short one (GOMP_SPINCOUNT=2000) while _core loads, unless the
user set GOMP_SPINCOUNT or OMP_WAIT_POLICY, and leaves the environment as it found it (children such
as llama-bench keep libgomp's default).  Why: benchmarks/results/server-load.md."""
import json
import os

import pytest

from conftest import run_python

SHOW = ("import os, json, alpaca2\n"
        "print(json.dumps([alpaca2.OPENMP_SPIN, os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY')]))")


@pytest.mark.parametrize("env, want", [
    ({}, ["2000", None, None]),
    ({"GOMP_SPINCOUNT": "50"}, [None, "50", None]),
    ({"OMP_WAIT_POLICY": "active"}, [None, None, "active"]),
])
def test_a_short_spin_unless_the_user_chose(env, want):
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    r = run_python(SHOW, env=dict(base, **env))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == want
