#!/usr/bin/env python3
"""Offline validation of the Kubernetes manifests in a directory (deploy/kubernetes).

    python3 tests/deploy/validate.py DIR [--kubernetes-version 1.37]

Every YAML document of every *.yaml file is checked:
- built-in kinds against the Kubernetes OpenAPI schemas that kubernetes-validate ships,
  strict (a field Kubernetes does not know is an error: kubectl's default
  --validate=strict has the API server refuse it, and with validation off the field is
  dropped and the setting silently lost);
- the snapshot.storage.k8s.io custom resources against the hand-written schemas beside
  this script (kubernetes-validate has no CRDs);
- then what no schema can see: references between objects (service accounts, roles,
  secrets, claims, classes, volumes, the CSI sockets and paths) and the values the
  driver accepts in StorageClass and VolumeSnapshotClass parameters.

Prints one line per document checked. Every problem is printed as
`FAIL FILE#N KIND/NAME: PROBLEM` (N is the document's position in its file, from 1)
and the exit status is 1; 2 for bad usage, 3 when kubernetes-validate is missing.
"""

import argparse
import json
import os
import posixpath
import re
import sys

try:
    import jsonschema
    import kubernetes_validate
    import referencing
    import yaml
    from kubernetes_validate.utils import VersionNotSupportedError
except ImportError as e:
    sys.stderr.write(
        f"validate.py: cannot import {e.name} ({e}): install kubernetes-validate from PyPI, which "
        "brings jsonschema, referencing and PyYAML with it (tests/run does: python3 -m pip install "
        "kubernetes-validate)\n"
    )
    sys.exit(3)

HERE = os.path.dirname(os.path.abspath(__file__))

# The newest version the pinned kubernetes-validate carries; a fixed one, so a new
# release of the package cannot change what passes.
KUBERNETES_VERSION = "1.37"

CUSTOM_SCHEMAS = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): "volumesnapshotclass.schema.json",
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"): "volumesnapshot.schema.json",
}
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "StorageClass", "CSIDriver",
    "VolumeSnapshotClass", "PersistentVolume", "PriorityClass", "CustomResourceDefinition",
}

