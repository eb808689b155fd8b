#!/usr/bin/env bash
# Builds Kindling's container image with podman and proves it runs: the
# official OpenAI Python client drives chat, embeddings and images through a
# published port, then the container gets SIGTERM in the middle of a stream,
# which must end normally before the container exits 0.
#
#   scripts/container-smoke.sh [--prebuilt]    # image from host-built binaries (CI)
#   scripts/container-smoke.sh --full          # the whole multi-stage build
#   scripts/container-smoke.sh --cuda-prebuilt # CUDA image from a CUDA build
#                                              # (run here without a GPU: CPU fallback)
# Options:
#   --store DIR            copy the demo models from DIR into the container's
#                          store volume instead of fetching them inside (faster)
#   --bin PATH             the kindling binary to package (prebuilt modes;
#                          default target/release/kindling)
#   --random-pipeline PATH the random-pipeline binary (default: beside --bin)
#   --no-build             never run cargo here: package the binaries as they are
#   --keep                 leave the container running (stop it yourself)
#
# Needs root (rootful podman). Installs podman, runc, netavark, iptables and
# debootstrap with apt-get when missing. Base images: KINDLING_RUNTIME_IMAGE
# and KINDLING_BUILDER_IMAGE if set; else the Dockerfile's defaults when
# present or pullable; else made here and cached: a Debian bookworm minbase
# made with debootstrap (mirror from the host's apt sources, or
# KINDLING_DEBIAN_MIRROR), and for --full the same with build tools plus this
# host's Rust toolchain. CA certificates added on this host
# (/usr/local/share/ca-certificates) go into the bases made here, so TLS
# through an intercepting proxy works inside as it does outside.
# Podman settings suited to hosts without systemd (cgroupfs, file events,
# runc, netavark) are written to .container/podman/containers.conf unless
# CONTAINERS_CONF is set. Logs go to .container/logs/.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

mode=prebuilt store="" bin="" rp="" allow_build=1 keep=0
while (($#)); do
    case $1 in
        --prebuilt) mode=prebuilt ;;
        --full) mode=full ;;
        --cuda-prebuilt) mode="cuda-prebuilt" ;;
        --store) store=$(cd "${2:?--store needs a folder}" && pwd); shift ;;
        --bin) bin=${2:?--bin needs a path}; shift ;;
        --random-pipeline) rp=${2:?--random-pipeline needs a path}; shift ;;
        --no-build) allow_build=0 ;;
        --keep) keep=1 ;;
        -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "container-smoke: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

