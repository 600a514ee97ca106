"""The learner's FLOP count (against torch's FLOP counter on a real Qwen3 forward/backward), MFU, memory
metrics and the torch.profiler window."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_s2l.config import ConfigError, LoggingConfig, load_config
from megatron_s2l.metrics import perf
from megatron_s2l.metrics.profiler import StepProfiler, phase_range
from megatron_s2l.model import specs
from megatron_s2l.train.batch import TrainBatch

QWEN3 = {"model_type": "qwen3", "num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 384,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512,
         "tie_word_embeddings": True, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1e6}


def _batch(prompt_and_response: list[tuple[int, int]]) -> TrainBatch:
    width = max(p + r for p, r in prompt_and_response)
    mask = torch.zeros(len(prompt_and_response), width, dtype=torch.bool)
    for row, (prompt, response) in enumerate(prompt_and_response):
        mask[row, prompt:prompt + response] = True
    rows = len(prompt_and_response)
    return TrainBatch(tokens=torch.randint(0, QWEN3["vocab_size"], (rows, width)), response_mask=mask,
                      advantages=torch.ones(rows), source=torch.ones(rows, dtype=torch.long),
                      behaviour_logprobs=torch.zeros(rows, width))


@pytest.mark.parametrize("reference", [False, True])
def test_update_flops_match_torchs_flop_counter_on_a_real_qwen3(reference):
    """Run what the learner runs, on a transformers Qwen3 (eager attention: the full score square), under
    FlopCounterMode: a forward + backward and one (two with KL) forward-only pass per sequence, the
    output layer applied to response positions only."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**QWEN3), attn_implementation="eager")
    batch = _batch([(5, 11), (3, 30), (7, 2)])
    counter = FlopCounterMode(display=False)
    with counter:
        for row in range(batch.num_sequences):
            length = int(batch.lengths()[row])
            tokens, response = batch.tokens[row:row + 1, :length], batch.response_mask[row, :length]
            positions = response.roll(-1).nonzero().squeeze(1)  # hidden state t predicts token t + 1

            def logits(model=model, tokens=tokens, positions=positions):
                return model.lm_head(model.model(tokens).last_hidden_state[0, positions])

            logits().sum().backward()
            with torch.no_grad():
                for _ in range(1 + reference):
                    logits()
    args = specs.model_args_from_hf(QWEN3)
    # the only difference: norm weights count as parameters in our formula (6 FLOPs each per token)
    flops = perf.update_flops(args, batch.lengths(), batch.num_response_tokens, reference)
    assert flops == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_throughput_and_mfu_against_the_devices_peak(monkeypatch):
    assert perf.throughput_metrics(4e12, 2.0, torch.device("cpu")) == {"perf/tflops_per_gpu": 2.0}  # no peak
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                       ("NVIDIA GeForce RTX 4090", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert perf.peak_tflops(torch.device("cuda")) == peak, name
    metrics = perf.throughput_metrics(989e12, 2.0, torch.device("cuda"))  # now an "RTX 4090": no MFU
    assert metrics == {"perf/tflops_per_gpu": pytest.approx(494.5)}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert perf.throughput_metrics(989e12, 2.0, torch.device("cuda"))["perf/mfu"] == pytest.approx(0.5)


def test_host_memory_peak_covers_each_step_alone():
    """A 1 GiB tensor alive during one step shows in that step's host peak and not in a later one's."""
    cpu = torch.device("cpu")
    perf.memory_metrics(cpu)  # the peak so far is reset
    x = torch.ones(2 ** 28)
    with_tensor = perf.memory_metrics(cpu)  # (resets to the current size, the tensor still alive)
    del x
    perf.memory_metrics(cpu)
    after = perf.memory_metrics(cpu)
    assert set(after) == {"memory/host_peak_gib"}  # no device memory on a CPU
    assert with_tensor["memory/host_peak_gib"] - after["memory/host_peak_gib"] >= 0.9


def _run_steps(cfg: LoggingConfig, rank: int, steps: range, stop_after: int | None = None) -> None:
    profiler = StepProfiler(cfg, rank)
    x = torch.randn(64, 64)
    for step in steps:
        profiler.step_begins(step)
        with phase_range("train"):
            x = torch.tanh(x @ x)
        profiler.step_ends(step)
        if step == stop_after:
            break
    profiler.close()


def test_profiler_records_exactly_the_window_on_the_chosen_ranks(tmp_path):
    cfg = LoggingConfig(run_dir=str(tmp_path), profile_steps=[2, 3], profile_ranks=[0])
    _run_steps(cfg, rank=0, steps=range(1, 6))
    _run_steps(cfg, rank=1, steps=range(1, 6))  # not a profiled rank
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["rank0_steps2-3.json",
                                                                        "rank0_steps2-3_top_ops.txt"]
    events = json.loads((tmp_path / "profile" / "rank0_steps2-3.json").read_text())["traceEvents"]
    assert sum(e.get("name") == "s2l/train" for e in events) == 2  # steps 2 and 3, not 1, 4 or 5
    assert "aten::mm" in (tmp_path / "profile" / "rank0_steps2-3_top_ops.txt").read_text()


def test_a_run_that_stops_inside_the_window_still_writes_its_profile(tmp_path):
    cfg = LoggingConfig(run_dir=str(tmp_path), profile_steps=[2, 5])
    _run_steps(cfg, rank=0, steps=range(1, 6), stop_after=3)
    events = json.loads((tmp_path / "profile" / "rank0_steps2-stop.json").read_text())["traceEvents"]
    assert sum(e.get("name") == "s2l/train" for e in events) == 2


@pytest.mark.parametrize("window, error", [("[3]", "[first, last]"), ("[4,3]", "[first, last]"),
                                           ("[0,2]", "[first, last]"), ("[3,9]", "end by the last step (8)")])
def test_bad_profile_windows_are_named(window, error):
    with pytest.raises(ConfigError, match=r"logging\.profile_steps") as info:
        load_config(None, ["steps=8", "explorer.mode=off", f"logging.profile_steps={window}"])
    assert error in str(info.value)
