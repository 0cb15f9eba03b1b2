#!/usr/bin/env python3
"""Validates keyway's manifests offline, with no API server.

- `kubectl kustomize` renders manifests/ and manifests/istio/;
- every built-in object (and every CRD object) is checked against the Kubernetes OpenAPI schemas
  of each version in VERSIONS, strictly (unknown fields are errors), by kubernetes-validate;
- every CRD's schema is checked to be structural, as the API server insists;
- every keyway.io object, in the renders and in examples/ and conformance/netpol/, is checked
  against its CRD's own schema;
- built-in objects in examples/ are checked too;
- and the checks are shown to fail on documents that are wrong, so a pass means something.

Exit status 0 when everything holds; 1 with one line per problem otherwise.
"""

import copy
import glob
import os
import re
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSIONS = ["1.29.0", "1.33.0", "1.37.0"]
RENDERS = ["manifests", "manifests/istio"]
EXAMPLES = ["examples/*.yaml", "conformance/netpol/*.yaml"]
# The NetworkPolicy cases hold their objects in `steps[].apply`, with address templates.
CASES = "conformance/netpol/cases/*.yaml"
TEMPLATES = [
    (re.compile(r"\{\{(overlay16|podIP16) [^}]*\}\}"), "192.0.2.0/24"),
    (re.compile(r"\{\{(overlay|podIP) [^}]*\}\}"), "192.0.2.1"),
]


def example_docs():
    """(file, document) for every object in the examples and the NetworkPolicy cases."""
    for pattern in EXAMPLES:
        for f in sorted(glob.glob(os.path.join(ROOT, pattern))):
            with open(f) as fh:
                for d in yaml.safe_load_all(fh):
                    if d and "kind" in d:
                        yield f, d
    for f in sorted(glob.glob(os.path.join(ROOT, CASES))):
        with open(f) as fh:
            case = yaml.safe_load(fh)
        for step in case.get("steps") or []:
            text = step.get("apply")
            if not text:
                continue
            for rx, value in TEMPLATES:
                text = rx.sub(value, text)
            for d in yaml.safe_load_all(text):
                if d and "kind" in d:
                    yield f, d


