"""gptoss-cluster: serve gpt-oss on Ray Serve behind a gRPC front door."""

import os as _os

# gRPC's fork handlers leave a child forked while gRPC threads are busy with a broken poller, and
# that child aborts before it can exec. Ray starts its processes (a GCS restarted on the head, a
# node added at run time) by forking with a preexec_fn from the process that hosts our gRPC
# server. Nothing of ours uses gRPC in a forked child, so the handlers are switched off; grpc
# reads this when it is first imported, hence here.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

__version__ = "0.1.0"
