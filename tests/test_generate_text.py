"""Text in, text out: `xlstm-export generate --prompt` against transformers' own greedy generation.

The oracle is a transformers ``xLSTMForCausalLM`` (small config, every parameter randomised as in
test_convert.py) saved with ``save_pretrained`` next to a byte-level BPE ``tokenizer.json`` trained
here with `tokenizers` (test_tokenizer.CORPUS: 1- to 4-byte UTF-8 characters, so a random model
emits tokens that end inside a character and the stream must hold them back). The CLI's stdout must
be exactly ``tokenizer.decode(new tokens)`` of ``model.generate(do_sample=False)``: from the
directory, from its exported .onnx (onnxruntime) and from its converted directory.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from test_tokenizer import EOS, train_bpe, wordpiece_dir
from xlstm_export.cli import main
from xlstm_export.generate import generate_batch, generate_text, torch_runner
from xlstm_export.models import load, preset, xLSTMLM
from xlstm_export.testing import randomize_
from xlstm_export.tokenizer import byte_tokenizer, load_tokenizer

N_NEW = 20  # new tokens per prompt
PROMPTS = ["def main", "Café → 😀 x"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(directory, transformers model, transformers tokenizer, greedy results per prompt)."""
    transformers = pytest.importorskip("transformers")
    bpe = train_bpe()
    cfg = transformers.xLSTMConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=64, num_hidden_layers=2, num_heads=2, chunk_size=16,
        mode="inference", use_cache=False,  # see test_convert._hf_logits
        bos_token_id=0, eos_token_id=0, pad_token_id=0,  # EOS = <|endoftext|>
    )
    torch.manual_seed(0)
    model = transformers.xLSTMForCausalLM(cfg).eval()
    randomize_(model, 100, norm_offset=False)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)
    d = tmp_path_factory.mktemp("hf") / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    greedy = {p: hf_greedy(model, tok, p) for p in PROMPTS}
    return d, model, tok, greedy


