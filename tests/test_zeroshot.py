"""Zero-shot evaluation through lm-eval: the local tasks, exact accuracies on a model whose answer is
certain, name checks with suggestions, the run record, and an offline CLI run that writes nothing
outside its directories and opens no network connection."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import torch

from harness import zeroshot
from harness.errors import UserError
from tests.conftest import compose, requires_data, tiny_model

pytestmark = requires_data

SIX = ["piqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag", "lambada_standard"]
YES, NO = "yes", "no"  # one GPT-2 token each after a space (" yes" = 3763, " no" = 645)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("tiny-llama")


@pytest.fixture(scope="module")
def yes_model():
    """A tiny LLaMA whose next-token logits are 10 for " yes" and 0 for every other token, whatever the
    input: its choice is certain, and log p(" yes") = 10 - log(e^10 + V - 1) exactly."""
    loaded = tiny_model("tiny-llama")
    model, tok = loaded.model, loaded.tokenizer
    (yes_id,) = tok.encode(" " + YES)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[yes_id] = 10.0
    model.lm_head = head
    return model, tok


def _write_piqa(root: Path, labels: list[int]) -> None:
    """A PIQA folder whose items all offer sol1 = "yes", sol2 = "no": the yes-model is right where the label is 0."""
    (root / "piqa").mkdir(parents=True, exist_ok=True)
    rows = [{"goal": f"Is item {i} true?", "sol1": YES, "sol2": NO} for i in range(len(labels))]
    (root / "piqa" / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{y}\n" for y in labels))


def _raw_yaml(path: Path) -> dict:
    """A task YAML with its `include`s merged (local keys win) and `!function` tags as plain strings
    relative to the file that holds them, as lm-eval reads it."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: str(path.parent / loader.construct_scalar(node)))
    cfg = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 — SafeLoader plus one tag
    merged: dict = {}
    if "include" in cfg:
        merged.update(_raw_yaml(path.parent / cfg.pop("include")))  # an absolute path stays absolute
    merged.update(cfg)
    return merged


def test_every_local_task_runs_a_few_items(tiny, tmp_path, data_dir):
    metrics, prov = zeroshot.evaluate(tiny.model, tiny.tokenizer, SIX, limit=4, batch_size=8,
                                      work_dir=tmp_path / "run", bootstrap_iters=100)
    for t in ("piqa_local", "arc_easy_local", "arc_challenge_local", "hellaswag_local"):
        for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            assert 0 <= metrics[f"{t}/{m}"] <= 1, (t, m)
    assert {"winogrande_local/acc", "winogrande_local/acc_stderr", "lambada_standard_local/acc",
            "lambada_standard_local/perplexity"} <= set(metrics)
    assert all(metrics[f"{t}_local/samples"] == 4 for t in SIX)
    assert not any(k.startswith(tuple(f"{t}/" for t in SIX)) for k in metrics)  # never under lm-eval's names
    assert prov["mode"] == "local" and prov["lm_eval"] == metadata.version("lm_eval") and prov["limit"] == 4
    sums = {path.removeprefix("./"): digest for digest, path in
            (line.split() for line in (data_dir / "SHA256SUMS").read_text().splitlines() if line.strip())}
    for t in SIX:
        entry = prov["tasks"][f"{t}_local"]
        assert entry["requested_as"] == [t] and entry["version"] is not None and entry["n_shot"] == 0
        assert len(entry["hash"]) == 64 and entry["samples"]["effective"] == 4
        assert entry["local"]["builtin"] == t
        assert entry["local"]["files"] == {rel: sums[rel] for rel in zeroshot.LOCAL_TASKS[f"{t}_local"].files}
    assert Path(prov["task_dir"]).parent == (tmp_path / "run").resolve()


