"""Typed, validated configuration. Validation happens once, here, with errors that name the field."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertray.errors import ConfigError
from expertray.errors import require as _require

# The names each seam's registry holds (expertray/seams.py lists the registries). Declared here so that a
# config is checked without importing torch or Ray; each registry checks it holds exactly these names when its
# module is imported (Registry.check).
GATING_FAMILIES = ("mixtral", "qwen_moe", "deepseek_v3", "gpt_oss")
TRANSPORTS = ("auto", "channel", "collective", "object_store")  # auto: channel when it opens, else its fallback
ROUTING_POLICIES = ("capacity", "laser", "topk")
REPLICA_POLICIES = ("least_loaded", "locality", "round_robin")
PLACEMENT_POLICIES = ("balanced", "round_robin", "topology_aware")
AUTOSCALE_POLICIES = ("hysteresis",)
OVERFLOW_MODES = ("drop", "reroute", "dropless")
DROP_PRIORITIES = ("first_come", "score")
EXPERT_ACTIVATIONS = ("swiglu", "clamped_swiglu")
SERVING_DTYPES = ("auto", "bfloat16", "float16", "float32")
CLIENT_PATHS = ("router", "direct")  # how Cluster.forward reaches the experts


@dataclass(frozen=True)
class GateConfig:
    """How a token's experts and combine weights are chosen from router logits.

    family: mixtral (softmax → top-k → renormalize), qwen_moe (softmax → top-k, `normalize` optional;
    also OLMoE), deepseek_v3 (sigmoid + correction bias for selection, group-limited top-k, scaling),
    gpt_oss (top-k on logits + bias → softmax over the k).
    """

    family: str = "mixtral"
    num_experts: int = 8
    top_k: int = 2
    normalize: bool = True
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        _require(self.family in GATING_FAMILIES, "gate.family", f"{self.family!r} is not one of {GATING_FAMILIES}")
        _require(self.num_experts >= 1, "gate.num_experts", f"must be >= 1, got {self.num_experts}")
        _require(1 <= self.top_k <= self.num_experts, "gate.top_k",
                 f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        _require(self.num_groups >= 1 and self.num_experts % self.num_groups == 0, "gate.num_groups",
                 f"must divide num_experts={self.num_experts}, got {self.num_groups}")
        _require(1 <= self.topk_groups <= self.num_groups, "gate.topk_groups",
                 f"must be in [1, num_groups={self.num_groups}], got {self.topk_groups}")
        if self.family == "deepseek_v3":
            per_group = self.num_experts // self.num_groups
            _require(per_group >= 2 or self.num_groups == 1, "gate.num_groups",
                     "deepseek_v3 group scores sum the top-2 experts per group: need >= 2 experts per group")
            _require(self.topk_groups * per_group >= self.top_k, "gate.topk_groups",
                     f"topk_groups*experts_per_group={self.topk_groups * per_group} < top_k={self.top_k}")
        _require(math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0,
                 "gate.routed_scaling_factor", f"must be a positive finite number, got {self.routed_scaling_factor}")


@dataclass(frozen=True)
class CapacityConfig:
    """Per-expert capacity with DeepSpeed/Tutel semantics: ceil(factor · T·k / E), at least `min_capacity`.

    overflow: drop (assignments past capacity are dropped, by `drop_priority`), reroute (to the next-best
    expert with room), dropless (no limit; `factor` is ignored).
    """

    factor: float = 1.25
    min_capacity: int = 4
    overflow: str = "dropless"
    drop_priority: str = "first_come"

    def __post_init__(self) -> None:
        _require(math.isfinite(self.factor) and self.factor > 0, "capacity.factor",
                 f"must be a positive finite number, got {self.factor}")
        _require(self.min_capacity >= 0, "capacity.min_capacity", f"must be >= 0, got {self.min_capacity}")
        _require(self.overflow in OVERFLOW_MODES, "capacity.overflow",
                 f"{self.overflow!r} is not one of {OVERFLOW_MODES}")
        _require(self.drop_priority in DROP_PRIORITIES, "capacity.drop_priority",
                 f"{self.drop_priority!r} is not one of {DROP_PRIORITIES}")


@dataclass(frozen=True)
class MoELayerConfig:
    """Shape of one MoE layer: SwiGLU experts d_model → d_ff → d_model, plus an optional shared expert.

    expert_activation: swiglu (silu(gate)·up) or clamped_swiglu (GPT-OSS: gate clamped to ≤ swiglu_limit,
    up to ±swiglu_limit, gate·sigmoid(swiglu_alpha·gate)·(up + 1)); expert_bias: experts carry biases
    (GPT-OSS) — see expertray/layer/experts.py.
    """

    d_model: int = 256
    d_ff: int = 512
    gate: GateConfig = field(default_factory=GateConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    shared_d_ff: int = 0
    shared_gated: bool = False
    expert_activation: str = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False

    def __post_init__(self) -> None:
        _require(self.d_model >= 1, "layer.d_model", f"must be >= 1, got {self.d_model}")
        _require(self.d_ff >= 1, "layer.d_ff", f"must be >= 1, got {self.d_ff}")
        _require(self.shared_d_ff >= 0, "layer.shared_d_ff", f"must be >= 0, got {self.shared_d_ff}")
        _require(self.expert_activation in EXPERT_ACTIVATIONS, "layer.expert_activation",
                 f"{self.expert_activation!r} is not one of {EXPERT_ACTIVATIONS}")
        _require(math.isfinite(self.swiglu_alpha) and self.swiglu_alpha > 0, "layer.swiglu_alpha",
                 f"must be a positive finite number, got {self.swiglu_alpha}")
        _require(math.isfinite(self.swiglu_limit) and self.swiglu_limit > 0, "layer.swiglu_limit",
                 f"must be a positive finite number, got {self.swiglu_limit}")

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    @property
    def top_k(self) -> int:
        return self.gate.top_k


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build a (nested) config dataclass from plain dicts, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown field (known: {sorted(fields)})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        ftype = fields[name].type
        path = f"{prefix + '.' if prefix else ''}{name}"
        sub = _NESTED.get(ftype) if isinstance(ftype, str) else None
        kwargs[name] = from_dict(sub, value, path) if sub else _check_type(path, ftype, value)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


_SCALARS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_type(path: str, ftype: Any, value: Any) -> Any:
    """Reject a value of the wrong plain type (e.g. num_layers: "two"), naming the field."""
    name = ftype if isinstance(ftype, str) else getattr(ftype, "__name__", "")
    if name.startswith("dict"):
        ok = isinstance(value, dict)
    elif name in _SCALARS:
        ok = isinstance(value, _SCALARS[name]) and (name == "bool" or not isinstance(value, bool))
    else:
        return value
    if not ok:
        raise ConfigError(f"{path}: expected {name.split('[')[0]}, got {type(value).__name__} {value!r}")
    return value


def check_policy_names(cfg: ClusterConfig) -> None:
    """Fail at the edge, before anything starts, if a policy name is not one the registries hold."""
    for field_name, known in (("routing_policy", ROUTING_POLICIES), ("replica_policy", REPLICA_POLICIES),
                              ("autoscale_policy", AUTOSCALE_POLICIES)):
        name = getattr(cfg, field_name)
        _require(name in known, f"cluster.{field_name}", f"{name!r} is unknown (known: {', '.join(known)})")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (round-trips through `from_dict`)."""
    return dataclasses.asdict(cfg)


