#!/usr/bin/env python3
"""The run half of scripts/gpu-check.sh: on a GPU host, from the folder that
`scripts/gpu-check.sh prepare` packed, in one command:

  1. tests     the CUDA kernel and model tests (fused ops against their
               references, the device Llama and Stable Diffusion paths against
               the host, a model served from cuda:0), CUDA required;
  2. serve     the daemon on the GPU serving the demo models' shapes through
               the official OpenAI client (scripts/gpu/serve_check.py);
  3. lifecycle load, eviction under a tight GPU budget, scale to zero with the
               driver's free memory back where it started;
  4. decode    Llama-3-8B-architecture bf16 decode at batch 1 and 16 against
               the bandwidth roofline and transformers (benches/gpu_decode.py);
     images    SD 1.5-size UNet step and whole 512x512 image (sd_speed);
  5. a summary (summary.json), a readable report (report.md) and the logs.

Weights are random at the real shapes: the demo chat and embedding models
are refilled from their packed headers (their tokenizers and chat template
are the real ones), the big models are written on the host.

Without a GPU it says so and exits 2. `--dry-run` goes through every stage
on the CPU instead (small presets), to check this flow before a GPU is lent;
it still fails every check that needs a GPU and exits 3: nothing it prints is
a GPU figure.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import write_report  # noqa: E402

REPO = HERE.parents[1]
STAGES = ["tests", "serve", "lifecycle", "decode", "images"]
# Test binaries (cargo target name -> the tests in it that use the GPU).
GPU_TESTS = {
    "fused": [],
    "device": ["bf16_on_the_device_path_tracks_f32"],
    "stable_diffusion": ["half_precision_device_path_tracks_diffusers"],
    "devices": ["gpu_devices_fall_back_to_the_cpu_or_serve_on_the_gpu"],
}
LIB_NAMES = ["libcuda.so.1", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13"]


class Run:
    """Where things are, what has been found, and the time left."""

    def __init__(self, args):
        self.args = args
        self.start = time.monotonic()
        self.pack = Path(args.pack).resolve()
        self.out = Path(args.out).resolve()
        self.work = Path(args.work).resolve()
        self.logs = self.work / "logs"
        self.summary = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "dry_run": args.dry_run, "host": platform.node(), "stages": {}}
        self.env = dict(os.environ)
        self.bins = {}

    def left(self):
        return self.args.budget - (time.monotonic() - self.start)

    def log(self, name):
        self.logs.mkdir(parents=True, exist_ok=True)
        return self.logs / f"{name}.log"

    def sh(self, name, cmd, timeout, env=None, check=True):
        """Runs `cmd`, output to the log `name`; returns (rc, seconds, tail)."""
        timeout = max(5, min(timeout, self.left()))
        path = self.log(name)
        t = time.monotonic()
        with open(path, "a") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n")
            f.flush()
            # Its own process group, so a timeout also stops what it started
            # (a daemon holding GPU memory, say).
            proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                    env=env or self.env, cwd=REPO, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = 124
                f.write(f"\n[timed out after {timeout:.0f} s]\n")
            try:  # whatever it left running
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        secs = time.monotonic() - t
        tail = path.read_text(errors="replace")[-1500:]
        if check and rc != 0:
            raise StageError(f"{Path(str(cmd[0])).name} exited {rc}", tail)
        return rc, secs, tail


class StageError(Exception):
    def __init__(self, why, tail=""):
        super().__init__(why)
        self.tail = tail


def nvidia_smi(fields):
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return None, "nvidia-smi is not installed: no NVIDIA driver on this machine"
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"nvidia-smi: {e}"
    if out.returncode != 0:
        return None, f"nvidia-smi exited {out.returncode}: {(out.stderr or out.stdout).strip()[:300]}"
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.strip().splitlines()]
    return (rows or None), ("nvidia-smi lists no GPU" if not rows else "")


def find_libraries():
    """Folders holding the CUDA libraries the binary opens at run time: the
    loader's cache, the toolkit, the driver's mount, Python's NVIDIA wheels."""
    found, dirs = {}, []
    try:
        cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    except OSError:
        cache = ""
    for name in LIB_NAMES:
        for line in cache.splitlines():
            if line.strip().startswith(name + " "):
                found[name] = line.rsplit("=>", 1)[-1].strip()
                break
    roots = [Path("/usr/local/nvidia/lib64"), Path("/usr/local/cuda/lib64"),
             Path("/usr/local/cuda/targets/x86_64-linux/lib"), Path("/usr/lib/x86_64-linux-gnu")]
    roots += sorted(Path("/usr/local").glob("cuda-*/targets/x86_64-linux/lib"))
    for site in python_sites():
        roots += sorted(Path(site).glob("nvidia/*/lib")) + sorted(Path(site).glob("nvidia/cu13/lib"))
    for name in LIB_NAMES:
        for r in roots:
            if name not in found and (r / name).exists():
                found[name] = str(r / name)
    for path in found.values():
        d = str(Path(path).parent)
        if d not in dirs:
            dirs.append(d)
    return found, dirs


