"""harness.data against the local copies in $HARNESS_DATA and the figures in shared/data/README.md.

Every expected number here is independent of the code under test: the paper's 287,644 wikitext2
tokens, the README's byte and word counts, and the GPTQ reference loops re-implemented below.
"""
from __future__ import annotations

import json
import os
import random
import sys
import types
from pathlib import Path

import pytest
import torch

from harness import data
from harness.errors import UserError

DATA = os.environ.get("HARNESS_DATA")
if not DATA or not Path(DATA).is_dir():
    pytest.skip("HARNESS_DATA is not set to the shared data folder (e.g. HARNESS_DATA=/work/shared/data)",
                allow_module_level=True)
ROOT = Path(DATA)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ROOT / "tokenizers" / "gpt2"))


@pytest.fixture(scope="module")
def wiki(tok, tmp_path_factory):
    """wikitext2 eval tokens, tokenized once for the module, with the cache folder it wrote."""
    cache = tmp_path_factory.mktemp("cache")
    tokens, prov = data.eval_tokens(tok, "wikitext2", 2048, cache)
    return tokens, prov, cache


def _ids(tok, text: str) -> list[int]:
    return tok(text, verbose=False)["input_ids"]


def _c4_docs(name: str) -> list[str]:
    return [json.loads(line)["text"] for line in (ROOT / "c4" / name).read_text(encoding="utf-8").splitlines()]


def _reference_doc_sampler(tok, docs: list[str], n: int, seqlen: int, seed: int) -> torch.Tensor:
    """GPTQ datautils get_c4 loop (``>= seqlen`` as in the reference; it would crash on L == seqlen)."""
    rng = random.Random(seed)  # == random.seed(seed) + module-level random.randint
    memo: dict[int, list[int]] = {}
    out = []
    for _ in range(n):
        while True:
            i = rng.randint(0, len(docs) - 1)
            ids = memo.setdefault(i, _ids(tok, docs[i]))
            if len(ids) >= seqlen:
                break
        i = rng.randint(0, len(ids) - seqlen - 1)
        out.append(ids[i:i + seqlen])
    return torch.tensor(out)


def _is_substring(row: torch.Tensor, stream: torch.Tensor) -> bool:
    for s in (stream[: stream.numel() - row.numel() + 1] == row[0]).nonzero().flatten().tolist():
        if torch.equal(stream[s:s + row.numel()], row):
            return True
    return False


# --- evaluation streams -------------------------------------------------------------------------

def test_wikitext2_is_the_paper_count(wiki):
    tokens, prov, _ = wiki
    assert tokens.dtype == torch.int64 and tokens.shape == (1, 287_644)
    assert 287_644 // 2048 == 140
    assert prov["n_tokens"] == 287_644 and prov["n_windows"] == 140
    assert prov["source"] == "local:wikitext-2-raw/wiki.test.raw"
    assert prov["sha256"] == "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
    assert "\\n\\n" in prov["protocol"]


def test_wikitext2_hf_row_rebuild():
    rows = list(data._load_texts("wikitext2", "test", "eval.datasets").texts)
    assert len(rows) == 4_358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert all(r == "" or r.endswith("\n") for r in rows)
    utf8 = sum(len(r.encode("utf-8")) for r in rows)
    # The README's 1,305,088 is the HF split's num_bytes: Arrow string data plus one 4-byte offset per row.
    assert utf8 == 1_287_656
    assert utf8 + 4 * len(rows) == 1_305_088


