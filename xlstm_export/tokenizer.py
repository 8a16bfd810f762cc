"""Tokenizers: text <-> token ids for generation and serving (the `tokenizers` library).

A model's tokenizer lives beside its weights, as transformers keeps it: ``tokenizer.json`` (the
`tokenizers` file with its special tokens), optionally ``tokenizer_config.json`` /
``special_tokens_map.json``, and ``generation_config.json`` / ``config.json`` for the EOS id.
``convert`` and ``export`` carry these files along (``read_tokenizer_files`` at load,
``write_tokenizer_files`` at save), so a directory or an exported .onnx is self-contained.

Our byte-level models (vocab 256, what ``train`` produces) get a byte tokenizer: one token per
UTF-8 byte, token id = byte value, written as an ordinary ``tokenizer.json`` (a BPE without merges
over the byte-level alphabet), so any `tokenizers` / transformers user can load it too.

    tok = load_tokenizer("path/to/model")      # or "model.onnx": its sibling files
    ids = tok.encode("def main")               # list[int]
    stream = tok.stream()
    text = "".join(stream.push(i) for i in ids) + stream.flush()   # == tok.decode(ids)

Loading never executes code: JSON files only.
"""

from __future__ import annotations

import json
from pathlib import Path

from .fsio import atomic_file

BYTE_VOCAB = 256
TOKENIZER_FILE = "tokenizer.json"
# Files carried with a model (those present are copied; generation_config.json is written from
# config.json's token ids when the source has none, so the EOS id survives our own config.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used: the message names the file and why."""


class Tokenizer:
    """Text <-> ids over a `tokenizers.Tokenizer`, with the model's EOS ids.

    ``encode`` adds the tokenizer's own special tokens (its post-processor, e.g. a BOS) as
    transformers does; ``decode`` skips special tokens (EOS, BOS, padding). Like transformers 5,
    it leaves tokenizer_config.json's add_bos_token / add_eos_token aside (transformers 5.24 keeps
    tokenizer.json's post-processor), and applies its clean_up_tokenization_spaces (" ," -> ",",
    " 's" -> "'s", ...) to the decoded text of a tokenizer that is not a BPE (``clean_up_spaces``,
    set by :func:`load_tokenizer`; transformers skips the clean-up for BPE).
    """

    def __init__(self, backend, eos_token_ids: tuple[int, ...] = (), *, source: str = "",
                 clean_up_spaces: bool = False):
        self.backend = backend  # tokenizers.Tokenizer
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)  # every id that ends a sequence
        self.source = source  # where it was loaded from (for messages)
        self.clean_up_spaces = bool(clean_up_spaces)  # transformers' clean_up_tokenization on decoded text

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``, with the tokenizer's own special tokens (e.g. a BOS)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return list(self.backend.encode(text, add_special_tokens=True).ids)

    def decode(self, ids) -> str:
        """The text of the token ids ``ids``, special tokens (EOS, BOS, padding) left out."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=True)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def stream(self) -> StreamDecoder:
        """A new :class:`StreamDecoder`: one sequence's text, token by token, whole characters only."""
        return StreamDecoder(self)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id}, source={self.source!r})"


