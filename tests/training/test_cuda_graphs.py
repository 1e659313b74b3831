"""train.cuda_graphs (training/cuda_graphs.py): refusals with the fix, the eager pass-through, and on a
GPU the graphed layers equal the eager ones (outputs, input and parameter grads, MoD diagnostics) and a
training run with graphs follows the run without them step by step.

The GPU tests are skipped without CUDA (CI); they ran on the device with `pytest tests/training/test_cuda_graphs.py`.
"""
from __future__ import annotations


import pytest
import torch

from benchmarks.bench_block import rotary
from mod_megatron.config import ConfigError, load_config
from tests.conftest import TINY, dense_and_mod_layers, layer_stack_step, tiny_trainer_runs

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.mark.parametrize("overrides,needle", [
    (["--parallel.pp=2"], "parallel.pp=1"),
    (["--parallel.tp=2"], "parallel.tp=1"),
    (["--moe.num_experts=4"], "MoE"),
    (["--mod.capacity_warmup_iters=10"], "capacity_warmup_iters=0"),
    (["--model.dropout=0.1"], "model.dropout=0"),
    (["--train.engine=deepspeed"], "train.engine=megatron"),
    (["--train.distributed_optimizer=true", "--parallel.overlap_param_gather=true"], "overlap_param_gather=false"),
], ids=["pp", "tp", "moe", "capacity-warmup", "dropout", "deepspeed", "overlap-param-gather"])
def test_unsupported_settings_are_refused_with_the_fix(overrides, needle):
    with pytest.raises(ConfigError, match="train.cuda_graphs") as err:
        load_config(None, TINY + ["--train.cuda_graphs=true", *overrides])
    assert needle in str(err.value) and "\n" not in str(err.value)
    load_config(None, TINY + overrides)  # the same settings are fine without graphs


def test_on_a_cpu_it_is_refused_before_training():
    from mod_megatron.training.cuda_graphs import check_supported

    cfg = load_config(None, TINY + ["--train.cuda_graphs=true"])
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        check_supported(cfg, torch.device("cpu"))


def test_data_parallel_launches_are_refused_with_the_fix():
    """Graphs with DP > 1 trained correctly but 2.3x slower than eager (docs/parallel.md): refused at
    validation when the world size is known, and by the trainer, one line with the fix."""
    from mod_megatron.config import validate
    from mod_megatron.training.cuda_graphs import check_supported

    batch = ["--train.micro_batch_size=1", "--train.global_batch_size=4"]
    cfg = load_config(None, TINY + batch + ["--train.cuda_graphs=true"])
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match="data-parallel size 4.*--train.cuda_graphs=false"):
        validate(cfg, world_size=4)
    with pytest.raises(ConfigError, match="data-parallel size 2.*--train.cuda_graphs=false"):
        check_supported(cfg, torch.device("cuda"), dp=2)
    validate(load_config(None, TINY + batch), world_size=4)  # without graphs the same launch is fine


def test_the_data_parallel_refusal_can_be_lifted_to_measure_it(monkeypatch):
    from mod_megatron.config import validate
    from mod_megatron.training.cuda_graphs import ALLOW_DP_ENV

    monkeypatch.setenv(ALLOW_DP_ENV, "1")
    validate(load_config(None, TINY + ["--train.micro_batch_size=1", "--train.global_batch_size=4",
                                       "--train.cuda_graphs=true"]), world_size=4)


