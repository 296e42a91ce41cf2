"""gptoss-cluster: serve gpt-oss on Ray Serve behind a gRPC front door."""

__version__ = "0.1.0"
