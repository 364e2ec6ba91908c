"""The LLM-judge scorer: prompt and verdict parsing exactly, a real local OpenAI-compatible server process with
scripted verdicts and failures, the offline transformers backend on a tiny random model, config validation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from trl_lifealign.lifelong.generation import Scorer
from trl_lifealign.lifelong.judge import (
    FAILURE_KINDS,
    JUDGE_TEMPLATE,
    JudgeError,
    JudgeScorer,
    OpenAIBackend,
    TransformersBackend,
    build_judge_messages,
    parse_verdict,
    rating_to_points,
    render_text,
)

SERVER = Path(__file__).with_name("_fake_judge_server.py")


# ---------------------------------------------------------------------------------------------------------------
# Prompt and verdict


def test_prompt_holds_the_full_query_reference_and_answer_exactly():
    query = "Tell me about rivers. " * 500 + "END-OF-QUERY"  # ~11k characters: nothing may be cut
    messages = build_judge_messages(query, "Rivers flow to the sea.", "They are wet.")
    assert messages == [{"role": "user", "content": JUDGE_TEMPLATE.format(
        query=query, reference="Rivers flow to the sea.", answer="They are wet.")}]
    content = messages[0]["content"]
    assert f"[User query]\n{query}\n[End of user query]" in content
    assert "[Reference answer]\nRivers flow to the sea.\n[End of reference answer]" in content
    assert "[Assistant's answer]\nThey are wet.\n[End of assistant's answer]" in content
    assert content.startswith("Please act as an impartial judge")
    assert content.endswith("on a final line in exactly this format:\nScore: <integer from 1 to 10>")


def test_braces_in_texts_are_kept_verbatim_and_message_lists_are_rendered():
    content = build_judge_messages("{answer} {0}", "{query}", "x = {'a': 1}")[0]["content"]
    assert "[User query]\n{answer} {0}\n" in content and "[Reference answer]\n{query}\n" in content
    assert "[Assistant's answer]\nx = {'a': 1}\n" in content
    dialogue = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "How tall is Everest?"}]
    assert render_text(dialogue) == "User: Hi\n\nAssistant: Hello\n\nUser: How tall is Everest?"
    assert render_text([{"role": "assistant", "content": "8849 m."}]) == "8849 m."


@pytest.mark.parametrize("text, rating", [
    ("Good answer.\nScore: 7", 7),
    ("Score: 10", 10),
    ("Score: 1", 1),
    ("score: 3/10", 3),
    ("SCORE:4", 4),
    ("Fine.\n**Score:** 6", 6),
    ("**Score: 9**", 9),
    ("Score: 8.", 8),
    ("  Score:  5  \n", 5),
    ("Score: 2\nOn reflection it is better.\nScore: 6", 6),  # several Score lines: the last one
    ("Score: 7\nThe answer is fine.", 7),  # text after the Score line is allowed
    ("Score: 11", None),  # out of range
    ("Score: 0", None),
    ("Score: 7.5", None),
    ("Score: 8 out of 10", None),
    ("Score: 3/5", None),
    ("Score: seven", None),
    ("Score: 7\nScore: 12", None),  # an ill-formed last Score line does not fall back to an earlier one
    ("I would give it a 7.", None),
    ("Final score: 7", None),  # the line must start with 'Score:'
    ("Rating: 7", None),
    ("", None),
    (None, None),
])
def test_parse_verdict(text, rating):
    assert parse_verdict(text) == rating


def test_rating_maps_linearly_onto_0_100():
    assert rating_to_points(1) == 0.0 and rating_to_points(10) == 100.0
    assert rating_to_points(7) == pytest.approx(200 / 3)


# ---------------------------------------------------------------------------------------------------------------
# A real OpenAI-compatible server process


@pytest.fixture(scope="module")
def server_url():
    process = subprocess.Popen([sys.executable, str(SERVER)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def server(server_url):
    """The server's base URL after clearing its request log and counters; `requests()` reads the log."""
    urllib.request.urlopen(urllib.request.Request(server_url + "/_reset", data=b"{}", method="POST"), timeout=5)

    class Handle:
        url = server_url
        v1 = server_url + "/v1"

        @staticmethod
        def requests() -> list[dict]:
            with urllib.request.urlopen(server_url + "/_requests", timeout=5) as response:
                return json.loads(response.read())

    return Handle


