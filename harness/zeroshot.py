"""Zero-shot (and few-shot) multiple-choice evaluation through lm-evaluation-harness.

The quantized model is handed to lm-eval as ``HFLM(pretrained=model, tokenizer=tokenizer)``: no save
and reload. Two modes, chosen by ``$HARNESS_DATA`` (as for perplexity, :func:`harness.data.data_root`):

* **hub** (``HARNESS_DATA`` unset): task names are lm-eval's built-in ones (``piqa``, ``hellaswag``,
  ``wikitext``, groups such as ``mmlu``…), read from the Hugging Face hub by lm-eval itself.
* **local** (``HARNESS_DATA`` set, offline): the harness writes its own task YAMLs for the local files
  (:data:`LOCAL_TASKS`) into ``<work_dir>/tasks`` with absolute paths, registers them through
  ``TaskManager(include_path=..., include_defaults=False)``, switches the hub off and sends every
  cache to ``<work_dir>`` so nothing is written elsewhere.

Each local task YAML ``include``\\ s lm-eval's own YAML for the same task (prompt, choices, target,
metrics, version) and only replaces where the documents come from: ``custom_dataset`` points at a
loader of this module that builds the split in memory (no ``datasets`` cache is written). Every local
task is named ``<lm-eval name>_local``: lm-eval reads hub conversions of these datasets that were not
compared byte for byte with the local copies, and two of them are known to differ (hellaswag's text is
preprocessed differently; lambada is the tokenized, lower-cased cimec set = ``lambada_standard``).
Offline, an lm-eval name with a local copy (``piqa``) runs its local task (``piqa_local``); the metric
keys carry the task that ran, so numbers from the two sources never share a column.

Metrics come back flat as ``<task>/<metric>`` (``piqa_local/acc``, ``piqa_local/acc_stderr``,
``piqa_local/acc_norm``…, ``<task>/samples``), with a provenance dict: the lm-eval version, each
task's version, shots, sample counts, lm-eval's per-task sample hash, and for local tasks the files
and their sha256.
"""
from __future__ import annotations

import bz2
import contextlib
import difflib
import functools
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.data import file_sha256
from harness.errors import UserError

KEY = "eval.tasks"
LOCAL_SUFFIX = "_local"
LOCAL_FORMAT = 1  # bump when a local loader or the generated YAML changes what is evaluated
LM_EVAL_PIN = "lm-eval>=0.4.10,<0.5"
_LOADERS = "harness_loaders"  # the module written beside the task YAMLs


@dataclass(frozen=True)
class LocalTask:
    """A task over files in ``$HARNESS_DATA`` that reuses lm-eval's YAML for ``builtin``."""

    name: str
    builtin: str  # lm-eval's task whose prompt, choices, target and metrics are used
    builtin_yaml: str  # that task's YAML, relative to lm_eval/tasks/
    files: tuple[str, ...]  # relative to $HARNESS_DATA
    loader: str  # function of this module: (files, split) -> DatasetDict
    split: str  # the split lm-eval evaluates, as the local data holds it
    differs: str  # how the local data relates to what lm-eval's task reads


LOCAL_TASKS: dict[str, LocalTask] = {t.name: t for t in (
    LocalTask("piqa_local", "piqa", "piqa/piqa.yaml", ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
              "load_piqa", "validation",
              "the authors' validation files (1,838 items); lm-eval reads the hub conversion baber/piqa, "
              "same split, not compared byte for byte"),
    LocalTask("arc_easy_local", "arc_easy", "arc/arc_easy.yaml", ("arc/ARC-Easy-Test.jsonl",), "load_arc", "test",
              "AI2's ARC-Easy test file (2,376 items); lm-eval reads the hub conversion allenai/ai2_arc, "
              "same split, not compared byte for byte"),
    LocalTask("arc_challenge_local", "arc_challenge", "arc/arc_challenge.yaml", ("arc/ARC-Challenge-Test.jsonl",),
              "load_arc", "test",
              "AI2's ARC-Challenge test file (1,172 items); lm-eval reads the hub conversion allenai/ai2_arc, "
              "same split, not compared byte for byte"),
    LocalTask("winogrande_local", "winogrande", "winogrande/default.yaml", ("winogrande/dev.jsonl",),
              "load_winogrande", "validation",
              "WinoGrande 1.1 dev (winogrande_xl validation, 1,267 items); lm-eval reads the hub conversion "
              "allenai/winogrande, same split, not compared byte for byte"),
    LocalTask("hellaswag_local", "hellaswag", "hellaswag/hellaswag.yaml", ("hellaswag/hellaswag_val_full.txt.bz2",),
              "load_hellaswag", "validation",
              "DIFFERS: a preprocessed text form of the validation set (10,042 items) whose ctx_b is not "
              "capitalised; close to lm-eval's hellaswag, not equal"),
    LocalTask("lambada_standard_local", "lambada_standard", "lambada/lambada_standard.yaml",
              ("lambada/lambada_test_plain_text.txt",), "load_lambada", "test",
              "the original cimec test set (5,153 passages, lower-cased and tokenized): lm-eval's "
              "lambada_standard, NOT lambada_openai; not compared byte for byte with the hub's cimec/lambada"),
)}
# Offline, these lm-eval names run their local task.
LOCAL_ALIASES: dict[str, str] = {t.builtin: t.name for t in LOCAL_TASKS.values()}

