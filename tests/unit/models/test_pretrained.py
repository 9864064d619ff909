"""from_pretrained on sharded tiny checkpoints of every family (in-process backend): greedy generation and
logits equal the unmodified transformers model in float32; in bfloat16 the logits stay within the
reference's own bfloat16 error and greedy tokens agree until a step where the reference itself is within
its bf16 error of a tie."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from expertray.config import ClusterConfig
from expertray.errors import CheckpointError, ConfigError
from expertray.models.pretrained import InProcessCluster, cluster_config, from_pretrained
from expertray.models.proxy import ClusterMoEProxy, find_moe_blocks
from expertray.models.synthetic import TINY_CONFIGS, write_tiny_checkpoint

tf = pytest.importorskip("transformers")

FAMILIES = sorted(TINY_CONFIGS)
NEW_TOKENS = 8


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(family, "float32" | "bfloat16") → a sharded checkpoint directory; the bf16 ones hold the same
    weights rounded to bf16 (config.json torch dtype bfloat16)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {(f, d): write_tiny_checkpoint(f, root / f"{f}-{d}", getattr(torch, d), seed=11)
            for f in FAMILIES for d in ("float32", "bfloat16")}


def _prompt() -> torch.Tensor:
    return torch.randint(2, 96, (2, 7), generator=torch.Generator().manual_seed(0))


def _greedy(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(new tokens [B, N], per-step logits [N, B, V] float32)."""
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits).float()


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_generation_equals_transformers(family: str, checkpoints) -> None:
    path = checkpoints[family, "float32"]
    ref = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    model, cluster = from_pretrained(str(path), backend="in_process")
    assert isinstance(cluster, InProcessCluster) and cluster.cfg.dtype == "float32"
    assert find_moe_blocks(model) == [] and cluster.cfg.num_layers == len(find_moe_blocks(ref))
    assert sum(isinstance(m, ClusterMoEProxy) for m in model.modules()) == cluster.cfg.num_layers
    assert not any(t.is_meta for t in model.state_dict().values())
    assert not [k for k in model.state_dict() if ".experts." in k or k.endswith((".gate.weight", ".router.weight"))]
    ids = _prompt()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    tokens, logits = _greedy(model, ids)
    ref_tokens, ref_logits = _greedy(ref, ids)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_within_reference_error(family: str, checkpoints) -> None:
    """Both bf16 runs are compared against a float32 run of the reference on the same (bf16-rounded)
    weights: expertray's error may not exceed the reference's own (mean 1.25x, max 2x: a max is one
    token's near-tie)."""
    path = checkpoints[family, "bfloat16"]
    ref_fp32 = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref_bf16 = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    model, cluster = from_pretrained(str(path), backend="in_process")
    assert cluster.cfg.dtype == "bfloat16" and cluster.layers[0].dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = _prompt()
    with torch.no_grad():
        exact = ref_fp32(ids).logits
        ref_err = (ref_bf16(ids).logits.float() - exact).abs()
        ours = model(ids).logits
    assert ours.dtype == torch.bfloat16
    err = (ours.float() - exact).abs()
    assert err.mean() <= 1.25 * ref_err.mean(), (err.mean(), ref_err.mean())
    assert err.max() <= 2 * ref_err.max(), (err.max(), ref_err.max())
    tokens, _ = _greedy(model, ids)
    ref_tokens, ref_logits = _greedy(ref_bf16, ids)
    # Greedy tokens may part only where the reference itself hesitated: at the first differing step its
    # top-2 logit margin must be within its own bf16 error (a tie either choice may take).
    top2 = ref_logits.topk(2, dim=-1).values  # [N, B, 2]
    for b in range(ids.shape[0]):
        differ = (tokens[b] != ref_tokens[b]).nonzero()
        if len(differ):
            step = int(differ[0, 0])
            margin = float(top2[step, b, 0] - top2[step, b, 1])
            assert margin <= 2 * float(ref_err.max()), f"sequence {b} parts at step {step}, margin {margin}"


def test_dtype_option_overrides_checkpoint(checkpoints) -> None:
    model, cluster = from_pretrained(str(checkpoints["mixtral", "bfloat16"]), backend="in_process", dtype="float32")
    assert cluster.cfg.dtype == "float32" and model.lm_head.weight.dtype == torch.float32
    assert cluster.layers[0].dtype == torch.float32


def test_cluster_options_are_validated_by_name(checkpoints) -> None:
    path = str(checkpoints["deepseek_v3", "float32"])
    cfg = cluster_config(path, num_expert_actors=3, capacity={"overflow": "drop", "factor": 2.0})
    assert (cfg.num_layers, cfg.layer.num_experts, cfg.layer.shared_d_ff, cfg.num_expert_actors) == (2, 8, 24, 3)
    assert cfg.layer.capacity.overflow == "drop" and cfg.layer.gate.family == "deepseek_v3"
    with pytest.raises(ConfigError, match="cluster.num_layers: comes from the checkpoint"):
        cluster_config(path, num_layers=4)
    with pytest.raises(ConfigError, match="num_expert_actorz: unknown field"):
        cluster_config(path, num_expert_actorz=4)
    with pytest.raises(ConfigError, match="cluster.dtype: 'int8' is not one of"):
        cluster_config(path, dtype="int8")
    with pytest.raises(ConfigError, match="backend 'gpu' is unknown"):
        from_pretrained(path, backend="gpu")


