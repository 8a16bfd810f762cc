"""Tokenizers (xlstm_export/tokenizer.py): the byte tokenizer, a BPE tokenizer.json trained here with
`tokenizers`, EOS lookup, streaming decode that holds back incomplete UTF-8, stop strings
(tokenizer.TextStream), and the files that travel with a model."""

from __future__ import annotations

import json
import random

import pytest

from xlstm_export.tokenizer import (
    TextStream,
    TokenizerError,
    byte_tokenizer,
    byte_tokenizer_files,
    load_tokenizer,
    read_tokenizer_files,
    tokenizer_for,
    write_tokenizer_files,
)

# Text with 1-, 2-, 3- and 4-byte UTF-8 characters, so BPE learns tokens that split characters.
CORPUS = [
    "def main():\n    return 42  # the answer\n",
    "Café naïve résumé — déjà vu → ∑ x² ≤ ∞ 😀 🚀 emojis!",
    "Grüße aus Köln: ß, ä, ö, ü. 日本語のテキスト、中文文本。",
    "The xLSTM keeps a fixed-size state per sequence.",
]
EOS = "<|endoftext|>"


def train_bpe(vocab_size: int = 320):
    """A byte-level BPE (GPT-2 style) trained on CORPUS with an EOS special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 8, trainer)
    return tok


def bpe_dir(path, *, config: dict | None = None, tokenizer_config: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    train_bpe().save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def stream_all(tok, ids) -> list[str]:
    s = tok.stream()
    return [s.push(i) for i in ids] + [s.flush()]


# --- the byte tokenizer --------------------------------------------------------------------------
def test_byte_tokenizer_is_utf8_bytes():
    tok = byte_tokenizer()
    assert tok.vocab_size == 256 and tok.eos_token_id is None
    rng = random.Random(0)
    for _ in range(50):  # random code points from every UTF-8 length, controls and spaces included
        text = "".join(chr(rng.choice([rng.randrange(0, 0x80), rng.randrange(0x80, 0x800),
                                       rng.randrange(0x800, 0xD800), rng.randrange(0x10000, 0x110000)]))
                       for _ in range(rng.randrange(1, 20)))
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert "".join(stream_all(tok, ids)) == text
    assert tok.encode("") == []


def test_byte_tokenizer_file_loads_with_tokenizers_and_transformers(tmp_path):
    write_tokenizer_files(byte_tokenizer_files(), tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "xLSTM → 😀"
    assert tok.encode(text) == list(text.encode())
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert hf(text)["input_ids"] == list(text.encode()) and hf.decode(list(text.encode())) == text


# --- streaming decode: hold back incomplete UTF-8 ------------------------------------------------
def test_stream_holds_back_incomplete_utf8():
    tok = byte_tokenizer()
    s = tok.stream()
    pieces = [s.push(b) for b in "aé😀b".encode()]
    #        a    é: C3 A9     😀: F0 9F 98 80          b
    assert pieces == ["a", "", "é", "", "", "", "😀", "b"]
    assert s.flush() == ""
    s = tok.stream()
    assert [s.push(b) for b in b"x\xe2\x82"] == ["x", "", ""]  # an unfinished "€" stays held ...
    assert s.flush() == "\ufffd" == tok.decode([0xE2, 0x82])  # ... until flush, as decode shows it
    s = tok.stream()  # an invalid byte is shown (as U+FFFD) once the next character completes
    assert [s.push(b) for b in b"\xffA"] == ["", "\ufffdA"]


def test_stream_equals_decode_for_bpe(tmp_path):
    tok = load_tokenizer(bpe_dir(tmp_path))
    # Tokens that end inside a multi-byte character exist in a byte-level BPE: the single bytes.
    partial = [i for i in range(tok.vocab_size) if tok.decode([i]).endswith("\ufffd")]
    assert len(partial) > 50
    for text in CORPUS:  # real text: every piece is whole characters, never U+FFFD
        ids = tok.encode(text)
        pieces = stream_all(tok, ids)
        assert "".join(pieces) == text == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)
    rng = random.Random(1)
    for _ in range(200):  # random ids (what a model may emit): joined pieces == decode
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        pieces = stream_all(tok, ids)
        assert "".join(pieces) == tok.decode(ids), ids
        assert not any(p.endswith("\ufffd") for p in pieces[:-1]), (ids, pieces)


# --- loading: files and EOS ----------------------------------------------------------------------
def test_eos_from_generation_config_then_config_then_tokenizer_config(tmp_path):
    d = bpe_dir(tmp_path / "m", tokenizer_config={"eos_token": EOS})
    tok = load_tokenizer(d)
    assert tok.eos_token_id == tok.backend.token_to_id(EOS) == 0
    (d / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert load_tokenizer(d).eos_token_id == 7
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9]}))
    tok = load_tokenizer(d)
    assert tok.eos_token_id == 5 and tok.eos_token_ids == (5, 9)
    assert tok.decode(tok.encode("déjà vu") + [0]) == "déjà vu"  # special tokens are not shown


def test_onnx_file_finds_its_sibling_tokenizer(tmp_path):
    bpe_dir(tmp_path, config={"eos_token_id": 0})
    onnx_path = tmp_path / "model.onnx"  # need not exist yet: the siblings are what counts
    tok = load_tokenizer(onnx_path)
    assert tok is not None and tok.eos_token_id == 0
    assert load_tokenizer(tmp_path / "elsewhere" / "model.onnx") is None


def test_bad_tokenizer_files_are_one_clear_error(tmp_path):
    assert load_tokenizer(tmp_path) is None  # no tokenizer.json: no tokenizer
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizers file"):
        load_tokenizer(tmp_path)
    bpe_dir(tmp_path, tokenizer_config={"eos_token": "</s>"})
    with pytest.raises(TokenizerError, match="'</s>' is not in tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "two"}))
    with pytest.raises(TokenizerError, match="non-negative int"):
        load_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text("[2]")  # not an object: not silently no EOS
    with pytest.raises(TokenizerError, match="generation_config.json: expected a JSON object, got list"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")  # carried along by convert / export: refused there
    with pytest.raises(TokenizerError, match="not a valid tokenizers file"):
        read_tokenizer_files(tmp_path)


def test_tokenizer_for_model(tmp_path):
    assert tokenizer_for(None, 256).vocab_size == 256  # byte-level preset
    assert tokenizer_for(None, 50304) is None  # a random-weight preset with a 50k vocabulary
    (tmp_path / "no-tokenizer").mkdir()  # a model's own files decide, whatever its vocabulary
    assert tokenizer_for(tmp_path / "no-tokenizer", 256) is None
    d = bpe_dir(tmp_path)
    assert tokenizer_for(d, 320).vocab_size == 320
    with pytest.raises(TokenizerError, match="320 tokens, the model's vocabulary only 256"):
        tokenizer_for(d, 256)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 400}))
    with pytest.raises(TokenizerError, match=r"eos_token_id \[400\] lies outside the model's vocabulary of 320"):
        tokenizer_for(d, 320)


def test_files_carried_along_keep_the_eos(tmp_path):
    """A transformers directory keeps EOS in config.json; our own config.json does not, so the
    carried files hold a generation_config.json made from it."""
    src = bpe_dir(tmp_path / "src", config={"model_type": "xlstm", "eos_token_id": 0, "bos_token_id": 0,
                                            "pad_token_id": 1}, tokenizer_config={"eos_token": EOS})
    files = read_tokenizer_files(src)
    assert sorted(files) == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    dst = tmp_path / "dst"
    dst.mkdir()
    write_tokenizer_files(files, dst)
    assert json.loads((dst / "generation_config.json").read_text()) == {"bos_token_id": 0, "eos_token_id": 0,
                                                                         "pad_token_id": 1}
    assert load_tokenizer(dst).eos_token_id == 0
    assert not [p for p in dst.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert read_tokenizer_files(tmp_path / "dst" / "nothing-here") == {}
    with pytest.raises(ValueError, match="not a tokenizer file"):
        write_tokenizer_files({"model.safetensors": b""}, dst)


# --- stop strings ----------------------------------------------------------------------------------
def _stop_stream(text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    """Feed ``text`` byte by byte through a byte-tokenizer TextStream."""
    ts = TextStream(byte_tokenizer(), stop)
    pieces = [ts.push([b])[0] for b in text.encode()]
    pieces.append(ts.finish())
    return pieces, ts


def test_stop_strings_cut_before_the_first_match():
    pieces, ts = _stop_stream("def f():\n    return 1\n\ndef g():", ["\n\n", "never"])
    assert "".join(pieces) == ts.text == "def f():\n    return 1" and ts.stopped
    # The first stop string in the text wins, whatever its place in the list; multi-byte stops too.
    _, ts = _stop_stream("a → b ## c", ["##", "→"])
    assert ts.text == "a " and ts.stopped
    # A tail that could start a stop string is held back, then released when it does not.
    ts = TextStream(byte_tokenizer(), ["END"])
    assert [ts.push([b]) for b in b"xEN"] == [("x", 1), ("", 1), ("", 1)]
    assert ts.push([ord("D")]) == ("", 1) and ts.stopped and ts.text == "x"
    assert ts.push([ord("z")]) == ("", 0) and ts.finish() == ""  # nothing after the stop
    ts = TextStream(byte_tokenizer(), ["END"])
    assert [ts.push([b])[0] for b in b"xENd"] == ["x", "", "", "ENd"] and not ts.stopped
    ts = TextStream(byte_tokenizer(), ["END"])
    assert [ts.push([b])[0] for b in b"xE"] == ["x", ""] and ts.finish() == "E" and ts.text == "xE"
    # No stop strings (empty ones are none): every piece as soon as it is whole.
    pieces, ts = _stop_stream("plain → text", [""])
    assert "".join(pieces) == "plain → text" and not ts.stopped


def test_stop_strings_the_same_however_the_ids_are_grouped():
    """One push of all the ids, or one per id: the same text, and ``used`` counts the ids up to the
    one that completed the stop string (the server sends those ids, not the ones after)."""
    ids = list("abc##de#".encode())
    whole = TextStream(byte_tokenizer(), ["##d"])
    assert whole.push(ids) == ("abc", 6) and whole.stopped
    pieces = TextStream(byte_tokenizer(), ["##d"])
    got = []
    for t in ids:
        got.append(pieces.push([t])[0])
        if pieces.stopped:
            break
    assert "".join(got) == "abc" and got[3:] == ["", "", ""]  # "#", "##" held back, then cut
    plain = TextStream(byte_tokenizer(), ["zz"])
    assert plain.push(list(b"a#z")) == ("a#", 3) and plain.finish() == "z"
    # A model without a tokenizer: no text, every id used; stop strings need text to be seen.
    assert TextStream(None).push([5, 6]) == ("", 2)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        TextStream(None, ["x"])


def test_special_tokens_encode_and_decode_like_transformers(tmp_path):
    """A tokenizer.json whose post-processor adds a BOS: ids as transformers' tokenizer gives them,
    and decode drops the special tokens as ``decode(skip_special_tokens=True)`` does."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import processors

    bpe = train_bpe()
    bpe.post_processor = processors.TemplateProcessing(single=f"{EOS} $A:0", special_tokens=[(EOS, 0)])
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS, "bos_token": EOS}))
    ours = load_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids[0] == 0 and ids == hf(text)["input_ids"]
        assert ours.decode(ids + [0]) == hf.decode(ids + [0], skip_special_tokens=True) == text


