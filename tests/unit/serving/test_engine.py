"""The engine against transformers' own greedy `generate`, one prompt at a time: continuous batching (requests
arriving while others decode), chunked prefill, ping-pong micro-batches and preemption change no token."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from expertray.errors import BackpressureError, ConfigError, InputError, RequestTimeoutError
from expertray.models.synthetic import tiny_model, write_tiny_checkpoint
from expertray.serving.engine import EngineConfig, Event
from expertray.serving.loader import in_process_runners, load_engine
from expertray.serving.sampling import SamplingParams

CONTEXT = {"max_position_embeddings": 160}


class Collector:
    """Events of many requests; `wait` until all have finished (or failed)."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.finish: dict[int, str | BaseException] = {}
        self.lock = threading.Condition()

    def callback(self, key: int):
        self.tokens[key] = []

        def emit(event: Event) -> None:
            with self.lock:
                self.tokens[key].extend(event.token_ids)
                if event.error is not None or event.finish_reason is not None:
                    self.finish[key] = event.error or event.finish_reason
                    self.lock.notify_all()
        return emit

    def wait(self, n: int, timeout_s: float = 120.0) -> None:
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.finish) >= n, timeout_s), self.finish


def _requests(seed: int, n: int) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt_len, new = int(torch.randint(1, 48, (1,), generator=g)), int(torch.randint(1, 28, (1,), generator=g))
        out.append((torch.randint(2, 96, (prompt_len,), generator=g).tolist(), new))
    return out


def _reference(family: str, seed: int, prompt: list[int], new: int) -> list[int]:
    model = _REFS.setdefault((family, seed), tiny_model(family, seed, CONTEXT).eval())
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=new, min_new_tokens=new)
    return out[0, len(prompt):].tolist()


_REFS: dict = {}


