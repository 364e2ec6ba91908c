"""The package imports and exposes its public API with none of the optional extras installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import trl_lifealign

# Extras a user may not have: importing the core must not need any of them.
OPTIONAL_MODULES = ["deepspeed", "bitsandbytes", "axolotl", "sacrebleu", "rouge_score", "matplotlib"]


def test_import_and_public_api_without_extras():
    script = textwrap.dedent(
        f"""
        import sys
        blocked = {OPTIONAL_MODULES!r}

        # Wrap every meta-path finder so the extras look uninstalled (find_spec -> None), as on a bare install.
        class HideExtras:
            def __init__(self, inner):
                self.inner = inner

            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in blocked or not hasattr(self.inner, "find_spec"):
                    return None
                return self.inner.find_spec(name, path, target)

            def __getattr__(self, attribute):
                return getattr(self.inner, attribute)

        sys.meta_path[:] = [HideExtras(finder) for finder in sys.meta_path]
        import trl_lifealign
        for name in trl_lifealign.__all__:
            getattr(trl_lifealign, name)
        import trl_lifealign.cli
        trl_lifealign.cli.build_parser()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in blocked)
        assert not loaded, loaded
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_cli_help_lists_commands():
    result = subprocess.run(
        [sys.executable, "-m", "trl_lifealign", "--help"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for command in ("train", "report", "demo", "fpo", "fetch-model", "axolotl-chain"):
        assert command in result.stdout


def test_version_string():
    assert isinstance(trl_lifealign.__version__, str) and trl_lifealign.__version__


def test_fpo_command_shows_the_dpo_script_options():
    result = subprocess.run([sys.executable, "-m", "trl_lifealign", "fpo", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for option in ("--focal_gamma", "--model_name_or_path", "--dataset_name", "--use_peft"):
        assert option in result.stdout
