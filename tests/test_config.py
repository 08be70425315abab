"""Config loading, overrides and validation errors."""

import pathlib

import pytest

from attamba_jax.config import ConfigError, Config, dump_config, load_config, load_saved_config, parse_overrides

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_every_shipped_config_loads(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # dumping and reloading gives the same config
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


def test_paper_configs_exist():
    names = {p.stem for p in (CONFIGS / "paper").glob("*.yaml")}
    assert {
        "attamba_k4_w8", "attamba_k8_w8", "attamba_k16_w16", "attamba_k4_w32", "transformer_isoparam",
        "transformer_isokv4", "transformer_isokv8", "transformer_isokv16", "transformer_isoflop104",
    } <= names


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["model.dim=64", "model.pseudo_chunk=true", "model.head_dim=null"]) == {
        "model": {"dim": 64, "pseudo_chunk": True, "head_dim": None}
    }
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.token_chunk=8", "model.window=4"])
    assert cfg.model.token_chunk == 8 and cfg.model.window == 4



def test_a_key_set_twice_in_one_yaml_mapping_is_an_error(tmp_path):
    # Given a file in which a pasted line repeats a key of its section (PyYAML alone keeps the last),
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dim: 256\n  n_layers: 2\n  dim: 512\nseed: 1\n")
    # when it is loaded, then the error names the file, the line and the key.
    with pytest.raises(ConfigError, match=r"c.yaml, line 4: key 'dim' is set twice in one mapping \(first on line 2\)"):
        load_config(path)
    path.write_text("model:\n  dim: 256\nseed: 1\nmodel:\n  n_layers: 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml, line 4: key 'model' is set twice"):
        load_config(path)


def test_an_override_given_twice_is_an_error():
    with pytest.raises(ConfigError, match="override model.dim is given twice: 'model.dim=64' and 'model.dim=128'"):
        parse_overrides(["model.dim=64", "seed=1", "model.dim=128"])
    with pytest.raises(ConfigError, match="overrides 'model={dim: 64}' and 'model.dim=128' both set model.dim"):
        parse_overrides(["model={dim: 64}", "model.dim=128"])
    with pytest.raises(ConfigError, match="key 'dim' is set twice"):
        parse_overrides(["model={dim: 64, dim: 128}"])
    with pytest.raises(ConfigError, match="override 'model.dim=\\[1,': the value is not valid YAML"):
        parse_overrides(["model.dim=[1,"])

@pytest.mark.parametrize(
    "override, message",
    [
        ("model.token_chunk=0", "token_chunk must be >= 1"),
        ("model.n_kv_heads=2", "n_kv_heads\\*head_dim must equal dim: Attamba's K/V are the d-wide SSM outputs"),
        ("model.dimm=3", "unknown config key model.dimm"),
        ("model.dim=abc", "model.dim must be an integer"),
        ("model.arch=rnn", "model.arch must be one of"),
        ("model.ssm_implementation=magic", "model.ssm_implementation must be one of"),
        ("model.ssm_heads=3", "ssm_heads \\(3\\) must divide the SSM inner width"),
        ("model.head_dim=7", "head_dim must be even"),
        ("model.ssm_a_init_min=20", "ssm_a_init_min/max must satisfy"),
        ("model", "must look like section.key=value"),
    ],
)
def test_bad_values_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_arch_specific_keys_are_rejected_for_the_other_arch():
    with pytest.raises(ConfigError, match="model.token_chunk does not apply to arch=transformer"):
        load_config(CONFIGS / "paper" / "transformer_isoparam.yaml", ["model.token_chunk=4"])
    with pytest.raises(ConfigError, match="model.sliding_window does not apply to arch=attamba"):
        load_config(CONFIGS / "tiny.yaml", ["model.sliding_window=4"])
    with pytest.raises(ConfigError, match="attention_implementation for arch=transformer"):
        load_config(CONFIGS / "paper" / "transformer_isoparam.yaml", ["model.attention_implementation=compressed"])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_a_saved_config_with_a_renamed_key_still_loads(tmp_path):
    # Given a workdir config written before model.leading_tokens became model.window
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(load_config(CONFIGS / "tiny.yaml")).replace("  window: 8", "  leading_tokens: 8"))
    # When it is read as a saved config, then it is the same config under the new name
    assert load_saved_config(saved) == load_config(CONFIGS / "tiny.yaml")


def test_a_hand_written_config_with_a_renamed_key_names_the_new_one():
    with pytest.raises(ConfigError, match="model.leading_tokens is now called model.window"):
        load_config(CONFIGS / "tiny.yaml", ["model.leading_tokens=4"])