class RecordingBackend:
    """A backend whose runner serves `extra_layers` more layers than asked (so the swap fails)."""

    def __init__(self, extra_layers: int = 0) -> None:
        self.extra_layers = extra_layers
        self.started: list[ClusterConfig] = []
        self.shut_down = 0

    def __call__(self, descriptor, cfg: ClusterConfig) -> RecordingBackend:
        self.cfg = dataclasses.replace(cfg, num_layers=cfg.num_layers + self.extra_layers)
        self.started.append(cfg)
        return self

    def shutdown(self) -> None:
        self.shut_down += 1


def test_unreadable_dense_shard_fails_before_the_cluster_starts(checkpoints, tmp_path: Path) -> None:
    path = tmp_path / "broken"
    shutil.copytree(checkpoints["olmoe", "float32"], path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    (path / shard).write_bytes(b"")
    backend = RecordingBackend()
    with pytest.raises(CheckpointError, match=f"shard {shard} is truncated"):
        from_pretrained(str(path), backend=backend)
    assert backend.started == []


def test_missing_dense_tensor_fails_before_the_cluster_starts(checkpoints, tmp_path: Path) -> None:
    path = tmp_path / "no-norm"
    shutil.copytree(checkpoints["qwen3_moe", "float32"], path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"].pop("model.norm.weight")
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    state = load_file(str(path / shard))
    del state["model.norm.weight"]
    save_file(state, str(path / shard))
    backend = RecordingBackend()
    with pytest.raises(CheckpointError, match=r"tensor model.norm.weight \(needed by the model\) is in no shard"):
        from_pretrained(str(path), backend=backend)
    assert backend.started == []


def test_cluster_is_shut_down_when_the_swap_fails(checkpoints) -> None:
    backend = RecordingBackend(extra_layers=1)
    with pytest.raises(ConfigError, match="model has 3 sparse-MoE blocks but the cluster serves cluster.num_layers=4"):
        from_pretrained(str(checkpoints["mixtral", "float32"]), backend=backend)
    assert len(backend.started) == 1 and backend.shut_down == 1


def test_unsupported_moe_model_is_refused_by_name(tmp_path: Path) -> None:
    cfg = tf.Llama4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, intermediate_size_mlp=40,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              num_local_experts=4, num_experts_per_tok=1)
    tf.Llama4ForCausalLM(cfg).save_pretrained(tmp_path / "llama4")
    with pytest.raises(CheckpointError, match="architecture Llama4ForCausalLM is not supported"):
        from_pretrained(str(tmp_path / "llama4"), backend="in_process")


def test_generate_with_prompt_ids_and_with_a_tokenizer(checkpoints, tmp_path: Path) -> None:
    import expertray
    from expertray.models.generate import generate

    path = checkpoints["qwen3_moe", "float32"]
    ref = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = [5, 17, 3, 44]
    result = generate(str(path), prompt_ids=prompt, max_new_tokens=5, backend="in_process")
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)[0, 4:].tolist()
    assert result.new_ids == expected and result.text == "" and result.tokens_per_s > 0
    assert "5 new tokens" in result.summary() and " ".join(map(str, expected)) in result.summary()
    with pytest.raises(ConfigError, match="has no tokenizer"):
        generate(str(path), prompt="hello", backend="in_process")
    with pytest.raises(ConfigError, match="prompt token id 500 is outside the vocabulary"):
        generate(str(path), prompt_ids=[500], backend="in_process")

    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(96)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with_tok = tmp_path / "with-tokenizer"
    shutil.copytree(path, with_tok)
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    tokenizer.save_pretrained(with_tok)
    model_and_cluster = expertray.from_pretrained(str(with_tok), backend="in_process")
    text = generate(str(with_tok), prompt="w5 w17 w3 w44", max_new_tokens=5, model_and_cluster=model_and_cluster)
    assert text.prompt_ids == prompt and text.new_ids == expected
    assert text.text == tokenizer.decode(expected, skip_special_tokens=True) and text.text


def test_example_config_file_resolves_against_a_checkpoint(checkpoints) -> None:
    """cluster/expertray-checkpoint.yaml is a valid ClusterConfig; pointed at a checkpoint, the layer shape,
    num_layers and dtype come from it and the file's capacity is kept."""
    import yaml

    from expertray.config import check_policy_names, from_dict
    from expertray.models.pretrained import checkpoint_cluster_config

    example = Path(__file__).resolve().parents[3] / "cluster" / "expertray-checkpoint.yaml"
    cfg = from_dict(ClusterConfig, yaml.safe_load(example.read_text()), "cluster")
    check_policy_names(cfg)
    assert cfg.model.endswith("Mixtral-8x7B-Instruct-v0.1") and cfg.dtype == "bfloat16"
    path = checkpoints["qwen2_moe", "bfloat16"]
    resolved = checkpoint_cluster_config(dataclasses.replace(cfg, model=str(path), dtype="auto"))
    assert resolved.dtype == "bfloat16" and resolved.num_layers == 2  # layer 1 is in mlp_only_layers
    assert resolved.layer.shared_d_ff == 40 and resolved.layer.shared_gated
    assert resolved.layer.capacity == cfg.layer.capacity and resolved.num_expert_actors == 8


def test_tied_embeddings_are_tied_not_required(tmp_path: Path) -> None:
    """A checkpoint saved with tie_word_embeddings has no lm_head tensor; the served model ties it."""
    from expertray.models.synthetic import tiny_model

    source = tiny_model("qwen3_moe", seed=2)
    source.config.tie_word_embeddings = True
    tied = tf.AutoModelForCausalLM.from_config(source.config)
    tied.load_state_dict(source.state_dict(), strict=False)
    tied.tie_weights()
    tied.save_pretrained(tmp_path / "tied", max_shard_size="30KB")
    index = json.loads((tmp_path / "tied" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "tied").eval()
    model, _ = from_pretrained(str(tmp_path / "tied"), backend="in_process")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = _prompt()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
