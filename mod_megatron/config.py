"""One config tree for a run: dataclasses loaded from YAML, overridden by `--section.key=value`.

    cfg = load_config("configs/tiny-cpu.yaml", ["--train.iters=50", "--mod.capacity=0.25"])

`load_config` validates the whole tree once, before any process group starts; every problem is a
`ConfigError` whose one-line message says what to change.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A bad config value; the message is one line that says the fix."""


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA; None = one KV head per query head
    ffn_hidden_size: Optional[int] = None  # None = 4 * hidden_size
    seq_length: int = 128
    vocab_size: int = 4096  # tokenizer size; the embedding is padded to make_vocab_size_divisible_by
    make_vocab_size_divisible_by: int = 128
    normalization: str = "LayerNorm"  # LayerNorm | RMSNorm
    activation: str = "gelu"  # gelu | swiglu
    position_embedding: str = "rope"  # rope | learned_absolute
    rotary_base: int = 10000
    init_method_std: float = 0.02
    dropout: float = 0.0
    untie_embeddings: bool = False
    attention_backend: str = "sdpa"  # sdpa (torch scaled_dot_product_attention) | local (megatron)
    fused_rope: str = "auto"  # RoPE fused by torch.compile inside SDPA attention: auto (on GPUs) | on | off
    # whole layer (MoD: with routing) compiled as one function, and megatron's fused cross entropy: auto (GPUs) | on | off
    fused_layer: str = "auto"
    # on the fused path, weight gradients added into megatron DDP's fp32 main_grad by their GEMMs (model/wgrad.py);
    # on by default: 368M MoD +1.5%, 1.3B MoD +0.9% on an H100 (docs/benchmarks.md, fourteenth session)
    fused_wgrad: bool = True


@dataclass
class MoDConfig:
    enabled: bool = True
    capacity: float = 0.125  # fraction of each sequence's tokens a routed layer processes
    every: int = 2  # route every Nth layer (paper: every other layer)
    first_routed: int = 1  # 0-based index of the first routed layer (paper keeps layer 0 dense)
    router_weight: str = "sigmoid"  # sigmoid (bounded, default) | linear (paper's raw score) | 2sigmoid (r=1 at 0)
    router_init_std: float = 0.02
    # Causal routing for sampling (docs/inference.md): both are trained on top-k membership.
    aux_loss: bool = True  # BCE between sigmoid(router logit) and "was in the top k"
    aux_loss_weight: float = 0.01
    predictor: bool = True  # small MLP (H -> H/8 -> 1) on stop-gradient inputs, its own BCE loss
    predictor_loss_weight: float = 1.0  # touches only the predictor's params (inputs are detached)
    capacity_warmup_iters: int = 0  # capacity goes linearly from 1.0 to `capacity` over N steps
    fused_routing: str = "auto"  # Triton top-k/gather/combine/predictor: auto (CUDA + triton) | on (or fail) | off (PyTorch)


