"""Configuration: frozen dataclasses, YAML files that may build on others, ``section.key=value`` overrides, validation.

A config is layers, each overriding the one before:

1. the dataclass defaults below (every key is documented where it is defined);
2. the files a YAML file names as its bases, ``base: recipe.yaml`` or ``base: [a.yaml, b.yaml]``
   (paths relative to the file), each built the same way first and merged in the order listed;
3. the YAML file's own keys;
4. ``section.key=value`` overrides (from the command line).

The merged dict is validated once, as a whole, before anything runs: an unknown or misspelled key is
an error, never ignored, and so is a key set twice where it is unclear which one was meant: twice in
one YAML mapping, in two bases of one list (unless both have it from one file, as two siblings of one
recipe do, or the file sets it itself), or in two overrides. A file overriding its bases is what
bases are for. A missing base or a cycle of bases is an error naming the files.

``dump_config`` writes a config flat and complete, with no ``base:``: a workdir's ``config.yaml``
does not depend on config files that may change later (``load_saved_config`` reads it).

    cfg = load_config("configs/paper/attamba_k8_w8.yaml", ["model.token_chunk=4"])
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import types
import typing
from typing import Any, Literal

import yaml

from pallas_kernels.boundary_window_attention import AttentionImplementation
from pallas_kernels.causal_attention import CausalImplementation
from pallas_kernels.ssd import SsdImplementation


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the problem."""


