"""LocalEngine: the embedded default rollout engine, in-process with transformers (CPU or one GPU).

It implements the RolloutEngine protocol with its own sampling loop (left-padded batches, KV cache,
finished rows dropped from the batch), so it needs no server and serves tests, the CPU demo and small
single-GPU runs. Legend: P prompts in a chunk, R = P * n rows (sequences), V vocab, T new tokens.

Sampling, in this order: logits (fp32) -> presence penalty (on tokens already generated, as SGLang) ->
divide by temperature -> top-k -> top-p -> draw. temperature = 0 is greedy.

Log-probs returned are those of the chosen token under the distribution it was drawn from: softmax of the
(penalised) logits / temperature, renormalised over the tokens top-k and top-p kept. Without truncation that
is what the learner recomputes at the same temperature; with it, each token's log-prob is higher by
-log(kept mass), which importance weights against the behaviour policy need (ratio=tis, stale_tis). Greedy
(temperature 0): the log-prob under softmax of the raw logits.

Determinism: each row (prompt p, sample j) draws its uniforms from its own generator seeded from
(call seed, the prompt's token ids, how many identical prompts came before it in the call, j). The call
seed is `params.seed`, or the engine seed and a per-engine call counter when that is None. So for a
given seed the same prompt gets the same samples whatever else is in the call and whatever
`max_batch_rows` is -- exactly, up to floating-point differences between batched and unbatched kernels
(padding and batch size change reduction orders); greedy decoding on CPU in fp32 matches exactly in our
tests. Reruns on the same device, dtype and weights are bit-identical.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import threading
from pathlib import Path
from typing import Iterable, Optional

import torch

from megatron_s2l.model.checkpoint_io import HFCheckpoint
from megatron_s2l.model.convert import tensor_digest
from megatron_s2l.model.files import check_safetensors, require_model_dir
from megatron_s2l.rollout.types import Generation, SamplingParams
from megatron_s2l.seeding import derive_seed

logger = logging.getLogger(__name__)


class LocalEngine:
    """A transformers causal LM serving `generate` and in-place weight updates."""

    # config
    name: str
    model_path: str
    max_batch_rows: int  # rows (prompt x sample) per forward pass; bounds the KV-cache memory
    seed: int
    # components
    model: torch.nn.Module
    eos_token_ids: set[int]  # always stop on these, besides params.stop_token_ids
    pad_token_id: int
    # state
    _version: str
    _num_calls: int
    _lock: threading.Lock  # one generation or weight update at a time
    _running: threading.Event  # cleared by pause()
    _closed: bool

    def __init__(self, model: torch.nn.Module, model_path: str, eos_token_ids: set[int], pad_token_id: int,
                 *, max_batch_rows: int = 64, seed: int = 0, version: str = "0", name: str = ""):
        self.model, self.model_path = model, model_path
        self.eos_token_ids, self.pad_token_id = set(eos_token_ids), pad_token_id
        self.max_batch_rows, self.seed = max_batch_rows, seed
        self.name = name or f"local:{Path(model_path).name}"
        self._version, self._num_calls, self._closed = version, 0, False
        self._lock, self._running = threading.Lock(), threading.Event()
        self._running.set()

    # ------------------------------------------------------------------------------------------
    # RolloutEngine protocol

    async def generate(self, prompts: list[list[int]], n: int, params: SamplingParams
                       ) -> list[list[Generation]]:
        """n samples per prompt, prompt-major. Runs in a worker thread so other engines overlap."""
        _check_params(prompts, n, params)
        if not self._running.is_set():
            await asyncio.to_thread(self._running.wait)
        call_seed = params.seed if params.seed is not None else derive_seed(self.seed, "call",
                                                                            self._num_calls)
        self._num_calls += 1
        return await asyncio.to_thread(self._generate_all, prompts, n, params, call_seed)

    async def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        """Copy HF-named full tensors into the model in place, one at a time (memory stays flat).

        A subset of the weights is fine (bucketed updates). An unknown name or a wrong shape stops the
        update with an error; tensors before it are already copied, so the version becomes "invalid"
        until a complete update. The stream is consumed in the calling thread: it may run collectives.
        """
        await asyncio.to_thread(self._lock.acquire)  # waits for a running generation to finish
        try:
            self._load(tensors, version)
        finally:
            self._lock.release()

    async def update_weights_from_path(self, path: str, version: str) -> None:
        """Reload every weight from an HF safetensors checkpoint directory."""
        checkpoint = HFCheckpoint(path)
        missing = self._not_covered(checkpoint.names())
        if missing:
            raise ValueError(f"{path} lacks {len(missing)} of the model's weights (e.g. {missing[:3]}); "
                             f"is it a checkpoint of the same architecture as {self.model_path}?")
        await self.update_weights(((k, checkpoint.get(k)) for k in sorted(checkpoint.names())), version)

    async def weight_version(self) -> str:
        return self._version

    async def weights_digest(self, names: list[str]) -> str:
        """Always a digest (never None): the model is in this process, so its weights can be read back."""
        state = self._require_model().state_dict()
        return tensor_digest((name, state[name]) for name in names)

    async def health(self) -> bool:
        return not self._closed

    async def pause(self) -> None:
        """New `generate` calls wait until `resume`; calls already running finish (they hold the lock
        that weight updates take, so weights never change under a running generation)."""
        self._running.clear()

    async def resume(self) -> None:
        self._running.set()

    async def close(self) -> None:
        await asyncio.to_thread(self._lock.acquire)
        self._closed, self.model = True, None  # frees the weights; later calls fail with a clear error
        self._lock.release()
        self._running.set()

    # ------------------------------------------------------------------------------------------
    # weights

    def _not_covered(self, names: set[str]) -> list[str]:
        """Model tensors that none of `names` would set. Tied weights (lm_head = embed_tokens) are one
        tensor under two names, and checkpoints store only one of them."""
        aliases: dict[int, list[str]] = {}
        for name, tensor in self._require_model().state_dict(keep_vars=True).items():
            aliases.setdefault(id(tensor), []).append(name)
        return sorted(group[0] for group in aliases.values() if not names.intersection(group))

    def _load(self, named: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        targets = self._require_model().state_dict(keep_vars=True)
        count = 0
        with torch.no_grad():
            for name, tensor in named:
                problem = self._check_tensor(targets, name, tensor)
                if problem:
                    if count:
                        self._version = "invalid"
                    raise ValueError(f"update_weights: {problem}" + (
                        f"; {count} tensors before it were loaded, so the engine's weights are now mixed "
                        "(version 'invalid'): send a complete, correct update" if count else ""))
                targets[name].copy_(tensor)  # casts to the engine's dtype and device
                count += 1
        self._version = str(version)
        logger.info("%s: loaded %d tensors, weight version %s", self.name, count, version)

    def _check_tensor(self, targets: dict, name: str, tensor: torch.Tensor) -> str:
        if name not in targets:
            close = [k for k in targets if k.split(".")[-2:] == name.split(".")[-2:]][:3]
            return (f"{name!r} is not a weight of {self.model_path} (similar: {close}); send Hugging Face "
                    "names such as 'model.layers.0.self_attn.q_proj.weight'")
        if tuple(tensor.shape) != tuple(targets[name].shape):
            return (f"{name!r} has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(targets[name].shape)}; send full (unsharded) tensors of the same architecture")
        return ""

    def _require_model(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError(f"{self.name} is closed; build a new LocalEngine")
        return self.model

    # ------------------------------------------------------------------------------------------
    # generation

    def _generate_all(self, prompts: list[list[int]], n: int, params: SamplingParams, call_seed: int
                      ) -> list[list[Generation]]:
        seen: dict[bytes, int] = {}
        row_seeds = []  # [len(prompts)][n]
        for ids in prompts:
            digest = hashlib.blake2b(str(list(ids)).encode(), digest_size=16).digest()
            occurrence = seen[digest] = seen.get(digest, -1) + 1
            row_seeds.append([derive_seed(call_seed, digest.hex(), occurrence, j) for j in range(n)])
        per_chunk = max(1, self.max_batch_rows // n)
        out: list[list[Generation]] = []
        with self._lock:
            model = self._require_model()
            for start in range(0, len(prompts), per_chunk):
                end = start + per_chunk
                out += _generate_chunk(model, prompts[start:end], n, params, row_seeds[start:end],
                                       self.eos_token_ids, self.pad_token_id, self._version)
        return out


@torch.no_grad()
def _generate_chunk(model, prompts: list[list[int]], n: int, params: SamplingParams,
                    row_seeds: list[list[int]], eos_token_ids: set[int], pad_token_id: int, version: str
                    ) -> list[list[Generation]]:
    """Prefill the P prompts once, repeat the KV cache n times, then decode R = P * n rows."""
    device = next(model.parameters()).device
    num_rows, max_new = len(prompts) * n, params.max_new_tokens
    stop_ids = torch.tensor(sorted(eos_token_ids | set(params.stop_token_ids or ())), device=device)
    input_ids, mask = _left_pad(prompts, pad_token_id, device)  # [P, L] each
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [P, L]: left padding must not shift positions
    # transformers 5 renamed past_key_values to cache
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)  # never materialise [P, L, V] logits
    cache = getattr(out, cache_kw)
    logits = out.logits[:, -1].float().repeat_interleave(n, 0)  # [R, V]
    if n > 1:
        cache.batch_repeat_interleave(n)
    mask, last_pos = mask.repeat_interleave(n, 0), positions[:, -1].repeat_interleave(n, 0)  # [R, L], [R]
    uniforms = torch.stack([torch.rand(max_new, generator=torch.Generator().manual_seed(s))
                            for seeds in row_seeds for s in seeds]).to(device)  # [R, T]
    presence = torch.zeros_like(logits, dtype=torch.bool) if params.presence_penalty else None  # [R, V]
    active = torch.arange(num_rows, device=device)  # row index of each live sequence
    tokens_out = [[] for _ in range(num_rows)]
    logprobs_out = [[] for _ in range(num_rows)]
    finish = ["length"] * num_rows
    for t in range(max_new):
        if presence is not None:
            logits = logits - params.presence_penalty * presence
        token, logprob = sample_tokens(logits, params, uniforms[active, t])  # [R_live] each
        for row, tok, lp in zip(active.tolist(), token.tolist(), logprob.tolist()):
            tokens_out[row].append(tok)
            logprobs_out[row].append(lp)
        done = torch.isin(token, stop_ids)  # [R_live]
        for row in active[done].tolist():
            finish[row] = "stop"
        if t == max_new - 1 or bool(done.all()):
            break
        if bool(done.any()):  # drop finished rows from the batch and the cache
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            active, token, mask, last_pos = active[keep], token[keep], mask[keep], last_pos[keep]
            presence = presence[keep] if presence is not None else None
        if presence is not None:
            presence[torch.arange(token.numel(), device=device), token] = True
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # [R_live, L + t + 1]
        last_pos = last_pos + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                    use_cache=True, **{cache_kw: cache})
        cache, logits = getattr(out, cache_kw), out.logits[:, -1].float()
    return [[Generation(tokens_out[r], logprobs_out[r], finish[r], version) for r in range(p * n, p * n + n)]
            for p in range(len(prompts))]


def sample_tokens(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row by inverting the CDF at the row's uniform in [0, 1).

    logits [R, V] fp32, uniforms [R] -> tokens [R] long, logprobs [R] under the distribution drawn from
    (temperature-scaled, renormalised over the tokens top-k/top-p kept).
    """
    if params.temperature == 0:
        token = logits.argmax(-1)
        return token, logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
    logp = (logits / params.temperature).log_softmax(-1)  # [R, V]
    probs = logp.exp()
    top_k = params.top_k if 0 < params.top_k < probs.shape[-1] else -1
    if top_k > 0:
        probs, index = probs.topk(top_k, dim=-1)  # [R, k], sorted descending
    elif params.top_p < 1.0:
        probs, index = probs.sort(dim=-1, descending=True)
    else:
        index = None
    if params.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is
        # < top_p. Mass of the full distribution (as SGLang), not renormalised after top-k.
        before = probs.cumsum(-1) - probs
        probs = probs * (before < params.top_p)
    cdf = probs.cumsum(-1)  # [R, K]
    pick = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None].to(cdf.dtype), right=True)
    pick = torch.minimum(pick.squeeze(-1), cdf.argmax(-1))  # argmax: the last token with mass
    token = pick if index is None else index.gather(-1, pick[:, None]).squeeze(-1)
    logprob = logp.gather(-1, token[:, None]).squeeze(-1)
    if index is not None:  # truncated: renormalise over the kept tokens
        logprob = logprob - cdf[:, -1].log()
    return token, logprob