def test_ptb_new_count_independent(tok):
    tokens, prov = data.eval_tokens(tok, "ptb_new", 2048, None)
    lines = (ROOT / "ptb" / "ptb.test.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # file ends with a newline: no extra empty sentence
    sentences = [line.strip() for line in lines[:-1]]
    assert len(sentences) == 3_761
    assert sum(len(s.split()) + 1 for s in sentences) == 82_430  # words + <eos>: the standard count
    expected = _ids(tok, " ".join(sentences))
    assert tokens.shape == (1, len(expected)) and tokens[0].tolist() == expected
    assert prov["source"] == "local:ptb/ptb.test.txt" and prov["split"] == "test"


def test_ptb_validation_joined_with_blank_lines(tok):
    tokens, prov = data.eval_tokens(tok, "ptb", 2048, None)
    first = (ROOT / "ptb" / "ptb.valid.txt").read_text(encoding="utf-8").split("\n")[0].strip()
    first_ids = _ids(tok, first)
    assert first.startswith("consumers may want") and not first.endswith(" ")
    assert tokens[0, : len(first_ids)].tolist() == first_ids
    assert tok.decode(tokens[0, len(first_ids):len(first_ids) + 2]) == "\n\n"
    assert prov["split"] == "validation" and prov["n_tokens"] == tokens.shape[1]


def test_c4_eval_is_the_reference_sampler(tok):
    seqlen = 384  # one validation document has exactly 384 tokens, but seed 0 never draws it
    tokens, prov = data.eval_tokens(tok, "c4", seqlen, None)
    expected = _reference_doc_sampler(tok, _c4_docs("c4_validation_2k.jsonl"), 256, seqlen, seed=0)
    assert tokens.shape == (1, 256 * seqlen)
    assert torch.equal(tokens, expected.reshape(1, -1))
    assert "not known" in prov["note"]


def test_c4_eval_survives_the_reference_crash(tok):
    # At seqlen 512 the reference draws a document of exactly 512 tokens and dies in randint(0, -1);
    # the harness skips such documents (``> seqlen``), which changes nothing whenever the reference runs.
    with pytest.raises(ValueError):
        _reference_doc_sampler(tok, _c4_docs("c4_validation_2k.jsonl"), 256, 512, seed=0)
    tokens, _ = data.eval_tokens(tok, "c4", 512, None)
    assert tokens.shape == (1, 256 * 512)


def test_c4_new_first_1100_documents(tok):
    full, prov = data.eval_tokens(tok, "c4_new", 2048, None)
    assert full.shape == (1, 521_502)  # README: just under 256 * 2048
    assert "fewer than 256 * seqlen" in prov["note"] and "not known" in prov["note"]
    short, _ = data.eval_tokens(tok, "c4_new", 64, None)
    assert short.shape == (1, 256 * 64) and torch.equal(short[0], full[0, : 256 * 64])


# --- calibration --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def c4_stream(tok) -> torch.Tensor:
    """The c4 train slice joined with blank lines, tokenized here independently: (N,)."""
    return torch.tensor(_ids(tok, "\n\n".join(_c4_docs("c4-train.00000-of-01024.first1000.jsonl"))))


def test_calibration_concat_windows(tok, c4_stream):
    tokens, prov = data.calibration_tokens(tok, "c4", 16, 64, 0, None, sampler="concat")
    assert tokens.shape == (16, 64) and tokens.dtype == torch.int64
    assert all(_is_substring(row, c4_stream) for row in tokens)
    assert prov["sampler"] == "concat" and prov["sampler_requested"] == "concat"
    assert prov["seed"] == 0 and prov["source_tokens"] == c4_stream.numel()
    again, _ = data.calibration_tokens(tok, "c4", 16, 64, 0, None, sampler="concat")
    other, _ = data.calibration_tokens(tok, "c4", 16, 64, 1, None, sampler="concat")
    assert torch.equal(tokens, again)
    assert not torch.equal(tokens, other)


def test_calibration_auto_falls_back_to_concat(tok):
    # README: 28 train documents are longer than 2,048 GPT-2 tokens, so 128 windows cannot be documents.
    tokens, prov = data.calibration_tokens(tok, "c4", 128, 2048, 0, None)
    assert tokens.shape == (128, 2048)
    assert prov["sampler"] == "concat" and prov["sampler_requested"] == "auto"
    assert "28 of 1000" in prov["sampler_reason"]


def test_calibration_document_sampler_is_the_reference(tok):
    tokens, prov = data.calibration_tokens(tok, "c4", 8, 2048, 0, None)
    assert prov["sampler"] == "document" and prov["sampler_requested"] == "auto"
    expected = _reference_doc_sampler(tok, _c4_docs("c4-train.00000-of-01024.first1000.jsonl"), 8, 2048, seed=0)
    assert torch.equal(tokens, expected)
    other, _ = data.calibration_tokens(tok, "c4", 8, 2048, 1, None, sampler="document")
    assert not torch.equal(tokens, other)


def test_calibration_random(tok):
    tokens, prov = data.calibration_tokens(tok, "random", 4, 128, 3, None)
    assert tokens.shape == (4, 128) and tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < len(tok)
    assert torch.equal(tokens, data.calibration_tokens(tok, "random", 4, 128, 3, None)[0])
    assert not torch.equal(tokens, data.calibration_tokens(tok, "random", 4, 128, 4, None)[0])
    assert prov["sampler"] == "random" and prov["seed"] == 3 and prov["vocab_size"] == len(tok)


# --- cache --------------------------------------------------------------------------------------

def _fail(*args, **kwargs):
    raise AssertionError("the tokenizer was called although the result is cached")


def test_cache_hit_does_not_tokenize(wiki, tok, monkeypatch):
    tokens, prov, cache = wiki
    files = sorted(p.name for p in (cache / "tokens").iterdir())
    assert len(files) == 2 and files[0].startswith("eval-wikitext2-")
    assert {Path(f).suffix for f in files} == {".pt", ".json"}
    monkeypatch.setattr(type(tok), "__call__", _fail)
    again, prov2 = data.eval_tokens(tok, "wikitext2", 2048, cache)
    assert torch.equal(tokens, again) and prov2 == prov


def test_cache_key_depends_on_seqlen_and_seed(tok, tmp_path):
    a, _ = data.calibration_tokens(tok, "c4", 4, 32, 0, tmp_path)
    b, _ = data.calibration_tokens(tok, "c4", 4, 64, 0, tmp_path)
    c, _ = data.calibration_tokens(tok, "c4", 4, 64, 1, tmp_path)
    assert a.shape == (4, 32) and b.shape == (4, 64) and not torch.equal(b, c)
    assert len(list((tmp_path / "tokens").glob("calib-c4-*.pt"))) == 3


def test_corrupt_cache_is_rebuilt(tok, tmp_path, monkeypatch):
    fresh, prov = data.calibration_tokens(tok, "c4", 4, 32, 0, tmp_path)
    (pt,) = (tmp_path / "tokens").glob("*.pt")
    pt.write_bytes(b"not a torch file")
    again, prov2 = data.calibration_tokens(tok, "c4", 4, 32, 0, tmp_path)
    assert torch.equal(fresh, again) and prov2 == prov
    assert torch.equal(torch.load(pt, weights_only=True), fresh)  # rewritten
    assert not list((tmp_path / "tokens").glob("*.tmp"))
    monkeypatch.setattr(type(tok), "__call__", _fail)
    assert torch.equal(data.calibration_tokens(tok, "c4", 4, 32, 0, tmp_path)[0], fresh)


def test_tokenizer_fingerprint(tok):
    from transformers import AutoTokenizer

    same = AutoTokenizer.from_pretrained(str(ROOT / "tokenizers" / "gpt2"))
    assert data.tokenizer_fingerprint(same) == data.tokenizer_fingerprint(tok)
    same.add_tokens(["<harness-test-token>"])
    assert data.tokenizer_fingerprint(same) != data.tokenizer_fingerprint(tok)


# --- errors and the hub path ----------------------------------------------------------------------

def test_unknown_dataset_suggests(tok):
    with pytest.raises(UserError) as err:
        data.eval_tokens(tok, "wikitext", 2048, None)
    assert err.value.key == "eval.datasets" and "did you mean 'wikitext2'" in err.value.fix
    assert "ptb_new" in err.value.fix
    with pytest.raises(UserError) as err:
        data.calibration_tokens(tok, "c44", 4, 32, 0, None)
    assert err.value.key == "calib.dataset" and "did you mean 'c4'" in err.value.fix
    with pytest.raises(UserError) as err:
        data.calibration_tokens(tok, "c4", 4, 32, 0, None, sampler="documents")
    assert err.value.key == "calib.sampler" and "did you mean 'document'" in err.value.fix


def test_missing_local_file(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path))
    with pytest.raises(UserError) as err:
        data.eval_tokens(tok, "ptb", 2048, None)
    assert err.value.key == "eval.datasets"
    assert "ptb validation split is not in $HARNESS_DATA" in err.value.message
    assert "ptb/ptb.valid.txt" in err.value.fix
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path / "nope"))
    with pytest.raises(UserError) as err:
        data.data_root()
    assert err.value.key == "HARNESS_DATA"


