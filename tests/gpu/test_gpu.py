"""GPU checks (marked `gpu`, skipped without CUDA): Transformer Engine spec, FP8, the Triton log-prob
kernels, CUDA-IPC weight sync into a real SGLang server, an aborted NCCL weight broadcast (two GPUs), and the
single-GPU tiny config end to end.

Run on a GPU machine: `pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import sys
import time

import pytest
import torch

from megatron_s2l.config import ModelConfig, ParallelConfig
from tests.unit.test_logprobs import assert_close_relative, make_case, reference
from tests.utils import make_tiny_model

pytestmark = pytest.mark.gpu


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    # dimensions that FP8 GEMMs accept (multiples of 16)
    return make_tiny_model(tmp_path_factory.mktemp("gpu_model"), num_hidden_layers=2, hidden_size=256,
                           intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def _model(model_dir, impl: str, megatron_checkpoint=None):
    """The GPTModel of an HF directory, its weights from there or from a Megatron checkpoint."""
    from megatron_s2l.model import checkpoint_io, convert, specs

    ckpt = checkpoint_io.HFCheckpoint(model_dir)
    args = specs.model_args_from_hf(ckpt.hf_config)
    model = specs.build_gpt_model(args, ModelConfig(dtype="bfloat16", transformer_impl=impl), ParallelConfig())
    if megatron_checkpoint is None:
        convert.load_hf_weights(model, ckpt.get, args)
    else:
        checkpoint_io.load_megatron_checkpoint(model, megatron_checkpoint, ckpt.hf_config)
    return model.eval(), args


def _logits(model_and_args) -> torch.Tensor:
    model, args = model_and_args
    ids = torch.randint(0, 1000, (2, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    positions = torch.arange(32, device="cuda").expand(2, 32)
    with torch.no_grad():
        return model(ids, positions, None)[..., : args.vocab_size].float()


@pytest.mark.skipif(not _have("transformer_engine"), reason="needs transformer-engine (the NGC container)")
def test_te_spec_logits_match_local_spec(mcore_world1, gpu_model):
    te, local = _logits(_model(gpu_model, "transformer_engine")), _logits(_model(gpu_model, "local"))
    assert (te - local).abs().max().item() < 0.05 * local.abs().max().item()  # bf16 kernels differ in rounding
    assert (te.argmax(-1) == local.argmax(-1)).float().mean() > 0.95


@pytest.mark.skipif(not _have("transformer_engine"), reason="needs transformer-engine (the NGC container)")
def test_checkpoint_written_with_local_layers_loads_into_te_layers(mcore_world1, gpu_model, tmp_path):
    """`s2l convert` on a CPU machine writes local-spec checkpoints; TE attention has extra state they lack."""
    from megatron_s2l.model import checkpoint_io

    local, _ = _model(gpu_model, "local")
    checkpoint_io.save_megatron_checkpoint(local, tmp_path / "mcore", checkpoint_io.HFCheckpoint(gpu_model).hf_config)
    loaded = _logits(_model(gpu_model, "transformer_engine", megatron_checkpoint=tmp_path / "mcore"))
    assert torch.equal(loaded, _logits(_model(gpu_model, "transformer_engine")))


def test_fused_attention_matches_megatron_core_in_bf16(mcore_world1):
    """The local spec's SDPA attention (flash kernels here) against megatron-core's explicit-scores one."""
    from tests.unit.test_attention import _inputs, _pair

    reference, fused = _pair(heads=16, groups=8, dtype="bfloat16")
    query, key, value = (t.detach().to("cuda", torch.bfloat16) for t in _inputs(16, 8, seq=512, batch=2))
    expected = reference.cuda()(query, key, value, attention_mask=None).float()
    actual = fused.cuda()(query, key, value, attention_mask=None).float()
    assert (actual - expected).abs().max() <= 2e-2 * expected.abs().max()


def _train_and_measure(model_dir, **overrides) -> dict:
    """Log-probs of a fixed batch before and after three updates, and the updates' gradient norms."""
    from megatron_s2l.train.learner import build_learner
    from tests.learner_fixtures import fixed_batch, learner_config

    cfg = learner_config(**{"model.dtype": "bfloat16", "model.transformer_impl": "transformer_engine",
                            "optimizer.lr": 1e-3, "parallel.micro_batch_size": 4, **overrides})
    learner = build_learner(cfg, str(model_dir))

    def logprobs(batch):
        plan = learner.plan(batch)
        learner.compute_logprobs(plan)
        return plan, torch.cat([m.batch.old_logprobs[m.batch.response_mask] for mini in plan for m in mini])

    probe = fixed_batch(seq_len=32, seed=100)
    _, before = logprobs(probe)
    grad_norms = []
    for seed in range(3):
        plan, _ = logprobs(fixed_batch(seq_len=32, seed=seed))
        learner.compute_logprobs(plan, reference=True)
        metrics = learner.train_step(plan)
        assert metrics["train/skipped_updates"] == 0
        grad_norms.append(metrics["train/grad_norm"])
    _, after = logprobs(probe)
    return {"before": before.float().cpu(), "change": (after - before).float().cpu(), "grad_norms": grad_norms}


