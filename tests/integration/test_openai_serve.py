"""A model served over OpenAI's API by the Serve app (ingress + engine replica + expert actors), talked to with the
official `openai` client: greedy answers equal transformers' `generate` under concurrency, streaming and not;
errors in OpenAI's shape; an expert actor or the engine replica killed mid-stream loses nothing."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
import urllib.request

import pytest
import ray
import torch

from expertray.api import launch
from expertray.config import ClusterConfig
from expertray.models.synthetic import tiny_model, write_tiny_checkpoint, write_tiny_tokenizer

pytestmark = pytest.mark.ray
openai = pytest.importorskip("openai")
FAMILY, SEED, KEY = "qwen3_moe", 7, "sk-test-key"
OVERRIDES = {"max_position_embeddings": 192}


@pytest.fixture(scope="module")
def app(ray_session, serve_port, tmp_path_factory):
    from ray import serve

    from expertray.serve.layers import run_app

    path = write_tiny_checkpoint(FAMILY, tmp_path_factory.mktemp("served") / "tiny-qwen", torch.float32, SEED,
                                 overrides=OVERRIDES)
    write_tiny_tokenizer(path)
    cluster = launch(ClusterConfig(model=str(path), num_expert_actors=2, actor_num_cpus=0.25), detached=False)
    base = run_app(serve_port, model=str(path), api_key=KEY, quiet=True, engine_replicas=2,
                   engine={"micro_batches": 2, "prefill_chunk_tokens": 16, "max_running": 8, "max_waiting": 4})
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
    yield client, base, cluster, path.name
    serve.delete("expertray")
    cluster.shutdown()


def _words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


_REF: list = []


def _greedy(prompt: list[int], n: int) -> str:
    """transformers' greedy continuation, as the served tokenizer writes it (w0 is its special unknown token)."""
    if not _REF:
        _REF.append(tiny_model(FAMILY, SEED, OVERRIDES).eval())
    with torch.no_grad():
        out = _REF[0].generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return _words([i for i in out[0, len(prompt):].tolist() if i != 0])


def _ask(client, name: str, prompt: list[int], n: int, stream: bool, delay_s: float = 0.0) -> tuple[str, str]:
    time.sleep(delay_s)
    if not stream:
        r = client.completions.create(model=name, prompt=_words(prompt), max_tokens=n, temperature=0)
        assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == n
        return r.choices[0].text, r.choices[0].finish_reason
    return _stream(client, name, prompt, n, [])


def test_concurrent_greedy_completions_equal_transformers(app, until) -> None:
    client, _, cluster, name = app
    g = torch.Generator().manual_seed(3)
    jobs = [(torch.randint(5, 96, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist(),
             int(torch.randint(4, 24, (1,), generator=g))) for _ in range(10)]
    with cf.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda j: _ask(client, name, *j[1], stream=j[0] % 2 == 1, delay_s=0.05 * j[0]),
                                enumerate(jobs)))
    for (prompt, n), (text, finish) in zip(jobs, answers):
        assert text == _greedy(prompt, n) and finish == "length"
    # both engine replicas report to the controller: `expertray status` shows them beside the experts
    def reported() -> list | None:
        engines = cluster.status()["engines"]
        return engines if sum(e["finished"] for e in engines) >= len(jobs) else None

    assert len(until(reported, 30, "engine replicas in status with every request finished")) == 2


def test_chat_streams_role_then_content_and_usage(app) -> None:
    client, _, _, name = app
    messages = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w5 w6 w7"}]
    prompt = [2, 9, 3, 5, 6, 7, 4]  # the tiny tokenizer's chat template
    want = _greedy(prompt, 6)
    whole = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0)
    assert whole.choices[0].message.content == want and whole.usage.prompt_tokens == len(prompt)
    chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    stop_at = want.split()[2]
    stopped = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0,
                                             stop=[stop_at])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == want[:want.index(stop_at)]


