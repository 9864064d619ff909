"""Serving whole models: an iteration-level engine (continuous batching, chunked prefill, ping-pong micro-batches)
over a transformers model whose MoE blocks run on the cluster, and the OpenAI-compatible API over it."""
