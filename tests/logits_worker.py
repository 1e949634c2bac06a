"""A model held in one process, answering logits requests (test_prop_results.py starts one per strategy).

``python logits_worker.py MODEL NUMA MMAP``; then one JSON request per stdin
line, ``{"threads": T, "batch": B, "start": S, "n": N}``: tokens S..S+N of the
prose, evaluated from an empty context with T threads in batches of B. The
answer: the sha256 of all N rows of logits (float32) and the perplexity of
tokens S+1..S+N-1 given the ones before, as ``repr`` (every digit).
llama.cpp initialises NUMA once per process, hence a process per strategy.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pydoc_data.topics import topics

import llama_cpp
import numpy as np
from llama_cpp import Llama

MAX_THREADS = 16
N_CTX = 128
MAX_BATCH = 64
TEXT = topics["assert"] + topics["for"] + topics["while"]  # real English prose, always present


def main() -> int:
    model, numa, mmap = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    numa_arg: str | bool = False if numa == "off" else numa
    t0 = time.monotonic()
    llm = Llama(
        model,
        numa=numa_arg,
        n_threads=MAX_THREADS,
        n_threads_batch=MAX_THREADS,
        n_ctx=N_CTX,
        n_batch=MAX_BATCH,
        n_ubatch=MAX_BATCH,
        logits_all=True,
        use_mmap=mmap,
        verbose=False,
    )
    tokens = llm.tokenize(TEXT.encode())
    print(json.dumps({"ready": True, "tokens": len(tokens), "load_s": time.monotonic() - t0}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        t, b, s, n = req["threads"], req["batch"], req["start"], req["n"]
        if not (1 <= t <= MAX_THREADS and 1 <= b <= MAX_BATCH and 2 <= n <= N_CTX and 0 <= s <= len(tokens) - n):
            print(json.dumps({"error": f"request out of range: {req}"}), flush=True)
            continue
        t0 = time.monotonic()
        toks = tokens[s : s + n]
        llm.reset()
        llama_cpp.llama_set_n_threads(llm.ctx, t, t)
        llm.n_batch = b
        llm.eval(toks)
        scores = np.ascontiguousarray(llm.scores[:n], dtype=np.float32)
        logp = scores.astype(np.float64)
        logp -= logp.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        nll = -np.mean([logp[i, toks[i + 1]] for i in range(n - 1)])
        answer = {
            "sha256": hashlib.sha256(scores.tobytes()).hexdigest(),
            "ppl": repr(float(np.exp(nll))),
            "eval_s": time.monotonic() - t0,
        }
        if numa == "migrate":  # what the series says it ran: virtual nodes, the layout, node-aware barrier waits
            from numa_llama import hooks  # noqa: PLC0415

            answer["virtual_nodes"] = hooks.stats()["virtual_nodes"]
            answer["layout"] = hooks.layout(t)
            answer["barrier_waits"] = [w.waits for w in hooks.barrier_stats(t, reset=True)]
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
