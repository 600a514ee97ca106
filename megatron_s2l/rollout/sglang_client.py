"""The HTTP layer to SGLang 0.5.23: request bodies, response parsing and JSON calls with retries.

Kept apart from the engine (rollout/sglang.py) so the wire format can be checked alone against recorded
0.5.23 traffic (tests/unit/test_sglang_client.py) and the engine reads as the protocol it implements.

Log-probs. SGLang 0.5.23 returns, for each sampled token, ``log softmax(logits / T)`` at the request's
temperature T: AFTER temperature scaling, BEFORE top-k/top-p truncation and not renormalised over the
kept tokens (sampler.py: ``logits.div_(temperatures)`` then ``log(softmax)``); with T = 0 (greedy) it is
the log-softmax of the raw logits. So the learner must recompute ``log_softmax(logits / T)`` in fp32 to
compare like with like (DESIGN §4); tests/sglang/test_sglang_generate.py checks this against Megatron-Core
(measured: ~1e-5 in fp32). SGLANG_RETURN_ORIGINAL_LOGPROB=1 on the server would switch to T = 1 log-probs.
With top-p or top-k on, the distribution sampled from is that one renormalised over the kept tokens, and
importance weights against the behaviour policy need it: the engine then asks for the top log-probs of each
position and subtracts log(kept mass) (``renormalise_over_kept``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from typing import Any, Optional

import httpx

from megatron_s2l.rollout.types import Generation, SamplingParams

logger = logging.getLogger(__name__)

FINISH_TYPES = ("stop", "length", "abort")
_RETRY_STATUS = (502, 503, 504)  # a router without a ready worker, a proxy in between
_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)  # the request never reached the server
_DROPPED_ERRORS = (httpx.ReadError, httpx.RemoteProtocolError)  # the server went away mid-request


class SGLangError(RuntimeError):
    """A request to an SGLang server failed; the message names the URL and the fix."""


class SGLangUnavailableError(SGLangError):
    """The server could not be reached, even after retries."""


# ----------------------------------------------------------------------------------------------
# Request bodies and response parsing (pure; checked against recorded 0.5.23 traffic in unit tests)

def sampling_params_body(params: SamplingParams, n: int, seed: Optional[int] = None) -> dict[str, Any]:
    """SGLang ``sampling_params`` for our SamplingParams. 0.5.22+ rejects unknown keys with a 400."""
    body: dict[str, Any] = {"n": n, "max_new_tokens": params.max_new_tokens,
                            "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
    if params.presence_penalty:
        body["presence_penalty"] = params.presence_penalty
    if params.stop_token_ids:
        body["stop_token_ids"] = list(params.stop_token_ids)
    if seed is not None:
        body["sampling_seed"] = seed  # only honoured by servers run with --enable-deterministic-inference
    return body


def truncates(params: SamplingParams) -> bool:
    """Whether sampling keeps only some tokens (top-p or top-k), so the behaviour log-probs need the kept mass."""
    return params.temperature > 0 and (params.top_p < 1.0 or params.top_k > 0)


def renormalise_over_kept(logprobs: list[float], top_logprobs: list[list], top_p: float, top_k: int
                          ) -> list[float]:
    """Log-probs of the sampled tokens under the truncated distribution: minus log(kept mass) per position.

    The kept tokens are SGLang's (and LocalEngine's): the first top_k by probability, of which those whose
    preceding mass is < top_p. The mass comes from the position's top log-probs [[logprob, id, text], ...]
    (sorted by SGLang). When the kept set runs past the listed tokens, the mass is taken as top_p: then the true
    mass lies in [top_p, top_p + p_last) and p_last <= the smallest listed probability, which bounds the error.
    """
    out = []
    for logprob, top in zip(logprobs, top_logprobs):
        probs = sorted((math.exp(entry[0]) for entry in top), reverse=True)
        limit = top_k if top_k > 0 else len(probs) + 1
        kept = 0.0  # the mass of the tokens kept so far, which is also the mass before the next one
        for rank, prob in enumerate(probs):
            if rank >= limit or kept >= top_p:
                break
            kept += prob
        else:  # every listed token kept: the set may go on past them
            if len(probs) < limit and kept < top_p:
                kept = top_p
        out.append(logprob - math.log(kept) if kept > 0 else logprob)
    return out


def parse_generation(output: dict[str, Any], truncation: Optional[SamplingParams] = None) -> Generation:
    """One ``/generate`` output (``text``, ``output_ids``, ``meta_info``) -> Generation."""
    meta = output["meta_info"]
    ids = [int(t) for t in output["output_ids"]]
    triples = meta.get("output_token_logprobs")
    if triples is None:
        raise SGLangError("SGLang answered without output_token_logprobs; send return_logprob=true")
    if [int(t[1]) for t in triples] != ids:  # [logprob, token_id, text|null] per token
        raise SGLangError(f"SGLang log-prob token ids {[t[1] for t in triples]} differ from output_ids {ids}")
    finish = meta.get("finish_reason") or {"type": "abort"}  # null only for unfinished stream chunks
    if finish["type"] not in FINISH_TYPES:
        raise SGLangError(f"unknown SGLang finish_reason {finish!r}; expected a type in {FINISH_TYPES}")
    # A request that lived through a weight update spans versions; record the oldest weights it used, so
    # staleness is never under-counted.
    spans = meta.get("weight_versions") or [{"version": meta.get("weight_version", "")}]
    logprobs = [float(t[0]) for t in triples]
    if truncation is not None:
        top = meta.get("output_top_logprobs")
        if top is None or len(top) != len(ids):
            raise SGLangError("SGLang answered without output_top_logprobs for every token; send top_logprobs_num")
        logprobs = renormalise_over_kept(logprobs, top, truncation.top_p, truncation.top_k)
    return Generation(response_ids=ids, logprobs=logprobs, finish_reason=finish["type"],
                      weight_version=str(spans[0]["version"]))


def parse_outputs(payload: Any, prompt: list[int], num_samples: int,
                  truncation: Optional[SamplingParams] = None) -> list[Generation]:
    """The answer to one prompt's request: a dict for one sample, a list of dicts for n > 1."""
    outputs = payload if isinstance(payload, list) else [payload]
    if len(outputs) != num_samples:
        raise SGLangError(f"SGLang returned {len(outputs)} outputs for a request of {num_samples} samples")
    for output in outputs:  # a cheap guard against answers matched to the wrong prompt
        if output["meta_info"].get("prompt_tokens", len(prompt)) != len(prompt):
            raise SGLangError(f"SGLang answered for a {output['meta_info']['prompt_tokens']}-token prompt, "
                              f"but the request had {len(prompt)} tokens")
    return [parse_generation(output, truncation) for output in outputs]