def kustomize(path):
    out = subprocess.run(
        ["kubectl", "kustomize", os.path.join(ROOT, path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def name_of(doc):
    m = doc.get("metadata") or {}
    ns = m.get("namespace")
    return f"{doc.get('kind')} {ns + '/' if ns else ''}{m.get('name')}"


def k8s_errors(doc):
    errs = []
    for v in VERSIONS:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            errs.append(f"{name_of(doc)} (Kubernetes {v}): {e.message} at {'/'.join(map(str, e.path))}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errs.append(f"{name_of(doc)} (Kubernetes {v}): no schema: {e}")
    return errs


def structural_errors(schema, where):
    """The API server's structural-schema rule: every node says its type."""
    errs = []
    if not isinstance(schema, dict):
        return [f"{where}: not an object"]
    if "type" not in schema and not (
        schema.get("x-kubernetes-int-or-string") or schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        errs.append(f"{where}: no type")
    for k, sub in (schema.get("properties") or {}).items():
        errs += structural_errors(sub, f"{where}.{k}")
    if isinstance(schema.get("items"), dict):
        errs += structural_errors(schema["items"], f"{where}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        errs += structural_errors(schema["additionalProperties"], f"{where}{{}}")
    for k in ("anyOf", "oneOf", "allOf"):
        if k in schema:
            errs.append(f"{where}: {k} at a node (allowed only under a typed node, keep it out)")
    return errs


def to_json_schema(s):
    """OpenAPI v3 (as CRDs write it) to JSON Schema: `nullable` becomes a null type."""
    if isinstance(s, list):
        return [to_json_schema(x) for x in s]
    if not isinstance(s, dict):
        return s
    s = {k: to_json_schema(v) for k, v in s.items() if not k.startswith("x-kubernetes-")}
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
        if "enum" in s:
            s["enum"] = s["enum"] + [None]
    return s


def crd_validators(crds):
    vals = {}
    for c in crds:
        spec = c["spec"]
        for v in spec["versions"]:
            schema = to_json_schema(v["schema"]["openAPIV3Schema"])
            vals[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = (
                jsonschema.Draft7Validator(schema),
                spec["scope"],
            )
    return vals


def crd_object_errors(doc, vals):
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in vals:
        return [f"{name_of(doc)}: no CRD defines {key[0]} {key[1]}"]
    validator, scope = vals[key]
    errs = [
        f"{name_of(doc)}: {e.message} at {'/'.join(map(str, e.path))}"
        for e in validator.iter_errors(doc)
    ]
    if scope == "Cluster" and (doc.get("metadata") or {}).get("namespace"):
        errs.append(f"{name_of(doc)}: cluster-scoped but has a namespace")
    return errs


def check(docs, vals):
    errs = []
    for d in docs:
        if str(d.get("apiVersion", "")).startswith("keyway.io/"):
            errs += crd_object_errors(d, vals)
        else:
            errs += k8s_errors(d)
        if d.get("kind") == "CustomResourceDefinition":
            for v in d["spec"]["versions"]:
                errs += structural_errors(v["schema"]["openAPIV3Schema"], f"{name_of(d)} {v['name']}")
    return errs


def broken_on_purpose(docs):
    """Wrong documents the checks must reject."""
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    bad_ds = copy.deepcopy(ds)
    bad_ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = 7
    typo_ds = copy.deepcopy(ds)
    typo_ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    return [
        bad_ds,
        typo_ds,
        {"apiVersion": "keyway.io/v1alpha1", "kind": "ClusterConfig", "metadata": {"name": "c"},
         "spec": {"policyMode": "Lenient"}},
        {"apiVersion": "keyway.io/v1alpha1", "kind": "OverlayNetwork", "metadata": {"name": "n"},
         "spec": {"blockPrefix": 24}},
        {"apiVersion": "keyway.io/v1alpha1", "kind": "ExternalEntity", "metadata": {"name": "e", "namespace": "x"},
         "spec": {"overlayIps": "fd00::1", "address": "192.0.2.1:6080", "gateway": "node-1"}},
    ]


def main():
    problems = []
    counts = {}
    all_crds = []
    for r in RENDERS:
        docs = kustomize(r)
        counts[r] = len(docs)
        crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
        all_crds = all_crds or crds
        problems += check(docs, crd_validators(crds))
        for field in ("privileged",):
            for d in docs:
                if d["kind"] != "DaemonSet":
                    continue
                for c in d["spec"]["template"]["spec"]["containers"]:
                    sc = c.get("securityContext") or {}
                    if sc.get(field):
                        problems.append(f"{r}: container {c['name']} is privileged")
                    added = set((sc.get("capabilities") or {}).get("add") or [])
                    if not added <= {"NET_ADMIN", "MKNOD", "SYS_ADMIN"}:
                        problems.append(f"{r}: container {c['name']} adds {sorted(added)}")
                    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                        problems.append(f"{r}: container {c['name']} does not drop ALL")
    vals = crd_validators(all_crds)
    examples = 0
    for f, d in example_docs():
        examples += 1
        for e in check([d], vals):
            problems.append(f"{os.path.relpath(f, ROOT)}: {e}")
    wrong = broken_on_purpose(kustomize(RENDERS[0]))
    missed = [name_of(d) for d in wrong if not check([d], vals)]
    for m in missed:
        problems.append(f"the checks accepted a document that is wrong on purpose: {m}")
    for p in problems:
        print(p)
    print(
        f"manifests: {', '.join(f'{r} {n} objects' for r, n in counts.items())}; "
        f"{examples} example objects; Kubernetes {', '.join(VERSIONS)}; "
        f"{len(wrong) - len(missed)}/{len(wrong)} wrong documents rejected; "
        f"{len(problems)} problems"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
