"""Prometheus text exposition for the server: counters, gauges and histograms, thread-safe, no dependency.

Label values are escaped as the text format requires (backslash, double quote, newline), and a metric holds at most
`MAX_SERIES` label sets: later new ones are counted under one set whose values are all "other". The server only
labels with values from fixed sets (route templates, status codes), so the cap is a second line of defence.
"""
from __future__ import annotations

import bisect
import threading

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
MAX_SERIES = 256  # label sets per metric


def escape_label_value(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in sorted(labels.items())) + "}"


class Metrics:
    HELP = {
        "rlprefix_requests_total": ("counter", "HTTP API requests by endpoint (route template; other: a path no "
                                               "route serves) and status"),
        "rlprefix_prompt_tokens_total": ("counter", "prompt tokens submitted for decoding"),
        "rlprefix_completion_tokens_total": ("counter", "completion tokens returned"),
        "rlprefix_rows_cancelled_total": ("counter", "rows whose client went away before the reply"),
        "rlprefix_requests_cancelled_total": ("counter", "requests whose client went away before the full reply"),
        "rlprefix_decoded_tokens_total": ("counter", "tokens decoded (returned or not)"),
        "rlprefix_decode_rows": ("gauge", "rows in the running batch (a finished or cancelled row leaves at once)"),
        "rlprefix_rows_admitted_total": ("counter", "rows that reached the model (prefilled into the running batch)"),
        "rlprefix_rows_joined_running_total": ("counter", "rows admitted while other rows were decoding (joined "
                                                          "a running batch at its next step)"),
        "rlprefix_prefix_banks_built_total": ("counter", "prefix banks stacked for prefills (cache misses)"),
        "rlprefix_queue_rows": ("gauge", "rows waiting for a free slot in the running batch"),
        "rlprefix_prefixes": ("gauge", "prefixes served, base included"),
        "rlprefix_batch_rows": ("histogram", "rows per decode step"),
        "rlprefix_batch_prefixes": ("histogram", "distinct prefixes per decode step"),
        "rlprefix_request_latency_seconds": ("histogram", "request latency from arrival to full reply"),
    }

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple], float] = {}
        self._series: dict[str, int] = {}  # label sets per metric
        self._hist: dict[str, tuple[tuple, list[int], list[float]]] = {
            "rlprefix_batch_rows": (BATCH_BUCKETS, [0] * (len(BATCH_BUCKETS) + 1), [0.0]),
            "rlprefix_batch_prefixes": (BATCH_BUCKETS, [0] * (len(BATCH_BUCKETS) + 1), [0.0]),
            "rlprefix_request_latency_seconds": (LATENCY_BUCKETS, [0] * (len(LATENCY_BUCKETS) + 1), [0.0]),
        }

    def inc(self, name: str, value: float = 1, **labels) -> None:
        key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
        with self._lock:
            if key not in self._values and labels and self._series.get(name, 0) >= MAX_SERIES:
                key = (name, tuple((k, "other") for k, _ in key[1]))
            if key not in self._values:
                self._series[name] = self._series.get(name, 0) + 1
            self._values[key] = self._values.get(key, 0) + value

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._values[(name, ())] = value

    def observe(self, name: str, value: float) -> None:
        buckets, counts, total = self._hist[name]
        with self._lock:
            counts[bisect.bisect_left(buckets, value)] += 1
            total[0] += value

    def render(self) -> str:
        with self._lock:
            lines = []
            for name, (kind, text) in self.HELP.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                if kind == "histogram":
                    lines += self._render_hist(name)
                else:
                    series = [(k[1], v) for k, v in self._values.items() if k[0] == name] or [((), 0)]
                    lines += [f"{name}{_labels(dict(lab))} {v:g}" for lab, v in sorted(series)]
            return "\n".join(lines) + "\n"

    def _render_hist(self, name: str) -> list[str]:
        buckets, counts, total = self._hist[name]
        out, acc = [], 0
        for bound, c in zip(buckets, counts):
            acc += c
            out.append(f'{name}_bucket{{le="{bound:g}"}} {acc}')
        acc += counts[-1]
        return out + [f'{name}_bucket{{le="+Inf"}} {acc}', f"{name}_sum {total[0]:g}", f"{name}_count {acc}"]
