"""The Serve application builder: arguments a user passes with `serve run expertray.serve:app key=value`."""

from __future__ import annotations

import pytest

from expertray.errors import ConfigError
from expertray.serve.layers import APP_ARGS, ExpertRayIngress, app


def test_builder_passes_known_arguments_to_the_ingress_and_the_engines() -> None:
    built = app({"model": "/ckpt/mixtral", "dtype": "bfloat16", "max_inflight_tokens": "1024", "micro_batches": "2",
                 "step_timeout_s": "30", "engine_replicas": "2", "api_key": "k"})
    ingress = built._bound_deployment
    assert ingress.func_or_class is ExpertRayIngress.func_or_class
    engine = ingress.init_kwargs.pop("engine")
    assert ingress.init_kwargs == {"model": "/ckpt/mixtral", "dtype": "bfloat16", "max_inflight_tokens": 1024,
                                   "api_key": "k"}
    assert engine._bound_deployment.init_kwargs == {"model": "/ckpt/mixtral",
                                                    "engine": {"micro_batches": 2, "step_timeout_s": 30.0}}
    assert engine._bound_deployment._deployment_config.autoscaling_config.min_replicas == 2
    assert app()._bound_deployment.init_kwargs == {}


@pytest.mark.parametrize("args, needle", [({"modle": "/x"}, "unknown argument(s) modle"),
                                          ({"max_inflight_tokens": "many"}, "must be an integer"),
                                          ({"micro_batches": "2"}, "engine arguments need model=PATH"),
                                          ({"model": "/x", "micro_batches": "0"}, "engine.micro_batches"),
                                          ({"model": "/x", "engine_replicas": "0"}, "engine_replicas must be"),
                                          ({"model": "/x", "step_timeout_s": "soon"}, "must be a number")])
def test_builder_refuses_bad_arguments_by_name(args: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        app(args)
    assert set(APP_ARGS) == {"model", "dtype", "config", "max_inflight_tokens", "served_model_name", "api_key",
                             "engine_replicas"}