_NESTED: dict[str, type] = {"GateConfig": GateConfig, "CapacityConfig": CapacityConfig,
                            "MoELayerConfig": MoELayerConfig}


@dataclass(frozen=True)
class ClusterConfig:
    """A served model: `num_layers` MoE layers of one shape, spread over `num_expert_actors` Ray actors.

    transport: collective (torch.distributed all-to-all in a gloo/NCCL group), object_store (numpy
    views through Ray objects), or auto (collective when every actor can join the group).
    Micro-batching: a router closes a batch at `max_batch_tokens` or `max_wait_ms` after its first request.
    Deadlines: a request gets its answer or RequestTimeoutError within `request_timeout_s` (default:
    collective_timeout_s + 5); a new actor or router process gets `start_timeout_s` to come up (scheduling,
    imports, a node the autoscaler adds) and then every controller call to it is bounded by `control_timeout_s`;
    an actor or router that does not answer a ping within `ping_timeout_s` is treated as dead (killed and
    replaced). Liveness: every `liveness_interval_s` the controller pings every expert actor; one that does
    not answer within `liveness_timeout_s` is pushed to every router as suspect at once (masked wherever its
    experts have another replica; expertray/runtime/liveness.py), and healed once silent for `ping_timeout_s`
    or reported dead by Ray. `state_dir`: where the controller persists its snapshot and weight store ("" = a per-cluster
    directory under the Ray session directory).
    Devices: expert actors take `actor_num_gpus` each (fractions share a GPU); when they have GPUs, routers
    take `router_num_gpus` so gate, plan, permute and combine run beside them on a device.
    `actor_resources`: custom Ray resources each expert actor also asks for (e.g. {"expert_slot": 1}, declared
    per node by `ray start --resources`); the controller places each new actor on the live node with the most
    room for them (expertray/state/ray_nodes.py).
    model: a Hugging Face checkpoint directory to serve (empty: random weights of `layer` × `num_layers`).
    dtype: serving dtype of expert weights and compute; auto = the checkpoint's torch_dtype (float32 for
    random weights). Gate math is float32 whatever the dtype.
    min_replicas_per_expert: copies of every expert kept on distinct actors (another node first): 2 or more keep
    a *shadow* of each expert, so losing one actor (or node) is served from the shadows at once while the heal
    runs; every placement change keeps the minimum (capped at the number of actors), at that many times the
    expert memory.
    client_path: how `Cluster.forward` reaches the experts: `router` (a Ray call to a router actor, which
    micro-batches every caller's requests) or `direct` (the caller routes its own tokens and speaks to the
    expert actors over standing channels: expertray/runtime/direct.py; `from_pretrained` uses it).
    """

    layer: MoELayerConfig = field(default_factory=MoELayerConfig)
    num_layers: int = 2
    num_expert_actors: int = 4
    num_routers: int = 1
    transport: str = "auto"
    max_batch_tokens: int = 8192
    max_wait_ms: float = 1.0
    max_request_tokens: int = 65536
    max_queue_tokens: int = 262144
    routing_policy: str = "capacity"
    routing_params: dict[str, Any] = field(default_factory=dict)
    replica_policy: str = "round_robin"
    actor_num_cpus: float = 0.5
    actor_num_gpus: float = 0.0
    actor_resources: dict[str, float] = field(default_factory=dict)
    router_num_cpus: float = 0.5
    router_num_gpus: float = 0.0
    seed: int = 0
    collective_timeout_s: float = 30.0
    request_timeout_s: float | None = None
    control_timeout_s: float = 30.0
    start_timeout_s: float = 120.0
    ping_timeout_s: float = 5.0
    liveness_interval_s: float = 0.25
    liveness_timeout_s: float = 0.5
    state_dir: str = ""
    stats_window_batches: int = 64
    snapshot_path: str = ""
    metrics_port: int = 9464
    metrics_top_n: int = 16
    autoscale: bool = False
    autoscale_policy: str = "hysteresis"
    autoscale_params: dict[str, Any] = field(default_factory=dict)
    autoscale_interval_s: float = 1.0
    actor_memory_budget_bytes: int = 0
    max_expert_actors: int = 16
    min_replicas_per_expert: int = 1
    model: str = ""
    dtype: str = "auto"
    client_path: str = "router"

    def __post_init__(self) -> None:
        _require(self.client_path in CLIENT_PATHS, "cluster.client_path",
                 f"{self.client_path!r} is not one of {CLIENT_PATHS}")
        _require(self.dtype in SERVING_DTYPES, "cluster.dtype", f"{self.dtype!r} is not one of {SERVING_DTYPES}")
        _require(self.num_layers >= 1, "cluster.num_layers", f"must be >= 1, got {self.num_layers}")
        _require(self.num_expert_actors >= 1, "cluster.num_expert_actors",
                 f"must be >= 1, got {self.num_expert_actors}")
        _require(self.num_routers >= 1, "cluster.num_routers", f"must be >= 1, got {self.num_routers}")
        _require(self.transport in TRANSPORTS, "cluster.transport", f"{self.transport!r} is not one of {TRANSPORTS}")
        _require(self.max_batch_tokens >= 1, "cluster.max_batch_tokens", f"must be >= 1, got {self.max_batch_tokens}")
        _require(math.isfinite(self.max_wait_ms) and self.max_wait_ms >= 0, "cluster.max_wait_ms",
                 f"must be a finite number >= 0, got {self.max_wait_ms}")
        _require(self.max_request_tokens >= 1, "cluster.max_request_tokens",
                 f"must be >= 1, got {self.max_request_tokens}")
        _require(self.max_queue_tokens >= self.max_request_tokens, "cluster.max_queue_tokens",
                 f"must be >= max_request_tokens={self.max_request_tokens}, got {self.max_queue_tokens}")
        _require(self.actor_num_cpus > 0 or self.actor_num_gpus > 0, "cluster.actor_num_cpus",
                 "an expert actor needs a CPU or GPU share > 0")
        _require(self.actor_num_gpus >= 0, "cluster.actor_num_gpus", f"must be >= 0, got {self.actor_num_gpus}")
        _require(isinstance(self.actor_resources, dict) and all(
            isinstance(k, str) and k and k not in ("CPU", "GPU") and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for k, v in self.actor_resources.items()),
            "cluster.actor_resources", f"must map custom resource names (not CPU/GPU: use actor_num_cpus/gpus) "
            f"to finite amounts >= 0, got {self.actor_resources!r}")
        _require(self.router_num_cpus >= 0, "cluster.router_num_cpus", f"must be >= 0, got {self.router_num_cpus}")
        _require(math.isfinite(self.router_num_gpus) and self.router_num_gpus >= 0, "cluster.router_num_gpus",
                 f"must be a finite number >= 0, got {self.router_num_gpus}")
        _require(self.collective_timeout_s > 0, "cluster.collective_timeout_s",
                 f"must be > 0, got {self.collective_timeout_s}")
        if self.request_timeout_s is None:
            object.__setattr__(self, "request_timeout_s", self.collective_timeout_s + 5.0)
        _require(isinstance(self.request_timeout_s, (int, float)) and not isinstance(self.request_timeout_s, bool)
                 and math.isfinite(self.request_timeout_s) and self.request_timeout_s > 0,
                 "cluster.request_timeout_s", f"must be a finite number > 0, got {self.request_timeout_s!r}")
        for name in ("control_timeout_s", "start_timeout_s", "ping_timeout_s", "liveness_interval_s", "liveness_timeout_s"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0, f"cluster.{name}", f"must be a finite number > 0, got {value}")
        _require(self.liveness_timeout_s <= self.ping_timeout_s, "cluster.liveness_timeout_s",
                 f"must be <= ping_timeout_s={self.ping_timeout_s} (suspect before dead), got {self.liveness_timeout_s}")
        _require(isinstance(self.routing_params, dict), "cluster.routing_params", "must be a mapping")
        _require(math.isfinite(self.autoscale_interval_s) and self.autoscale_interval_s > 0,
                 "cluster.autoscale_interval_s", f"must be > 0, got {self.autoscale_interval_s}")
        _require(self.actor_memory_budget_bytes >= 0, "cluster.actor_memory_budget_bytes",
                 f"must be >= 0 (0 = unlimited), got {self.actor_memory_budget_bytes}")
        _require(self.max_expert_actors >= self.num_expert_actors, "cluster.max_expert_actors",
                 f"must be >= num_expert_actors={self.num_expert_actors}, got {self.max_expert_actors}")
        _require(isinstance(self.autoscale_params, dict), "cluster.autoscale_params", "must be a mapping")
        _require(isinstance(self.min_replicas_per_expert, int) and not isinstance(self.min_replicas_per_expert, bool)
                 and 1 <= self.min_replicas_per_expert <= self.max_expert_actors, "cluster.min_replicas_per_expert",
                 f"must be an integer in [1, max_expert_actors={self.max_expert_actors}], "
                 f"got {self.min_replicas_per_expert!r}")
        _require(-1 <= self.metrics_port <= 65535, "cluster.metrics_port",
                 f"must be a TCP port, 0 (any free port) or -1 (off), got {self.metrics_port}")


_NESTED["ClusterConfig"] = ClusterConfig


def load_config(path: str | Path | None) -> ClusterConfig:
    """A ClusterConfig from a YAML/JSON file (unknown or bad fields are named), or the embedded default."""
    if path is None:
        return ClusterConfig()
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config {path}: cannot read ({exc})") from exc
    cfg = from_dict(ClusterConfig, data or {}, "cluster")
    check_policy_names(cfg)
    return cfg