state=$root/.container
logs=$state/logs
mkdir -p "$logs"
# Staged binaries, logs and settings: never to be committed.
[[ -f $state/.gitignore ]] || echo '*' >"$state/.gitignore"
say() { echo "container-smoke: $*" >&2; }
die() { say "error: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[[ $(id -u) == 0 ]] || die "run as root (rootful podman)"
name="" rootfs=""
cleanup() {
    [[ -z $rootfs ]] || rm -rf "$rootfs"
    [[ -n $name ]] || return 0
    if ((keep)); then
        say "left running: $name (port ${port:-}, key ${key:-})"
    else
        timeout 60 podman rm -f -v -t 5 "$name" >/dev/null 2>&1 || true
        [[ -z $store ]] || timeout 60 podman volume rm -f "$name" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT
trap 'say "failed at line $LINENO: $BASH_COMMAND"' ERR
target_dir=${CARGO_TARGET_DIR:-$root/target}
suite=bookworm

# --- tools ------------------------------------------------------------------
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
[[ -x /usr/lib/podman/netavark || -x /usr/libexec/podman/netavark ]] || need+=(netavark aardvark-dns)
command -v iptables >/dev/null || need+=(iptables)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v strip >/dev/null || need+=(binutils)
if ((${#need[@]})); then
    say "installing ${need[*]}"
    timeout 900 apt-get update -q >"$logs/apt.log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q --no-install-recommends \
        "${need[@]}" >>"$logs/apt.log" 2>&1 || { tail -n 20 "$logs/apt.log" >&2; die "apt-get install failed"; }
fi

if [[ -z ${CONTAINERS_CONF:-} ]]; then
    mkdir -p "$state/podman"
    export CONTAINERS_CONF=$state/podman/containers.conf
    # Without CAP_SYS_RESOURCE (some sandboxes) the runtime cannot raise the
    # container's limits past this shell's: ask for no more than it has.
    ulimits=""
    cap=$(awk '/^CapEff/ { print $2 }' /proc/self/status)
    if (((0x$cap >> 24 & 1) == 0)); then
        n=$(ulimit -Hn); p=$(ulimit -Hu)
        [[ $n == unlimited || $n -gt 16384 ]] && n=16384
        [[ $p == unlimited || $p -gt 16384 ]] && p=16384
        ulimits="default_ulimits = [\"nofile=$n:$n\", \"nproc=$p:$p\"]"
    fi
    cat >"$CONTAINERS_CONF" <<EOF
# Podman settings of scripts/container-smoke.sh (works without systemd).
[containers]
log_driver = "k8s-file"
$ulimits
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
helper_binaries_dir = ["/usr/lib/podman", "/usr/libexec/podman", "/usr/local/lib/podman", "/usr/local/libexec/podman"]
[network]
network_backend = "netavark"
EOF
fi

# --- base images --------------------------------------------------------------
# debian_uri SUITE: the first Debian URI the host's apt sources give for SUITE.
debian_uri() {
    local s=$1 f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk -v s="$s" '
            /^[[:space:]]*$/ { if (t && ok && u) { print u; found = 1; exit } t = ok = 0; u = ""; next }
            /^Types:/ { for (i = 2; i <= NF; i++) if ($i == "deb") t = 1 }
            /^URIs:/ { u = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) ok = 1 }
            END { if (!found && t && ok && u) print u }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        sed -E 's/\[[^]]*\]//' "$f" | awk -v s="$s" '$1 == "deb" && $3 == s { print $2 }'
    done
}

# make_base IMAGE PACKAGES RUST: a Debian minbase (+ PACKAGES, comma-separated;
# + this host's Rust toolchain when RUST is 1), imported into podman.
make_base() {
    local image=$1 packages=$2 rust=$3
    local mirror=${KINDLING_DEBIAN_MIRROR:-$(debian_uri "$suite" | awk "NR == 1")}
    [[ -n $mirror ]] || die "no Debian $suite mirror in the apt sources: set KINDLING_DEBIAN_MIRROR"
    local security
    security=$(debian_uri "$suite-security" | awk "NR == 1")
    rootfs=$(mktemp -d /var/tmp/kindling-rootfs.XXXXXX)
    local dir=$rootfs log=$logs/debootstrap-${image//[:\/]/_}.log
    say "making $image with debootstrap from $mirror (a few minutes)"
    local t0
    t0=$(now)
    nice -n 19 timeout 1800 debootstrap --variant=minbase ${packages:+--include="$packages"} \
        "$suite" "$dir" "$mirror" >"$log" 2>&1 ||
        { tail -n 20 "$log" >&2; die "debootstrap failed"; }
    {
        echo "deb $mirror $suite main"
        echo "deb $mirror $suite-updates main"
        [[ -z $security ]] || echo "deb $security $suite-security main"
    } >"$dir/etc/apt/sources.list"
    # Security and point-release updates, as a freshly published base has.
    chroot "$dir" sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -q' \
        >>"$log" 2>&1 || { tail -n 20 "$log" >&2; die "apt-get upgrade in $dir failed"; }
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        mkdir -p "$dir/usr/local/share/ca-certificates"
        cp /usr/local/share/ca-certificates/*.crt "$dir/usr/local/share/ca-certificates/"
        [[ ! -x $dir/usr/sbin/update-ca-certificates ]] || chroot "$dir" update-ca-certificates >/dev/null
    fi
    # Like the slim images: no documentation, manuals or translations.
    cat >"$dir/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/cache/apt/*.bin "$dir"/var/lib/apt/lists/* \
        "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/var/log/*.log "$dir"/var/log/apt
    find "$dir/usr/share/doc" -type f ! -name copyright -delete
    find "$dir/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    local path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    local -a change=()
    if ((rust)); then
        local sysroot
        sysroot=$(rustc --print sysroot) || die "no Rust toolchain here to put in the builder image"
        mkdir -p "$dir/usr/local/rust" "$dir/usr/local/cargo"
        tar -C "$sysroot" --exclude=./share/doc -cf - . | tar -C "$dir/usr/local/rust" -xf -
        chroot "$dir" /usr/local/rust/bin/cargo --version >/dev/null || die "the copied toolchain does not run in $suite"
        path=/usr/local/cargo/bin:/usr/local/rust/bin:$path
        change+=(--change "ENV CARGO_HOME=/usr/local/cargo")
    fi
    tar --numeric-owner -C "$dir" -cf - . |
        timeout 600 podman import -q "${change[@]}" --change "ENV PATH=$path" \
            --change 'CMD ["/bin/bash"]' - "$image" >/dev/null || die "podman import failed"
    rm -rf "$rootfs"
    rootfs=""
    made+=("$image ($(since "$t0")s)")
}
made=()

# base_image VAR DEFAULT LOCAL PACKAGES RUST: sets VAR to DEFAULT when present
# or pullable, else to LOCAL (made once, then reused).
base_image() {
    local default=$2 local_image=$3
    if podman image exists "$default" || timeout 300 podman pull -q "$default" >/dev/null 2>&1; then
        printf -v "$1" %s "$default"
    else
        podman image exists "$local_image" || make_base "$local_image" "$4" "$5"
        printf -v "$1" %s "$local_image"
    fi
}

runtime_image=${KINDLING_RUNTIME_IMAGE:-}
if [[ -z $runtime_image ]]; then
    base_image runtime_image debian:bookworm-slim localhost/kindling-base:$suite "" 0
fi
builder_image=""
if [[ $mode == full ]]; then
    builder_image=${KINDLING_BUILDER_IMAGE:-}
    if [[ -z $builder_image ]]; then
        rust_version=$(rustc --version 2>/dev/null | awk '{ print $2 }')
        base_image builder_image rust:1-$suite "localhost/kindling-builder:$suite-rust-${rust_version:-none}" \
            ca-certificates,build-essential,pkg-config,git 1
    fi
fi
say "runtime base: $runtime_image${builder_image:+; builder: $builder_image}"
bases="${made[*]:-none}"

# --- binaries for the prebuilt images -----------------------------------------
needed() { readelf -d "$1" 2>/dev/null | awk '/NEEDED/ { gsub(/[][]/, "", $NF); print $NF }'; }

# Builds the CPU binaries here when missing or older than the sources.
host_build() {
    local stale=0 b
    for b in "$bin" "$rp"; do
        if [[ ! -x $b ]]; then
            stale=2
        elif [[ -n $(find Cargo.toml Cargo.lock build.rs .cargo src models kernels -newer "$b" -type f -print -quit) ]]; then
            ((stale)) || stale=1
        fi
    done
    ((stale)) || return 0
    if ((!allow_build)); then
        ((stale == 1)) || die "$bin or $rp is missing (and --no-build was given)"
        say "warning: the binaries are older than the sources (--no-build: packaging them as they are)"
        return 0
    fi
    say "building the release binaries here (cargo build --release --locked --workspace --bins)"
    nice -n 19 cargo build --release --locked --workspace --bins
}

stage_prebuilt() {
    local kind=$1 out=$state/$1
    if [[ $kind == cpu ]]; then
        bin=${bin:-$target_dir/release/kindling}
        rp=${rp:-$(dirname "$bin")/random-pipeline}
        [[ -n ${bin_given:-} ]] || host_build
        local b
        for b in "$bin" "$rp"; do
            [[ -x $b ]] || die "$b is missing"
            if needed "$b" | grep -q '^libcudart'; then
                die "$b is a CUDA build (links libcudart): build the CPU binaries, or use --cuda-prebuilt"
            fi
        done
        rm -rf "$out"
        mkdir -p "$out"
        strip --strip-debug -o "$out/kindling" "$bin"
        strip --strip-all -o "$out/random-pipeline" "$rp"
    else
        bin=${bin:-$target_dir/release/kindling}
        rp=${rp:-$(dirname "$bin")/random-pipeline}
        local cuda=${KINDLING_CUDA_DIR:-$root/.cuda}/root/lib64 b lib
        for b in "$bin" "$rp"; do
            [[ -x $b ]] || die "$b is missing (scripts/build-cuda.sh builds it)"
            needed "$b" | grep -q '^libcudart' || die "$b is not a CUDA build (scripts/build-cuda.sh)"
            if [[ -n $(find Cargo.toml Cargo.lock build.rs .cargo src models kernels -newer "$b" -type f -print -quit) ]]; then
                say "warning: $b is older than the sources (scripts/build-cuda.sh rebuilds it)"
            fi
        done
        rm -rf "${out:?}/bin"
        mkdir -p "$out/bin" "$out/lib"
        strip --strip-debug -o "$out/bin/kindling" "$bin"
        strip --strip-all -o "$out/bin/random-pipeline" "$rp"
        for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 \
                   libnvrtc.so.13 libnvrtc-builtins.so.13.0; do
            [[ -e $cuda/$lib ]] || die "$cuda/$lib is missing (scripts/cuda-toolkit.sh installs it)"
            cp -L -u --preserve=timestamps "$cuda/$lib" "$out/lib/"
        done
    fi
}

[[ -z $bin ]] || bin_given=1
case $mode in
    prebuilt) target=cpu-prebuilt; stage_prebuilt cpu ;;
    cuda-prebuilt) target="cuda-prebuilt"; stage_prebuilt cuda ;;
    full) target=cpu ;;
esac
image=localhost/kindling:$target

# --- build ----------------------------------------------------------------------
version=$(awk -F'"' '/^version = / { print $2; exit }' Cargo.toml)
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -z $(git status --porcelain --untracked-files=no 2>/dev/null) ]] || revision+="+changes"
build_args=(--build-arg "RUNTIME_IMAGE=$runtime_image" --build-arg "VERSION=$version"
            --build-arg "REVISION=$revision")
[[ -z $builder_image ]] || build_args+=(--build-arg "BUILDER_IMAGE=$builder_image")
build_limit=1800
[[ $mode == full ]] && build_limit=14400
say "building $image (target $target; log: $logs/build-$target.log)"
t_build=$(now)
if ! nice -n 19 timeout "$build_limit" podman build --format docker --target "$target" \
        "${build_args[@]}" -t "$image" . >"$logs/build-$target.log" 2>&1; then
    tail -n 30 "$logs/build-$target.log" >&2
    die "podman build failed"
fi
build_s=$(since "$t_build")
size_mb=$(podman image inspect --format '{{.Size}}' "$image" | awk '{ printf "%.0f", $1 / 1e6 }')
say "built $image in ${build_s}s: ${size_mb} MB"
# The image this tag named before is now untagged: let it go, so repeated
# runs do not fill the disk.
timeout 120 podman image prune -f >/dev/null 2>&1 || true

# --- Python with the OpenAI client ----------------------------------------------
openai_pin=$(grep -E '^openai==' tests/python/requirements.txt)
py=$root/.venv/bin/python
if ! [[ -x $py ]] || ! "$py" -c "import openai, sys; sys.exit(openai.__version__ != '${openai_pin#openai==}')" 2>/dev/null; then
    venv=/var/tmp/kindling-smoke-venv
    py=$venv/bin/python
    if ! [[ -x $py ]] || ! "$py" -c "import openai, sys; sys.exit(openai.__version__ != '${openai_pin#openai==}')" 2>/dev/null; then
        say "installing $openai_pin into $venv"
        python3 -m venv "$venv"
        timeout 600 "$py" -m pip install -q --disable-pip-version-check "$openai_pin"
    fi
fi

# --- run ------------------------------------------------------------------------
name=kindling-smoke-$$
key=smoke-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
run_args=(-d --name "$name" --read-only --tmpfs /tmp -p "127.0.0.1:$port:8080"
          -e "KINDLING_API_KEY=$key")
if [[ -n $store ]]; then
    # A copy in a volume of its own, owned by the image's user: the host's
    # store is left as it is.
    for m in smollm2-135m all-minilm-l6-v2 sd-tiny; do
        [[ -d $store/$m ]] || die "$store/$m is missing (scripts/fetch-models.sh fills the store)"
    done
    timeout 60 podman volume create --opt o=uid=10001,gid=10001 "$name" >/dev/null
    tar -C "$store" --owner=10001 --group=10001 --numeric-owner -cf - \
        smollm2-135m all-minilm-l6-v2 sd-tiny | timeout 300 podman volume import "$name" -
    run_args+=(-v "$name:/models")
else
    run_args+=(-e KINDLING_FETCH_DEMO=1)
fi
models="demo models fetched inside"
[[ -z $store ]] || models="demo models copied from $store"
say "starting $name on 127.0.0.1:$port ($models)"
t_run=$(now)
# (Podman logs that it cannot schedule health checks without systemd.)
timeout 120 podman run "${run_args[@]}" "$image" >/dev/null 2>"$logs/podman-run.log" ||
    { cat "$logs/podman-run.log" >&2; die "podman run failed"; }
export SMOKE_URL=http://127.0.0.1:$port SMOKE_KEY=$key SMOKE_NAME=$name

client() { timeout "$1" "$py" - "${@:2}" <<'PY'
import base64, json, os, subprocess, sys, time, urllib.request
url, key, name = os.environ["SMOKE_URL"], os.environ["SMOKE_KEY"], os.environ["SMOKE_NAME"]
what = sys.argv[1]

def running():
    out = subprocess.run(["podman", "inspect", "--format", "{{.State.Running}}", name],
                         capture_output=True, text=True, timeout=30).stdout.strip()
    return out == "true"

if what == "wait-ready":
    deadline = time.time() + float(sys.argv[2])
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health/ready", timeout=2) as r:
                if r.status == 200:
                    sys.exit(0)
        except OSError:
            pass
        if not running():
            print("the container exited before it was ready", file=sys.stderr)
            sys.exit(1)
        time.sleep(0.25)
    print("not ready in time", file=sys.stderr)
    sys.exit(1)

from openai import OpenAI
client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)
result = {}
if what == "drive":
    t = time.time()
    chat = client.chat.completions.create(
        model="smollm2-135m", max_tokens=24,
        messages=[{"role": "user", "content": "Say hello in five words."}])
    text = chat.choices[0].message.content
    assert text and chat.choices[0].finish_reason in ("stop", "length"), chat
    result["chat"] = {"s": round(time.time() - t, 2), "text": text,
                      "tokens": chat.usage.completion_tokens}
    t = time.time()
    emb = client.embeddings.create(model="all-minilm-l6-v2", input=["a red fox", "a blue whale"])
    dims = [len(d.embedding) for d in emb.data]
    assert dims == [384, 384], dims
    result["embeddings"] = {"s": round(time.time() - t, 2), "dims": dims}
    t = time.time()
    img = client.images.generate(model="sd-tiny", prompt="a lighthouse", size="64x64",
                                 response_format="b64_json", n=1)
    png = base64.b64decode(img.data[0].b64_json)
    assert png[:8] == b"\x89PNG\r\n\x1a\n", png[:8]
    result["images"] = {"s": round(time.time() - t, 2), "png_bytes": len(png)}
    try:
        OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        result["wrong_key"] = "accepted"
    except Exception as e:  # noqa: BLE001
        result["wrong_key"] = type(e).__name__
    assert result["wrong_key"] == "AuthenticationError", result["wrong_key"]
elif what == "sigterm":
    # SIGTERM once the stream is under way; it must still end normally.
    stream = client.chat.completions.create(
        model="smollm2-135m", max_tokens=int(sys.argv[2]), stream=True,
        extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": "Tell a long story about a lighthouse keeper."}])
    chunks, finish, t_kill, ready, t0 = 0, None, None, None, time.time()
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunks == 3 and t_kill is None:
            subprocess.run(["podman", "kill", "--signal", "TERM", name], check=True,
                           capture_output=True, timeout=30)
            t_kill = time.time()
            # Draining: no longer ready (503), or no longer listening.
            try:
                urllib.request.urlopen(url + "/health/ready", timeout=2)
                ready = 200
            except urllib.error.HTTPError as e:
                ready = e.code
            except OSError as e:
                ready = type(e.reason if isinstance(e, urllib.error.URLError) else e).__name__
    t_end = time.time()
    result = {"chunks": chunks, "finish_reason": finish,
              "stream_s": round(t_end - t0, 2),
              "stream_after_sigterm_s": round(t_end - t_kill, 2) if t_kill else None,
              "ready_while_draining": ready if t_kill else None}
    assert t_kill is not None and finish == "length", result
print(json.dumps(result))
PY
}

fail() {
    timeout 30 podman logs --tail 40 "$name" >&2 2>&1 || true
    die "$*"
}
client 900 wait-ready 880 || fail "the daemon did not become ready"
ready_s=$(since "$t_run")
say "ready ${ready_s}s after podman run"

uid=$(timeout 30 podman exec "$name" id -u)
[[ $uid == 10001 ]] || fail "the daemon runs as uid $uid, not 10001"
if timeout 30 podman exec "$name" touch /etc/kindling/x 2>/dev/null; then
    fail "the root file system is writable"
fi
health=$(timeout 60 podman healthcheck run "$name" 2>&1) || fail "health check: $health"

drive=$(client 900 drive) || fail "the OpenAI client checks failed"
say "client: $drive"
t_term=$(now)
sigterm=$(client 300 sigterm 600) || fail "the stream did not survive SIGTERM"
say "SIGTERM mid-stream: $sigterm"
exit_code=$(timeout 90 podman wait "$name") || fail "the container did not exit after SIGTERM"
stop_s=$(since "$t_term")
[[ $exit_code == 0 ]] || fail "the container exited with $exit_code after SIGTERM"
timeout 30 podman logs "$name" >"$logs/run-$target.log" 2>&1 || true
grep -q 'stopped' "$logs/run-$target.log" || fail "the daemon did not log its orderly stop"

tee "$logs/summary-$target.txt" <<EOF

container-smoke: summary ($mode)
  image            $image ($size_mb MB; runtime base $runtime_image)
  build            ${build_s}s (base images made this run: $bases)
  ready            ${ready_s}s after podman run ($models)
  user             uid $uid, read-only root, /tmp tmpfs; health check: ${health:-healthy}
  client           $drive
  SIGTERM          $sigterm
  exit             code $exit_code, ${stop_s}s from the stream's start to exit
EOF