def test_local_tasks_keep_lm_evals_prompts_and_metrics(tmp_path, data_dir):
    """Each local YAML changes where the documents come from, nothing else; and the documents render
    as lm-eval's tasks render them."""
    import lm_eval.tasks

    builtin_dir = Path(lm_eval.tasks.__file__).parent
    zeroshot.write_task_yamls(data_dir, tmp_path, list(zeroshot.LOCAL_TASKS), builtin_dir)
    source_keys = {"task", "tag", "custom_dataset", "dataset_path", "dataset_name", "dataset_kwargs", "process_docs",
                   "training_split", "validation_split", "test_split", "fewshot_split"}
    for name, t in zeroshot.LOCAL_TASKS.items():
        ours, theirs = _raw_yaml(tmp_path / f"{name}.yaml"), _raw_yaml(builtin_dir / t.builtin_yaml)
        changed = {k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
        assert changed <= source_keys, (name, changed - source_keys)
        assert ours["metric_list"] == theirs["metric_list"] and ours["output_type"] == theirs["output_type"]

    manager = lm_eval.tasks.TaskManager(include_path=str(tmp_path), include_defaults=False)
    tasks = lm_eval.tasks.get_task_dict(list(zeroshot.LOCAL_TASKS), manager)
    first = {name: task.eval_docs[0] for name, task in tasks.items()}
    assert {n: len(t.eval_docs) for n, t in tasks.items()} == {
        "piqa_local": 1838, "arc_easy_local": 2376, "arc_challenge_local": 1172, "winogrande_local": 1267,
        "hellaswag_local": 10042, "lambada_standard_local": 5153}
    arc = tasks["arc_easy_local"]
    assert arc.doc_to_text(first["arc_easy_local"]) == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:")
    assert arc.doc_to_target(first["arc_easy_local"]) == 0 and len(arc.doc_to_choice(first["arc_easy_local"])) == 4
    piqa = tasks["piqa_local"]
    assert piqa.doc_to_text(first["piqa_local"]).startswith("Question: How do I ready a guinea pig cage")
    assert piqa.doc_to_target(first["piqa_local"]) == 0
    wino = tasks["winogrande_local"]  # lm-eval's partial scoring: choices are the sentence up to the blank
    assert wino.doc_to_choice(first["winogrande_local"]) == [
        "Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"]
    assert wino.doc_to_target(first["winogrande_local"]) == "always got the easier cases."
    hella = tasks["hellaswag_local"]
    assert hella.doc_to_text(first["hellaswag_local"]) == "Roof shingle removal: A man is sitting on a roof. he"
    assert hella.doc_to_target(first["hellaswag_local"]) == 3
    lam = tasks["lambada_standard_local"]
    assert lam.doc_to_target(first["lambada_standard_local"]) == " signs"
    assert lam.doc_to_text(first["lambada_standard_local"]).endswith("i do n't care about")


@pytest.mark.parametrize("labels,acc", [([0, 0, 0, 0], 1.0), ([1, 1, 1, 1], 0.0), ([0, 1, 0, 0], 0.75)])
def test_known_answer_gives_exact_accuracy(yes_model, tmp_path, monkeypatch, labels, acc):
    _write_piqa(tmp_path / "data", labels)
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path / "data"))
    model, tok = yes_model
    metrics, prov = zeroshot.evaluate(model, tok, ["piqa"], batch_size=4, work_dir=tmp_path / "run")
    assert metrics["piqa_local/acc"] == acc and metrics["piqa_local/acc_norm"] == acc
    assert metrics["piqa_local/samples"] == len(labels)
    assert prov["tasks"]["piqa_local"]["samples"] == {"original": 4, "effective": 4}


def test_known_answer_lambada_accuracy_and_perplexity(yes_model, tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "lambada").mkdir(parents=True)
    lines = [f"passage number {i} ends with {YES}" for i in range(3)] + ["this one ends with no"]
    (root / "lambada" / "lambada_test_plain_text.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("HARNESS_DATA", str(root))
    model, tok = yes_model
    metrics, _ = zeroshot.evaluate(model, tok, ["lambada_standard"], batch_size=4, work_dir=tmp_path / "run",
                                   bootstrap_iters=0)
    assert metrics["lambada_standard_local/acc"] == 0.75  # greedy continuation is " yes" every time
    vocab = model.config.vocab_size
    ll_yes = 10 - math.log(math.exp(10) + vocab - 1)
    ll_no = -math.log(math.exp(10) + vocab - 1)
    expected = math.exp(-(3 * ll_yes + ll_no) / 4)  # lm-eval's perplexity: exp(-mean loglikelihood)
    # float32 log-softmax over 50257 logits: torch's CPU kernel is off by 2.8e-5 on an AVX2 machine (its
    # logsumexp is not); a wrong aggregation (a sum, base 2, per token) would be off by far more
    assert metrics["lambada_standard_local/perplexity"] == pytest.approx(expected, rel=1e-4)


def test_unknown_task_names_get_suggestions_offline():
    with pytest.raises(UserError) as e:
        zeroshot.validate(["piqq"], None, None)
    assert e.value.key == "eval.tasks" and "unknown task 'piqq'" in e.value.message
    assert "did you mean 'piqa'" in e.value.fix
    with pytest.raises(UserError, match="did you mean 'hellaswag'"):
        zeroshot.validate(["piqa", "hellaswg"], None, None)
    with pytest.raises(UserError, match=r"eval\.datasets=\[wikitext2\]"):
        zeroshot.validate(["wikitext"], None, None)
    with pytest.raises(UserError, match="lambada_standard"):
        zeroshot.validate(["lambada"], None, None)
    with pytest.raises(UserError, match="eval.num_fewshot"):
        zeroshot.validate(["piqa"], -1, None)
    with pytest.raises(UserError, match="eval.limit"):
        zeroshot.validate(["piqa"], None, 0)
    assert zeroshot.resolve(["piqa", "piqa_local", "arc_easy"]) == {"piqa_local": ["piqa", "piqa_local"],
                                                                    "arc_easy_local": ["arc_easy"]}


def test_missing_local_file_is_a_user_error(tmp_path, monkeypatch):
    _write_piqa(tmp_path, [0])
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path))
    zeroshot.validate(["piqa"], None, None)
    with pytest.raises(UserError, match="ARC-Easy-Test.jsonl, which is missing"):
        zeroshot.validate(["piqa", "arc_easy"], None, None)


