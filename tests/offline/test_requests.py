"""Prompts files: JSONL and plain text, every bad line reported with its line number."""

import json

import numpy as np
import pytest

from hydrax.offline import requests as R


def _write(tmp_path, name, lines):
  path = tmp_path / name
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_jsonl_fields_and_defaults(tmp_path):
  path = _write(tmp_path, "p.jsonl", [
      json.dumps({"id": "a", "prompt": "hi", "max_new_tokens": 5, "temperature": 0.5,
                  "top_k": 3, "top_p": 0.9, "stop": ["\n", 7], "n": 4, "seed": 2 ** 32 - 1}),
      "",
      json.dumps({"tokens": [1, 2, 3]}),
  ])
  reqs, bad = R.read_requests(path)
  assert bad == []
  a, b = reqs
  assert (a.id, a.line, a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.top_p) == \
      ("a", 1, "hi", 5, 0.5, 3, 0.9)
  assert a.stop == ("\n",) and a.stop_ids == (7,) and a.n == 4 and a.seed == 2 ** 32 - 1
  assert (b.id, b.line, b.tokens, b.max_new_tokens, b.n, b.seed) == \
      ("3", 3, (1, 2, 3), None, None, None)


def test_plain_text_one_prompt_a_line(tmp_path):
  path = _write(tmp_path, "p.txt", ["first prompt", "", "  second  "])
  reqs, bad = R.read_requests(path)
  assert [(r.id, r.prompt) for r in reqs] == [("1", "first prompt"), ("3", "  second  ")]


BAD = [
    ("{not json", "invalid JSON"),
    (json.dumps({"id": "x", "prompt": "a", "max_tokens": 3}), "unknown key"),
    (json.dumps({"id": "y"}), "exactly one of"),
    (json.dumps({"id": "z", "prompt": "a", "tokens": [1]}), "exactly one of"),
    (json.dumps({"id": "w", "prompt": "a", "max_new_tokens": 0}), "max_new_tokens"),
    (json.dumps({"id": "v", "prompt": "a", "temperature": -1}), "temperature"),
    (json.dumps({"id": "u", "prompt": "a", "top_p": 1.5}), "top_p"),
    (json.dumps({"id": "t", "tokens": [1, "2"]}), "tokens"),
    (json.dumps({"id": "s", "prompt": "a", "stop": [""]}), "stop"),
    (json.dumps({"id": "r", "prompt": "a", "n": 0}), "n must be an int >= 1"),
    (json.dumps({"id": "q", "prompt": "a", "n": 2.0}), "n must be an int >= 1"),
    (json.dumps({"id": "l", "prompt": "a", "seed": 2 ** 32}), "seed must be an int in [0, 2**32)"),
    (json.dumps({"id": "k", "prompt": "a", "seed": -1}), "seed must be an int in [0, 2**32)"),
    (json.dumps({"id": "j", "prompt": "a", "seed": "7"}), "seed must be an int in [0, 2**32)"),
    (json.dumps({"id": "i", "prompt": "a", "continuation": "b", "seed": 1}),
     "a scored request (continuation) takes none of ['seed']"),
    (json.dumps({"id": "ok", "prompt": "a"}), "duplicate id"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"id": "p", "prompt": "a", "continuation": "b", "max_new_tokens": 2}),
     "a scored request (continuation) takes none of ['max_new_tokens']"),
    (json.dumps({"id": "o", "prompt": "a", "continuation": ""}), "continuation must be"),
    (json.dumps({"id": "m", "prompt": "a", "continuation": [1, -2]}), "continuation must be"),
]


def test_bad_lines_are_reported_with_line_numbers(tmp_path):
  lines = [json.dumps({"id": "ok", "prompt": "fine"})] + [text for text, _ in BAD]
  path = _write(tmp_path, "p.jsonl", lines)
  with pytest.raises(R.BadInput) as e:
    R.read_requests(path, on_bad_line="error")
  assert len(e.value.bad_lines) == len(BAD)
  reqs, bad = R.read_requests(path, on_bad_line="skip")
  assert [r.id for r in reqs] == ["ok"]
  for (text, needle), b in zip(BAD, bad):
    assert needle in b.message, (text, b)
  assert [b.line for b in bad] == list(range(2, 2 + len(BAD)))
  assert f"line {2 + len(BAD) - 1}" in str(e.value)


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="on_bad_line"):
    R.read_requests(_write(tmp_path, "p.txt", ["a"]), on_bad_line="ignore")
  with pytest.raises(ValueError, match="not found"):
    R.read_requests(str(tmp_path / "missing.jsonl"))
  with pytest.raises(ValueError, match="no prompts"):
    R.read_requests(_write(tmp_path, "empty.txt", ["", "  "]))


def test_tokenize_checks_vocab_and_length():
  reqs = [R.Request("a", 1, tokens=(1, 2, 3)), R.Request("b", 2, tokens=(1, 300)),
          R.Request("c", 3, tokens=(1,) * 10, max_new_tokens=7), R.Request("d", 4, prompt="x")]
  seqs, bad = R.tokenize(reqs, None, vocab_size=256, max_positions=16,
                         default_max_new_tokens=4)
  assert np.array_equal(seqs[0], [1, 2, 3]) and seqs[1] is seqs[2] is seqs[3] is None
  assert [b.line for b in bad] == [2, 3, 4]
  assert "outside the vocabulary" in bad[0].message
  assert "exceed the model's 16 positions" in bad[1].message
  assert "no tokenizer" in bad[2].message


def test_continuations_tokenized_with_their_prompt():
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {f"w{i}": i for i in range(50)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  reqs = [R.Request("a", 1, prompt="w1 w2", continuation=" w3 w4"),
          R.Request("b", 2, tokens=(1, 2), continuation=(7, 8)),
          R.Request("c", 3, prompt="w1 w2", continuation="w3"),      # "w2w3": merged
          R.Request("d", 4, tokens=(1, 2), continuation="w3"),
          R.Request("e", 5, tokens=(1, 2), continuation=(99,)),
          R.Request("f", 6, tokens=(1,) * 6, continuation=(1, 2, 3)),
          R.Request("g", 7, tokens=(1, 2))]
  seqs, bad = R.tokenize(reqs, tok, vocab_size=50, max_positions=8, default_max_new_tokens=4)
  assert bad == [] and np.array_equal(seqs[0], [1, 2])   # scored: no max_new_tokens check
  conts, bad = R.tokenize_continuations(reqs, seqs, tok, vocab_size=50, max_positions=8)
  assert conts[0].tolist() == [3, 4] and conts[1].tolist() == [7, 8] and conts[6] is None
  assert [b.line for b in bad] == [3, 4, 5, 6]
  assert "merges across the boundary" in bad[0].message
  assert "needs a text prompt" in bad[1].message
  assert "outside the vocabulary" in bad[2].message
  assert "6 prompt tokens + 3 continuation tokens exceed the model's 8" in bad[3].message
