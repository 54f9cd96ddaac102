"""The deployment files: the Kubernetes manifests validate against Kubernetes' own schemas
(offline), the fleet tools' resources against those projects' own CRD schemas and plugin
types (vendored in deploy/crds/), and the compose file runs two replicas over one store
behind nginx."""

import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def manifests(name: str) -> list[dict]:
    return [r for r in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if r]


MANIFESTS = manifests("ptmoe-serve.yaml")
READ_ONLY = manifests("ptmoe-serve-read-only.yaml")
WORKER = manifests("fine-tune-worker.yaml")
GATEWAY = {r["kind"]: r for r in manifests("inference-gateway.yaml")}
ADAPTER = manifests("aibrix-model-adapter.yaml")[0]
# The fleet tools' kinds, each checked against its project's own schema below.
CUSTOM_KINDS = {"InferencePool", "HTTPRoute", "ModelAdapter"}


@pytest.mark.parametrize("resource", MANIFESTS + READ_ONLY + WORKER, ids=lambda r: r["kind"])
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


def test_read_only_replicas_mount_one_read_only_volume_and_start_no_worker():
    kinds = {r["kind"]: r for r in READ_ONLY}
    claim = kinds["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    adapters = next(v for v in pod["volumes"] if v["name"] == "adapters")
    assert adapters["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"],
                                                 "readOnly": True}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "adapters")
    assert mount == {"name": "adapters", "mountPath": "/adapters", "readOnly": True}
    assert "--no-fine-tune-worker" in container["args"]
    selector = kinds["Service"]["spec"]["selector"]
    assert selector.items() <= kinds["Deployment"]["spec"]["template"]["metadata"]["labels"].items()


