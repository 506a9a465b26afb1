"""llama-server's /rerank (also /v1/rerank, /reranking, /v1/reranking): score documents against a
query, in Jina's shape ({"documents": [...]} -> {"results": [{"index", "relevance_score"}]}) or in
TEI's ({"texts": [...]} -> [{"index", "score"}]), best first, top_n of them.

Each pair is tokenized as llama-server does (format_prompt_rerank): the model's "rerank" chat
template with {query} and {document} filled in, or BOS query EOS SEP document EOS as the vocabulary
adds them, and scored on the embedding thread (Engine.rerank_context).  Needs --reranking.
"""
from __future__ import annotations

import asyncio

from alpaca2.server.validation import APIError, bad, read_json


def pair_tokens(model, query: str, doc: str) -> list[int]:
    template = model.metadata.get("tokenizer.chat_template.rerank")
    if template:
        text = template.replace("{query}", query).replace("{document}", doc)
        return model.tokenize(text, add_bos=False, special=True)     # the template's own tokens
    eos = model.eos if model.eos >= 0 else model.sep
    ids = [model.bos] if model.add_bos and model.bos >= 0 else []
    ids += model.tokenize(query, add_bos=False, special=False)
    if model.add_eos and eos >= 0:
        ids.append(eos)
    if model.add_sep and model.sep >= 0:
        ids.append(model.sep)
    ids += model.tokenize(doc, add_bos=False, special=False)
    if model.add_eos and eos >= 0:
        ids.append(eos)
    return ids


async def rerank(server, request):
    if not server.reranking:
        raise APIError(501, "This server does not support reranking. Start it with `--reranking`",
                       type="not_supported_error", code="not_supported")
    body = await read_json(request, server.max_body, server.body_timeout)
    tei = "texts" in body
    query = body.get("query")
    if "query" not in body:
        raise bad('"query" must be provided', "query")
    if not isinstance(query, str):
        raise bad('"query" must be a string', "query")
    docs = body.get("documents", body.get("texts"))
    if not isinstance(docs, list) or not docs or not all(isinstance(d, str) for d in docs):
        raise bad('"documents" must be a non-empty string array', "documents")
    top_n = body.get("top_n", len(docs))
    if top_n is None:
        top_n = len(docs)
    if isinstance(top_n, bool) or not isinstance(top_n, int):
        raise bad('"top_n" must be an integer', "top_n")
    for text, field in [(query, "query")] + [(d, "documents") for d in docs]:
        if "\x00" in text:
            raise bad(f"'{field}' contains a NUL character (U+0000)", field)
    model = server.model
    inputs = await asyncio.to_thread(lambda: [pair_tokens(model, query, d) for d in docs])
    scores = await server.embed_tokens(inputs, rerank=True)
    label = "score" if tei else "relevance_score"
    results = [{"index": i, label: s} for i, s in enumerate(scores)]
    if tei and body.get("return_text") is True:
        for r in results:
            r["text"] = docs[r["index"]]
    results.sort(key=lambda r: r[label], reverse=True)
    results = results[:max(top_n, 0)]
    if tei:
        return results
    n = sum(len(x) for x in inputs)
    return {"model": body.get("model", server.model_id), "object": "list",
            "usage": {"prompt_tokens": n, "total_tokens": n}, "results": results}
