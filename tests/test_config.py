"""Config loading: the shipped configs, bases, overrides and validation errors."""

import pathlib

import pytest
import yaml

from attamba_jax.config import (
    Config,
    ConfigError,
    dump_config,
    load_config,
    load_saved_config,
    parse_overrides,
    read_config_file,
)

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
# A file in a folder named base/ is a base that other configs build on, not a run of its own:
# configs/paper/*.yaml lists the paper's runs and nothing else.
BASES = sorted(p for p in CONFIGS.rglob("*.yaml") if "base" in p.relative_to(CONFIGS).parts[:-1])
RUNNABLE = sorted(p for p in CONFIGS.rglob("*.yaml") if p not in BASES)
PAPER = [
    "attamba_k4_w8",
    "attamba_k8_w8",
    "attamba_k16_w16",
    "attamba_k4_w32",
    "transformer_isoparam",
    "transformer_isokv4",
    "transformer_isokv8",
    "transformer_isokv16",
    "transformer_isoflop104",
]


def _named_bases(path: pathlib.Path) -> list[pathlib.Path]:
    names = yaml.safe_load(path.read_text()).get("base", [])
    return [(path.parent / name).resolve() for name in ([names] if isinstance(names, str) else names)]


@pytest.mark.parametrize("path", RUNNABLE, ids=[str(p.relative_to(CONFIGS)) for p in RUNNABLE])
def test_every_shipped_config_loads(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # dumping and reloading gives the same config, from the dump alone: it is flat
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert "base" not in yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert load_config(tmp_path / "c.yaml") == load_saved_config(tmp_path / "c.yaml") == cfg


def test_every_shipped_base_is_a_base_of_a_shipped_config():
    named = {base for path in BASES + RUNNABLE for base in _named_bases(path)}
    assert BASES and set(BASES) <= named, "a base nothing builds on"
    assert named <= set(BASES), "a shipped config builds on a file outside a base/ folder"


@pytest.mark.parametrize("path", BASES + RUNNABLE, ids=[str(p.relative_to(CONFIGS)) for p in BASES + RUNNABLE])
def test_no_shipped_config_repeats_what_its_bases_set(path, tmp_path):
    # A line that sets what the bases already set says nothing, and hides which lines matter.
    own = yaml.safe_load(path.read_text())
    bases = _named_bases(path)
    if not bases:
        return
    only_bases = tmp_path / "only_bases.yaml"
    only_bases.write_text(yaml.safe_dump({"base": [str(b) for b in bases]}))
    inherited = read_config_file(only_bases)
    redundant = []
    for name, value in own.items():
        if isinstance(value, dict):
            redundant += [f"{name}.{key}" for key, v in value.items() if inherited.get(name, {}).get(key, ...) == v]
        elif name != "base" and inherited.get(name, ...) == value:
            redundant.append(name)
    assert not redundant, f"{path.relative_to(CONFIGS)} sets what its bases set: {redundant}"


def test_paper_configs_exist():
    # exactly the paper's runs: a loop over configs/paper/*.yaml trains those nine, not their recipe
    names = {p.stem for p in (CONFIGS / "paper").glob("*.yaml")}
    assert names == set(PAPER)


# The recipe of every paper config (configs/paper/base/recipe.yaml), as loaded before it moved there.
PAPER_RECIPE = {
    "data": {
        "train": ("stdlib",),
        "eval": (),
        "heldout_fraction": 0.02,
        "tokenizer": "byte",
        "seq_len": 1024,
        "document_masking": True,
        "document_align": None,
        "batch_size": 16,
        "prefetch": 8,
        "threads": 4,
    },
    "optim": {
        "lr": 0.003,
        "beta1": 0.9,
        "beta2": 0.95,
        "eps": 1e-08,
        "weight_decay": 0.033,
        "warmup_steps": 5000,
        "min_lr_ratio": 1e-06,
        "grad_clip": 1.0,
        "grad_accum": 1,
    },
    "train": {
        "steps": 60000,
        "log_every": 50,
        "eval_every": 1000,
        "eval_batches": 20,
        "checkpoint_every": 1000,
        "keep_last": 3,
        "keep_every": 10000,
        "peak_tflops": None,
        "remat": "none",
        "loss_slice": None,
    },
    "mesh": {"data": -1, "fsdp": 1, "context": 1, "tensor": 1},
    "seed": 777,
}
ATTAMBA_K8_W8_MODEL = {
    "arch": "attamba",
    "vocab_size": 32000,
    "dim": 512,
    "n_layers": 8,
    "n_heads": 8,
    "n_kv_heads": None,
    "head_dim": None,
    "multiple_of": 256,
    "norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "dtype": "bfloat16",
    "token_chunk": 8,
    "window": 8,
    "pseudo_chunk": False,
    "ssm_state_dim": 32,
    "ssm_hidden_dim": 32,
    "ssm_heads": 8,
    "ssm_groups": 1,
    "ssm_conv_width": 4,
    "ssm_dt_bias": False,
    "ssm_a_init_min": 1.0,
    "ssm_a_init_max": 16.0,
    "sliding_window": None,
    "ssm_implementation": "auto",
    "attention_implementation": "auto",
}
# What each paper config sets in its model (the rest is ATTAMBA_K8_W8_MODEL, the defaults in bf16).
PAPER_MODELS = {
    "attamba_k4_w8": {"arch": "attamba", "token_chunk": 4, "window": 8},
    "attamba_k8_w8": {"arch": "attamba", "token_chunk": 8, "window": 8},
    "attamba_k16_w16": {"arch": "attamba", "token_chunk": 16, "window": 16},
    "attamba_k4_w32": {"arch": "attamba", "token_chunk": 4, "window": 32},
    "transformer_isoparam": {"arch": "transformer", "n_heads": 8, "head_dim": 64},
    "transformer_isokv4": {"arch": "transformer", "n_heads": 8, "head_dim": 16},
    "transformer_isokv8": {"arch": "transformer", "n_heads": 4, "head_dim": 16},
    "transformer_isokv16": {"arch": "transformer", "n_heads": 2, "head_dim": 16},
    "transformer_isoflop104": {"arch": "transformer", "n_heads": 4, "head_dim": 26},
}


def test_paper_configs_are_pinned():
    # Every value of all nine, so that a change to the recipe, a model file or a default shows here.
    paper = lambda name: load_config(CONFIGS / "paper" / f"{name}.yaml").to_dict()
    assert paper("attamba_k8_w8") == {"model": ATTAMBA_K8_W8_MODEL, **PAPER_RECIPE}
    isokv8 = {**ATTAMBA_K8_W8_MODEL, "arch": "transformer", "n_heads": 4, "head_dim": 16}
    assert paper("transformer_isokv8") == {"model": isokv8, **PAPER_RECIPE}
    assert set(PAPER_MODELS) == set(PAPER)
    for name, model in PAPER_MODELS.items():
        assert paper(name) == {"model": {**ATTAMBA_K8_W8_MODEL, **model}, **PAPER_RECIPE}, name


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
        ("data.document_align=0", "data.document_align must be null or >= 1"),
        ("data.document_align=6", "data.document_align \\(6\\) must be a multiple of model.token_chunk \\(4\\)"),
        ("data.document_align=512", "data.seq_len \\(256\\) must be a multiple of data.document_align \\(512\\)"),
        ("data.document_masking=3", "data.document_masking must be true or false"),
        ("train.remat=all", "train.remat must be one of"),
        ("train.loss_slice=0", "train.loss_slice must be null or >= 1"),
    ],
)
def test_bad_values_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_the_dense_attention_is_refused_under_context_parallelism():
    with pytest.raises(ConfigError, match="attention_implementation=dense needs whole rows; with mesh.context > 1"):
        load_config(CONFIGS / "tiny.yaml", ["mesh.context=2", "model.attention_implementation=dense"])


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