# What driver.longhorn.io's controller accepts in a StorageClass (csi/src/ids.rs
# volume_params): anything else fails CreateVolume, long after the class was applied.
SC_PARAMETERS = {"numberOfReplicas", "staleReplicaTimeout", "fromBackup", "recurringJobs", "fsType", "dataLocality", "dataEngine"}
SC_PREFIX = "csi.storage.k8s.io/"
# The engine's recurring job rules (engine/src/jobs.rs parse_jobs).
JOB_TASKS = {"snapshot", "backup", "snapshot-force-create", "backup-force-create"}
JOB_FIELDS = {"name", "task", "cron", "retain", "labels", "groups", "concurrency"}
# Minute, hour, day of month, month, day of week (0 and 7 are Sunday).
CRON_FIELDS = [("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}),
               ("month", 1, 12, {m: i + 1 for i, m in enumerate(
                   ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"])}),
               ("day of week", 0, 7, {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])})]

# The API access each upstream sidecar needs, from the rules its own
# deploy/kubernetes/rbac.yaml documents (the parts every installation uses):
# image name -> [(API group, resource, verbs)].
SIDECAR_ACCESS = {
    "csi-provisioner": [("", "persistentvolumes", {"get", "list", "watch", "create", "delete"}),
                        ("", "persistentvolumeclaims", {"get", "list", "watch", "update"}),
                        ("storage.k8s.io", "storageclasses", {"get", "list", "watch"}),
                        ("", "events", {"create", "patch"}),
                        ("storage.k8s.io", "csinodes", {"get", "list", "watch"}),
                        ("", "nodes", {"get", "list", "watch"}),
                        ("storage.k8s.io", "volumeattachments", {"get", "list", "watch"}),
                        ("snapshot.storage.k8s.io", "volumesnapshots", {"get", "list"}),
                        ("snapshot.storage.k8s.io", "volumesnapshotcontents", {"get", "list"})],
    "csi-attacher": [("", "persistentvolumes", {"get", "list", "watch", "patch"}),
                     ("storage.k8s.io", "csinodes", {"get", "list", "watch"}),
                     ("storage.k8s.io", "volumeattachments", {"get", "list", "watch", "patch"}),
                     ("storage.k8s.io", "volumeattachments/status", {"patch"})],
    "csi-snapshotter": [("", "events", {"create", "patch"}),
                        ("snapshot.storage.k8s.io", "volumesnapshotclasses", {"get", "list", "watch"}),
                        ("snapshot.storage.k8s.io", "volumesnapshotcontents", {"get", "list", "watch", "update", "patch"}),
                        ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", {"update", "patch"})],
    "csi-resizer": [("", "persistentvolumes", {"get", "list", "watch", "patch"}),
                    ("", "persistentvolumeclaims", {"get", "list", "watch"}),
                    ("", "persistentvolumeclaims/status", {"patch"}),
                    ("", "pods", {"get", "list", "watch"}),
                    ("", "events", {"create", "patch"})],
}
LEASE_ACCESS = [("coordination.k8s.io", "leases", {"get", "list", "watch", "create", "update"})]


class Doc:
    def __init__(self, path, index, body):
        self.path = path
        self.index = index
        self.body = body

    @property
    def kind(self):
        return self.body.get("kind") if isinstance(self.body, dict) else None

    @property
    def name(self):
        meta = self.body.get("metadata") if isinstance(self.body, dict) else None
        return meta.get("name") if isinstance(meta, dict) else None

    @property
    def namespace(self):
        meta = self.body.get("metadata") or {}
        return meta.get("namespace") or "default"

    def where(self):
        return f"{os.path.basename(self.path)}#{self.index} {self.kind or '?'}/{self.name or '?'}"


class Report:
    def __init__(self):
        self.failures = 0

    def ok(self, doc, what):
        print(f"ok   {doc.where()}: {what}")

    def fail(self, doc, problem):
        self.failures += 1
        where = doc.where() if isinstance(doc, Doc) else doc
        print(f"FAIL {where}: {problem}")


def load(directory, report):
    docs = []
    files = sorted(f for f in os.listdir(directory) if f.endswith((".yaml", ".yml")))
    if not files:
        report.fail(directory, "no *.yaml files")
    for f in files:
        # kustomize's own file is not a Kubernetes object.
        if f in ("kustomization.yaml", "kustomization.yml"):
            continue
        path = os.path.join(directory, f)
        try:
            with open(path) as fh:
                bodies = list(yaml.safe_load_all(fh))
        except (OSError, yaml.YAMLError) as e:
            report.fail(f, f"cannot be read as YAML: {e}")
            continue
        n = 0
        for body in bodies:
            if body is None:
                continue
            n += 1
            doc = Doc(path, n, body)
            if not isinstance(body, dict):
                report.fail(doc, "is not a mapping")
                continue
            missing = [k for k in ("apiVersion", "kind") if not isinstance(body.get(k), str)]
            if missing or not isinstance(doc.name, str):
                report.fail(doc, "has no " + ", ".join(missing + ([] if isinstance(doc.name, str) else ["metadata.name"])))
                continue
            docs.append(doc)
        if n == 0:
            report.fail(f, "holds no document")
    # Secrets a script of the directory makes (keys and certificates cannot be
    # committed): it says so in a line `# validate: makes Secret NS/NAME keys K ...`,
    # and the Secret counts as defined, with those keys, for the references.
    for f in sorted(f for f in os.listdir(directory) if f.endswith(".sh")):
        path = os.path.join(directory, f)
        with open(path) as fh:
            lines = fh.read().splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"#\s*validate: makes Secret ([a-z0-9-]+)/([a-z0-9.-]+) keys (.+)$", line)
            if m:
                keys = m.group(3).split()
                body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                        "metadata": {"name": m.group(2), "namespace": m.group(1)},
                        "stringData": {k: "made by " + f for k in keys}}
                docs.append(Doc(path, i + 1, body))
    return docs


def custom_registry():
    resources = []
    for f in sorted(os.listdir(HERE)):
        if f.endswith(".schema.json"):
            with open(os.path.join(HERE, f)) as fh:
                schema = json.load(fh)
            resources.append((schema["$id"], referencing.Resource.from_contents(schema)))
    return referencing.Registry().with_resources(resources)


def path_of(error):
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def message_of(error):
    # jsonschema's oneOf message prints the whole instance and the alternatives'
    # schemas; for alternatives that are each a required field, say which fields.
    alts = error.validator_value if error.validator == "oneOf" else None
    if alts and all(isinstance(a, dict) and list(a) == ["required"] for a in alts):
        fields = [f for a in alts for f in a["required"]]
        given = [f for f in fields if isinstance(error.instance, dict) and f in error.instance]
        return f"needs exactly one of {', '.join(fields)}; it has {', '.join(given) or 'none'}"
    return error.message


def check_schema(doc, version, registry, report):
    key = (doc.body["apiVersion"], doc.kind)
    if key in CUSTOM_SCHEMAS:
        file = CUSTOM_SCHEMAS[key]
        schema = registry.contents(f"https://longhorn-rs.invalid/deploy/{file}")
        validator = jsonschema.Draft202012Validator(schema, registry=registry)
        errors = sorted(validator.iter_errors(doc.body), key=lambda e: list(map(str, e.absolute_path)))
        for e in errors:
            report.fail(doc, f"{path_of(e)}: {message_of(e)} (schema {file})")
        if not errors:
            report.ok(doc, f"valid against tests/deploy/{file}")
        return
    try:
        got = kubernetes_validate.validate(doc.body, version, strict=True)
        report.ok(doc, f"valid against Kubernetes {got} (strict)")
    except kubernetes_validate.ValidationError as e:
        report.fail(doc, f"{path_of(e)}: {e.message} (Kubernetes {e.version} schema, strict)")
    except kubernetes_validate.SchemaNotFoundError as e:
        report.fail(doc, f"{e.message}: not a built-in kind, and tests/deploy has no schema for it")
    except VersionNotSupportedError as e:
        report.fail(doc, f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for Kubernetes {e.version}")


# ---- what the schemas cannot see ----

def pod_spec(doc):
    b = doc.body
    kind = doc.kind
    try:
        if kind == "Pod":
            return b["spec"]
        if kind in ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"):
            return b["spec"]["template"]["spec"]
        if kind == "CronJob":
            return b["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    except (KeyError, TypeError):
        return None
    return None


def containers(spec):
    return [c for key in ("initContainers", "containers") for c in spec.get(key) or [] if isinstance(c, dict)]


def flag(c, name):
    """The value of --name=V or --name V in a container's command and args."""
    argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def image_name(c):
    image = str(c.get("image") or "")
    return image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]


def mount_for(c, spec, path):
    """(volume, path inside it) of a container path, by the longest mountPath holding it."""
    best = None
    for m in c.get("volumeMounts") or []:
        mp = str(m.get("mountPath", "")).rstrip("/") or "/"
        if path == mp or path.startswith(mp + "/") or mp == "/":
            if best is None or len(mp) > len(best[0]):
                best = (mp, m)
    if best is None:
        return None
    mp, m = best
    vol = next((v for v in spec.get("volumes") or [] if v.get("name") == m.get("name")), None)
    rel = posixpath.relpath(path, mp) if path != mp else ""
    if m.get("subPath"):
        rel = posixpath.join(m["subPath"], rel) if rel else m["subPath"]
    return vol, rel


def socket_of(endpoint):
    for prefix in ("unix://", "unix:"):
        if endpoint.startswith(prefix):
            return endpoint[len(prefix):]
    return endpoint


class Index:
    def __init__(self, docs):
        self.docs = docs
        self.by_kind = {}
        for d in docs:
            self.by_kind.setdefault(d.kind, []).append(d)

    def find(self, kind, name, namespace=None):
        for d in self.by_kind.get(kind, []):
            if d.name == name and (namespace is None or d.namespace == namespace):
                return d
        return None

    def names(self, kind):
        return [d.name for d in self.by_kind.get(kind, [])]


def check_identity(ix, report):
    seen = {}
    for d in ix.docs:
        group = d.body["apiVersion"].split("/")[0] if "/" in d.body["apiVersion"] else ""
        ns = None if d.kind in CLUSTER_SCOPED else d.namespace
        key = (group, d.kind, ns, d.name)
        if key in seen:
            report.fail(d, f"the same object as {seen[key].where()}: one would overwrite the other")
        seen[key] = d
        meta_ns = (d.body.get("metadata") or {}).get("namespace")
        if d.kind in CLUSTER_SCOPED and meta_ns:
            report.fail(d, f"{d.kind} is cluster-scoped; metadata.namespace {meta_ns!r} means nothing")
        elif d.kind not in CLUSTER_SCOPED and meta_ns and meta_ns != "default" and not ix.find("Namespace", meta_ns):
            report.fail(d, f"namespace {meta_ns!r} is not created by any of these manifests (no Namespace {meta_ns})")


def rules_of(ix, kind, name, namespace):
    role = ix.find(kind, name, namespace if kind == "Role" else None)
    return (role.body.get("rules") or []) if role else []


def granted(ix, sa_name, sa_ns):
    """Every RBAC rule bound to a service account, with the namespace it applies in
    (None: every namespace)."""
    out = []
    for b in ix.by_kind.get("ClusterRoleBinding", []) + ix.by_kind.get("RoleBinding", []):
        subjects = b.body.get("subjects") or []
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa_name and s.get("namespace", b.namespace) == sa_ns
                   for s in subjects):
            continue
        ref = b.body.get("roleRef") or {}
        scope = None if b.kind == "ClusterRoleBinding" else b.namespace
        for r in rules_of(ix, ref.get("kind"), ref.get("name"), b.namespace):
            out.append((scope, r))
    return out


def allows(rules, namespace, group, resource, verbs):
    have = set()
    for scope, r in rules:
        if scope is not None and scope != namespace:
            continue
        if group not in (r.get("apiGroups") or []) and "*" not in (r.get("apiGroups") or []):
            continue
        if resource not in (r.get("resources") or []) and "*" not in (r.get("resources") or []):
            continue
        have |= set(r.get("verbs") or [])
    return set() if "*" in have else verbs - have


def check_rbac(ix, report):
    for b in ix.by_kind.get("ClusterRoleBinding", []) + ix.by_kind.get("RoleBinding", []):
        ref = b.body.get("roleRef") or {}
        kind, name = ref.get("kind"), ref.get("name")
        if ref.get("apiGroup") != "rbac.authorization.k8s.io":
            report.fail(b, f"roleRef.apiGroup is {ref.get('apiGroup')!r}, not rbac.authorization.k8s.io")
        if kind == "Role" and b.kind == "ClusterRoleBinding":
            report.fail(b, f"a ClusterRoleBinding cannot bind the Role {name!r}")
        elif kind == "ClusterRole" and not ix.find("ClusterRole", name):
            report.fail(b, f"roleRef names ClusterRole {name!r}, which none of these manifests defines")
        elif kind == "Role" and not ix.find("Role", name, b.namespace):
            report.fail(b, f"roleRef names Role {name!r} in namespace {b.namespace}, which none of these manifests defines")
        for s in b.body.get("subjects") or []:
            if s.get("kind") != "ServiceAccount":
                continue
            ns = s.get("namespace") or (b.namespace if b.kind == "RoleBinding" else None)
            if ns is None:
                report.fail(b, f"subject ServiceAccount {s.get('name')!r} has no namespace")
            elif not ix.find("ServiceAccount", s.get("name"), ns):
                report.fail(b, f"subject ServiceAccount {ns}/{s.get('name')} is not defined by any of these manifests")


def check_env_refs(doc, c, report):
    if c.get("envFrom"):
        return
    defined = {e.get("name") for e in c.get("env") or []}
    for a in (c.get("command") or []) + (c.get("args") or []):
        for var in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(a)):
            if var not in defined:
                report.fail(doc, f"container {c.get('name')}: {a!r} uses $({var}), which is not in its env (Kubernetes would pass it literally)")