def _left_pad(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _check_params(prompts: list[list[int]], n: int, params: SamplingParams) -> None:
    if n < 1:
        raise ValueError(f"n={n} samples per prompt; use n >= 1")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt was given; every prompt needs at least one token")
    if params.temperature < 0:
        raise ValueError(f"temperature={params.temperature}; use >= 0 (0 is greedy)")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p={params.top_p}; use 0 < top_p <= 1 (1 is off)")
    if params.top_k == 0 or params.top_k < -1:
        raise ValueError(f"top_k={params.top_k}; use -1 (off) or a positive k")
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={params.max_new_tokens}; use a positive token count")


def build_local_engine(model_path: str | Path, *, device: Optional[str] = None, dtype: Optional[str] = None,
                       max_batch_rows: int = 64, seed: int = 0, version: str = "0",
                       tokenizer_path: str | Path | None = None) -> LocalEngine:
    """Load an HF checkpoint directory: fp32 on CPU, bf16 on GPU unless `dtype` says otherwise.

    EOS ids come from the tokenizer, config.json and generation_config.json (their union), so a base
    model (<|endoftext|>) and a chat model (<|im_end|>) of the same family both stop.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_safetensors(require_model_dir(model_path, "model"))  # named errors, not transformers' hub ones
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda")
                                                       else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or model_path))
    eos: set[int] = set()
    for value in (tokenizer.eos_token_id, model.config.eos_token_id,
                  getattr(model.generation_config, "eos_token_id", None)):
        eos |= set(value) if isinstance(value, (list, tuple)) else ({value} if value is not None else set())
    if not eos:
        logger.warning("%s: no EOS token in tokenizer or configs; samples stop only at stop_token_ids "
                       "or max_new_tokens", model_path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    logger.info("LocalEngine %s on %s (%s), eos %s", model_path, device, torch_dtype, sorted(eos))
    return LocalEngine(model, str(model_path), eos, pad, max_batch_rows=max_batch_rows, seed=seed,
                       version=version)
