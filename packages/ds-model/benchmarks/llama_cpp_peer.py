"""llama.cpp on the same checkpoint, for bench_cpu_decode.py's ``--llama-cpp`` rows.

The saved llama-shaped checkpoint gets a small SentencePiece tokenizer (llama.cpp's
converter requires one; it pads the vocabulary to the config's 32000 and the benchmark
feeds token ids, so its pieces do not matter), is converted by llama.cpp's own
``convert_hf_to_gguf.py`` to F32, BF16 and Q8_0 (run by this interpreter: it needs
torch, transformers and sentencepiece, which ds-model's environment has; the converter
imports the ``gguf-py`` beside it), and the F32 file is quantized to Q4_0 by llama.cpp's
quantizer (llama-quantize's defaults: the output layer becomes Q6_K). llama.cpp runs in
a subprocess of the interpreter given to ``--llama-cpp`` (llama_cpp_worker.py), so
ds-model's environment needs no llama-cpp-python.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

WORKER = Path(__file__).with_name("llama_cpp_worker.py")

# row name -> the converter's --outtype, or (source row, llama.cpp quantization type)
FORMATS: dict[str, str | tuple[str, str]] = {
    "llama.cpp F32": "f32",
    "llama.cpp BF16": "bf16",
    "llama.cpp Q8_0": "q8_0",
    "llama.cpp Q4_0": ("llama.cpp F32", "Q4_0"),
}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def check(python: str, converter: str | None) -> str:
    """llama-cpp-python's version under ``python``; a clear exit if it or ``converter``
    is unusable."""
    if not converter:
        raise SystemExit(
            "--llama-cpp needs --llama-cpp-converter: the path of llama.cpp's "
            "convert_hf_to_gguf.py (vendor/llama.cpp/ in the llama-cpp-python sdist)"
        )
    if not Path(converter).is_file():
        raise SystemExit(f"--llama-cpp-converter: {converter!r} is not a file")
    try:
        done = subprocess.run(
            [python, str(WORKER), "check"], capture_output=True, text=True, env=_env()
        )
    except OSError as error:
        raise SystemExit(f"--llama-cpp: cannot run {python!r}: {error}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(
            f"--llama-cpp: {python!r} cannot import llama_cpp and gguf ({last}); give the "
            "python of a virtualenv with `pip install llama-cpp-python gguf`"
        )
    return json.loads(done.stdout.splitlines()[-1])["version"]


def save_tokenizer(checkpoint: Path, vocab_size: int = 1000) -> None:
    """A byte-fallback BPE SentencePiece model trained on a stdlib module's source."""
    import sentencepiece as spm

    text = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.read_text().splitlines()),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    (checkpoint / "tokenizer.model").write_bytes(buffer.getvalue())


def convert(python: str, converter: str, checkpoint: Path, out: Path) -> dict[str, Path]:
    """GGUF files of ``checkpoint`` in every format of FORMATS, written under ``out``."""
    save_tokenizer(checkpoint)
    paths: dict[str, Path] = {}
    for name, how in FORMATS.items():
        paths[name] = out / f"{name.split()[-1].lower()}.gguf"
        if isinstance(how, str):
            command = [sys.executable, converter, str(checkpoint), "--outtype", how]
            command += ["--outfile", str(paths[name])]
        else:
            source, type_name = how
            command = [python, str(WORKER), "quantize", str(paths[source]), str(paths[name])]
            command.append(type_name)
        done = subprocess.run(command, capture_output=True, text=True, env=_env())
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return paths


class Worker:
    """The llama.cpp subprocess holding every GGUF model loaded."""

    def __init__(self, python: str, paths: dict[str, Path]) -> None:
        specs = [f"{name}={path}" for name, path in paths.items()]
        self.process = subprocess.Popen(
            [python, str(WORKER), "serve", *specs],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        self.bytes: dict[str, int] = self._read()["bytes"]

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the llama.cpp worker exited ({self.process.wait()})")
        return json.loads(line)

    def decode(self, prompt: list[int], tokens: int) -> dict:
        """{"seconds": {row: s}, "generated": {row: ids}} for ``tokens`` greedy steps."""
        self.process.stdin.write(json.dumps({"prompt": prompt, "tokens": tokens}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
