"""gptoss.v1: generated messages (inference_pb2) and service stubs (inference_pb2_grpc)."""
