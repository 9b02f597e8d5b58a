"""End-to-end runs through the real CLI on tiny models, bad input, and the results store."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import results
from tests.conftest import ROOT, requires_data

pytestmark = requires_data
QUICK = ["eval.seqlen=128", "eval.max_windows=3", "calib.nsamples=4", "calib.seqlen=64"]


def harness(tmp_path: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HARNESS_CACHE=str(tmp_path / "cache"))
    args = [sys.executable, "-m", "harness", f"results_dir={tmp_path / 'results'}", *overrides]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_end_to_end_rtn_run_writes_a_complete_record(tmp_path):
    proc = harness(tmp_path, "model=tiny-llama", "quantizer=rtn", "quantizer.bits=3", "quantizer.group_size=32", *QUICK)
    assert "wikitext2 ppl" in proc.stdout and "reduced protocol" in proc.stdout
    recs = list(results.iter_records(tmp_path / "results"))
    assert len(recs) == 1
    rec = recs[0]
    assert rec["status"] == "ok" and rec["schema_version"] == results.SCHEMA_VERSION
    assert rec["config"]["quantizer"]["bits"] == 3 and rec["config"]["quantizer"]["group_size"] == 32
    assert rec["metrics"]["wikitext2/windows"] == 3 and rec["metrics"]["wikitext2/ppl"] > 1
    assert set(rec["timings"]) >= {"load_s", "quantize_s", "evaluate_s", "total_s"}
    assert rec["memory"]["peak_rss_bytes"] > 0
    assert rec["env"]["versions"]["torch"] and "commit" in rec["env"]["git"]
    assert rec["protocol"]["label"] == "reduced"
    assert len(rec["modules"]) == 2 * 7  # 2 layers × q,k,v,o,up,gate,down
    on_disk = json.loads((Path(rec["run_dir"]) / "record.json").read_text())
    assert on_disk["run_id"] == rec["run_id"]


def test_fp16_and_quantized_hashes_differ_and_repeat(tmp_path):
    harness(tmp_path, "model=tiny-gpt2", *QUICK)
    harness(tmp_path, "model=tiny-gpt2", *QUICK)
    harness(tmp_path, "model=tiny-gpt2", "quantizer=rtn", "quantizer.bits=2", *QUICK)
    recs = list(results.iter_records(tmp_path / "results"))
    assert recs[0]["config_hash"] == recs[1]["config_hash"] != recs[2]["config_hash"]
    assert recs[0]["metrics"]["wikitext2/ppl"] == pytest.approx(recs[1]["metrics"]["wikitext2/ppl"], rel=1e-6)
    assert recs[2]["metrics"]["wikitext2/ppl"] != recs[0]["metrics"]["wikitext2/ppl"]


BAD = [
    (["model=hf", "model.path=/no/such/model"], "model.path"),
    (["model=tiny-llama", "model.arch.model_type=notamodel"], "model.arch.model_type"),
    (["model=tiny-llama", "quantizer=rtn", "quantizer.bits=9"], "quantizer.bits"),
    (["model=tiny-llama", "quantizer=rtn", "quantizer.bits=1"], "quantizer.bits"),
    (["model=tiny-llama", "quantizer=rtn", "quantizer.group_size=0"], "quantizer.group_size"),
    (["model=tiny-llama", "quantizer=rtn", "quantizer.bitz=4"], "quantizer.bitz"),
    (["model=tiny-llama", "quantizer.bits=four"], "quantizer.bits"),
    (["model=tiny-llama", "quantizer=rtnn"], "quantizer"),
    (["model=tiny-llama", "eval.datasets=[wikitext3]"], "eval.datasets"),
    (["model=tiny-llama", "quantizer=rtn", "quantizer.true_sequential=false"], "quantizer.true_sequential"),
    (["model=tiny-llama", "device=nope"], "device"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[k for _, k in BAD])
def test_bad_input_is_one_line_exit_2(tmp_path, overrides, key):
    proc = harness(tmp_path, *overrides, *QUICK, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_dataset_without_network_is_a_user_error(tmp_path):
    empty = tmp_path / "empty"
    (empty / "tokenizers").mkdir(parents=True)
    os.symlink(Path(os.environ["HARNESS_DATA"]) / "tokenizers" / "gpt2", empty / "tokenizers" / "gpt2")
    env_data = os.environ["HARNESS_DATA"]
    os.environ["HARNESS_DATA"] = str(empty)
    try:
        proc = harness(tmp_path, "model=tiny-llama", *QUICK, check=False)
    finally:
        os.environ["HARNESS_DATA"] = env_data
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: eval.datasets")


def test_crash_mid_run_keeps_the_store_complete(tmp_path):
    harness(tmp_path, "model=tiny-llama", *QUICK)
    # a torn line, as a writer killed mid-append would leave
    with open(results.store_path(tmp_path / "results"), "a") as f:
        f.write('{"schema_version": 1, "status": "ok", "metr')
    harness(tmp_path, "model=tiny-llama", "quantizer=rtn", *QUICK)
    problems: list[str] = []
    recs = list(results.iter_records(tmp_path / "results", problems))
    assert [r["relevant"]["quantizer"]["method"] for r in recs] == ["fp16", "rtn"]
    assert len(problems) == 1 and ":2:" in problems[0]


def test_killed_run_leaves_earlier_records_intact(tmp_path):
    harness(tmp_path, "model=tiny-llama", *QUICK)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HARNESS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "harness", f"results_dir={tmp_path / 'results'}", "model=tiny-llama",
                             "quantizer=rtn", "eval.seqlen=128"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time

    time.sleep(4)
    proc.kill()
    proc.wait()
    recs = list(results.iter_records(tmp_path / "results"))
    assert len(recs) >= 1 and recs[0]["status"] == "ok"
    for line in results.store_path(tmp_path / "results").read_text().splitlines():
        json.loads(line)  # every line is whole


def test_cfg_job_prints_the_public_keys(tmp_path):
    proc = harness(tmp_path, "--cfg", "job")
    for key in ("path:", "dtype:", "dataset:", "nsamples:", "seqlen:", "seed:", "bits:", "group_size:", "sym:",
                "datasets:", "max_windows:", "results_dir:", "device:"):
        assert key in proc.stdout


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = [b.split("```")[0].strip() for b in readme.split("```bash")[1:3]]
    assert len(blocks) == 2
    test_cmd = blocks[1]
    assert "pytest" in test_cmd and test_cmd in ci


def test_obq_runs_end_to_end_and_refuses_above_its_time_limit(tmp_path):
    proc = harness(tmp_path, "model=tiny-llama", "quantizer=obq", "quantizer.bits=3", *QUICK)
    assert "obq: estimated" in proc.stderr
    rec = list(results.iter_records(tmp_path / "results"))[0]
    assert rec["data"]["estimate"]["flops"] > 0 and all("output_rel_err" in m for m in rec["modules"])
    proc = harness(tmp_path, "model=tiny-llama", "quantizer=obq", "quantizer.max_minutes=1e-9", *QUICK, check=False)
    assert proc.returncode == 2 and "error: quantizer.max_minutes" in proc.stderr and "Traceback" not in proc.stderr


def test_failed_cholesky_raises_damping_with_a_warning_and_records_it(tmp_path):
    """A rank-deficient H (4 random tokens for 64 inputs) with almost no damping: never RTN, never silent."""
    proc = harness(tmp_path, "model=tiny-llama", "quantizer=gptq", "quantizer.damp_percent=1e-10",
                   "calib.dataset=random", "calib.nsamples=1", "calib.seqlen=4", *QUICK[:2])
    assert "warning: Cholesky failed" in proc.stderr
    rec = list(results.iter_records(tmp_path / "results"))[0]
    raised = [m for m in rec["modules"] if m["damp_retries"] > 0]
    assert raised and all(m["damp_percent_used"] > 1e-10 for m in raised)


def test_multirun_flag_sweeps_and_skips_what_is_recorded(tmp_path):
    def sweep() -> subprocess.CompletedProcess:
        env = dict(os.environ, HF_HUB_OFFLINE="1", HARNESS_CACHE=str(tmp_path / "cache"))
        return subprocess.run([sys.executable, "-m", "harness", "-m", f"results_dir={tmp_path / 'results'}",
                               "model=tiny-gpt2", "quantizer=fp16,rtn", "quantizer.bits=4,3", "logger=none", *QUICK],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=True)

    first = sweep()
    assert "[skip] fp16 does not use bits=3" in first.stderr
    recs = list(results.iter_records(tmp_path / "results"))
    assert [(r["relevant"]["quantizer"]["method"], r["relevant"]["quantizer"].get("bits")) for r in recs] == [
        ("fp16", None), ("rtn", 4), ("rtn", 3)]
    second = sweep()  # a rerun completes nothing twice
    assert second.stderr.count("[done]") == 3
    assert second.stdout.count("| tiny-gpt2") == 3  # the study's table still shows the reused runs
    assert len(list(results.iter_records(tmp_path / "results"))) == 3


def test_export_gptq_checkpoint_reloads_with_the_same_perplexity(tmp_path):
    harness(tmp_path, "model=tiny-llama", "quantizer=gptq", "quantizer.group_size=32", "quantizer.desc_act=true",
            "export=gptq", "logger=none", *QUICK)
    made = list(results.iter_records(tmp_path / "results"))[0]
    ckpt = Path(made["run_dir"]) / "checkpoint"
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    proc = harness(tmp_path, "model=hf", f"model.path={ckpt}", "model.tokenizer=data:tokenizers/gpt2",
                   "model.dtype=float32", "logger=none", *QUICK)
    assert "| gptq checkpoint | 4 " in proc.stdout  # labelled by its quantization_config, not as fp16
    loaded = list(results.iter_records(tmp_path / "results"))[1]
    assert loaded["metrics"]["wikitext2/ppl"] == made["metrics"]["wikitext2/ppl"]
    assert loaded["memory"]["bits_per_weight"] == pytest.approx(made["memory"]["bits_per_weight"])
    assert 4 < made["memory"]["bits_per_weight"] < 6  # 4-bit codes + group-32 scales/zeros + g_idx
    proc = harness(tmp_path, "model=hf", f"model.path={ckpt}", "quantizer=rtn", "logger=none", *QUICK, check=False)
    assert proc.returncode == 2 and "error: quantizer.method" in proc.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["fp16", "gptq"])
def test_a_fresh_process_on_an_explicit_gpu_index_runs(tmp_path, method):
    """A sweep's slot pins a job to cuda:N before anything has touched CUDA; the run must still work."""
    harness(tmp_path, "model=tiny-llama", f"quantizer={method}", "device=cuda:0", "logger=none", *QUICK)
    rec = next(iter(results.iter_records(tmp_path / "results")))
    assert rec["status"] == "ok" and rec["memory"]["gpu_max_allocated_bytes"] > 0