def test_document_align_resolves_by_model_and_masking():
    tiny = load_config(CONFIGS / "tiny.yaml")
    assert tiny.document_align == tiny.model.token_chunk == 4
    assert load_config(CONFIGS / "tiny.yaml", ["data.document_masking=false"]).document_align == 1
    assert load_config(CONFIGS / "tiny.yaml", ["data.document_align=8"]).document_align == 8
    assert load_config(CONFIGS / "paper" / "transformer_isoparam.yaml").document_align == 1
    # Unmasked, any alignment (e.g. a transformer fed the same padded data as an Attamba run)
    assert (
        load_config(CONFIGS / "tiny.yaml", ["data.document_masking=false", "data.document_align=2"]).document_align == 2
    )


def test_a_saved_config_from_before_document_masking_keeps_what_it_did(tmp_path):
    # Given a workdir config written before data.document_masking existed
    saved = tmp_path / "config.yaml"
    text = dump_config(load_config(CONFIGS / "tiny.yaml"))
    saved.write_text("\n".join(line for line in text.splitlines() if "document_" not in line) + "\n")
    # Then it loads as the unmasked, unaligned run it was
    cfg = load_saved_config(saved)
    assert cfg.data.document_masking is False and cfg.document_align == 1


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
        "optim": {"lr": 1e-3},
        "seed": 7,
        "data": {"seq_len": 2048},
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
    message = r"both.yaml: model.dim is set by two of its bases, \S*wide.yaml and \S*narrow.yaml"
    with pytest.raises(ConfigError, match=message):
        load_config(both)
    # Setting it in the file itself settles it: neither base's value is used.
    settled = _write(tmp_path, "settled.yaml", "base: [wide.yaml, narrow.yaml]\nmodel:\n  dim: 512\n")
    assert (load_config(settled).model.dim, load_config(settled).model.n_layers) == (512, 2)


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


@pytest.mark.parametrize("value", ["inf", ".inf", "-inf", "nan", ".nan", "1e999"])
def test_number_keys_refuse_inf_and_nan(value):
    with pytest.raises(ConfigError, match=r"optim.lr must be a finite number, got "):
        load_config(CONFIGS / "tiny.yaml", [f"optim.lr={value}"])
