"""Engines and sampling settings from a run's config, built one way for training, `s2l eval` and the pool
build: an in-process transformers engine (LocalEngine) on a model folder, or a client of SGLang servers."""

from __future__ import annotations

import os
from typing import Literal, Optional

from megatron_s2l.config import RolloutConfig, RunConfig
from megatron_s2l.rollout.types import RolloutEngine, SamplingParams

Role = Literal["learner", "explorer", "eval"]


def build_engine(model_path: str, url: str = "", *, name: str, rollout: Optional[RolloutConfig] = None,
                 seed: int = 0, version: str = "0", device: Optional[str] = None, max_batch_rows: int = 64,
                 learner_replica: bool = False) -> RolloutEngine:
    """A client of the SGLang server (or router) at `url`, else a LocalEngine on `model_path`. The learner
    replica's client also takes weight updates (rollout.weight_sync, the servers behind a router)."""
    rollout = rollout or RolloutConfig()
    if not url:
        # lazy: torch, transformers (a local engine only)
        from megatron_s2l.rollout.local import build_local_engine

        return build_local_engine(model_path, device=device, max_batch_rows=max_batch_rows, seed=seed,
                                  version=version)
    from megatron_s2l.rollout.sglang import SGLangEngine  # lazy: httpx

    updates = {}
    if learner_replica:
        updates = dict(worker_urls=rollout.learner_worker_urls or None, update_mode=rollout.weight_sync,
                       bucket_mb=rollout.weight_sync_bucket_mb,
                       master_address=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                       # asynchronous rollouts: requests in flight at a sync are held and go on with the new
                       # weights (each sample keeps its oldest version), not aborted
                       pause_mode="retract" if rollout.max_staleness else "abort")
    return SGLangEngine(url, api_key=rollout.api_key, request_timeout_s=rollout.request_timeout_s, name=name,
                        **updates)


def sampling_params(cfg: RunConfig, role: Role) -> SamplingParams:
    """How each role samples: the learner replica (rollout.*), the explorer online and in the pool build
    (explorer.*) and the held-out evaluation (eval.*), all up to rollout.max_response_length tokens."""
    common = dict(max_new_tokens=cfg.rollout.max_response_length, seed=cfg.seed)
    if role == "learner":
        r = cfg.rollout
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, **common)
    if role == "explorer":
        x = cfg.explorer
        return SamplingParams(temperature=x.temperature, top_p=x.top_p, top_k=x.top_k, **common)
    e = cfg.eval
    return SamplingParams(temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
                          presence_penalty=e.presence_penalty, **common)
