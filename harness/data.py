"""Evaluation and calibration token streams, built exactly as the GPTQ reference code builds them.

Two entry points, both returning ``(tokens, provenance)``:

* :func:`eval_tokens` — one long stream ``(1, N)`` for windowed perplexity (``wikitext2``, ``ptb``,
  ``c4``, and the reference's later "new eval" ``ptb_new`` / ``c4_new``).
* :func:`calibration_tokens` — ``(nsamples, seqlen)`` windows for the quantizer (``c4``,
  ``wikitext2`` train, or uniformly ``random`` ids).

Texts come from ``$HARNESS_DATA`` (local copies described in ``shared/data/README.md``) when it is
set, else from the Hugging Face Hub through ``datasets`` (imported only then). The provenance dict
goes into the run record; tokenized results are cached under ``cache_dir/tokens/``.

Reference (IST-DASLab/gptq ``datautils.py``) facts reproduced here:

* HF ``wikitext-2-raw-v1`` rows are the raw file's lines, newline kept; blank lines become ``""``.
* HF ``ptb_text_only`` ``sentence`` is each Mikolov line ``.strip()``-ed.
* Every text is tokenized with the plain tokenizer call (special tokens as the tokenizer adds them).
* c4 document sampler: ``random.seed(seed)``; draw ``randint(0, len(docs) - 1)`` until a document
  is long enough, then the window start is ``randint(0, L - seqlen - 1)`` (the last token is never
  used). The reference tests ``L >= seqlen`` and then crashes on ``L == seqlen`` (``randint(0, -1)``),
  so we test ``L > seqlen``: identical draws whenever the reference runs at all.
* wikitext2 calibration: ``random.seed(seed)``; start ``randint(0, N - seqlen - 1)`` on the joined
  train stream — this is our ``concat`` sampler, applied to c4 too when its documents are short.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import json
import os
import random
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from harness.errors import UserError

EVAL_DATASETS = ("wikitext2", "ptb", "c4", "ptb_new", "c4_new")
CALIB_DATASETS = ("c4", "wikitext2", "random")
SAMPLERS = ("auto", "document", "concat")

C4_EVAL_WINDOWS = 256  # get_c4: 256 validation windows; get_c4_new: cut to 256 * seqlen tokens
C4_EVAL_SEED = 0  # get_c4 re-seeds with 0 for the validation windows, whatever the calibration seed
C4_NEW_DOCS = 1100  # get_c4_new: the first 1,100 validation documents
CACHE_FORMAT = 1  # bump when the cached content or the key fields change

# (corpus, split) -> file relative to $HARNESS_DATA
_LOCAL_FILES = {
    ("wikitext2", "test"): "wikitext-2-raw/wiki.test.raw",
    ("wikitext2", "train"): "wikitext-2-raw/wiki.train.raw",
    ("ptb", "validation"): "ptb/ptb.valid.txt",
    ("ptb", "test"): "ptb/ptb.test.txt",
    ("c4", "train"): "c4/c4-train.00000-of-01024.first1000.jsonl",
    ("c4", "validation"): "c4/c4_validation_2k.jsonl",
}

# What the local copies are, when they are not the whole split the reference reads.
_LOCAL_NOTES = {
    ("c4", "train"): "local slice: the first 1,000 documents of en/c4-train.00000-of-01024 (the reference "
    "draws from the whole shard), so the windows are not the reference's",
    ("c4", "validation"): "local validation slice (2,000 documents) is not known to be the reference's "
    "documents (en/c4-validation.00000-of-00008), so this stream is not the reference's",
}


@dataclass(frozen=True)
class _Hub:
    path: str
    name: str | None
    column: str
    data_files: dict[str, str] | None = None


_HUB = {
    "wikitext2": _Hub("wikitext", "wikitext-2-raw-v1", "text"),
    "ptb": _Hub("ptb_text_only", "penn_treebank", "sentence"),
    "c4": _Hub("allenai/c4", None, "text", {"train": "en/c4-train.00000-of-01024.json.gz",
                                             "validation": "en/c4-validation.00000-of-00008.json.gz"}),
}

_OFFLINE_FIX = "set HARNESS_DATA to a folder with the data (see README)"


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def data_root() -> Path | None:
    """The local data folder from ``$HARNESS_DATA``, or None (unset or empty: use the hub)."""
    value = os.environ.get("HARNESS_DATA", "")
    if not value:
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        raise UserError("HARNESS_DATA", f"{root} is not a directory",
                        "point HARNESS_DATA at the data folder (shared/data), or unset it to read from the hub")
    return root


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (data files, GGUF weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 identifying what a tokenizer does: its full serialized pipeline when it is a fast
    (``tokenizers``-backed) tokenizer, else its class, name_or_path, size and sorted vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = json.dumps([type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")),
                           len(tokenizer), sorted(tokenizer.get_vocab().items())], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def eval_tokens(tokenizer: Any, name: str, seqlen: int, cache_dir: Path | None,
                key: str = "eval.datasets") -> tuple[torch.LongTensor, dict]:
    """The perplexity token stream of ``name``, shape ``(1, N)`` int64, as the GPTQ reference builds it.

    The caller cuts it into non-overlapping windows of ``seqlen`` (``c4`` and ``c4_new`` also depend on
    ``seqlen`` themselves). Returns the stream and its provenance dict for the run record.
    ``key`` names the config entry in user errors.
    """
    _check_choice(name, EVAL_DATASETS, key, "dataset")
    _check_positive(seqlen, _subkey(key, "seqlen"))
    spec = _EVAL[name]
    texts = _load_texts(spec.corpus, spec.split, key)
    fp = tokenizer_fingerprint(tokenizer)
    ident = {"kind": "eval", "dataset": name, "protocol": spec.protocol, "seqlen": seqlen, "nsamples": None,
             "seed": C4_EVAL_SEED if name == "c4" else None, "source": texts.source, "digest": texts.digest,
             "tokenizer": fp, "format": CACHE_FORMAT}
    cache_key = _hash_json(ident)
    stem = f"eval-{name}-{cache_key[:24]}"
    hit = _cache_load(cache_dir, stem, cache_key)
    if hit is not None:
        return hit
    tokens = spec.build(tokenizer, texts.texts, seqlen, key)  # (1, N)
    prov = {"dataset": name, "split": texts.split, **texts.provenance(), "protocol": spec.protocol,
            "n_tokens": int(tokens.shape[1]), "seqlen": seqlen, "n_windows": int(tokens.shape[1]) // seqlen,
            "tokenizer": _tokenizer_name(tokenizer), "tokenizer_sha256": fp}
    notes = [n for n in (texts.note, spec.note(tokens, seqlen)) if n]
    if notes:
        prov["note"] = "; ".join(notes)
    _cache_store(cache_dir, stem, cache_key, tokens, prov)
    return tokens, prov


def calibration_tokens(tokenizer: Any, dataset: str, nsamples: int, seqlen: int, seed: int,
                       cache_dir: Path | None, sampler: str = "auto",
                       key: str = "calib.dataset") -> tuple[torch.LongTensor, dict]:
    """``nsamples`` calibration windows of ``seqlen`` tokens, shape ``(nsamples, seqlen)`` int64.

    ``dataset``: ``c4`` (train shard 0), ``wikitext2`` (train split) or ``random`` (uniform ids in
    ``[0, len(tokenizer))``). ``sampler``: ``document`` (the reference's c4 sampler: random documents
    longer than ``seqlen``, a random window in each), ``concat`` (uniform windows of the documents
    joined with ``"\\n\\n"``; the reference's wikitext2 sampler) or ``auto`` (``document`` when at least
    ``nsamples`` documents are longer than ``seqlen``, else ``concat``). The provenance says which ran.
    """
    _check_choice(dataset, CALIB_DATASETS, key, "dataset")
    _check_choice(sampler, SAMPLERS, _subkey(key, "sampler"), "sampler")
    _check_positive(nsamples, _subkey(key, "nsamples"))
    _check_positive(seqlen, _subkey(key, "seqlen"))
    if dataset == "random":
        return _random_tokens(tokenizer, nsamples, seqlen, seed, sampler)
    if dataset == "wikitext2" and sampler == "document":
        raise UserError(_subkey(key, "sampler"), "wikitext2 has no documents to sample from",
                        f"use {_subkey(key, 'sampler')}=concat or auto (the reference draws windows of the joined "
                        "train split)")

    texts = _load_texts(dataset, "train", key)
    fp = tokenizer_fingerprint(tokenizer)
    ident = {"kind": "calib", "dataset": dataset, "sampler": sampler, "seqlen": seqlen, "nsamples": nsamples,
             "seed": seed, "source": texts.source, "digest": texts.digest, "tokenizer": fp, "format": CACHE_FORMAT}
    cache_key = _hash_json(ident)
    stem = f"calib-{dataset}-{cache_key[:24]}"
    hit = _cache_load(cache_dir, stem, cache_key)
    if hit is not None:
        return hit

    prov: dict[str, Any] = {"dataset": dataset, "split": texts.split, **texts.provenance()}
    if dataset == "wikitext2":
        docs = None
        ran = "concat"
        reason = "requested" if sampler == "concat" else "auto: the reference's wikitext2 sampler"
    else:
        docs = _DocTokens(tokenizer, texts.texts)
        need = 1 if sampler == "document" else nsamples
        n_long = docs.count_longer(seqlen, need)
        if sampler == "document" and n_long == 0:
            raise UserError(_subkey(key, "seqlen"), f"no {dataset} document is longer than {seqlen} tokens",
                            f"use {_subkey(key, 'sampler')}=concat, or a smaller {_subkey(key, 'seqlen')}")
        if sampler == "auto":
            ran = "document" if n_long >= nsamples else "concat"
            if ran == "document":
                reason = f"auto: at least {nsamples} documents are longer than {seqlen} tokens"
            else:
                reason = (f"auto: only {n_long} of {len(docs)} documents are longer than {seqlen} tokens "
                          f"(need {nsamples})")
        else:
            ran, reason = sampler, "requested"

    if ran == "document" and docs is not None:
        tokens = _sample_documents(docs, nsamples, seqlen, seed)
        protocol = ("random.seed(seed); per sample draw random documents until one is longer than seqlen, "
                    "then a window starting at randint(0, L - seqlen - 1) (GPTQ get_c4)")
    else:
        stream = _encode(tokenizer, "\n\n".join(texts.texts))  # (N,)
        if stream.numel() <= seqlen:
            raise UserError(_subkey(key, "seqlen"), f"{dataset} train has {stream.numel()} tokens, "
                            f"not more than seqlen={seqlen}", f"use a smaller {_subkey(key, 'seqlen')}")
        tokens = _sample_concat(stream, nsamples, seqlen, seed)
        protocol = ("documents joined with '\\n\\n', tokenized once; random.seed(seed); windows starting at "
                    "randint(0, N - seqlen - 1) (GPTQ get_wikitext2)")
        prov["source_tokens"] = int(stream.numel())
    prov.update({"protocol": protocol, "sampler": ran, "sampler_requested": sampler, "sampler_reason": reason,
                 "seed": seed, "nsamples": nsamples, "seqlen": seqlen, "n_tokens": int(tokens.numel()),
                 "tokenizer": _tokenizer_name(tokenizer), "tokenizer_sha256": fp})
    if texts.note:
        prov["note"] = texts.note
    _cache_store(cache_dir, stem, cache_key, tokens, prov)
    return tokens, prov


# ---------------------------------------------------------------------------------------------
# Evaluation protocols
# ---------------------------------------------------------------------------------------------

_Builder = Callable[[Any, Sequence[str], int, str], torch.Tensor]  # (tokenizer, texts, seqlen, key) -> (1, N)


@dataclass(frozen=True)
class _EvalSpec:
    corpus: str
    split: str
    protocol: str
    build: _Builder
    note: Callable[[torch.Tensor, int], str | None] = lambda tokens, seqlen: None


def _joined(sep: str) -> _Builder:
    def build(tokenizer: Any, texts: Sequence[str], seqlen: int, key: str) -> torch.Tensor:
        return _encode(tokenizer, sep.join(texts)).unsqueeze(0)  # (1, N)
    return build


def _c4_windows(tokenizer: Any, texts: Sequence[str], seqlen: int, key: str) -> torch.Tensor:
    """get_c4's validation stream: 256 windows of seqlen, seed 0, concatenated -> (1, 256 * seqlen)."""
    docs = _DocTokens(tokenizer, texts)
    if docs.count_longer(seqlen, 1) == 0:
        raise UserError(_subkey(key, "seqlen"), f"no c4 validation document is longer than {seqlen} tokens",
                        "use a smaller eval.seqlen")
    return _sample_documents(docs, C4_EVAL_WINDOWS, seqlen, C4_EVAL_SEED).reshape(1, -1)


