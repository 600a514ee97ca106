"""Generation through SGLangEngine on a real server: token ids in, ids + log-probs out, n samples per
prompt in prompt-major order, stop token ids, and the trainer-side log-prob check against Megatron-Core."""

from __future__ import annotations

import asyncio

import pytest
import torch

from megatron_s2l.rollout.sglang import SGLangEngine
from megatron_s2l.rollout.types import SamplingParams
from tests.sglang.helpers import hf_greedy, megatron_model

pytestmark = pytest.mark.sglang

PROMPTS = [[9707, 11, 1879], [785, 6722, 315, 9625, 374], [16, 17]]  # Qwen3 token ids


@pytest.fixture(scope="module", autouse=True)
def serving_model_a(main_server, models):
    """The shared server may have been given other weights by another module: load model A."""
    asyncio.run(SGLangEngine(main_server.url).update_weights_from_path(str(models["A"]), "model-A"))


def test_greedy_batch_with_n_samples_is_prompt_major(main_server, models):
    engine = SGLangEngine(main_server.url)
    result = asyncio.run(engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=6, temperature=0.0)))
    expected = [hf_greedy(models["A"], tuple(p), 6) for p in PROMPTS]
    assert len({tuple(e) for e in expected}) == 3  # distinct per prompt, so a reordering would show
    assert [[g.response_ids for g in row] for row in result] == [[e, e] for e in expected]
    for row in result:
        for gen in row:
            assert gen.finish_reason == "length" and gen.weight_version == "model-A"
            assert len(gen.logprobs) == 6 and all(lp <= 0.0 for lp in gen.logprobs)


def test_sampling_returns_n_distinct_samples_with_logprobs(main_server):
    engine = SGLangEngine(main_server.url)
    result = asyncio.run(engine.generate(PROMPTS[:2], 4, SamplingParams(max_new_tokens=8, temperature=1.0)))
    assert [len(row) for row in result] == [4, 4]
    for row in result:
        assert len({tuple(g.response_ids) for g in row}) > 1  # samples, not four copies of one
        assert all(len(g.logprobs) == len(g.response_ids) == 8 for g in row)


def test_stop_token_ids_end_a_sample_and_are_kept(main_server, models):
    greedy = hf_greedy(models["A"], tuple(PROMPTS[1]), 6)
    stop = greedy[2]
    assert stop not in greedy[:2]
    engine = SGLangEngine(main_server.url)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=[stop])
    gen = asyncio.run(engine.generate([PROMPTS[1]], 1, params))[0][0]
    assert gen.response_ids == greedy[:3] and gen.finish_reason == "stop"


def test_trainer_logprobs_match_sglang_at_the_sampling_temperature(main_server, models, mcore_world1):
    """SGLang's log-prob is log_softmax(logits / T) of the sampled token (after temperature, before
    top-p/top-k); Megatron-Core recomputes it in fp32 to ~1e-4. At T = 1 the numbers differ clearly. Under
    top-p the engine renormalises over the kept tokens (from SGLang's top log-probs): against the kept mass
    computed from Megatron's whole distribution, within the bound of renormalise_over_kept."""
    temperature, top_p = 0.7, 0.9
    engine = SGLangEngine(main_server.url)
    model, args = megatron_model(models["A"])

    def served_and_recomputed(params):
        rows = asyncio.run(engine.generate(PROMPTS[:2], 2, params))
        for prompt, row in zip(PROMPTS, rows):
            for gen in row:
                ids = torch.tensor([prompt + gen.response_ids])  # [1, S]
                with torch.no_grad():
                    logits = model(ids, torch.arange(ids.shape[1])[None], None)[0, :, :args.vocab_size]  # [S, V]
                logits = logits[len(prompt) - 1:-1].float()  # [R, V]: the position before each response token
                yield torch.tensor(gen.logprobs), logits, torch.tensor(gen.response_ids)[:, None]

    worst_at_t, best_at_1 = 0.0, float("inf")
    for served, logits, response in served_and_recomputed(SamplingParams(max_new_tokens=10, temperature=temperature)):
        at_t = torch.log_softmax(logits / temperature, -1).gather(-1, response)[:, 0]
        at_1 = torch.log_softmax(logits, -1).gather(-1, response)[:, 0]
        worst_at_t = max(worst_at_t, (at_t - served).abs().max().item())
        best_at_1 = min(best_at_1, (at_1 - served).abs().max().item())
    assert worst_at_t < 1e-4, worst_at_t
    assert best_at_1 > 1e-2, best_at_1  # so the returned numbers are not temperature-1 log-probs

    worst_kept, least_shift = 0.0, float("inf")
    for served, logits, response in served_and_recomputed(
            SamplingParams(max_new_tokens=10, temperature=temperature, top_p=top_p)):
        probs = torch.softmax(logits / temperature, -1).sort(-1, descending=True).values  # [R, V]
        kept = (probs * ((probs.cumsum(-1) - probs) < top_p)).sum(-1)  # the nucleus' exact mass
        at_t = torch.log_softmax(logits / temperature, -1).gather(-1, response)[:, 0]
        bound = torch.log1p(probs[:, 19] / top_p) + 1e-4  # the 20th listed probability bounds the estimate
        worst_kept = max(worst_kept, ((at_t - kept.log() - served).abs() - bound).max().item())
        least_shift = min(least_shift, (served - at_t).min().item())
    assert worst_kept <= 0, worst_kept
    assert least_shift > 1e-3, least_shift  # renormalised: above the untruncated log-prob