def hf_greedy(model, tok, prompt: str, eos_token_id: int | None = None) -> tuple[list[int], str]:
    """transformers' greedy generation: (new token ids, their decoded text)."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    kw = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=N_NEW, do_sample=False, **kw)
    new = out[0, ids.shape[1]:].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([*map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(capsys, *args: str) -> str:
    rc, out, err = cli(capsys, *args)
    lines = [x for x in err.splitlines() if "error:" in x]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, out, err)
    return lines[0]


# --- the must-show: text equal to transformers' --------------------------------------------------
def test_generate_prompt_equals_transformers(hf, capsys):
    d, _, _, greedy = hf
    for prompt in PROMPTS:
        _, want = greedy[prompt]
        rc, out, err = cli(capsys, "generate", d, "--prompt", prompt, "--max-new-tokens", N_NEW)
        assert rc == 0, err
        assert out == want + "\n", prompt
        assert "PyTorch" in err  # statistics go to stderr, stdout is the text alone


def test_generate_prompt_equals_transformers_wordpiece(tmp_path, capsys):
    """A BERT-style WordPiece tokenizer (test_tokenizer.wordpiece_dir: [CLS]/[SEP]/[PAD] named special
    by tokenizer_config.json only, clean_up_tokenization_spaces on): the random model emits [CLS] and
    [PAD] between words and "'" / "," / "?" after spaces; stdout is transformers' decode of them."""
    transformers = pytest.importorskip("transformers")
    d = wordpiece_dir(tmp_path / "wordpiece", clean_up=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    cfg = transformers.xLSTMConfig(vocab_size=28, hidden_size=64, num_hidden_layers=2, num_heads=2, chunk_size=16,
                                   mode="inference", use_cache=False, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.xLSTMForCausalLM(cfg).eval()
    randomize_(model, 100, norm_offset=False)
    model.save_pretrained(d)
    emitted = []
    for prompt in ("it 's ok", "don't stop ."):
        new, want = hf_greedy(model, tok, prompt)
        emitted += new
        assert " '" in tok.backend_tokenizer.decode(new)  # the clean-up changes the text
        rc, out, err = cli(capsys, "generate", d, "--prompt", prompt, "--max-new-tokens", N_NEW)
        assert rc == 0 and out == want + "\n", (prompt, err)
    assert 2 in emitted  # [CLS] among the new tokens


def test_exported_onnx_and_converted_directory_carry_the_tokenizer(hf, tmp_path, capsys):
    d, _, _, greedy = hf
    prompt = PROMPTS[1]
    onnx_path = tmp_path / "exported" / "model.onnx"
    onnx_path.parent.mkdir()
    assert cli(capsys, "export", d, "-o", onnx_path, "--quiet")[0] == 0
    beside = sorted(p.name for p in onnx_path.parent.iterdir())
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(beside), beside
    rc, out, err = cli(capsys, "generate", onnx_path, "--prompt", prompt, "--max-new-tokens", N_NEW)
    assert rc == 0, err
    assert out == greedy[prompt][1] + "\n" and "onnxruntime" in err

    conv = tmp_path / "converted"
    assert cli(capsys, "convert", d, "-o", conv)[0] == 0
    assert (conv / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()
    assert load_tokenizer(conv).eos_token_id == 0  # our config.json has no EOS: generation_config.json does
    rc, out, _ = cli(capsys, "generate", conv, "--prompt", prompt, "--max-new-tokens", N_NEW)
    assert rc == 0 and out == greedy[prompt][1] + "\n"


def test_eos_ends_generation_like_transformers(hf, tmp_path, capsys):
    """EOS from generation_config.json: set it to a token transformers' greedy output reaches
    after a few tokens; both stop there (transformers keeps the EOS, its text is not shown)."""
    d, model, tok, greedy = hf
    prompt = PROMPTS[0]
    new, _ = greedy[prompt]
    k = next(i for i in range(3, N_NEW) if new[i] not in new[:i])
    eos = new[k]
    d2 = tmp_path / "eos"
    shutil.copytree(d, d2)
    gen = json.loads((d2 / "generation_config.json").read_text())
    (d2 / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": eos}))
    want_ids, _ = hf_greedy(model, tok, prompt, eos_token_id=eos)
    assert want_ids == new[: k + 1]  # transformers stopped at the EOS
    rc, out, _ = cli(capsys, "generate", d2, "--prompt", prompt, "--max-new-tokens", N_NEW)
    assert rc == 0 and out == tok.decode(want_ids[:-1]) + "\n"


# --- batches, stop strings, streaming ----------------------------------------------------------------
def test_prompts_file_is_one_batch_equal_to_each_prompt_alone(hf, tmp_path, capsys):
    d, _, _, greedy = hf
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")  # the blank line is skipped
    rc, out, err = cli(capsys, "generate", d, "--prompts", f, "--max-new-tokens", N_NEW, "--quiet")
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    for r in rows:
        assert r["text"] == greedy[r["prompt"]][1] and r["finish_reason"] == "length" and r["tokens"] == N_NEW


def test_batch_runs_every_step_as_one_batch():
    """Prompts of lengths 1, 5 and 12 bytes: every runner call carries all three rows, and each
    row's tokens equal its solo generation (tiny preset, byte tokens)."""
    torch.manual_seed(0)
    model = load("tiny")
    base = torch_runner(model)
    calls = []

    def runner(ids, state):
        calls.append(ids.shape)
        return base(ids, state)

    prompts = [[7], list(b"hello"), list("€ → 😀".encode())]
    n = 6
    got = generate_batch(runner, prompts, n)
    assert {c[0] for c in calls} == {3} and calls[0] == (3, 1)
    assert len(calls) == 1 + (len(prompts[2]) - 1) + (n - 1)  # prefill, ragged prompt steps, decode
    for p, toks in zip(prompts, got.tokens):
        assert len(toks) == n and toks == generate_batch(base, [p], n).tokens[0]
    # EOS per row: a token first seen at place k of the second row ends that row there.
    k = next(i for i in range(1, n) if got.tokens[1][i] not in got.tokens[1][:i])
    eos = got.tokens[1][k]
    stopped = generate_batch(base, prompts, n, eos_token_ids=[eos])
    assert stopped.tokens[1] == got.tokens[1][:k] and stopped.finish_reasons[1] == "stop"
    for r in (0, 2):
        want = got.tokens[r][: got.tokens[r].index(eos)] if eos in got.tokens[r] else got.tokens[r]
        assert stopped.tokens[r] == want


def test_stop_string_ends_the_text(hf, capsys):
    d, _, _, greedy = hf
    prompt = PROMPTS[1]
    want = greedy[prompt][1]
    stop = next(want[i : i + 2] for i in range(4, len(want)) if "\ufffd" not in want[i : i + 2])
    cut = want[: want.find(stop)]
    rc, out, _ = cli(capsys, "generate", d, "--prompt", prompt, "--max-new-tokens", N_NEW, "--stop", stop,
                     "--stop", "never in it")
    assert rc == 0 and out == cut + "\n"


def test_text_streams_while_generating():
    """Pieces reach the caller between runner calls (not all at the end), whole characters only,
    and join to the final text."""
    torch.manual_seed(0)
    model = load("tiny")
    base, events = torch_runner(model), []

    def runner(ids, state):
        events.append("step")
        return base(ids, state)

    results, _ = generate_text(runner, byte_tokenizer(), ["The xLSTM "], 24,
                               on_text=lambda row, piece: events.append(piece))
    pieces = [e for e in events if e != "step"]
    assert "".join(pieces) == results[0].text and len(pieces) > 3
    assert events.index(pieces[0]) < len(events) - 1 - events[::-1].index("step")  # text before the last step
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])


# --- one clear error per bad input -------------------------------------------------------------------
def test_bad_generate_options_are_one_clear_error(tmp_path, capsys):
    assert "--top-k must be >= 1" in one_error(capsys, "generate", "tiny", "--top-k", "0")
    assert "--temperature must be a number >= 0" in one_error(capsys, "generate", "tiny", "--temperature", "-1")
    assert "--temperature" in one_error(capsys, "generate", "tiny", "--temperature", "nan")
    assert "--prompt-ids is empty" in one_error(capsys, "generate", "tiny", "--prompt-ids", "")
    assert "--prompt is empty" in one_error(capsys, "generate", "tiny", "--prompt", "")
    assert "no such file" in one_error(capsys, "generate", "tiny", "--prompts", tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "no prompts" in one_error(capsys, "generate", "tiny", "--prompts", tmp_path / "empty.txt")
    # A 50k vocabulary without a tokenizer: the default prompt is not fed as bytes, nor --prompt.
    d = tmp_path / "big-vocab"
    torch.manual_seed(0)
    xLSTMLM(preset("tiny-large", vocab_size=50304)).save_pretrained(d)
    assert not (d / "tokenizer.json").exists()
    msg = one_error(capsys, "generate", d, "--max-new-tokens", "2")
    assert "the default prompt 'The xLSTM ' needs a tokenizer" in msg and "--prompt-ids" in msg
    assert "--prompt 'hi' needs a tokenizer" in one_error(capsys, "generate", d, "--prompt", "hi")
    assert "--stop needs a tokenizer" in one_error(capsys, "generate", d, "--prompt-ids", "1", "--stop", "x")
    rc, out, _ = cli(capsys, "generate", d, "--prompt-ids", "1,50000", "--max-new-tokens", "2", "--quiet")
    assert rc == 0 and out.startswith("tokens:")  # token ids still work


def test_a_model_without_tokenizer_takes_ids_only(tmp_path, capsys):
    """No tokenizer.json: generate_text says what to do instead of failing on None.encode, and the CLI
    does not guess the byte tokenizer for a vocab-256 directory (README: --prompt-ids only)."""
    def runner(ids, state):  # never reached
        raise AssertionError("generate_text ran the model without a tokenizer")

    with pytest.raises(TypeError, match=r"got None: load_tokenizer\(path\) returns None .*generate_batch"):
        generate_text(runner, None, ["hi"], 4)
    with pytest.raises(TypeError, match=r"a list of strings, got one string: give \['hi'\]"):
        generate_text(runner, byte_tokenizer(), "hi", 4)  # not two prompts "h" and "i"
    d = tmp_path / "bytes-without-tokenizer"
    torch.manual_seed(0)
    xLSTMLM(preset("tiny")).save_pretrained(d)  # vocab 256, no tokenizer.json
    assert load_tokenizer(d) is None
    assert "--prompt 'hi' needs a tokenizer" in one_error(capsys, "generate", d, "--prompt", "hi")
    rc, out, _ = cli(capsys, "generate", d, "--prompt-ids", "104,105", "--max-new-tokens", "2", "--quiet")
    assert rc == 0 and out.startswith("tokens:")


def test_version_and_byte_presets(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("xlstm-export ")
    # A byte-level preset converts with its byte tokenizer, and text generation works from it.
    assert cli(capsys, "convert", "tiny", "-o", tmp_path / "tiny")[0] == 0
    assert load_tokenizer(tmp_path / "tiny").encode("é") == [0xC3, 0xA9]
    rc, out, _ = cli(capsys, "generate", tmp_path / "tiny", "--prompt", "ab", "--max-new-tokens", "5")
    runner = torch_runner(xLSTMLM.from_pretrained(tmp_path / "tiny"))
    res = generate_batch(runner, [list(b"ab")], 5)
    assert rc == 0 and out == byte_tokenizer().decode(res.tokens[0]) + "\n"
    assert np.asarray(res.tokens).shape == (1, 5)


def test_public_api_from_the_package():
    """`from xlstm_export import ...` (README quick start); the names load lazily, so the bare
    import does not pull in torch."""
    import subprocess
    import sys

    import xlstm_export

    for name in xlstm_export.__all__:
        assert getattr(xlstm_export, name) is not None, name
    assert xlstm_export.load is load and xlstm_export.generate_text is generate_text
    assert xlstm_export.load_tokenizer is load_tokenizer
    probe = "import sys, xlstm_export; print('torch' in sys.modules, xlstm_export.__version__)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split()[0] == "False", proc.stderr


def test_public_docstrings_are_their_own_and_name_their_parameters():
    """help() on the public API shows what each thing is and what its arguments mean."""
    import dataclasses
    import inspect

    from xlstm_export.engine import build_engine
    from xlstm_export.export import export_onnx
    from xlstm_export.models import xLSTMConfig
    from xlstm_export.ort import OrtModel
    from xlstm_export.tensorrt import tensorrt_available
    from xlstm_export.tokenizer import TextStream, Tokenizer

    assert xLSTMLM.__doc__ and xLSTMLM.__doc__ != torch.nn.Module.__doc__
    config_doc = inspect.getdoc(xLSTMConfig)
    assert not config_doc.startswith("xLSTMConfig(")  # not the dataclass's generated signature
    assert [f.name for f in dataclasses.fields(xLSTMConfig) if f"``{f.name}``" not in config_doc] == []
    for f in (tensorrt_available, Tokenizer.encode, Tokenizer.decode, Tokenizer.stream, TextStream.push,
              TextStream.finish):
        assert inspect.getdoc(f), f.__qualname__
    for f, doc in ((generate_batch, generate_batch.__doc__), (OrtModel.__init__, OrtModel.__doc__)):
        params = [p for p in inspect.signature(f).parameters if p not in ("self", "runner", "prompts", "path")]
        assert [p for p in params if p not in doc] == [], f.__qualname__
    for f, params in ((export_onnx, ["progress"]), (build_engine, ["workspace_gib", "verbose"])):
        doc = f.__doc__
        assert [p for p in params if p not in doc] == [], f.__qualname__


def test_stop_string_in_the_held_back_end_is_a_stop(tmp_path):
    """A stop string that shows only when the held-back end is released (a WordPiece clean-up: "it ' s"
    becomes "it's" once no later token can change it) still cuts the text, and the finish reason is
    "stop", as the server reports it, not "length"."""
    tok = load_tokenizer(wordpiece_dir(tmp_path, clean_up=True))
    script = [4, 15, 11]  # it ' s

    def runner(ids, state):  # emits the script, one token per call
        n = 0 if state is None else state["n"]
        logits = np.zeros((ids.shape[0], ids.shape[1], tok.vocab_size), np.float32)
        logits[:, -1, script[min(n, len(script) - 1)]] = 1.0
        return logits, {"n": n + 1}

    (res,), _ = generate_text(runner, tok, ["ok"], len(script), stop=["it's"])
    assert res.tokens == script and res.text == "" and res.finish_reason == "stop"
