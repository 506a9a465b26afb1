"""``alpaca2 info`` (build, devices, the model's metadata and the context's settings) and
``alpaca2 tokenize``."""
from __future__ import annotations

import json

from alpaca2.cli import args as A


def add_parsers(sub) -> None:
    i = sub.add_parser("info", help="build, devices and CPU features; with -m the model's metadata (JSON)")
    A.add_model_args(i, required=False)
    A.add_context_args(i, speculative=False)
    i.set_defaults(func=cmd_info)

    t = sub.add_parser("tokenize", help="token ids and pieces of a text")
    A.add_model_args(t)
    t.add_argument("text")
    t.add_argument("--no-bos", action="store_true")
    t.add_argument("--special", action="store_true", help="parse special-token text such as </s>")
    t.add_argument("--ids", action="store_true", help="print the ids as one list")
    t.set_defaults(func=cmd_tokenize)


def cmd_info(args) -> int:
    import alpaca2
    info = alpaca2.system_info()
    if args.model or args.demo:
        with alpaca2.Model(A.model_path(args), vocab_only=False, use_mmap=args.use_mmap, use_mlock=args.mlock,
                           n_gpu_layers=args.n_gpu_layers, **A.rpc_kwargs(args)) as m:
            info["model"] = {
                "path": m.path, "desc": m.desc, "ftype": m.ftype, "n_params": m.n_params, "size": m.size,
                "n_vocab": m.n_vocab, "n_ctx_train": m.n_ctx_train, "n_embd": m.n_embd, "n_layer": m.n_layer,
                "n_head": m.n_head, "n_head_kv": m.n_head_kv, "bos": m.bos, "eos": m.eos,
                "chat_template": m.chat_template,
                "template": alpaca2.choose_template(m).name,
                "metadata": {k: v for k, v in m.metadata.items() if not k.startswith("tokenizer.ggml.")},
            }
            # the context the same flags give chat/generate (made, so a bad combination shows here)
            kw = A.context_kwargs(args)
            n_ctx = min(args.ctx_size or m.n_ctx_train, m.n_ctx_train or args.ctx_size)   # as Llama
            with alpaca2.Context(m, n_ctx=n_ctx, n_batch=args.batch_size, n_threads=A.threads(args), **kw) as ctx:
                info["context"] = dict(kw, n_ctx=ctx.n_ctx, n_batch=ctx.n_batch, n_threads=ctx.n_threads)
            info["context"]["lora"] = [{"path": p, "scale": s} for p, s in args.lora]
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return A.EXIT_OK


def cmd_tokenize(args) -> int:
    import alpaca2
    with alpaca2.Model(A.model_path(args), vocab_only=True) as m:
        ids = m.tokenize(A.arg_bytes(args.text), add_bos=not args.no_bos, special=args.special)
        if args.ids:
            print(ids)
        else:
            for t in ids:
                piece = m.token_to_piece(t, special=True).decode("utf-8", "backslashreplace")
                print(f"{t:6d} {piece!r}")
    return A.EXIT_OK
