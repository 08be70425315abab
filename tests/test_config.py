"""Config loading, overrides and validation errors."""

import pathlib

import pytest
import yaml

from attamba_jax.config import (
    ConfigError, Config, dump_config, load_config, load_saved_config, parse_overrides, read_config_file,
)

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


# --- bases ----------------------------------------------------------------------------------


def _write(folder: pathlib.Path, name: str, text: str) -> pathlib.Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_file_builds_on_its_bases_and_overrides_them(tmp_path):
    # Given a recipe, a model file on it in another folder, and a file on that one and a second base,
    _write(tmp_path, "shared/recipe.yaml", "model:\n  dtype: bfloat16\n  dim: 256\noptim:\n  lr: 1.0e-3\nseed: 7\n")
    _write(tmp_path, "runs/small.yaml", "base: ../shared/recipe.yaml\nmodel:\n  n_layers: 2\n  dim: 128\n")
    _write(tmp_path, "runs/long.yaml", "data:\n  seq_len: 2048\n")
    top = _write(tmp_path, "runs/top.yaml", "base: [small.yaml, long.yaml]\nmodel:\n  n_heads: 4\n")
    # when the top file is loaded with an override,
    cfg = load_config(top, ["optim.lr=2e-3"])
    # then every layer is there, each over the one before: defaults, bases (recursively), the file, the overrides.
    assert (cfg.model.dtype, cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads) == ("bfloat16", 128, 2, 4)
    assert (cfg.data.seq_len, cfg.optim.lr, cfg.seed, cfg.data.batch_size) == (2048, 2e-3, 7, 16)
    assert read_config_file(top) == {
        "model": {"dtype": "bfloat16", "dim": 128, "n_layers": 2, "n_heads": 4},
        "optim": {"lr": 1e-3}, "seed": 7, "data": {"seq_len": 2048},
    }


def test_an_empty_section_does_not_clear_the_bases(tmp_path):
    _write(tmp_path, "recipe.yaml", "model:\n  dim: 256\n")
    child = _write(tmp_path, "child.yaml", "base: recipe.yaml\nmodel:\n  # dim: 128\n")
    assert load_config(child).model.dim == 256


def test_the_merged_config_is_validated_as_one(tmp_path):
    # An Attamba key inherited by a file that switches to the transformer is named.
    _write(tmp_path, "attamba.yaml", "model:\n  arch: attamba\n  token_chunk: 4\n")
    switched = _write(tmp_path, "switched.yaml", "base: attamba.yaml\nmodel:\n  arch: transformer\n")
    with pytest.raises(ConfigError, match="model.token_chunk does not apply to arch=transformer"):
        load_config(switched)
    # A misspelled key in a base is named as in any file.
    _write(tmp_path, "typo.yaml", "model:\n  dimm: 3\n")
    with pytest.raises(ConfigError, match="unknown config key model.dimm"):
        load_config(_write(tmp_path, "on_typo.yaml", "base: typo.yaml\n"))
    # ``base`` is a key of files, not of sections.
    with pytest.raises(ConfigError, match="unknown config key model.base"):
        load_config(_write(tmp_path, "nested.yaml", "model:\n  base: attamba.yaml\n"))


def test_two_bases_of_one_list_may_not_set_one_key(tmp_path):
    _write(tmp_path, "wide.yaml", "model:\n  dim: 1024\n")
    _write(tmp_path, "narrow.yaml", "model:\n  dim: 256\n  n_layers: 2\n")
    both = _write(tmp_path, "both.yaml", "base: [wide.yaml, narrow.yaml]\n")
    with pytest.raises(ConfigError, match=r"both.yaml: model.dim is set by two of its bases, .*wide.yaml and .*narrow.yaml"):
        load_config(both)
    # Setting it in the file itself settles it.
    assert load_config(_write(tmp_path, "settled.yaml", "base: [wide.yaml, narrow.yaml]\nmodel:\n  dim: 512\n")).model.dim == 512


def test_two_bases_may_share_a_base(tmp_path):
    # Given two siblings of one recipe, neither changing what the recipe sets,
    _write(tmp_path, "recipe.yaml", "model:\n  dtype: bfloat16\nseed: 777\n")
    _write(tmp_path, "deep.yaml", "base: recipe.yaml\nmodel:\n  n_layers: 16\n")
    _write(tmp_path, "long.yaml", "base: recipe.yaml\ndata:\n  seq_len: 4096\n")
    # then a file on both has the recipe's keys once, from the recipe, and no conflict.
    cfg = load_config(_write(tmp_path, "deep_long.yaml", "base: [deep.yaml, long.yaml]\n"))
    assert (cfg.model.dtype, cfg.model.n_layers, cfg.data.seq_len, cfg.seed) == ("bfloat16", 16, 4096, 777)
    # But a sibling that changes a recipe key makes the order matter: an error.
    _write(tmp_path, "reseeded.yaml", "base: recipe.yaml\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"seed is set by two of its bases, .*recipe.yaml and .*reseeded.yaml"):
        load_config(_write(tmp_path, "ambiguous.yaml", "base: [deep.yaml, reseeded.yaml]\n"))


def test_a_cycle_of_bases_names_the_files(tmp_path):
    _write(tmp_path, "a.yaml", "base: b.yaml\n")
    _write(tmp_path, "b.yaml", "base: [c.yaml, a.yaml]\n")
    _write(tmp_path, "c.yaml", "seed: 1\n")
    with pytest.raises(ConfigError, match=r"config bases form a cycle: \S*a.yaml -> \S*b.yaml -> \S*a.yaml$"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match=r"cycle: \S*self.yaml -> \S*self.yaml$"):
        load_config(_write(tmp_path, "self.yaml", "base: ./self.yaml\n"))


def test_a_missing_or_malformed_base_names_the_file_that_names_it(tmp_path):
    asker = _write(tmp_path, "asker.yaml", "base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"base file not found: \S*gone.yaml \(named by \S*asker.yaml\)"):
        load_config(asker)
    for value, message in [
        ("3", "base must be a file name or a list of file names"),
        ("[]", "base must be a file name or a list of file names"),
        ("", "base must be a file name or a list of file names"),
        ("[c.yaml, ./c.yaml]", r"base names \S*c.yaml twice"),
    ]:
        _write(tmp_path, "c.yaml", "seed: 1\n")
        with pytest.raises(ConfigError, match=message):
            load_config(_write(tmp_path, "malformed.yaml", f"base: {value}\n"))


def test_a_dump_is_flat_and_a_saved_config_names_no_base(tmp_path):
    _write(tmp_path, "recipe.yaml", "model:\n  dtype: bfloat16\nseed: 777\n")
    cfg = load_config(_write(tmp_path, "run.yaml", "base: recipe.yaml\nmodel:\n  dim: 256\n"))
    dumped = _write(tmp_path, "workdir/config.yaml", dump_config(cfg))
    assert "base" not in yaml.safe_load(dumped.read_text())
    (tmp_path / "recipe.yaml").write_text("seed: 1\n")  # a shipped file changing later changes no workdir
    assert load_saved_config(dumped) == load_config(dumped) == cfg
    dumped.write_text("base: ../recipe.yaml\n" + dumped.read_text())
    with pytest.raises(ConfigError, match="a saved config is complete in itself; base: has no place in it"):
        load_saved_config(dumped)
