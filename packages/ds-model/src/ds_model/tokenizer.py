"""Tokenizers: Hugging Face ``tokenizer.json`` (what DeepSeek checkpoints ship) through
the ``tokenizers`` library, SentencePiece ``.model`` files (what our own training
produces), and chat templates from ``tokenizer_config.json`` rendered with jinja2 in a
sandbox, with the same globals transformers provides (``raise_exception``,
``strftime_now``, ``bos_token``, ``eos_token``, ``add_generation_prompt``).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

__all__ = ["Tokenizer", "load_tokenizer"]

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
_COPIED = (TOKENIZER_JSON, SENTENCEPIECE, TOKENIZER_CONFIG, "special_tokens_map.json")


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """One interface over both back ends: ``encode``, ``decode``, ``apply_chat_template``."""

    def __init__(self, backend: Any, kind: str, config: dict[str, Any], source: Path | None):
        self._backend, self.kind, self.config, self.source = backend, kind, config, source
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take "default"
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default", next(iter(named.values()), None))
        if kind == "sentencepiece":
            if self.bos_token is None and backend.bos_id() >= 0:
                self.bos_token = backend.id_to_piece(backend.bos_id())
            if self.eos_token is None and backend.eos_id() >= 0:
                self.eos_token = backend.id_to_piece(backend.eos_id())
        self.add_bos_token = bool(config.get("add_bos_token", kind == "sentencepiece"))

    @staticmethod
    def available(path: str | os.PathLike) -> bool:
        path = Path(path)
        return (path / TOKENIZER_JSON).is_file() or (path / SENTENCEPIECE).is_file()

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        config_file = path / TOKENIZER_CONFIG
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if (path / TOKENIZER_JSON).is_file():
            from tokenizers import Tokenizer as HFTokenizer

            backend = HFTokenizer.from_file(str(path / TOKENIZER_JSON))
            # transformers' switch (tokenizer_config.json): special tokens written in a
            # text are its characters, as SentencePiece reads them.
            backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
            return cls(backend, "hf", config, path)
        if (path / SENTENCEPIECE).is_file():
            return cls.from_sentencepiece(path / SENTENCEPIECE, config)
        raise FileNotFoundError(f"no {TOKENIZER_JSON} or {SENTENCEPIECE} in {path}")

    @classmethod
    def from_sentencepiece(
        cls, model_file: str | os.PathLike, config: dict[str, Any] | None = None
    ) -> Tokenizer:
        import sentencepiece as spm

        model_file = Path(model_file)
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        return cls(sp, "sentencepiece", config or {}, model_file.parent)

    # -- ids -----------------------------------------------------------------------------

    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        if self.kind == "hf":
            return self._backend.token_to_id(token)
        i = self._backend.piece_to_id(token)
        return None if i == self._backend.unk_id() and token != self._backend.id_to_piece(i) else i

    @cached_property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @cached_property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def vocab_size(self) -> int:
        if self.kind == "hf":
            return self._backend.get_vocab_size(with_added_tokens=True)
        return self._backend.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> token ids. ``add_special_tokens`` applies the tokenizer's own
        post-processor (tokenizer.json) or prepends BOS when ``add_bos_token``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if (
            add_special_tokens
            and self.bos_token
            and text.startswith(self.bos_token)
            and self.kind == "hf"
            and not self._backend.encode_special_tokens
        ):
            add_special_tokens = False  # a rendered chat template already wrote BOS
        if self.kind == "hf":
            ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
            if (
                add_special_tokens
                and self.add_bos_token
                and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)
            ):
                ids = [self.bos_token_id, *ids]
            return ids
        ids = self._backend.encode(text)
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        special = {self.bos_token_id, self.eos_token_id}
        if skip_special_tokens:
            ids = [i for i in ids if i not in special and not self._backend.is_control(i)]
            return self._backend.decode(ids)
        # SentencePiece drops control pieces when decoding; spell them out between the
        # decoded runs of ordinary tokens, as transformers does.
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in special or self._backend.is_control(i):
                parts.append(self._backend.decode(run) if run else "")
                parts.append(self._backend.id_to_piece(i))
                run = []
            else:
                run.append(i)
        parts.append(self._backend.decode(run) if run else "")
        return "".join(parts)

    # -- chat ----------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` ([{"role": ..., "content": ...}]) with the checkpoint's
        chat template. ``tokenize=True`` returns ids (no extra BOS: templates write it)."""
        template = chat_template or self.chat_template
        if not template:
            raise ValueError(
                "this tokenizer has no chat_template (tokenizer_config.json has none); "
                "pass chat_template="
            )
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m for m in messages
        ):
            raise TypeError("messages must be a list of dicts with 'role' and 'content'")
        text = _compile(template).render(
            messages=messages,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # -- files ---------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the tokenizer files next to a saved model (atomically, file by file): a
        copy of the source's files, or for a SentencePiece tokenizer its model with the
        ``tokenizer.json`` and ``tokenizer_config.json`` that ``transformers.AutoTokenizer``
        loads with the same ids (see ``ds_model.sentencepiece_json``)."""
        path = Path(path)
        if self.kind == "sentencepiece":
            self._write_sentencepiece_files(path)
        elif self.source is not None and self.source.resolve() != path.resolve():
            for name in _COPIED:
                src = self.source / name
                if src.is_file():
                    _write_atomic(path / name, src.read_bytes())

    def _write_sentencepiece_files(self, path: Path) -> None:
        from ds_model.sentencepiece_json import sentencepiece_to_tokenizer_json

        sp = self._backend
        proto = sp.serialized_model_proto()
        model_file = path / SENTENCEPIECE
        if not model_file.is_file() or model_file.read_bytes() != proto:
            _write_atomic(model_file, proto)
        config = dict(self.config)
        try:
            converted = sentencepiece_to_tokenizer_json(proto, add_bos_token=self.add_bos_token)
        except ValueError as err:  # a model kind the converter does not reproduce exactly
            warnings.warn(f"{path}: no tokenizer.json written: {err}", stacklevel=3)
            (path / TOKENIZER_JSON).unlink(missing_ok=True)  # it would win over the model
        else:
            _write_atomic(path / TOKENIZER_JSON, converted.encode())
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            config["split_special_tokens"] = True
            for name, i in (
                ("bos_token", sp.bos_id()),
                ("eos_token", sp.eos_id()),
                ("unk_token", sp.unk_id()),
                ("pad_token", sp.pad_id()),
            ):
                if i >= 0:
                    config.setdefault(name, sp.id_to_piece(i))
            config["add_bos_token"] = self.add_bos_token
            config.setdefault("add_eos_token", False)
        if config:
            _write_atomic(path / TOKENIZER_CONFIG, (json.dumps(config, indent=2) + "\n").encode())


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


_TEMPLATES: dict[str, Any] = {}


def _compile(template: str) -> Any:
    if template not in _TEMPLATES:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(
            x, indent=indent, ensure_ascii=False
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[template] = env.from_string(template)
    return _TEMPLATES[template]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a checkpoint directory (tokenizer.json or tokenizer.model), or a
    SentencePiece ``.model`` file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".model":
        return Tokenizer.from_sentencepiece(path)
    return Tokenizer.from_dir(path)
