"""Prompt-lookup speculative decoding, single stream, side by side in one run:
Kindling with `prompt_lookup` off and on (per request, same server), and
llama-server (no drafting) on the same prompts. Two workloads: one where
lookup helps (the answer copies long runs of a text in the prompt: fixing a
few words of a paragraph) and one where it does not (open-ended writing).

    KINDLING_BIN=target/release/kindling python3 benches/speculative.py [--runs 3]

Prints a Markdown table for BENCHMARKS.md: per workload and server, the
median end-to-end decode rate (completion tokens / (total − time to first
token)), the median request time, and for Kindling with lookup the share of
drafts accepted (from `/metrics`). Greedy outputs with and without lookup
are compared and must be identical.
"""
import argparse
import http.client
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import ROOT, Kindling, LlamaServer, stream_chat  # noqa: E402

PARAGRAPH = ("The old lighthouse stood at the edge of the cliff for more than a hundred years. Every night "
             "its keeper climbed the narrow stairs, wound the heavy clock and lit the great lamp, so that "
             "the fishing boats could find their way home through the fog. In the morning he wrote the "
             "weather in a thick book, fed the cat and walked down to the village for bread and news.")
WORKLOADS = {
    "edit a paragraph (helps)": [{
        "role": "user",
        "content": "Rewrite the paragraph below, word for word, but say 'tower' instead of 'lighthouse'.\n\n"
                   + PARAGRAPH,
    }],
    "open-ended story (does not)": [{
        "role": "user",
        "content": "Write a short story about a fox who learns to play the violin.",
    }],
}
MODEL = "smollm2-135m"


def request(base, model, messages, tokens, extra):
    body = {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, **extra}
    ttft, text, _, total = stream_chat(base, body)
    return {"rate": (tokens - 1) / (total - ttft), "total": total, "text": text}


def drafts(base):
    host, port = base
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    value = {}
    for line in text.splitlines():
        for name in ("kindling_spec_draft_tokens", "kindling_spec_accepted_tokens"):
            if line.startswith(name + '{model="' + MODEL + '"}'):
                value[name] = float(line.rsplit(" ", 1)[1])
    return value.get("kindling_spec_draft_tokens", 0.0), value.get("kindling_spec_accepted_tokens", 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--lookahead", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    binary = os.environ.get("KINDLING_BIN", str(ROOT / "target" / "release" / "kindling"))
    results = {}
    with tempfile.TemporaryDirectory() as d:
        config = Path(d) / "kindling.toml"
        config.write_text(f'[models]\nmanifests = "{ROOT / "configs" / "models"}"\nstore = "{ROOT / "store"}"\n')
        k = Kindling(binary, config, args.threads)
        try:
            request(k.base, MODEL, [{"role": "user", "content": "hi"}], 4, {})
            for name, messages in WORKLOADS.items():
                before = drafts(k.base)
                for _ in range(args.runs):
                    off = request(k.base, MODEL, messages, args.tokens, {"prompt_lookup": False})
                    on = request(k.base, MODEL, messages, args.tokens, {"prompt_lookup": args.lookahead})
                    if on["text"] != off["text"]:
                        sys.exit(f"{name}: prompt lookup changed the greedy output")
                    results.setdefault((name, "Kindling, lookup off"), []).append(off)
                    results.setdefault((name, f"Kindling, lookup {args.lookahead}"), []).append(on)
                after = drafts(k.base)
                drafted, accepted = after[0] - before[0], after[1] - before[1]
                results[(name, "accepted")] = (accepted / drafted if drafted else 0.0, drafted / args.runs)
        finally:
            k.stop()
        server = LlamaServer(args.threads, 1, 4096)
        try:
            for name, messages in WORKLOADS.items():
                for _ in range(args.runs):
                    results.setdefault((name, "llama-server"), []).append(
                        request(server.base, "smollm2", messages, args.tokens, {}))
        finally:
            server.stop()
    print("| workload | server | decode tok/s | request s | vs lookup off | drafts accepted |")
    print("|---|---|---|---|---|---|")
    for name in WORKLOADS:
        base = statistics.median(r["rate"] for r in results[(name, "Kindling, lookup off")])
        rate_accepted, per_request = results[(name, "accepted")]
        for server in ("Kindling, lookup off", f"Kindling, lookup {args.lookahead}", "llama-server"):
            runs = results[(name, server)]
            rate = statistics.median(r["rate"] for r in runs)
            total = statistics.median(r["total"] for r in runs)
            acc = (f"{rate_accepted:.0%} of {per_request:.0f} per request"
                   if "lookup" in server and "off" not in server else "")
            print(f"| {name} | {server} | {rate:.1f} | {total:.2f} | {rate / base:.2f}× | {acc} |")


if __name__ == "__main__":
    main()