@dataclass
class MoEConfig:
    """Mixture-of-experts MLPs (docs/mode.md). num_experts=0: dense MLPs everywhere."""

    num_experts: int = 0  # real (computing) experts per MoE layer; 0 = dense MLP
    topk: int = 2  # experts (real or no-op) each token picks
    ep: int = 1  # expert-parallel size: the real experts are split over ep ranks
    every: int = 1  # layer i is MoE when i >= first and (i - first) % every == 0
    first: int = 0
    noop_experts: int = 0  # integrated MoDE: no-op experts (identity; the token skips the MLP)
    noop_target: float = 0.0  # target share of routing slots going to no-op experts (needs noop_experts)
    score_function: str = "softmax"  # softmax | sigmoid (sigmoid is required by expert_bias)
    aux_loss_coeff: float = 1e-2  # load-balancing loss towards the target distribution; 0 = off
    z_loss_coeff: float = 0.0  # router z-loss; 0 = off
    expert_bias: bool = False  # aux-loss-free balancing: per-expert bias on the top-k scores
    bias_update_rate: float = 1e-3
    capacity_factor: Optional[float] = None  # null = dropless; else drop tokens beyond capacity
    pad_to_capacity: bool = False  # with capacity_factor: pad every expert's input to capacity
    ffn_hidden_size: Optional[int] = None  # per-expert FFN size; null = the model's ffn size
    # experts' MLPs as two grouped GEMMs (torch._grouped_mm; moe/grouped.py): auto (bf16 on sm90+ GPUs) | on | off
    # (off: megatron's SequentialMLP, one expert after another)
    grouped_gemm: str = "auto"


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    sp: bool = False
    pipeline_split: str = "even"  # even (equal layers per stage) | cost (balance estimated FLOPs)
    # dp is implied: world_size // (tp * pp)
    # Data-parallel gradient reduction in buckets, each launched (async) as soon as the backward has
    # produced all of its gradients, overlapping the rest of the backward; off = one reduction after it.
    overlap_grad_reduce: bool = True
    bucket_size: Optional[int] = None  # parameter elements per bucket (None: megatron's max(40M, 1M * dp))
    # With train.distributed_optimizer: each bucket's parameter all-gather after the step runs async and
    # is waited for by the next forward where it first reads that bucket (off: one all-gather in the step)
    overlap_param_gather: bool = False


@dataclass
class DataConfig:
    data_dir: str = "data"
    corpus: str = "default"  # default = Shakespeare (train/valid) + KJV (held-out); or "custom"
    train_prefix: Optional[str] = None  # custom: .bin/.idx prefix made by mod-preprocess
    heldout_prefix: Optional[str] = None
    tokenizer_model: Optional[str] = None
    split: str = "949,50,1"
    num_workers: int = 0