def python_sites():
    try:
        out = subprocess.run([sys.executable, "-c", "import site,sys; print('\\n'.join(site.getsitepackages()+[site.getusersitepackages()]))"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [s for s in out.splitlines() if s and Path(s).is_dir()]


def preflight(run):
    s = run.summary
    rows, why = nvidia_smi("name,memory.total,memory.used,memory.free,driver_version,pci.bus_id")
    s["gpu"] = None
    if rows:
        name, total, used, free, driver, bus = rows[0][:6]
        s["gpu"] = {"name": name, "memory_total_mib": int(total), "memory_used_mib": int(used),
                    "memory_free_mib": int(free), "driver": driver, "count": len(rows), "bus": bus}
    else:
        s["no_gpu_reason"] = why
    libs, dirs = find_libraries()
    s["libraries"] = libs
    missing = [n for n in LIB_NAMES if n not in libs]
    if missing:
        s["libraries_missing"] = missing
    run.env["LD_LIBRARY_PATH"] = ":".join(dirs + [run.env.get("LD_LIBRARY_PATH", "")]).strip(":")
    s["cpu"] = {"cores": os.cpu_count(), "model": cpu_model()}
    s["python"] = sys.version.split()[0]
    s["disk_free_gb"] = round(shutil.disk_usage(run.work.parent).free / 1e9, 1)
    if s["gpu"] is not None and missing:
        s["no_gpu_reason"] = "CUDA libraries missing: " + ", ".join(missing)


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def unpack(run):
    """Binaries into the work folder; the build's absolute paths (baked into
    the test binaries) made to point at this checkout."""
    manifest = json.loads((run.pack / "manifest.json").read_text())
    run.summary["build"] = {k: manifest[k] for k in ("commit", "built", "compute_cap", "nvcc") if k in manifest}
    bindir = run.work / "bin"
    stamp = bindir / ".commit"
    if not (stamp.exists() and stamp.read_text() == manifest["pack_id"]):
        shutil.rmtree(bindir, ignore_errors=True)
        bindir.mkdir(parents=True)
        with tarfile.open(run.pack / "bin.tar.xz", "r:xz") as t:
            if sys.version_info >= (3, 12):
                t.extractall(bindir, filter="data")
            else:
                t.extractall(bindir)
        stamp.write_text(manifest["pack_id"])
    root = Path(manifest["build_root"])
    if not root.exists():
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            root.symlink_to(REPO)
        except OSError as e:
            run.summary["warnings"] = [f"cannot link {root} to this checkout: {e}"]
    # The daemon test starts the binary at the path cargo built it to.
    for rel in manifest["files"]:
        dest = root / rel
        # A dry run leaves the build it checks in place.
        if not (run.args.dry_run and dest.exists()):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bindir / rel, dest)
    (root / "target" / "tmp").mkdir(parents=True, exist_ok=True)
    run.bins = {name: bindir / rel for name, rel in manifest["binaries"].items()}
    run.pack_id = manifest["pack_id"]
    run.env["LD_LIBRARY_PATH"] = f"{bindir / 'target/release'}:{run.env.get('LD_LIBRARY_PATH', '')}".strip(":")


def make_models(run):
    """The demo models' shapes refilled with random values, and sd-tiny."""
    store = run.work / "store"
    models = run.pack / "models"
    # Made from this pack's headers, or made again.
    if (store / ".pack").exists() and (store / ".pack").read_text() != run.pack_id:
        shutil.rmtree(store)
    store.mkdir(parents=True, exist_ok=True)
    (store / ".pack").write_text(run.pack_id)
    gguf = store / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        run.sh("models", [run.bins["random-weights"], "fill", models / "smollm2-135m.shape.gguf", gguf.with_suffix(".part")], 120)
        gguf.with_suffix(".part").rename(gguf)
    minilm = store / "all-minilm-l6-v2"
    if not (minilm / "model.safetensors").exists():
        shutil.copytree(models / "all-minilm-l6-v2", minilm, dirs_exist_ok=True)
        part = minilm / "model.safetensors.part"
        run.sh("models", [run.bins["random-weights"], "fill", minilm / "model.safetensors.shape", part], 120)
        part.rename(minilm / "model.safetensors")
    if not (store / "sd-tiny" / "model_index.json").exists():
        run.sh("models", [run.bins["random-pipeline"], "--preset", "tiny", store / "sd-tiny"], 120)
    run.env["KINDLING_STORE"] = str(store)
    return store


def start_big_writes(run):
    """Writes the benchmark weights in the background (CPU and disk only)."""
    big = run.work / "big"
    big.mkdir(parents=True, exist_ok=True)
    jobs = {}
    gpu = not run.args.dry_run
    if "decode" in run.stages:
        llama = big / ("llama3-8b" if gpu else "tiny")
        if not (llama / ".done").exists():
            jobs["llama"] = (llama, [run.bins["gpu_decode"], "write", llama, "llama3-8b" if gpu else "tiny"])
    if "images" in run.stages and gpu:
        sd = big / "sd15"
        if not (sd / ".done").exists():
            jobs["sd15"] = (sd, [run.bins["random-pipeline"], "--preset", "sd15", "--dtype", "f16", sd])
    threads = {}
    for name, (dest, cmd) in jobs.items():
        def work(dest=dest, cmd=cmd, name=name):
            shutil.rmtree(dest, ignore_errors=True)
            rc, secs, _ = run.sh(f"write-{name}", cmd, 400, check=False)
            if rc == 0:
                (dest / ".done").write_text(f"{secs:.1f}\n")
        threads[name] = threading.Thread(target=work, daemon=True)
        threads[name].start()
    return big, threads


def wait_for(run, threads, name, what):
    """Waits for every background write (nothing else may run while a
    benchmark times), then checks that `name`'s finished."""
    for t in threads.values():
        t.join(timeout=max(1, run.left() - 30))
    if not (what / ".done").exists():
        raise StageError(f"the {name} weights were not written", run.log(f"write-{name}").read_text(errors="replace")[-1500:] if run.log(f"write-{name}").exists() else "")
    return float((what / ".done").read_text())


def panics(text, most=6):
    """Each failing test's panic: where, and the message's first line."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if "panicked at" in line:
            out.append((line.strip() + " " + (lines[i + 1].strip() if i + 1 < len(lines) else ""))[:400])
    return out[:most]


def test_cmd(exe, names):
    """A test binary, one test at a time, limited to `names` when given."""
    return [exe, "--test-threads=1", *names] + (["--exact"] if names else [])


def stage_tests(run):
    results = {}
    env = dict(run.env, KINDLING_TEST_REQUIRE_CUDA="1", RUST_BACKTRACE="1")
    for target, names in GPU_TESTS.items():
        exe = run.bins.get(f"test:{target}")
        if exe is None:
            results[target] = {"status": "missing", "why": "not in the pack"}
            continue
        rc, secs, tail = run.sh(f"test-{target}", test_cmd(exe, names), 240, env=env, check=False)
        passed = [line for line in tail.splitlines() if line.startswith("test result:")]
        results[target] = {"status": "pass" if rc == 0 else "fail", "seconds": round(secs, 1),
                           "result": passed[-1] if passed else tail.strip().splitlines()[-1:]}
        if rc != 0:
            results[target]["panics"] = panics(run.log(f"test-{target}").read_text(errors="replace"))
    if run.args.dry_run:
        # Without the requirement, the CPU halves of the same tests on the
        # random-weight models (checks the models, not the GPU).
        for target, names in GPU_TESTS.items():
            exe = run.bins.get(f"test:{target}")
            if exe is None:
                continue
            rc, secs, _ = run.sh(f"test-{target}-cpu", test_cmd(exe, names), 240, check=False)
            results[target]["cpu_only"] = "pass" if rc == 0 else f"fail (rc {rc})"
    failed = [t for t, r in results.items() if r["status"] != "pass"]
    return {"status": "fail" if failed else "pass", "binaries": results,
            **({"why": "failed: " + ", ".join(failed)} if failed else {})}


def stage_serve(run, part):
    device = "cpu" if run.args.dry_run else "cuda:0"
    out = run.work / f"{part}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, HERE / "serve_check.py", part, "--bin", run.bins["kindling"],
           "--store", run.work / "store", "--device", device, "--json", out,
           "--wheels", run.pack / "wheels", "--site", run.work / "site", "--logs", run.logs]
    rc, secs, tail = run.sh(part, cmd, 240, check=False)
    result = json.loads(out.read_text()) if out.exists() else {"status": "fail", "why": f"rc {rc}", "tail": tail[-800:]}
    result["seconds"] = round(secs, 1)
    return result


def stage_decode(run, big, threads):
    dry = run.args.dry_run
    llama = big / ("tiny" if dry else "llama3-8b")
    written = wait_for(run, threads, "llama", llama)
    out = run.work / "decode.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, REPO / "benches/gpu_decode.py", "--bin", run.bins["gpu_decode"],
           "--weights", llama, "--batches", "1,16", "--context", "128", "--steps", "8" if dry else "64",
           "--json", out]
    if dry:
        cmd += ["--preset", "tiny", "--device", "cpu", "--dtype", "f32"]
    rc, secs, tail = run.sh("decode", cmd, 300, check=False)
    if not out.exists():
        raise StageError(f"gpu_decode.py exited {rc}", tail)
    result = json.loads(out.read_text())
    result.update(status="pass" if rc == 0 else "fail", seconds=round(secs, 1), write_seconds=written,
                  model="a two-layer stand-in, f32 on the CPU" if dry else "Llama-3-8B architecture, bf16")
    return result


def stage_images(run, big, threads):
    dry = run.args.dry_run
    if dry:
        pipe, size, steps, extra = run.work / "store/sd-tiny", 64, 4, ["cpu"]
        written = 0.0
    else:
        pipe, size, steps, extra = big / "sd15", 512, 20, ["cuda:0", "bf16"]
        written = wait_for(run, threads, "sd15", pipe)
    rc, secs, tail = run.sh("images", [run.bins["sd_speed"], pipe, size, steps, 1, 3, *extra], 240)
    runs = [json.loads(line) for line in run.log("images").read_text().splitlines() if line.startswith("{")]
    warm = runs[1:] or runs
    best = min(warm, key=lambda r: r["image_s"])
    return {"status": "pass", "seconds": round(secs, 1), "write_seconds": written, "size": size, "steps": steps,
            "dtype": "f32" if dry else "bf16", "runs": runs,
            "model": "sd-tiny on the CPU" if dry else "SD 1.5 architecture", "unet_step_s": best["step_s"],
            "image_s": best["image_s"], "first_image_s": runs[0]["image_s"]}


def run_stage(run, name, fn, *a):
    print(f"== {name} ({run.left():.0f} s left)", flush=True)
    t = time.monotonic()
    if run.left() < 20:
        result = {"status": "skipped", "why": "out of time"}
    else:
        try:
            result = fn(run, *a)
        except StageError as e:
            result = {"status": "fail", "why": str(e), "tail": e.tail[-800:]}
        except Exception as e:  # a bug here must not lose the other stages
            result = {"status": "fail", "why": f"{type(e).__name__}: {e}"}
    result.setdefault("seconds", round(time.monotonic() - t, 1))
    run.summary["stages"][name] = result
    print(f"   {result['status']}" + (f": {result.get('why')}" if result.get("why") else ""), flush=True)
    return result


def finish(run, code):
    s = run.summary
    s["seconds"] = round(time.monotonic() - run.start, 1)
    s["exit_code"] = code
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "summary.json").write_text(json.dumps(s, indent=2, default=str) + "\n")
    try:
        (run.out / "report.md").write_text(write_report(s))
    except Exception as e:  # the summary is written; say why the report is not
        (run.out / "report.md").write_text(f"# Kindling GPU check\n\nNo report ({type(e).__name__}: {e}); see summary.json.\n")
    if run.logs.exists():
        with tarfile.open(run.out / "logs.tar.gz", "w:gz") as t:
            t.add(run.logs, arcname="logs")
    rows, _ = nvidia_smi("name,memory.used,memory.free,temperature.gpu,clocks.sm,clocks.mem,power.draw")
    if rows:
        (run.out / "nvidia-smi.txt").write_text("\n".join(",".join(r) for r in rows) + "\n")
    print((run.out / "report.md").read_text())
    return code


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", default=str(REPO / ".gpu"))
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "gpu-out"))
    p.add_argument("--work", default=str(REPO / ".gpu-work"))
    p.add_argument("--only", default=",".join(STAGES), help="stages: " + ",".join(STAGES))
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole run")
    p.add_argument("--dry-run", action="store_true", help="no GPU: go through every stage on the CPU")
    args = p.parse_args()
    run = Run(args)
    run.stages = [s for s in args.only.split(",") if s]
    unknown = set(run.stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}")
    run.work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run.logs, ignore_errors=True)
    preflight(run)
    gpu = run.summary["gpu"] is not None and "no_gpu_reason" not in run.summary
    if not gpu:
        print(f"NO GPU: {run.summary.get('no_gpu_reason')}", flush=True)
        if not args.dry_run:
            run.summary["verdict"] = "no-gpu"
            return finish(run, 2)
    elif args.dry_run:
        p.error("--dry-run is for machines without a GPU")
    if not (run.pack / "manifest.json").exists():
        run.summary["verdict"] = "fail"
        run.summary["why"] = f"{run.pack} holds no pack: run scripts/gpu-check.sh prepare first"
        return finish(run, 1)
    try:
        unpack(run)
    except (OSError, tarfile.TarError, KeyError, ValueError) as e:
        run.summary["verdict"] = "fail"
        run.summary["why"] = f"unpacking: {e}"
        return finish(run, 1)
    big, threads = start_big_writes(run)
    ok = run_stage(run, "models", lambda r: {"status": "pass", "store": str(make_models(r))})["status"] == "pass"
    for name in run.stages:
        if not ok and name in ("tests", "serve", "lifecycle"):
            run.summary["stages"][name] = {"status": "skipped", "why": "the models were not made"}
            continue
        if name == "tests":
            run_stage(run, name, stage_tests)
        elif name in ("serve", "lifecycle"):
            run_stage(run, name, stage_serve, name)
        elif name == "decode":
            run_stage(run, name, stage_decode, big, threads)
        elif name == "images":
            run_stage(run, name, stage_images, big, threads)
    statuses = [s["status"] for s in run.summary["stages"].values()]
    if not gpu:
        run.summary["verdict"] = "dry-run: no GPU, nothing GPU-side measured"
        return finish(run, 3)
    run.summary["verdict"] = "pass" if all(s == "pass" for s in statuses) else "fail"
    return finish(run, 0 if run.summary["verdict"] == "pass" else 1)


if __name__ == "__main__":
    sys.exit(main())
