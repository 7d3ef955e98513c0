"""The trained models in MLflow's model registry (vlmpipe/ops/registry.py, vlmpipe/face/pyfunc_model.py).

Fast tests: tiny models built from config (untrained: the point is that the registered model answers
exactly as the project's own back end does), registered in a temporary SQLite store, loaded back
through ``models:/`` after the folders they came from are gone. The slow test reads the models the
tiny DAG registered on a real ``mlflow server`` and serves one with ``mlflow models serve``.
"""
from __future__ import annotations

import base64
import json
import logging
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import torch

import servers
import untrained
from vlmpipe.face import api as cli
from vlmpipe.data import features as embeddings
from vlmpipe.ops import registry
from vlmpipe.face.images import read_image
from vlmpipe.ops.tracking import stage_run

REPO = Path(__file__).resolve().parents[1]
STAGES = {"siglip": "train_siglip", "captioner": "train_gpt2_captioner", "qa": "train_phi2_qlora",
          "chat": "train_gpt2_chat"}
DIRS = {"siglip": "siglip", "captioner": "captioner", "qa": "phi2_vlm", "chat": "chat"}
TEXTS = untrained.TEXTS


def b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """models/{siglip,captioner,chat,phi2_vlm} laid out as the stages write them, untrained; two images."""
    return untrained.build(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def store(built):
    """The four models registered by stage-like runs (under a DVC experiment's name) in a SQLite store."""
    root, _ = built
    uri = f"sqlite:///{root / 'mlflow.db'}"
    versions = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # the git commit the runs record
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("DVC_EXP_NAME", "exp-registry")
        mp.delenv("VLMPIPE_TRACKING", raising=False)
        for kind, stage in STAGES.items():
            with stage_run(stage, {"kind": kind}) as run:
                versions[kind] = (registry.log_model(run, kind, root / "models" / DIRS[kind]), run.run_id)
    return uri, versions


@pytest.fixture
def load(monkeypatch):
    """``load(uri, name, version)``: the registered model, loaded through ``models:/``, and its local folder."""
    import mlflow

    def load(uri: str, name: str, version: int | str = 1):
        # MLflow resolves models:/ through the process's registry URI (the env var), whatever is passed.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}")
        return mlflow.pyfunc.load_model(local), Path(local)
    return load


def test_versions_carry_the_run_and_its_tags(store):
    from mlflow.tracking import MlflowClient

    uri, versions = store
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for kind, (version, run_id) in versions.items():
        assert version is not None, kind
        mv = client.get_model_version(registry.registered_name(kind), version.version)
        assert mv.run_id == run_id and mv.status == "READY"
        assert mv.tags["stage"] == STAGES[kind] and mv.tags["git_commit"] == commit
        assert mv.tags["dvc_experiment"] == "exp-registry"
        assert mv.tags["model_dir"].endswith(f"models/{DIRS[kind]}")


def test_captioner_from_the_registry_captions_like_the_cli(built, store, load):
    import pandas as pd

    root, images = built
    uri, _ = store
    want = cli.caption_files(root / "models/captioner", images)
    # With the folders it was logged from moved away, what loads comes from the registry alone:
    # the model folder, the SigLIP that featurises its images and vlmpipe's code travel with it.
    shutil.move(root / "models", root / "models.away")
    try:
        model, local = load(uri, "vlmpipe-captioner")
        got = model.predict(pd.DataFrame({"image": [b64(p) for p in images]}))
    finally:
        shutil.move(root / "models.away", root / "models")
    assert list(got) == want and all(want)
    assert (local / "artifacts/captioner/model.json").is_file()
    assert (local / "artifacts/siglip/model.safetensors").is_file()
    assert (local / "code/vlmpipe/face/api.py").is_file() and not list(local.rglob("__pycache__"))
    assert "torch==" in (local / "requirements.txt").read_text()


def test_dialogue_models_answer_like_the_cli_with_history(built, store, load):
    import pandas as pd

    root, images = built
    uri, _ = store
    history = [["what colour is the circle?", "red"]]
    qa, _ = load(uri, "vlmpipe-qa")
    # As `dataframe_records` arrive: the first record has no history (a NaN in the frame).
    got = qa.predict(pd.DataFrame.from_records([
        {"image": b64(images[0]), "question": "what colour is the circle?"},
        {"image": b64(images[1]), "question": "yes?", "history": history}]))
    want = [cli.ask_file(root / "models/phi2_vlm", images[0], "what colour is the circle?"),
            cli.ask_file(root / "models/phi2_vlm", images[1], "yes?", history=[tuple(history[0])])]
    assert list(got) == want
    chat, _ = load(uri, "vlmpipe-chat")
    got = chat.predict(pd.DataFrame({"image": [b64(images[1])], "message": ["and the square?"], "history": [history]}))
    conv = cli.Conversation(cli.load_dialogue_model(str(root / "models/chat"), "cpu"), read_image(images[1]))
    conv.history = [tuple(history[0])]
    assert list(got) == [conv.say("and the square?")]


def test_siglip_embeds_images_and_texts_like_the_pipeline(built, store, load):
    import pandas as pd

    from vlmpipe.models.siglip.model import load_siglip

    root, images = built
    uri, _ = store
    model, _ = load(uri, "vlmpipe-siglip")
    out = model.predict(pd.DataFrame({"image": [b64(p) for p in images], "text": TEXTS[:2]}))
    tower = load_siglip(root / "models/siglip")
    want = embeddings.siglip_encoder(tower, 1)([read_image(p) for p in images])[:, 0]
    assert torch.equal(torch.tensor(out["image_embedding"].tolist()), want)
    assert torch.equal(torch.tensor(out["text_embedding"].tolist()), tower.encode_texts(TEXTS[:2]))


def test_bad_input_is_one_line_naming_the_row(built, store, load):
    import pandas as pd
    from mlflow.exceptions import MlflowException

    _, images = built
    uri, _ = store
    model, _ = load(uri, "vlmpipe-qa")
    good = b64(images[0])
    cases = {
        "image in row 1: not base64": {"image": [good, str(images[0])], "question": ["q", "q"]},
        "image in row 1: cannot read image": {"image": [good, base64.b64encode(b"GIF89a trunc").decode()],
                                              "question": ["q", "q"]},
        "question in row 0: empty": {"image": [good], "question": ["  "]},
        "history in row 0: expected a list of": {"image": [good], "question": ["q"], "history": [[["only one"]]]},
        "Model is missing inputs ['question']": {"image": [good]},
    }
    for want, frame in cases.items():
        with pytest.raises(MlflowException) as e:
            model.predict(pd.DataFrame(frame))
        assert want in e.value.message and "\n" not in e.value.message.split("Error: ")[-1], e.value.message


def test_dead_tracking_server_costs_one_warning(built, monkeypatch, caplog):
    root, _ = built
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{servers.dead_port()}")
    monkeypatch.delenv("VLMPIPE_TRACKING", raising=False)
    with caplog.at_level(logging.WARNING), stage_run("train_gpt2_captioner") as run:
        assert registry.log_model(run, "captioner", root / "models/captioner") is None
    warnings = _vlmpipe_warnings(caplog)
    assert len(warnings) == 1 and "unreachable" in warnings[0]


def _vlmpipe_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("vlmpipe")]