@pytest.mark.skipif(not _have("transformer_engine"), reason="needs transformer-engine (the NGC container)")
def test_fp8_train_steps_track_bf16(mcore_world1, tmp_path):
    # large initial weights: log-probs far from uniform, so they tell the two runs apart
    model_dir = make_tiny_model(tmp_path / "model", num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=64, initializer_range=0.2)
    bf16 = _train_and_measure(model_dir)
    fp8 = _train_and_measure(model_dir, **{"model.fp8.recipe": "delayed"})
    forward_gap = (fp8["before"] - bf16["before"]).abs()
    assert forward_gap.max() > 0, "FP8 gave bit-identical log-probs: it is not in effect"
    assert forward_gap.mean() < 0.25 * bf16["before"].std(), forward_gap.mean()
    for norm_fp8, norm_bf16 in zip(fp8["grad_norms"], bf16["grad_norms"]):
        assert abs(norm_fp8 - norm_bf16) <= 0.25 * norm_bf16, (fp8["grad_norms"], bf16["grad_norms"])
    # the three updates move the log-probs the same way
    assert torch.nn.functional.cosine_similarity(fp8["change"], bf16["change"], dim=0) > 0.7


@pytest.mark.skipif(not _have("triton"), reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_logprobs_match_fp64(dtype):
    from megatron_s2l.algo.logprobs import vocab_parallel_logprobs

    case = make_case(tokens=1000, hidden=256, vocab=4999, padded=5120, temperature=0.8)
    case = dict(case, hidden=case["hidden"].to(dtype).double(), weight=case["weight"].to(dtype).double())
    expected = reference(case)  # fp64 from the same (rounded) inputs: what is left is the kernels' own error
    # fp32: IEEE everywhere, unless cuBLAS is allowed TF32 (e.g. NGC's TORCH_ALLOW_TF32_CUBLAS_OVERRIDE).
    # bf16: the triton kernels keep fp32 logits and round d loss / d logits to bf16; the torch path also
    # rounds the logits themselves to bf16.
    fp32_tolerance = 5e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-4
    tolerance = {"triton": fp32_tolerance, "torch": fp32_tolerance} if dtype == torch.float32 \
        else {"triton": 3e-2, "torch": 8e-2}
    for impl in ("triton", "torch"):
        hidden = case["hidden"].to("cuda", dtype).requires_grad_()
        weight = case["weight"].to("cuda", dtype).requires_grad_()
        logprobs, entropy = vocab_parallel_logprobs(hidden, weight, case["targets"].cuda(), temperature=0.8,
                                                    vocab_size=case["vocab_size"], impl=impl, chunk_size=384)
        (logprobs * case["g_logprobs"].cuda().float() + entropy * case["g_entropy"].cuda().float()).sum().backward()
        for actual, name in zip((logprobs, entropy, hidden.grad, weight.grad),
                                ("logprobs", "entropy", "grad_hidden", "grad_weight")):
            assert_close_relative(actual.cpu(), expected[name], rel=tolerance[impl])


@pytest.mark.skipif(not _have("sglang"), reason="needs SGLang on this GPU machine")
def test_cuda_ipc_tensor_sync_into_sglang(tmp_path):
    import asyncio

    from transformers import AutoModelForCausalLM

    from megatron_s2l.rollout.sglang import SGLangEngine
    from megatron_s2l.rollout.sglang_launch import launch_server
    from megatron_s2l.rollout.types import SamplingParams

    old = make_tiny_model(tmp_path / "old", num_hidden_layers=2, seed=1, initializer_range=0.5)
    new = make_tiny_model(tmp_path / "new", num_hidden_layers=2, seed=2, initializer_range=0.5)
    prompt = [[9707, 11, 1879, 0]]
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    loop = asyncio.new_event_loop()
    with launch_server(old, device="cuda", dtype="bfloat16", python=sys.executable, mem_fraction_static=0.3) as server:
        engine = SGLangEngine(server.url, update_mode="tensor")
        tensors = [(k, v.to("cuda", torch.bfloat16)) for k, v in
                   AutoModelForCausalLM.from_pretrained(new).state_dict().items()]
        loop.run_until_complete(engine.update_weights(tensors, "v2"))
        out = loop.run_until_complete(engine.generate(prompt, 1, greedy))[0][0]
        assert loop.run_until_complete(engine.weight_version()) == "v2"
    reference_model = AutoModelForCausalLM.from_pretrained(new, dtype=torch.bfloat16).cuda()
    expected = reference_model.generate(torch.tensor(prompt).cuda(), max_new_tokens=8, do_sample=False)
    assert out.response_ids == expected[0, 4:].tolist()


SILENT_SERVER_RANK = """
# rank 1 of a weight-update group, as an SGLang server joins one: receives one tensor, then goes quiet
import datetime, sys, time, torch, torch.distributed as dist
port, name = int(sys.argv[1]), sys.argv[2]
torch.cuda.set_device(1)
timeout = datetime.timedelta(seconds=120)
store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timeout)
scoped = dist.PrefixStore("cuda/", dist.PrefixStore(name + "/", dist.PrefixStore(name, store)))
options = dist.ProcessGroupNCCL.Options()
options._timeout = timeout
group = dist.ProcessGroupNCCL(scoped, 1, 2, options)
tensor = torch.empty(4, device="cuda:1")
broadcast = dist.BroadcastOptions()
broadcast.rootRank, broadcast.rootTensor = 0, 0
group.broadcast([tensor], broadcast).wait()
print("received", tensor.tolist(), flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: NCCL refuses two ranks on one device")
def test_a_broadcast_that_a_server_never_joins_leaves_the_trainers_stream_free_and_aborts(tmp_path):
    import subprocess
    import threading

    from megatron_s2l.rollout.weight_broadcast import BroadcastGroup
    from tests.utils import free_port

    port, name = free_port(), "s2l-weights-test"
    server = subprocess.Popen([sys.executable, "-c", SILENT_SERVER_RANK, str(port), name], stdout=subprocess.PIPE,
                              text=True)
    try:
        torch.cuda.set_device(0)
        group = BroadcastGroup.create(name, "nccl", port, 2, timeout_s=120)
        group.broadcast([torch.arange(4.0, device="cuda:0")])
        assert server.stdout.readline().strip() == "received [0.0, 1.0, 2.0, 3.0]"
        pending = threading.Thread(target=group.broadcast, args=([torch.ones(4, device="cuda:0")],), daemon=True)
        pending.start()
        time.sleep(1)
        computed = threading.Event()  # the trainer's next kernels run on the default stream meanwhile

        def compute():
            (torch.ones(8, device="cuda:0") * 2).sum().item()  # .item() waits for the default stream only
            computed.set()

        threading.Thread(target=compute, daemon=True).start()
        assert computed.wait(10), "the default stream waits for the broadcast the server never joined"
        group.abort()
        pending.join(30)
        assert not pending.is_alive(), "the broadcast outlived abort()"
    finally:
        server.kill()
        server.wait()


def test_tiny_1gpu_config_end_to_end(tmp_path):
    from megatron_s2l.toy import make_toy_world
    from tests.utils import read_rows, run_s2l

    world = make_toy_world(tmp_path / "models", explorer_steps=300, learner_steps=100, num_train=64, num_test=16)
    overrides = [f"model.path={world['learner']}", f"data.path={world['train']}", f"eval.path={world['test']}",
                 f"explorer.model_path={world['explorer']}", f"explorer.pool_path={tmp_path / 'pool'}",
                 "steps=3", "schedule.t_mix=2", f"logging.run_dir={tmp_path / 'run'}"]
    run_s2l(["pool", "build", "--config", "examples/configs/tiny_1gpu.yaml", *overrides])
    run_s2l(["train", "--config", "examples/configs/tiny_1gpu.yaml", *overrides])
    rows = read_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["train/skipped_updates"] == 0 for r in rows)
    assert all(0 < r["memory/device_peak_gib"] < 80 and r["perf/tflops_per_gpu"] > 0 for r in rows)
