"""A Ray cluster launched from a checkpoint serves the same tokens as the unmodified transformers model."""

from __future__ import annotations

import pytest
import torch

from expertray.checkpoint.model import from_pretrained
from expertray.checkpoint.synthetic import write_tiny_checkpoint
from expertray.errors import ConfigError

tf = pytest.importorskip("transformers")
pytestmark = pytest.mark.ray


def test_ray_cluster_from_checkpoint_generates_reference_tokens(ray_session, tmp_path) -> None:
    path = write_tiny_checkpoint("deepseek_v3", tmp_path / "deepseek_v3", seed=3)
    ref = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    model, cluster = from_pretrained(str(path), backend="ray", num_expert_actors=2, actor_num_cpus=0.25,
                                     router_num_cpus=0.25, max_wait_ms=1.0)
    try:
        assert cluster.cfg.num_layers == 2 and cluster.cfg.model == str(path.resolve())
        ids = torch.randint(2, 96, (2, 6), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(out, ref.generate(ids, max_new_tokens=6, do_sample=False))
    finally:
        cluster.shutdown()


def test_ray_backend_refuses_what_actors_cannot_serve_yet(tmp_path) -> None:
    path = write_tiny_checkpoint("gpt_oss", tmp_path / "gpt_oss")
    with pytest.raises(ConfigError, match="expert actors do not yet compute clamped_swiglu"):
        from_pretrained(str(path), backend="ray")


def test_bf16_checkpoint_on_ray_keeps_the_model_in_bf16(ray_session, tmp_path) -> None:
    """Until expert actors load bf16 slots the Ray stop-gap serves experts in float32; the model's own layers
    stay bf16 and its logits stay within the reference's bf16 error of a float32 run."""
    path = write_tiny_checkpoint("qwen3_moe", tmp_path / "qwen3_moe", dtype=torch.bfloat16, seed=3)
    exact_ref = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bf16_ref = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    model, cluster = from_pretrained(str(path), backend="ray", num_expert_actors=2, actor_num_cpus=0.25,
                                     router_num_cpus=0.25)
    try:
        assert cluster.cfg.dtype == "float32" and model.lm_head.weight.dtype == torch.bfloat16
        ids = torch.randint(2, 96, (2, 6), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            exact = exact_ref(ids).logits
            ref_err = (bf16_ref(ids).logits.float() - exact).abs()
            err = (model(ids).logits.float() - exact).abs()
        assert err.mean() <= 1.25 * ref_err.mean()
    finally:
        cluster.shutdown()
