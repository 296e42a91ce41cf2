"""Benchmarks of a running gptoss-cluster over its public gRPC API: load generator, workloads, reports, the overhead benchmark."""
