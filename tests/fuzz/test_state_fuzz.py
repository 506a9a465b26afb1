"""The state fuzz run CI does on recurrent and hybrid models: every mutated state ends in
StateError from alpaca2's check or loads and decodes; never a signal or a hang, and nothing the
check lets through is then refused by llama.cpp.

ALPACA2_STATE_FUZZ_CASES sets the number of cases (default 400).  A longer run, or one without
the check: python tests/fuzz/state_fuzz.py --help.
"""
import os

import state_fuzz

N_CASES = int(os.environ.get("ALPACA2_STATE_FUZZ_CASES", "400"))
SEED = int(os.environ.get("ALPACA2_FUZZ_SEED", "0"))


def test_mutated_recurrent_and_hybrid_states_give_state_error_never_a_crash(tmp_path):
    models = state_fuzz.make_models(tmp_path)
    states = state_fuzz.seed_states(models, tmp_path)
    results = state_fuzz.run_cases(state_fuzz.cases(states, N_CASES, SEED), models, tmp_path, timeout=60)
    outcomes = [r[3] for r in results]
    assert len(results) == N_CASES
    bad = [r for r in results if r[3] not in ("precheck", "loaded")]
    assert not bad, bad[:10]
    assert outcomes.count("precheck") > N_CASES // 2
    assert {r[1] for r in results} == set(state_fuzz.CATEGORIES)
