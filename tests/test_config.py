"""Config tree: YAML + `--section.key=value` overrides, typing, and one-line ConfigErrors."""
from __future__ import annotations

import os

import pytest

from mod_megatron.config import Config, ConfigError, load_config, padded_vocab, ffn_hidden, validate


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert msg and "\n" not in msg, f"ConfigError message is not one line: {msg!r}"
    return msg


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config) and cfg.mod.capacity == 0.125 and cfg.mod.every == 2
    assert cfg.to_dict()["model"]["hidden_size"] == 128


def test_yaml_then_overrides_with_field_types(tmp_path):
    path = _write(tmp_path, """
model:
  hidden_size: 96
  num_attention_heads: 4
  ffn_hidden_size: 200
mod:
  capacity: 0.5
  enabled: "yes"
train:
  lr: 3e-4          # PyYAML reads this as a string; the field makes it a float
  iters: 40
""")
    cfg = load_config(path, ["--train.iters=50", "--mod.capacity=0.25", "--model.num_query_groups=2",
                             "--data.tokenizer_model=tok.model", "--logging.tensorboard=false",
                             "--model.seq_length=64.0", "--data.split=98,1,1", "--mod.every=1"])
    assert cfg.model.hidden_size == 96 and cfg.model.num_attention_heads == 4 and ffn_hidden(cfg.model) == 200
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.iters == 50 and isinstance(cfg.train.iters, int)  # override beats the file
    assert cfg.mod.capacity == 0.25 and cfg.mod.enabled is True and cfg.mod.every == 1
    assert cfg.model.num_query_groups == 2
    assert cfg.data.tokenizer_model == "tok.model" and cfg.data.split == "98,1,1"
    assert cfg.logging.tensorboard is False
    assert cfg.model.seq_length == 64 and isinstance(cfg.model.seq_length, int)
    assert cfg.train.micro_batch_size == 8  # untouched default
    assert load_config(None, ["--model.num_query_groups=null"]).model.num_query_groups is None
    assert load_config(None, ["--mod.enabled=0"]).mod.enabled is False
    assert load_config(None, ["--mod.enabled=off"]).mod.enabled is False
    assert load_config(None, ["--mod.enabled=1"]).mod.enabled is True


@pytest.mark.parametrize("override,needle", [
    ("--train.iters=abc", "train.iters"),
    ("--train.iters=1.5", "expected an integer"),
    ("--train.iters=true", "expected an integer"),
    ("--mod.enabled=maybe", "expected true/false"),
    ("--mod.enabled=2", "expected true/false"),
    ("--mod.capacity=lots", "expected a number"),
    ("--mod.capacity=true", "expected a number"),
    ("--data.split=[1, 2]", "expected a string"),
    ("--trainiters=5", "--section.key=value"),
    ("--train.iters", "--section.key=value"),
])
def test_badly_typed_or_formed_overrides(override, needle):
    assert needle in _error(load_config, None, [override])


def test_unknown_key_names_it_and_lists_allowed_keys(tmp_path):
    msg = _error(load_config, None, ["--mod.capcity=0.5"])
    assert "mod.capcity" in msg
    for key in ("capacity", "enabled", "every", "first_routed", "router_weight", "router_init_std"):
        assert key in msg
    msg = _error(load_config, _write(tmp_path, "train:\n  itres: 5\n"))
    assert "train.itres" in msg and "iters" in msg and "run.yaml" in msg


def test_unknown_section_lists_sections(tmp_path):
    msg = _error(load_config, None, ["--modd.capacity=0.5"])
    assert "'modd'" in msg and "mod" in msg and "model" in msg and "parallel" in msg
    msg = _error(load_config, _write(tmp_path, "trainer:\n  iters: 5\n"))
    assert "'trainer'" in msg and "train" in msg


@pytest.mark.parametrize("capacity", ["0", "-0.1", "1.5"])
def test_capacity_out_of_range(capacity):
    assert "mod.capacity" in _error(load_config, None, [f"--mod.capacity={capacity}"])


def test_capacity_one_is_allowed():
    assert load_config(None, ["--mod.capacity=1.0"]).mod.capacity == 1.0


