"""The public API: every name of the previous release's `rlprefix.__all__` stays importable from `rlprefix` (renamed
ones through a deprecated alias that says what to use instead), and the package metadata says what it supports."""
import tomllib
import warnings
from pathlib import Path

import pytest

import rlprefix

ROOT = Path(__file__).resolve().parents[1]
# rlprefix.__all__ of the release before the package redesign
PREVIOUS_ALL = ["__version__", "DEFAULT_MODEL", "KVSpec", "kv_spec", "load_model", "DistributedConfig", "Prefix",
                "DynamicPrefix", "ArtifactError", "ModelMismatchError", "load_prefix", "save_prefix", "generate",
                "PrefixBank", "sample", "encode_prompts", "WarmStartConfig", "WarmStartResult", "warm_start",
                "PPOConfig", "PPOResult", "ppo", "CompressedPrefix", "compress", "compress_to_budget",
                "fidelity_report", "export_peft", "evaluate_reward"]


@pytest.mark.parametrize("name", PREVIOUS_ALL)
def test_previous_names_stay_importable(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert getattr(rlprefix, name) is not None


def test_current_names_import_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in rlprefix.__all__:
            getattr(rlprefix, name)


def test_sample_is_a_deprecated_alias_of_the_reference_loop():
    with pytest.warns(DeprecationWarning, match=r"rlprefix.sample is deprecated; use rlprefix.reference_sample"):
        old = rlprefix.sample
    assert old is rlprefix.reference_sample
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rlprefix.nope  # noqa: B018


def test_description_names_both_model_families():
    description = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["description"]
    assert "encoder-decoder" in description and "decoder-only" in description
