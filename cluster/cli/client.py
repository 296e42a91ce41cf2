"""`gptoss-cluster chat | generate | info`: a gRPC client of a running cluster."""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_TARGET = "127.0.0.1:50051"
EFFORTS = ("low", "medium", "high")


def register(subparsers) -> None:
    chat = subparsers.add_parser("chat", help="chat with the served model (streams the answer)")
    chat.add_argument("prompt", help="the user message")
    chat.add_argument("--reasoning", choices=EFFORTS, default="medium", help="reasoning effort (default medium)")
    chat.add_argument("--instructions", help="developer instructions")
    _common(chat)
    chat.set_defaults(func=run_chat)

    generate = subparsers.add_parser("generate", help="continue a prompt given as token ids")
    generate.add_argument("--tokens", required=True, help="comma-separated prompt token ids, e.g. 1,2,3")
    _common(generate)
    generate.set_defaults(func=run_generate)

    info = subparsers.add_parser("info", help="describe the served model")
    info.add_argument("--target", default=DEFAULT_TARGET, help=f"HOST:PORT (default {DEFAULT_TARGET})")
    _auth(info)
    info.set_defaults(func=run_info)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"HOST:PORT of the front door (default {DEFAULT_TARGET})")
    p.add_argument("--max-tokens", type=int, help="most tokens to generate (server default 256)")
    p.add_argument("--temperature", type=float, help="0 (default) is greedy")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds (default 300)")
    _auth(p)


def _auth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", default=os.environ.get("GPTOSS_API_KEY"),
                   help="API key sent as 'authorization: Bearer <key>' (default: $GPTOSS_API_KEY)")


def _metadata(args) -> tuple:
    return (("authorization", f"Bearer {args.api_key}"),) if getattr(args, "api_key", None) else ()


def _sampling(args, pb):
    sampling = pb.SamplingParams()
    if args.max_tokens is not None:
        sampling.max_tokens = args.max_tokens
    if args.temperature is not None:
        sampling.temperature = args.temperature
    if args.seed is not None:
        sampling.seed = args.seed
    return sampling


def _fail(command: str, err) -> int:
    print(f"gptoss-cluster {command}: {err.code().name}: {err.details()}", file=sys.stderr)
    return 1


def _summary(complete, pb) -> str:
    reason = pb.FinishReason.Name(complete.finish_reason).removeprefix("FINISH_REASON_").lower()
    return (f"[finish: {reason}; prompt {complete.usage.prompt_tokens} tokens, "
            f"completion {complete.usage.completion_tokens} tokens]")


def run_chat(args: argparse.Namespace) -> int:
    import grpc

    from gptoss.v1 import inference_pb2 as pb
    from gptoss.v1 import inference_pb2_grpc as pb_grpc

    request = pb.ChatRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content=args.prompt)],
                             reasoning_effort=pb.ReasoningEffort.Value(f"REASONING_EFFORT_{args.reasoning.upper()}"),
                             sampling=_sampling(args, pb))
    if args.instructions:
        request.instructions = args.instructions
    out = sys.stdout
    section = None  # what the last printed text belonged to
    with grpc.insecure_channel(args.target) as channel:
        try:
            for response in pb_grpc.InferenceStub(channel).Chat(request, timeout=args.timeout, metadata=_metadata(args)):
                if response.HasField("complete"):
                    out.write("\n" if section else "")
                    print(_summary(response.complete, pb), file=sys.stderr)
                    continue
                delta = response.delta
                if delta.HasField("tool_call"):
                    call = delta.tool_call
                    out.write(f"\n── tool call {call.id}: {call.name}({call.arguments_json}) ──\n")
                    section = None
                    continue
                if not delta.text:
                    continue
                channel = pb.Channel.Name(delta.channel).removeprefix("CHANNEL_").lower()
                label = "raw output (not harmony; shown unparsed)" if delta.raw else \
                    (channel if delta.channel else "message")
                if delta.recipient:
                    label += f" to {delta.recipient}"
                if label != section:
                    out.write(("\n" if section else "") + f"── {label} ──\n")
                    section = label
                out.write(delta.text)
                out.flush()
        except grpc.RpcError as err:
            return _fail("chat", err)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import grpc

    from gptoss.v1 import inference_pb2 as pb
    from gptoss.v1 import inference_pb2_grpc as pb_grpc

    try:
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        print(f"gptoss-cluster generate: --tokens must be comma-separated integers, got {args.tokens!r}",
              file=sys.stderr)
        return 2
    request = pb.GenerateRequest(prompt_token_ids=tokens, sampling=_sampling(args, pb))
    with grpc.insecure_channel(args.target) as channel:
        try:
            for response in pb_grpc.InferenceStub(channel).Generate(request, timeout=args.timeout, metadata=_metadata(args)):
                if response.HasField("chunk"):
                    print(" ".join(map(str, response.chunk.token_ids)), flush=True)
                else:
                    print(_summary(response.complete, pb), file=sys.stderr)
        except grpc.RpcError as err:
            return _fail("generate", err)
    return 0


def run_info(args: argparse.Namespace) -> int:
    import grpc

    from gptoss.v1 import inference_pb2 as pb
    from gptoss.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(args.target) as channel:
        try:
            print(pb_grpc.InferenceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30, metadata=_metadata(args)), end="")
        except grpc.RpcError as err:
            return _fail("info", err)
    return 0