def test_refused_registration_costs_one_warning_and_the_run_goes_on(built, monkeypatch, caplog, tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    root, _ = built
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("VLMPIPE_TRACKING", raising=False)

    def refuse(*args, **kwargs):
        raise MlflowException("PERMISSION_DENIED: user may not register models")

    with caplog.at_level(logging.WARNING), stage_run("train_siglip") as run:
        monkeypatch.setattr(run._client, "create_model_version", refuse)
        assert registry.log_model(run, "siglip", root / "models/siglip") is None
        run.log_metrics({"after": 1.0})
    warnings = _vlmpipe_warnings(caplog)
    assert len(warnings) == 1 and "vlmpipe-siglip not registered (PERMISSION_DENIED" in warnings[0]
    logged = MlflowClient(uri).get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.data.metrics == {"after": 1.0}


def test_store_gone_before_registration_costs_one_warning(built, monkeypatch, caplog, tmp_path):
    """The store answered when the run started and is gone when the model is registered: one warning,
    tracking off (ending the run is not tried again), no exception."""
    from mlflow.tracking import MlflowClient

    root, _ = built
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("VLMPIPE_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused port: at once, not after retries
    with caplog.at_level(logging.WARNING), stage_run("train_siglip") as run:
        run._client = MlflowClient(f"http://127.0.0.1:{servers.dead_port()}")
        assert registry.log_model(run, "siglip", root / "models/siglip") is None
        assert not run.active
    warnings = _vlmpipe_warnings(caplog)
    assert len(warnings) == 1 and "registering vlmpipe-siglip failed" in warnings[0], warnings


def test_tracking_off_registers_nothing(built, monkeypatch, tmp_path):
    root, _ = built
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("VLMPIPE_TRACKING", "off")
    with stage_run("train_siglip") as run:
        assert registry.log_model(run, "siglip", root / "models/siglip") is None
    assert not (tmp_path / "mlflow.db").exists()


def test_the_champion_alias_moves_only_to_a_better_version(built, monkeypatch, tmp_path):
    """Three trainings of one model, scored in turn: the first is champion; a worse one is candidate and
    the champion stays; a better one takes champion. Each version carries its scores; weights that no
    version holds change nothing. Registration runs from a temporary experiment workspace (cwd elsewhere,
    DVC_ROOT the repository), as a queued `dvc exp run` does: every version lands in the project's store."""
    from mlflow.tracking import MlflowClient

    root, _ = built
    repo, workspace = tmp_path / "repo", tmp_path / "exp-workspace"
    repo.mkdir()
    workspace.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("VLMPIPE_TRACKING", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.chdir(workspace)
    dirs = []
    for i in range(3):  # the same model, trained three times: different bytes
        d = tmp_path / f"siglip{i}"
        shutil.copytree(root / "models/siglip", d)
        (d / "trained.txt").write_text(f"run {i}\n")
        dirs.append(d)
        with stage_run("train_siglip", model="siglip") as run:
            assert registry.log_model(run, "siglip", d) is not None

    def score(d, r1):
        with stage_run("evaluate_siglip", model="siglip") as run:
            return registry.score_version(run, "siglip", d, {"i2t_r1": r1, "t2i_r1": 0.5, "by_type": {"x": 1.0}})

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = registry.registered_name("siglip")
    alias = lambda a: str(c.get_model_version_by_alias(name, a).version)  # noqa: E731

    assert score(dirs[0], 0.60) == "champion" and alias("champion") == "1"
    assert score(dirs[1], 0.55) == "candidate" and (alias("champion"), alias("candidate")) == ("1", "2")
    assert score(dirs[2], 0.70) == "champion" and (alias("champion"), alias("candidate")) == ("3", "2")
    v2 = c.get_model_version(name, "2")
    assert float(v2.tags["eval.i2t_r1"]) == 0.55 and float(v2.tags["eval.t2i_r1"]) == 0.5
    assert v2.tags["weights_sha256"] == registry.weights_digest(dirs[1])
    assert score(tmp_path / "exp-workspace", 0.99) is None  # no version holds these weights
    assert alias("champion") == "3"
    assert not (workspace / "mlflow.db").exists() and not (workspace / "mlartifacts").exists()


# ------------------------------------------------------------------ the tiny DAG, a real server


def test_tiny_dag_registers_its_models_and_one_serves(tiny_repo, tmp_path, load):
    """Each training stage of `dvc repro` registered its model on the session's MLflow server, tagged
    with the commit it ran on; `mlflow models serve` answers a base64 image as `python -m vlmpipe
    caption` does, and the QA model loaded through the registry answers as `python -m vlmpipe ask`."""
    from mlflow.tracking import MlflowClient

    from vlmpipe.data import coco

    uri = tiny_repo.mlflow.uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    first = {}
    for kind, stage in STAGES.items():
        name = registry.registered_name(kind)
        mine = [v for v in client.search_model_versions(f"name = '{name}'")
                if v.tags.get("git_commit") == tiny_repo.commit and "dvc_experiment" not in v.tags]
        assert mine, f"{name}: no version from the tiny DAG's commit"
        v = min(mine, key=lambda v: int(v.version))
        assert v.tags["stage"] == stage and v.status == "READY"
        assert client.get_run(v.run_id).data.tags["stage"] == stage  # the version links to its run
        # Its evaluation stage found it by its weights and recorded the scores and an alias.
        assert v.tags["weights_sha256"] == registry.weights_digest(tiny_repo.path / "models" / DIRS[kind])
        headline = f"eval.{registry.HEADLINE[kind]}"
        assert headline in v.tags, (kind, v.tags)
        # champion: the best scored version so far (the earliest of equals); an experiment may add one
        scored = [x for x in client.search_model_versions(f"name = '{name}'") if headline in x.tags]
        best = max(scored, key=lambda x: (float(x.tags[headline]), -int(x.version)))
        # (a searched version carries no aliases: they are read from the version itself)
        assert str(client.get_model_version_by_alias(name, "champion").version) == str(best.version), \
            (kind, [(x.version, x.tags[headline]) for x in scored])
        first[kind] = v.version

    val = coco.CocoCaptions(tiny_repo.path / "data/coco", "val")
    image = tmp_path / "scene.png"
    val.image(val.ids[0]).save(image)
    # What the project's own back end says (the CLI's API, in-process: the CLI is held to it in its own tests).
    want = cli.caption_files(tiny_repo.path / "models/captioner", [image], device="cpu")[0]

    port = servers.free_port()
    url = f"http://127.0.0.1:{port}"
    # No PYTHONPATH and another folder: the served model brings its own vlmpipe.
    env = servers.clean_env(MLFLOW_TRACKING_URI=uri)
    cmd = [servers.venv_binary("mlflow"), "models", "serve", "-m", f"models:/vlmpipe-captioner/{first['captioner']}",
           "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)]
    with servers.background(cmd, log_path=tmp_path / "serve.log", ready=lambda: servers.http_ok(url + "/ping"),
                            timeout=300, env=env, cwd=tmp_path, name="mlflow models serve"):
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64(image)]]}}).encode()
        req = urllib.request.Request(url + "/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert json.load(r) == {"predictions": [want]}

    question = "What colour is it?"
    want = cli.ask_file(tiny_repo.path / "models/phi2_vlm", image, question, device="cpu")
    qa, _ = load(uri, "vlmpipe-qa", first["qa"])
    import pandas as pd

    assert list(qa.predict(pd.DataFrame({"image": [b64(image)], "question": [question]}))) == [want]
