"""The job: ``compress`` (trace a model and insert the methods) and ``pipeline`` (load -> compress -> export ->
parity -> fidelity, then the engine and bundle sinks over its result)."""