def _check(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


def _check_name(what: str, name: str, names):
    """``name`` is "auto" or one of the ``Literal`` ``names``."""
    allowed = ("auto", *typing.get_args(names))
    _check(name in allowed, f"{what} must be one of {allowed}, got {name!r}")


def round_up(x: int, multiple: int) -> int:
    return multiple * math.ceil(x / multiple)


# --- sections -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network. Keys marked (attamba) or (transformer) apply to that ``arch`` only."""

    arch: Literal["attamba", "transformer"] = "attamba"
    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    # Key/value heads (GQA); null = n_heads. (attamba) n_kv_heads*head_dim must equal dim.
    n_kv_heads: int | None = None
    # null = dim // n_heads. The transformer's attention width is n_heads*head_dim
    # (the paper's attn_dim, shrunk for its iso-KV / iso-FLOP baselines).
    head_dim: int | None = None
    # FFN hidden = multiple_of*ceil(floor(8*dim/3)/multiple_of); the SSM inner width
    # uses the same rounding of 2*ssm_hidden_dim/3.
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Compute dtype of matmuls and activations; parameters, norms, softmax, the SSM's
    # exponentials and the loss stay float32.
    dtype: Literal["float32", "bfloat16"] = "float32"

    # (attamba) chunk length K (the paper's P) and local window W: each query sees its last W+1
    # tokens besides the boundaries before them (the paper calls W L; the authors' code, leading_tokens).
    token_chunk: int = 8
    window: int = 8
    # (attamba) ablation: plain causal attention over all keys (no KV saving).
    pseudo_chunk: bool = False
    ssm_state_dim: int = 32
    ssm_hidden_dim: int = 32
    ssm_heads: int = 8
    ssm_groups: int = 1
    ssm_conv_width: int = 4
    ssm_dt_bias: bool = False
    # A = -exp(A_log), A_log = ln U(a_min, a_max); the paper's runs used (1, 16).
    ssm_a_init_min: float = 1.0
    ssm_a_init_max: float = 16.0
    # (transformer) causal sliding window: each query sees its last W+1 tokens; null = full.
    sliding_window: int | None = None

    # Which implementation runs each op: "auto" (the Pallas kernel on a GPU or TPU, XLA on a CPU; under a
    # mesh of several devices the XLA paths) or a name of pallas_kernels.<op>.IMPLEMENTATIONS
    # (*_interpret: the kernel in the Pallas interpreter; a named kernel runs per device under a mesh).
    # (attamba) ssm: auto | chunked | associative | sequential | pallas_gpu | pallas_tpu. It also picks
    # the decode step: auto / pallas_gpu run the fused one-token kernel (pallas_kernels.ssm_step) on a
    # GPU, every other name the XLA step; and the SSMs' conv and gated norm around the SSD
    # (pallas_kernels.ssm_conv, gated_norm): pallas_gpu runs their GPU kernels, every other name
    # (auto too, until they are timed on a GPU) their XLA paths.
    ssm_implementation: Literal["auto", SsdImplementation] = "auto"
    # attamba: auto | compressed | dense | pallas_gpu | pallas_tpu (with mesh.context > 1, a kernel runs on
    # each device's pieces; dense, which needs whole rows, is refused); transformer: auto | xla | cudnn.
    attention_implementation: Literal["auto", AttentionImplementation, CausalImplementation] = "auto"

    # --- derived sizes ---------------------------------------------------------------
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def attn_dim(self) -> int:
        return self.n_heads * self.resolved_head_dim

    @property
    def ffn_hidden_dim(self) -> int:
        return round_up(int(8 * self.dim / 3), self.multiple_of)

    @property
    def ssm_inner_dim(self) -> int:
        return round_up(int(2 * self.ssm_hidden_dim / 3), self.multiple_of)

    def validate(self):
        _check(
            self.arch in ("attamba", "transformer"), f"model.arch must be 'attamba' or 'transformer', got {self.arch!r}"
        )
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "multiple_of"):
            _check(getattr(self, key) >= 1, f"model.{key} must be >= 1, got {getattr(self, key)}")
        _check(self.norm_eps > 0, f"model.norm_eps must be > 0, got {self.norm_eps}")
        _check(self.rope_theta > 0, f"model.rope_theta must be > 0, got {self.rope_theta}")
        _check(self.dtype in ("float32", "bfloat16"), f"model.dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.head_dim is None:
            _check(
                self.dim % self.n_heads == 0,
                f"model.dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) when head_dim is null",
            )
        hd = self.resolved_head_dim
        _check(hd >= 2 and hd % 2 == 0, f"model.head_dim must be even and >= 2 (RoPE rotates pairs), got {hd}")
        kv = self.resolved_kv_heads
        _check(
            kv >= 1 and self.n_heads % kv == 0,
            f"model.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({kv})",
        )
        if self.arch == "attamba":
            _check(
                kv * hd == self.dim,
                f"model.n_kv_heads*head_dim must equal dim: Attamba's K/V are the d-wide SSM outputs "
                f"(got {kv}*{hd}={kv * hd}, dim={self.dim})",
            )
            _check(self.token_chunk >= 1, f"model.token_chunk must be >= 1, got {self.token_chunk}")
            _check(self.window >= 0, f"model.window must be >= 0, got {self.window}")
            for key in ("ssm_state_dim", "ssm_hidden_dim", "ssm_heads", "ssm_groups", "ssm_conv_width"):
                _check(getattr(self, key) >= 1, f"model.{key} must be >= 1, got {getattr(self, key)}")
            inner = self.ssm_inner_dim
            _check(
                inner % self.ssm_heads == 0,
                f"model.ssm_heads ({self.ssm_heads}) must divide the SSM inner width ({inner})",
            )
            _check(
                self.ssm_heads % self.ssm_groups == 0,
                f"model.ssm_groups ({self.ssm_groups}) must divide ssm_heads ({self.ssm_heads})",
            )
            _check(
                inner % self.ssm_groups == 0,
                f"model.ssm_groups ({self.ssm_groups}) must divide the SSM inner width ({inner})",
            )
            _check(
                0 < self.ssm_a_init_min <= self.ssm_a_init_max,
                f"model.ssm_a_init_min/max must satisfy 0 < min <= max, got {self.ssm_a_init_min}, {self.ssm_a_init_max}",
            )
            _check_name("model.ssm_implementation", self.ssm_implementation, SsdImplementation)
            _check_name(
                "model.attention_implementation for arch=attamba",
                self.attention_implementation,
                AttentionImplementation,
            )
        else:
            _check_name(
                "model.attention_implementation for arch=transformer",
                self.attention_implementation,
                CausalImplementation,
            )
            _check(
                self.sliding_window is None or self.sliding_window >= 0,
                f"model.sliding_window must be null or >= 0, got {self.sliding_window}",
            )


# Keys that mean something for one architecture only: setting them for the other is an error.
ATTAMBA_ONLY = frozenset(
    {
        "token_chunk",
        "window",
        "pseudo_chunk",
        "ssm_state_dim",
        "ssm_hidden_dim",
        "ssm_heads",
        "ssm_groups",
        "ssm_conv_width",
        "ssm_dt_bias",
        "ssm_a_init_min",
        "ssm_a_init_max",
        "ssm_implementation",
    }
)
TRANSFORMER_ONLY = frozenset({"sliding_window"})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the model reads. Defaults: the embedded corpus, byte-level, the paper's T and batch."""

    # Training sources, read in this order: "stdlib" (the Python standard library's own .py
    # files, present on every machine), or paths/globs of text files (one document per file),
    # .jsonl files (one document per line, in its "text" field) and .bin token files written by
    # `python -m attamba_jax.prepare`.
    train: tuple[str, ...] = ("stdlib",)
    # Held-out sources in the same forms; empty = hold out heldout_fraction of the training documents.
    eval: tuple[str, ...] = ()
    # Share of training documents (text files, JSONL lines; never .bin files) held out when eval is empty.
    heldout_fraction: float = 0.02
    # "byte" (ids 0-255 = bytes, 256 = BOS, 257 = EOS) or the path of a SentencePiece .model.
    tokenizer: str = "byte"
    # Tokens per packed training sequence (documents are BOS...EOS, concatenated and cut).
    seq_len: int = 1024
    # Keep packed documents apart: every document of a row is computed as if it were alone
    # (attention and the SSM state stop at its first token; the model reads the batch's
    # segment_ids). false: documents in a row see each other, as before this key (comparisons).
    document_masking: bool = True
    # Documents start at multiples of this many positions of a row, each padded after its EOS
    # (padding is masked in the loss; `describe --corpus` reports what it costs). null =
    # model.token_chunk for Attamba with document_masking (its fast paths need it), else 1.
    # Attamba with document_masking takes a multiple of model.token_chunk; seq_len must be a
    # multiple of it.
    document_align: int | None = None
    # Sequences per optimizer step over all processes and devices (the global batch).
    batch_size: int = 16
    # Batches assembled ahead of the device step ...
    prefetch: int = 8
    # ... by this many reader threads (0 = in the training thread, between device steps).
    threads: int = 4

    def validate(self):
        _check(len(self.train) >= 1, "data.train must name at least one source")
        for key in ("train", "eval"):
            for src in getattr(self, key):
                _check(bool(src.strip()), f"data.{key} holds an empty source name")
        _check(
            0.0 <= self.heldout_fraction < 1.0, f"data.heldout_fraction must be in [0, 1), got {self.heldout_fraction}"
        )
        _check(bool(self.tokenizer.strip()), "data.tokenizer must be 'byte' or the path of a SentencePiece .model")
        for key in ("seq_len", "batch_size", "prefetch"):
            _check(getattr(self, key) >= 1, f"data.{key} must be >= 1, got {getattr(self, key)}")
        _check(self.threads >= 0, f"data.threads must be >= 0 (0 = read in the training thread), got {self.threads}")
        _check(
            self.document_align is None or self.document_align >= 1,
            f"data.document_align must be null or >= 1, got {self.document_align}",
        )
        _check(
            self.prefetch >= self.threads,
            f"data.prefetch ({self.prefetch}) must be >= data.threads ({self.threads}), or threads sit idle",
        )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay. Defaults: the paper's recipe (SPEC §7)."""

    # Peak learning rate, reached after warmup_steps.
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Decoupled (AdamW) decay; never applied to norm weights, biases, A_log, D or dt_bias.
    weight_decay: float = 0.033
    # Linear warmup from 0 to lr over this many steps.
    warmup_steps: int = 5000
    # Cosine decay from lr down to lr * min_lr_ratio at train.steps.
    min_lr_ratio: float = 1e-6
    # Clip the gradient to this global norm; null = no clipping.
    grad_clip: float | None = 1.0
    # Microbatches per optimizer step (gradient accumulation); data.batch_size must divide by it.
    grad_accum: int = 1

    def validate(self):
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        for key in ("beta1", "beta2"):
            _check(0.0 <= getattr(self, key) < 1.0, f"optim.{key} must be in [0, 1), got {getattr(self, key)}")
        _check(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(
            self.grad_clip is None or self.grad_clip > 0, f"optim.grad_clip must be null or > 0, got {self.grad_clip}"
        )
        _check(self.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {self.grad_accum}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: length, logging, held-out evaluation, checkpoints."""

    # Optimizer steps of the whole run (a resumed run continues up to it).
    steps: int = 60000
    # Write loss, grad norm, lr, tokens/s and MFU every this many steps.
    log_every: int = 10
    # Held-out loss every this many steps (also before the first step and after the last).
    eval_every: int = 1000
    # Held-out batches per evaluation; null = the whole held-out set.
    eval_batches: int | None = 20
    # Save a checkpoint every this many steps (also after the last step and on SIGTERM).
    checkpoint_every: int = 1000
    # Keep the newest this many checkpoints ...
    keep_last: int = 3
    # ... and, besides, every checkpoint whose step is a multiple of this; null = none.
    keep_every: int | None = 10000
    # Peak dense FLOP/s of one device in TFLOP/s, for MFU; null = detect from the device kind.
    peak_tflops: float | None = None
    # What the backward recomputes of each block to save memory: none; block (keep only each
    # block's input); block_save_dots (keep the matmul outputs too, recompute the rest).
    remat: Literal["none", "block", "block_save_dots"] = "none"
    # Positions per slice of the LM head and loss, forward and backward, so that the
    # [batch, seq_len, vocab] logits never exist at once; null = the whole length at once.
    loss_slice: int | None = None

    def validate(self):
        for key in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_last"):
            _check(getattr(self, key) >= 1, f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_batches", "keep_every", "loss_slice"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"train.{key} must be null or >= 1, got {value}")
        _check(
            self.peak_tflops is None or self.peak_tflops > 0,
            f"train.peak_tflops must be null or > 0, got {self.peak_tflops}",
        )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """How the devices of all processes are laid out; -1 = the devices the other axes leave.

    The batch is split over data x fsdp and the length over context; parameters and optimizer
    moments are split over fsdp (their embed dimension) and tensor (heads, kv, mlp, vocab,
    ssm_inner), by the logical-axis rules of ``attamba_jax.sharding``. data*fsdp*context*tensor
    must equal the number of devices. A checkpoint restores onto any mesh.
    """

    # Data parallelism: a full copy of the state per group, gradients all-reduced.
    data: int = -1
    # Fully sharded data parallelism: state split, gathered per layer as it is used.
    fsdp: int = 1
    # Context parallelism: the length of every activation split over the devices (Attamba: 2c
    # pieces, device i holding pieces i and 2c-1-i, which balances causal attention); Attamba's
    # layers exchange only halos and boundary keys (attamba_jax/context_parallel.py), the
    # transformer's (contiguous slices) gather every key and value.
    context: int = 1
    # Tensor parallelism: heads and hidden widths split (where they divide).
    tensor: int = 1

    def validate(self):
        sizes = dataclasses.asdict(self)
        for key, size in sizes.items():
            _check(size >= 1 or size == -1, f"mesh.{key} must be >= 1 or -1 (= the remaining devices), got {size}")
        _check(
            list(sizes.values()).count(-1) <= 1, f"at most one of mesh.data/fsdp/context/tensor may be -1, got {sizes}"
        )

    def shape(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    # Seeds the parameter initialisation and the data order.
    seed: int = 0

    def validate(self) -> Config:
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        self.mesh.validate()
        _check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        _check(
            self.data.batch_size % self.optim.grad_accum == 0,
            f"data.batch_size ({self.data.batch_size}) must be a multiple of optim.grad_accum ({self.optim.grad_accum})",
        )
        _check(
            self.optim.warmup_steps <= self.train.steps,
            f"optim.warmup_steps ({self.optim.warmup_steps}) must not exceed train.steps ({self.train.steps})",
        )
        _check(
            not (
                self.model.arch == "attamba"
                and self.mesh.context != 1
                and self.model.attention_implementation == "dense"
            ),
            "model.attention_implementation=dense needs whole rows; with mesh.context > 1 a device holds pieces "
            "of a row: choose auto, compressed or a kernel",
        )
        align = self.document_align
        if self.model.arch == "attamba" and self.data.document_masking:
            _check(
                align % self.model.token_chunk == 0,
                f"data.document_align ({align}) must be a multiple of model.token_chunk ({self.model.token_chunk}) "
                "with data.document_masking: documents must start on the chunk grid",
            )
        _check(
            self.data.seq_len % align == 0,
            f"data.seq_len ({self.data.seq_len}) must be a multiple of data.document_align ({align}), "
            "so that every row starts aligned",
        )
        return self

    @property
    def document_align(self) -> int:
        """``data.document_align`` resolved: documents start at multiples of it in a row."""
        if self.data.document_align is not None:
            return self.data.document_align
        masked_attamba = self.model.arch == "attamba" and self.data.document_masking
        return self.model.token_chunk if masked_attamba else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> Config:
        return dataclasses.replace(self, **sections).validate()


# --- loading ------------------------------------------------------------------------------


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation; int -> float is the only conversion."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        _check(value in args, f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            _check(type(None) in args, f"{where} may not be null")
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin in (tuple, list):
        if isinstance(value, str) and args and args[0] is str:
            value = [value]  # ``data.train=books/*.txt`` on the command line: a one-element list
        _check(isinstance(value, (list, tuple)), f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is bool:
        _check(isinstance(value, bool), f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML reads 3e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool), f"{where} must be a number, got {value!r}"
        )
        _check(math.isfinite(value), f"{where} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        _check(isinstance(value, str), f"{where} must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    return value


# Keys that were renamed: configs saved by a workdir under the old name still load
# (``upgrade_saved``); a config written by hand with the old name is an error naming the new one.
RENAMED_KEYS = {"model.leading_tokens": "model.window"}


# Keys added later, with the value that keeps what a config saved before them did.
ADDED_KEYS = {"data.document_masking": False}


def upgrade_saved(raw: dict) -> dict:
    """A saved config dict (a workdir's config.yaml, a checkpoint's meta) with renamed keys under
    their new names, and keys added since it was saved set to what that run did."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for old, new in RENAMED_KEYS.items():
        (section, old_key), (_, new_key) = old.split("."), new.split(".")
        if isinstance(out.get(section), dict) and old_key in out[section]:
            out[section][new_key] = out[section].pop(old_key)
    for key, value in ADDED_KEYS.items():
        section, name = key.split(".")
        if isinstance(out.get(section), dict) and name not in out[section]:
            out[section][name] = value
    return out


def _build(cls, raw: Any, where: str):
    _check(raw is None or isinstance(raw, dict), f"{where or 'config'} must be a mapping, got {raw!r}")
    raw = dict(raw or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        renamed = RENAMED_KEYS.get(f"{prefix}{unknown[0]}")
        if renamed:
            raise ConfigError(f"config key {prefix}{unknown[0]} is now called {renamed}")
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (valid keys: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    PyYAML keeps the last of two equal keys silently, so ``dim: 512`` pasted below an
    earlier ``dim: 256`` would win without a word.
    """

    def construct_mapping(self, node, deep=False):
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor`` overrides the anchor's keys by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # an unhashable key: the base class names it
            line = key_node.start_mark.line + 1
            if key in first_line:
                where = f"{self.name}, line {line}"
                raise ConfigError(f"{where}: key {key!r} is set twice in one mapping (first on line {first_line[key]})")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, name: str) -> Any:
    """``text`` parsed by the safe loader that refuses duplicate keys; ``name`` (a file, an override) for errors."""
    loader = _UniqueKeyLoader(text)
    loader.name = name  # shown in the marks of YAML errors and in duplicate-key errors
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _set_dotted(tree: dict, dotted: str, value: Any):
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        _check(isinstance(node, dict), f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def _check_not_given(given: dict[str, str], key: str, item: str):
    """Refuse an override of a key that an earlier override sets too (the same key, or a section and a key in it)."""
    for other, other_item in given.items():
        _check(other != key, f"override {key} is given twice: {other_item!r} and {item!r}")
        inner = key if key.startswith(other + ".") else other if other.startswith(key + ".") else None
        _check(inner is None, f"overrides {other_item!r} and {item!r} both set {inner}")


def parse_overrides(overrides: list[str]) -> dict:
    """``["model.dim=256", "seed=3"]`` -> nested dict; values parsed as YAML scalars.

    A key given twice is an error, not "the last one wins": on a long command line the
    earlier one is easily missed, and which of the two was meant is anyone's guess.
    """
    tree: dict = {}
    given: dict[str, str] = {}
    for item in overrides:
        _check("=" in item, f"override {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        _check(bool(key), f"override {item!r} has an empty key")
        _check_not_given(given, key, item)
        given[key] = item
        try:
            value = _parse_yaml(text, f"override {item!r}") if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {e}") from None
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(raw: dict) -> Config:
    """Build and validate a Config from a nested dict (YAML or overrides merged)."""
    model_raw = raw.get("model") or {}
    if isinstance(model_raw, dict):
        arch = model_raw.get("arch", ModelConfig.arch)
        wrong = ATTAMBA_ONLY if arch == "transformer" else TRANSFORMER_ONLY if arch == "attamba" else frozenset()
        bad = sorted(set(model_raw) & wrong)
        _check(not bad, f"model.{bad[0] if bad else ''} does not apply to arch={arch}")
    return _build(Config, raw, "").validate()


def _read_yaml(path: pathlib.Path) -> dict:
    _check(path.is_file(), f"config file not found: {path}")
    try:
        raw = _parse_yaml(path.read_text(), str(path)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    _check(isinstance(raw, dict), f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


# --- bases: a file may build on other files ----------------------------------------------

# The top-level key of a config file that names the files it builds on (not a key of Config).
BASE_KEY = "base"
# The sections of a config, each a mapping of keys (``seed`` is a key of its own).
_SECTIONS = frozenset(name for name, hint in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(hint))
# A config file resolved: the merged nested dict, and for each dotted key the file whose value it holds.
_Resolved = tuple[dict, dict[str, pathlib.Path]]


def _base_paths(path: pathlib.Path, names: Any) -> list[pathlib.Path]:
    """The files that ``base:`` in ``path`` names: one or a list, each relative to ``path``'s folder."""
    listed = [names] if isinstance(names, str) else names
    _check(
        isinstance(listed, list) and len(listed) >= 1 and all(isinstance(n, str) and n.strip() for n in listed),
        f"{path}: {BASE_KEY} must be a file name or a list of file names, relative to the file, got {names!r}",
    )
    # Normalised (``paper/../recipe.yaml`` is ``recipe.yaml``) so that one file reached two ways is one file.
    paths = [pathlib.Path(os.path.normpath(path.parent / name)) for name in listed]
    twice = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
    _check(twice is None, f"{path}: {BASE_KEY} names {twice} twice")
    return paths


def _read_layer(path: pathlib.Path) -> tuple[dict, list[pathlib.Path]]:
    """A config file's own keys, and the bases it names (``base:`` taken out of the keys)."""
    raw = _read_yaml(path)
    bases = _base_paths(path, raw.pop(BASE_KEY)) if BASE_KEY in raw else []
    for section in _SECTIONS & raw.keys():
        value = raw[section]
        _check(value is None or isinstance(value, dict), f"{path}: {section} must be a mapping of keys, got {value!r}")
        # A section whose lines are all commented out sets nothing: it must not clear the base's section.
        raw[section] = value or {}
    return raw, bases


def _keys(tree: dict) -> list[str]:
    """The dotted keys a config dict sets: ``seed``, ``model.dim``, ... (a section is not a key by itself)."""
    keys = []
    for name, value in tree.items():
        if name in _SECTIONS and isinstance(value, dict):
            keys.extend(f"{name}.{key}" for key in value)
        else:
            keys.append(name)
    return keys


def _resolve(path: pathlib.Path, chain: tuple[pathlib.Path, ...] = ()) -> _Resolved:
    """``path``'s keys over its bases' keys: the merged dict, and for each dotted key the file it comes from.

    ``chain`` holds the files, outermost first, whose bases are being resolved: meeting one of
    them again is a cycle.
    """
    own, bases = _read_layer(path)
    own_keys = _keys(own)
    tree, origin = _merge_bases(path, bases, chain + (path,), frozenset(own_keys))
    return _merge(tree, own), {**origin, **dict.fromkeys(own_keys, path)}


def _merge_bases(
    path: pathlib.Path, bases: list[pathlib.Path], chain: tuple[pathlib.Path, ...], settled: frozenset[str]
) -> _Resolved:
    """The bases of ``path`` resolved and merged in order, as ``_resolve`` returns them.

    Two bases of one list may not both set a key: which one wins would hang on their order. Not
    ambiguous, so allowed: a key both have from one file (two siblings of one recipe: the same
    setting, not two), and a key ``path`` sets itself (``settled``: neither base's value is used).
    """
    tree: dict = {}
    origin: dict[str, pathlib.Path] = {}
    for base in bases:
        seen = [p.resolve() for p in chain]  # resolved: a file reached through a link is the same file
        if base.resolve() in seen:
            cycle = chain[seen.index(base.resolve()) :] + (base,)
            raise ConfigError(f"config bases form a cycle: {' -> '.join(map(str, cycle))}")
        _check(base.is_file(), f"base file not found: {base} (named by {path})")
        base_tree, base_origin = _resolve(base, chain)
        for key in sorted(base_origin.keys() & origin.keys() - settled):
            _check(
                base_origin[key] == origin[key],
                f"{path}: {key} is set by two of its bases, {origin[key]} and {base_origin[key]}; "
                f"set it in {path} or in one base only",
            )
        tree, origin = _merge(tree, base_tree), {**origin, **base_origin}
    return tree, origin


def read_config_file(path: str | pathlib.Path) -> dict:
    """The nested dict a config file stands for: its own keys over its bases' (``base:``), resolved recursively.

    The bases' keys are merged in the order listed, then the file's own keys override them;
    the result has no ``base:`` key. It is not yet validated: ``config_from_dict`` does that.
    Errors: a file that is missing or not valid YAML, a key twice in one mapping, a base that is
    missing (naming the file that names it), a cycle of bases (naming them), and one key set by
    two bases of one list (from two files) that the file does not set itself.
    """
    return _resolve(pathlib.Path(path))[0]


def load_config(path: str | pathlib.Path | None = None, overrides: list[str] | None = None) -> Config:
    """The config of a YAML file (and its bases) with ``section.key=value`` overrides on top, validated.

    Each layer overrides the one before: the dataclass defaults, the file's bases, the file, the
    overrides (an override may be given once only). ``path=None`` starts from the defaults alone.
    """
    raw = {} if path is None else read_config_file(path)
    raw = _merge(raw, parse_overrides(list(overrides or [])))
    return config_from_dict(raw)


def load_saved_config(path: str | pathlib.Path) -> Config:
    """The config a workdir saved (``<workdir>/config.yaml``), written by this or an earlier version.

    A saved config is flat and complete (``dump_config``): it names no bases, so that what a run
    was trained with never changes when a shipped config file does.
    """
    raw = _read_yaml(pathlib.Path(path))
    _check(BASE_KEY not in raw, f"{path}: a saved config is complete in itself; {BASE_KEY}: has no place in it")
    return config_from_dict(upgrade_saved(raw))


def dump_config(cfg: Config) -> str:
    """``cfg`` as YAML that ``load_config`` / ``load_saved_config`` read back as the same Config.

    Flat and complete: every key at its value, no ``base:`` (a workdir must not depend on
    config files that may change after the run).
    """

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    tree = plain(cfg.to_dict())
    # Keys of the other architecture are always at their defaults; leaving them out keeps the
    # dump loadable (setting them is an error).
    other = ATTAMBA_ONLY if cfg.model.arch == "transformer" else TRANSFORMER_ONLY
    tree["model"] = {k: v for k, v in tree["model"].items() if k not in other}
    return yaml.safe_dump(tree, sort_keys=False)
