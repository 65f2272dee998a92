"""The server client against a minimal local HTTP stub that records what it was sent (the real
vLLM server is covered by the vllm_cpu tests)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from avr_megatron.engines.server import ServerChatEngine, ServerError, ServerRewardEngine
from avr_megatron.method.requests import GenerateRequest, SamplingParams, ScoreRequest


class _Stub(BaseHTTPRequestHandler):
    calls: list = []
    fail_first: dict = {}
    token_ids: list = []  # per choice index, sent when asked for (return_token_ids)

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append((self.path, body, self.headers.get("Authorization")))
        if self.fail_first.get(self.path):
            self.fail_first[self.path] -= 1
            return self._send(503, {"error": "busy"})
        if self.path == "/v1/chat/completions":
            last = body["messages"][-1]["content"]
            if last == "too long":
                return self._send(400, {"error": {"message": "This model's maximum context length is 1024 tokens."}})
            if last == "bad":
                return self._send(400, {"error": {"message": "bad request"}})
            choices = [{"index": j, "message": {"role": "assistant", "content": f"{last}#{j}#{body.get('seed')}"}}
                       for j in reversed(range(body["n"]))]
            if body.get("return_token_ids"):
                for c in choices:
                    c["token_ids"] = self.token_ids[c["index"]]
            return self._send(200, {"choices": choices, "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
        if self.path == "/classify":
            value = float(len(body["messages"][-1]["content"])) - 10.0
            return self._send(200, {"data": [{"index": 0, "probs": [value], "num_classes": 1}],
                                    "usage": {"prompt_tokens": 7}})
        self._send(404, {"error": "no route"})

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def stub():
    _Stub.calls, _Stub.fail_first = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_chat_completions_payload_order_and_retries(stub, monkeypatch):
    monkeypatch.setenv("STUB_KEY", "secret")
    monkeypatch.setattr("avr_megatron.engines.server.time.sleep", lambda s: None)
    engine = ServerChatEngine(stub + "/v1", "m", api_key_env="STUB_KEY", max_concurrency=4)
    sp = SamplingParams(temperature=0.5, top_p=0.9, max_tokens=7, seed=3)
    requests = [GenerateRequest(f"p{i}/g", [{"role": "user", "content": f"q{i}"}], 2, sp.for_key(f"p{i}/g"))
                for i in range(5)]
    _Stub.fail_first["/v1/chat/completions"] = 1
    out = engine.generate(requests)
    assert out == [[f"q{i}#0#{r.sampling.seed}", f"q{i}#1#{r.sampling.seed}"] for i, r in enumerate(requests)]
    path, body, auth = _Stub.calls[-1]
    assert auth == "Bearer secret"
    assert {k: body[k] for k in ("model", "n", "temperature", "top_p", "max_tokens")} == \
        {"model": "m", "n": 2, "temperature": 0.5, "top_p": 0.9, "max_tokens": 7}
    assert engine.stats["generated_tokens"] == 10
    too_long = GenerateRequest("x/g", [{"role": "user", "content": "too long"}], 3, sp)
    assert engine.generate([too_long]) == [["", "", ""]] and engine.stats["prompt_too_long"] == 3
    with pytest.raises(ServerError, match="HTTP 400.*bad request"):
        engine.generate([GenerateRequest("y/g", [{"role": "user", "content": "bad"}], 1, sp)])


def test_classify_raw_scores(stub):
    rm = ServerRewardEngine(stub, "rm")
    requests = [ScoreRequest(f"p{i}/s", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * i}])
                for i in range(1, 4)]
    assert rm.score(requests) == [-9.0, -8.0, -7.0]
    path, body, _ = _Stub.calls[-1]
    assert path == "/classify" and body["use_activation"] is False and body["model"] == "rm"


def test_unreachable_server_names_the_url(monkeypatch):
    monkeypatch.setattr("avr_megatron.engines.server.time.sleep", lambda s: None)
    engine = ServerChatEngine("http://127.0.0.1:9", "m", max_retries=1, timeout_s=2)
    with pytest.raises(ServerError, match="127.0.0.1:9/v1/chat/completions"):
        engine.generate([GenerateRequest("p/g", [{"role": "user", "content": "hi"}], 1, SamplingParams())])


def test_greedy_asks_for_one_reply_and_repeats_it(stub):
    # vLLM refuses n > 1 with temperature 0; greedy replies are identical anyway.
    engine = ServerChatEngine(stub, "m")
    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=4, seed=5)
    out = engine.generate([GenerateRequest("p/g", [{"role": "user", "content": "q"}], 3, greedy)])
    assert out == [["q#0#5"] * 3] and _Stub.calls[-1][1]["n"] == 1


def test_neutral_sampling_and_texts_decoded_from_token_ids(stub, tmp_path):
    from avr_megatron.engines.server import NEUTRAL_SAMPLING
    from avr_megatron.testing.tiny_hf import train_tiny_tokenizer
    from transformers import AutoTokenizer

    tok_dir = train_tiny_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=3)
    request = GenerateRequest("p/g", [{"role": "user", "content": "q"}], 2, sp)
    # With a tokenizer the texts are decoded here from the returned token ids (EOS dropped), not
    # taken from the server's detokenizer.
    ids = [tok.encode("well said", add_special_tokens=False),
           tok.encode("fine", add_special_tokens=False) + [tok.eos_token_id]]
    _Stub.token_ids = ids
    plain = ServerChatEngine(stub, "m")
    assert plain.generate([request]) == [["q#0#3", "q#1#3"]] and plain.stats["server_texts"] == 2
    body = _Stub.calls[-1][1]
    assert "return_token_ids" not in body and {k: body[k] for k in NEUTRAL_SAMPLING} == NEUTRAL_SAMPLING
    local = ServerChatEngine(stub, "m", tokenizer=str(tok_dir))
    assert local.generate([request]) == [[tok.decode(ids[0], skip_special_tokens=True), "fine"]]
    assert _Stub.calls[-1][1]["return_token_ids"] is True and local.stats["server_texts"] == 0


def test_the_same_token_ids_give_the_same_text_through_server_and_vllm_engines(stub, tmp_path):
    """One decode rule (avr_megatron.engines.text) for every backend: the server client decoding
    the ids a server returned and the offline/async vLLM engines decoding vLLM's outputs give the
    same texts for the same ids: stop ids of the tokenizer AND of the generation config dropped,
    special tokens skipped, an incomplete UTF-8 sequence at the end written as U+FFFD."""
    from types import SimpleNamespace

    from avr_megatron.engines.vllm_async import AsyncVllmChatEngine
    from avr_megatron.engines.vllm_offline import VllmChatEngine
    from avr_megatron.testing.tiny_hf import train_tiny_tokenizer
    from transformers import AutoTokenizer

    tok_dir = train_tiny_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    eos = tok.eos_token_id
    stop = tok.encode(".", add_special_tokens=False)[0]  # a second stop id, named only by the generation config
    (tok_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, stop]}))
    cut = tok.encode("caf\u00e9 \u2615", add_special_tokens=False)[:-1]  # ends mid-character
    ids = [tok.encode("well said", add_special_tokens=False) + [eos],
           tok.encode("fine", add_special_tokens=False) + [stop],
           [tok.bos_token_id] + cut]
    expected = [tok.decode(tok.encode("well said", add_special_tokens=False)), "fine",
                tok.decode(cut)]
    assert expected[2].endswith("\ufffd")
    request = GenerateRequest("p/g", [{"role": "user", "content": "q"}], 3,
                              SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=3))

    _Stub.token_ids = ids
    server = ServerChatEngine(stub, "m", tokenizer=str(tok_dir))
    assert server.generate([request]) == [expected]

    # The offline engine on what vllm.LLM returns for the same samples (a RequestOutput's
    # completions, in any order); vLLM reads the stop ids from the same generation_config.json.
    offline = VllmChatEngine.__new__(VllmChatEngine)
    vllm_config = SimpleNamespace(max_model_len=64, try_get_generation_config=lambda: {"eos_token_id": [eos, stop]})
    offline._setup(tok, vllm_config)
    output = SimpleNamespace(outputs=[SimpleNamespace(index=j, token_ids=ids[j]) for j in (2, 0, 1)])
    assert offline._decode(offline._token_ids(request, output)) == expected
    # The async engine decodes through the offline engine's methods (subclass, nothing overridden).
    assert AsyncVllmChatEngine._decode is VllmChatEngine._decode
    assert AsyncVllmChatEngine._token_ids is VllmChatEngine._token_ids