def test_a_worker_run_apart_is_supervised_over_the_servers_store():
    """Kubernetes restarts it (restartPolicy Always), over the claim the servers use; systemd
    restarts it with doubling waits and ranks it first for the OOM killer."""
    import configparser

    deployment = WORKER[0]["spec"]["template"]["spec"]
    container = deployment["containers"][0]
    assert deployment["restartPolicy"] == "Always"
    assert container["command"][:2] == ["ptmoe-serve", "fine-tune-worker"]
    claim = {r["kind"]: r for r in MANIFESTS}["PersistentVolumeClaim"]["metadata"]["name"]
    assert deployment["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
    assert container["volumeMounts"][0]["mountPath"] == container["command"][3] == "/adapters"
    assert deployment["terminationGracePeriodSeconds"] > 60  # a step finishes first
    unit = configparser.ConfigParser(strict=True, interpolation=None)
    unit.optionxform = str
    unit.read_string((DEPLOY / "systemd" / "ptmoe-fine-tune-worker.service").read_text())
    service = unit["Service"]
    assert service["ExecStart"].split()[1:3] == ["fine-tune-worker", "--adapters"]
    assert service["Restart"] == "always" and service["OOMScoreAdjust"] == "1000"
    assert int(service["TimeoutStopSec"]) >= 60 and unit["Install"]["WantedBy"]


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


# -- the fleet tools: Gateway API Inference Extension with llm-d's endpoint picker, AIBrix ----

def crd_schema(file: str, version: str) -> dict:
    crd = yaml.safe_load((DEPLOY / "crds" / file).read_text())
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    return served["schema"]["openAPIV3Schema"]


def undeclared(value, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare (what `kubectl apply --validate=strict` refuses,
    and what the API server would drop without a word)."""
    if isinstance(value, dict) and "properties" in schema:
        found = []
        for key, item in value.items():
            if key in schema["properties"]:
                found += undeclared(item, schema["properties"][key], f"{path}.{key}")
            elif "additionalProperties" not in schema:
                found.append(f"{path}.{key}")
        return found
    if isinstance(value, list) and "items" in schema:
        return [p for i, item in enumerate(value) for p in undeclared(item, schema["items"],
                                                                      f"{path}[{i}]")]
    return []


def check_against_crd(resource: dict, file: str) -> None:
    group, version = resource["apiVersion"].split("/")
    schema = crd_schema(file, version)
    jsonschema.validate(resource, schema)
    assert undeclared(resource, schema) == []


@pytest.mark.parametrize("resource", [r for r in GATEWAY.values()
                                      if r["kind"] not in CUSTOM_KINDS], ids=lambda r: r["kind"])
def test_the_endpoint_pickers_resources_validate_against_kubernetes_schemas(resource):
    kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


def test_the_inference_pool_validates_against_its_crd_and_selects_the_replicas():
    pool = GATEWAY["InferencePool"]
    check_against_crd(pool, "inference.networking.k8s.io_inferencepools.yaml")
    replicas = next(r for r in MANIFESTS if r["kind"] == "Deployment")["spec"]["template"]
    labels = replicas["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = [p["containerPort"] for p in replicas["spec"]["containers"][0]["ports"]]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == ports
    # The picker reads the replicas' metrics as vLLM's.
    assert labels["llm-d.ai/engine-type"] == "vllm"
    picker = pool["spec"]["endpointPickerRef"]
    service = GATEWAY["Service"]
    assert picker["name"] == service["metadata"]["name"]
    assert picker["port"]["number"] in [p["port"] for p in service["spec"]["ports"]]
    route = GATEWAY["HTTPRoute"]["spec"]["rules"][0]["backendRefs"][0]
    assert (route["group"], route["kind"], route["name"]) == (
        "inference.networking.k8s.io", "InferencePool", pool["metadata"]["name"])


def test_a_bad_inference_pool_is_refused_by_the_schema():
    """The check above can fail: a pool without target ports, a misspelt field."""
    pool = GATEWAY["InferencePool"]
    without_ports = {**pool, "spec": {k: v for k, v in pool["spec"].items() if k != "targetPorts"}}
    with pytest.raises(jsonschema.ValidationError):
        check_against_crd(without_ports, "inference.networking.k8s.io_inferencepools.yaml")
    misspelt = {**pool, "spec": {**pool["spec"], "endpointPickerRefs": {}}}
    with pytest.raises(AssertionError):
        check_against_crd(misspelt, "inference.networking.k8s.io_inferencepools.yaml")


def test_the_endpoint_picker_scores_lora_affinity_with_plugins_llm_d_defines():
    deployment = GATEWAY["Deployment"]["spec"]["template"]["spec"]
    args = deployment["containers"][0]["args"]
    config_file = Path(args[args.index("--config-file") + 1])
    mount = deployment["containers"][0]["volumeMounts"][0]
    assert config_file.parent == Path(mount["mountPath"])
    config_map = next(v["configMap"]["name"] for v in deployment["volumes"]
                      if v["name"] == mount["name"])
    assert config_map == GATEWAY["ConfigMap"]["metadata"]["name"]
    assert args[args.index("--pool-name") + 1] == GATEWAY["InferencePool"]["metadata"]["name"]
    config = yaml.safe_load(GATEWAY["ConfigMap"]["data"][config_file.name])
    assert (config["apiVersion"], config["kind"]) == ("llm-d.ai/v1alpha1", "EndpointPickerConfig")
    known = {line for line in (DEPLOY / "crds" / "llm-d-router-plugin-types.txt").read_text()
             .splitlines() if line and not line.startswith("#")}
    types = [p["type"] for p in config["plugins"]]
    assert set(types) <= known, set(types) - known
    assert {"metrics-data-source", "core-metrics-extractor", "lora-affinity-scorer"} <= set(types)
    refs = [p["pluginRef"] for profile in config["schedulingProfiles"] for p in profile["plugins"]]
    assert set(refs) <= {p.get("name", p["type"]) for p in config["plugins"]}
    assert "lora-affinity-scorer" in refs


def test_the_aibrix_model_adapter_validates_against_its_crd_and_selects_the_replicas():
    check_against_crd(ADAPTER, "model.aibrix.ai_modeladapters.yaml")
    labels = next(r for r in MANIFESTS if r["kind"] == "Deployment")["spec"]["template"][
        "metadata"]["labels"]
    assert ADAPTER["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert labels["model.aibrix.ai/port"] == "8000"
    # The controller sends lora_path as given: a folder the replicas can read.
    assert ADAPTER["spec"]["artifactURL"].startswith("/adapters/")
    assert "api-key" in ADAPTER["spec"]["additionalConfig"]