def check_pod(ix, doc, spec, report):
    ns = doc.namespace
    sa = spec.get("serviceAccountName") or "default"
    if sa != "default" and not ix.find("ServiceAccount", sa, ns):
        report.fail(doc, f"serviceAccountName {sa!r} is not a ServiceAccount in namespace {ns} defined by these manifests")
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    for name, v in volumes.items():
        secret = (v.get("secret") or {}).get("secretName")
        if secret:
            s = ix.find("Secret", secret, ns)
            if not s:
                report.fail(doc, f"volume {name}: Secret {ns}/{secret} is not defined by these manifests")
            else:
                keys = set((s.body.get("data") or {}).keys()) | set((s.body.get("stringData") or {}).keys())
                for item in v["secret"].get("items") or []:
                    if item.get("key") not in keys:
                        report.fail(doc, f"volume {name}: Secret {secret} has no key {item.get('key')!r} (it has {sorted(keys)})")
        claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
        if claim and not ix.find("PersistentVolumeClaim", claim, ns):
            report.fail(doc, f"volume {name}: PersistentVolumeClaim {ns}/{claim} is not defined by these manifests")
    if spec.get("hostNetwork") and spec.get("dnsPolicy") != "ClusterFirstWithHostNet":
        report.fail(doc, "hostNetwork: true needs dnsPolicy: ClusterFirstWithHostNet, or the pod cannot resolve cluster names")
    used_volumes = set()
    for c in containers(spec):
        cname = c.get("name")
        for m in c.get("volumeMounts") or []:
            used_volumes.add(m.get("name"))
            if m.get("name") not in volumes:
                report.fail(doc, f"container {cname}: volumeMount {m.get('name')!r} names no volume of the pod (volumes: {sorted(volumes)})")
            if m.get("mountPropagation") == "Bidirectional" and not (c.get("securityContext") or {}).get("privileged"):
                report.fail(doc, f"container {cname}: mountPropagation Bidirectional on {m.get('mountPath')} needs securityContext.privileged: true (the API server refuses it otherwise)")
        for d in c.get("volumeDevices") or []:
            used_volumes.add(d.get("name"))
            if d.get("name") not in volumes:
                report.fail(doc, f"container {cname}: volumeDevice {d.get('name')!r} names no volume of the pod")
        ports = {p.get("name") for p in c.get("ports") or [] if p.get("name")}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            port = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
            if isinstance(port, str) and port not in ports:
                report.fail(doc, f"container {cname}: {probe} uses port {port!r}, which is not one of its named ports {sorted(ports)}")
        image = str(c.get("image") or "")
        if "@" not in image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            report.fail(doc, f"container {cname}: image {image!r} has no fixed tag")
        check_env_refs(doc, c, report)
        for f in ("token-file",):
            p = flag(c, f)
            if p and mount_for(c, spec, p) is None:
                report.fail(doc, f"container {cname}: --{f}={p} is in no volume mounted in the container")
    for name in volumes:
        if name not in used_volumes:
            report.fail(doc, f"volume {name} is mounted by no container")
    # The workload controller only adopts pods its selector matches.
    if doc.kind in ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet"):
        selector = ((doc.body.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        labels = (((doc.body.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}
        for k, v in selector.items():
            if labels.get(k) != v:
                report.fail(doc, f"spec.selector.matchLabels {k}={v} does not match the pod template's labels {labels}")
    check_csi_pod(ix, doc, spec, report)


def check_csi_pod(ix, doc, spec, report):
    """The CSI plugin's socket, as each sidecar and kubelet reach it."""
    plugin = None
    for c in containers(spec):
        # The upstream sidecars are clients of the socket; the plugin serves it.
        ep = flag(c, "endpoint")
        if ep and "/sig-storage/" not in str(c.get("image") or ""):
            plugin = (c, socket_of(ep))
    if plugin is None:
        return
    pc, sock = plugin
    where = mount_for(pc, spec, sock)
    if where is None:
        report.fail(doc, f"container {pc.get('name')}: its CSI socket {sock} is in no mounted volume, so no sidecar can reach it")
        return
    vol, rel = where
    sidecars = [c for c in containers(spec) if c is not pc and flag(c, "csi-address")]
    if not sidecars:
        report.fail(doc, f"container {pc.get('name')} serves CSI on {sock} but no container passes --csi-address")
    for c in sidecars:
        addr = socket_of(flag(c, "csi-address"))
        got = mount_for(c, spec, addr)
        if got is None or got[0] is None or got[0].get("name") != vol.get("name") or got[1] != rel:
            report.fail(doc, f"container {c.get('name')}: --csi-address={addr} is not the socket {sock} of {pc.get('name')} (volume {vol.get('name')}, {rel})")
        reg = flag(c, "kubelet-registration-path")
        if reg is not None:
            host = (vol.get("hostPath") or {}).get("path")
            if not host:
                report.fail(doc, f"container {c.get('name')}: the plugin's socket volume {vol.get('name')} is not a hostPath, so kubelet cannot reach --kubelet-registration-path={reg}")
            elif posixpath.normpath(reg) != posixpath.normpath(posixpath.join(host, rel)):
                report.fail(doc, f"container {c.get('name')}: --kubelet-registration-path={reg} is not where the socket is on the host ({posixpath.join(host, rel)}, volume {vol.get('name')} at {host})")
            reg_dirs = [v for m in c.get("volumeMounts") or [] for v in spec.get("volumes") or []
                        if v.get("name") == m.get("name") and (v.get("hostPath") or {}).get("path", "").rstrip("/") == "/var/lib/kubelet/plugins_registry"]
            if not reg_dirs:
                report.fail(doc, f"container {c.get('name')}: the registrar mounts no hostPath /var/lib/kubelet/plugins_registry, so kubelet never learns of the driver")
    # Each sidecar's API access, as its upstream RBAC documents it.
    sa = spec.get("serviceAccountName") or "default"
    rules = granted(ix, sa, doc.namespace)
    for c in containers(spec):
        need = list(SIDECAR_ACCESS.get(image_name(c), []))
        argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
        if any(a == "--leader-election" or (a.startswith("--leader-election=") and a.split("=", 1)[1] != "false") for a in argv):
            need += LEASE_ACCESS
        for group, resource, verbs in need:
            missing = allows(rules, doc.namespace, group, resource, verbs)
            if missing:
                report.fail(doc, f"container {c.get('name')}: ServiceAccount {doc.namespace}/{sa} may not {', '.join(sorted(missing))} {resource}"
                                 f"{' in ' + group if group else ''}")


def check_cron(expr):
    fields = expr.split()
    if len(fields) != 5:
        return f"{expr!r} has {len(fields)} fields, not 5 (minute hour day-of-month month day-of-week)"
    for text, (what, lo, hi, names) in zip(fields, CRON_FIELDS):
        for part in text.split(","):
            m = re.fullmatch(r"(\*|[0-9a-z]+(?:-[0-9a-z]+)?)(?:/([0-9]+))?", part.lower())
            if not m:
                return f"{expr!r}: {what} field {text!r} is not a cron field"
            if m.group(2) is not None and int(m.group(2)) == 0:
                return f"{expr!r}: {what} field {text!r} has a step of 0"
            if m.group(1) == "*":
                continue
            for v in m.group(1).split("-"):
                n = names.get(v, int(v) if v.isdigit() else None)
                if n is None or not lo <= n <= hi:
                    return f"{expr!r}: {what} {v!r} is not in {lo}-{hi}"
    return None


def check_jobs(text):
    try:
        jobs = json.loads(text)
    except json.JSONDecodeError as e:
        return [f"recurringJobs is not JSON: {e}"]
    if not isinstance(jobs, list):
        return ["recurringJobs must be a JSON list of jobs"]
    problems, names = [], set()
    for i, j in enumerate(jobs):
        if not isinstance(j, dict):
            problems.append(f"recurringJobs[{i}] is not an object")
            continue
        at = f"recurringJobs[{i}] ({j.get('name')!r})"
        for k in sorted(set(j) - JOB_FIELDS):
            problems.append(f"{at}: unknown field {k!r}")
        name = j.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9-]{1,8}", name):
            problems.append(f"{at}: name must be 1 to 8 characters of a-z, 0-9 and '-'")
        elif name in names:
            problems.append(f"{at}: name {name!r} is used by another job")
        names.add(name)
        if j.get("task") not in JOB_TASKS:
            problems.append(f"{at}: task {j.get('task')!r} is not one of {', '.join(sorted(JOB_TASKS))}")
        cron = j.get("cron")
        bad = check_cron(cron) if isinstance(cron, str) else "cron is required and must be a string"
        if bad:
            problems.append(f"{at}: cron {bad}")
        retain = j.get("retain")
        if isinstance(retain, bool) or not isinstance(retain, int) or not 1 <= retain <= 250:
            problems.append(f"{at}: retain must be a whole number from 1 to 250, not {retain!r}")
        labels = j.get("labels")
        if labels is not None and not (isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())):
            problems.append(f"{at}: labels must map strings to strings")
    return problems


def check_storage(ix, report):
    drivers = set(ix.names("CSIDriver"))
    if not drivers:
        report.fail("(all files)", "no CSIDriver is defined")
    for sc in ix.by_kind.get("StorageClass", []):
        prov = sc.body.get("provisioner")
        if prov not in drivers:
            report.fail(sc, f"provisioner {prov!r} is not the CSIDriver of these manifests ({', '.join(sorted(drivers))})")
            continue
        params = sc.body.get("parameters") or {}
        for k, v in params.items():
            if k not in SC_PARAMETERS and not k.startswith(SC_PREFIX):
                report.fail(sc, f"parameter {k!r} is not one {prov} accepts ({', '.join(sorted(SC_PARAMETERS))}, {SC_PREFIX}*)")
        n = params.get("numberOfReplicas")
        if n is not None and not (isinstance(n, str) and n.isdigit() and int(n) >= 1):
            report.fail(sc, f"numberOfReplicas {n!r} is not a whole number of at least 1")
        t = params.get("staleReplicaTimeout")
        if t is not None and not (isinstance(t, str) and t.isdigit() and 1 <= int(t) <= 5256000):
            report.fail(sc, f"staleReplicaTimeout {t!r} is not 1 to 5256000 minutes")
        if params.get("fsType") not in (None, "ext4", "xfs"):
            report.fail(sc, f"fsType {params['fsType']!r} is not ext4 or xfs")
        if "fsType" in params and SC_PREFIX + "fstype" in params:
            report.fail(sc, f"both fsType and {SC_PREFIX}fstype are set: the external-provisioner refuses the class")
        if params.get("dataLocality") not in (None, "disabled"):
            report.fail(sc, f"dataLocality {params['dataLocality']!r}: the driver supports only disabled")
        if params.get("dataEngine") not in (None, "v1"):
            report.fail(sc, f"dataEngine {params['dataEngine']!r}: the driver supports only v1")
        if "recurringJobs" in params:
            for p in check_jobs(params["recurringJobs"]) if isinstance(params["recurringJobs"], str) else ["recurringJobs must be a string holding JSON"]:
                report.fail(sc, p)
    for vsc in ix.by_kind.get("VolumeSnapshotClass", []):
        if vsc.body.get("driver") not in drivers:
            report.fail(vsc, f"driver {vsc.body.get('driver')!r} is not the CSIDriver of these manifests ({', '.join(sorted(drivers))})")
        for k, v in (vsc.body.get("parameters") or {}).items():
            if k == "type" and v not in ("snap", "bak"):
                report.fail(vsc, f"parameter type {v!r} is not snap or bak")
            elif k != "type" and not k.startswith(SC_PREFIX):
                report.fail(vsc, f"parameter {k!r} is not one the driver accepts (type, {SC_PREFIX}*)")
    for pvc in ix.by_kind.get("PersistentVolumeClaim", []):
        cls = (pvc.body.get("spec") or {}).get("storageClassName")
        if cls and not ix.find("StorageClass", cls):
            report.fail(pvc, f"storageClassName {cls!r} is not a StorageClass of these manifests")
    for vs in ix.by_kind.get("VolumeSnapshot", []):
        spec = vs.body.get("spec") or {}
        cls = spec.get("volumeSnapshotClassName")
        if cls and not ix.find("VolumeSnapshotClass", cls):
            report.fail(vs, f"volumeSnapshotClassName {cls!r} is not a VolumeSnapshotClass of these manifests")
        claim = (spec.get("source") or {}).get("persistentVolumeClaimName")
        if claim and not ix.find("PersistentVolumeClaim", claim, vs.namespace):
            report.fail(vs, f"source.persistentVolumeClaimName {claim!r} is not a claim in namespace {vs.namespace} of these manifests")


def main():
    ap = argparse.ArgumentParser(description="Validate Kubernetes manifests offline (schemas and cross-references).")
    ap.add_argument("directory")
    ap.add_argument("--kubernetes-version", default=KUBERNETES_VERSION,
                    help=f"schemas of this Kubernetes version (default {KUBERNETES_VERSION})")
    a = ap.parse_args()
    if not os.path.isdir(a.directory):
        ap.error(f"{a.directory}: not a directory")
    carried = sorted({".".join(v.split(".")[:2]) for v in kubernetes_validate.utils.all_versions()},
                     key=lambda v: tuple(int(x) for x in v.split(".")))
    want = ".".join(a.kubernetes_version.lstrip("v").split(".")[:2])
    if want not in carried:
        sys.stderr.write(
            f"validate.py: kubernetes-validate {kubernetes_validate.__version__} carries the schemas of Kubernetes "
            f"{', '.join(carried)}, not {want}: install kubernetes-validate=={KUBERNETES_VERSION}.0 (as tests/run "
            "does) or pass --kubernetes-version\n"
        )
        sys.exit(2)
    report = Report()
    docs = load(a.directory, report)
    registry = custom_registry()
    for d in docs:
        check_schema(d, a.kubernetes_version, registry, report)
    ix = Index(docs)
    before = report.failures
    check_identity(ix, report)
    check_rbac(ix, report)
    for d in docs:
        spec = pod_spec(d)
        if spec is not None:
            check_pod(ix, d, spec, report)
    check_storage(ix, report)
    if report.failures == before:
        print(f"ok   cross-references of {len(docs)} documents")
    if report.failures:
        print(f"{report.failures} problem(s) in {a.directory}", file=sys.stderr)
        sys.exit(1)
    print(f"{len(docs)} documents in {a.directory}: all valid")


if __name__ == "__main__":
    main()
