"""The gRPC front door: server (grpc.aio, health, reflection), servicer (RPCs) and errors (status codes)."""
