"""The OpenAI-compatible HTTP API of the front door (Responses, Chat Completions, Completions,
Models), served next to gRPC in the same process and event loop, on the same core: requests
become the same internal GenerateRequest through conversion.py's builders, run inside the
servicer's call_context, stream through the same chat/raw-prompt paths, and fail through the same
errors.py mapping."""