@pytest.mark.parametrize("write_first", [True, False], ids=["write-first", "add-only"])
def test_a_micro_batch_replays_the_write_chain_only_after_zero_grad_buffer(megatron_single_rank, write_first):
    """The choice alone (no capture, so on a CPU too): WRITE while every weight whose GEMM takes its gradient
    still has DDP's `grad_added_to_main_grad` as zero_grad_buffer leaves it (False), and only where the
    chunk asks for it; ADD once any of them is set, or with no such weight (model.fused_wgrad=false)."""
    from mod_megatron.training.cuda_graphs import ChunkGraphs
    from mod_megatron.model.wgrad import ADD, WRITE

    def ddp_like(*overrides):
        layers = dense_and_mod_layers("--model.fused_layer=on", *overrides, dtype=torch.float32, device="cpu")
        for p in (p for layer in layers for p in layer.parameters()):
            p.main_grad = torch.zeros(p.shape)
            p.grad_added_to_main_grad = False
        return layers

    graphs = ChunkGraphs(ddp_like(), write_first=write_first)
    assert graphs._variant() == (WRITE if write_first else ADD)
    linear = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
    want = [p for layer in graphs.layers for n, p in layer.named_parameters() if n.endswith(linear)]
    assert {id(p) for p in graphs.fused} == {id(p) for p in want} and len(graphs.fused) == len(want) == 8
    want[5].grad_added_to_main_grad = True  # one gradient went in since the buffer was zeroed
    assert graphs._variant() == ADD
    want[5].grad_added_to_main_grad = False
    assert graphs._variant() == (WRITE if write_first else ADD)
    unfused = ChunkGraphs(ddp_like("--model.fused_wgrad=false"), write_first=write_first)
    assert unfused._variant() == ADD and unfused.fused == []


@pytest.mark.parametrize("global_batch,write_first", [(2, True), (4, False)], ids=["one-micro-batch", "two"])
def test_the_trainer_asks_for_the_write_chain_at_one_micro_batch_per_step(megatron_single_rank, tmp_path,
                                                                          monkeypatch, global_batch, write_first):
    """A second chain costs two [S, B, H] tensors per layer; with several micro-batches per step the trainer
    keeps the one that adds (training/cuda_graphs.py)."""
    import signal

    from mod_megatron.training import cuda_graphs
    from mod_megatron.training.distributed import Layout
    from mod_megatron.training.trainer import Trainer

    asked = {}
    monkeypatch.setattr(cuda_graphs, "check_supported", lambda *args, **kwargs: None)  # a CPU here
    monkeypatch.setattr(cuda_graphs, "enable", lambda chunks, **kwargs: asked.update(kwargs) or [])
    cfg = load_config(None, TINY + ["--checkpoint.load=false", f"--logging.dir={tmp_path}", "--logging.tensorboard=false",
                                    "--logging.progress_bar=false", "--train.cuda_graphs=true",
                                    "--train.micro_batch_size=2", f"--train.global_batch_size={global_batch}"])
    layout = Layout(rank=0, world_size=1, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0, device=torch.device("cpu"))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        trainer = Trainer(cfg, layout, None, None, None)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert trainer.num_microbatches == global_batch // 2 and asked == {"write_first": write_first}


@pytest.mark.skipif(CUDA, reason="CPU tensors only; on a GPU the tests below cover the graphed path")
def test_wrapped_layers_run_eagerly_where_nothing_can_be_graphed(build_gpt):
    """CPU tensors (and evaluation) go down the eager path unchanged: same loss, same grads."""
    from mod_megatron.training.cuda_graphs import enable

    tokens = torch.randint(0, 100, (2, 33), generator=torch.Generator().manual_seed(0))
    results = []
    for graphs in (False, True):
        _, model = build_gpt(seed=0)
        chunk_graphs = enable([model]) if graphs else []
        loss = model(tokens[:, :-1], torch.arange(32).expand(2, 32), None, labels=tokens[:, 1:]).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        if graphs:
            assert len(chunk_graphs) == 1 and len(chunk_graphs[0].layers) == 4
            assert chunk_graphs[0].graphed is None and chunk_graphs[0].replays == 0
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1])


def test_a_failed_capture_is_one_line_with_the_way_out(monkeypatch):
    """Whatever the capture raises becomes a ConfigError (mod-train: `error: ...`, exit 2)."""
    from mod_megatron.training import cuda_graphs

    def refuse(*args, **kwargs):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(cuda_graphs.graph_chain, "capture_chain", refuse)
    monkeypatch.setattr(cuda_graphs, "_ensure_aux_loss_scale", lambda device: None)
    layer = torch.nn.Linear(4, 4)
    layer.forward = lambda hidden_states, **kwargs: (hidden_states, None)
    graphs = cuda_graphs.ChunkGraphs([layer])
    with pytest.raises(ConfigError) as err:
        graphs.capture("write", torch.zeros(2, 1, 4), None)
    msg = str(err.value)
    assert "operation not permitted" in msg and "--train.cuda_graphs=false" in msg and "\n" not in msg
    assert graphs.graphed is None


