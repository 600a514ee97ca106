"""SGLangEngine against a small fake HTTP server that answers with responses recorded from a real SGLang
0.5.23 server (shared/reference/sglang-0.5.23). Fast checks of parsing, request shapes, the weight-update
session protocol, retries and error messages; tests/sglang runs the same client against real servers."""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import json
import pickle
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.distributed as dist

from megatron_s2l.platform import free_port
from megatron_s2l.rollout import sglang_launch
from megatron_s2l.rollout.sglang import SGLangEngine
from megatron_s2l.rollout.sglang_client import (
    SGLangError,
    SGLangUnavailableError,
    parse_generation,
    sampling_params_body,
)
from megatron_s2l.rollout.types import RolloutEngine, SamplingParams
from megatron_s2l.rollout.weight_broadcast import iter_buckets
from tests.engine_contract import PROTOCOL_MEMBERS, assert_same_parameters
from tests.utils import shared_dir, wait_for

REF = shared_dir() / "reference" / "sglang-0.5.23"


def recorded(file: str, key: str) -> dict:
    """One recorded exchange: {"request", "status", "response"} (some keep only the response)."""
    entry = json.loads((REF / file).read_text())[key]
    return copy.deepcopy(entry)


GEN = "sglang_0.5.23_cpu_generate.json"
CONTROL = "sglang_0.5.23_cpu_control.json"
INFLIGHT = "sglang_0.5.23_cpu_inflight.json"


class FakeSGLang:
    """Answers (method, path) from a table of (status, body) or callables; records every request."""

    def __init__(self, routes: dict):
        self.routes = routes
        self.received: list[tuple[str, str, dict, object]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, method: str):
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                headers = {k.lower(): v for k, v in self.headers.items()}
                fake.received.append((method, self.path, headers, body))
                route = fake.routes.get((method, self.path))
                if route is None:
                    status, payload = 404, {"detail": "Not Found"}
                elif callable(route):
                    status, payload = route(body)
                else:
                    status, payload = route if isinstance(route, tuple) else route.pop(0)
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                is_text = isinstance(payload, str)
                self.send_header("content-type", "text/plain" if is_text else "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def paths(self) -> list[str]:
        return [path for _, path, _, _ in self.received]

    def __enter__(self) -> "FakeSGLang":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def ok(key: str, file: str = CONTROL) -> tuple[int, object]:
    entry = recorded(file, key)
    return entry["status"], entry["response"]


def run(coro):
    return asyncio.run(coro)


# -- parsing ------------------------------------------------------------------------------------

def test_parse_recorded_generations():
    for output in recorded(GEN, "generate_n2")["response"]:
        gen = parse_generation(output)
        assert gen.response_ids == output["output_ids"]
        assert gen.logprobs == [t[0] for t in output["meta_info"]["output_token_logprobs"]]
        assert gen.finish_reason == "length" and gen.weight_version == "default"
    stop_text = parse_generation(recorded(GEN, "generate_stop")["response"])  # matched a stop string
    stop_id = parse_generation(recorded(INFLIGHT, "stop_token_id")["response"])  # matched a stop token id
    aborted = parse_generation(recorded(INFLIGHT, "inflight_pause_abort")["response"])
    finishes = (stop_text.finish_reason, stop_id.finish_reason, aborted.finish_reason)
    assert finishes == ("stop", "stop", "abort")
    assert stop_id.response_ids == [117]  # SGLang keeps the matched stop token in output_ids
    assert len(aborted.response_ids) == len(aborted.logprobs) == 15  # partial output survives an abort


def test_a_request_spanning_a_weight_update_records_its_oldest_version():
    meta = json.loads((REF / "sglang_0.5.23_cpu_midgen_update.json").read_text())["spanning_request_meta"]
    triples = [[-1.0, 5, None]] * 300
    output = {"output_ids": [5] * 300, "meta_info": {**meta, "output_token_logprobs": triples}}
    assert [s["version"] for s in meta["weight_versions"]] == ["dist-v1", "v2-mid2"]
    assert parse_generation(output).weight_version == "dist-v1"


def test_mismatched_logprob_ids_are_an_error():
    output = recorded(GEN, "generate_basic")["response"]
    output["output_ids"][0] += 1
    with pytest.raises(SGLangError, match="differ from output_ids"):
        parse_generation(output)


def test_every_sampling_key_we_send_is_one_sglang_0_5_23_accepts():
    error = recorded(GEN, "generate_bad_sp")["response"]["error"]  # the real 400 lists the accepted keys
    accepted = set(re.findall(r"`(\w+)`", error.split("expected one of", 1)[1]))
    params = SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=20, presence_penalty=0.5,
                            stop_token_ids=[2, 3])
    body = sampling_params_body(params, n=4, seed=7)
    assert set(body) <= accepted
    assert body["stop_token_ids"] == [2, 3] and body["sampling_seed"] == 7 and body["n"] == 4


