"""generate -> decode -> score, written once: the collector (each step's samples), the evaluator (held-out
sets) and the pool build (the explorer's samples) all sample through `sample_and_score`."""

from __future__ import annotations

from typing import Optional, Sequence

from megatron_s2l.reward import Reward
from megatron_s2l.rollout.types import PromptRecord, RolloutEngine, Sample, SamplingParams, Source


async def sample_and_score(engine: RolloutEngine, prompts: Sequence[PromptRecord], n: int, params: SamplingParams,
                           tokenizer, reward: Optional[Reward], source: Source) -> list[list[Sample]]:
    """n samples per prompt, decoded and (unless `reward` is None) scored against each prompt's gold: [B][n]."""
    if n == 0:
        return [[] for _ in prompts]
    generations = await engine.generate([list(p.prompt_ids) for p in prompts], n, params)
    texts = iter(tokenizer.batch_decode([g.response_ids for gens in generations for g in gens],
                                        skip_special_tokens=True))
    samples = [[Sample.from_generation(g, p.prompt_id, p.prompt_ids, source, text=next(texts)) for g in gens]
               for p, gens in zip(prompts, generations)]
    if reward is not None:
        score_samples(reward, prompts, samples)
    return samples


def score_samples(reward: Reward, prompts: Sequence[PromptRecord], samples: list[list[Sample]]) -> None:
    """Set each sample's ([B][n], one row per prompt) reward and extracted answer against its prompt's gold
    (one verifier for every source)."""
    golds = [p.gold for p, row in zip(prompts, samples) for _ in row]
    samples = [s for row in samples for s in row]
    results = reward.score_batch([s.text for s in samples], golds)
    if len(results) != len(samples):
        raise ValueError(f"the reward returned {len(results)} results for {len(samples)} responses; "
                         "score_batch must return one result per response, in order")
    for sample, result in zip(samples, results):
        sample.reward, sample.answer = float(result.reward), result.answer
