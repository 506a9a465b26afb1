"""GGUF metadata values this llama.cpp aborts on (issue 14), and non-regular model files.

Each case is a well-formed file with one metadata value changed.  alpaca2's pre-check
(alpaca2._gguf_check) refuses it with ModelLoadError; the same file with the pre-check switched off
still kills the interpreter inside llama.cpp (a GGML_ASSERT at load time, or in the first
tokenize), which shows that the rule is needed.  The values come from reading
src/llama-model.cpp (load_hparams) and src/llama-vocab.cpp (load, tokenize) of the vendored copy.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import alpaca2
from alpaca2 import _files, _gguf_check

from conftest import run_python

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import gguf_fuzz  # noqa: E402
from gguf_fuzz import ARR, STR, U32  # noqa: E402

U8, BOOL = 0, 7


@pytest.fixture(scope="module")
def seed_bytes(tmp_path_factory):
    path = gguf_fuzz.tiny_fuzz_model(tmp_path_factory.mktemp("meta") / "seed.gguf")
    return Path(path).read_bytes()


def edit(data, set_keys=(), drop=()):
    """data with key/value pairs replaced or added ((key, type, value[, element type]) tuples)
    and keys dropped."""
    lay = gguf_fuzz.Layout(data)
    kvs, tis, blob = lay.header_and_blob()
    keys = [kv["key"] for kv in lay.kvs]
    records = dict(zip(keys, kvs))
    for key in drop:
        records.pop(key)
    for key, vtype, value, *etype in set_keys:
        records[key] = gguf_fuzz.kv_record(key, vtype, value, etype[0] if etype else None)
    return gguf_fuzz.build(list(records.values()), tis, blob, lay.alignment)


LOAD_AND_USE = """
import sys, alpaca2, alpaca2._gguf_check
if sys.argv[2] == "off":
    alpaca2._gguf_check.validate = lambda path: None
try:
    m = alpaca2.Model(sys.argv[1])
    m.tokenize("hello world", add_bos=True)
    print("USED")
except alpaca2.ModelLoadError as e:
    print("ModelLoadError:", e)
except Exception as e:
    print("other:", type(e).__name__, e)
