"""The deployment files: the Kubernetes manifests validate against Kubernetes' own schemas
(offline), and the compose file runs two replicas over one store behind nginx."""

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFESTS = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "ptmoe-serve.yaml").read_text()))


@pytest.mark.parametrize("resource", MANIFESTS, ids=lambda r: r["kind"])
def test_manifests_validate_against_kubernetes_schemas(resource):
    kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


def test_the_deployment_runs_replicas_over_one_shared_store_with_keys_and_probes():
    kinds = {r["kind"]: r for r in MANIFESTS}
    assert kinds["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    deployment = kinds["Deployment"]["spec"]
    assert deployment["replicas"] >= 2
    pod = deployment["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    container = pod["spec"]["containers"][0]
    assert {e["name"] for e in container["env"]} == {"PTMOE_API_KEY", "PTMOE_ADMIN_API_KEY"}
    assert all("secretKeyRef" in e["valueFrom"] for e in container["env"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
              for v in pod["spec"]["volumes"]}
    assert mounts["adapters"] == "/adapters"
    assert claims["adapters"] == kinds["PersistentVolumeClaim"]["metadata"]["name"]


def test_compose_runs_two_replicas_over_one_folder_behind_nginx():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    replicas = [name for name, s in services.items() if s.get("image") == "ptmoe-serve:latest"]
    assert len(replicas) == 2
    assert len({tuple(services[name]["volumes"]) for name in replicas}) == 1
    assert services[replicas[0]]["volumes"][0].endswith(":/adapters")
    upstream = re.findall(r"server\s+([\w-]+):8000;", (DEPLOY / "nginx.conf").read_text())
    assert sorted(upstream) == sorted(replicas)
    assert set(services["nginx"]["depends_on"]) == set(replicas)
