"""LocalEngine: batched decoding equals one-at-a-time and no-cache decoding, seeded sampling, the
log-prob contract, stops, penalties, weight updates, and every member of the RolloutEngine contract."""

from __future__ import annotations

import asyncio
import collections
import math
import shutil

import pytest
import torch

from megatron_s2l.algo.loss import LossInputs, tis_weight
from megatron_s2l.config import AlgorithmConfig
from megatron_s2l.model.convert import tensor_digest
from megatron_s2l.rollout.local import LocalEngine, build_local_engine, sample_tokens
from megatron_s2l.rollout.sglang_client import renormalise_over_kept
from megatron_s2l.rollout.types import RolloutEngine, SamplingParams
from tests.engine_contract import PROTOCOL_MEMBERS, assert_checks_cover_the_protocol, assert_same_parameters

PROMPTS = [[151644, 872, 198, 17, 10, 18], [9707, 11], list(range(300, 330)), [42] * 5]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def engine(tiny_qwen3) -> LocalEngine:
    torch.set_num_threads(1)
    return build_local_engine(tiny_qwen3, max_batch_rows=64)


@torch.no_grad()
def reference_decode(model, prompt: list[int], steps: int, temperature: float = 0.0):
    """Greedy tokens and every step's full logits, recomputing the whole sequence each step (no cache)."""
    ids, tokens, logits = torch.tensor([prompt]), [], []
    for _ in range(steps):
        step_logits = model(input_ids=ids).logits[0, -1].float()
        token = int(step_logits.argmax())
        tokens.append(token)
        logits.append(step_logits)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens, logits


def test_greedy_batch_equals_alone_and_no_cache_reference(engine):
    batch = run(engine.generate(PROMPTS, 2, GREEDY))
    assert [len(group) for group in batch] == [2, 2, 2, 2]
    for prompt, group in zip(PROMPTS, batch):
        alone = run(engine.generate([prompt], 1, GREEDY))[0][0]
        ref_tokens, ref_logits = reference_decode(engine.model, prompt, GREEDY.max_new_tokens)
        for gen in group:
            assert gen.response_ids == alone.response_ids == ref_tokens
            assert gen.finish_reason == "length" and len(gen.response_ids) == 10
            expected = [float(row.log_softmax(-1)[t]) for row, t in zip(ref_logits, ref_tokens)]
            assert gen.logprobs == pytest.approx(expected, abs=1e-4)


def test_rows_finishing_early_leave_the_others_unchanged(engine):
    """Stop tokens end some rows mid-batch (they are dropped from the KV cache); the rest must not move."""
    free = run(engine.generate(PROMPTS, 1, GREEDY))
    stop_at = free[0][0].response_ids[3]  # prompt 0 stops at its 4th token
    params = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=[stop_at])
    stopped = run(engine.generate(PROMPTS, 1, params))
    first = free[0][0].response_ids.index(stop_at)
    assert stopped[0][0].response_ids == free[0][0].response_ids[:first + 1]
    assert stopped[0][0].finish_reason == "stop"
    for i in range(1, len(PROMPTS)):
        gen, ref = stopped[i][0], free[i][0].response_ids
        if stop_at in ref:
            assert gen.response_ids == ref[:ref.index(stop_at) + 1] and gen.finish_reason == "stop"
        else:
            assert gen.response_ids == ref and gen.finish_reason == "length"


def test_eos_of_the_tokenizer_stops(engine, tiny_qwen3):
    assert 151645 in engine.eos_token_ids  # <|im_end|>, the Qwen3 tokenizer's eos_token
    token = run(engine.generate([PROMPTS[1]], 1, GREEDY))[0][0].response_ids[2]
    with_eos = LocalEngine(engine.model, str(tiny_qwen3), {token}, 0)
    gen = run(with_eos.generate([PROMPTS[1]], 1, GREEDY))[0][0]
    assert gen.finish_reason == "stop" and gen.response_ids[-1] == token and len(gen.response_ids) <= 3