def wordpiece_dir(path, *, clean_up: bool):
    """A BERT-style WordPiece tokenizer.json (lower-casing normalizer, ``##`` continuations, [CLS] ...
    [SEP] around the text) built from a fixed vocabulary, and a tokenizer_config.json whose
    clean_up_tokenization_spaces is ``clean_up`` (BERT's own config sets it)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "it", "don", "stop", "ok", "re", "ve", "m", "s", "t", "n", "a",
             "'", ",", ".", "?", "!", "##s", "##t", "##n", "cafe", "日", "本", "語", "😀"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                            ("[SEP]", 3)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": clean_up,
        "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]"}))
    return path


@pytest.mark.parametrize("clean_up", [True, False], ids=["clean-up", "no-clean-up"])
def test_wordpiece_clean_up_spaces_decodes_and_streams_like_transformers(tmp_path, clean_up):
    """tokenizer_config.json's clean_up_tokenization_spaces (" 's" -> "'s", " ' " -> "'", ...): transformers
    applies it to a non-BPE tokenizer's decoded text, so ``decode`` and the stream do too; the stream holds
    back the end that more text could still change, and every piece it shows stays in the final text."""
    transformers = pytest.importorskip("transformers")
    d = wordpiece_dir(tmp_path, clean_up=clean_up)
    ours, hf = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d))
    text = "It 's ok , don't stop . Café 日本語 😀 !"
    ids = ours.encode(text)
    assert ids == hf(text)["input_ids"] and ids[0] == 2 and ids[-1] == 3
    want = "it's ok, don't stop. cafe 日 本 語 😀!" if clean_up else "it ' s ok, don ' t stop. cafe 日 本 語 😀!"
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == want
    assert "".join(stream_all(ours, ids)) == want
    rng = random.Random(0)
    for _ in range(300):  # random ids, special ones among them: pieces join to transformers' text
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 16))]
        want = hf.decode(ids, skip_special_tokens=True)
        pieces = stream_all(ours, ids)
        assert ours.decode(ids) == want and "".join(pieces) == want, ids
    # A BPE is not cleaned up, whatever the config says (transformers skips it: it corrupts BPE text).
    bpe_dir(tmp_path / "bpe", tokenizer_config={"clean_up_tokenization_spaces": True})
    assert load_tokenizer(tmp_path / "bpe").decode(train_bpe().encode("x , it 's").ids) == "x , it 's"


def test_special_tokens_named_in_tokenizer_config_are_special(tmp_path):
    """tokenizer.json has [CLS], [SEP] and [PAD] as ordinary vocabulary tokens; tokenizer_config.json
    names them: transformers makes them special (left out by decode, matched whole by encode), so do we."""
    transformers = pytest.importorskip("transformers")
    d = wordpiece_dir(tmp_path, clean_up=False)
    ours, hf = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d))
    assert ours.vocab_size == hf.backend_tokenizer.get_vocab_size(with_added_tokens=True) == 28  # no id added
    ids = [2, 4, 0, 6, 3]  # [CLS] it [PAD] stop [SEP]
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "it stop"
    assert "".join(stream_all(ours, ids)) == "it stop"
    assert ours.encode("it [SEP] stop") == hf("it [SEP] stop")["input_ids"] == [2, 4, 3, 6, 3]
