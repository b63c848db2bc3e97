"""Checks the container files say what README promises of them.

hadolint and yamllint check form; this checks substance: the Dockerfile runs
as a non-root user with its data in a volume and a health check on the gRPC
health service; the compose file starts three distinct members that name each
other; the Kubernetes manifest has a headless Service that publishes members
before they are ready, a StatefulSet whose pods join through the ones before
them and are probed on /readyz and /healthz, and a PodDisruptionBudget that
keeps a quorum. Exits 1 naming each failed check.
"""

import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
failures = []


def check(condition, what):
    if not condition:
        failures.append(what)


dockerfile = (ROOT / "Dockerfile").read_text()
stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", dockerfile, re.MULTILINE)
check(len(stages) >= 2, "the Dockerfile has a build stage and a runtime stage")
check(re.search(r"^USER\s+10001", dockerfile, re.MULTILINE), "the runtime image runs as uid 10001, not root")
check(re.search(r'^VOLUME\s+\["/data"\]', dockerfile, re.MULTILINE), "data lives in the /data volume")
check(re.search(r"^EXPOSE\s+7001\s+8001", dockerfile, re.MULTILINE), "ports 7001 and 8001 are exposed")
check(re.search(r"HEALTHCHECK[\s\S]*endpoint\", \"probe", dockerfile), "the health check asks the gRPC health service")
check("wasm32-wasip2" in dockerfile, "the build stage adds the guests' target")

compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
services = compose.get("services", {})
check(len(services) == 3, "compose starts three members")
ids = set()
for name, service in services.items():
    env = service.get("environment", {})
    ids.add(env.get("RAFT_HOST_ID"))
    check(env.get("RAFT_HOST_ADVERTISE") == f"{name}:7001", f"{name} advertises its own service name")
    peers = dict(p.split("=", 1) for p in env.get("RAFT_HOST_PEERS", "").split(",") if p)
    others = {n for n in services if n != name}
    check({a.split(":")[0] for a in peers.values()} == others, f"{name}'s peers are the other two services")
    check(any(v.endswith(":/data") for v in service.get("volumes", [])), f"{name} keeps its data in a volume")
check(ids == {"1", "2", "3"}, "compose members have ids 1, 2 and 3")

documents = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "raft-host.yaml").read_text()) if d]
by_kind = {}
for document in documents:
    by_kind.setdefault(document["kind"], []).append(document)
headless = [s for s in by_kind.get("Service", []) if s["spec"].get("clusterIP") == "None"]
check(len(headless) == 1, "one headless Service")
statefulsets = by_kind.get("StatefulSet", [])
check(len(statefulsets) == 1, "one StatefulSet")
if headless and statefulsets:
    service, statefulset = headless[0], statefulsets[0]
    check(service["spec"].get("publishNotReadyAddresses") is True, "members resolve each other before ready")
    check(statefulset["spec"]["serviceName"] == service["metadata"]["name"], "the StatefulSet names the headless Service")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    check(service["spec"]["selector"].items() <= labels.items(), "the headless Service selects the pods")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    script = "\n".join(container.get("args", []))
    check("--join" in script, "pods after the first join with --join")
    check(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness is /readyz")
    check(container["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness is /healthz")
    check(statefulset["spec"]["template"]["spec"]["securityContext"].get("runAsNonRoot") is True, "pods run as non-root")
    check(statefulset["spec"].get("volumeClaimTemplates"), "each member has its own volume")
    budgets = by_kind.get("PodDisruptionBudget", [])
    check(len(budgets) == 1 and budgets[0]["spec"].get("maxUnavailable") == 1, "a budget of one member down")
    if budgets:
        selected = budgets[0]["spec"]["selector"]["matchLabels"]
        check(selected.items() <= labels.items(), "the budget selects the pods")

for failure in failures:
    print(f"deploy check failed: {failure}", file=sys.stderr)
sys.exit(1 if failures else 0)
