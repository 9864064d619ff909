"""The Serve application builder: arguments a user passes with `serve run expertray.serve:app key=value`."""

from __future__ import annotations

import pytest

from expertray.errors import ConfigError
from expertray.serve.layers import APP_ARGS, ExpertRayIngress, app


def test_builder_passes_known_arguments_to_the_ingress() -> None:
    built = app({"model": "/ckpt/mixtral", "dtype": "bfloat16", "max_inflight_tokens": "1024"})
    assert built._bound_deployment.func_or_class is ExpertRayIngress.func_or_class
    assert built._bound_deployment.init_kwargs == {"model": "/ckpt/mixtral", "dtype": "bfloat16",
                                                   "max_inflight_tokens": 1024}
    assert app()._bound_deployment.init_kwargs == {}


@pytest.mark.parametrize("args, needle", [({"modle": "/x"}, "unknown argument(s) modle"),
                                          ({"max_inflight_tokens": "many"}, "must be an integer")])
def test_builder_refuses_bad_arguments_by_name(args: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        app(args)
    assert set(APP_ARGS) == {"model", "dtype", "config", "max_inflight_tokens"}