# transformers' clean_up_tokenization (PreTrainedTokenizerBase): these replacements, in this order,
# each one pass of str.replace over the whole text.
_CLEAN_UPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
              (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
# Text the clean-up of a longer text could still change: a pattern begins with a space, so with no
# space among the last (longest pattern - 1) characters nothing at the end can change; else each
# pass can change at most that many more characters from the end (the stream holds back the sum).
_CLEAN_UP_REACH = max(len(a) for a, _ in _CLEAN_UPS) - 1
_CLEAN_UP_HOLD = _CLEAN_UP_REACH * len(_CLEAN_UPS)


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and English contractions."""
    for a, b in _CLEAN_UPS:
        text = text.replace(a, b)
    return text


class StreamDecoder:
    """Incremental decoding: ``push`` returns the text newly completed by one token, holding back an
    incomplete UTF-8 sequence (and any text a later token could still change) until it completes;
    ``flush`` returns what is left. The pieces joined equal ``Tokenizer.decode`` of all the ids.

    The steps are `tokenizers`' own ``DecodeStream`` (one call into Rust per token: it decodes a
    short window of ids from a token boundary at which all earlier text is final, so tokenizers
    that strip a leading space on the first token, SentencePiece's Metaspace, keep it). ``flush``
    decodes the whole sequence once and returns what the steps held back. A tokenizer that cleans
    up spaces (``Tokenizer.clean_up_spaces``) cleans the steps' text and holds back the end that
    the clean-up of a longer text could still change.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._reset()

    def _reset(self) -> None:
        from tokenizers.decoders import DecodeStream

        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []  # every id pushed (flush decodes them all)
        self._sent = 0  # characters returned so far
        # with clean_up_spaces: the steps' text since the last point no clean-up pattern can span,
        # before the clean-up, and how much of its cleaned text was returned
        self._raw = ""
        self._raw_sent = 0

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        self._ids.append(token_id)
        return self._release(self._stream.step(self._tok.backend, token_id) or "")

    def push_many(self, ids) -> str:
        """``push`` of each of ``ids``, the texts joined (one call per streamed event)."""
        step, backend = self._stream.step, self._tok.backend
        texts = []
        for token_id in ids:
            token_id = int(token_id)
            self._ids.append(token_id)
            texts.append(step(backend, token_id) or "")
        return self._release("".join(texts))

    def _release(self, text: str) -> str:
        """The steps' new ``text`` as it is shown: as is, or the newly final part of the cleaned text."""
        if not self._tok.clean_up_spaces:
            self._sent += len(text)
            return text
        self._raw += text
        clean = clean_up_tokenization(self._raw)
        settled = " " not in self._raw[-_CLEAN_UP_REACH:]  # no pattern can begin before the end
        end = max(self._raw_sent, len(clean) - (0 if settled else _CLEAN_UP_HOLD))
        out = clean[self._raw_sent : end]
        self._sent += len(out)
        self._raw_sent = end
        if settled:  # all of it returned, and later text cleans on its own (the clean-up makes no
            self._raw, self._raw_sent = "", 0  # spaces): each token's clean-up stays short
        return out

    def flush(self) -> str:
        rest = self._tok.decode(self._ids)[self._sent :]
        self._reset()
        return rest


class TextStream:
    """One sequence's text as its tokens come: a ``StreamDecoder`` (valid UTF-8 only) cut before
    the first of ``stop`` strings, for ``generate`` and each completion the server streams.

        ts = TextStream(tokenizer, stop=["\\n\\n"])
        piece, used = ts.push([17, 42])  # text now final; how many ids made it (fewer when a stop ended it)
        if ts.stopped: ...               # a stop string ended the text (it is not included)
        piece = ts.finish()              # the rest, once the sequence has ended

    Text that could still grow into a stop string is held back, so the pieces joined equal the
    whole text however the ids are grouped. ``tokenizer`` None (a model without one: its token ids
    are the output) gives empty text and takes no stop strings.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop=()):
        stop = tuple(s for s in stop if s)  # an empty string would stop before the first token
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self._dec = tokenizer.stream() if tokenizer is not None else None
        self._stop = stop
        # the text so far is the released pieces, then the tail not released yet: at most a stop
        # string's beginning between pushes (a list, so a long completion is not copied per token)
        self._released: list[str] = []
        self._tail = ""
        self.stopped = False

    @property
    def text(self) -> str:
        """The text decoded so far, cut before a stop string (all of it once finished)."""
        return "".join(self._released) + self._tail

    def push(self, ids) -> tuple[str, int]:
        """Decode ``ids``: (the text now final, how many of ``ids`` were used)."""
        if self._dec is None or self.stopped:
            return "", 0 if self.stopped else len(ids)
        if not self._stop:  # nothing to hold back or cut: every decoded piece is final
            piece = self._dec.push_many(ids)
            if piece:
                self._released.append(piece)
            return piece, len(ids)
        used = 0
        for t in ids:
            self._tail += self._dec.push(int(t))
            used += 1
            if self._cut_at_stop():
                break
        return self._release(final=self.stopped), used

    def finish(self) -> str:
        """The text left after the last token."""
        if self._dec is not None and not self.stopped:
            self._tail += self._dec.flush()
            self._cut_at_stop()
        return self._release(final=True)

    def _cut_at_stop(self) -> bool:
        # a match cannot start in the released text (what could begin one is held back), but the
        # newest characters may complete one that began in the tail
        hits = [j for j in (self._tail.find(s) for s in self._stop) if j >= 0]
        if hits:
            self._tail, self.stopped = self._tail[: min(hits)], True
        return self.stopped

    def _release(self, final: bool) -> str:
        keep = 0 if final or not self._stop else self._held()
        out, self._tail = self._tail[: len(self._tail) - keep], self._tail[len(self._tail) - keep :]
        if out:
            self._released.append(out)
        return out

    def _held(self) -> int:
        """Length of the longest end of the tail that is a proper beginning of a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._tail)), best, -1):
                if self._tail.endswith(s[:k]):
                    best = k
                    break
        return best