@dataclass
class TrainConfig:
    iters: int = 300
    micro_batch_size: int = 8
    global_batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 30
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    eval_interval: int = 100
    eval_iters: int = 10
    device: str = "auto"  # auto | cpu | cuda
    distributed_optimizer: bool = False
    exit_interval: int = 0  # stop (with a checkpoint) after this many iterations of this run; 0 = never
    engine: str = "megatron"  # megatron (DDP + megatron optimizer) | deepspeed (deepspeed.initialize, ZeRO)
    zero_stage: int = 1  # deepspeed engine only: ZeRO stage 0, 1 or 2
    nan_policy: str = "skip"  # NaN/Inf loss or grads: skip (drop the update) | stop (report the first bad layer)
    max_skipped_steps: int = 10  # skip policy: stop after this many consecutive skipped steps
    dist_timeout_minutes: float = 10.0  # a collective waiting longer (dead or hung rank) fails the job
    cuda_graphs: bool = False  # capture each layer's fwd+bwd once and replay it (GPU; training/cuda_graphs.py)
    fused_optimizer: str = "auto"  # torch's fused AdamW kernel: auto (on GPU) | on | off (training/fused_adam.py)


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    save_interval: int = 0  # 0 = only at the end
    save_final: bool = True  # false: no checkpoint when the run ends (benchmarks)
    # Start a new run from these weights (a checkpoint root or iter_NNNNNNN dir, any TP/PP layout): model
    # weights only, fresh optimizer, iteration 0. Used only when `dir` has no checkpoint to resume.
    init_from: Optional[str] = None
    load: bool = True  # resume from `latest` when it exists
    keep_last: int = 2  # latest + keep_last-1 older ones (the fallbacks when latest is damaged)
    verify: bool = True  # sha256 of every checkpoint file checked before loading (sizes always are)


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    log_interval: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    # [first, last]: trace those iterations with torch.profiler -> <dir>/profile/rank<R>.{json,txt}
    profile_steps: Optional[list] = None
    profile_ranks: list = field(default_factory=lambda: [0])  # global ranks that trace


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mod: MoDConfig = field(default_factory=MoDConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading

def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Turn a YAML/CLI value into the field's declared type, or raise a ConfigError."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # `--x.flag=1`: YAML already made "1" an int
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if typ is float:
        if isinstance(value, bool):  # float(True) == 1.0 would accept `--mod.capacity=true`
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, bool):  # YAML reads on/off (and yes/no, true/false) as booleans
            return "on" if value else "off"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _section_types(section_obj) -> dict:
    hints = typing.get_type_hints(type(section_obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(section_obj)}


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = {f.name for f in dataclasses.fields(cfg)}
    if section not in sections:
        raise ConfigError(f"{source}: unknown section '{section}'; allowed: {', '.join(sorted(sections))}")
    obj = getattr(cfg, section)
    types = _section_types(obj)
    if key not in types:
        raise ConfigError(
            f"{source}: unknown key '{section}.{key}'; allowed keys in '{section}': {', '.join(sorted(types))}"
        )
    setattr(obj, key, _coerce(value, types[key], f"{source}: {section}.{key}"))


def parse_override(arg: str) -> tuple[str, str, Any]:
    """'--train.iters=50' -> ('train', 'iters', 50) with YAML typing of the value."""
    body = arg[2:] if arg.startswith("--") else arg
    if "=" not in body or "." not in body.split("=", 1)[0]:
        raise ConfigError(f"override '{arg}': write it as --section.key=value, e.g. --train.iters=50")
    dotted, raw = body.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return section, key, value


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Build the config from a YAML file (optional) and overrides; validate; return it."""
    cfg = Config()
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not a text (UTF-8) YAML file ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model:, mod:, train: ...)")
        for section, values in data.items():
            known = {f.name for f in dataclasses.fields(cfg)}
            if section not in known:
                raise ConfigError(f"{path}: unknown section '{section}'; allowed: {', '.join(sorted(known))}")
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping of key: value")
            for key, value in values.items():
                _apply(cfg, str(section), str(key), value, path)
    for arg in overrides or []:
        section, key, value = parse_override(arg)
        _apply(cfg, section, key, value, f"override {arg}")
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation

def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Check the values on their own and against each other; with world_size, the layout too."""
    m, mod, p, t = cfg.model, cfg.mod, cfg.parallel, cfg.train
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size"):
        _check(getattr(m, name) > 0, f"model.{name} must be > 0, got {getattr(m, name)}")
    _check(m.hidden_size % m.num_attention_heads == 0,
           f"model.num_attention_heads={m.num_attention_heads} must divide model.hidden_size={m.hidden_size}")
    if m.num_query_groups is not None:
        _check(m.num_query_groups > 0 and m.num_attention_heads % m.num_query_groups == 0,
               f"model.num_query_groups={m.num_query_groups} must divide num_attention_heads={m.num_attention_heads}")
    if m.position_embedding == "rope":
        _check((m.hidden_size // m.num_attention_heads) % 2 == 0,
               "rope needs an even head dim (hidden_size / num_attention_heads)")
    _check(m.normalization in ("LayerNorm", "RMSNorm"), f"model.normalization must be LayerNorm or RMSNorm, got {m.normalization!r}")
    _check(m.activation in ("gelu", "swiglu"), f"model.activation must be gelu or swiglu, got {m.activation!r}")
    _check(m.position_embedding in ("rope", "learned_absolute"),
           f"model.position_embedding must be rope or learned_absolute, got {m.position_embedding!r}")
    _check(m.attention_backend in ("sdpa", "local"), f"model.attention_backend must be sdpa or local, got {m.attention_backend!r}")
    _check(m.fused_rope in ("auto", "on", "off"), f"model.fused_rope must be auto, on or off, got {m.fused_rope!r}")
    _check(m.fused_layer in ("auto", "on", "off"), f"model.fused_layer must be auto, on or off, got {m.fused_layer!r}")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")

    _check(0.0 < mod.capacity <= 1.0, f"mod.capacity must be in (0, 1], got {mod.capacity} (e.g. 0.125 = 12.5% of tokens)")
    _check(mod.every >= 1, f"mod.every must be >= 1 (1 = every layer routed, 2 = every other), got {mod.every}")
    _check(0 <= mod.first_routed < m.num_layers,
           f"mod.first_routed must be a layer index in [0, {m.num_layers - 1}], got {mod.first_routed}")
    _check(mod.router_weight in ("sigmoid", "linear", "2sigmoid"),
           f"mod.router_weight must be sigmoid, linear or 2sigmoid, got {mod.router_weight!r}")
    _check(mod.aux_loss_weight >= 0, f"mod.aux_loss_weight must be >= 0 (0 turns the router BCE off), got {mod.aux_loss_weight}")
    _check(mod.predictor_loss_weight >= 0, f"mod.predictor_loss_weight must be >= 0, got {mod.predictor_loss_weight}")
    _check(mod.fused_routing in ("auto", "on", "off"),
           f"mod.fused_routing must be auto, on or off, got {mod.fused_routing!r}")
    _check(mod.capacity_warmup_iters >= 0, f"mod.capacity_warmup_iters must be >= 0 (0 = no warm-up), got {mod.capacity_warmup_iters}")

    _validate_moe(cfg)

    for name in ("tp", "pp"):
        _check(getattr(p, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    _check(not p.sp or p.tp > 1, "parallel.sp=true needs parallel.tp > 1 (sequence parallel splits over TP ranks)")
    _check(m.num_attention_heads % p.tp == 0,
           f"parallel.tp={p.tp} must divide model.num_attention_heads={m.num_attention_heads}")
    if p.sp:
        _check(m.seq_length % p.tp == 0, f"parallel.sp needs model.seq_length ({m.seq_length}) divisible by parallel.tp ({p.tp})")
    _check(p.bucket_size is None or p.bucket_size >= 1,
           f"parallel.bucket_size must be a positive number of parameter elements (or null for megatron's default), got {p.bucket_size}")
    _check(not p.overlap_param_gather or (t.distributed_optimizer and t.engine == "megatron"),
           "parallel.overlap_param_gather needs --train.distributed_optimizer=true (megatron engine): only the "
           "distributed optimizer all-gathers parameters after its step")
    _check(p.pipeline_split in ("even", "cost"), f"parallel.pipeline_split must be even or cost, got {p.pipeline_split!r}")
    if p.pipeline_split == "cost":
        _check(p.pp > 1 and p.vpp is None,
               "parallel.pipeline_split=cost needs parallel.pp > 1 and no virtual stages (parallel.vpp: null)")
    if p.vpp is not None:
        _check(p.pp > 1 and p.vpp >= 2, f"parallel.vpp={p.vpp} needs parallel.pp > 1 and vpp >= 2 (or leave it null)")
        _check(m.num_layers % (p.pp * p.vpp) == 0,
               f"model.num_layers={m.num_layers} must split evenly into pp*vpp={p.pp * p.vpp} chunks")
    _check(m.num_layers >= p.pp, f"model.num_layers={m.num_layers} is fewer than pipeline stages parallel.pp={p.pp}")
    if p.pp > 1 and p.pipeline_split == "even":
        _check(m.num_layers % (p.pp * (p.vpp or 1)) == 0,
               f"model.num_layers={m.num_layers} does not split evenly into parallel.pp={p.pp} stages"
               + (f" x vpp={p.vpp}" if p.vpp else "") + "; change the layer count or use --parallel.pipeline_split=cost")

    _check(t.iters >= 0, f"train.iters must be >= 0 (0 = write the initialised model as iteration 0 and exit), got {t.iters}")
    _check(t.micro_batch_size > 0, f"train.micro_batch_size must be > 0, got {t.micro_batch_size}")
    _check(t.global_batch_size % t.micro_batch_size == 0,
           f"train.global_batch_size={t.global_batch_size} must be a multiple of micro_batch_size={t.micro_batch_size}")
    _check(t.lr > 0 and 0 <= t.min_lr <= t.lr, f"need 0 <= train.min_lr <= train.lr and lr > 0 (lr={t.lr}, min_lr={t.min_lr})")
    _check(t.warmup_iters >= 0, f"train.warmup_iters must be >= 0, got {t.warmup_iters}")
    _check(t.precision in ("auto", "bf16", "fp32"), f"train.precision must be auto, bf16 or fp32, got {t.precision!r}")
    _check(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {t.device!r}")
    _check(t.clip_grad >= 0, f"train.clip_grad must be >= 0 (0 disables), got {t.clip_grad}")
    _check(t.eval_interval >= 0 and t.eval_iters >= 0, "train.eval_interval and train.eval_iters must be >= 0")
    _check(t.engine in ("megatron", "deepspeed"), f"train.engine must be megatron or deepspeed, got {t.engine!r}")
    if t.engine == "deepspeed":
        _check(t.zero_stage in (0, 1, 2), f"train.zero_stage must be 0, 1 or 2, got {t.zero_stage}")
        _check(p.pp == 1 and not p.sp,
               "train.engine=deepspeed runs with parallel.pp=1 and parallel.sp=false (TP and DP only); "
               "use --train.engine=megatron for pipeline or sequence parallelism")
        _check(not cfg.checkpoint.init_from, "checkpoint.init_from works with --train.engine=megatron; for DeepSpeed, "
               "convert the weights first or drop checkpoint.init_from")
    _check(t.exit_interval >= 0, f"train.exit_interval must be >= 0 (0 = run to train.iters), got {t.exit_interval}")
    _check(cfg.checkpoint.save_interval >= 0, "checkpoint.save_interval must be >= 0 (0 = only at the end)")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1")
    steps = cfg.logging.profile_steps
    if steps is not None:
        _check(isinstance(steps, list) and len(steps) == 2 and all(type(i) is int for i in steps) and 1 <= steps[0] <= steps[1],
               f"logging.profile_steps must be [first, last] iterations with 1 <= first <= last "
               f"(e.g. --logging.profile_steps=[20,22]), got {steps!r}")
    _check(isinstance(cfg.logging.profile_ranks, list) and all(type(r) is int and r >= 0 for r in cfg.logging.profile_ranks),
           f"logging.profile_ranks must be a list of global ranks (e.g. [0] or [0,3]), got {cfg.logging.profile_ranks!r}")
    _check(t.nan_policy in ("skip", "stop"), f"train.nan_policy must be skip or stop, got {t.nan_policy!r}")
    _check(t.max_skipped_steps >= 0, f"train.max_skipped_steps must be >= 0 (0 = stop at the first), got {t.max_skipped_steps}")
    if t.cuda_graphs:
        from mod_megatron.training.cuda_graphs import unsupported

        why = unsupported(cfg)
        _check(why is None, why or "")
    _check(t.fused_optimizer in ("auto", "on", "off"),
           f"train.fused_optimizer must be auto, on or off, got {t.fused_optimizer!r}")
    _check(t.dist_timeout_minutes > 0, f"train.dist_timeout_minutes must be > 0, got {t.dist_timeout_minutes}")
    _check(cfg.data.corpus in ("default", "custom"), f"data.corpus must be default or custom, got {cfg.data.corpus!r}")
    if cfg.data.corpus == "custom":
        _check(cfg.data.train_prefix is not None and cfg.data.tokenizer_model is not None,
               "data.corpus=custom needs data.train_prefix and data.tokenizer_model (make them with mod-preprocess)")

    if world_size is not None:
        mp = p.tp * p.pp
        _check(world_size % mp == 0,
               f"world size {world_size} is not divisible by tp*pp={mp}; launch a multiple of {mp} processes")
        dp = world_size // mp
        if t.cuda_graphs:
            from mod_megatron.training.cuda_graphs import data_parallel_refusal

            why = data_parallel_refusal(dp)
            _check(why is None, why or "")
        _check((p.tp * dp) % cfg.moe.ep == 0,
               f"moe.ep={cfg.moe.ep} must divide tp*dp={p.tp * dp} (world size {world_size} / pp={p.pp}): "
               "expert-parallel ranks come from the tp x dp ranks of a stage; launch more processes or lower moe.ep")
        _check(t.global_batch_size % (t.micro_batch_size * dp) == 0,
               f"train.global_batch_size={t.global_batch_size} must be a multiple of micro_batch_size*dp="
               f"{t.micro_batch_size * dp}")


def _validate_moe(cfg: Config) -> None:
    e, m, p = cfg.moe, cfg.model, cfg.parallel
    _check(e.num_experts >= 0, f"moe.num_experts must be >= 0 (0 = dense MLP), got {e.num_experts}")
    _check(e.ep >= 1, f"moe.ep must be >= 1, got {e.ep}")
    if e.num_experts == 0:
        _check(e.ep == 1 and e.noop_experts == 0,
               "moe.ep and moe.noop_experts need moe.num_experts > 0 (set moe.num_experts)")
        return
    _check(e.num_experts % e.ep == 0, f"moe.ep={e.ep} must divide moe.num_experts={e.num_experts}")
    _check(e.noop_experts >= 0, f"moe.noop_experts must be >= 0, got {e.noop_experts}")
    _check(1 <= e.topk <= e.num_experts + e.noop_experts,
           f"moe.topk={e.topk} must be in [1, num_experts + noop_experts = {e.num_experts + e.noop_experts}]")
    if e.noop_experts:
        _check(0.0 < e.noop_target < 1.0, f"moe.noop_target must be in (0, 1) with no-op experts, got {e.noop_target}")
    else:
        _check(e.noop_target == 0.0, "moe.noop_target needs moe.noop_experts > 0 (or set it to 0)")
    _check(e.every >= 1 and 0 <= e.first < m.num_layers,
           f"moe.every must be >= 1 and moe.first in [0, {m.num_layers - 1}] (got every={e.every}, first={e.first})")
    _check(e.score_function in ("softmax", "sigmoid"), f"moe.score_function must be softmax or sigmoid, got {e.score_function!r}")
    _check(not e.expert_bias or e.score_function == "sigmoid",
           "moe.expert_bias=true needs moe.score_function=sigmoid (megatron-core's aux-loss-free routing)")
    _check(e.aux_loss_coeff >= 0 and e.z_loss_coeff >= 0 and e.bias_update_rate >= 0,
           "moe.aux_loss_coeff, moe.z_loss_coeff and moe.bias_update_rate must be >= 0")
    _check(e.capacity_factor is None or e.capacity_factor > 0,
           f"moe.capacity_factor must be > 0 or null (dropless), got {e.capacity_factor}")
    _check(not e.pad_to_capacity or e.capacity_factor is not None, "moe.pad_to_capacity=true needs moe.capacity_factor")
    _check(e.ffn_hidden_size is None or e.ffn_hidden_size > 0, f"moe.ffn_hidden_size must be > 0 or null, got {e.ffn_hidden_size}")
    _check(e.grouped_gemm in ("auto", "on", "off"), f"moe.grouped_gemm must be auto, on or off, got {e.grouped_gemm!r}")
    _check(p.tp == 1 or p.sp, "MoE with parallel.tp > 1 needs parallel.sp=true (megatron-core's MoELayer refuses TP without SP)")
    _check(getattr(cfg.train, "engine", "megatron") == "megatron",
           "MoE layers (moe.num_experts > 0) need --train.engine=megatron (expert parallelism is megatron-core's)")


def is_moe_layer(cfg: Config, layer_index: int) -> bool:
    """Whether 0-based layer `layer_index` has a mixture-of-experts MLP."""
    e = cfg.moe
    return e.num_experts > 0 and layer_index >= e.first and (layer_index - e.first) % e.every == 0


def ffn_hidden(m: ModelConfig) -> int:
    return m.ffn_hidden_size if m.ffn_hidden_size is not None else 4 * m.hidden_size


def padded_vocab(m: ModelConfig, tp: int = 1) -> int:
    mult = m.make_vocab_size_divisible_by * tp
    return int(math.ceil(m.vocab_size / mult) * mult)