def test_hub_names_are_checked_against_lm_evals_registry(monkeypatch):
    monkeypatch.delenv("HARNESS_DATA")
    monkeypatch.setattr(zeroshot, "builtin_task_names", lambda: frozenset({"piqa", "hellaswag", "wikitext", "mmlu"}))
    assert zeroshot.resolve(["piqa", "wikitext", "mmlu"]) == {"piqa": ["piqa"], "wikitext": ["wikitext"],
                                                              "mmlu": ["mmlu"]}
    with pytest.raises(UserError, match="did you mean 'piqa'"):
        zeroshot.validate(["piqq"], None, None)
    with pytest.raises(UserError, match="HARNESS_DATA, which is not set"):
        zeroshot.validate(["piqa_local"], None, None)
    assert zeroshot.reported_names(["piqa", "hellaswag"]) == ["piqa", "hellaswag"]


def test_hub_mode_hands_task_names_to_lm_eval(yes_model, tmp_path, monkeypatch):
    """Without HARNESS_DATA a name goes to lm-eval's own registry unchanged; here the registry holds
    a stand-in 'piqa' over local files, so no hub is needed."""
    import lm_eval.tasks

    _write_piqa(tmp_path / "data", [0, 0, 1])
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "piqa.yaml").write_text(textwrap.dedent(f"""\
        include: {Path(lm_eval.tasks.__file__).parent / "piqa" / "piqa.yaml"}
        task: piqa
        dataset_kwargs: {{"files": ["{tmp_path}/data/piqa/valid.jsonl", "{tmp_path}/data/piqa/valid-labels.lst"],
                         "split": "validation"}}
        training_split: null
        custom_dataset: !function utils.load_piqa
        """))
    (tmp_path / "reg" / "utils.py").write_text("from harness.zeroshot import load_piqa  # noqa: F401\n")
    manager = lm_eval.tasks.TaskManager(include_path=str(tmp_path / "reg"), include_defaults=False)
    monkeypatch.delenv("HARNESS_DATA")
    monkeypatch.setattr(zeroshot, "_builtin_manager", lambda: manager)
    model, tok = yes_model
    metrics, prov = zeroshot.evaluate(model, tok, ["piqa"], batch_size=4)
    assert metrics["piqa/acc"] == pytest.approx(2 / 3) and metrics["piqa/samples"] == 3
    assert prov["mode"] == "hub" and "local" not in prov["tasks"]["piqa"]


def test_flatten_metrics_keeps_numbers_only():
    out = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact_match,strict": 1}},
           "groups": {"g": {"acc,none": 0.25, "sample_len": 9}},
           "n-samples": {"t": {"original": 10, "effective": 2}}}
    assert zeroshot.flatten_metrics(out) == {"t/acc": 0.5, "t/exact_match,strict": 1.0, "g/acc": 0.25,
                                            "t/samples": 2.0}


def test_record_identity_names_the_tasks_that_run(monkeypatch):
    from harness.record import config_hash, relevant_config

    plain = relevant_config(compose("model=tiny-llama"), "float32")
    assert "tasks" not in plain["eval"]  # runs without tasks keep their hash
    offline = relevant_config(compose("model=tiny-llama", "eval=lm_eval"), "float32")
    assert offline["eval"]["tasks"] == [f"{t}_local" for t in SIX]
    assert offline["eval"]["num_fewshot"] is None and offline["eval"]["limit"] is None
    monkeypatch.delenv("HARNESS_DATA")
    online = relevant_config(compose("model=tiny-llama", "eval=lm_eval"), "float32")
    assert online["eval"]["tasks"] == SIX and config_hash(online) != config_hash(offline)


