"""llama-server's LLAMA_ARG_* environment variables (alpaca2/server/env_args.py): a variable sets its
flag, the command line wins, booleans follow llama.cpp's common/arg.cpp, bad values are one-line
usage errors naming the variable."""
import subprocess
import sys

import httpx
import pytest

from alpaca2.server.args import EXIT_USAGE, parse_args
from server_process import ServerProcess


def _clean(monkeypatch):
    import os
    for k in list(os.environ):
        if k.startswith("LLAMA_ARG_"):
            monkeypatch.delenv(k)


def test_a_variable_sets_its_flag_and_the_command_line_wins(monkeypatch):
    _clean(monkeypatch)
    monkeypatch.setenv("LLAMA_ARG_CTX_SIZE", "1234")
    monkeypatch.setenv("LLAMA_ARG_N_PARALLEL", "2")
    monkeypatch.setenv("LLAMA_ARG_TEMPERATURE", "-0.5")       # a value that starts with '-' stays a value
    monkeypatch.setenv("LLAMA_ARG_ALIAS", "my-model")
    args = parse_args(["--demo", "-np", "3"])
    assert (args.ctx_size, args.parallel, args.alias) == (1234, 3, "my-model")
    args = parse_args(["--demo", "--parallel=1", "--ctx-size", "512"])
    assert (args.ctx_size, args.parallel) == (512, 1)


def test_switches_and_booleans(monkeypatch):
    _clean(monkeypatch)
    monkeypatch.setenv("LLAMA_ARG_ENDPOINT_METRICS", "true")
    monkeypatch.setenv("LLAMA_ARG_EMBEDDINGS", "0")             # a switch: false leaves it off
    monkeypatch.setenv("LLAMA_ARG_KV_UNIFIED", "enabled")
    args = parse_args(["--demo"])
    assert args.metrics and not args.embedding and args.kv_unified and args.slots
    monkeypatch.setenv("LLAMA_ARG_ENDPOINT_SLOTS", "off")
    assert parse_args(["--demo"]).slots is False
    monkeypatch.setenv("LLAMA_ARG_ENDPOINT_SLOTS", "on")
    monkeypatch.setenv("LLAMA_ARG_NO_ENDPOINT_SLOTS", "1")      # the NO_ form wins, as in llama.cpp
    assert parse_args(["--demo"]).slots is False
    assert parse_args(["--demo", "--slots"]).slots is True      # the command line wins


@pytest.mark.parametrize("var, value, shown", [
    ("LLAMA_ARG_CTX_SIZE", "lots", "(from LLAMA_ARG_CTX_SIZE)"),
    ("LLAMA_ARG_JINJA", "maybe", "LLAMA_ARG_JINJA='maybe' is not a boolean"),
    ("LLAMA_ARG_FLASH_ATTN", "sideways", "(from LLAMA_ARG_FLASH_ATTN)"),
])
def test_a_bad_value_is_a_usage_error_naming_the_variable(tmp_path, var, value, shown):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("LLAMA_ARG_")}
    r = subprocess.run([sys.executable, "-m", "alpaca2", "serve", "--demo"], env=dict(env, **{var: value}),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == EXIT_USAGE
    assert shown in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_variables_of_flags_we_lack_are_named_once(monkeypatch, capsys):
    _clean(monkeypatch)
    monkeypatch.setenv("LLAMA_ARG_MMPROJ", "vision.gguf")
    monkeypatch.setenv("LLAMA_ARG_NUMA", "distribute")
    parse_args(["--demo"])
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "LLAMA_ARG_MMPROJ" in err and "LLAMA_ARG_NUMA" in err


def test_a_server_configured_by_the_environment_alone(tiny_path):
    """As a llama-server container is: model, context, slots, alias and an endpoint from variables."""
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    env.update(LLAMA_ARG_MODEL=str(tiny_path), LLAMA_ARG_CTX_SIZE="512", LLAMA_ARG_N_PARALLEL="2",
               LLAMA_ARG_ALIAS="from-env", LLAMA_ARG_ENDPOINT_METRICS="1", LLAMA_ARG_THREADS="1")
    srv = ServerProcess.__new__(ServerProcess)
    srv.start([sys.executable, "-m", "alpaca2", "serve", "--port", "0"], env=env)
    try:
        props = httpx.get(srv.url + "/props", timeout=30).json()
        assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == 256
        assert httpx.get(srv.url + "/v1/models", timeout=30).json()["data"][0]["id"] == "from-env"
        assert httpx.get(srv.url + "/metrics", timeout=30).status_code == 200
    finally:
        srv.stop()
