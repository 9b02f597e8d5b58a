"""Loading causal LMs: hub ids, local directories, GGUF files (converted once and cached),
files shipped in packages (``pkg://``), and tiny random models built from a config."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.data import file_sha256
from harness.errors import UserError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class LoadedModel:
    model: nn.Module  # on the CPU, eval mode
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)  # provenance for the record


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError("model.dtype", f"unknown dtype {name!r}", f"use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_path(path: str) -> str:
    """Expand ``pkg://package/file`` to the file inside the installed package (without importing it)."""
    if not path.startswith("pkg://"):
        return path
    package, _, rel = path[len("pkg://"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model.path", f"package {package!r} is not installed",
                        f"pip install --no-deps {package.replace('_', '-')} (see README)")
    file = Path(list(spec.submodule_search_locations)[0]) / rel
    if not file.exists():
        raise UserError("model.path", f"{file} is missing from package {package!r}", "reinstall the package")
    return str(file)


def load_model(mcfg: Any, cache_dir: str | Path | None) -> LoadedModel:
    """Load the model of a ``model`` config node on the CPU in ``model.dtype``."""
    dtype = resolve_dtype(mcfg.dtype)
    if mcfg.path == "tiny":
        return _tiny(mcfg, dtype)
    path = resolve_path(mcfg.path)
    if path.endswith(".gguf"):
        return _gguf(mcfg, Path(path), dtype, cache_dir)
    from harness.export import is_gptq_checkpoint

    if is_gptq_checkpoint(path):
        return _gptq(mcfg, path, dtype)
    return _pretrained(mcfg, path, dtype)


def _gptq(mcfg: Any, path: str, dtype: torch.dtype) -> LoadedModel:
    """A checkpoint in the GPTQ layout (as ``export=gptq`` writes): packed linears, run as QuantLinear."""
    from harness.export import load_gptq_checkpoint, read_quantization_config

    try:
        model, tok = load_gptq_checkpoint(path, dtype)
    except ValueError as exc:
        raise UserError("model.path", f"cannot load GPTQ checkpoint {path}: {exc}",
                        "re-export it with export=gptq") from None
    if mcfg.tokenizer or tok is None:
        tok = load_tokenizer(mcfg.tokenizer or "data:tokenizers/gpt2")
    return LoadedModel(model.eval(), tok, {"source": path, "checkpoint_format": "gptq",
                                           "quantization_config": read_quantization_config(path)})


def load_tokenizer(spec: str, key: str = "model.tokenizer") -> Any:
    """A tokenizer from a hub id, a directory, or ``data:<dir>`` under ``$HARNESS_DATA``."""
    from transformers import AutoTokenizer

    if spec.startswith("data:"):
        root = os.environ.get("HARNESS_DATA")
        if not root:
            # without local data the same tokenizer comes from the hub (GPT-2's is the only one shipped)
            spec = {"tokenizers/gpt2": "openai-community/gpt2"}.get(spec[5:], spec[5:])
        else:
            spec = str(Path(root) / spec[5:])
            if not Path(spec).is_dir():
                raise UserError(key, f"{spec} does not exist", "check HARNESS_DATA (it should hold tokenizers/gpt2)")
    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise UserError(key, f"cannot load tokenizer {spec!r}: {_first_line(exc)}",
                        "give a local directory or a hub id reachable from here") from None


def _pretrained(mcfg: Any, path: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    local = Path(path).expanduser()
    if path.startswith((".", "/", "~")) or local.exists():
        if not local.exists():
            raise UserError("model.path", f"{path} does not exist", "give an existing directory or a hub id")
        path = str(local)
    kwargs = dict(dtype=dtype, revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        msg = _first_line(exc)
        if "does not recognize this architecture" in str(exc) or "Unrecognized configuration" in str(exc):
            raise UserError("model.path", f"no causal-LM class can handle {path}: {msg}",
                            "use a Hugging Face causal LM, or set model.trust_remote_code=true") from None
        raise UserError("model.path", f"cannot load {path!r}: {msg}",
                        "check the hub id or directory (offline: HF_HUB_OFFLINE=1 needs a cached copy)") from None
    tokenizer = load_tokenizer(mcfg.tokenizer or path)
    return LoadedModel(model.eval(), tokenizer, {"source": path, "revision": mcfg.revision})


def _gguf(mcfg: Any, file: Path, dtype: torch.dtype, cache_dir: str | Path | None) -> LoadedModel:
    """Convert a GGUF file once to a safetensors directory in the cache, then load that."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_sha256(file)
    info = {"source": str(file), "gguf_sha256": digest}
    target = Path(cache_dir or tempfile.gettempdir()) / "models" / f"{file.stem}-{digest[:12]}"
    if not (target / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        # The GGUF weights are dequantized to float now; drop the loader's marker so it saves as plain.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None))
        target.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "harness_source.json").write_text(json.dumps(info))
        try:
            os.replace(tmp, target)  # atomic: concurrent jobs either see all of it or none
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another job won the race
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
    tokenizer = load_tokenizer(mcfg.tokenizer or str(target))
    info["converted"] = str(target)
    return LoadedModel(model.eval(), tokenizer, info)


def _tiny(mcfg: Any, dtype: torch.dtype) -> LoadedModel:
    """A randomly initialised model from ``model.arch`` (seeded), for tests and smoke runs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(mcfg.arch)
    model_type = arch.pop("model_type", None)
    if not model_type:
        raise UserError("model.arch.model_type", "a tiny model needs arch.model_type", "e.g. model=tiny-llama")
    try:
        config = AutoConfig.for_model(model_type, **arch)
    except ValueError as exc:
        raise UserError("model.arch.model_type", _first_line(exc), "use a transformers model_type") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mcfg.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(dtype).eval()
    tokenizer = load_tokenizer(mcfg.tokenizer or "data:tokenizers/gpt2")
    return LoadedModel(model, tokenizer, {"source": f"tiny random {model_type}", "seed": mcfg.seed})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
