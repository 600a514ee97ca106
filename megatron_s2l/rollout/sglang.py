"""SGLangEngine: the RolloutEngine protocol over the HTTP API of SGLang 0.5.23 (one server or a router).

Prompts go out as token ids (``input_ids``, never text) so the learner scores exactly the tokens that
were sampled; each prompt is one ``/generate`` request with ``n`` samples, so a router spreads prompts
over its workers, and the answers come back prompt-major. Weight updates, pause/continue, abort and
cache flushes go to every *worker* server directly (``worker_urls``), never through a router. What the
log-probs mean and how requests and answers look: rollout/sglang_client.py.

Weight updates (mode fixed at construction; ``update_weights_from_path`` works in every mode):
  disk         ``/update_weights_from_disk`` with an HF checkpoint directory the server can read.
  tensor       begin -> ``/update_weights_from_tensor`` per bucket -> end (``/begin|end_weight_update``).
               Tensors travel as torch.multiprocessing handles (CPU: shared-memory files, "file_system"
               strategy, as the default fd-passing strategy crashes the server's scheduler; CUDA: IPC),
               so the server must be on the same host.
  distributed  ``/init_weights_update_group`` once, then begin -> per bucket
               ``/update_weights_from_distributed`` while we broadcast the bucket from rank 0 -> end
               (the group: rollout/weight_broadcast.py).
The weight version is sent with the last bucket, so a server reports the new version only once every
bucket has landed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any, Iterable, Optional

import torch

from megatron_s2l.config import RolloutConfig
from megatron_s2l.platform import free_port
from megatron_s2l.rollout.sglang_client import (SGLangError, SGLangHttp, parse_outputs, sampling_params_body,
                                                truncates)
from megatron_s2l.rollout.types import Generation, SamplingParams
from megatron_s2l.rollout.weight_broadcast import (
    BroadcastGroup,
    flag_last,
    iter_buckets,
    run_alongside,
    serialize_tensors,
)

logger = logging.getLogger(__name__)

UPDATE_MODES = ("disk", "tensor", "distributed")
PAUSE_MODES = ("abort", "retract", "in_place")


class SGLangEngine:
    """RolloutEngine backed by SGLang 0.5.23 servers (see the module docstring for the protocol)."""

    # config
    name: str
    url: str  # where /generate goes: a server or a router
    worker_urls: list[str]  # the servers themselves: weight updates, pause, flush and abort go to each
    update_mode: str  # "disk" | "tensor" | "distributed"
    bucket_bytes: int
    pause_mode: str  # what /pause_generation does with in-flight requests
    request_timeout_s: float  # one /generate request, queueing behind the others included
    update_timeout_s: float  # one weight-update request
    control_timeout_s: float  # everything else
    kept_mass_top_logprobs: int  # top log-probs per token asked for under top-p/top-k (0: log-probs untruncated)
    master_address: str  # how the servers reach this process (distributed mode)
    group_backend: str
    # components
    _http: SGLangHttp
    # state
    _group: Optional[BroadcastGroup]
    _tp_sizes: dict[str, int]

    def __init__(self, url: str, *, worker_urls: Optional[list[str]] = None, update_mode: str = "tensor",
                 bucket_mb: float = 512, api_key: str = "", pause_mode: str = "abort",
                 request_timeout_s: float = RolloutConfig.request_timeout_s, update_timeout_s: float = 600.0,
                 control_timeout_s: float = 60.0, connect_timeout_s: float = 10.0, max_retries: int = 3,
                 backoff_s: float = 0.5, max_concurrent_requests: int = 1024,
                 master_address: str = "127.0.0.1", group_backend: Optional[str] = None, name: str = "",
                 kept_mass_top_logprobs: int = 20):
        if update_mode not in UPDATE_MODES:
            raise ValueError(f"update_mode={update_mode!r}: use one of {UPDATE_MODES}")
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode={pause_mode!r}: use one of {PAUSE_MODES}")
        self.url = url.rstrip("/")
        self.worker_urls = [u.rstrip("/") for u in (worker_urls or [url])]
        self.name = name or f"sglang:{self.url}"
        self.update_mode, self.pause_mode = update_mode, pause_mode
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.request_timeout_s, self.update_timeout_s = request_timeout_s, update_timeout_s
        self.control_timeout_s = control_timeout_s
        self.master_address = master_address
        self.group_backend = group_backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.kept_mass_top_logprobs = kept_mass_top_logprobs
        self._http = SGLangHttp(api_key, max_retries, backoff_s, connect_timeout_s, max_concurrent_requests)
        self._group, self._tp_sizes = None, {}

    # -- generation ------------------------------------------------------------------------------

    async def generate(self, prompts: list[list[int]], n: int, params: SamplingParams
                       ) -> list[list[Generation]]:
        """n samples for each prompt, prompt-major; one request per prompt (per sample if seeded)."""
        if n < 1:
            raise ValueError(f"n={n}: ask for at least one sample per prompt")
        rows = await asyncio.gather(*(self._generate_one(i, p, n, params) for i, p in enumerate(prompts)))
        return list(rows)

    async def _generate_one(self, index: int, prompt: list[int], n: int, params: SamplingParams
                            ) -> list[Generation]:
        if params.seed is None:
            return await self._request_samples(prompt, sampling_params_body(params, n), n, params)
        # SGLang seeds every copy of an n-sample request alike, which under deterministic inference
        # would give n identical samples: seed each sample on its own.
        seeds = [hash((params.seed, index, j)) & (2**31 - 1) for j in range(n)]
        groups = await asyncio.gather(*(self._request_samples(prompt, sampling_params_body(params, 1, seed), 1, params)
                                        for seed in seeds))
        return [g for group in groups for g in group]

    async def _request_samples(self, prompt: list[int], sampling: dict, n: int, params: SamplingParams
                               ) -> list[Generation]:
        body = {"input_ids": list(prompt), "sampling_params": sampling, "return_logprob": True}
        truncation = params if self.kept_mass_top_logprobs and truncates(params) else None
        if truncation is not None:  # the kept mass, to renormalise the behaviour log-probs (sglang_client.py)
            body["top_logprobs_num"] = self.kept_mass_top_logprobs
        payload = await self._http.call("POST", self.url, "/generate", body, timeout_s=self.request_timeout_s)
        return parse_outputs(payload, prompt, n, truncation)

    # -- weights ---------------------------------------------------------------------------------

    async def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        """Stream HF-named full tensors to every worker in buckets, then set ``version``."""
        if self.update_mode == "disk":
            raise ValueError(f"{self.name} was built with update_mode='disk': write an HF checkpoint and "
                             "call update_weights_from_path (train/weight_sync.py does), or build the "
                             "engine with update_mode='tensor' or 'distributed'")
        if self.update_mode == "distributed" and self._group is None:
            self._group = await self._open_group()
        await self._each_worker("/begin_weight_update", {}, idempotent=False)
        try:
            sent = await self._send_buckets(tensors, version)
        except BaseException:  # close the session anyway, or the server refuses the next update
            with contextlib.suppress(SGLangError):  # the first error is the one worth reporting
                await self._each_worker("/end_weight_update", {}, idempotent=False)
            raise
        await self._each_worker("/end_weight_update", {}, idempotent=False)
        logger.info("%s: %d tensors sent by %s, version %s", self.name, sent, self.update_mode, version)

    async def _send_buckets(self, tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> int:
        sent = 0
        for bucket, last in flag_last(iter_buckets(tensors, self.bucket_bytes)):
            extra = {"flush_cache": last, "weight_version": version if last else None}
            if self.update_mode == "tensor":
                await self._send_tensor_bucket(bucket, extra)
            else:
                await self._send_distributed_bucket(bucket, extra)
            sent += len(bucket)
        if sent == 0:
            raise ValueError(f"update_weights({version!r}) got no tensors to send")
        return sent

    async def _send_tensor_bucket(self, bucket: list[tuple[str, torch.Tensor]], extra: dict) -> None:
        # Fresh contiguous copies: sharing moves a storage into shared memory, which must not happen to
        # the caller's tensors; they stay referenced until every server has answered.
        owned = [(name, t.detach().contiguous().clone()) for name, t in bucket]
        payload = serialize_tensors(owned)
        tp_sizes = [await self._tp_size(url) for url in self.worker_urls]  # one payload per server TP rank
        await asyncio.gather(*(
            self._http.call("POST", url, "/update_weights_from_tensor",
                            {"serialized_named_tensors": [payload] * tp_size, **extra},
                            timeout_s=self.update_timeout_s)
            for url, tp_size in zip(self.worker_urls, tp_sizes)))
        del owned

    async def _send_distributed_bucket(self, bucket: list[tuple[str, torch.Tensor]], extra: dict) -> None:
        body = {"names": [name for name, _ in bucket],
                "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "group_name": self._group.name, **extra}
        requests = [asyncio.create_task(self._http.call("POST", url, "/update_weights_from_distributed", body,
                                                        timeout_s=self.update_timeout_s, idempotent=False))
                    for url in self.worker_urls]
        device = "cuda" if self._group.backend == "nccl" else "cpu"  # where the backend can send from
        tensors = [t.detach().to(device).contiguous() for _, t in bucket]
        group = self._group
        try:  # the servers post their receives when the request arrives; we send meanwhile
            await run_alongside(lambda: group.broadcast(tensors), requests)
        except BaseException:
            group.abort()
            self._group = None  # out of step with the servers now; the next update builds a new group
            raise

    async def _open_group(self) -> BroadcastGroup:
        tp_sizes = [await self._tp_size(url) for url in self.worker_urls]
        world_size, port = 1 + sum(tp_sizes), free_port()
        name = f"s2l-weights-{uuid.uuid4().hex[:8]}"
        offsets = [1 + sum(tp_sizes[:i]) for i in range(len(tp_sizes))]
        requests = [asyncio.create_task(self._http.call(
            "POST", url, "/init_weights_update_group",
            {"master_address": self.master_address, "master_port": port, "rank_offset": offset,
             "world_size": world_size, "group_name": name, "backend": self.group_backend},
            timeout_s=self.update_timeout_s, idempotent=False))
            for url, offset in zip(self.worker_urls, offsets)]
        group = await run_alongside(lambda: BroadcastGroup.create(name, self.group_backend, port, world_size,
                                                               2 * self.update_timeout_s), requests)
        logger.info("%s: weight-update group %s (%s, world %d) on %s:%d", self.name, name, self.group_backend,
                    world_size, self.master_address, port)
        return group

    async def update_weights_from_path(self, path: str, version: str) -> None:
        """Each worker reloads an HF checkpoint directory (a path the servers can read)."""
        body = {"model_path": str(path), "weight_version": version}
        await self._each_worker("/update_weights_from_disk", body, timeout_s=self.update_timeout_s)

    async def weight_version(self) -> str:
        versions = {url: (await self._http.call("GET", url, "/model_info", timeout_s=self.control_timeout_s)
                          )["weight_version"] for url in self.worker_urls}
        if len(set(versions.values())) > 1:
            raise SGLangError(f"{self.name}: workers serve different weight versions {versions}; "
                              "update them all (pass every server in worker_urls)")
        return next(iter(versions.values()))

    async def weights_digest(self, names: list[str]) -> Optional[str]:
        """None: the servers cannot report their weights. SGLang 0.5.23's ``/get_weights_by_name`` answers
        HTTP 400 "Get parameter by name failed" for Qwen3, so callers check the weight version instead."""
        return None

    async def _tp_size(self, url: str) -> int:
        if url not in self._tp_sizes:
            info = await self._http.call("GET", url, "/server_info", timeout_s=self.control_timeout_s)
            self._tp_sizes[url] = int(info.get("tp_size", 1))
        return self._tp_sizes[url]

    # -- control ---------------------------------------------------------------------------------

    async def health(self) -> bool:
        try:
            await self._http.call("GET", self.url, "/health", timeout_s=min(self.control_timeout_s, 10.0))
            return True
        except SGLangError:
            return False

    async def pause(self) -> None:
        """Stop scheduling; in-flight requests are aborted (partial answers), retracted or held as
        ``pause_mode`` says (fixed at construction, like ``update_mode``, so every engine pauses alike)."""
        await self._each_worker("/pause_generation", {"mode": self.pause_mode})

    async def resume(self) -> None:
        await self._each_worker("/continue_generation", {})

    async def abort(self, rid: Optional[str] = None) -> None:
        """Abort one request by id, or all of them; aborted requests answer with what they have."""
        await self._each_worker("/abort_request", {"rid": rid} if rid else {"abort_all": True})

    async def flush_cache(self) -> None:
        """Drop the prefix cache (SGLang refuses while requests are running: an SGLangError here)."""
        await self._each_worker("/flush_cache", None)

    async def close(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            for url in self.worker_urls:
                try:
                    await self._http.call("POST", url, "/destroy_weights_update_group",
                                          {"group_name": group.name}, timeout_s=self.control_timeout_s)
                except SGLangError as exc:  # a server that is already gone needs no cleanup
                    logger.info("%s: could not destroy group %s on %s: %s", self.name, group.name, url, exc)
        await self._http.close()

    async def _each_worker(self, path: str, body: Any, *, timeout_s: Optional[float] = None,
                           idempotent: bool = True) -> list[Any]:
        return list(await asyncio.gather(*(
            self._http.call("POST", url, path, body, timeout_s=timeout_s or self.control_timeout_s,
                            idempotent=idempotent) for url in self.worker_urls)))