# --- the byte tokenizer --------------------------------------------------------------------------
def _byte_alphabet() -> list[str]:
    """The byte-level alphabet of `tokenizers`' ByteLevel pre-tokenizer, indexed by byte value:
    printable Latin-1 bytes stand for themselves, the other 68 bytes for U+0100 onwards in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    keep = set(printable)
    chars, extra = [], 0
    for b in range(BYTE_VOCAB):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(BYTE_VOCAB + extra))
            extra += 1
    return chars


def byte_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte, id = byte value (vocab 256, no special tokens, no EOS)."""
    from tokenizers import Tokenizer as _Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {c: b for b, c in enumerate(_byte_alphabet())}
    backend = _Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, source="bytes")


def byte_tokenizer_files() -> dict[str, bytes]:
    """The byte tokenizer as the files ``train`` writes beside its checkpoint."""
    return {TOKENIZER_FILE: byte_tokenizer().backend.to_str(pretty=False).encode()}


# --- loading -------------------------------------------------------------------------------------
def _tokenizer_dir(path) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def load_tokenizer(path) -> Tokenizer | None:
    """The tokenizer of a model directory, or of an .onnx / engine file (its sibling files).
    None when there is no ``tokenizer.json``; :class:`TokenizerError` when one is unusable."""
    from tokenizers import Tokenizer as _Backend

    directory = _tokenizer_dir(path)
    file = directory / TOKENIZER_FILE
    if not file.is_file():
        return None
    try:
        backend = _Backend.from_str(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{file}: cannot read it ({e})") from None
    except Exception as e:  # tokenizers raises its own Exception type for a malformed file
        raise TokenizerError(f"{file}: not a valid tokenizers file ({e})") from None
    config = _read_json(directory / "tokenizer_config.json")
    _mark_special_tokens(backend, [config, _read_json(directory / "special_tokens_map.json")])
    clean_up = bool(config.get("clean_up_tokenization_spaces")) and (
        type(backend.model).__name__ != "BPE"
        or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))
    return Tokenizer(backend, _eos_ids(directory, backend), source=str(directory), clean_up_spaces=clean_up)


_SPECIAL_TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _mark_special_tokens(backend, configs: list[dict]) -> None:
    """Make the special tokens that tokenizer_config.json / special_tokens_map.json name (BOS, EOS,
    UNK, SEP, PAD, CLS, MASK, additional_special_tokens, added_tokens_decoder's ``special``) special in
    ``backend`` where tokenizer.json has them as ordinary tokens, as transformers does when it loads
    them: decode then leaves them out and encode matches them whole. Only tokens of the vocabulary:
    ids are never added."""
    from tokenizers import AddedToken

    named: list = []
    for config in configs:
        named += [config.get(name) for name in _SPECIAL_TOKEN_FIELDS]
        for name in ("additional_special_tokens", "extra_special_tokens"):
            extra = config.get(name)
            named += list(extra.values() if isinstance(extra, dict) else extra if isinstance(extra, list) else [])
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            named += [t for t in decoder.values() if isinstance(t, dict) and t.get("special") is True]
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    add = []
    for token in named:
        content = token.get("content") if isinstance(token, dict) else token
        if not isinstance(content, str) or content in special or backend.token_to_id(content) is None:
            continue
        flags = {k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized")
                 if isinstance(token, dict) and isinstance(token.get(k), bool)}
        add.append(AddedToken(content, **{"normalized": False, **flags, "special": True}))
        special.add(content)
    if add:
        backend.add_special_tokens(add)


def _special_token(config: dict, name: str) -> str | None:
    token = config.get(name)
    if isinstance(token, dict):  # {"content": "</s>", ...}
        token = token.get("content")
    return token if isinstance(token, str) else None