# -- generate through HTTP --------------------------------------------------------------------------

def test_generate_sends_token_ids_and_returns_prompt_major_order():
    outputs = recorded(INFLIGHT, "batch2_n2")["response"]  # 2 prompts (2 and 3 tokens) x n=2, prompt-major

    def answer(body):
        time.sleep(0.05 if len(body["input_ids"]) == 2 else 0.0)  # the first prompt's answer comes last
        return 200, outputs[:2] if len(body["input_ids"]) == 2 else outputs[2:]

    with FakeSGLang({("POST", "/generate"): answer}) as fake:
        engine = SGLangEngine(fake.url)
        result = run(engine.generate([[1, 2], [1, 2, 3]], 2, SamplingParams(max_new_tokens=3)))
    assert [[g.response_ids for g in row] for row in result] == [[o["output_ids"] for o in outputs[:2]],
                                                                  [o["output_ids"] for o in outputs[2:]]]
    bodies = sorted((b for _, _, _, b in fake.received), key=lambda b: len(b["input_ids"]))
    assert [b["input_ids"] for b in bodies] == [[1, 2], [1, 2, 3]]  # ids, never text
    assert all(b["return_logprob"] is True and b["sampling_params"]["n"] == 2 and "text" not in b
               for b in bodies)


def test_an_answer_for_a_different_prompt_length_is_refused():
    with FakeSGLang({("POST", "/generate"): ok("generate_basic", GEN)}) as fake:  # answers a 5-token prompt
        with pytest.raises(SGLangError, match="5-token prompt"):
            run(SGLangEngine(fake.url).generate([[1, 2]], 1, SamplingParams()))


def test_seeded_samples_are_requested_one_by_one_with_distinct_seeds():
    one = recorded(GEN, "generate_ignore_eos")["response"]  # a 2-token prompt, one sample
    with FakeSGLang({("POST", "/generate"): lambda body: (200, one)}) as fake:
        result = run(SGLangEngine(fake.url).generate([[1, 2]], 3, SamplingParams(seed=11)))
    seeds = [b["sampling_params"]["sampling_seed"] for _, _, _, b in fake.received]
    assert len(result[0]) == 3 and len(set(seeds)) == 3
    assert all(b["sampling_params"]["n"] == 1 for _, _, _, b in fake.received)


def test_a_rejected_request_names_the_url_status_and_fix():
    with FakeSGLang({("POST", "/generate"): ok("generate_bad_sp", GEN)}) as fake:
        with pytest.raises(SGLangError) as info:
            run(SGLangEngine(fake.url).generate([[1, 2]], 1, SamplingParams()))
    message = str(info.value)
    assert fake.url + "/generate" in message and "HTTP 400" in message and "unknown field `bogus`" in message
    assert "send only SamplingParams fields" in message


