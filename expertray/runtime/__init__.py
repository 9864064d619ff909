"""Ray-free runtime state machines: the router's batching/retry/deadline logic, and the controller's placement
changes and healing, liveness loop, autoscale loop, node choice, autoscaler request and restart. The Ray
actors in `expertray.actors` are thin shells over these classes."""