def _scorer(url: str, **overrides) -> JudgeScorer:
    config = {"backend": "openai", "base_url": url, "model": "judge-model", "api_key_env": "LIFEALIGN_TEST_JUDGE_KEY",
              "timeout": 0.5, "max_retries": 1, "backoff": 0.01, "max_tokens": 64, "concurrency": 4, **overrides}
    return JudgeScorer.from_config(config)


def test_scripted_verdicts_failures_and_retries(server, monkeypatch):
    monkeypatch.delenv("LIFEALIGN_TEST_JUDGE_KEY", raising=False)
    answers = ["[[ok:7]]", "[[noscore:_]]", "[[once500:4]]", "[[sleep:9]]", "[[once429:10]]", "   ",
               "[[always429:_]]", "[[bad400:_]]", "[[notchat:_]]"]
    scorer = _scorer(server.v1)
    assert isinstance(scorer, Scorer) and scorer.name == "judge"
    value = scorer.score([f"q{i}" for i in range(len(answers))], answers, [f"r{i}" for i in range(len(answers))])

    result = scorer.last_result
    assert result.ratings == [7, None, 4, None, 10, None, None, None, None]
    assert result.scores == pytest.approx([200 / 3, None, 100 / 3, None, 100.0, 0.0, None, None, None])
    assert result.kinds == [None, "unparseable", None, "timeout", None, "empty_answer", "http_error", "http_error",
                            "http_error"]
    assert result.failures == {"timeout": 1, "http_error": 3, "unparseable": 1, "empty_answer": 1}
    assert result.valid == 4 and result.excluded == 5
    # Judge failures are excluded from the mean; the empty answer counts as the minimum.
    assert value == pytest.approx((200 / 3 + 100 / 3 + 100.0 + 0.0) / 4) == result.score
    assert result.verdicts[0] == "The answer is acceptable.\nScore: 7" and result.verdicts[3] is None
    assert "HTTP 429" in result.details[6] and "HTTP 400" in result.details[7] and "not a chat" in result.details[8]
    assert result.summary() == {"score": value, "items": 9, "valid": 4, "excluded": 5,
                                "failures": result.failures}
    assert scorer.history == [result]

    sent = [r["body"]["messages"][-1]["content"] for r in server.requests()]
    attempts = {marker: sum(marker in content for content in sent) for marker in answers}
    # The empty answer is never sent; 429/5xx/timeouts are retried once (max_retries=1); 400 and bad JSON are not.
    assert attempts == {"[[ok:7]]": 1, "[[noscore:_]]": 1, "[[once500:4]]": 2, "[[sleep:9]]": 2,
                        "[[once429:10]]": 2, "   ": 0, "[[always429:_]]": 2, "[[bad400:_]]": 1,
                        "[[notchat:_]]": 1}
    assert all("authorization" not in {k.lower() for k in r["headers"]} for r in server.requests())


def test_request_payload_and_api_key_from_the_named_env_var(server, monkeypatch):
    monkeypatch.setenv("LIFEALIGN_TEST_JUDGE_KEY", "sk-test-123")
    monkeypatch.setenv("OPENAI_API_KEY", "must-not-be-used")
    query = "Explain tides in detail. " * 400 + "QUERY-TAIL"
    reference, answer = "The moon's gravity pulls the oceans.", "Tides come from the moon. [[ok:9]]"
    scorer = _scorer(server.url + "/v1/", max_tokens=48)  # a trailing slash is fine
    assert scorer.score([query], [answer], [reference]) == pytest.approx(800 / 9)

    [request] = server.requests()
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test-123"
    assert request["headers"]["Content-Type"] == "application/json"
    body = request["body"]
    assert body == {"model": "judge-model", "temperature": 0, "max_tokens": 48, "stream": False,
                    "messages": build_judge_messages(query, reference, answer)}
    content = body["messages"][0]["content"]
    assert query in content and reference in content and answer in content


def test_every_item_failing_raises_with_the_counts(server):
    scorer = _scorer(server.v1)
    with pytest.raises(JudgeError, match=r"no item of 2 got a valid verdict.*'unparseable': 2") as caught:
        scorer.score(["a", "b"], ["[[noscore:_]]", "[[raw:Looks_fine]]"], ["x", "y"])
    assert caught.value.result is scorer.last_result
    assert scorer.last_result.failures["unparseable"] == 2 and scorer.last_result.valid == 0
    assert scorer.last_result.verdicts[1] == "Looks fine"
    with pytest.raises(JudgeError, match="no items"):
        scorer.score([], [], [])
    # All answers empty is a real (minimum) score, not a judge failure, and needs no request.
    assert scorer.score(["a", "b"], ["", " \n"], ["x", "y"]) == 0.0
    assert scorer.last_result.failures == dict.fromkeys(FAILURE_KINDS, 0) | {"empty_answer": 2}
    with pytest.raises(ValueError, match="lengths must match"):
        scorer.score(["a"], ["b", "c"], ["d"])