def test_api_key_goes_in_a_bearer_header():
    with FakeSGLang({("GET", "/model_info"): ok("model_info", GEN)}) as fake:
        assert run(SGLangEngine(fake.url, api_key="sekret").weight_version()) == "default"
    assert fake.received[0][2]["authorization"] == "Bearer sekret"


# -- availability -------------------------------------------------------------------------------

def test_a_server_that_is_down_gives_a_clear_error_after_retries():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    engine = SGLangEngine(url, max_retries=2, backoff_s=0.1)
    start = time.monotonic()
    with pytest.raises(SGLangUnavailableError) as info:
        run(engine.generate([[1, 2]], 1, SamplingParams()))
    assert time.monotonic() - start >= 0.1 + 0.2  # exponential backoff between the three attempts
    message = str(info.value)
    assert url in message and "3 times" in message and "launch_sglang.sh" in message
    assert run(engine.health()) is False


def test_503_is_retried_until_the_server_answers():
    gen = recorded(GEN, "generate_ignore_eos")["response"]
    replies = [(503, {"error": "no ready worker"}), (503, {"error": "no ready worker"}), (200, gen)]
    with FakeSGLang({("POST", "/generate"): replies}) as fake:
        result = run(SGLangEngine(fake.url, backoff_s=0.01).generate([[1, 2]], 1, SamplingParams()))
    assert result[0][0].response_ids == gen["output_ids"] and fake.paths().count("/generate") == 3


# -- weights ------------------------------------------------------------------------------------

def test_disk_update_sends_path_and_version_and_reports_failures():
    routes = {("POST", "/update_weights_from_disk"): [ok("update_weights_from_disk"),
                                                      ok("update_weights_from_disk_bad_path")],
              ("GET", "/model_info"): ok("model_info_after")}
    with FakeSGLang(routes) as fake:
        engine = SGLangEngine(fake.url, update_mode="disk")
        run(engine.update_weights_from_path("models/tiny-qwen3-v2", "v2"))
        assert run(engine.weight_version()) == "v2"
        with pytest.raises(SGLangError, match="Failed to get weights iterator"):
            run(engine.update_weights_from_path("models/does-not-exist", "v3"))
        with pytest.raises(ValueError, match="update_weights_from_path"):
            run(engine.update_weights([("x", torch.zeros(1))], "v4"))
    assert fake.received[0][3] == {"model_path": "models/tiny-qwen3-v2", "weight_version": "v2"}


def _tensor_update_routes(tp_size: int) -> dict:
    info = recorded(CONTROL, "server_info")["response"]
    info["tp_size"] = tp_size
    return {("GET", "/server_info"): (200, info), ("POST", "/begin_weight_update"): ok("begin_weight_update"),
            ("POST", "/update_weights_from_tensor"): (200, {"success": True, "message": "Success"}),
            ("POST", "/end_weight_update"): ok("end_weight_update")}


def test_tensor_update_is_a_begin_buckets_end_session_with_the_version_last():
    torch.manual_seed(0)
    tensors = [(f"model.layers.{i}.w", torch.randn(64, 64)) for i in range(5)]  # 16 KiB each
    with FakeSGLang(_tensor_update_routes(tp_size=2)) as fake:
        engine = SGLangEngine(fake.url, update_mode="tensor", bucket_mb=40 / 1024)  # two tensors a bucket
        received = []

        def load(body):  # what the server's scheduler does with each TP rank's payload
            assert len(body["serialized_named_tensors"]) == 2
            received.append((pickle.loads(base64.b64decode(body["serialized_named_tensors"][1])), body))
            return 200, {"success": True, "message": "Success"}

        fake.routes[("POST", "/update_weights_from_tensor")] = load
        run(engine.update_weights(iter(tensors), "v7"))
    assert [p for p in fake.paths() if p != "/server_info"] == (
        ["/begin_weight_update"] + ["/update_weights_from_tensor"] * 3 + ["/end_weight_update"])
    names = [name for named, _ in received for name, _ in named]
    assert names == [name for name, _ in tensors]
    assert all(torch.equal(t, dict(tensors)[name]) for named, _ in received for name, t in named)
    assert [(b["weight_version"], b["flush_cache"]) for _, b in received] == [(None, False), (None, False),
                                                                            ("v7", True)]


