"""SGLangEngine: the RolloutEngine protocol over the HTTP API of SGLang 0.5.23 (one server or a router).

Prompts go out as token ids (``input_ids``, never text) so the learner scores exactly the tokens that
were sampled; each prompt is one ``/generate`` request with ``n`` samples, so a router spreads prompts
over its workers, and the answers come back prompt-major. Weight updates, pause/continue, abort and
cache flushes go to every *worker* server directly (``worker_urls``), never through a router.

Log-probs. SGLang 0.5.23 returns, for each sampled token, ``log softmax(logits / T)`` at the request's
temperature T: AFTER temperature scaling, BEFORE top-k/top-p truncation and not renormalised over the
kept tokens (sampler.py: ``logits.div_(temperatures)`` then ``log(softmax)``); with T = 0 (greedy) it is
the log-softmax of the raw logits. So the learner must recompute ``log_softmax(logits / T)`` in fp32 to
compare like with like (DESIGN §4); tests/sglang/test_sglang_generate.py checks this against Megatron-Core
(measured: ~1e-5 in fp32). SGLANG_RETURN_ORIGINAL_LOGPROB=1 on the server would switch to T = 1 log-probs.

Weight updates (mode fixed at construction; ``update_weights_from_path`` works in every mode):
  disk         ``/update_weights_from_disk`` with an HF checkpoint directory the server can read.
  tensor       begin -> ``/update_weights_from_tensor`` per bucket -> end (``/begin|end_weight_update``).
               Tensors travel as torch.multiprocessing handles (CPU: shared-memory files, "file_system"
               strategy, as the default fd-passing strategy crashes the server's scheduler; CUDA: IPC),
               so the server must be on the same host.
  distributed  ``/init_weights_update_group`` once, then begin -> per bucket
               ``/update_weights_from_distributed`` while we broadcast the bucket from rank 0 -> end.
               The group is a private c10d backend (gloo on CPU, nccl on GPU) built from its own TCPStore;
               it is never registered with torch.distributed, so a default group that torchrun created
               in the trainer is neither used nor changed.
The weight version is sent with the last bucket, so a server reports the new version only once every
bucket has landed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import io
import logging
import threading
import time
import uuid
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Iterable, Iterator, Optional

import httpx
import torch
import torch.distributed as dist
import torch.multiprocessing  # registers the tensor reductions ForkingPickler uses

from megatron_s2l.config import RolloutConfig
from megatron_s2l.rollout.types import Generation, SamplingParams

logger = logging.getLogger(__name__)

UPDATE_MODES = ("disk", "tensor", "distributed")
PAUSE_MODES = ("abort", "retract", "in_place")
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


def parse_generation(output: dict[str, Any]) -> Generation:
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
    return Generation(response_ids=ids, logprobs=[float(t[0]) for t in triples], finish_reason=finish["type"],
                      weight_version=str(spans[0]["version"]))


def parse_outputs(payload: Any, prompt: list[int], num_samples: int) -> list[Generation]:
    """The answer to one prompt's request: a dict for one sample, a list of dicts for n > 1."""
    outputs = payload if isinstance(payload, list) else [payload]
    if len(outputs) != num_samples:
        raise SGLangError(f"SGLang returned {len(outputs)} outputs for a request of {num_samples} samples")
    for output in outputs:  # a cheap guard against answers matched to the wrong prompt
        if output["meta_info"].get("prompt_tokens", len(prompt)) != len(prompt):
            raise SGLangError(f"SGLang answered for a {output['meta_info']['prompt_tokens']}-token prompt, "
                              f"but the request had {len(prompt)} tokens")
    return [parse_generation(output) for output in outputs]


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


class _Http:
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


# ----------------------------------------------------------------------------------------------
# Weight transport helpers

