"""Figures of a benchmark run: per-request records -> summary, goodput, table, JSON.

Definitions (times in ms in the summary, seconds in raw records):
  * TTFT: from sending the request to the first message carrying output (a Generate chunk with
    tokens, a Chat delta).
  * ITL: gaps between consecutive output-carrying messages of a stream, one observation per
    message after the first (the server coalesces tokens into chunks, so this is the gap a client
    sees); TPOT: (E2E - TTFT) / (output tokens - 1) per request with more than one token.
  * E2E: from sending to the stream's `complete` message (or its error status).
  * duration: from the first send to the last completion; rates divide by it.
  * goodput: successful requests per second that met every latency objective given.
Percentiles interpolate linearly between order statistics (numpy's default method).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


@dataclass
class RequestRecord:
    """What the load generator saw of one request (times: seconds since the run started)."""

    index: int
    code: str = "UNKNOWN"  # gRPC status code name; "OK" for a stream that completed
    scheduled_s: float = 0.0  # open loop: when the schedule said to send it; closed loop: = sent_s
    sent_s: float = 0.0
    first_token_s: float | None = None
    end_s: float = 0.0
    output_tokens: int = 0  # Generate: token ids received; Chat: usage.completion_tokens
    usage_completion_tokens: int | None = None  # from the `complete` message
    prompt_tokens: int = 0  # usage.prompt_tokens (0 when the stream failed)
    messages: int = 0  # output-carrying messages received
    gaps_s: list[float] = field(default_factory=list)  # ITL observations
    session_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(values_s: list[float]) -> dict[str, float]:
    values = [v * 1000.0 for v in values_s]
    out = {f"p{q}": percentile(values, q) for q in PERCENTILES}
    out["mean"] = sum(values) / len(values) if values else math.nan
    out["n"] = len(values)
    return out


def parse_slo(items: list[str] | None) -> dict[str, float]:
    """['ttft_ms=500', 'e2e_ms=2000'] -> {'ttft_ms': 500.0, 'e2e_ms': 2000.0}."""
    slo: dict[str, float] = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in SLO_KEYS:
                raise ValueError(f"goodput: expected KEY=MS with KEY one of {', '.join(SLO_KEYS)}, got {part!r}")
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"goodput: {key} needs a number of milliseconds, got {value!r}") from None
            if not number > 0:
                raise ValueError(f"goodput: {key} must be > 0, got {value!r}")
            slo[key] = number
    return slo


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """A successful request whose every measured latency is within its objective."""
    if not record.ok:
        return False
    measured = {"ttft_ms": record.ttft_s, "tpot_ms": record.tpot_s, "e2e_ms": record.e2e_s,
                "itl_ms": max(record.gaps_s) if record.gaps_s else None}
    for key, limit in slo.items():
        value = measured[key]
        if value is not None and value * 1000.0 > limit:
            return False
    return True


def summarize(records: list[RequestRecord], *, slo: dict[str, float] | None = None,
              target_rate: float | None = None) -> dict:
    """The summary figures of one run (see the module docstring)."""
    slo = slo or {}
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.code] = errors.get(r.code, 0) + 1
    if records:
        start = min(r.sent_s for r in records)
        duration = max(r.end_s for r in records) - start
    else:
        duration = 0.0
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: math.nan)
    output_tokens = sum(r.output_tokens for r in records)
    good = sum(1 for r in records if meets_slo(r, slo)) if slo else len(ok)
    summary = {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors_by_code": dict(sorted(errors.items())),
        "duration_s": duration,
        "request_throughput": per_s(len(ok)),
        "output_tokens": output_tokens,
        "output_token_throughput": per_s(output_tokens),
        "prompt_tokens": sum(r.prompt_tokens for r in records),
        # Output-carrying messages: tokens per message shows how much the server coalesced.
        "output_messages": sum(r.messages for r in records),
        "ttft_ms": distribution_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": distribution_ms([g for r in ok for g in r.gaps_s]),
        "tpot_ms": distribution_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "e2e_ms": distribution_ms([r.e2e_s for r in ok]),
        "slo": slo,
        "goodput": per_s(good),
        "goodput_ratio": good / len(records) if records else math.nan,
    }
    sends = sorted(r.sent_s for r in records)
    if len(sends) >= 2:
        summary["arrival_rate"] = (len(sends) - 1) / (sends[-1] - sends[0]) if sends[-1] > sends[0] else math.nan
    if target_rate is not None:
        summary["target_rate"] = target_rate
        summary["send_lag_ms"] = distribution_ms([max(0.0, r.sent_s - r.scheduled_s) for r in records])
    return summary


def record_to_json(record: RequestRecord) -> dict:
    out = asdict(record)
    out["ttft_s"], out["e2e_s"], out["tpot_s"] = record.ttft_s, record.e2e_s, record.tpot_s
    return out


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def format_table(summary: dict, title: str) -> str:
    """A terminal table of one run's summary."""
    rows = [
        ("requests ok / failed", f"{summary['completed']} / {summary['failed']}"),
        ("duration (s)", _fmt(summary["duration_s"], 2)),
        ("requests/s", _fmt(summary["request_throughput"], 2)),
        ("output tokens/s", _fmt(summary["output_token_throughput"])),
        ("output tokens", str(summary["output_tokens"])),
    ]
    if "target_rate" in summary:
        rows.append(("arrival rate target / achieved (req/s)",
                     f"{_fmt(summary['target_rate'], 2)} / {_fmt(summary.get('arrival_rate', math.nan), 2)}"))
        rows.append(("send lag p50 / p99 (ms)",
                     f"{_fmt(summary['send_lag_ms']['p50'], 2)} / {_fmt(summary['send_lag_ms']['p99'], 2)}"))
    if summary["slo"]:
        objectives = ", ".join(f"{k}<={v:g}" for k, v in summary["slo"].items())
        rows.append((f"goodput req/s ({objectives})",
                     f"{_fmt(summary['goodput'], 2)} ({_fmt(100 * summary['goodput_ratio'])}%)"))
    for code, count in summary["errors_by_code"].items():
        rows.append((f"errors {code}", str(count)))
    width = max(len(r[0]) for r in rows)
    lines = [f"── {title} " + "─" * max(0, 60 - len(title))]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append(f"{'latency (ms)':<{width}}  {'p50':>9} {'p90':>9} {'p99':>9} {'mean':>9}")
    for key, label in (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E")):
        d = summary[key]
        lines.append(f"{label:<{width}}  " + " ".join(f"{_fmt(d[k], 2):>9}" for k in ("p50", "p90", "p99", "mean")))
    return "\n".join(lines)


def format_sweep(summaries: list[dict]) -> str:
    """One row per rate of a sweep."""
    header = (f"{'rate':>8} {'achieved':>9} {'req/s':>8} {'tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'E2E p50':>9} {'E2E p99':>9} {'goodput':>8} {'errors':>6}")
    lines = [header]
    for s in summaries:
        lines.append(
            f"{_fmt(s.get('target_rate'), 2):>8} {_fmt(s.get('arrival_rate', math.nan), 2):>9} "
            f"{_fmt(s['request_throughput'], 2):>8} {_fmt(s['output_token_throughput']):>10} "
            f"{_fmt(s['ttft_ms']['p50']):>9} {_fmt(s['ttft_ms']['p99']):>9} "
            f"{_fmt(s['e2e_ms']['p50']):>9} {_fmt(s['e2e_ms']['p99']):>9} {_fmt(s['goodput'], 2):>8} "
            f"{s['failed']:>6}")
    return "\n".join(lines)