"""


def load_and_use(path, precheck):
    env = dict(os.environ, GGML_NO_BACKTRACE="1")        # ggml's abort would start gdb
    return subprocess.run([sys.executable, "-c", LOAD_AND_USE, str(path), "on" if precheck else "off"],
                          capture_output=True, text=True, timeout=120, env=env)


def assert_refused_and_llama_cpp_aborts(path, message, abort_text):
    r = load_and_use(path, precheck=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ModelLoadError:" in r.stdout and "is not a valid GGUF file" in r.stdout, r.stdout
    assert message in r.stdout, r.stdout
    r = load_and_use(path, precheck=False)
    assert r.returncode < 0 and abort_text in r.stderr, (r.returncode, r.stdout, r.stderr[-2000:])


A = "llama"
CASES = {
    "expert_count 2**20": (
        [(f"{A}.expert_count", U32, 2 ** 20), (f"{A}.expert_used_count", U32, 2)],
        "expert_count is 1048576", "n_expert <= LLAMA_MAX_EXPERTS"),
    "expert_used_count > expert_count": (
        [(f"{A}.expert_count", U32, 4), (f"{A}.expert_used_count", U32, 8)],
        "expert_used_count is 8, more than", "n_expert_used_max <= hparams.n_expert"),
    "expert_used_count per layer > expert_count": (
        [(f"{A}.expert_count", U32, 4), (f"{A}.expert_used_count", ARR, [9], U32)],
        "expert_used_count is 9, more than", "n_expert_used_max <= hparams.n_expert"),
    "expert_used_count 0 with experts": (
        [(f"{A}.expert_count", U32, 4), (f"{A}.expert_used_count", U32, 0)],
        "must use at least one", "n_expert_used_max > 0"),
    "expert_used_count without experts": (
        [(f"{A}.expert_used_count", U32, 2)],
        "more than llama.expert_count 0", "n_expert_used_max <= hparams.n_expert"),
    "expert_group_count >= expert_count": (
        [(f"{A}.expert_count", U32, 4), (f"{A}.expert_used_count", U32, 2),
         (f"{A}.expert_group_count", U32, 4)],
        "expert_group_count is 4; it must be below", "n_expert_groups < hparams.n_expert"),
    "expert_count not a multiple of the groups": (
        [(f"{A}.expert_count", U32, 8), (f"{A}.expert_used_count", U32, 2),
         (f"{A}.expert_group_count", U32, 3), (f"{A}.expert_group_used_count", U32, 1)],
        "is not a multiple of", "n_expert % hparams.n_expert_groups == 0"),
    "expert_group_used_count 0": (
        [(f"{A}.expert_count", U32, 8), (f"{A}.expert_used_count", U32, 2),
         (f"{A}.expert_group_count", U32, 2)],
        "expert_group_used_count is 0", "n_group_used > 0"),
    "expert_group_used_count >= groups": (
        [(f"{A}.expert_count", U32, 8), (f"{A}.expert_used_count", U32, 2),
         (f"{A}.expert_group_count", U32, 2), (f"{A}.expert_group_used_count", U32, 2)],
        "expert_group_used_count is 2", "n_group_used < hparams.n_expert_groups"),
    "expert groups without experts": (
        [(f"{A}.expert_group_count", U32, 2)],
        "has no experts", "n_expert_groups == 0"),
    "nextn_predict_layers > block_count": (
        [(f"{A}.nextn_predict_layers", U32, 5)],
        "nextn_predict_layers is 5", "n_layer_nextn <= hparams.n_layer_all"),
    "unknown rope scaling type": (
        [(f"{A}.rope.scaling.type", STR, "dynamic")],
        "rope.scaling.type is 'dynamic'", "LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hparams_llama_cpp_asserts_on_are_refused(seed_bytes, tmp_path, name):
    keys, message, abort_text = CASES[name]
    path = tmp_path / "m.gguf"
    path.write_bytes(edit(seed_bytes, keys))
    assert_refused_and_llama_cpp_aborts(path, message, abort_text)


@pytest.mark.parametrize("bos", ["missing", 600, 2 ** 32 - 1])
def test_t5_vocabulary_told_to_add_a_bos_it_lacks_is_refused(seed_bytes, tmp_path, bos):
    # loads in llama.cpp, then the first tokenize aborts (GGML_ASSERT special_bos_id != NULL)
    keys = [("tokenizer.ggml.model", STR, "t5"), ("tokenizer.ggml.add_bos_token", BOOL, True)]
    drop = ["tokenizer.ggml.bos_token_id"]
    if bos != "missing":
        keys.append(("tokenizer.ggml.bos_token_id", U32, bos))
        drop = []
    path = tmp_path / "t5.gguf"
    path.write_bytes(edit(seed_bytes, keys, drop))
    assert_refused_and_llama_cpp_aborts(path, "adds a BOS token but has none",
                                        "special_bos_id != LLAMA_TOKEN_NULL")


def test_an_out_of_range_eos_id_keeps_the_default_and_passes(seed_bytes, tmp_path):
    keys = [("tokenizer.ggml.add_eos_token", BOOL, True), ("tokenizer.ggml.eos_token_id", U32, 600)]
    path = tmp_path / "eos.gguf"
    data = edit(seed_bytes, keys)
    path.write_bytes(data)
    # eos 600 is out of range: llama.cpp keeps the default 2, which exists: a good file
    _gguf_check.validate(path)
    r = load_and_use(path, precheck=False)
    assert r.returncode == 0 and "USED" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("keys", [
    [(f"{A}.expert_count", U32, 0), (f"{A}.expert_used_count", U32, 0)],
    [(f"{A}.rope.scaling.type", STR, "yarn")],
    [(f"{A}.nextn_predict_layers", U32, 1)],
    [("tokenizer.ggml.model", STR, "t5")],                # t5 adds no BOS by default: fine
])
def test_good_values_still_pass(seed_bytes, tmp_path, keys):
    path = tmp_path / "ok.gguf"
    path.write_bytes(edit(seed_bytes, keys))
    _gguf_check.validate(path)


# -- non-regular files -----------------------------------------------------------------------------

def test_a_fifo_is_refused_at_once_not_opened(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    # in a subprocess: opening the FIFO would block forever (the timeout would then fail the test)
    code = f"""