def test_paper_full_is_paper_perplexity_plus_the_six_tasks():
    cfg, paper = compose("eval=paper_full"), compose("eval=paper")
    assert list(cfg.eval.datasets) == list(paper.eval.datasets) == ["wikitext2", "ptb", "c4"]
    assert list(cfg.eval.tasks) == SIX and cfg.eval.batch_size == paper.eval.batch_size
    cfg = compose("eval=lm_eval")
    assert list(cfg.eval.datasets) == [] and list(cfg.eval.tasks) == SIX


_GUARD = """\
import os, socket
_log = os.environ["NET_GUARD_LOG"]
def _deny(*args, **kwargs):
    with open(_log, "a") as f:
        f.write(repr(args[:2]) + "\\n")
    raise OSError("network disabled by the test")
_connect = socket.socket.connect
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _deny(address)
    return _connect(self, address)
socket.socket.connect = connect
socket.getaddrinfo = _deny
"""


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_offline_cli_run_stays_in_its_directories_and_off_the_network(tmp_path):
    """eval=lm_eval with wikitext2 perplexity through the real CLI, with the hub switches NOT set by
    the caller, HOME pointed at an empty folder and every internet connection refused and logged."""
    (tmp_path / "guard").mkdir()
    (tmp_path / "guard" / "sitecustomize.py").write_text(_GUARD)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "XDG_CACHE_HOME",
                        "HF_DATASETS_CACHE"}}
    env.update(HOME=str(home), HARNESS_CACHE=str(tmp_path / "cache"), NET_GUARD_LOG=str(tmp_path / "net.log"),
               PYTHONPATH=os.pathsep.join([str(tmp_path / "guard"), *filter(None, [env.get("PYTHONPATH")])]))
    before = _files(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "harness", f"results_dir={tmp_path / 'results'}", "model=tiny-llama",
                           "eval=lm_eval", "eval.datasets=[wikitext2]", "eval.seqlen=128", "eval.max_windows=2",
                           "eval.limit=3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "net.log").exists(), (tmp_path / "net.log").read_text()
    assert not any(home.rglob("*")), sorted(home.rglob("*"))
    new = _files(tmp_path) - before
    assert all(p.is_relative_to(tmp_path / "results") or p.is_relative_to(tmp_path / "cache") for p in new), new
    rec = json.loads((tmp_path / "results" / "runs.jsonl").read_text().splitlines()[-1])
    run_dir = Path(rec["run_dir"])
    assert all(p.is_relative_to(run_dir) for p in new if p.is_relative_to(tmp_path / "results")
               and p.name != "runs.jsonl")
    m = rec["metrics"]
    assert m["wikitext2/windows"] == 2 and m["wikitext2/ppl"] > 1
    assert all(f"{t}_local/acc" in m and m[f"{t}_local/samples"] == 3 for t in SIX)
    assert not any(k.startswith("wikitext2/") and not k.endswith(("ppl", "nll", "windows", "tokens")) for k in m)
    assert rec["relevant"]["eval"]["tasks"] == [f"{t}_local" for t in SIX]
    zs = rec["data"]["zeroshot"]
    assert zs["mode"] == "local" and zs["lm_eval"] == rec["env"]["versions"]["lm_eval"]
    assert Path(zs["task_dir"]).is_relative_to(run_dir) and "zeroshot_s" in rec["timings"]


def test_cli_unknown_task_is_one_line_before_any_model_loads(tmp_path):
    env = dict(os.environ, HARNESS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "harness", f"results_dir={tmp_path / 'results'}", "model=tiny-llama",
                           "eval.tasks=[piqq]"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: eval.tasks: unknown task 'piqq' — did you mean 'piqa'?")
    probe = ("import sys; from harness import zeroshot\n"
             "try:\n    zeroshot.validate(['piqq'], None, None)\nexcept Exception:\n    pass\n"
             "print('lm_eval' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr  # offline checks never import lm-eval (seconds)


def test_local_few_shot_examples_never_include_the_scored_item(tmp_path):
    """Local tasks have no train split: shots come from the evaluation split, minus the item itself."""
    import lm_eval.tasks

    _write_piqa(tmp_path / "data", [0, 1, 0, 1])
    zeroshot.write_task_yamls(tmp_path / "data", tmp_path / "tasks", ["piqa_local"],
                              Path(lm_eval.tasks.__file__).parent)
    manager = lm_eval.tasks.TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    task = lm_eval.tasks.get_task_dict(["piqa_local"], manager)["piqa_local"]
    task.set_fewshot_seed(seed=1234)
    for doc in task.eval_docs:
        context = task.fewshot_context(doc=doc, num_fewshot=3)
        assert context.count(doc["goal"]) == 1 and context.endswith(f"Question: {doc['goal']}\nAnswer:")
        assert all(f"item {i} " in context for i in range(4))  # the three others are the shots