# Why an lm-eval name has no local counterpart, for the offline error.
_NO_LOCAL = {
    "wikitext": "lm-eval's wikitext (word perplexity of whole documents) reads EleutherAI/wikitext_document_level "
                "from the hub; the paper-protocol perplexity is eval.datasets=[wikitext2]",
    "lambada": "the lm-eval tag 'lambada' is lambada_openai + lambada_standard, and only the cimec set "
               "(lambada_standard) has a local copy",
    "lambada_openai": "OpenAI's detokenized LAMBADA has no local copy; the local cimec set is lambada_standard",
}


# ---------------------------------------------------------------------------------------------
# Names and validation (no lm-eval import in local mode: it takes seconds)
# ---------------------------------------------------------------------------------------------

def local_mode() -> bool:
    """Whether tasks come from ``$HARNESS_DATA`` (set and non-empty) rather than the hub."""
    return bool(os.environ.get("HARNESS_DATA", ""))


def reported_names(names: Sequence[str]) -> list[str]:
    """The task names a run will report, in order, without duplicates: offline, an lm-eval name with a
    local copy becomes its local task. Never raises (used for the run's identity); see :func:`resolve`."""
    out: list[str] = []
    for n in names:
        name = LOCAL_ALIASES.get(n, n) if local_mode() else n
        if name not in out:
            out.append(name)
    return out


def validate(tasks: Sequence[str], num_fewshot: int | None, limit: float | None) -> None:
    """Check ``eval.tasks`` / ``eval.num_fewshot`` / ``eval.limit`` before a model loads."""
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError("eval.num_fewshot", f"{num_fewshot} is negative", "use null (each task's default) or >= 0")
    if limit is not None and limit <= 0:
        raise UserError("eval.limit", f"{limit} is not positive",
                        "use null (every item), a fraction below 1, or a count of items per task")
    if tasks:
        plan = resolve(tasks)
        if local_mode():
            root = _data_root()
            for name in plan:
                _local_files(root, LOCAL_TASKS[name])


