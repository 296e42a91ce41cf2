"""Expert parallelism: placement maps, sharding a loaded model, the worker group and its collectives."""
