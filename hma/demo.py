"""`python -m hma demo`: disaggregated serving end to end on this machine, with the demo model.

Starts a prefill host, a decode host and a router as separate processes on localhost, waits
until the router is healthy, sends one chat request through its HTTP API (streaming), prints
the answer, time to first token, decode tokens/s and the KV bytes moved, then stops them
(--serve keeps them up and prints the URL).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request

from hma.launch import LocalCluster, stream_chat


def run_demo(args: argparse.Namespace) -> None:
    cluster = LocalCluster(prefill_flags=["--prefill-dtype", args.prefill_dtype, "--kv-dtype", args.kv_dtype],
                           decode_flags=["--kv-dtype", args.kv_dtype])
    print(f"starting prefill, decode and router processes (logs in {cluster.log_dir}) ...", file=sys.stderr)
    t0 = time.perf_counter()
    with cluster:
        print(f"healthy after {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        _chat_once(cluster.url, args)
        if args.serve:
            print(f"serving the OpenAI API at {cluster.url}/v1 (Ctrl-C stops)", file=sys.stderr)
            try:
                while all(p.poll() is None for p in cluster.processes.values()):
                    time.sleep(1)
            except KeyboardInterrupt:
                pass


def _chat_once(url: str, args: argparse.Namespace) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": args.prompt}], "max_tokens": args.max_tokens,
            "temperature": 0, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    events = stream_chat(url + "/v1/chat/completions", body)
    pieces = [(t, e["choices"][0]["delta"].get("content", "")) for t, e in events if e.get("choices")]
    timed = [t for t, text in pieces if text]
    usage = next(e["usage"] for _, e in reversed(events) if e.get("usage"))
    with urllib.request.urlopen(f"{url}/debug/timeline/{events[0][1]['id']}") as response:
        timeline = json.loads(response.read())
    print(f"> {args.prompt}\n{''.join(text for _, text in pieces)}")
    ttft = timed[0] - sent
    decode_rate = (usage["completion_tokens"] - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else float("nan")
    print(f"[ttft {ttft * 1e3:.0f} ms | decode {decode_rate:.1f} tokens/s | {usage['prompt_tokens']} prompt + "
          f"{usage['completion_tokens']} completion tokens | KV moved {timeline['kv_frame_bytes'] / 1e6:.2f} MB "
          f"as {timeline['kv_format']} in {len(timeline['layers'])} layer frames]")
