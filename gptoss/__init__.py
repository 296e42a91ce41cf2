"""Generated gRPC code for the gptoss protos (see protos/; regenerate with `python -m cluster.protogen`)."""
