"""llama.cpp's side of bench_cpu_decode.py's ``--llama-cpp`` rows, run by an interpreter
that has llama-cpp-python and gguf (not ds-model's environment: this file imports
neither torch nor ds-model).

    PYTHON llama_cpp_worker.py check
        print llama-cpp-python's version as a JSON line.
    PYTHON llama_cpp_worker.py quantize SRC.gguf DST.gguf TYPE
        llama.cpp's own quantizer (llama-quantize's defaults) to TYPE (e.g. Q4_0).
    PYTHON llama_cpp_worker.py serve NAME=PATH.gguf ...
        load each GGUF with one thread, print {"bytes": {NAME: bytes a token reads}}, then
        answer every stdin line {"prompt": [ids], "tokens": N} with
        {"seconds": {NAME: s}, "generated": {NAME: [ids]}}: each model evaluates the
        prompt, then N greedy single-token steps are timed (argmax of the last logits,
        evaluate that token), as ds-model's generate(1 + N) - generate(1).
"""

from __future__ import annotations

import json
import sys
import time


def bytes_per_token(path: str) -> int:
    """Every tensor's stored bytes but the token embedding's (a token reads one row)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors if t.name != "token_embd.weight")


def quantize(src: str, dst: str, type_name: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}")
    params.nthread = 1
    status = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if status != 0:
        raise SystemExit(f"llama_model_quantize({src!r} -> {type_name}) returned {status}")


def load(path: str):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=path,
        n_ctx=256,
        n_batch=64,
        n_threads=1,
        n_threads_batch=1,
        logits_all=False,
        verbose=False,
    )


def decode(llm, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    import llama_cpp
    import numpy as np

    n_vocab = llm.n_vocab()
    llm.reset()
    llm.eval(prompt)
    generated = []
    start = time.perf_counter()
    for _ in range(tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), (n_vocab,))
        generated.append(int(logits.argmax()))
        llm.eval(generated[-1:])
    return time.perf_counter() - start, generated


def serve(specs: list[str]) -> None:
    paths = dict(spec.split("=", 1) for spec in specs)
    models = {name: load(path) for name, path in paths.items()}
    for llm in models.values():
        decode(llm, [1, 2, 3], 2)  # warm-up: first-call allocations, weight repacking
    print(json.dumps({"bytes": {n: bytes_per_token(p) for n, p in paths.items()}}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        results = {n: decode(m, request["prompt"], request["tokens"]) for n, m in models.items()}
        reply = {
            "seconds": {n: s for n, (s, _) in results.items()},
            "generated": {n: ids for n, (_, ids) in results.items()},
        }
        print(json.dumps(reply), flush=True)


def main() -> None:
    command, *args = sys.argv[1:] or ["check"]
    if command == "check":
        import gguf  # noqa: F401  (bytes_per_token needs it)
        import llama_cpp

        print(json.dumps({"version": llama_cpp.__version__}), flush=True)
    elif command == "quantize":
        quantize(*args)
    elif command == "serve":
        serve(args)
    else:
        raise SystemExit(f"unknown command {command!r}: check, quantize or serve")


if __name__ == "__main__":
    main()