import alpaca2
from alpaca2 import _gguf_check, _files
for check in (_gguf_check.validate, lambda p: _files.check_regular_file(p, "model file")):
    try:
        check({str(fifo)!r})
    except alpaca2.ModelLoadError as e:
        print(type(e).__name__, isinstance(e, OSError), e)
"""
    r = run_python(code, timeout=60)
    lines = r.stdout.splitlines()
    assert len(lines) == 2, (r.stdout, r.stderr)
    assert all(line.startswith("ModelLoadError True") and "is a FIFO (named pipe)" in line for line in lines)


@pytest.mark.parametrize("path,kind", [("/dev/zero", "a character device"), ("/dev/null", "a character device")])
def test_devices_and_directories_are_refused(path, kind, tmp_path):
    with pytest.raises(alpaca2.ModelLoadError, match=kind):
        _gguf_check.validate(path)
    with pytest.raises(alpaca2.ModelLoadError, match="is a directory") as e:
        _files.check_regular_file(tmp_path, "model file")
    assert e.value.errno == 21
    with pytest.raises(alpaca2.StateError, match="state file not found") as e:
        _files.check_regular_file(tmp_path / "none", "state file", alpaca2.StateError)
    assert e.value.errno == 2 and isinstance(e.value, OSError)


# -- recurrent and hybrid architectures, and tensor types the kernels abort on ---------------------
# These abort at the first decode (a ggml kernel's GGML_ASSERT) or at load (a model's own assert),
# so the reproducer makes a context and decodes.

LOAD_AND_DECODE = """
import sys, alpaca2, alpaca2._gguf_check
if sys.argv[2] == "off":
    alpaca2._gguf_check.validate = lambda path: None
try:
    m = alpaca2.Model(sys.argv[1])
    with alpaca2.Context(m, n_ctx=64, n_batch=32, n_threads=1) as c:
        c.decode(m.tokenize("hello world", add_bos=True))
    print("USED")
except alpaca2.ModelLoadError as e:
    print("ModelLoadError:", e)
except Exception as e:
    print("other:", type(e).__name__, e)