def test_sampling_is_seeded_and_independent_of_batch_composition(engine, tiny_qwen3):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    full = run(engine.generate(PROMPTS, 3, params))
    assert run(engine.generate(PROMPTS, 3, params)) == full  # same seed: identical, log-probs included
    reversed_ = run(engine.generate(PROMPTS[::-1], 3, params))[::-1]
    alone = [run(engine.generate([p], 3, params))[0] for p in PROMPTS]
    small_batches = LocalEngine(engine.model, str(tiny_qwen3), engine.eos_token_ids, engine.pad_token_id,
                                max_batch_rows=1)
    def ids(groups):
        return [[g.response_ids for g in group] for group in groups]

    assert ids(reversed_) == ids(full) and ids(alone) == ids(full)
    assert run(small_batches.generate(PROMPTS, 3, params))[2][1].response_ids == full[2][1].response_ids
    other_seed = run(engine.generate(PROMPTS, 3, SamplingParams(**{**params.__dict__, "seed": 8})))
    assert other_seed[0][0].response_ids != full[0][0].response_ids
    samples = [g.response_ids for g in full[0]]
    assert len({tuple(s) for s in samples}) == 3  # the n samples of a prompt differ
    twice = run(engine.generate([PROMPTS[0], PROMPTS[0]], 1, params))
    assert twice[0][0].response_ids == samples[0] and twice[1][0].response_ids != samples[0]


def test_unseeded_calls_differ_but_replay_from_the_engine_seed(engine, tiny_qwen3):
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    a = run(engine.generate([PROMPTS[0]], 1, params))
    b = run(engine.generate([PROMPTS[0]], 1, params))
    assert a != b
    fresh = LocalEngine(engine.model, str(tiny_qwen3), engine.eos_token_ids, engine.pad_token_id, seed=5)
    again = LocalEngine(engine.model, str(tiny_qwen3), engine.eos_token_ids, engine.pad_token_id, seed=5)
    assert run(fresh.generate([PROMPTS[0]], 2, params)) == run(again.generate([PROMPTS[0]], 2, params))


def test_logprobs_are_those_of_the_truncated_distribution_drawn_from(engine):
    params = SamplingParams(max_new_tokens=6, temperature=0.7, top_k=5, seed=3)
    gen = run(engine.generate([PROMPTS[2]], 1, params))[0][0]
    ids = torch.tensor([PROMPTS[2] + gen.response_ids])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0, len(PROMPTS[2]) - 1:-1].float()  # [T, V]
    for t, token in enumerate(gen.response_ids):
        assert token in logits[t].topk(5).indices.tolist()  # top-k was applied to the draw...
        scaled = (logits[t] / 0.7).log_softmax(-1)
        kept = scaled.topk(5).values.logsumexp(-1)
        # ...and the log-prob is renormalised over the 5 kept tokens
        assert gen.logprobs[t] == pytest.approx(float(scaled[token] - kept), abs=1e-4)
        assert gen.logprobs[t] > float(scaled[token]) + 1e-3


