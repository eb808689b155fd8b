"""The readable report of a GPU check (scripts/gpu/check.py): what ran, what
failed and why, and the figures in tables ready for BENCHMARKS.md."""

GIB = 1 << 30


def gib(b):
    return "-" if b is None else f"{b / GIB:.2f} GiB"


def stage_table(stages):
    rows = ["| stage | status | seconds | note |", "|---|---|---:|---|"]
    for name, s in stages.items():
        note = (s.get("why") or "").replace("|", "/").replace("\n", " ")[:200]
        rows.append(f"| {name} | {s['status']} | {s.get('seconds', '-')} | {note} |")
    return rows


def tests_section(t):
    rows = ["## Tests (CUDA required)", "", "| binary | status | seconds | result |", "|---|---|---:|---|"]
    for name, r in t.get("binaries", {}).items():
        result = r.get("result") or r.get("why") or ""
        if isinstance(result, list):
            result = " ".join(result)
        cpu = f" (CPU parts alone: {r['cpu_only']})" if "cpu_only" in r else ""
        rows.append(f"| {name} | {r['status']} | {r.get('seconds', '-')} | {result}{cpu} |")
    for name, r in t.get("binaries", {}).items():
        for p in r.get("panics", []):
            rows.append(f"- {name}: {p}")
    return rows


def checks_section(title, s):
    rows = [f"## {title}", ""]
    failed = [c for c in s.get("checks", []) if not c["ok"]]
    rows.append(f"{len(s.get('checks', [])) - len(failed)} of {len(s.get('checks', []))} checks passed.")
    for c in failed:
        rows.append(f"- FAILED {c['name']}: {c['detail']}")
    figures = s.get("figures") or {}
    if figures:
        rows += ["", "| figure | value |", "|---|---|"]
        for k, v in figures.items():
            if isinstance(v, dict):
                v = ", ".join(f"{a}: {gib(b) if isinstance(b, int) and b > 1 << 24 else b}" for a, b in v.items())
            elif isinstance(v, int) and v > 1 << 24:
                v = gib(v)
            rows.append(f"| {k} | {v} |")
    return rows


def measured(title, s, key):
    """The section's heading, and why there are no figures when `key` is missing."""
    rows = [f"## {title}", ""]
    return rows, (None if key in s else rows + [f"Not measured: {s.get('why', s.get('status'))}"])


def decode_section(d):
    rows, missing = measured(f"Decode ({d.get('model', 'Llama-3-8B architecture')}, random weights)", d, "batches")
    if missing:
        return missing
    rows.append(f"- device-to-device copy: {d['d2d_bytes_per_s'] / 1e9:.1f} GB/s (read + written)")
    for x in d.get("loads", []):
        rows.append(f"- load ({x['load']}): {x['seconds']:.2f} s, {x['gb_per_s']:.2f} GB/s; free "
                    f"{gib(x['free_before'])} -> {gib(x['free_after_load'])}")
    u = d.get("unload")
    if u:
        rows.append(f"- unload: free {gib(u['free_before_unload'])} -> {gib(u['free_after_unload'])}")
    rows.append(f"- peer: {d.get('peer')}; weights written in {d.get('write_seconds', 0):.0f} s")
    rows += ["", "| batch | Kindling tok/s | step ms | of roofline | transformers tok/s | ratio | greedy agreement |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for b in d["batches"]:
        peer = (f"{b['peer_tokens_per_s']:.1f} | {b['ratio']:.2f} | {b['agree_steps']} of {b['steps']} steps"
                if "ratio" in b else "- | - | -")
        rows.append(f"| {b['batch']} | {b['tokens_per_s']:.1f} | {b['step_ms']:.2f} | {b['of_roofline']:.2f} | {peer} |")
    return rows


def images_section(i):
    rows, missing = measured(f"Images ({i.get('model', 'SD 1.5 architecture')}, random weights)", i, "image_s")
    if missing:
        return missing
    rows += [f"- {i['size']}x{i['size']}, {i['steps']} DDIM steps, guidance 7.5 (UNet batch 2), {i['dtype']}",
             f"- UNet step: {i['unet_step_s'] * 1e3:.1f} ms; whole image (text encoder, steps, VAE decode): "
             f"{i['image_s']:.2f} s; first image (with warm-up): {i['first_image_s']:.2f} s"]
    return rows


def write_report(s):
    gpu = s.get("gpu")
    lines = ["# Kindling GPU check", ""]
    lines.append(f"**Verdict: {s.get('verdict')}** (exit {s.get('exit_code')}, {s.get('seconds')} s)")
    lines.append("")
    if gpu:
        lines.append(f"- GPU: {gpu['name']}, {gpu['memory_total_mib']} MiB, driver {gpu['driver']} ({gpu['count']} GPU(s))")
    else:
        lines.append(f"- GPU: none ({s.get('no_gpu_reason')})")
    cpu = s.get("cpu", {})
    lines.append(f"- host: {cpu.get('cores')} cores, {cpu.get('model')}; Python {s.get('python')}")
    build = s.get("build", {})
    if build:
        lines.append(f"- build: commit {build.get('commit')}, {build.get('built')}, sm_{build.get('compute_cap')}, {build.get('nvcc')}")
    for k in ("libraries_missing", "warnings", "why"):
        if s.get(k):
            lines.append(f"- {k.replace('_', ' ')}: {s[k]}")
    if s.get("dry_run"):
        lines += ["", "Dry run on the CPU: every stage went through with CPU stand-ins; no figure here is a GPU figure."]
    stages = s.get("stages", {})
    if stages:
        lines += [""] + stage_table(stages)
    if "tests" in stages:
        lines += [""] + tests_section(stages["tests"])
    for name, title in (("serve", "Serving through the OpenAI client"), ("lifecycle", "Lifecycle")):
        if name in stages:
            lines += [""] + checks_section(title, stages[name])
    if "decode" in stages:
        lines += [""] + decode_section(stages["decode"])
    if "images" in stages:
        lines += [""] + images_section(stages["images"])
    return "\n".join(lines) + "\n"
