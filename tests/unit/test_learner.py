"""Learner in one process: plan errors, a non-finite loss skips the update, weights stream out."""

from __future__ import annotations

import pytest
import torch

from megatron_s2l.config import ConfigError
from megatron_s2l.model import convert
from megatron_s2l.train.batch import width_multiple
from megatron_s2l.train.learner import build_learner, split_to
from tests.learner_fixtures import fixed_batch, learner_config


@pytest.fixture(scope="module")
def learner(mcore_world1, tmp_path_factory):
    from tests.utils import make_tiny_model

    hf_dir = make_tiny_model(tmp_path_factory.mktemp("learner"), num_hidden_layers=2, seed=5)
    return build_learner(learner_config(), str(hf_dir))


def _weights(learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in convert.iter_hf_tensors(learner.model, learner.args)}


def test_update_changes_weights_and_reports_metrics(learner):
    before = _weights(learner)
    plan = learner.plan(fixed_batch())
    learner.compute_logprobs(plan)
    learner.compute_logprobs(plan, reference=True)
    metrics = learner.train_step(plan)
    after = _weights(learner)
    assert metrics["train/skipped_updates"] == 0 and metrics["train/grad_norm"] > 0
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for key in ("loss/pg/explorer", "loss/pg/learner", "loss/clip_frac", "loss/entropy", "loss/kl"):
        assert key in metrics


def test_non_finite_loss_skips_the_update(learner, caplog):
    batch = fixed_batch()
    batch.advantages[0] = float("nan")
    before = _weights(learner)
    plan = learner.plan(batch)
    learner.compute_logprobs(plan)
    learner.compute_logprobs(plan, reference=True)
    updates = learner.num_updates
    with caplog.at_level("WARNING"):
        metrics = learner.train_step(plan)
    assert metrics["train/skipped_updates"] == 1 and learner.num_updates == updates
    assert "non-finite gradient norm" in caplog.text
    after = _weights(learner)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_streak_of_non_finite_steps_stops_training(learner, monkeypatch):
    monkeypatch.setattr(learner.cfg.optimizer, "max_nonfinite_steps", 2)
    learner.nonfinite_steps = 0

    def step(nan: bool):
        batch = fixed_batch()
        if nan:
            batch.advantages[0] = float("nan")
        plan = learner.plan(batch)
        learner.compute_logprobs(plan)
        learner.compute_logprobs(plan, reference=True)
        return learner.train_step(plan)

    step(nan=True)
    step(nan=False)  # a good step ends the streak
    step(nan=True)
    with pytest.raises(FloatingPointError, match="2 training steps in a row .*max_nonfinite_steps=2"):
        step(nan=True)


def test_plan_leaves_out_the_last_groups_that_do_not_fit_and_refuses_a_batch_with_none_that_do(learner,
                                                                                                 monkeypatch):
    monkeypatch.setattr(learner.cfg.optimizer, "mini_batches_per_step", 2)  # 2 x micro-batches of 2: 4 rows
    monkeypatch.setattr(learner.cfg.rollout, "group_size", 2)
    plan = learner.plan(fixed_batch(num_sequences=6))  # 3 groups of 2: the first 2 fit
    assert plan.num_groups_trimmed == 1 and [sum(m.batch.num_sequences for m in mini) for mini in plan] == [2, 2]
    with pytest.raises(ValueError, match="groups of 2.*parallel.micro_batch_size=2.*multiple of 4"):
        learner.plan(fixed_batch(num_sequences=2))


def test_length_grouping_deals_every_row_once_balanced_and_trimmed(learner, monkeypatch):
    batch = fixed_batch(num_sequences=16, seq_len=40)
    lengths = dict(zip(batch.advantages.tolist(), batch.lengths().tolist()))  # advantages identify rows
    ranks = []
    for rank in range(2):
        monkeypatch.setattr(learner, "_dp_rank_size", lambda rank=rank: (rank, 2))
        ranks.append([micro.batch for micro in learner.plan(batch)[0]])
    seen = [a for micro_batches in ranks for b in micro_batches for a in b.advantages.tolist()]
    assert sorted(seen) == sorted(lengths)  # every row exactly once
    tokens = [sum(lengths[a] for b in micro_batches for a in b.advantages.tolist()) for micro_batches in ranks]
    assert abs(tokens[0] - tokens[1]) <= max(lengths.values())
    for b in (b for micro_batches in ranks for b in micro_batches):
        width = b.tokens.shape[1]
        assert width % 8 == 0 and max(lengths[a] for a in b.advantages.tolist()) <= width < 40 + 8
    assert min(b.tokens.shape[1] for micro_batches in ranks for b in micro_batches) < 40  # padding was cut