def test_top_p_behaviour_logprobs_and_tis_weights_match_a_hand_computation():
    """Probabilities (0.40, 0.35, 0.25) at top_p = 0.5: tokens 0 and 1 are kept (mass before them 0 and 0.40 <
    0.5), token 2 is not (0.75). Kept mass 0.75, so the behaviour log-prob of token 0 is log(0.40 / 0.75) and of
    token 1 log(0.35 / 0.75). A learner with the same distribution has pi_old = 0.40 or 0.35, and the truncated
    importance weight pi_old / pi_behaviour is 0.75 for both, by hand. The engine (LocalEngine) and the SGLang
    path (top log-probs -> renormalise_over_kept) must both give it."""
    probs = torch.tensor([[0.40, 0.35, 0.25]])
    params = SamplingParams(temperature=1.0, top_p=0.5)
    drawn = {}
    for u in torch.linspace(0.0, 0.99, 12):  # the uniform picks the token; every one must come from {0, 1}
        token, logprob = sample_tokens(probs.log(), params, u.reshape(1))
        drawn[int(token)] = float(logprob)
    assert sorted(drawn) == [0, 1]
    assert drawn[0] == pytest.approx(math.log(0.40 / 0.75), abs=1e-6)
    assert drawn[1] == pytest.approx(math.log(0.35 / 0.75), abs=1e-6)

    top = [[[math.log(p), i, None] for i, p in enumerate((0.40, 0.35, 0.25))]] * 2
    via_sglang = renormalise_over_kept([math.log(0.40), math.log(0.35)], top, top_p=0.5, top_k=-1)
    assert via_sglang == pytest.approx([drawn[0], drawn[1]], abs=1e-6)

    old = torch.tensor([[math.log(0.40), math.log(0.35)]])
    inputs = LossInputs(logprobs=old, old_logprobs=old, advantages=torch.ones(1), mask=torch.ones(1, 2, dtype=bool),
                        weights=torch.ones(1, 2), source=torch.ones(1, dtype=torch.long),
                        behaviour_logprobs=torch.tensor([via_sglang]))
    assert tis_weight(inputs, AlgorithmConfig(tis_clamp=2.0))[0].tolist() == pytest.approx([0.75, 0.75], abs=1e-6)


def test_presence_penalty_stops_repeats(engine):
    # this random model's greedy output for PROMPTS[0]... repeats tokens (checked, so the test can fail)
    plain = run(engine.generate(PROMPTS, 1, SamplingParams(max_new_tokens=12, temperature=0.0)))
    assert any(len(set(g[0].response_ids)) < 12 for g in plain)
    penalised = run(engine.generate(PROMPTS, 1, SamplingParams(max_new_tokens=12, temperature=0.0,
                                                               presence_penalty=1e4)))
    assert all(len(set(g[0].response_ids)) == 12 for g in penalised)


@pytest.mark.parametrize("top_k, top_p, support", [(-1, 1.0, {0, 1, 2, 3, 4}), (2, 1.0, {0, 1}),
                                                    (-1, 0.75, {0, 1, 2}), (3, 0.5, {0, 1})])
def test_sample_tokens_follows_the_truncated_distribution(top_k, top_p, support):
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = probs.log().expand(20000, 5)
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    uniforms = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = sample_tokens(logits, params, uniforms)
    counts = collections.Counter(tokens.tolist())
    assert set(counts) == support
    kept = torch.tensor([probs[i] if i in support else 0.0 for i in range(5)])
    expected = kept / kept.sum()
    for token in support:
        assert counts[token] / 20000 == pytest.approx(float(expected[token]), abs=0.015)
    assert torch.allclose(logprobs, expected.log()[tokens], atol=1e-6)  # the distribution drawn from


def test_sample_tokens_greedy_and_temperature():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    token, logprob = sample_tokens(logits, SamplingParams(temperature=0.0), torch.tensor([0.99]))
    assert token.tolist() == [1] and float(logprob) == pytest.approx(float(logits.log_softmax(-1)[0, 1]))
    scaled = (logits / 0.5).log_softmax(-1)[0]
    for u, expected in ((0.0, 0), (0.5, 1), (0.999, 2)):  # cdf at T=0.5: 0.016, 0.867, 1.0
        token, logprob = sample_tokens(logits, SamplingParams(temperature=0.5), torch.tensor([u]))
        assert token.tolist() == [expected] and float(logprob) == pytest.approx(float(scaled[expected]))


