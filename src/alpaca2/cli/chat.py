"""``alpaca2 chat``: interactive multi-turn chat (replaces chat.sh), or one answer per line when
stdin is not a terminal.

In chat: /reset, /system TEXT, /save FILE, /load FILE, /help, /exit; Ctrl+C stops an answer,
Ctrl+C at the prompt or Ctrl+D ends the chat.
"""
from __future__ import annotations

import sys

from alpaca2.cli import args as A

HELP = ("/reset  forget the conversation\n"
        "/system TEXT  set the system prompt (and reset)\n"
        "/save FILE  save the conversation (and the KV cache next to it)\n"
        "/load FILE  resume a conversation saved with /save\n"
        "/help  this text\n"
        "/exit  quit (also Ctrl+D, or Ctrl+C at the prompt); Ctrl+C stops an answer")


def add_parser(sub) -> None:
    c = sub.add_parser("chat", help="interactive multi-turn chat (replaces chat.sh)")
    A.add_model_args(c)
    A.add_context_args(c)
    A.add_sampling_args(c)
    c.add_argument("-sys", "--system", "--system-prompt", dest="system", default=None,
                   help="system prompt (default: Alpaca-2's)")
    c.add_argument("-p", "--prompt", default=None, help="a first instruction to answer")
    c.add_argument("-f", "--file", default=None, metavar="FILE", help="read the first instruction from FILE")
    c.add_argument("--template", choices=["auto", "alpaca2", "model", "completion"], default=None,
                   help="prompt format (default: auto from the model's metadata)")
    c.add_argument("--complete", action="store_true", help="with --demo: plain continuation, no chat format")
    c.add_argument("instruction", nargs="?", help="a first instruction to answer")
    c.set_defaults(func=cmd_chat)


class _Colors:
    def __init__(self, on):
        self.user = "\033[1;32m" if on else ""
        self.info = "\033[2m" if on else ""
        self.reset = "\033[0m" if on else ""


def _text_arg(value, what):
    """A text argument as str; chat messages are text, so bytes that are not UTF-8 are refused."""
    try:
        return A.arg_bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"the {what} is not UTF-8 text") from None


def _first_instruction(args):
    """The first instruction from -p, -f or the positional argument (at most one of them)."""
    given = []
    if args.prompt is not None:
        given.append(_text_arg(args.prompt, "prompt"))
    if args.instruction is not None:
        given.append(_text_arg(args.instruction, "instruction"))
    if args.file is not None:
        data = A.read_text_file(args.file, "prompt")
        if data.endswith(b"\n"):
            data = data[:-1]                 # as llama.cpp's -f
        try:
            given.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"the prompt file {args.file} is not UTF-8 text") from None
    if len(given) > 1:
        raise ValueError("give the first instruction once: -p, -f or the positional argument")
    return given[0] if given else None


def _stream_answer(session, text, out) -> bool:
    """Print an answer as it is generated; False when Ctrl+C stopped it."""
    try:
        for piece in session.send(text):
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        return False
    out.write("\n")
    out.flush()
    return True


def _command(session, text, colors):
    """Run a /command; returns the session to go on with (another after /load), None for /exit."""
    from alpaca2.errors import Alpaca2Error
    from alpaca2.session import ChatSession
    cmd, _, rest = text.partition(" ")
    rest = rest.strip()
    if cmd in ("/exit", "/quit"):
        return None
    if cmd == "/reset":
        session.reset()
        print(f"{colors.info}(conversation reset){colors.reset}")
    elif cmd == "/system":
        session.reset(system=rest or None)
        print(f"{colors.info}(system prompt set; conversation reset){colors.reset}")
    elif cmd == "/save":
        if not rest:
            print("usage: /save FILE", file=sys.stderr)
        else:
            try:
                session.save(rest)
                print(f"{colors.info}(saved to {rest}){colors.reset}")
            except (Alpaca2Error, OSError) as e:
                print(f"alpaca2: cannot save: {e}", file=sys.stderr)
    elif cmd == "/load":
        if not rest:
            print("usage: /load FILE", file=sys.stderr)
        else:
            try:
                loaded = ChatSession.load(session.llm, rest)
            except (Alpaca2Error, OSError, ValueError) as e:
                print(f"alpaca2: cannot load: {e}", file=sys.stderr)
            else:
                session = loaded
                n = sum(1 for m in session.messages if m["role"] == "user")
                print(f"{colors.info}(loaded {rest}: {n} turns){colors.reset}")
    elif cmd == "/help":
        print(HELP)
    else:
        print(f"unknown command {cmd}; /help lists them", file=sys.stderr)
    return session


def cmd_chat(args) -> int:
    from alpaca2.session import ChatSession
    template = args.template or "auto"
    if args.demo and template == "auto":
        template = "completion" if args.complete else "auto"
    first = _first_instruction(args)
    system = _text_arg(args.system, "system prompt") if args.system is not None else None
    llm = A.open_llm(args, template)
    max_tokens = A.n_predict(args, llm.n_ctx)
    session = ChatSession(llm, system=system, max_tokens=llm.n_ctx if max_tokens is None else max_tokens,
                          stop=[_text_arg(r, "reverse prompt") for r in args.reverse_prompt],
                          seed=A.seed(args), **A.sampling(args, llm.n_ctx))
    llm.make_sampler(**session.sampling)               # bad settings (a grammar) fail here, once
    print(A.summary(llm), file=sys.stderr)
    interactive = sys.stdin.isatty()
    out = sys.stdout
    if not interactive:
        def one_line(answer):
            return " ".join(answer.splitlines())     # \n, \r and the other line breaks become spaces
        if first:
            print(one_line(session.send(first, stream=False)), flush=True)
        for n, raw in enumerate(sys.stdin.buffer, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")     # as text mode did with \r\n
            except UnicodeDecodeError:
                # one answer per line still: an empty one, and why on stderr
                print(f"alpaca2: input line {n} is not UTF-8 text; not answered", file=sys.stderr, flush=True)
                print(flush=True)
                continue
            if not line.strip():
                continue
            print(one_line(session.send(line, stream=False)), flush=True)
        llm.close()
        return A.EXIT_OK

    colors = _Colors(out.isatty())
    # Ctrl+C must stop an answer even when this process was started with SIGINT ignored (a
    # background job of a non-interactive shell): at a terminal the user is the one pressing it.
    import signal
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(f"{colors.info}/reset  /system TEXT  /save FILE  /load FILE  /help  /exit   Ctrl+C stops an answer; "
          f"Ctrl+D or Ctrl+C at the prompt quits{colors.reset}", file=sys.stderr)
    pending = first
    while True:
        if pending is None:
            try:
                line = input(f"{colors.user}> {colors.reset}")
            except (EOFError, KeyboardInterrupt):
                out.write("\n")
                break
        else:
            line, pending = pending, None
            out.write(f"{colors.user}> {colors.reset}{line}\n")
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            session = _command(session, text, colors)
            if session is None:
                break
            continue
        _stream_answer(session, text, out)
        if args.verbose:
            s = session.last_stats
            print(f"{colors.info}[prompt {s['prompt_tokens_decoded']}/{s['prompt_tokens']} tokens decoded, "
                  f"{s['completion_tokens']} generated, {s['tokens_per_second']:.1f} tok/s]"
                  f"{A.spec_line(s)}{colors.reset}", file=sys.stderr)
    llm.close()
    return A.EXIT_OK