def test_a_sweep_reruns_recorded_configs_that_lack_the_asked_latency(tmp_path):
    """eval.latency and kernel are not in the hash; a recorded run without them does not stand in."""
    def sweep(*extra: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, HF_HUB_OFFLINE="1", HARNESS_CACHE=str(tmp_path / "cache"))
        return subprocess.run([sys.executable, "-m", "harness", "-m", f"results_dir={tmp_path / 'results'}",
                               "model=tiny-gpt2", "quantizer=rtn", "quantizer.bits=4", "logger=none", *QUICK, *extra],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=True)

    speed = ["eval.latency=true", "eval.latency_prefill=32", "eval.latency_prompt=8", "eval.latency_decode_tokens=4",
             "eval.latency_batch_sizes=[1]", "eval.latency_repeats=1", "eval.latency_warmup=0"]
    sweep()
    assert sweep(*speed).stderr.count("[done]") == 0  # measured again, now with latency
    assert sweep(*speed).stderr.count("[done]") == 1  # and that one stands in from now on
    assert sweep().stderr.count("[done]") == 1  # a latency record covers a run that does not ask for it
    assert sweep(*speed, "kernel=torch").stderr.count("[done]") == 0  # another kernel choice is measured
    recs = list(results.iter_records(tmp_path / "results"))
    assert len(recs) == 3 and len({r["config_hash"] for r in recs}) == 1
    assert [any(k.startswith("latency/") for k in r["metrics"]) for r in recs] == [False, True, True]
