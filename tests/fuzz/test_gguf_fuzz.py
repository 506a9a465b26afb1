"""The GGUF fuzz run CI does: every mutated file ends in ModelLoadError or a successful load.

ALPACA2_FUZZ_CASES sets the number of cases (default 300); ALPACA2_FUZZ_SEED the seed.  A longer
run, or one without alpaca2's pre-check: python tests/fuzz/gguf_fuzz.py --help.
"""
import os

import pytest

import gguf_fuzz

N_CASES = int(os.environ.get("ALPACA2_FUZZ_CASES", "300"))
SEED = int(os.environ.get("ALPACA2_FUZZ_SEED", "0"))


@pytest.fixture(scope="module")
def seed_model(tmp_path_factory):
    return gguf_fuzz.tiny_fuzz_model(tmp_path_factory.mktemp("fuzz") / "seed.gguf")


def test_the_layout_walker_understands_the_seed_model(seed_model):
    data = open(seed_model, "rb").read()
    lay = gguf_fuzz.Layout(data)
    assert lay.kv("tokenizer.ggml.tokens")["count"] == 600
    assert len(lay.tensors) == 12 and lay.data_start % lay.alignment == 0
    kvs, tis, blob = lay.header_and_blob()
    assert gguf_fuzz.build(kvs, tis, blob, lay.alignment) == data     # rebuilding is exact


@pytest.mark.slow
@pytest.mark.parametrize("use", [False, True], ids=["load", "load+use"])
def test_mutated_gguf_files_give_model_load_error_never_a_crash(seed_model, tmp_path, use):
    data = open(seed_model, "rb").read()
    n = N_CASES if not use else max(N_CASES // 3, 50)
    results = gguf_fuzz.run_cases(gguf_fuzz.cases(data, n, SEED + use), tmp_path, timeout=60,
                                  use=use)
    by_cat, total = gguf_fuzz.summary(results)
    assert sum(total.values()) == n
    assert set(by_cat) == set(gguf_fuzz.CATEGORIES)          # every kind of mutation ran
    bad = [r for r in results if r[2] not in ("loaded", "precheck", "llama")]
    assert not bad, bad[:10]
    # most mutations break the file, and the pre-check is what catches most of them
    assert total["precheck"] > n // 2, total


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "hybrid"])
def test_mutated_recurrent_and_hybrid_models_never_crash(tmp_path, kind):
    # their own keys (ssm.* sizes, per-layer head counts ...) and tensor types, then a decode
    seed = gguf_fuzz.arch_fuzz_model(tmp_path / f"{kind}.gguf", kind)
    data = open(seed, "rb").read()
    n = max(N_CASES // 2, 60)
    results = gguf_fuzz.run_cases(gguf_fuzz.cases(data, n, SEED, ["arch_metadata", "retype", "tensor_shape"]),
                                  tmp_path, timeout=60, use=True)
    bad = [r for r in results if r[2] not in ("loaded", "precheck", "llama")]
    assert not bad, bad[:10]
    by_cat, total = gguf_fuzz.summary(results)
    assert total["precheck"] > 0 and total["loaded"] > 0, total