def test_the_aux_loss_scale_is_one_tensor_the_graphs_can_keep():
    """Before capture the scale becomes a [1] tensor on the layers' device, value kept; after that it stays
    the same object (the schedule copies each new scale into it), which is what the graphs read."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from mod_megatron.model.predictor import set_aux_loss_scale
    from mod_megatron.training.cuda_graphs import _ensure_aux_loss_scale

    saved = MoEAuxLossAutoScaler.main_loss_backward_scale
    try:
        MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(0.25)  # megatron's 0-d default
        _ensure_aux_loss_scale(torch.device("cpu"))
        kept = MoEAuxLossAutoScaler.main_loss_backward_scale
        assert kept.shape == (1,) and float(kept) == 0.25
        _ensure_aux_loss_scale(torch.device("cpu"))
        set_aux_loss_scale(0.5)
        assert MoEAuxLossAutoScaler.main_loss_backward_scale is kept and float(kept) == 0.5
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
        _ensure_aux_loss_scale(torch.device("cpu"))
        assert float(MoEAuxLossAutoScaler.main_loss_backward_scale) == 1.0
    finally:
        MoEAuxLossAutoScaler.main_loss_backward_scale = saved


# ------------------------------------------------------------------ on a GPU


@needs_cuda
def test_graphed_layers_equal_eager_layers(gpu_process):
    from mod_megatron.model.predictor import set_aux_loss_scale
    from mod_megatron.training.cuda_graphs import ChunkGraphs

    set_aux_loss_scale(torch.full((1,), 0.5, device="cuda"))  # as the schedule sets it: 1/num_microbatches
    S, B, H = 256, 2, 256
    eager, graphed = (dense_and_mod_layers("--model.seq_length=256", "--mod.capacity=0.125") for _ in range(2))
    for a, b in zip(eager, graphed):
        b.load_state_dict(a.state_dict())
    graphs = ChunkGraphs(graphed)
    rope, gen = rotary(S, H // 4, "cuda"), torch.Generator(device="cuda").manual_seed(1)
    for step in range(3):  # the first call captures; the others replay on new inputs
        x = torch.randn(S, B, H, device="cuda", dtype=torch.bfloat16, generator=gen)
        cot = torch.randn(S, B, H, device="cuda", generator=gen)
        want, got = layer_stack_step(eager, x, rope, cot), layer_stack_step(graphed, x, rope, cot)
        assert graphs.graphed is not None and graphs.replays == 2 * (step + 1)
        assert graphs.copies == 2 * (step + 1)  # the stack's input and its output gradient; none in between
        assert torch.equal(graphed[1].last_routing.index, eager[1].last_routing.index)
        tol = dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got[0].float(), want[0].float(), **tol)
        torch.testing.assert_close(got[1].float(), want[1].float(), **tol)
        assert set(got[2]) == set(want[2]) and any("router" in n for n in got[2])
        for name in want[2]:
            scale = max(1.0, float(want[2][name].float().abs().max()))
            torch.testing.assert_close(got[2][name].float() / scale, want[2][name].float() / scale, **tol,
                                       msg=lambda m: f"{name}: {m}")
        for key in ("router_bce", "predictor_bce", "router_confusion", "predictor_confusion"):
            torch.testing.assert_close(got[3][key].float(), want[3][key].float(), rtol=1e-2, atol=1e-2)
        if step == 1:  # evaluation in between runs eagerly and must not leave stale diagnostics behind
            for layer in graphed:
                layer.eval()
            with torch.no_grad():
                graphed[1](hidden_states=x[:128], attention_mask=None, rotary_pos_emb=rope[:128])
            assert graphs.replays == 4 and graphed[1].last_routing.index.shape[0] == 16
            for layer in graphed:
                layer.train()


@needs_cuda
@pytest.mark.parametrize("in_gemm", [False, True], ids=["multi-tensor-add", "fused-wgrad"])
def test_graphs_add_parameter_grads_to_main_grad_as_ddp_does(gpu_process, in_gemm):
    """With megatron DDP's fp32 `main_grad` on the parameters, the backward graphs add the gradients there
    (param.grad stays None), summing over micro-batches to what the same graphs hand back through autograd.
    With DDP's `grad_added_to_main_grad` flag too, the four linear weights of each layer get theirs from
    their own GEMMs (model/wgrad.py: fp32 accumulation, so within bf16 rounding of the bf16 gradients). A
    micro-batch that finds the flags as zero_grad_buffer leaves them replays the chain whose GEMMs write
    (NaN left in those main_grads would show one that adds); the ones after it replay the chain that adds."""
    from mod_megatron.model.wgrad import ADD, WRITE, fused_into_main_grad
    from mod_megatron.training.cuda_graphs import ChunkGraphs

    S, B, H = 256, 2, 256
    plain, ddp = (dense_and_mod_layers("--model.seq_length=256", "--mod.capacity=0.125",
                                       f"--model.fused_wgrad={str(in_gemm).lower()}") for _ in range(2))
    for a, b in zip(plain, ddp):
        b.load_state_dict(a.state_dict())
    main = {f"{i}.{n}": p for i, layer in enumerate(ddp) for n, p in layer.named_parameters()}
    for p in main.values():
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device="cuda")
        if in_gemm:
            p.grad_added_to_main_grad = False
    want = {n: torch.zeros_like(p.main_grad) for n, p in main.items()}
    graphs = (ChunkGraphs(plain), ChunkGraphs(ddp))
    rope, gen = rotary(S, H // 4, "cuda"), torch.Generator(device="cuda").manual_seed(2)
    linear = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
    for step in range(5):
        if step == 3:  # a new training step: zero_grad_buffer
            for name, p in main.items():
                p.main_grad.fill_(float("nan") if in_gemm and name.endswith(linear) else 0.0)
                p.grad_added_to_main_grad = False
                want[name].zero_()
        x = torch.randn(S, B, H, device="cuda", dtype=torch.bfloat16, generator=gen)
        cot = torch.randn(S, B, H, device="cuda", generator=gen)
        for name, g in layer_stack_step(plain, x, rope, cot)[2].items():
            want[name] += g.float()
        h = x.detach().clone().requires_grad_(True)
        for layer in ddp:
            h, _ = layer(hidden_states=h, attention_mask=None, rotary_pos_emb=rope)
        (h.float() * cot).sum().backward()
        assert all(p.grad is None for p in main.values())
        assert graphs[1].variant == (WRITE if in_gemm and step in (0, 3) else ADD)
    assert graphs[1].replays == 10 and graphs[1].copies == 10 and graphs[1].writes == 2 * in_gemm
    assert (graphs[1].chains[WRITE] is graphs[1].chains[ADD]) == (not in_gemm)  # one chain if no GEMM writes
    assert {n for n, p in main.items() if fused_into_main_grad(p)} == ({n for n in main if n.endswith(linear)}
                                                                        if in_gemm else set())
    for name, p in main.items():
        fused = fused_into_main_grad(p)
        tol = dict(rtol=2e-2, atol=2e-2 * float(want[name].abs().max())) if fused else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p.main_grad, want[name], **tol, msg=lambda m: f"{name}: {m}")
    assert any("router" in n and float(p.main_grad.abs().sum()) > 0 for n, p in main.items())
    first = next(iter(main.values()))
    first.main_grad = first.main_grad.clone()  # a buffer replaced behind the graph's back is refused
    with pytest.raises(RuntimeError, match="main_grad buffer was replaced"):
        ddp[0](hidden_states=x.detach().clone().requires_grad_(True), attention_mask=None, rotary_pos_emb=rope)


@needs_cuda
def test_training_with_graphs_follows_training_without(tmp_path):
    """bench_model's worker runs the real Trainer (DDP, megatron optimizer, 2 micro-batches per step)."""
    runs = tiny_trainer_runs(tmp_path, {
        **{g: [f"--train.cuda_graphs={g}"] for g in ("false", "true")},
        # the backward graphs mark each layer's parameters ready in DDP's buckets (overlapped reduction,
        # on by default); here in small buckets, and with the reduction after the backward instead
        "true, small buckets": ["--train.cuda_graphs=true", "--parallel.bucket_size=100000"],
        "true, reduction after": ["--train.cuda_graphs=true", "--parallel.overlap_grad_reduce=false"],
        # weight gradients added into main_grad by the GEMMs (model/wgrad.py, the default), eager and graphed,
        # against autograd's gradients added by DDP's hook
        "false, unfused wgrad": ["--train.cuda_graphs=false", "--model.fused_wgrad=false"],
        "true, unfused wgrad": ["--train.cuda_graphs=true", "--model.fused_wgrad=false"]})
    off, on = runs["false"], runs["true"]
    for other in ("true, small buckets", "true, reduction after", "false, unfused wgrad", "true, unfused wgrad"):
        assert runs[other]["losses"] == pytest.approx(on["losses"], abs=2e-2), other
    # two micro-batches per step: the graphs only add (no second chain)
    assert on["cuda_graph_writes"] == 0 and runs["true, unfused wgrad"]["cuda_graph_writes"] == 0
    assert off["cuda_graph_layers"] == 0 and on["cuda_graph_layers"] == 4
    assert on["cuda_graph_replays"] >= 4 * 2 * 7  # every micro-batch after the capturing one replayed
    assert len(on["losses"]) == len(off["losses"]) == 8
    assert on["losses"] == pytest.approx(off["losses"], abs=2e-2)
    assert len(set(on["losses"])) == 8  # the graphed steps really update the weights