def _error_hint(status: int, detail: str) -> str:
    if status in (401, 403):
        return ("Pass the server's --api-key (or --admin-api-key for weight updates) as api_key "
                "(rollout.api_key).")
    if status == 404:
        return "The endpoint does not exist: is this SGLang 0.5.23 (see sglang_endpoints_by_version.tsv)?"
    if "unknown field" in detail:
        return "SGLang 0.5.22+ rejects unknown sampling_params keys; send only SamplingParams fields."
    if "begin_weight_update" in detail or "weight-update session" in detail:
        return "Another client may hold a weight-update session on this server; end it or restart the server."
    return ""


# ----------------------------------------------------------------------------------------------
# HTTP with retries

@dataclasses.dataclass
class _LoopState:
    """An httpx client and request limiter bound to one event loop (both are loop-affine)."""

    loop: asyncio.AbstractEventLoop
    client: httpx.AsyncClient
    limiter: asyncio.Semaphore


class SGLangHttp:
    """JSON over HTTP with exponential-backoff retries and errors that say what to do."""

    def __init__(self, api_key: str, max_retries: int, backoff_s: float, connect_timeout_s: float,
                 max_concurrent_requests: int):
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.connect_timeout_s, self.max_concurrent_requests = connect_timeout_s, max_concurrent_requests
        self._state: Optional[_LoopState] = None

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:  # e.g. a second asyncio.run()
            limits = httpx.Limits(max_connections=self.max_concurrent_requests, max_keepalive_connections=64)
            self._state = _LoopState(loop, httpx.AsyncClient(limits=limits, headers=self.headers),
                                     asyncio.Semaphore(self.max_concurrent_requests))
        return self._state

    async def call(self, method: str, url: str, path: str, body: Any = None, *, timeout_s: float,
                   idempotent: bool = True) -> Any:
        """Send one request; retry connection failures (and, if idempotent, dropped connections)."""
        state = self._loop_state()
        timeout = httpx.Timeout(timeout_s, connect=min(self.connect_timeout_s, timeout_s))
        start, attempt = time.monotonic(), 0
        retryable = _CONNECT_ERRORS + (_DROPPED_ERRORS if idempotent else ())
        while True:
            try:
                async with state.limiter:
                    response = await state.client.request(method, url + path, json=body, timeout=timeout)
                if response.status_code not in _RETRY_STATUS or attempt >= self.max_retries:
                    return self._decode(url, path, response)
                failure = f"HTTP {response.status_code}"
            except retryable as exc:
                if attempt >= self.max_retries:
                    raise SGLangUnavailableError(
                        f"SGLang server {url} is unreachable: {method} {path} failed {attempt + 1} times "
                        f"over {time.monotonic() - start:.1f}s ({type(exc).__name__}: {exc}). Check that the "
                        "server is running and the URL is right (rollout.learner_url / explorer.url); start "
                        "one with tools/launch_sglang.sh or megatron_s2l.rollout.sglang_launch.launch_server."
                    ) from exc
                failure = f"{type(exc).__name__}: {exc}"
            except httpx.TimeoutException as exc:
                raise SGLangError(f"SGLang {url}{path} did not answer within {timeout_s:.0f}s "
                                  f"({type(exc).__name__}); raise the timeout (rollout.request_timeout_s) or "
                                  "check the server log for a stuck scheduler") from exc
            delay = self.backoff_s * 2 ** attempt
            attempt += 1
            logger.warning("SGLang %s%s: %s; retry %d/%d in %.1fs", url, path, failure, attempt,
                           self.max_retries, delay)
            await asyncio.sleep(delay)

    @staticmethod
    def _decode(url: str, path: str, response: httpx.Response) -> Any:
        is_json = response.headers.get("content-type", "").startswith("application/json")
        payload = response.json() if is_json and response.content else response.text
        failed = isinstance(payload, dict) and payload.get("success") is False
        if response.status_code >= 400 or failed:
            detail = payload.get("message") or payload.get("error") if isinstance(payload, dict) else payload
            detail = str(detail).strip()[:2000]
            raise SGLangError(f"SGLang {url}{path} answered HTTP {response.status_code}: {detail} "
                              f"{_error_hint(response.status_code, detail)}".rstrip())
        return payload

    async def close(self) -> None:
        state, self._state = self._state, None
        if state is not None and state.loop is asyncio.get_running_loop():  # else its loop is gone
            await state.client.aclose()