def test_a_failed_bucket_still_closes_the_session():
    routes = _tensor_update_routes(tp_size=1)
    routes[("POST", "/update_weights_from_tensor")] = ok("update_tensor_no_session")
    with FakeSGLang(routes) as fake:
        with pytest.raises(SGLangError, match="must run between begin_weight_update"):
            run(SGLangEngine(fake.url).update_weights([("w", torch.ones(2))], "v1"))
    assert fake.paths()[-1] == "/end_weight_update"


def test_a_server_refusing_the_broadcast_group_is_reported_at_once():
    refusal = (400, {"success": False, "message": "Failed to initialize custom process group: refused."})
    routes = {("GET", "/server_info"): _tensor_update_routes(1)[("GET", "/server_info")],
              ("POST", "/init_weights_update_group"): refusal}
    with FakeSGLang(routes) as fake:
        engine = SGLangEngine(fake.url, update_mode="distributed", update_timeout_s=5, group_backend="gloo")
        start = time.monotonic()
        with pytest.raises(SGLangError, match="Failed to initialize custom process group"):
            run(engine.update_weights([("w", torch.ones(2))], "v1"))
        assert time.monotonic() - start < 3  # not after the group's 5 s rendezvous timeout
    body = fake.received[-1][3]
    assert (body["rank_offset"], body["world_size"], body["backend"]) == (1, 2, "gloo")
    # The abandoned rendezvous ends at its own timeout (twice the request's); let it, or a process that exits
    # while gloo still waits in C++ aborts ("terminate called without an active exception").
    for thread in _collective_threads():
        thread.join(timeout=15)


def _collective_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "s2l-weight-collective"]


class GlooServerRanks:
    """The server side of the distributed update, as SGLang does it: join the group on /init_weights_update_group
    (its key space), receive each bucket on /update_weights_from_distributed. ``refuse`` buckets fail unreceived."""

    def __init__(self, refuse: int = 0):
        self.groups, self.received, self.refuse = [], [], refuse

    def join(self, body):
        timeout = datetime.timedelta(seconds=10)
        store = dist.TCPStore(body["master_address"], body["master_port"], body["world_size"], is_master=False,
                              timeout=timeout)
        name = body["group_name"]
        scoped = dist.PrefixStore("cpu/", dist.PrefixStore(f"{name}/", dist.PrefixStore(name, store)))
        self.groups.append((store, dist.ProcessGroupGloo(scoped, body["rank_offset"], body["world_size"], timeout)))
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def receive(self, body):
        if self.refuse:
            self.refuse -= 1
            return 400, {"success": False, "message": "Failed to update parameter: out of memory."}
        for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            options = dist.BroadcastOptions()
            options.rootRank, options.rootTensor = 0, 0
            self.groups[-1][1].broadcast([tensor], options).wait()
            self.received.append((name, tensor))
        return 200, {"success": True, "message": "Succeeded to update parameter online."}


def test_a_server_failing_a_bucket_is_reported_at_once_and_the_next_update_uses_a_new_group():
    server = GlooServerRanks(refuse=1)
    routes = {**_tensor_update_routes(1), ("POST", "/init_weights_update_group"): server.join,
              ("POST", "/update_weights_from_distributed"): server.receive}
    weights = [("model.norm.weight", torch.randn(8)), ("lm_head.weight", torch.randn(4, 8))]
    with FakeSGLang(routes) as fake:
        engine = SGLangEngine(fake.url, update_mode="distributed", update_timeout_s=4, group_backend="gloo")
        start = time.monotonic()
        with pytest.raises(SGLangError, match="out of memory"):
            run(engine.update_weights(iter(weights), "v1"))
        assert time.monotonic() - start < 3  # the refusal, not the collective's 8 s timeout
        assert fake.paths().count("/end_weight_update") == 1  # the session was closed
        run(engine.update_weights(iter(weights), "v2"))
    assert len(server.groups) == 2  # a fresh group: the old one is out of step
    assert [name for name, _ in server.received] == [name for name, _ in weights]
    assert all(torch.equal(got, dict(weights)[name]) for name, got in server.received)
    # the abandoned broadcast ends at gloo's timeout (NCCL's abort ends it at once); its thread goes with it
    assert wait_for(lambda: not _collective_threads(), 15)