def resolve(tasks: Sequence[str]) -> dict[str, list[str]]:
    """Map each task that will run to the names that asked for it; raise :class:`UserError` on a name
    that does not exist (with suggestions), or that exists only on the other side (hub/local)."""
    if isinstance(tasks, str) or not all(isinstance(t, str) and t for t in tasks):
        raise UserError(KEY, f"expected a list of task names, got {tasks!r}", "e.g. eval.tasks=[piqa,arc_easy]")
    out: dict[str, list[str]] = {}
    if local_mode():
        for name in tasks:
            task = LOCAL_ALIASES.get(name, name)
            if task not in LOCAL_TASKS:
                raise _unknown_offline(name)
            out.setdefault(task, []).append(name)
        return out
    registry = builtin_task_names()
    for name in tasks:
        if name in LOCAL_TASKS:
            raise UserError(KEY, f"task {name!r} reads $HARNESS_DATA, which is not set",
                            f"set HARNESS_DATA to the data folder, or use lm-eval's {LOCAL_TASKS[name].builtin!r}")
        if name not in registry:
            close = difflib.get_close_matches(name, sorted(registry), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
            raise UserError(KEY, f"unknown task {name!r}", f"{hint}`lm-eval ls tasks` lists lm-eval's tasks")
        out.setdefault(name, []).append(name)
    return out


def _unknown_offline(name: str) -> UserError:
    valid = [*LOCAL_ALIASES, *LOCAL_TASKS]
    close = difflib.get_close_matches(name, valid, n=2, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    listing = f"offline (HARNESS_DATA set) the tasks are {', '.join(LOCAL_ALIASES)} (run as <name>_local)"
    if name in _NO_LOCAL:
        return UserError(KEY, f"task {name!r} has no local copy: {_NO_LOCAL[name]}", f"{hint}{listing}")
    return UserError(KEY, f"unknown task {name!r}",
                     f"{hint}{listing}; lm-eval's other tasks read the hub: unset HARNESS_DATA for those")


def _data_root() -> Path:
    """``$HARNESS_DATA`` as a folder (a UserError when it is not one); callers checked local_mode()."""
    from harness.data import data_root

    root = data_root()
    if root is None:
        raise RuntimeError("HARNESS_DATA is not set")
    return root


def builtin_task_names() -> frozenset[str]:
    """Every name lm-eval knows (tasks, groups, tags); builds lm-eval's index once per process."""
    return frozenset(_builtin_manager().all_tasks)


@functools.cache
def _builtin_manager() -> Any:
    """lm-eval's TaskManager over its built-in tasks (walking them takes seconds, so it is kept)."""
    return _lm_eval().TaskManager()


def _lm_eval() -> Any:
    """``lm_eval.tasks`` imported on first use, or a user error naming the install."""
    try:
        import lm_eval.tasks
    except ImportError as exc:
        raise UserError(KEY, f"lm-eval is not installed ({exc})", f"pip install '{LM_EVAL_PIN}'") from None
    return lm_eval.tasks


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def evaluate(model: Any, tokenizer: Any, tasks: Sequence[str], *, num_fewshot: int | None = None,
             limit: float | None = None, batch_size: int = 8, work_dir: Path | None = None,
             bootstrap_iters: int = 100_000) -> tuple[dict[str, float], dict[str, Any]]:
    """Run lm-eval ``tasks`` on the loaded (possibly quantized) ``model`` and return
    ``(metrics, provenance)``.

    ``model`` is a ``transformers`` causal LM already on its device; ``tokenizer`` its tokenizer (lm-eval
    may give it a pad token). ``limit``: items per task (< 1: a fraction), for tests and smoke runs.
    ``work_dir``: where the local task YAMLs and any cache go (the run's directory); a temporary folder
    when None. ``bootstrap_iters``: lm-eval's, for the stderr of non-mean metrics (lambada perplexity).
    """
    plan = resolve(tasks)
    local = local_mode()
    keep = work_dir is not None
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="harness-lm-eval-")))
        work_dir = Path(work_dir).resolve()
        if local:
            stack.enter_context(_offline_env(work_dir / "hf_home"))
        lm_tasks = _lm_eval()
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        sources: dict[str, dict[str, Any]] = {}
        if local:
            task_dir = work_dir / "tasks"
            sources = write_task_yamls(_data_root(), task_dir, list(plan), Path(lm_tasks.__file__).parent)
            manager = lm_tasks.TaskManager(include_path=str(task_dir), include_defaults=False)
        else:
            manager = _builtin_manager()
        # lm-eval warns about every pre-loaded model (only its errors are let through) and prints the
        # bootstrap's progress on stdout, which is sent to stderr: stdout is the harness's table.
        stack.enter_context(_quiet_lm_eval())
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=list(plan), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, bootstrap_iters=bootstrap_iters, log_samples=True)
    if out is None:  # only non-zero ranks get None; this is a single process
        raise RuntimeError("lm-eval returned no results")
    metrics = flatten_metrics(out)
    prov = {
        "lm_eval": metadata.version("lm_eval"),
        "mode": "local" if local else "hub",
        "num_fewshot": num_fewshot,
        "limit": limit,
        "batch_size": batch_size,
        "max_length": getattr(lm, "max_length", None),
        "bootstrap_iters": bootstrap_iters,
        "tasks": _task_provenance(out, plan, sources),
    }
    if local:
        prov.update(local_format=LOCAL_FORMAT, task_dir=str(work_dir / "tasks") if keep else None)
    return metrics, prov


