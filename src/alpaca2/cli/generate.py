"""``alpaca2 generate``: continue a text prompt (base models), streamed, as llama-completion does."""
from __future__ import annotations

import sys

from alpaca2.cli import args as A


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="continue a text prompt (base models)")
    A.add_model_args(g)
    A.add_context_args(g)
    A.add_sampling_args(g, n_predict=256)
    g.add_argument("-p", "--prompt", default=None, help="the text to continue")
    g.add_argument("-f", "--file", default=None, metavar="FILE", help="read the text to continue from FILE")
    g.add_argument("text", nargs="?", help="the text to continue (instead of -p)")
    g.add_argument("--stats", action="store_true", help="print tokens/sec at the end")
    g.set_defaults(func=cmd_generate)


def _prompt_bytes(args) -> bytes | None:
    """The prompt's bytes exactly as given (argv or file): never re-encoded before tokenizing."""
    given = [A.arg_bytes(x) for x in (args.prompt, args.text) if x is not None]
    if args.file is not None:
        data = A.read_text_file(args.file, "prompt")
        given.append(data[:-1] if data.endswith(b"\n") else data)      # as llama.cpp's -f
    if len(given) > 1:
        raise ValueError("give the text to continue once: -p, -f or the positional argument")
    return given[0] if given else None


def cmd_generate(args) -> int:
    prompt = _prompt_bytes(args)
    if prompt is None:
        print("alpaca2: give the text to continue (-p PROMPT or -f FILE)", file=sys.stderr)
        return A.EXIT_USAGE
    try:
        stop = [A.arg_bytes(r).decode("utf-8") for r in args.reverse_prompt]
    except UnicodeDecodeError:
        raise ValueError("a reverse prompt is not UTF-8 text") from None
    llm = A.open_llm(args, "completion")
    try:
        if args.verbose:
            print(A.summary(llm), file=sys.stderr)
        sampling = A.sampling(args, llm.n_ctx)
        pieces = llm.generate(prompt, A.n_predict(args, llm.n_ctx), stop=stop, stream=True, **sampling)
        out = sys.stdout
        out.flush()
        out.buffer.write(prompt)
        out.buffer.flush()
        try:
            for piece in pieces:
                out.write(piece)
                out.flush()
        finally:
            out.write("\n")
            out.flush()
        if args.verbose or args.stats:
            s = llm.last_stats
            print(f"[prompt: {s['prompt_tokens']} tokens in {s['prompt_ms']:.0f} ms, generated: "
                  f"{s['completion_tokens']} tokens, {s['tokens_per_second']:.1f} tok/s]{A.spec_line(s)}",
                  file=sys.stderr)
    finally:
        llm.close()
    return A.EXIT_OK