def test_unreachable_server_is_an_http_error_not_a_crash():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = JudgeScorer(OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff=0.01)).judge(
        ["q"], ["a"], ["r"])
    assert result.kinds == ["http_error"] and "connection error" in result.details[0]


# ---------------------------------------------------------------------------------------------------------------
# The offline transformers backend


@pytest.fixture
def judge_tokenizer():
    from trl_lifealign.tiny import train_tokenizer

    texts = [JUDGE_TEMPLATE, "Score: 8", "What colour is the sky? The sky is blue. It is blue."]
    return train_tokenizer(texts, vocab_size=300)


def test_random_local_judge_is_counted_unparseable_not_scored(judge_tokenizer):
    from trl_lifealign.tiny import build_tiny_llama

    model = build_tiny_llama(judge_tokenizer, seed=0)
    scorer = JudgeScorer(TransformersBackend(model, judge_tokenizer, batch_size=2, max_new_tokens=6))
    # Only the empty answer (scored 0) is in the mean; the two random verdicts are excluded.
    assert scorer.score(["Sky?"] * 3, ["It is blue.", "Blue.", ""], ["The sky is blue."] * 3) == 0.0
    result = scorer.last_result
    assert result.failures == {"timeout": 0, "http_error": 0, "unparseable": 2, "empty_answer": 1}
    assert result.valid == 1 and result.scores == [None, None, 0.0]
    assert all(isinstance(v, str) for v in result.verdicts[:2])  # the raw text is kept for inspection
    with pytest.raises(JudgeError, match="'unparseable': 2"):
        scorer.score(["Sky?"] * 2, ["It is blue.", "Blue."], ["The sky is blue."] * 2)


def test_scripted_local_generation_parses_through_the_chat_template(judge_tokenizer, monkeypatch):
    from trl_lifealign.tiny import build_tiny_llama

    model = build_tiny_llama(judge_tokenizer, seed=0)
    verdict_ids = judge_tokenizer("Looks right.\nScore: 8", add_special_tokens=False, return_tensors="pt").input_ids
    calls = []

    def scripted_generate(input_ids, attention_mask=None, **kwargs):
        calls.append((judge_tokenizer.batch_decode(input_ids, skip_special_tokens=True), kwargs))
        return torch.cat([input_ids, verdict_ids.repeat(input_ids.shape[0], 1)], dim=1)

    monkeypatch.setattr(model, "generate", scripted_generate)
    scorer = JudgeScorer(TransformersBackend(model, judge_tokenizer, batch_size=2, max_new_tokens=12))
    value = scorer.score(["Sky colour?"] * 3, ["Blue.", "It is blue.", "Blue!"], ["The sky is blue."] * 3)
    assert value == pytest.approx(700 / 9)
    assert scorer.last_result.ratings == [8, 8, 8] and scorer.last_result.verdicts[0] == "Looks right.\nScore: 8"
    assert [len(texts) for texts, _ in calls] == [2, 1]  # batch_size
    texts, kwargs = calls[0]
    assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] == 12
    expected = build_judge_messages("Sky colour?", "The sky is blue.", "Blue.")[0]["content"]
    assert texts[0] == f"user: {expected}\nassistant:"  # the tiny chat template, full prompt


def test_local_judge_from_a_model_folder_never_downloads(judge_tokenizer, tmp_path):
    from trl_lifealign.tiny import build_tiny_llama

    build_tiny_llama(judge_tokenizer, seed=1).save_pretrained(tmp_path)
    judge_tokenizer.save_pretrained(tmp_path)
    scorer = JudgeScorer.from_config({"backend": "transformers", "model": str(tmp_path), "batch_size": 2,
                                      "max_new_tokens": 4, "device": "cpu", "dtype": "float32"})
    result = scorer.judge(["q"], ["a"], ["r"])
    assert result.failures["unparseable"] == 1 and isinstance(result.verdicts[0], str)
    with pytest.raises(ValueError, match="model: .* not a local model folder"):
        JudgeScorer.from_config({"backend": "transformers", "model": "HuggingFaceTB/SmolLM2-135M-Instruct"})


