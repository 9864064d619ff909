"""One MoE layer's math, Ray-free, in data-path order: gating.py → capacity.py → dispatch.py (plan, permute,
combine) → experts.py (SwiGLU math) and slots.py (the weights one actor holds); route.py runs a routed batch
through a transport (prepare → exchange → finish); reference.py is the whole layer in one process."""