def test_errors_come_in_openai_shape_with_the_right_status(app) -> None:
    client, base, _, name = app
    assert [m.id for m in client.models.list().data] == [name]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="w1", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context too long"):
        client.completions.create(model=name, prompt="w1 w2", max_tokens=500)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=name, prompt="w1", max_tokens=2, temperature=5)
    anonymous = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.completions.create(model=name, prompt="w1", max_tokens=2)
    req = urllib.request.Request(f"{base}/v1/completions", data=b"{broken", method="POST",
                                 headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400 and "malformed JSON" in json.loads(err.value.read())["error"]["message"]


def _stream(client, name: str, prompt: list[int], n: int, progress: list[str]) -> tuple[str, str]:
    """A streamed completion's (text, finish reason); each piece is appended to `progress` as it arrives."""
    text, finish = "", None
    for chunk in client.completions.create(model=name, prompt=_words(prompt), max_tokens=n, temperature=0,
                                           stream=True):
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
            progress.append(choice.text)
    return text, finish


def _busy_engine_replica(cluster, until) -> str:
    """The actor name of an engine replica running sequences, from the replicas' reports to the controller (a
    call through the deployment's handle would go to the least busy replica)."""
    def busy() -> str | None:
        running = [e["actor"] for e in cluster.status()["engines"] if e["running"] > 0 and e["reported_s_ago"] < 2.5]
        return running[0] if running else None

    return until(busy, 20, "an engine replica reporting running sequences")


@pytest.mark.parametrize("victim", ["expert", "engine"])
def test_a_killed_expert_actor_or_engine_replica_loses_no_request(app, until, victim) -> None:
    """Streams running while the piece dies: each finishes with its full greedy answer, no token repeated."""
    client, _, cluster, name = app
    jobs = [([5 + i, 17, 3 + i], 150) for i in range(4)]
    progress: list[list[str]] = [[] for _ in jobs]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(_stream, client, name, p, n, progress[i]) for i, (p, n) in enumerate(jobs)]
        deadline = time.monotonic() + 60
        while min(len(p) for p in progress) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert min(len(p) for p in progress) >= 5, "streams did not start"
        if victim == "expert":
            ray.kill(ray.get_actor("expertray-expert-1", namespace="expertray"), no_restart=True)
        else:
            ray.kill(ray.get_actor(_busy_engine_replica(cluster, until), namespace="serve"), no_restart=True)
        answers = [f.result(timeout=240) for f in futures]
    for (prompt, n), (text, finish) in zip(jobs, answers):
        assert finish == "length" and text == _greedy(prompt, n), prompt


def test_a_client_that_goes_away_frees_its_sequence(app, until) -> None:
    client, _, cluster, name = app
    stream = client.completions.create(model=name, prompt="w5 w6", max_tokens=170, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the HTTP connection goes; the engine must drop the sequence, not decode 170 tokens

    def idle() -> list | None:
        engines = cluster.status()["engines"]
        fresh = [e for e in engines if e["reported_s_ago"] < 2.5]
        return fresh if len(fresh) == 2 and all(e["running"] == 0 for e in fresh) else None

    engines = until(idle, 20, "engines idle after the client left")
    assert sum(e["cancelled"] for e in engines) >= 1


def test_random_request_bodies_never_5xx_and_errors_keep_openai_shape(app) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    _, base, _, name = app
    scalars = st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=True) | st.text(max_size=6)
    near_valid = st.fixed_dictionaries(
        {"model": st.sampled_from([name, "", "x"]) | scalars},
        optional={"prompt": st.text(max_size=12) | st.lists(st.integers(-2, 200), max_size=5) | scalars,
                  "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "bot"]) | scalars,
                                                              "content": st.text(max_size=8) | scalars}), max_size=2)
                  | scalars,
                  "max_tokens": st.integers(-2, 3) | scalars, "temperature": st.floats(-1, 3) | scalars,
                  "top_p": st.floats(-1, 2) | scalars, "stop": st.lists(st.text(max_size=3), max_size=6) | scalars,
                  "n": st.integers(0, 3), "stream": st.booleans(), "seed": st.integers(-5, 2**70) | scalars})

    @settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(["completions", "chat/completions"]), doc=near_valid | scalars)
    def check(route: str, doc) -> None:
        req = urllib.request.Request(f"{base}/v1/{route}", data=json.dumps(doc).encode(), method="POST",
                                     headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as reply:
                assert reply.status == 200
                reply.read()
        except urllib.error.HTTPError as err:
            assert err.code < 500, (err.code, doc)
            assert json.loads(err.read())["error"]["message"], doc

    check()


def test_overload_is_shed_with_429_and_retry_after_and_the_rest_is_served(app) -> None:
    """More requests than the engines run and queue (2 replicas x (8 running + 4 waiting)): the excess gets 429
    with Retry-After at once, before any memory is taken; every admitted request finishes."""
    _, base, _, name = app
    body = json.dumps({"model": name, "prompt": "w5 w6 w7", "max_tokens": 40, "temperature": 0}).encode()

    def one(_: int) -> tuple[int, str | None]:
        req = urllib.request.Request(f"{base}/v1/completions", data=body, method="POST",
                                     headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as reply:
                return reply.status, json.loads(reply.read())["choices"][0]["finish_reason"]
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("retry-after")

    with cf.ThreadPoolExecutor(48) as pool:
        outcomes = list(pool.map(one, range(48)))
    codes = [c for c, _ in outcomes]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1 and codes.count(200) >= 16, codes
    assert all(extra == "1" for c, extra in outcomes if c == 429)
    assert all(extra == "length" for c, extra in outcomes if c == 200)