def iter_buckets(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
                 ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group the stream into lists of at most ``bucket_bytes`` (a larger tensor travels alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _with_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """(item, is_last) pairs: the version goes with the last bucket, known only one bucket late."""
    iterator = iter(items)
    try:
        previous = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield previous, False
        previous = item
    yield previous, True


def serialize_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """base64 of a ForkingPickler dump, the payload ``/update_weights_from_tensor`` expects.

    The pickle holds handles, not data: CPU storages are moved to shared-memory files ("file_system"
    strategy, set only for this call so the trainer's own multiprocessing keeps its strategy), CUDA
    storages become IPC handles. Callers must keep ``named`` alive until the server has answered.
    """
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        buffer = io.BytesIO()
        ForkingPickler(buffer).dump(named)
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class BroadcastGroup:
    """Our end (rank 0) of a process group shared with SGLang servers (ranks 1..world-1).

    SGLang builds its end with c10d's process-group helper: TCPStore -> PrefixStore(name) ->
    PrefixStore(name + "/") -> PrefixStore(device + "/"). We build the backend on the same key space
    directly, without registering it in torch.distributed, so no default group is needed or touched.
    """

    def __init__(self, name: str, backend: str, world_size: int, store: dist.TCPStore, pg: Any):
        self.name, self.backend, self.world_size = name, backend, world_size
        self._store, self._pg = store, pg  # the store must outlive the group
        self._aborted = threading.Event()

    @classmethod
    def create(cls, name: str, backend: str, port: int, world_size: int, timeout_s: float
               ) -> "BroadcastGroup":
        """Blocks until every server rank has joined (call it while the init requests are in flight).
        Give it a longer timeout than the servers' requests: a failed request then ends a broadcast through
        abort() before NCCL's watchdog, at this timeout, takes the whole process down."""
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore("0.0.0.0", port, world_size, is_master=True, timeout=timeout,
                              wait_for_workers=False)
        device = "cuda" if backend == "nccl" else "cpu"
        scoped = dist.PrefixStore(f"{device}/", dist.PrefixStore(f"{name}/", dist.PrefixStore(name, store)))
        if backend == "gloo":
            pg = dist.ProcessGroupGloo(scoped, 0, world_size, timeout)
        elif backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            pg = dist.ProcessGroupNCCL(scoped, 0, world_size, options)
        else:
            raise ValueError(f"weight-update group backend {backend!r}: use 'gloo' (CPU) or 'nccl' (GPU)")
        return cls(name, backend, world_size, store, pg)

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Send each tensor from rank 0, in the order the servers were told; returns once all are sent, or
        once the backend has let go of them after abort().

        Polls instead of calling ``work.wait()`` early: on NCCL that makes this thread's current stream (the
        device's default stream, which the trainer computes on) wait for the broadcast, so one a failed server
        never finishes would stall the trainer's next kernels, the checkpoint save on failure included. After
        abort() it still waits (NCCL: at once; gloo: until its timeout), holding the group: whichever thread
        drops a group with an operation in flight blocks until that ends.
        """
        works = []
        for tensor in tensors:
            options = dist.BroadcastOptions()
            options.rootRank, options.rootTensor = 0, 0
            works.append(self._pg.broadcast([tensor], options))
        while not all(work.is_completed() for work in works):
            self._aborted.wait(0.002)
        if not self._aborted.is_set():
            for work in works:
                work.wait()  # raises the error of one that failed; all have completed, so nothing waits

    def abort(self) -> None:
        """End the group's broadcast in progress: the servers will not finish it (one failed)."""
        self._aborted.set()
        try:
            self._pg.abort()  # NCCL: frees the kernel waiting for peers that are gone
        except RuntimeError as exc:  # a backend without abort; its operation ends at the group's timeout
            logger.debug("weight-update group %s: abort: %s", self.name, exc)


async def _alongside(blocking: Callable[[], Any], requests: list[asyncio.Task]) -> Any:
    """Run a blocking collective in a thread while the servers' requests for it are in flight.

    Fails as soon as either side fails, so a server that refuses (bad group, no session) is reported at
    once instead of after the collective's timeout. The thread is a daemon, not the loop's executor, so
    an abandoned collective (it ends at its timeout) holds up neither the loop's shutdown nor exit.
    """
    work = _in_daemon_thread(blocking)
    await asyncio.wait([work, *requests], return_when=asyncio.FIRST_EXCEPTION)
    for task in (*requests, work):
        if task.done() and task.exception() is not None:
            for other in requests:
                other.cancel()
            raise task.exception()
    await asyncio.gather(*requests)
    return work.result()


def _in_daemon_thread(fn: Callable[[], Any]) -> asyncio.Future:
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: Optional[BaseException]) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def target() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:  # handed to the awaiting coroutine
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=target, name="s2l-weight-collective", daemon=True).start()
    return future


# ----------------------------------------------------------------------------------------------
# The engine

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
    master_address: str  # how the servers reach this process (distributed mode)
    group_backend: str
    # components
    _http: _Http
    # state
    _group: Optional[BroadcastGroup]
    _tp_sizes: dict[str, int]

    def __init__(self, url: str, *, worker_urls: Optional[list[str]] = None, update_mode: str = "tensor",
                 bucket_mb: float = 512, api_key: str = "", pause_mode: str = "abort",
                 request_timeout_s: float = RolloutConfig.request_timeout_s, update_timeout_s: float = 600.0,
                 control_timeout_s: float = 60.0, connect_timeout_s: float = 10.0, max_retries: int = 3,
                 backoff_s: float = 0.5, max_concurrent_requests: int = 1024,
                 master_address: str = "127.0.0.1", group_backend: Optional[str] = None, name: str = ""):
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
        self._http = _Http(api_key, max_retries, backoff_s, connect_timeout_s, max_concurrent_requests)
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
            return await self._request_samples(prompt, sampling_params_body(params, n), n)
        # SGLang seeds every copy of an n-sample request alike, which under deterministic inference
        # would give n identical samples: seed each sample on its own.
        seeds = [hash((params.seed, index, j)) & (2**31 - 1) for j in range(n)]
        groups = await asyncio.gather(*(self._request_samples(prompt, sampling_params_body(params, 1, s), 1)
                                        for s in seeds))
        return [g for group in groups for g in group]

    async def _request_samples(self, prompt: list[int], sampling: dict, n: int) -> list[Generation]:
        body = {"input_ids": list(prompt), "sampling_params": sampling, "return_logprob": True}
        payload = await self._http.call("POST", self.url, "/generate", body, timeout_s=self.request_timeout_s)
        return parse_outputs(payload, prompt, n)

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
        for bucket, last in _with_last(iter_buckets(tensors, self.bucket_bytes)):
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
            await _alongside(lambda: group.broadcast(tensors), requests)
        except BaseException:
            group.abort()
            self._group = None  # out of step with the servers now; the next update builds a new group
            raise

    async def _open_group(self) -> BroadcastGroup:
        from megatron_s2l.platform import free_port

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
        group = await _alongside(lambda: BroadcastGroup.create(name, self.group_backend, port, world_size,
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

    async def pause(self, mode: Optional[str] = None) -> None:
        """Stop scheduling: in-flight requests are aborted (partial answers), retracted or held."""
        mode = mode or self.pause_mode
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r}: use one of {PAUSE_MODES}")
        await self._each_worker("/pause_generation", {"mode": mode})

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