def tokenizer_for(path, vocab_size: int | None) -> Tokenizer | None:
    """The tokenizer to run a model with: for a model file or directory (``path``: a directory or
    an .onnx / engine file) its own files, as :func:`load_tokenizer` (None without a
    ``tokenizer.json``, whatever the vocabulary: a byte tokenizer is not guessed for it); for a
    preset (``path`` None) the byte tokenizer when the vocabulary is 256 (what the byte-level presets
    carry), else None. A tokenizer with more tokens than the model's vocabulary raises
    :class:`TokenizerError` (it belongs to another model)."""
    if path is not None:
        tok = load_tokenizer(path) if Path(path).exists() else None
    else:
        tok = byte_tokenizer() if vocab_size == BYTE_VOCAB else None
    if tok is not None and vocab_size is not None and tok.vocab_size > vocab_size:
        raise TokenizerError(f"{tok.source}: the tokenizer has {tok.vocab_size} tokens, the model's vocabulary "
                             f"only {vocab_size}: it belongs to another model")
    if tok is not None and vocab_size is not None and any(i >= vocab_size for i in tok.eos_token_ids):
        raise TokenizerError(f"{tok.source}: eos_token_id {list(tok.eos_token_ids)} lies outside the model's "
                             f"vocabulary of {vocab_size}")
    return tok


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _as_ids(value, where: str) -> tuple[int, ...] | None:
    """An ``eos_token_id`` field: an int, a list of ints, or null (None: not given)."""
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise TokenizerError(f"{where}: eos_token_id must be a non-negative int or a list of them, got {value!r}")
    return tuple(values)


def _eos_ids(directory: Path, backend) -> tuple[int, ...]:
    """EOS as transformers' generate finds it: generation_config.json, then config.json, then the
    tokenizer's own eos_token (tokenizer_config.json / special_tokens_map.json)."""
    for name in ("generation_config.json", "config.json"):
        ids = _as_ids(_read_json(directory / name).get("eos_token_id"), str(directory / name))
        if ids is not None:
            return ids
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        token = _special_token(_read_json(directory / name), "eos_token")
        if token is not None:
            tid = backend.token_to_id(token)
            if tid is None:
                raise TokenizerError(f"{directory / name}: eos_token {token!r} is not in {TOKENIZER_FILE}")
            return (int(tid),)
    return ()


# --- carrying the files along ----------------------------------------------------------------------
def tokenizer_files_in(directory) -> dict[str, Path]:
    """The tokenizer files (``TOKENIZER_FILES``) present in ``directory``: {name: path}."""
    directory = Path(directory)
    return {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}


def same_tokenizer_files(present: dict[str, Path], files: dict[str, bytes]) -> bool:
    """Whether the files ``present`` (``tokenizer_files_in``) are exactly ``files``: names and bytes."""
    return set(present) == set(files) and all(p.read_bytes() == files[n] for n, p in present.items())


def read_tokenizer_files(directory) -> dict[str, bytes]:
    """The tokenizer files of a model directory, to be written again by ``write_tokenizer_files``
    (empty without a ``tokenizer.json``; :class:`TokenizerError` for one that is unusable). When
    there is no generation_config.json, one is made of config.json's token ids, because our own
    config.json does not keep them."""
    directory = Path(directory)
    if not (directory / TOKENIZER_FILE).is_file():
        return {}
    load_tokenizer(directory)  # a file carried along must be usable: TokenizerError here, not at generate
    files = {name: p.read_bytes() for name, p in tokenizer_files_in(directory).items()}
    if "generation_config.json" not in files:
        config = _read_json(directory / "config.json")
        ids = {k: config[k] for k in _TOKEN_ID_FIELDS if config.get(k) is not None}
        if ids:
            files["generation_config.json"] = (json.dumps(ids, indent=2, sort_keys=True) + "\n").encode()
    return files


def write_tokenizer_files(files: dict[str, bytes] | None, directory) -> list[Path]:
    """Write ``files`` (from ``read_tokenizer_files``) into ``directory``, each under a temporary
    name first, then renamed: a reader never sees half a file."""
    written = []
    for name, data in (files or {}).items():
        if name not in TOKENIZER_FILES:
            raise ValueError(f"{name!r} is not a tokenizer file ({', '.join(TOKENIZER_FILES)})")
        target = Path(directory) / name
        with atomic_file(target) as tmp:
            tmp.write_bytes(data)
        written.append(target)
    return written


__all__ = [
    "BYTE_VOCAB", "StreamDecoder", "Tokenizer", "TokenizerError", "byte_tokenizer", "byte_tokenizer_files",
    "load_tokenizer", "read_tokenizer_files", "same_tokenizer_files", "tokenizer_files_in", "tokenizer_for",
    "write_tokenizer_files",
]
