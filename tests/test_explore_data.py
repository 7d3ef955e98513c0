"""The explore_data stage: the exploration notebook executed on generated data and rendered to HTML.

Each stage run starts a Jupyter kernel (a few seconds); the module starts one three times.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import string
import sys
from pathlib import Path

import pytest

import servers
from vlmpipe.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
OUT = Path("reports/data_exploration.html")
FIGURES = 9  # the notebook's plots: 3 COCO, 4 Q/A, 2 conversations


def _make_repo(dest: Path, coco: Path, cifar: Path, qa_csv: Path, conversations: Path) -> Path:
    """What the stage needs from a repository: its script, the notebook, vlmpipe, params.yaml and data/."""
    shutil.copytree(REPO / "vlmpipe", dest / "vlmpipe", ignore=shutil.ignore_patterns("__pycache__"))
    for rel in ("stages/explore_data.py", "notebooks/01_data_exploration.ipynb", "params.yaml"):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    shutil.copytree(coco, dest / "data/coco")
    shutil.copytree(cifar, dest / "data/cifar")
    shutil.copy2(qa_csv, dest / "data/cifar_qa.csv")
    shutil.copytree(conversations, dest / "data/conversations")
    return dest


def _stage(repo: Path, check: bool = True):
    env = servers.clean_env(PYTHONPATH=str(repo), VLMPIPE_TRACKING="off")
    return servers.run([sys.executable, "stages/explore_data.py"], cwd=repo, env=env, timeout=300, check=check)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_coco, tiny_cifar, qa_csv) -> dict:
    """The session's tiny COCO / CIFAR / Q/A CSV, and conversations built from that COCO."""
    from vlmpipe.sources import llava
    from vlmpipe.sources.params import ConversationsParams

    conversations = tmp_path_factory.mktemp("conversations") / "conversations"
    llava.build(ConversationsParams(), 0, tiny_coco, conversations)
    return {"coco": tiny_coco, "cifar": tiny_cifar, "qa_csv": qa_csv, "conversations": conversations}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, data) -> tuple[Path, str]:
    repo = _make_repo(tmp_path_factory.mktemp("explore") / "repo", **data)
    _stage(repo)
    return repo, (repo / OUT).read_text(encoding="utf-8")