"""


def load_and_decode(path, precheck, timeout=120):
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    return subprocess.run([sys.executable, "-c", LOAD_AND_DECODE, str(path), "on" if precheck else "off"],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_refused_and_decode_aborts(path, message, abort_text):
    r = load_and_decode(path, precheck=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ModelLoadError:" in r.stdout and "is not a valid GGUF file" in r.stdout, r.stdout
    assert message in r.stdout, r.stdout
    r = load_and_decode(path, precheck=False)
    assert r.returncode < 0 and abort_text in r.stderr, (r.returncode, r.stdout, r.stderr[-2000:])


@pytest.fixture(scope="module")
def arch_seeds(tmp_path_factory):
    d = tmp_path_factory.mktemp("arch")
    return {kind: Path(gguf_fuzz.arch_fuzz_model(d / f"{kind}.gguf", kind)).read_bytes()
            for kind in ("mamba", "hybrid")}


H = "granitehybrid"
ARCH_CASES = {
    "granitehybrid ssm.inner_size != 2 * n_embd": (
        "hybrid", [(f"{H}.ssm.inner_size", U32, 128)],
        "ssm.inner_size is 128, but llama.cpp supports only 2 x", "2 * n_embd == d_inner"),
    "granitehybrid embedding_length changed (d_inner no longer 2x)": (
        "hybrid", [(f"{H}.embedding_length", U32, 16), (f"{H}.rope.dimension_count", U32, 4)],
        "ssm.inner_size is 64, but llama.cpp supports only 2 x", "2 * n_embd == d_inner"),
    "rope.dimension_count > head size": (
        "hybrid", [(f"{H}.rope.dimension_count", U32, 256)],
        "rope.dimension_count is 256, more than the head size 8", "n_dims <= ne0"),
    "rope.dimension_count odd": (
        "hybrid", [(f"{H}.rope.dimension_count", U32, 7)],
        "rotary dimensions come in pairs", "n_dims % 2 == 0"),
}


@pytest.mark.parametrize("name", list(ARCH_CASES))
def test_recurrent_and_hybrid_hparams_llama_cpp_asserts_on_are_refused(arch_seeds, tmp_path, name):
    kind, keys, message, abort_text = ARCH_CASES[name]
    path = tmp_path / f"{kind}.gguf"
    path.write_bytes(edit(arch_seeds[kind], keys))
    assert_refused_and_decode_aborts(path, message, abort_text)


def test_rope_dimension_count_0_is_refused_and_would_hang(arch_seeds, tmp_path):
    path = tmp_path / "hybrid.gguf"
    path.write_bytes(edit(arch_seeds["hybrid"], [(f"{H}.rope.dimension_count", U32, 0)]))
    r = load_and_decode(path, precheck=True)
    assert r.returncode == 0 and "rope.dimension_count is 0" in r.stdout, (r.stdout, r.stderr[-2000:])
    with pytest.raises(subprocess.TimeoutExpired):       # llama.cpp alone: the decode never ends
        load_and_decode(path, precheck=False, timeout=15)


# (seed, tensor, text of ggml's abort)
TYPE_CASES = [
    ("llama", "output_norm.weight", "binary_op: unsupported types"),
    ("llama", "blk.0.attn_norm.weight", "binary_op: unsupported types"),
    ("mamba", "blk.0.ssm_dt.bias", "binary_op: unsupported types"),
    ("mamba", "blk.0.ssm_d", "binary_op: unsupported types"),
    ("mamba", "blk.0.ssm_a", "src3->nb[0] == sizeof(float)"),
    ("mamba", "blk.0.ssm_conv1d.weight", "src1->nb[0] == sizeof(float)"),
    ("hybrid", "blk.0.ssm_norm.weight", "binary_op: unsupported types"),
]


@pytest.mark.parametrize("seed,tensor,abort_text", TYPE_CASES, ids=[f"{c[0]}-{c[1]}" for c in TYPE_CASES])
def test_norms_biases_and_ssm_tensors_of_another_type_than_f32_are_refused(
        seed_bytes, arch_seeds, tmp_path, seed, tensor, abort_text):
    data = seed_bytes if seed == "llama" else arch_seeds[seed]
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf_fuzz.retype(data, tensor, 1))            # stored as f16
    assert_refused_and_decode_aborts(path, f"tensor '{tensor}' is of type f16", abort_text)


@pytest.mark.parametrize("kind", ["mamba", "hybrid"])
def test_good_recurrent_and_hybrid_models_pass_and_decode(arch_seeds, tmp_path, kind):
    path = tmp_path / f"{kind}.gguf"
    # matrices may be stored in other types: f16 ssm_out/ssm_in is fine
    path.write_bytes(gguf_fuzz.retype(arch_seeds[kind], "blk.0.ssm_out.weight", 1))
    _gguf_check.validate(path)
    r = load_and_decode(path, precheck=True)
    assert r.returncode == 0 and "USED" in r.stdout, (r.stdout, r.stderr[-2000:])


# Files whose tensors agree with their Mamba-2 head and group counts: only the counts are wrong
SSM_SHAPE_CASES = {
    "time_step_rank does not divide inner_size": (
        dict(n_ssm_head=5), [], "time_step_rank is 5, which does not divide", "d_inner % n_head == 0"),
    "group_count does not divide inner_size": (
        dict(n_group=3), [], "group_count is 3, which does not divide", "d_inner % n_group == 0"),
    "group_count 0 (d_state 0 keeps the tensors consistent)": (
        dict(d_state=0), [(f"{H}.ssm.group_count", U32, 0)], "group_count is 0", None),
}


@pytest.mark.parametrize("name", list(SSM_SHAPE_CASES))
def test_mamba2_head_and_group_counts_llama_cpp_crashes_on_are_refused(tmp_path, tokenizer_path, name):
    from alpaca2 import testing_archs
    shape, keys, message, abort_text = SSM_SHAPE_CASES[name]
    path = Path(testing_archs.make_granite_hybrid_model(tmp_path / "h.gguf", tokenizer=tokenizer_path,
                                                        shape=shape))
    if keys:
        path.write_bytes(edit(path.read_bytes(), keys))
    if abort_text is not None:
        assert_refused_and_decode_aborts(path, message, abort_text)
        return
    r = load_and_decode(path, precheck=True)
    assert r.returncode == 0 and message in r.stdout, (r.stdout, r.stderr[-2000:])
    r = load_and_decode(path, precheck=False)
    assert r.returncode == -8, (r.returncode, r.stderr[-2000:])        # SIGFPE: d_inner / 0