@needs_cuda
def test_training_with_graphs_at_one_micro_batch_writes_every_step(tmp_path):
    """One micro-batch per step: each step's graphs write the weight gradients into main_grad (the WRITE
    chain), and train as the eager path does, with fused and with autograd's weight gradients. A test of
    its own (3 trainer runs) so that a device call can run it alone."""
    runs = tiny_trainer_runs(tmp_path, {
        **{f"{g}, one micro-batch": [f"--train.cuda_graphs={g}", "--train.global_batch_size=4"] for g in ("false", "true")},
        "false, one micro-batch, unfused wgrad": ["--train.cuda_graphs=false", "--train.global_batch_size=4",
                                                  "--model.fused_wgrad=false"]})
    one = runs["true, one micro-batch"]
    assert one["cuda_graph_writes"] == 8 and one["cuda_graph_replays"] == 4 * 8
    for other in ("false, one micro-batch", "false, one micro-batch, unfused wgrad"):
        assert runs[other]["losses"] == pytest.approx(one["losses"], abs=2e-2), other
    assert len(set(one["losses"])) == 8


def test_grads_ready_launches_the_overlapped_reduction_as_ddps_hook_does(request):
    """The backward graphs bypass DDP's per-parameter hooks; `ddp_grads_ready` does their bucket
    bookkeeping instead: once every parameter of a bucket group is marked, its async reduction is in
    flight before the step's finish_grad_sync. Without overlap there is nothing to do (None)."""
    from mod_megatron.training.builder import build_model_chunks
    from mod_megatron.training.cuda_graphs import ddp_grads_ready

    request.getfixturevalue("gpu_process" if CUDA else "megatron_single_rank")  # NCCL on a GPU machine
    device = torch.device("cuda" if CUDA else "cpu")

    def build(*overrides):
        cfg = load_config(None, TINY + ["--parallel.bucket_size=4096", *overrides])
        (chunk,), _ = build_model_chunks(cfg, device)
        return cfg, chunk

    assert ddp_grads_ready(build("--parallel.overlap_grad_reduce=false")[1]) is None
    cfg, ddp = build()
    ready = ddp_grads_ready(ddp)
    groups = ddp.bucket_groups
    assert len(groups) > 2
    params = [p for p in ddp.module.parameters() if p.requires_grad]
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length)).to(device)
    positions = torch.arange(cfg.model.seq_length, device=device).expand(2, -1)
    ddp(tokens, positions, None, labels=tokens.roll(-1, 1)).float().sum().backward()  # step 1: eager, hooks
    ddp.finish_grad_sync()  # megatron learns each bucket's parameters on the first step
    ddp.zero_grad_buffer()
    assert all(g.grad_reduce_handle is None for g in groups)
    ready(params[: len(params) // 2])
    launched = sum(g.grad_reduce_handle is not None for g in groups)
    assert 0 < launched < len(groups)  # only the groups whose parameters are all in
    ready(params[len(params) // 2:])
    assert all(g.grad_reduce_handle is not None for g in groups)
    ddp.finish_grad_sync()
    assert all(g.grad_reduce_handle is None for g in groups)