def _expected(data: dict) -> dict:
    """The numbers the page must show, computed here from the files with json/csv, not the notebook's code."""
    out = {}
    for split in ("train", "val"):
        anns = json.loads((data["coco"] / f"annotations/captions_{split}2017.json").read_text())["annotations"]
        out[f"coco_{split}"] = (len({a["image_id"] for a in anns}), len(anns))
        if split == "train":
            punct = re.compile(f"[{re.escape(string.punctuation)}]")
            out["vocab"] = len({w for a in anns for w in punct.sub(" ", a["caption"].lower()).split()})
    with open(data["qa_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    for split in ("train", "test"):
        mine = [r for r in rows if r["Split"] == split]
        out[f"qa_{split}"] = (len(mine), sum(bool(r[f"Q{k}"]) for r in mine for k in range(1, 6)))
    for split in ("train", "val"):
        recs = json.loads((data["conversations"] / f"{split}.json").read_text())
        out[f"conv_{split}"] = (len(recs), sum(len(r["conversations"]) // 2 for r in recs))
    return out


@pytest.mark.slow  # executes the notebook in a kernel
def test_the_page_shows_every_section_and_the_numbers_of_the_data(rendered, data):
    repo, html = rendered
    for heading in ("1. COCO captions", "2. CIFAR questions and answers", "3. Conversations (LLaVA-Instruct format)"):
        assert heading in html, heading
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) == FIGURES
    assert "Traceback" not in html and "jp-OutputArea-error" not in html  # no cell failed quietly

    want = _expected(data)
    for split in ("train", "val"):
        assert f"COCO {split}: {want[f'coco_{split}'][0]} images, {want[f'coco_{split}'][1]} captions" in html
        n, turns = want[f"conv_{split}"]
        assert re.search(rf"conversations {split}: {n} conversations about \d+ images, {turns} turns", html), split
    for split in ("train", "test"):
        assert f"Q/A {split}: {want[f'qa_{split}'][0]} images, {want[f'qa_{split}'][1]} questions" in html
    assert f"vocabulary of the train captions: {want['vocab']} words" in html
    assert "counts agree with the files" in html


@pytest.mark.slow  # executes the notebook in a kernel
def test_the_blind_baseline_is_the_qa_evaluations(rendered, data):
    """The page's blind baseline equals what evaluate_qa computes (vlmpipe.qa.heldout.blind_baseline)."""
    from vlmpipe.data.conversations import frame_conversations
    from vlmpipe.data.qa import read_qa_csv
    from vlmpipe.scoring.metrics import vqa_accuracy
    from vlmpipe.qa.heldout import blind_baseline

    df = read_qa_csv(data["qa_csv"], data["cifar"])
    _, convs, types = frame_conversations(df, "test")
    truth = [(q, a, t) for c, ts in zip(convs, types) for (q, a), t in zip(c, ts)]
    blind = blind_baseline(df)
    acc = vqa_accuracy([(blind(q, t), a, t) for q, a, t in truth])
    _, html = rendered
    assert f"blind baseline on the test split: {acc['accuracy']:.3f} exact match over {len(truth)} questions" in html
    line = re.search(r"by type: (\w+ \d\.\d{3}(, \w+ \d\.\d{3})*)", html).group(1)
    shown = dict(re.findall(r"(\w+) (\d\.\d{3})", line))
    assert shown == {t: f"{v:.3f}" for t, v in acc["by_type"].items()}


@pytest.mark.slow  # executes the notebook in a kernel
def test_the_page_is_self_contained_and_the_same_bytes_every_run(rendered):
    repo, html = rendered
    assert not re.search(r'<script[^>]*\bsrc=|<link[^>]*\bhref="http', html)  # nothing fetched to show it
    assert str(repo) not in html and str(REPO) not in html  # no absolute paths
    first = hashlib.sha256(html.encode("utf-8")).hexdigest()
    _stage(repo)
    assert hashlib.sha256((repo / OUT).read_bytes()).hexdigest() == first
    assert sorted(p.name for p in (repo / "reports").iterdir()) == ["data_exploration.html"]  # no temp files left


@pytest.mark.slow  # executes the notebook in a kernel
def test_a_failing_cell_is_one_line_naming_it_and_writes_no_page(tmp_path, data):
    repo = _make_repo(tmp_path / "repo", **data)
    (repo / "data/conversations/val.json").write_text("[{not json")
    p = _stage(repo, check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(errors) == 1, p.stderr
    assert re.fullmatch(r"error: notebooks/01_data_exploration\.ipynb: cell \d+ of \d+ \('conversations = \{\}'\) "
                        r"failed: UserError: data/conversations/val\.json: not JSON .*", errors[0]), errors[0]
    assert not (repo / OUT).exists()
    assert not (repo / "reports").exists() or not list((repo / "reports").iterdir())


def test_missing_data_is_one_line_before_any_kernel_and_keeps_an_earlier_page(tmp_path, data):
    repo = _make_repo(tmp_path / "repo", **data)
    shutil.rmtree(repo / "data/conversations")
    (repo / "reports").mkdir()
    (repo / OUT).write_text("the earlier page")
    p = _stage(repo, check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: data/conversations: missing upstream output (run `dvc repro` to build it)"], p.stderr
    assert (repo / OUT).read_text() == "the earlier page"


def test_a_file_that_is_not_a_notebook_is_one_line(tmp_path):
    from vlmpipe.explore.notebook import execute

    bad = tmp_path / "nb.ipynb"
    bad.write_text("{not a notebook")
    with pytest.raises(UserError, match=r"nb\.ipynb: not a Jupyter notebook") as e:
        execute(bad, tmp_path)
    assert "\n" not in str(e.value)


def test_prints_split_into_several_messages_render_as_one_output():
    """The kernel may send a cell's prints as one stream message or several (timing): the page must not
    show the difference. stderr goes to the log; a figure between prints keeps them apart."""
    import nbformat

    from vlmpipe.explore import notebook

    out = nbformat.v4.new_output
    cell = nbformat.v4.new_code_cell("print('a'); print('b')")
    cell.outputs = [out("stream", name="stdout", text="a\n"), out("stream", name="stderr", text="warn\n"),
                    out("stream", name="stdout", text="b\n"), out("display_data", data={"text/plain": "fig"}),
                    out("stream", name="stdout", text="c\n")]
    nb = notebook.scrub(nbformat.v4.new_notebook(cells=[cell]))
    kinds = [(o.output_type, o.get("text")) for o in nb.cells[0].outputs]
    assert kinds == [("stream", "a\nb\n"), ("display_data", None), ("stream", "c\n")]