def _settled(engine, timeout_s: float = 30.0) -> dict:
    """The engine's stats once nothing runs or waits (a finished request's last event comes just before its
    sequence leaves)."""
    deadline = time.monotonic() + timeout_s
    while (engine.stats()["running"] or engine.stats()["waiting"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.stats()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine")
    return {f: write_tiny_checkpoint(f, root / f, torch.float32, seed=5, overrides=CONTEXT)
            for f in ("qwen3_moe", "deepseek_v3", "gpt_oss", "mixtral")}


@pytest.mark.parametrize("family,micro_batches,kv_budget", [
    ("qwen3_moe", 2, 65536), ("deepseek_v3", 2, 65536), ("gpt_oss", 2, 65536), ("mixtral", 1, 65536),
    ("gpt_oss", 1, 120),  # sliding window 16 < contexts; a small KV budget forces preemption and recompute
])
def test_greedy_equals_transformers_generate_under_continuous_batching(checkpoints, family, micro_batches,
                                                                        kv_budget) -> None:
    engine = load_engine(str(checkpoints[family]), in_process_runners(micro_batches),
                         EngineConfig(micro_batches=micro_batches, prefill_chunk_tokens=9, kv_budget_tokens=kv_budget))
    requests = _requests(seed=11, n=10)
    got = Collector()
    try:
        for i, (prompt, new) in enumerate(requests):  # arrivals spread over the first steps
            engine.submit(prompt, SamplingParams(max_tokens=new, temperature=0.0), got.callback(i))
            time.sleep(0.003 * i)
        got.wait(len(requests))
        stats = _settled(engine)
    finally:
        engine.stop()
    for i, (prompt, new) in enumerate(requests):
        assert got.finish[i] == "length", (i, got.finish[i])
        assert got.tokens[i] == _reference(family, 5, prompt, new), f"request {i} (prompt {len(prompt)}, {new} new)"
    assert stats["finished"] == len(requests) and stats["running"] == 0 and stats["kv_used"] == 0
    assert stats["output_tokens"] == sum(n for _, n in requests)
    if kv_budget < 1000:
        assert stats["preempted"] > 0
    if micro_batches == 1:
        assert stats["overlap"] == 0.0


@pytest.fixture(scope="module")
def engine(checkpoints):
    engine = load_engine(str(checkpoints["qwen3_moe"]), in_process_runners(2),
                         EngineConfig(max_running=2, max_waiting=1, prefill_chunk_tokens=16, micro_batches=2))
    yield engine
    engine.stop()


def test_refuses_what_it_can_never_serve(engine) -> None:
    params = SamplingParams(max_tokens=4, temperature=0.0)
    with pytest.raises(InputError, match="token id 96 is outside the vocabulary"):
        engine.submit([1, 96], params, lambda e: None)
    with pytest.raises(InputError, match="no tokens"):
        engine.submit([], params, lambda e: None)
    with pytest.raises(InputError, match="context too long: 150 prompt tokens \\+ max_tokens 20 = 170 > the model's "
                                         "context of 160"):
        engine.submit([3] * 150, SamplingParams(max_tokens=20), lambda e: None)
    with pytest.raises(ConfigError, match="request.max_tokens: must be an integer >= 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ConfigError, match="request.top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="engine.micro_batches: must be an integer >= 1"):
        EngineConfig(micro_batches=0)


def test_queue_full_is_backpressure_and_cancel_frees_at_once(engine) -> None:
    got = Collector()
    long = SamplingParams(max_tokens=140, temperature=0.0)
    ids = [engine.submit([5, 6, 7], long, got.callback(i)) for i in range(3)]  # 2 running + 1 waiting
    with pytest.raises(BackpressureError, match="engine overloaded: 3 requests waiting"):
        engine.submit([5], long, lambda e: None)
    for sid in ids:
        engine.cancel(sid)
    stats = _settled(engine)
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_used"] == 0
    assert all(len(got.tokens[i]) < 140 for i in range(3))


def test_seeded_sampling_repeats_and_differs_by_seed(engine) -> None:
    def sample(seed: int) -> list[int]:
        got = Collector()
        engine.submit([9, 8, 7], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=seed),
                      got.callback(0))
        got.wait(1)
        return got.tokens[0]

    first = sample(1)
    assert sample(1) == first and len(first) == 12
    assert any(sample(s) != first for s in (2, 3, 4))


def test_a_failing_cluster_call_fails_its_requests_with_the_cause_and_the_engine_goes_on(checkpoints) -> None:
    class Flaky:
        def __init__(self, inner) -> None:
            self.inner, self.cfg, self.fail = inner, inner.cfg, False

        def forward(self, layer, hidden):
            if self.fail:
                raise TimeoutError("expert-1 did not answer")
            return self.inner.forward(layer, hidden)

        def shutdown(self) -> None:
            self.inner.shutdown()

    runners = {}

    def make(descriptor, cfg):
        runners["flaky"] = Flaky(in_process_runners(1)(descriptor, cfg)[0])
        return [runners["flaky"]]

    engine = load_engine(str(checkpoints["qwen3_moe"]), make, EngineConfig(micro_batches=1))
    try:
        runners["flaky"].fail = True
        got = Collector()
        engine.submit([4, 5], SamplingParams(max_tokens=3, temperature=0.0), got.callback(0))
        got.wait(1)
        assert isinstance(got.finish[0], TimeoutError) and "expert-1" in str(got.finish[0])
        runners["flaky"].fail = False
        engine.submit([4, 5], SamplingParams(max_tokens=3, temperature=0.0), got.callback(1))
        got.wait(2)
        assert got.finish[1] == "length" and len(got.tokens[1]) == 3
        assert engine.stats()["failed"] == 1
    finally:
        engine.stop()


def test_a_model_whose_cache_is_not_key_value_attention_is_refused_by_name(tmp_path) -> None:
    path = write_tiny_checkpoint("qwen3_next", tmp_path / "next", torch.float32)
    with pytest.raises(ConfigError, match="linear_attention keep a cache the batched engine cannot hold"):
        load_engine(str(path), in_process_runners(1), EngineConfig(micro_batches=1))


def test_bfloat16_tokens_part_from_the_reference_only_at_its_own_near_ties(tmp_path) -> None:
    """bf16 serving under continuous batching: greedy tokens equal transformers' bf16 `generate`, or part from
    it first at a step where the reference's own top-2 logit margin is within its bf16 error (a tie either
    choice may take)."""
    from transformers import AutoModelForCausalLM

    path = write_tiny_checkpoint("qwen3_moe", tmp_path / "bf16", torch.bfloat16, seed=5, overrides=CONTEXT)
    ref_bf16 = AutoModelForCausalLM.from_pretrained(path).eval()
    ref_fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    requests = _requests(seed=21, n=6)
    engine = load_engine(str(path), in_process_runners(1), EngineConfig(prefill_chunk_tokens=9))
    got = Collector()
    try:
        for i, (prompt, new) in enumerate(requests):
            engine.submit(prompt, SamplingParams(max_tokens=new, temperature=0.0), got.callback(i))
        got.wait(len(requests))
    finally:
        engine.stop()
    for i, (prompt, new) in enumerate(requests):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = ref_bf16.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                                    min_new_tokens=new, output_scores=True, return_dict_in_generate=True)
            ref_err = float((ref_bf16(ids).logits.float() - ref_fp32(ids).logits).abs().max())
        want = out.sequences[0, len(prompt):].tolist()
        differ = [s for s, (a, b) in enumerate(zip(got.tokens[i], want)) if a != b]
        if differ:
            top2 = out.scores[differ[0]][0].float().topk(2).values
            assert float(top2[0] - top2[1]) <= 2 * ref_err, f"request {i} parts at step {differ[0]}"
        assert len(got.tokens[i]) == new


def test_a_forward_past_step_timeout_fails_its_requests_with_a_timeout(checkpoints) -> None:
    class Hung:
        def __init__(self, inner) -> None:
            self.inner, self.cfg = inner, inner.cfg

        def forward(self, layer, hidden):
            time.sleep(1.0)  # an MoE call that never comes back in time
            return self.inner.forward(layer, hidden)

        def shutdown(self) -> None:
            self.inner.shutdown()

    engine = load_engine(str(checkpoints["qwen3_moe"]),
                         lambda d, c: [Hung(in_process_runners(1)(d, c)[0])], EngineConfig(step_timeout_s=0.2))
    got = Collector()
    try:
        engine.submit([4, 5], SamplingParams(max_tokens=3, temperature=0.0), got.callback(0))
        got.wait(1, timeout_s=30)
    finally:
        engine.stop()
    assert isinstance(got.finish[0], RequestTimeoutError) and "step_timeout_s=0.2" in str(got.finish[0])