def test_wikitext2_train_not_shipped(tok):
    with pytest.raises(UserError) as err:
        data.calibration_tokens(tok, "wikitext2", 4, 32, 0, None)
    assert err.value.key == "calib.dataset"
    assert "wikitext2 train split is not in $HARNESS_DATA" in err.value.message
    assert "calib.dataset=c4" in err.value.fix and "unset HARNESS_DATA" in err.value.fix


def test_wikitext2_calibration_offline(tok, monkeypatch):
    monkeypatch.delenv("HARNESS_DATA")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails, installed or not
    with pytest.raises(UserError) as err:
        data.calibration_tokens(tok, "wikitext2", 4, 32, 0, None)
    assert err.value.key == "calib.dataset"
    assert "not available offline" in err.value.message and "HARNESS_DATA" in err.value.fix


def _fake_datasets(monkeypatch, load) -> list:
    calls: list = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return load(path, name, **kwargs)

    monkeypatch.delenv("HARNESS_DATA")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_path_gives_the_same_stream(tok, monkeypatch):
    local, _ = data.eval_tokens(tok, "ptb_new", 2048, None)
    lines = (ROOT / "ptb" / "ptb.test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    calls = _fake_datasets(monkeypatch, lambda *a, **k: [{"sentence": line.strip()} for line in lines])
    hub, prov = data.eval_tokens(tok, "ptb_new", 2048, None)
    assert calls == [("ptb_text_only", "penn_treebank", {"split": "test"})]
    assert torch.equal(hub, local)
    assert prov["source"] == "hub:ptb_text_only/penn_treebank" and "hub_fingerprint" in prov


def test_hub_c4_uses_shard_zero(tok, monkeypatch):
    docs = _c4_docs("c4_validation_2k.jsonl")[:50]
    calls = _fake_datasets(monkeypatch, lambda *a, **k: [{"text": d} for d in docs])
    tokens, prov = data.eval_tokens(tok, "c4_new", 64, None)
    assert calls[0][0] == "allenai/c4"
    assert calls[0][2] == {"split": "validation",
                           "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}}
    assert tokens.shape == (1, 256 * 64) and prov["data_files"] == "en/c4-validation.00000-of-00008.json.gz"


def test_hub_unreachable_is_a_user_error_but_bugs_are_not(tok, monkeypatch):
    def unreachable(*a, **k):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    _fake_datasets(monkeypatch, unreachable)
    with pytest.raises(UserError) as err:
        data.eval_tokens(tok, "wikitext2", 2048, None)
    assert err.value.key == "eval.datasets" and "not available offline" in err.value.message
    assert "HF_HUB_OFFLINE" in err.value.message

    def bug(*a, **k):
        raise ValueError("a programming error keeps its traceback")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=bug))
    with pytest.raises(ValueError):
        data.eval_tokens(tok, "wikitext2", 2048, None)