def flatten_metrics(out: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``results``/``groups`` (``{"acc,none": x, "acc_stderr,none": s}`` per task) as flat
    ``<task>/<metric>`` floats; a filter other than ``none`` stays in the name (``<task>/<metric>,<filter>``).
    Non-numeric values ("N/A" stderr) are left out. ``<task>/samples`` is the number of items scored."""
    metrics: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, values in (out.get(section) or {}).items():
            for key, value in values.items():
                if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue  # alias, name, sample_len, "N/A"
                metric, filt = key.split(",", 1)
                metrics[f"{task}/{metric if filt == 'none' else key}"] = float(value)
    for task, counts in (out.get("n-samples") or {}).items():
        if isinstance(counts, dict) and "effective" in counts:
            metrics[f"{task}/samples"] = float(counts["effective"])
    return metrics


def _task_provenance(out: dict[str, Any], plan: dict[str, list[str]],
                     sources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from lm_eval.utils import hash_string

    prov: dict[str, Any] = {}
    samples = out.get("samples") or {}
    for task in sorted(set(out.get("versions") or {}) | set(plan)):
        entry: dict[str, Any] = {
            "requested_as": plan.get(task),
            "version": (out.get("versions") or {}).get(task),
            "n_shot": (out.get("n-shot") or {}).get(task),
            "samples": (out.get("n-samples") or {}).get(task),
        }
        cfg = (out.get("configs") or {}).get(task)
        if cfg is not None:
            blob = json.dumps(cfg, sort_keys=True, default=str).encode("utf-8")
            entry["config_sha256"] = hashlib.sha256(blob).hexdigest()
        if task in samples:  # lm-eval's own task hash (EvaluationTracker): docs, prompts and targets
            entry["hash"] = hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"]
                                                for s in samples[task]))
        if task in sources:
            entry["local"] = sources[task]
        prov[task] = entry
    return prov


@contextlib.contextmanager
def _offline_env(hf_home: Path) -> Iterator[None]:
    """Hub switches off and every Hugging Face cache under ``hf_home`` for the duration, then the
    previous values back. Libraries read some of these at import, so this runs before lm-eval (and
    ``datasets``) are imported in a fresh process."""
    values = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "HF_HOME": str(hf_home), "HF_DATASETS_CACHE": str(hf_home / "datasets"),
              "HF_EVALUATE_OFFLINE": "1"}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Local task YAMLs
# ---------------------------------------------------------------------------------------------

def write_task_yamls(root: Path, task_dir: Path, names: Sequence[str], lm_eval_tasks: Path) -> dict[str, Any]:
    """Write one YAML per local task in ``names`` into ``task_dir`` (absolute paths throughout) and
    return, per task, what it reads: ``{"builtin", "yaml", "files": {relpath: sha256}, "differs"}``."""
    task_dir.mkdir(parents=True, exist_ok=True)
    # `!function name.fn` resolves against a file beside the YAML in every lm-eval 0.4.x (0.4.13 also
    # imports installed modules), so the loaders are re-exported from one there.
    loaders = sorted({LOCAL_TASKS[n].loader for n in names})
    (task_dir / f"{_LOADERS}.py").write_text(
        f"# Generated by harness.zeroshot: the local tasks' loaders.\nfrom harness.zeroshot import {', '.join(loaders)}"
        f"  # noqa: F401\n", encoding="utf-8")
    sources: dict[str, Any] = {}
    for name in names:
        t = LOCAL_TASKS[name]
        files = _local_files(root, t)
        path = task_dir / f"{name}.yaml"
        path.write_text(_task_yaml(t, root, files, lm_eval_tasks / t.builtin_yaml), encoding="utf-8")
        sources[name] = {"builtin": t.builtin, "yaml": str(path), "differs": t.differs,
                         "files": {rel: file_sha256(f) for rel, f in zip(t.files, files, strict=True)}}
    return sources


def _local_files(root: Path, t: LocalTask) -> list[Path]:
    """Absolute paths of ``t``'s files, or a user error naming the first missing one."""
    files = [root / f for f in t.files]
    for f in files:
        if not f.is_file():
            raise UserError(KEY, f"task {t.name!r} needs {f}, which is missing",
                            "add it to $HARNESS_DATA (see shared/data/README.md), or drop the task")
    return files


def _task_yaml(t: LocalTask, root: Path, files: list[Path], builtin_yaml: Path) -> str:
    """lm-eval's YAML for ``t.builtin`` (prompt, choices, target, metrics, version) with the documents
    from local files. The eval split is named ``test_split`` because lm-eval only keeps an item out of
    its own few-shot examples when the few-shot split is the test split; there is no train split locally."""
    fields: dict[str, Any] = {
        "include": str(builtin_yaml),
        "task": t.name,
        "tag": [],  # not part of lm-eval's groups (ai2_arc, lambada, ...)
        "dataset_path": str(root / Path(t.files[0]).parent),
        "dataset_name": None,
        "dataset_kwargs": {"files": [str(f) for f in files], "split": t.split},
        "process_docs": None,  # the loader yields lm-eval's document fields directly
        "training_split": None,
        "validation_split": None,
        "test_split": t.split,
        "fewshot_split": t.split,
    }
    lines = [f"# Generated by harness.zeroshot (local format {LOCAL_FORMAT}): lm-eval's {t.builtin} over "
             f"$HARNESS_DATA files.", f"# {t.differs}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in fields.items()]  # JSON values are valid YAML
    lines.append(f"custom_dataset: !function {_LOADERS}.{t.loader}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Loaders: lm-eval calls custom_dataset(**metadata, **dataset_kwargs) and wants a DatasetDict whose
# documents have the fields of the hub dataset its YAML was written for. Built in memory: no cache.
# ---------------------------------------------------------------------------------------------

def _dataset(split: str, rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def _jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_piqa(files: Sequence[str], split: str, **_: Any) -> Any:
    """``valid.jsonl`` (goal, sol1, sol2) + ``valid-labels.lst`` (0/1 per line) -> baber/piqa's fields."""
    docs = _jsonl(files[0])
    labels = Path(files[1]).read_text(encoding="utf-8").split()
    if len(labels) != len(docs):
        raise UserError(KEY, f"{files[1]} has {len(labels)} labels for {len(docs)} items in {files[0]}",
                        "restore the files from shared/data (sha256 in SHA256SUMS)")
    return _dataset(split, [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)}
                            for d, y in zip(docs, labels, strict=True)])


def load_arc(files: Sequence[str], split: str, **_: Any) -> Any:
    """AI2's jsonl (question.stem, question.choices[{text,label}]) -> allenai/ai2_arc's fields, as the
    hub's loading script flattened them."""
    rows = []
    for d in _jsonl(files[0]):
        choices = d["question"]["choices"]
        rows.append({"id": d["id"], "question": d["question"]["stem"], "answerKey": d["answerKey"],
                     "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}})
    return _dataset(split, rows)


def load_winogrande(files: Sequence[str], split: str, **_: Any) -> Any:
    """WinoGrande's dev.jsonl already has allenai/winogrande's fields (sentence, option1, option2, answer)."""
    return _dataset(split, [{"sentence": d["sentence"], "option1": d["option1"], "option2": d["option2"],
                             "answer": d["answer"]} for d in _jsonl(files[0])])


def load_hellaswag(files: Sequence[str], split: str, **_: Any) -> Any:
    """The 6-line text form (context, gold index, 4 endings) -> the fields lm-eval's hellaswag
    ``process_docs`` produces (query, choices, label, gold), through lm-eval's own ``preprocess``."""
    from lm_eval.tasks.hellaswag.utils import preprocess  # lm-eval's text clean-up, applied as it does

    with bz2.open(files[0], "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise UserError(KEY, f"{files[0]} has {len(lines)} lines, not 6 per item",
                        "restore the file from shared/data (sha256 in SHA256SUMS)")
    rows = []
    for i in range(0, len(lines), 6):
        ctx, gold, endings = lines[i], lines[i + 1].strip(), lines[i + 2:i + 6]
        rows.append({"query": preprocess(ctx), "choices": [preprocess(e) for e in endings], "label": gold,
                     "gold": int(gold)})
    return _dataset(split, rows)


def load_lambada(files: Sequence[str], split: str, **_: Any) -> Any:
    """One passage per line -> cimec/lambada's ``text`` field (the target is the last word)."""
    text = Path(files[0]).read_text(encoding="utf-8")
    return _dataset(split, [{"text": line} for line in text.splitlines() if line.strip()])
