"""Ray Serve applications: `serve run expertray.serve:app` serves the MoE layers over HTTP (layers.py)."""

from expertray.serve.layers import ExpertRayIngress, app, fit_to_cpus, run_app

__all__ = ["ExpertRayIngress", "app", "fit_to_cpus", "run_app"]