def _c4_new(tokenizer: Any, texts: Sequence[str], seqlen: int, key: str) -> torch.Tensor:
    """get_c4_new: the first 1,100 validation documents joined with ' ', cut to 256 * seqlen tokens."""
    first = [texts[i] for i in range(min(C4_NEW_DOCS, len(texts)))]
    return _encode(tokenizer, " ".join(first))[: C4_EVAL_WINDOWS * seqlen].clone().unsqueeze(0)


def _c4_new_note(tokens: torch.Tensor, seqlen: int) -> str | None:
    if tokens.shape[1] < C4_EVAL_WINDOWS * seqlen:
        return f"only {tokens.shape[1]} tokens, fewer than 256 * seqlen = {C4_EVAL_WINDOWS * seqlen}"
    return None


_EVAL = {
    "wikitext2": _EvalSpec("wikitext2", "test", "wikitext-2-raw-v1 test rows joined with '\\n\\n', tokenized once "
                           "(GPTQ get_wikitext2)", _joined("\n\n")),
    "ptb": _EvalSpec("ptb", "validation", "ptb_text_only validation sentences joined with '\\n\\n', tokenized once "
                     "(GPTQ get_ptb)", _joined("\n\n")),
    "ptb_new": _EvalSpec("ptb", "test", "ptb_text_only test sentences joined with ' ', tokenized once "
                         "(GPTQ get_ptb_new)", _joined(" ")),
    "c4": _EvalSpec("c4", "validation", "256 windows of seqlen, random.seed(0): random validation documents "
                    "longer than seqlen, window start randint(0, L - seqlen - 1), concatenated (GPTQ get_c4)",
                    _c4_windows),
    "c4_new": _EvalSpec("c4", "validation", "first 1,100 validation documents joined with ' ', tokenized once, "
                        "cut to 256 * seqlen tokens (GPTQ get_c4_new)", _c4_new, _c4_new_note),
}