def test_token_budget_fills_micro_batches_longest_first(learner, monkeypatch):
    monkeypatch.setattr(learner.cfg.parallel, "micro_batch_tokens", 48)
    batch = fixed_batch(num_sequences=8, seq_len=40)
    (micro_batches,) = learner.plan(batch)
    widths = [m.batch.tokens.shape[1] for m in micro_batches]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) > 1
    sizes = [m.batch.num_sequences for m in micro_batches]
    assert sum(sizes) == 8 and len(set(sizes)) > 1  # short rows share a micro-batch, long ones do not
    for size, width in zip(sizes, widths):
        assert size * width <= 48 or size == 1


def test_token_budget_micro_batches_are_as_many_as_on_the_busiest_data_parallel_rank(learner, monkeypatch):
    """FP8's amax reductions span the data-parallel group once per forward: every rank must run as many
    micro-batches as the busiest one. Here the other rank (simulated) needs two more per update."""
    from megatron_s2l.train import learner as learner_module

    monkeypatch.setattr(learner.cfg.parallel, "micro_batch_tokens", 48)
    monkeypatch.setattr(learner, "_dp_rank_size", lambda: (0, 2))
    batch = fixed_batch(num_sequences=16, seq_len=40)
    alone = [[m.batch for m in micro_batches] for micro_batches in learner.plan(batch)]
    monkeypatch.setattr(learner_module, "max_over_ranks", lambda counts, group: [c + 2 for c in counts])
    agreed = [[m.batch for m in micro_batches] for micro_batches in learner.plan(batch)]
    assert [len(m) for m in agreed] == [len(m) + 2 for m in alone]
    for before, after in zip(alone, agreed):  # the same rows in the same order, more finely cut
        assert torch.cat([b.advantages for b in after]).tolist() == torch.cat([b.advantages for b in before]).tolist()
        assert all(b.tokens.shape[1] % 8 == 0 and b.num_sequences * b.tokens.shape[1] <= 48 for b in after
                   if b.num_sequences > 1)


def test_split_to_cuts_the_fullest_micro_batch_in_order():
    assert split_to([slice(0, 1), slice(1, 3), slice(3, 8)], 5) == \
        [slice(0, 1), slice(1, 3), slice(3, 5), slice(5, 6), slice(6, 8)]
    assert split_to([slice(0, 2)], 1) == [slice(0, 2)]
    with pytest.raises(ValueError, match="cannot split 2 rows into 3 micro-batches"):
        split_to([slice(0, 1), slice(1, 2)], 3)


def test_logprob_passes_run_with_autograd_under_delayed_fp8_and_give_the_same_detached_values(learner,
                                                                                            monkeypatch):
    """Transformer Engine updates delayed FP8 scales only with autograd on; the pass must still backpropagate
    nothing and return plain tensors. A model's first pass is preceded by a discarded one that calibrates the
    scales. (FP8 itself needs a GPU: here the switch is forced on the CPU model.)"""
    from types import SimpleNamespace

    from megatron_s2l.train import learner as learner_module

    assert learner_module.needs_autograd_for_fp8_scales(SimpleNamespace(fp8="hybrid", fp8_recipe="delayed"))
    assert not learner_module.needs_autograd_for_fp8_scales(SimpleNamespace(fp8="hybrid", fp8_recipe="tensorwise"))
    assert not learner_module.needs_autograd_for_fp8_scales(convert.unwrap(learner.model).config)  # BF16/fp32
    plan = learner.plan(fixed_batch())
    learner.compute_logprobs(plan)
    expected = [m.batch.old_logprobs.clone() for mini in plan for m in mini]
    monkeypatch.setattr(learner_module, "needs_autograd_for_fp8_scales", lambda config: True)
    learner.model.zero_grad_buffer()
    passes = []  # micro-batches per schedule run
    run_schedule = learner._run_schedule
    monkeypatch.setattr(learner, "_run_schedule", lambda model, micro_batches, *args, **kwargs: (
        passes.append(len(micro_batches)), run_schedule(model, micro_batches, *args, **kwargs))[1])
    learner.compute_logprobs(plan)
    actual = [m.batch.old_logprobs for mini in plan for m in mini]
    assert all(not a.requires_grad and torch.equal(a, e) for a, e in zip(actual, expected))
    assert all(p.main_grad.abs().sum() == 0 for p in learner.model.parameters())  # nothing backpropagated
    # the model's first pass runs one micro-batch more, to calibrate the scales; later passes do not
    assert passes == [1] + [len(mini) for mini in plan]
    learner.compute_logprobs(plan)
    assert passes[len(plan) + 1:] == [len(mini) for mini in plan]