@pytest.mark.parametrize("overrides,needle", [
    (["--model.hidden_size=100", "--model.num_attention_heads=3"], "must divide model.hidden_size"),
    (["--model.num_query_groups=3"], "num_query_groups"),
    (["--parallel.sp=true"], "parallel.sp"),
    (["--parallel.tp=3"], "parallel.tp=3"),
    (["--mod.first_routed=4"], "mod.first_routed"),
    (["--mod.every=0"], "mod.every"),
    (["--mod.router_weight=relu"], "mod.router_weight"),
    (["--model.attention_backend=flash"], "attention_backend"),
    (["--model.num_layers=4", "--parallel.pp=2", "--parallel.vpp=3"], "pp*vpp=6"),
    (["--parallel.pp=2", "--parallel.vpp=1"], "parallel.vpp=1"),
    (["--train.global_batch_size=12"], "global_batch_size"),
    (["--parallel.bucket_size=0"], "parallel.bucket_size must be a positive number"),
    (["--parallel.overlap_param_gather=true"], "needs --train.distributed_optimizer=true"),
    (["--logging.profile_steps=[5,2]"], "logging.profile_steps must be [first, last]"),
    (["--logging.profile_steps=[0,2]"], "1 <= first <= last"),
    (["--logging.profile_steps=7"], "--logging.profile_steps=[20,22]"),
    (["--logging.profile_ranks=0"], "logging.profile_ranks must be a list"),
])
def test_inconsistent_values(overrides, needle):
    assert needle in _error(load_config, None, overrides)


def test_sequence_parallel_with_tensor_parallel_is_fine():
    cfg = load_config(None, ["--parallel.sp=true", "--parallel.tp=2"])
    assert cfg.parallel.sp and padded_vocab(cfg.model, 2) % 256 == 0 and padded_vocab(cfg.model, 2) >= 4096


def test_bad_yaml_is_one_line_with_its_line_number(tmp_path):
    path = _write(tmp_path, "model:\n  hidden_size: 64\n   num_layers: 2\n")
    msg = _error(load_config, path)
    assert path in msg and "line 3" in msg and "YAML" in msg
    assert "line 4" in _error(load_config, _write(tmp_path, "model:\n  hidden_size: 64\nmod: [1, 2\n"))


def test_yaml_of_the_wrong_shape(tmp_path):
    assert "mapping" in _error(load_config, _write(tmp_path, "- 1\n- 2\n"))
    assert "'model'" in _error(load_config, _write(tmp_path, "model: 5\n"))
    assert "not found" in _error(load_config, str(tmp_path / "missing.yaml"))


def test_world_size_validation():
    cfg = load_config(None, ["--parallel.tp=2"])
    msg = _error(validate, cfg, world_size=3)
    assert "world size 3" in msg and "tp*pp=2" in msg
    validate(cfg, world_size=2)
    assert "micro_batch_size*dp=16" in _error(validate, cfg, world_size=4)  # dp=2, mbs 8, gbs 8
    cfg = load_config(None, ["--train.micro_batch_size=4", "--train.global_batch_size=8"])
    validate(cfg, world_size=2)  # dp=2, 8 = 4*2
    assert "micro_batch_size*dp=12" in _error(validate, cfg, world_size=3)
    validate(cfg)  # no world size: layout not checked


# ----------------------------------------------------------------------------- moe section (docs/mode.md)

MOE = ["--moe.num_experts=4"]


@pytest.mark.parametrize("overrides,needle", [
    (["--moe.ep=2"], "moe.ep and moe.noop_experts need moe.num_experts"),
    (MOE + ["--moe.ep=3"], "moe.ep=3 must divide moe.num_experts=4"),
    (MOE + ["--moe.topk=7"], "moe.topk=7"),
    (MOE + ["--moe.noop_experts=1"], "moe.noop_target must be in (0, 1)"),
    (MOE + ["--moe.noop_target=0.5"], "moe.noop_target needs moe.noop_experts"),
    (MOE + ["--moe.expert_bias=true"], "moe.score_function=sigmoid"),
    (MOE + ["--moe.capacity_factor=0"], "moe.capacity_factor"),
    (MOE + ["--moe.pad_to_capacity=true"], "moe.pad_to_capacity=true needs moe.capacity_factor"),
    (MOE + ["--moe.first=4"], "moe.first"),
    (MOE + ["--parallel.tp=2"], "needs parallel.sp=true"),
    (MOE + ["--train.engine=deepspeed"], "train.engine=megatron"),
])
def test_moe_values(overrides, needle):
    assert needle in _error(load_config, None, overrides)


