"""Config and input validation name the offending field or problem."""

import numpy as np
import pytest
import torch

from expertray.config import CapacityConfig, GateConfig, MoELayerConfig, from_dict, to_dict
from expertray.errors import ConfigError, InputError
from expertray.validation import check_hidden


@pytest.mark.parametrize("kwargs,field", [
    ({"family": "switch"}, "gate.family"), ({"top_k": 0}, "gate.top_k"), ({"top_k": 9}, "gate.top_k"),
    ({"num_groups": 3}, "gate.num_groups"), ({"num_experts": 0}, "gate.num_experts"),
    ({"routed_scaling_factor": float("nan")}, "gate.routed_scaling_factor"),
])
def test_gate_config_errors_name_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        GateConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    ({"factor": 0}, "capacity.factor"), ({"factor": float("inf")}, "capacity.factor"),
    ({"min_capacity": -1}, "capacity.min_capacity"), ({"overflow": "spill"}, "capacity.overflow"),
    ({"drop_priority": "random"}, "capacity.drop_priority"),
])
def test_capacity_config_errors_name_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        CapacityConfig(**kwargs)


def test_from_dict_round_trip_and_unknown_keys() -> None:
    cfg = MoELayerConfig(d_model=8, d_ff=16, gate=GateConfig("qwen_moe", 4, 2, normalize=False))
    assert from_dict(MoELayerConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="gate.topk"):
        from_dict(MoELayerConfig, {"gate": {"topk": 2}})
    with pytest.raises(ConfigError, match="layer.d_model"):
        from_dict(MoELayerConfig, {"d_model": 0})


@pytest.mark.parametrize("x,msg", [
    (torch.zeros(0, 8), "empty batch"), (torch.zeros(3, 7), "d_model=8"), (torch.zeros(8), "shape"),
    (torch.zeros(3, 8, dtype=torch.int32), "dtype"), ([[0.0] * 8], "torch.Tensor"),
    (torch.tensor([[0.0] * 7 + [float("nan")]]), "NaN or inf"), (np.zeros((2, 8), dtype=np.int64), "floating"),
    (torch.zeros(11, 8), "over the limit of 10"),
])
def test_check_hidden_rejects(x: object, msg: str) -> None:
    with pytest.raises(InputError, match=msg):
        check_hidden(x, 8, max_tokens=10)


def test_check_hidden_flattens_and_accepts_numpy() -> None:
    assert check_hidden(torch.zeros(2, 3, 8), 8).shape == (6, 8)
    assert check_hidden(np.ones((4, 8), dtype=np.float32), 8).dtype == torch.float32