# ---------------------------------------------------------------------------------------------
# Samplers and tokenization
# ---------------------------------------------------------------------------------------------

def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` in one tokenizer call, shape ``(N,)`` int64.

    ``verbose=False`` silences the "longer than the specified maximum" warning; nothing is truncated.
    """
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


class _DocTokens:
    """Token ids of each document, tokenized individually (as the reference does) on first use."""

    def __init__(self, tokenizer: Any, docs: Sequence[str], batch: int = 256) -> None:
        self.tokenizer, self.docs, self.batch = tokenizer, docs, batch
        self._ids: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> torch.Tensor:
        """(L_i,) int64 ids of document i."""
        if i not in self._ids:
            self._ids[i] = _encode(self.tokenizer, self.docs[i])
        return self._ids[i]

    def count_longer(self, seqlen: int, need: int) -> int:
        """Documents longer than ``seqlen`` tokens, scanning in order and stopping once ``need`` are found."""
        count = 0
        for start in range(0, len(self.docs), self.batch):
            idx = range(start, min(start + self.batch, len(self.docs)))
            todo = [i for i in idx if i not in self._ids]
            if todo:  # one batched call: same ids per document, much faster than one call each
                batch_ids = self.tokenizer([self.docs[i] for i in todo], verbose=False)["input_ids"]
                for i, ids in zip(todo, batch_ids, strict=True):
                    self._ids[i] = torch.tensor(ids, dtype=torch.long)
            count += sum(int(self._ids[i].numel() > seqlen) for i in idx)
            if count >= need:
                return count
        return count


def _sample_documents(docs: _DocTokens, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """The reference's document sampler -> (n, seqlen). Needs one document longer than seqlen."""
    rng = random.Random(seed)  # the same stream as the reference's random.seed(seed)
    rows = []
    for _ in range(n):
        while True:
            ids = docs[rng.randint(0, len(docs) - 1)]
            if ids.numel() > seqlen:
                break
        i = rng.randint(0, ids.numel() - seqlen - 1)
        rows.append(ids[i:i + seqlen])
    return torch.stack(rows)


def _sample_concat(stream: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """Uniform windows of a ``(N,)`` stream as the reference's wikitext2 sampler draws them -> (n, seqlen)."""
    rng = random.Random(seed)
    starts = [rng.randint(0, stream.numel() - seqlen - 1) for _ in range(n)]
    return torch.stack([stream[s:s + seqlen] for s in starts])


def _random_tokens(tokenizer: Any, nsamples: int, seqlen: int, seed: int,
                   requested: str) -> tuple[torch.Tensor, dict]:
    """Uniformly random ids in [0, len(tokenizer)) -> (nsamples, seqlen); cheap, so never cached."""
    vocab = len(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (nsamples, seqlen), generator=gen, dtype=torch.long)
    prov = {"dataset": "random", "split": None, "source": "random", "vocab_size": vocab,
            "protocol": "uniform ids in [0, vocab_size) from torch.Generator().manual_seed(seed)",
            "sampler": "random", "sampler_requested": requested, "sampler_reason": "dataset=random",
            "seed": seed, "nsamples": nsamples, "seqlen": seqlen, "n_tokens": int(tokens.numel()),
            "tokenizer": _tokenizer_name(tokenizer), "tokenizer_sha256": tokenizer_fingerprint(tokenizer)}
    return tokens, prov


def _tokenizer_name(tokenizer: Any) -> str:
    return f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}"


# ---------------------------------------------------------------------------------------------
# Loading texts (local files or the hub)
# ---------------------------------------------------------------------------------------------

@dataclass
class _Texts:
    """The rows of one split, exactly as the HF loader yields them, and where they came from."""

    corpus: str
    split: str
    texts: Sequence[str]
    source: str  # "local:<path relative to $HARNESS_DATA>" or "hub:<dataset id>[/<config>]"
    digest: dict[str, str]  # {"sha256": file hash} or {"hub_fingerprint": ...}
    note: str | None = None
    data_files: str | None = None

    def provenance(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, **self.digest}
        if self.data_files:
            out["data_files"] = self.data_files
        return out


def _load_texts(corpus: str, split: str, key: str) -> _Texts:
    root = data_root()
    if root is not None:
        return _load_local(root, corpus, split, key)
    return _load_hub(corpus, split, key)


def _load_local(root: Path, corpus: str, split: str, key: str) -> _Texts:
    rel = _LOCAL_FILES.get((corpus, split))
    path = root / rel if rel else None
    if path is None or not path.is_file():
        where = f"{path} is missing" if path else "no local copy is known"
        if corpus == "wikitext2" and split == "train":
            fix = f"use {key}=c4, or unset HARNESS_DATA to read it from the hub"
        else:
            fix = f"add {rel} to {root} (see shared/data/README.md), or unset HARNESS_DATA to read it from the hub"
        raise UserError(key, f"{corpus} {split} split is not in $HARNESS_DATA ({where})", fix)
    raw = path.read_bytes()
    # Line iteration as open(path) does it (universal newlines only), as the HF loading scripts read.
    lines = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")
    if corpus == "wikitext2":
        texts = [line if line.strip() else "" for line in lines]
    elif corpus == "ptb":
        texts = [line.strip() for line in lines]
    else:  # c4 jsonl
        texts = [json.loads(line)["text"] for line in lines if line.strip()]
    return _Texts(corpus, split, texts, f"local:{rel}", {"sha256": hashlib.sha256(raw).hexdigest()},
                  note=_LOCAL_NOTES.get((corpus, split)))


class _Column(Sequence):
    """One column of a ``datasets.Dataset``, read row by row (no full copy of a large shard)."""

    def __init__(self, ds: Any, column: str) -> None:
        self.ds, self.column = ds, column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        return self.ds[i][self.column]

    def __iter__(self) -> Iterator[str]:
        return (self.ds[i][self.column] for i in range(len(self.ds)))


def _load_hub(corpus: str, split: str, key: str) -> _Texts:
    hub = _HUB[corpus]
    what = f"{corpus} {split} split"
    try:
        import datasets
    except ImportError:
        raise UserError(key, f"{what} is not available offline (the datasets package is not installed)",
                        _OFFLINE_FIX) from None
    kwargs: dict[str, Any] = {"split": split}
    if hub.data_files:
        kwargs["data_files"] = {split: hub.data_files[split]}
    try:
        # Offline mode is left to datasets: it still serves splits already in the local HF cache.
        ds = datasets.load_dataset(hub.path, hub.name, **kwargs)
    except Exception as exc:
        if not _is_unreachable(exc):
            raise
        raise UserError(key, f"{what} is not available offline ({_offline_reason(exc)})", _OFFLINE_FIX) from exc
    texts = _Column(ds, hub.column)
    fingerprint = getattr(ds, "_fingerprint", None)
    if not fingerprint:
        h = hashlib.sha256()
        for t in texts:
            h.update(t.encode("utf-8") + b"\0")
        fingerprint = h.hexdigest()
    source = f"hub:{hub.path}" + (f"/{hub.name}" if hub.name else "")
    return _Texts(corpus, split, texts, source, {"hub_fingerprint": str(fingerprint)},
                  data_files=kwargs.get("data_files", {}).get(split))


_NETWORK_MODULES = {"httpx", "httpcore", "requests", "urllib3", "aiohttp", "huggingface_hub", "fsspec"}


def _is_unreachable(exc: BaseException) -> bool:
    """Whether a load failure means "cannot get the data" (no network, offline mode, not cached)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (OSError, ConnectionError, TimeoutError)):
            return True
        if any(c.__module__.split(".")[0] in _NETWORK_MODULES for c in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
    return False


def _offline_reason(exc: BaseException) -> str:
    flags = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
             if os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}]
    if flags:
        return f"{' and '.join(flags)} set and it is not in the Hugging Face cache"
    detail = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"the hub cannot be reached: {type(exc).__name__}" + (f": {detail}" if detail else "")


# ---------------------------------------------------------------------------------------------
# Cache: cache_dir/tokens/<stem>.pt (the tensor) + <stem>.json (key, shape, provenance)
# ---------------------------------------------------------------------------------------------

def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def _cache_paths(cache_dir: Path, stem: str) -> tuple[Path, Path]:
    folder = Path(cache_dir) / "tokens"
    return folder / f"{stem}.pt", folder / f"{stem}.json"


def _cache_load(cache_dir: Path | None, stem: str, cache_key: str) -> tuple[torch.Tensor, dict] | None:
    """The cached (tokens, provenance), or None when absent, stale or unreadable (then it is rebuilt)."""
    if cache_dir is None:
        return None
    pt, meta_path = _cache_paths(cache_dir, stem)
    if not (pt.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tokens = torch.load(pt, map_location="cpu", weights_only=True)
        ok = (meta["cache_key"] == cache_key and isinstance(tokens, torch.Tensor)
              and tokens.dtype == torch.long and list(tokens.shape) == meta["shape"])
        return (tokens, meta["provenance"]) if ok else None
    except Exception:  # any corrupt or foreign file is a miss: the caller rebuilds and overwrites it
        return None


def _cache_store(cache_dir: Path | None, stem: str, cache_key: str, tokens: torch.Tensor, prov: dict) -> None:
    """Write tensor then metadata, each atomically (temp file + os.replace); the json lands last."""
    if cache_dir is None:
        return
    pt, meta_path = _cache_paths(cache_dir, stem)
    meta = {"cache_key": cache_key, "shape": list(tokens.shape), "provenance": prov}
    try:
        _atomic_write(pt, lambda f: torch.save(tokens.clone(), f))  # clone: never save a larger storage
        _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode("utf-8")))
    except OSError as exc:
        raise UserError("cache_dir", f"cannot write the token cache in {pt.parent}: {exc.strerror or exc}",
                        "point cache_dir (or $HARNESS_CACHE) at a writable folder") from exc


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------

def _subkey(key: str, field: str) -> str:
    """``calib.dataset`` -> ``calib.<field>``: the sibling config key for a related error."""
    return f"{key.rsplit('.', 1)[0]}.{field}" if "." in key else field


def _check_choice(value: str, valid: Sequence[str], key: str, what: str) -> None:
    if value in valid:
        return
    close = difflib.get_close_matches(str(value), list(valid), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(key, f"unknown {what} {value!r}", f"{hint}valid: {', '.join(valid)}")


def _check_positive(value: int, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(key, f"must be a positive integer, got {value!r}", "use e.g. 2048 for seqlen, 128 for nsamples")