# ---------------------------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize("config, message", [
    ({"backend": "openai", "model": "m"}, "base_url: required"),
    ({"backend": "openai", "base_url": "http://x/v1"}, "model: required"),
    ({"backend": "anthropic", "model": "m"}, "backend: expected one of"),
    ({"model": "m"}, "backend: expected one of"),
    ({"backend": "openai", "base_url": "u", "model": "m", "timout": 3}, "timout: unknown key"),
    ({"backend": "openai", "base_url": "u", "model": "m", "timeout": "30"}, "timeout: expected int or float"),
    ({"backend": "openai", "base_url": "u", "model": "m", "timeout": 0}, "timeout: must be > 0"),
    ({"backend": "openai", "base_url": "u", "model": "m", "max_retries": True}, "max_retries: expected int"),
    ({"backend": "openai", "base_url": "u", "model": "m", "max_retries": -1}, "max_retries: must be >= 0"),
    ({"backend": "openai", "base_url": "u", "model": "m", "concurrency": 2.5}, "concurrency: expected int"),
    ({"backend": "openai", "base_url": "u", "model": "m", "api_key_env": None}, "api_key_env: expected str"),
    ({"backend": "openai", "base_url": "u", "model": "m", "batch_size": 2}, "batch_size: unknown key"),
    ({"backend": "openai", "base_url": "u", "model": "m", "template": "{query} {answer}"},
     r"template: missing field\(s\) \{reference\}"),
    ({"backend": "openai", "base_url": "u", "model": "m", "template": "{query} {reference} {answer} {score}"},
     r"template: only \{query\}, \{reference\}, \{answer\} may be in braces"),
    ({"backend": "transformers", "model": "/nonexistent/judge"}, "model: '/nonexistent/judge' is not a local"),
    ({"backend": "transformers", "model": ".", "dtype": "int8"}, "dtype: expected one of"),
    ({"backend": "transformers", "model": ".", "base_url": "u"}, "base_url: unknown key"),
    ("backend=openai", "expected a mapping"),
])
def test_config_errors_name_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        JudgeScorer.from_config(config)


def test_config_builds_the_openai_backend():
    scorer = JudgeScorer.from_config({"backend": "openai", "base_url": "http://h:1/v1/chat/completions",
                                      "model": "m", "timeout": 5, "template": "Q {query} R {reference} A {answer}"})
    backend = scorer.backend
    assert isinstance(backend, OpenAIBackend) and backend.url == "http://h:1/v1/chat/completions"
    assert (backend.api_key_env, backend.timeout, backend.max_retries, backend.concurrency) == \
        ("OPENAI_API_KEY", 5, 3, 4)
    assert build_judge_messages("q", "r", "a", scorer.template)[0]["content"] == "Q q R r A a"


# ---------------------------------------------------------------------------------------------------------------
# Optional: a real llama.cpp server (llama-cpp-python[server]) serving a small GGUF judge


@pytest.mark.slow
def test_llama_cpp_server_round_trip(tmp_path):
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] not installed")
    gguf = os.environ.get("LIFEALIGN_JUDGE_GGUF", "")
    if not Path(gguf).is_file():
        pytest.skip("set LIFEALIGN_JUDGE_GGUF to a GGUF chat model (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115  (the server process writes to it until the test ends)
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
                                "--port", str(port), "--n_ctx", "4096", "--model_alias", "smol-judge"],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"llama.cpp server did not start:\n{(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        scorer = JudgeScorer.from_config({"backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                                          "model": "smol-judge", "timeout": 120, "max_tokens": 64,
                                          "concurrency": 1})
        result = scorer.judge(["What colour is the sky on a clear day?", "What is two plus two?"],
                              ["The sky is blue.", "Two plus two is five."], ["It is blue.", "Four."])
        # A 135M judge may not follow the format; what must hold is the plumbing: replies come back and every item
        # is either scored or counted unparseable, never an HTTP error or a timeout.
        assert result.failures["http_error"] == result.failures["timeout"] == 0, result.details
        assert all(isinstance(v, str) and v.strip() for v in result.verdicts)
        assert result.valid + result.failures["unparseable"] == 2
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