def test_token_budget_needs_length_grouping():
    with pytest.raises(ConfigError, match="parallel.micro_batch_tokens.*length_grouping=true"):
        learner_config(**{"parallel.micro_batch_tokens": 64, "parallel.length_grouping": False})


def test_trimmed_cuts_or_pads_to_the_multiple():
    batch = fixed_batch(num_sequences=4, seq_len=40)
    longest = int(batch.lengths().max())
    cut = batch.trimmed(8)
    assert cut.tokens.shape[1] == -(-longest // 8) * 8 <= 40
    padded = batch.trimmed(48)  # e.g. sequence parallelism at TP=6 needs a multiple of 6 x 8
    assert padded.tokens.shape[1] == 48 and padded.response_mask.shape[1] == 48
    assert torch.equal(padded.tokens[:, :40], batch.tokens)
    assert torch.equal(padded.advantages, batch.advantages)
    assert not padded.response_mask[:, 40:].any() and padded.response_mask.sum() == batch.response_mask.sum()


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_width_multiple_is_the_least_width_every_gemm_input_accepts(sequence_parallel, fp8):
    rows_multiple = 16 if fp8 else 8  # per GEMM input: tensor cores, and TE's FP8 check

    def fits(width: int, tp: int) -> bool:
        if not sequence_parallel:
            return width % rows_multiple == 0
        return width % tp == 0 and (width // tp) % rows_multiple == 0  # each TP rank's slice

    for tp in range(1, 9):
        least = next(w for w in range(1, 1024) if fits(w, tp))
        assert width_multiple(tp, sequence_parallel, fp8) == least, (tp, sequence_parallel, fp8)


def test_length_grouping_trains_like_batch_order(mcore_world1, tmp_path):
    from tests.utils import make_tiny_model

    hf_dir = make_tiny_model(tmp_path, num_hidden_layers=2, seed=5)
    runs = {}
    for name, grouping, tokens in (("plain", False, 0), ("grouped", True, 0), ("token_budget", True, 64)):
        learner = build_learner(learner_config(**{"parallel.length_grouping": grouping,
                                                  "parallel.micro_batch_tokens": tokens,
                                                  "optimizer.mini_batches_per_step": 2}), str(hf_dir))
        plan = learner.plan(fixed_batch(num_sequences=8, seq_len=40))
        learner.compute_logprobs(plan)
        learner.compute_logprobs(plan, reference=True)
        shapes = [m.batch.tokens.shape for micro_batches in plan for m in micro_batches]
        runs[name] = learner.train_step(plan), _weights(learner), shapes
    plain, plain_weights, plain_shapes = runs.pop("plain")
    assert {width for _, width in plain_shapes} == {40}
    for name, (metrics, weights, shapes) in runs.items():
        assert sum(rows * width for rows, width in shapes) < 8 * 40, name  # padded positions
        for key in ("loss/total", "train/grad_norm", "loss/pg/explorer", "loss/pg/learner", "loss/entropy",
                    "loss/kl"):
            assert metrics[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), (name, key)
        # Adam's step is ~lr x grad / |grad|, so fp32 rounding in a gradient that is ~0 can move that weight
        # by a few % of lr (1e-3); everywhere else the runs agree to rounding
        diffs = torch.cat([(weights[key] - value).abs().flatten() for key, value in plain_weights.items()])
        assert diffs.max() < 5e-5 and diffs.median() < 1e-7 and (diffs > 1e-6).float().mean() < 1e-3, name
    assert len(runs["token_budget"][2]) != len(runs["grouped"][2])  # the budget changed the micro-batches


def test_full_recompute_trains_the_same_and_keeps_fewer_activations(mcore_world1, tmp_path):
    """parallel.recompute=full: the same loss, gradient norm and weights as without it, while the model's
    forward keeps only each layer's input for the backward."""
    from tests.utils import forward_saved_bytes, make_tiny_model

    hf_dir = make_tiny_model(tmp_path, num_hidden_layers=4, seed=5)
    runs = {}
    for recompute in ("off", "full"):
        learner = build_learner(learner_config(**{"parallel.recompute": recompute}), str(hf_dir))
        plan = learner.plan(fixed_batch(num_sequences=8, seq_len=40))
        learner.compute_logprobs(plan)
        learner.compute_logprobs(plan, reference=True)
        with forward_saved_bytes(convert.unwrap(learner.model)) as saved:
            metrics = learner.train_step(plan)
        runs[recompute] = metrics, _weights(learner), sum(saved.values())
    (off, off_weights, off_bytes), (full, full_weights, full_bytes) = runs["off"], runs["full"]
    for key in ("loss/total", "train/grad_norm", "loss/kl", "loss/entropy"):
        assert full[key] == pytest.approx(off[key], rel=1e-6, abs=1e-9), key
    assert all(torch.allclose(full_weights[k], v, atol=1e-6) for k, v in off_weights.items())
    assert full_bytes < off_bytes / 4, (full_bytes, off_bytes)


@pytest.mark.parametrize("dtype, distributed_optimizer", [("bfloat16", True), ("float32", False)])
def test_memory_budget_matches_the_learners_tensors(mcore_world1, tmp_path, dtype, distributed_optimizer):
    """The startup report (weights, fp32 gradients, Adam state + fp32 master copy in bf16, reference) against
    the bytes the learner's tensors take once an update has created the optimizer state."""
    from megatron_s2l.train.memory_budget import learner_memory_budget
    from tests.learner_fixtures import measured_learner_bytes
    from tests.utils import make_tiny_model

    learner = build_learner(learner_config(**{"model.dtype": dtype,
                                              "parallel.use_distributed_optimizer": distributed_optimizer}),
                            str(make_tiny_model(tmp_path, num_hidden_layers=2, seed=5)))
    plan = learner.plan(fixed_batch())
    learner.compute_logprobs(plan)
    learner.compute_logprobs(plan, reference=True)
    learner.train_step(plan)
    budget, measured = learner_memory_budget(learner), measured_learner_bytes(learner)
    for part, size in measured.items():  # buffers are padded by a few hundred bytes
        assert getattr(budget, part) == pytest.approx(size, rel=1e-3), part
    num_params = budget.gradients / 4  # fp32 gradients
    assert budget.optimizer == (12 if dtype == "bfloat16" else 8) * num_params  # Adam's moments (+ fp32 copy)


def test_memory_report_warns_when_activations_would_not_fit(monkeypatch, caplog):
    """A layout whose fixed memory takes most of the GPU is named at startup, with the fix."""
    import types

    from megatron_s2l.train.memory_budget import report_memory_budget

    model = torch.nn.Linear(1000, 1000, bias=False)  # 1e6 bf16 parameters: 20 MB with everything
    learner = types.SimpleNamespace(cfg=learner_config(**{"model.dtype": "bfloat16",
                                                          "parallel.use_distributed_optimizer": False}),
                                    model=model, ref_model=model, device=torch.device("cuda"))
    for capacity, warns in ((24e6, True), (40e6, False)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, capacity=capacity: types.SimpleNamespace(total_memory=capacity))
        caplog.clear()
        with caplog.at_level("INFO"):
            budget = report_memory_budget(learner)
        assert budget.total == 1e6 * (2 + 4 + 12 + 2)
        assert "learner memory per GPU before activations: 0.02 GiB" in caplog.text
        assert ("raise parallel.tp or parallel.pp" in caplog.text) == warns