def test_iter_buckets_respects_the_size_and_keeps_big_tensors_whole():
    tensors = [("a", torch.zeros(10)), ("b", torch.zeros(10)), ("big", torch.zeros(100)),
               ("c", torch.zeros(1))]
    sizes = [[name for name, _ in bucket] for bucket in iter_buckets(tensors, bucket_bytes=80)]
    assert sizes == [["a", "b"], ["big"], ["c"]]


def test_workers_reporting_different_versions_is_an_error():
    first, second = ok("model_info", GEN), ok("model_info_after")
    with FakeSGLang({("GET", "/model_info"): first}) as a, FakeSGLang({("GET", "/model_info"): second}) as b:
        with pytest.raises(SGLangError, match="different weight versions"):
            run(SGLangEngine(a.url, worker_urls=[a.url, b.url]).weight_version())


# -- control ------------------------------------------------------------------------------------

def test_pause_resume_abort_flush_bodies_match_the_recorded_protocol():
    routes = {("POST", "/pause_generation"): ok("pause_retract"),
              ("POST", "/continue_generation"): ok("continue"),
              ("POST", "/abort_request"): ok("abort_all"), ("POST", "/flush_cache"): ok("flush_cache_post")}
    with FakeSGLang(routes) as fake:
        engine = SGLangEngine(fake.url, pause_mode="retract")

        async def calls():
            await engine.pause()
            await SGLangEngine(fake.url, pause_mode="in_place").pause()  # the mode is the engine's
            await engine.resume()
            await engine.abort()
            await engine.abort("myrid-1")
            await engine.flush_cache()

        run(calls())
    assert [b for _, _, _, b in fake.received] == [{"mode": "retract"}, {"mode": "in_place"}, {},
                                                   {"abort_all": True}, {"rid": "myrid-1"}, None]


def test_the_engine_satisfies_the_rollout_engine_protocol():
    assert isinstance(SGLangEngine("http://127.0.0.1:1"), RolloutEngine)


@pytest.mark.parametrize("member", PROTOCOL_MEMBERS)
def test_the_engine_takes_the_protocols_parameters(member):
    """Calls are checked against real servers in tests/sglang/test_sglang_contract.py."""
    assert_same_parameters(SGLangEngine, member)


def test_weights_digest_says_it_cannot_report():
    """SGLang 0.5.23 cannot read Qwen3 weights back (recorded: /get_weights_by_name answers 400)."""
    assert recorded(CONTROL, "get_weights_by_name")["status"] == 400
    assert run(SGLangEngine("http://127.0.0.1:1").weights_digest(["model.norm.weight"])) is None


def test_bad_modes_are_refused_at_construction():
    with pytest.raises(ValueError, match="update_mode"):
        SGLangEngine("http://127.0.0.1:1", update_mode="nccl")
    with pytest.raises(ValueError, match="pause_mode"):
        SGLangEngine("http://127.0.0.1:1", pause_mode="stop")


def test_launcher_reports_a_missing_venv(monkeypatch, tmp_path):
    monkeypatch.setenv(sglang_launch.VENV_ENV, str(tmp_path / "nowhere"))
    assert sglang_launch.sglang_python() is None
    with pytest.raises(FileNotFoundError, match="setup_venv.sh"):
        sglang_launch.launch_server(tmp_path)