def test_moe_layers_and_expert_parallel_layout():
    from mod_megatron.config import is_moe_layer

    cfg = load_config(None, MOE + ["--moe.every=2", "--moe.first=1", "--moe.noop_experts=2", "--moe.noop_target=0.5",
                                   "--moe.topk=6", "--moe.ep=4", "--train.micro_batch_size=2"])
    assert [is_moe_layer(cfg, i) for i in range(4)] == [False, True, False, True]
    assert not any(is_moe_layer(load_config(), i) for i in range(4))  # default: dense MLPs
    validate(cfg, world_size=4)  # ep=4 from dp=4
    msg = _error(validate, cfg, world_size=2)
    assert "moe.ep=4 must divide tp*dp=2" in msg
    cfg = load_config(None, MOE + ["--moe.ep=4", "--parallel.tp=2", "--parallel.sp=true", "--parallel.pp=2",
                                   "--train.global_batch_size=16", "--train.micro_batch_size=4"])
    validate(cfg, world_size=8)  # tp*dp = 2*2: experts over TP x DP ranks
    assert "tp*dp=2" in _error(validate, cfg, world_size=4)


def test_causal_routing_defaults_and_overrides():
    mod = load_config(None).mod
    assert mod.aux_loss and mod.aux_loss_weight == 0.01 and mod.predictor and mod.capacity_warmup_iters == 0
    mod = load_config(None, ["--mod.aux_loss=false", "--mod.predictor=off", "--mod.capacity_warmup_iters=100",
                             "--mod.predictor_loss_weight=0.5"]).mod
    assert not mod.aux_loss and not mod.predictor and mod.capacity_warmup_iters == 100
    assert mod.predictor_loss_weight == 0.5


@pytest.mark.parametrize("override, needle", [
    ("--mod.aux_loss_weight=-0.1", "mod.aux_loss_weight must be >= 0"),
    ("--mod.predictor_loss_weight=-1", "mod.predictor_loss_weight must be >= 0"),
    ("--mod.capacity_warmup_iters=-5", "mod.capacity_warmup_iters must be >= 0"),
    ("--mod.capacity_warmup_iters=1.5", "expected an integer"),
])
def test_causal_routing_bad_values(override, needle):
    assert needle in _error(load_config, None, [override])


def test_reliability_defaults_and_overrides(tmp_path):
    cfg = load_config(None)
    assert cfg.train.nan_policy == "skip" and cfg.train.max_skipped_steps == 10
    assert cfg.train.dist_timeout_minutes == 10.0 and cfg.checkpoint.verify is True
    cfg = load_config(None, ["--train.nan_policy=stop", "--train.max_skipped_steps=0",
                             "--train.dist_timeout_minutes=0.5", "--checkpoint.verify=false"])
    assert (cfg.train.nan_policy, cfg.train.max_skipped_steps, cfg.train.dist_timeout_minutes) == ("stop", 0, 0.5)
    assert cfg.checkpoint.verify is False


@pytest.mark.parametrize("override, needle", [
    ("--train.nan_policy=ignore", "train.nan_policy must be skip or stop"),
    ("--train.max_skipped_steps=-1", "train.max_skipped_steps must be >= 0"),
    ("--train.dist_timeout_minutes=0", "train.dist_timeout_minutes must be > 0"),
    ("--checkpoint.verify=maybe", "expected true/false"),
])
def test_reliability_bad_values(override, needle):
    assert needle in _error(load_config, None, [override])


def test_unreadable_config_file_is_one_line(tmp_path):
    assert "cannot read config file" in _error(load_config, str(tmp_path))  # a directory
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x80" * 4)
    assert "is not a text (UTF-8) YAML file" in _error(load_config, str(path))


# ----------------------------------------------------------------------------- the shipped configs

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
SHIPPED = sorted(os.path.join(REPO_CONFIGS, f) for f in os.listdir(REPO_CONFIGS) if f.endswith(".yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.basename(p) for p in SHIPPED])
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path, [])
    assert cfg.model.num_layers > 0 and cfg.train.global_batch_size % cfg.train.micro_batch_size == 0
