"""The .pxd declarations against llama.cpp's headers: names and order drift between versions."""
import re
from pathlib import Path

import pytest

import alpaca2
from conftest import LLAMA_CPP_DIR

PXD_DIR = Path(alpaca2.get_include()) / "alpaca2" / "_c"
# one .pxd per C header
HEADERS = {"llama.pxd": LLAMA_CPP_DIR / "include" / "llama.h",
           "ggml.pxd": LLAMA_CPP_DIR / "ggml" / "include" / "ggml.h",
           "ggml_backend.pxd": LLAMA_CPP_DIR / "ggml" / "include" / "ggml-backend.h",
           "ggml_rpc.pxd": LLAMA_CPP_DIR / "ggml" / "include" / "ggml-rpc.h"}
# the .pxd files that declare named enums
WITH_ENUMS = ["ggml.pxd", "ggml_backend.pxd", "llama.pxd"]
# the function prefix each .pxd declares (its header's own API)
PREFIX = {"llama.pxd": "llama_", "ggml.pxd": "ggml_", "ggml_backend.pxd": "ggml_backend_",
          "ggml_rpc.pxd": "ggml_backend_rpc_"}
# structs whose every field the .pxd must declare (we fill them field by field)
COMPLETE = {"llama_model_params", "llama_context_params", "llama_batch", "llama_token_data",
            "llama_token_data_array", "llama_perf_context_data", "llama_perf_sampler_data"}


def strip_c_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def c_enums(text):
    out = {}
    for name, body in re.findall(r"enum\s+(\w+)\s*\{(.*?)\}", text, flags=re.S):
        out[name] = [m.split("=")[0].strip() for m in body.split(",") if m.strip()]
    return out


def c_structs(text):
    out = {}
    for name, body in re.findall(r"struct\s+(\w+)\s*\{(.*?)\}\s*\w*\s*;", text, flags=re.S):
        fields = []
        for decl in body.split(";"):
            decl = decl.strip()
            if not decl or decl.startswith("union") or "(" in decl:
                continue
            fields.append(re.findall(r"(\w+)\s*(?:\[\w*\])?\s*$", decl)[0])
        out[name] = fields
    return out


def pxd_blocks(text, kind):
    out = {}
    for m in re.finditer(rf"^\s+(?:ctypedef\s+)?{kind}\s+(\w+):\n((?:\s{{8}}.*\n)+)", text, flags=re.M):
        members = []
        for line in m.group(2).splitlines():
            line = line.split("#")[0].strip()
            if line and line != "pass":
                members.append(re.findall(r"(\w+)\s*(?:\[\w*\])?$", line)[0])
        out[m.group(1)] = members
    return out


@pytest.fixture(scope="module")
def headers():
    if not HEADERS["llama.pxd"].exists():
        pytest.skip("llama.cpp source tree not available")
    out = {}
    for pxd, h in HEADERS.items():
        out[pxd] = strip_c_comments(h.read_text())
    return out


# alpaca2's own C++ shim over llama.cpp's common library: its .pxd declares our header, not llama.cpp's
OWN_PXD = {"common_shim.pxd": Path(__file__).resolve().parents[1] / "src" / "alpaca2" / "_common_shim.h",
           "spec_shim.pxd": Path(__file__).resolve().parents[1] / "src" / "alpaca2" / "_spec_shim.h"}


def test_there_is_one_pxd_per_header():
    names = sorted(p.name for p in PXD_DIR.glob("*.pxd") if p.name != "__init__.pxd")
    assert names == sorted(list(HEADERS) + list(OWN_PXD))


@pytest.mark.parametrize("pxd", sorted(OWN_PXD))
def test_the_shim_pxd_matches_its_header(pxd):
    text = (PXD_DIR / pxd).read_text()
    header = strip_c_comments(OWN_PXD[pxd].read_text())
    names = re.findall(r"^\s+(?:int|void|bool|int32_t|formatter \*|speculator \*|[\w:<>]+)\s+(\w+)\(", text,
                       flags=re.M)
    assert len(names) >= 3, f"no functions parsed from {pxd}"
    missing = [n for n in names if not re.search(rf"\b{n}\s*\(", header)]
    assert not missing, f"declared in {pxd} but not in {OWN_PXD[pxd].name}: {missing}"
    fields = re.findall(r"^        (?:int|string|vector\[int\])\s+([\w, ]+)$", text, flags=re.M)
    for name in (f.strip() for line in fields for f in line.split(",")):
        assert re.search(rf"\b{name}\b", header), f"{pxd}: field {name} is not in {OWN_PXD[pxd].name}"


@pytest.mark.parametrize("pxd", WITH_ENUMS)
def test_enum_members_exist_in_the_header_in_the_same_order(pxd, headers):
    decl = pxd_blocks((PXD_DIR / pxd).read_text(), "enum")
    have = c_enums(headers[pxd])
    assert decl, "no enums parsed from the .pxd"
    for name, members in decl.items():
        assert name in have, f"enum {name} is not in the header"
        missing = [m for m in members if m not in have[name]]
        assert not missing, f"{name}: {missing} not in the header"
        order = [have[name].index(m) for m in members]
        assert order == sorted(order), f"{name}: members out of order"


def test_struct_fields_match_the_header(headers):
    decl = pxd_blocks((PXD_DIR / "llama.pxd").read_text(), "struct")
    have = c_structs(headers["llama.pxd"])
    # typedef'd structs are declared "ctypedef struct X:" in the .pxd and "typedef struct X {..} X;" in C
    for name, fields in decl.items():
        if not fields:
            continue
        assert name in have, f"struct {name} is not in the header"
        extra = [f for f in fields if f not in have[name]]
        assert not extra, f"{name}: {extra} are not fields of the C struct"
        if name in COMPLETE:
            assert fields == have[name], f"{name}: the .pxd must list every field in order"
    assert COMPLETE <= set(decl), f"not parsed: {COMPLETE - set(decl)}"


def test_functions_declared_in_the_pxd_exist_in_the_header(headers):
    text = (PXD_DIR / "llama.pxd").read_text()
    # a renamed declaration (`name "c_name"(...)`) is checked by its C name
    names = [c or py for py, c in
             re.findall(r"^\s+[\w\s\*]*?\b(llama_\w+)\s*(?:\"(\w+)\")?\s*\(", text, flags=re.M)]
    assert len(names) > 80
    for n in set(names):
        assert re.search(rf"\b{n}\s*\(", headers["llama.pxd"]), f"{n} is not declared in llama.h"


@pytest.mark.parametrize("pxd", sorted(HEADERS))
def test_each_pxd_declares_only_functions_of_its_own_header(pxd, headers):
    text = (PXD_DIR / pxd).read_text()
    prefix = PREFIX[pxd]
    names = [c or py for py, c in
             re.findall(rf"^\s+[\w\s\*]*?\b({prefix}\w+)\s*(?:\"(\w+)\")?\s*\(", text, flags=re.M)]
    assert names, f"no functions parsed from {pxd}"
    for n in set(names):
        assert re.search(rf"\b{n}\s*\(", headers[pxd]), f"{n} is not declared in {HEADERS[pxd].name}"


def test_rpc_constants_are_the_headers(headers):
    text = (PXD_DIR / "ggml_rpc.pxd").read_text()
    names = re.findall(r"^\s+(RPC_PROTO_\w+|GGML_RPC_\w+)\s*$", text, flags=re.M)
    assert len(names) == 4
    for name in names:
        assert re.search(rf"#define\s+{name}\b", HEADERS["ggml_rpc.pxd"].read_text()), \
            f"{name} is not defined in ggml-rpc.h"