@pytest.mark.parametrize("params, match", [
    (SamplingParams(temperature=-1.0), "temperature"), (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(top_k=0), "top_k"), (SamplingParams(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_sampling_params_are_refused(engine, params, match):
    with pytest.raises(ValueError, match=match):
        run(engine.generate([[1, 2]], 1, params))


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    from tests.utils import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("other"), seed=1)


def test_update_weights_in_place(tiny_qwen3, other_model_dir):
    from transformers import AutoModelForCausalLM

    scratch = build_local_engine(tiny_qwen3)
    target = build_local_engine(other_model_dir)
    expected = run(target.generate(PROMPTS, 1, GREEDY))
    before = run(scratch.generate(PROMPTS, 1, GREEDY))
    assert before != expected
    state = AutoModelForCausalLM.from_pretrained(other_model_dir).state_dict()
    run(scratch.update_weights(state.items(), version="7"))
    assert run(scratch.weight_version()) == "7"
    after = run(scratch.generate(PROMPTS, 1, GREEDY))
    assert [g[0].response_ids for g in after] == [g[0].response_ids for g in expected]
    assert all(g[0].weight_version == "7" for g in after)

    # refused updates name the problem; a bad first tensor changes nothing
    with pytest.raises(ValueError, match="not a weight.*Hugging Face names"):
        run(scratch.update_weights([("layers.0.mlp.up_proj.weight", torch.zeros(128, 64))], "8"))
    with pytest.raises(ValueError, match=r"shape \(64, 64\).*expects \(128, 64\)"):
        run(scratch.update_weights([("model.layers.0.mlp.up_proj.weight", torch.zeros(64, 64))], "8"))
    assert run(scratch.weight_version()) == "7"
    assert run(scratch.generate(PROMPTS, 1, GREEDY)) == after
    # a bad tensor after good ones leaves mixed weights, and the version says so
    good = ("model.norm.weight", torch.ones(64))
    with pytest.raises(ValueError, match="mixed"):
        run(scratch.update_weights([good, ("model.nope.weight", torch.ones(1))], "9"))
    assert run(scratch.weight_version()) == "invalid"

    run(scratch.update_weights_from_path(str(tiny_qwen3), version="10"))
    assert run(scratch.generate(PROMPTS, 1, GREEDY))[0][0].response_ids == before[0][0].response_ids
    assert run(scratch.weight_version()) == "10"


def test_update_from_path_of_a_tied_embedding_model(tmp_path):
    """Tied checkpoints (Qwen3 <= 4B) store embed_tokens only; lm_head is the same tensor."""
    from safetensors.torch import save_file

    from tests.utils import make_tiny_model

    tied_a = make_tiny_model(tmp_path / "a", seed=4, num_hidden_layers=1, tie_word_embeddings=True)
    tied_b = make_tiny_model(tmp_path / "b", seed=5, num_hidden_layers=1, tie_word_embeddings=True)
    engine, reference = build_local_engine(tied_a), build_local_engine(tied_b)
    before = run(engine.generate(PROMPTS, 1, GREEDY))
    run(engine.update_weights_from_path(str(tied_b), version="b"))
    after, expected = run(engine.generate(PROMPTS, 1, GREEDY)), run(reference.generate(PROMPTS, 1, GREEDY))
    assert after != before
    assert [g[0].response_ids for g in after] == [g[0].response_ids for g in expected]

    partial = tmp_path / "partial"  # a checkpoint without the final norm is refused before any copy
    partial.mkdir()
    state = {k: v.contiguous() for k, v in reference.model.state_dict().items()
             if k not in ("lm_head.weight", "model.norm.weight")}
    save_file(state, str(partial / "model.safetensors"))
    shutil.copy(tied_b / "config.json", partial / "config.json")
    with pytest.raises(ValueError, match=r"lacks 1 of the model's weights \(e.g. \['model.norm.weight'\]\)"):
        run(engine.update_weights_from_path(str(partial), "x"))
    assert run(engine.weight_version()) == "b"


# -- the RolloutEngine contract: every member called on a LocalEngine ------------------------------------

async def _name_is_set(engine: LocalEngine, checkpoint) -> None:
    assert isinstance(engine.name, str) and engine.name


async def _generate_answers_prompt_major(engine: LocalEngine, checkpoint) -> None:
    groups = await engine.generate(PROMPTS[:2], 2, GREEDY)
    assert [len(group) for group in groups] == [2, 2]
    for gen in (g for group in groups for g in group):
        assert len(gen.logprobs) == len(gen.response_ids) == GREEDY.max_new_tokens
        assert gen.weight_version == "contract-0"


async def _update_with_its_own_weights_changes_only_the_version(engine: LocalEngine, checkpoint) -> None:
    before = await engine.generate(PROMPTS, 1, GREEDY)
    own = [(name, tensor.clone()) for name, tensor in engine.model.state_dict().items()]
    await engine.update_weights(iter(own), "own-1")
    after = await engine.generate(PROMPTS, 1, GREEDY)
    assert await engine.weight_version() == "own-1" and all(g[0].weight_version == "own-1" for g in after)
    assert [g[0].response_ids for g in after] == [g[0].response_ids for g in before]


async def _update_from_its_own_checkpoint_changes_only_the_version(engine: LocalEngine, checkpoint) -> None:
    before = await engine.generate(PROMPTS, 1, GREEDY)
    await engine.update_weights_from_path(str(checkpoint), "path-1")
    after = await engine.generate(PROMPTS, 1, GREEDY)
    assert await engine.weight_version() == "path-1"
    assert [g[0].response_ids for g in after] == [g[0].response_ids for g in before]


async def _weight_version_is_the_one_samples_carry(engine: LocalEngine, checkpoint) -> None:
    gen = (await engine.generate([PROMPTS[1]], 1, GREEDY))[0][0]
    assert await engine.weight_version() == gen.weight_version == "contract-0"


async def _weights_digest_is_the_learners_digest_of_the_same_tensors(engine: LocalEngine, checkpoint) -> None:
    state = engine.model.state_dict()
    names = sorted(state)[:5]
    held = await engine.weights_digest(names)
    assert held == tensor_digest((name, state[name]) for name in names)  # never None: it can read back
    assert await engine.weights_digest(names[::-1]) != held  # names and order are part of it


async def _healthy_until_closed(engine: LocalEngine, checkpoint) -> None:
    assert await engine.health() is True
    await engine.close()
    assert await engine.health() is False


async def _pause_holds_new_work_until_resume(engine: LocalEngine, checkpoint) -> None:
    await engine.pause()
    task = asyncio.ensure_future(engine.generate([PROMPTS[1]], 1, SamplingParams(max_new_tokens=2)))
    await asyncio.sleep(0.3)
    held = not task.done()
    await engine.resume()
    result = await asyncio.wait_for(task, timeout=30)
    assert held and len(result[0][0].response_ids) == 2


async def _close_frees_the_model_and_later_calls_say_so(engine: LocalEngine, checkpoint) -> None:
    await engine.close()
    assert engine.model is None
    with pytest.raises(RuntimeError, match="closed"):
        await engine.generate([[1]], 1, GREEDY)


CONTRACT_CHECKS = {
    "name": _name_is_set,
    "generate": _generate_answers_prompt_major,
    "update_weights": _update_with_its_own_weights_changes_only_the_version,
    "update_weights_from_path": _update_from_its_own_checkpoint_changes_only_the_version,
    "weight_version": _weight_version_is_the_one_samples_carry,
    "weights_digest": _weights_digest_is_the_learners_digest_of_the_same_tensors,
    "health": _healthy_until_closed,
    "pause": _pause_holds_new_work_until_resume,
    "resume": _pause_holds_new_work_until_resume,
    "close": _close_frees_the_model_and_later_calls_say_so,
}


def test_the_contract_checks_cover_the_protocol():
    assert_checks_cover_the_protocol(CONTRACT_CHECKS)


@pytest.mark.parametrize("member", PROTOCOL_MEMBERS)
def test_the_local_engine_keeps_the_contract(member, engine, tiny_qwen3):
    """A LocalEngine of its own (close ends it) on the module's model, which no check changes."""
    contract_engine = LocalEngine(engine.model, str(tiny_qwen3), engine.eos_token_ids, engine.pad_token_id,
                                  version="contract-0")
    assert isinstance(contract_engine, RolloutEngine)
    assert_same_parameters(LocalEngine, member)
    run(CONTRACT_CHECKS[member](contract_engine, tiny_qwen3))
