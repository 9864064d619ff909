"""Serve a transformers Mixtral model's MoE blocks on an expertray cluster and check the logits are unchanged.

A small MixtralForCausalLM (random weights) runs once unmodified; then an expertray cluster is launched from
its MoE blocks' weights, every sparse-MoE block is swapped for a ClusterMoEProxy, and forward + greedy
generate run again. The logits must match the unmodified model's (max abs diff ≤ --tolerance).

    python examples/transformers_proxy.py [--layers 2 --hidden 64 --experts 8 --top-k 2 --new-tokens 8]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import transformers as tf

from expertray.api import init_ray, launch
from expertray.config import ClusterConfig
from expertray.models.blocks import from_hf_block
from expertray.models.proxy import find_moe_blocks, swap_moe_blocks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2, help="decoder layers (each with a sparse-MoE block)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (d_model)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--actors", type=int, default=4, help="expert actors")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs if this script starts Ray")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _generate(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of exactly `new_tokens` tokens: (sequences [B, S+N], per-step logits [N, B, V])."""
    out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    hf_cfg = tf.MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                              num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                              num_local_experts=args.experts, num_experts_per_tok=args.top_k)
    model = tf.MixtralForCausalLM(hf_cfg).eval()
    input_ids = torch.randint(0, args.vocab, (args.batch, args.prompt_len),
                              generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        ref_logits = model(input_ids).logits
        ref_seq, ref_step_logits = _generate(model, input_ids, args.new_tokens)

    layers = [from_hf_block(block) for _, block in find_moe_blocks(model)]
    cfg = ClusterConfig(layer=layers[0].cfg, num_layers=len(layers), num_expert_actors=args.actors,
                        actor_num_cpus=0.25, router_num_cpus=0.25, metrics_port=-1)
    init_ray(num_cpus=args.num_cpus)
    cluster = launch(cfg, layers, detached=False)
    try:
        swapped = swap_moe_blocks(model, cluster)
        print(f"swapped {swapped} sparse-MoE blocks for ClusterMoEProxy "
              f"({cfg.layer.num_experts} experts, top-{cfg.layer.top_k}, {args.actors} expert actors, "
              f"transport {cluster.status()['transport']})")
        with torch.no_grad():
            logits = model(input_ids).logits
            seq, step_logits = _generate(model, input_ids, args.new_tokens)
    finally:
        cluster.shutdown()

    summary = {"moe_blocks_swapped": swapped,
               "forward_max_abs_diff": float((logits - ref_logits).abs().max()),
               "generate_tokens_equal": bool(torch.equal(seq, ref_seq)),
               "generate_logits_max_abs_diff": float((step_logits - ref_step_logits).abs().max()),
               "tokens_generated": int(seq.shape[1] - input_ids.shape[1]) * args.batch}
    print(f"forward logits  [{args.batch}, {args.prompt_len}, {args.vocab}]: max abs diff "
          f"{summary['forward_max_abs_diff']:.2e}")
    print(f"generate: {summary['tokens_generated']} tokens, identical sequences: {summary['generate_tokens_equal']}, "
          f"per-step logits max abs diff {summary['generate_logits_max_abs_diff']:.2e}")
    worst = max(summary["forward_max_abs_diff"], summary["generate_logits_max_abs_diff"])
    if worst > args.tolerance or not summary["generate_tokens_equal"]:
        raise SystemExit(f"cluster-served model differs from the unmodified one: {summary}")
    print(f"OK: logits within {args.tolerance:g} of the unmodified model")
    return summary


if __name__ == "__main__":
    main()
