"""README.md and docs/*.md say what the project does: links resolve, names match dvc.yaml and
params.yaml, figures match reports/metrics.json, and the commands they mark runnable run.

Every ```bash / ```sh / ```shell / ```console block is preceded by ``<!-- runnable -->`` (this test
runs each command in it, from the repository root, and wants exit status 0) or by
``<!-- not run: why -->``. Runnable commands must be cheap and offline-safe (``CHEAP``): a
``--help``, a ``make -n`` dry run, or a read-only DVC command. ``make preset`` is tried in a scratch
git repository holding a copy of the Makefile, presets/ and params.yaml.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250

SHELL_LANGS = {"bash", "sh", "shell", "console"}
RUNNABLE = re.compile(r"<!--\s*runnable\s*-->")
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<why>.*?)\s*-->")
# Commands a page may mark runnable: quick, offline, and they change nothing.
CHEAP = [
    re.compile(r".*\s(--help|-h)$"),
    re.compile(r"make -n( [\w=.-]+)+$"),
    re.compile(r"dvc (dag|stage list|remote list|metrics show|params diff|--version)$"),
]
COMMAND_TIMEOUT_S = 60


# ---------------------------------------------------------------------------------------------
# Reading the pages

def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name


def _blocks(text: str) -> list[dict]:
    """Fenced code blocks: language, body lines, the marker comment before it, first line number."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(2), m.group(3).lower(), i
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        out.append({"lang": lang, "body": lines[start + 1:j], "line": start + 1,
                    "before": lines[k].strip() if k >= 0 else "", "span": (start, j)})
        i = j + 1
    return out


def _prose(text: str) -> str:
    """The page without its fenced code blocks (their lines blanked, so line numbers stay)."""
    lines = text.splitlines()
    for b in _blocks(text):
        s, e = b["span"]
        for n in range(s, min(e + 1, len(lines))):
            lines[n] = ""
    return "\n".join(lines)


def _indented(text: str) -> list[str]:
    """Indented code blocks in the prose (blank lines inside one included)."""
    out, cur, gap = [], [], []
    for line in _prose(text).splitlines() + ["end"]:
        if line.startswith(("    ", "\t")) and line.strip():
            cur += gap + [line]
            gap = []
        elif not line.strip() and cur:
            gap.append(line)
        else:
            if cur:
                out.append("\n".join(cur))
            cur, gap = [], []
    return out


def _without_inline_code(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", text)


def _inline_code(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def _headings(text: str) -> list[str]:
    return [m.group(2).strip() for m in re.finditer(r"^(#{1,6})\s+(.+?)\s*#*\s*$", _prose(text), re.M)]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    h = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    h = re.sub(r"[^\w\- ]", "", h.lower())
    return h.replace(" ", "-")


def _anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in _headings(text):
        s = _slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def _links(text: str) -> list[str]:
    """Link targets in the prose: [text](target), ![alt](target), <img src>, <a href>."""
    body = _without_inline_code(_prose(text))
    found = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", body)
    found += re.findall(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", body)
    return found


def _broken_links(page: Path) -> list[str]:
    bad = []
    for target in _links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{_rel(page)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
            bad.append(f"{_rel(page)}: {target} (no heading #{anchor} in {dest.name})")
    return bad


def _tables(text: str) -> list[list[list[str]]]:
    """Markdown tables in the prose, as rows of cells (the header first, the rule dropped)."""
    tables, cur = [], []
    for line in _prose(text).splitlines() + [""]:
        if line.strip().startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    return tables


# ---------------------------------------------------------------------------------------------
# What dvc.yaml, params.yaml and reports/metrics.json declare

@functools.lru_cache(maxsize=None)
def _dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _stages() -> list[str]:
    return list(_dvc()["stages"])


def _paths(entries) -> list[str]:
    return [(next(iter(e)) if isinstance(e, dict) else e).rstrip("/") for e in entries or []]


def _outs(stage: str) -> list[str]:
    s = _dvc()["stages"][stage]
    return _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots"))


def _declared() -> list[str]:
    d = _dvc()
    out = _paths(d.get("metrics")) + _paths(d.get("plots"))
    for name in d["stages"]:
        out += _outs(name)
    return out


def _launched() -> list[str]:
    """The stages that run through the launcher: the GPU stages."""
    return [n for n, s in _dvc()["stages"].items() if "vlmpipe.loop.launch" in s["cmd"]]


def _expand(path: str) -> list[str]:
    """`a/{x,y}.json` -> [`a/x.json`, `a/y.json`]."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(",") for q in _expand(path[:m.start()] + alt + path[m.end():])]


def _matches(path: str, declared: str) -> bool:
    """``path`` names ``declared`` or something inside it; ``<name>`` stands for one path part."""
    p = path.rstrip("/")
    pattern = "[^/]+".join(re.escape(part) for part in re.split(r"<[^<>/]+>", p))
    return bool(re.fullmatch(pattern, declared) or re.fullmatch(pattern + "/.*", declared)
                or (declared and re.fullmatch(re.escape(declared) + "/.*", p)))


def _lookup(tree, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _stage_word() -> re.Pattern:
    """Words shaped like a stage name: a stage's first word, an underscore, more (not a path)."""
    heads = sorted({s.split("_")[0] for s in _stages() if "_" in s})
    return re.compile(r"(?<![\w./<-])(?:%s)_[a-z0-9_]+(?![\w./>-])" % "|".join(heads))


# ---------------------------------------------------------------------------------------------
# The README as an onboarding page

def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; at most {MAX_README_LINES} (move reference to docs/)"


def test_readme_contents_list_reaches_every_section_and_page():
    text = README.read_text()
    m = re.search(r"^## Contents\s*$(.*?)^## ", text, re.M | re.S)
    assert m, "README.md has no '## Contents' section before its other sections"
    targets = re.findall(r"\]\(([^)\s]+)\)", m.group(1))
    anchors = {t[1:] for t in targets if t.startswith("#")}
    sections = [h for h in re.findall(r"^## (.+?)\s*$", _prose(text), re.M) if h != "Contents"]
    missing = [h for h in sections if _slug(h) not in anchors]
    assert not missing, f"sections missing from the contents list: {missing}"
    assert not anchors - _anchors(text), f"contents links to no heading: {anchors - _anchors(text)}"
    pages = {t for t in targets if not t.startswith("#")}
    unlisted = [f"docs/{p.name}" for p in PAGES[1:] if f"docs/{p.name}" not in pages]
    assert not unlisted, f"docs pages missing from the contents list: {unlisted}"
    assert all((ROOT / p).is_file() for p in pages), [p for p in pages if not (ROOT / p).is_file()]


def test_readme_shows_the_first_experiment_early():
    text = README.read_text().splitlines()
    first = next(i for i, line in enumerate(text) if line.startswith("make repro"))
    exp = next(i for i, line in enumerate(text) if line.startswith("dvc exp run -S lr="))
    assert exp - first <= 60, f"the first experiment is {exp - first} lines below the commands"
    for cmd in ("make exp", "dvc metrics diff", "dvc plots diff"):
        assert any(line.startswith(cmd) for line in text), cmd


# ---------------------------------------------------------------------------------------------
# Links

@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    assert not _broken_links(page)


def test_a_broken_link_is_caught(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# There\n\n## A section\n")
    page.write_text("# Page\n\n[ok](there.md#a-section) [gone](nowhere.md) [bad](there.md#no-such)\n"
                    "`[code](is-not-a-link.md)` <img src=\"missing.png\">\n")
    assert [b.split(": ", 1)[1] for b in _broken_links(page)] == [
        "nowhere.md (no such file)", "there.md#no-such (no heading #no-such in there.md)",
        "missing.png (no such file)"]


# ---------------------------------------------------------------------------------------------
# Stages, report files and params keys against dvc.yaml, params.yaml, reports/metrics.json

@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_stage_named_exists(page):
    stages, word = set(_stages()), _stage_word()
    text = page.read_text()
    named = set(word.findall(text))
    for code in _inline_code(text):
        if code in stages:
            named.add(code)
    assert not named - stages, f"{_rel(page)} names stages dvc.yaml lacks: {sorted(named - stages)}"


def _stage_lists(page: Path):
    """(where, names, ordered) for each list of the DAG's stages on a page: a table whose first
    column is `stage`, and a drawing of the DAG (a code block with arrows)."""
    stages, word = _stages(), _stage_word()
    text = page.read_text()
    for t in _tables(text):
        if t[0][0].lower() in ("stage", "stages"):
            names = [n for row in t[1:] for n in _inline_code(row[0])]
            yield f"{_rel(page)}: table '{' | '.join(t[0])}'", names, True
    drawings = [b for b in _blocks(text) if any("►" in line for line in b["body"])]
    for b in [*("\n".join(b["body"]) for b in drawings), *(i for i in _indented(text) if "►" in i)]:
        names = [w for w in re.findall(r"[a-z][a-z0-9_]*", b) if w in stages or word.fullmatch(w)]
        yield f"{_rel(page)}: the DAG drawing", names, False


def test_the_stage_lists_are_dvc_yaml_s():
    stages = _stages()
    found, bad = 0, []
    for page in PAGES:
        for where, names, ordered in _stage_lists(page):
            found += 1
            if ordered and names != stages:
                bad.append(f"{where}: {names} != dvc.yaml's {stages}")
            if not ordered and set(names) != set(stages):
                bad.append(f"{where}: missing {sorted(set(stages) - set(names))}, "
                           f"unknown {sorted(set(names) - set(stages))}")
    assert found >= 3, "no stage table or DAG drawing found (README, docs/pipeline.md, docs/architecture.md)"
    assert not bad, bad


def test_the_stage_tables_say_what_each_stage_writes():
    """In a stage table, every output path named is an output of that row's stages, and every
    report output those stages declare is named."""
    bad = []
    for page in PAGES:
        for t in _tables(page.read_text()):
            if t[0][0].lower() not in ("stage", "stages") or "writes" not in [c.lower() for c in t[0]]:
                continue
            col = [c.lower() for c in t[0]].index("writes")
            for row in t[1:]:
                names = _inline_code(row[0])
                outs = [o for n in names if n in _stages() for o in _outs(n)]
                named = [p for c in _inline_code(row[col]) for p in _expand(c)
                         if re.match(r"(data|models|reports)/[^/]", c)]
                bad += [f"{_rel(page)}: {names} does not write {p}" for p in named
                        if not any(_matches(p, o) for o in outs)]
                bad += [f"{_rel(page)}: {names} writes {o}, not in the table" for o in outs
                        if o.startswith("reports/") and not any(_matches(p, o) for p in named)]
    assert not bad, bad


def _report_paths(text: str) -> list[str]:
    found = re.findall(r"(?<![\w/.-])(reports/[\w./{},<>*-]*)", text)
    return [p.rstrip(".,;:") for p in found]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_report_files_named_are_declared(page):
    """Every reports/ path a page names is an output, metric or plot of dvc.yaml, or a speed file;
    a list of the speed files names one per training stage that runs through the launcher."""
    declared = _declared()
    speed = sorted({o.split("/")[1] for s in _launched() for o in _outs(s)
                    if o.startswith("reports/") and o.count("/") == 1})
    bad = []
    for raw in _report_paths(page.read_text()):
        paths = _expand(raw)
        if raw.startswith("reports/speed/"):
            files = [p for p in paths if p.endswith(".json")]
            if "{" in raw and sorted(Path(p).stem for p in files) != speed:
                bad.append(f"{raw}: the speed files are {speed}")
            bad += [f"{p}: no training stage writes it" for p in files
                    if "<" not in p and Path(p).stem not in speed]
            continue
        bad += [p for p in paths if p.rstrip("/") not in ("reports", "reports/speed")
                and not any(_matches(p, d) for d in declared)]
    assert not bad, f"{_rel(page)}: {bad} (dvc.yaml declares {declared})"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_gpu_stage_lists_are_the_launched_stages(page):
    text = re.sub(r"\s+", " ", page.read_text())
    launched = _launched()
    words = {3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}
    for listed in re.findall(r"GPU stages \(([^)]*)\)", text):
        assert _inline_code(listed) == launched, f"{_rel(page)}: GPU stages {listed}; dvc.yaml: {launched}"
    for n in re.findall(r"\b(three|four|five|six|seven) GPU stages", text):
        assert n == words[len(launched)], f"{_rel(page)}: '{n} GPU stages'; dvc.yaml has {len(launched)}"


@functools.lru_cache(maxsize=None)
def _params_and_metrics():
    return (yaml.safe_load((ROOT / "params.yaml").read_text()),
            json.loads((ROOT / "reports/metrics.json").read_text()))


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_params_and_metric_keys_named_exist(page):
    """`section.key` (or `section.key: value`, `-S section.key=value`) names a key of params.yaml or
    of reports/metrics.json."""
    params, metrics = _params_and_metrics()
    text = page.read_text()
    keys = [m.group(1) for c in _inline_code(text)
            for m in [re.fullmatch(r"([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+)(?::\s.*|=.*)?", c)] if m]
    keys += re.findall(r"-S\s+([a-z][\w.]*)=", text)
    sections = set(params) | set(metrics)
    files = {"py", "json", "yaml", "yml", "csv", "md", "html", "png", "txt", "ipynb", "zip", "gz"}
    bad = [k for k in keys if k.split(".")[0] in sections and k.split(".")[-1] not in files
           and not (_lookup(params, k) or _lookup(metrics, k))]
    assert not bad, f"{_rel(page)} names keys neither params.yaml nor reports/metrics.json has: {bad}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_figures_beside_a_metric_key_are_the_committed_ones(page):
    """A table with `key` and `value` columns shows reports/metrics.json's values, rounded as
    printed."""
    _, metrics = _params_and_metrics()
    bad = []
    for t in _tables(page.read_text()):
        head = [c.lower() for c in t[0]]
        if "key" not in head or "value" not in head:
            continue
        for row in t[1:]:
            keys = _inline_code(row[head.index("key")])
            values = [v.strip() for v in row[head.index("value")].split("/")]
            assert len(keys) == len(values), row
            for k, v in zip(keys, values):
                tree = metrics
                for part in k.split("."):
                    tree = tree[part]
                decimals = len(v.split(".")[1]) if "." in v else 0
                if abs(float(v) - tree) > 0.5 * 10 ** -decimals + 1e-9:
                    bad.append(f"{k}: the page says {v}, reports/metrics.json {tree}")
    assert not bad, f"{_rel(page)}: {bad}"


# ---------------------------------------------------------------------------------------------
# Commands

def _shell_blocks():
    for page in PAGES:
        for b in _blocks(page.read_text()):
            if b["lang"] in SHELL_LANGS:
                yield page, b


def _commands(block: dict) -> list[str]:
    lines = block["body"]
    if block["lang"] == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    out, cur = [], ""
    for line in lines:
        cur += line
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip() and not cur.strip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    return out


def _bare(command: str) -> str:
    """The command without its trailing comment (bash would skip it too)."""
    return re.sub(r"\s+#.*$", "", command).strip()


def test_every_command_block_is_marked():
    bad = []
    for page, b in _shell_blocks():
        why = NOT_RUN.fullmatch(b["before"])
        if not (RUNNABLE.fullmatch(b["before"]) or (why and why.group("why"))):
            bad.append(f"{_rel(page)}:{b['line']}: mark it <!-- runnable --> or <!-- not run: why -->")
    assert not bad, bad


def test_no_command_hides_in_an_unmarked_block():
    """Commands go in shell blocks: an indented block or a ```text block holding one is unmarked."""
    starts = re.compile(r"^\s*(?:\$ )?(dvc|make|mlflow|curl|pip|git|source|python -m|python \S+\.py)\s")
    bad = []
    for page in PAGES:
        text = page.read_text()
        for b in _blocks(text):
            if b["lang"] not in SHELL_LANGS | {"python", "py"}:
                bad += [f"{_rel(page)}:{b['line']}: {line.strip()}" for line in b["body"] if starts.match(line)]
        for block in _indented(text):
            bad += [f"{_rel(page)}: {line.strip()}" for line in block.splitlines() if starts.match(line)]
    assert not bad, bad


def test_runnable_commands_are_cheap():
    bad = [f"{_rel(page)}:{b['line']}: {c}" for page, b in _shell_blocks()
           if RUNNABLE.fullmatch(b["before"]) for c in map(_bare, _commands(b))
           if not any(p.fullmatch(c) for p in CHEAP)]
    assert not bad, f"runnable but not known to be cheap (mark them <!-- not run: why -->): {bad}"


def test_runnable_commands_run():
    runnable = [(page, b["line"], c) for page, b in _shell_blocks()
                if RUNNABLE.fullmatch(b["before"]) for c in _commands(b)]
    assert len(runnable) >= 5, runnable
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), str(ROOT / ".venv/bin"), env.get("PATH", "")])
    failed, t0 = [], time.monotonic()
    for page, line, command in runnable:
        if not any(p.fullmatch(_bare(command)) for p in CHEAP):
            continue  # test_runnable_commands_are_cheap names it
        r = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=COMMAND_TIMEOUT_S)
        if r.returncode != 0:
            failed.append(f"{_rel(page)}:{line}: {command} -> exit {r.returncode}: {r.stderr.strip()[-300:]}")
    assert not failed, failed
    assert time.monotonic() - t0 < 120, "the runnable commands should take seconds"


# ---------------------------------------------------------------------------------------------
# make preset: a preset never overwrites changes of the user's

def _scratch_repo(tmp_path: Path) -> tuple[Path, dict]:
    if not shutil.which("make") or not shutil.which("git"):
        pytest.skip("make or git not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "Makefile", repo / "Makefile")
    shutil.copytree(ROOT / "presets", repo / "presets")
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "MAKE"))}
    env.update(GIT_CONFIG_NOSYSTEM="1", HOME=str(tmp_path), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q"], ["git", "add", "."], ["git", "commit", "-q", "-m", "start"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    return repo, env


def _make_preset(repo: Path, env: dict, name: str | None):
    args = ["make", "--no-print-directory", "preset"] + ([f"NAME={name}"] if name is not None else [])
    r = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    return r.returncode, [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]


def test_make_preset_refuses_to_overwrite_uncommitted_params(tmp_path):
    repo, env = _scratch_repo(tmp_path)
    params = repo / "params.yaml"
    edited = params.read_bytes() + b"# my own change\n"
    params.write_bytes(edited)
    rc, out = _make_preset(repo, env, "full")
    assert rc != 0 and params.read_bytes() == edited
    assert len(out) == 1, out
    assert "params.yaml" in out[0] and "git stash" in out[0] and "git checkout HEAD -- params.yaml" in out[0], out

    # Staged but not committed is a change of the user's too.
    subprocess.run(["git", "add", "params.yaml"], cwd=repo, env=env, check=True)
    rc, out = _make_preset(repo, env, "full")
    assert rc != 0 and params.read_bytes() == edited and len(out) == 1, out

    # Not tracked at all: nothing to get it back from.
    subprocess.run(["git", "rm", "-q", "--cached", "params.yaml"], cwd=repo, env=env, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "untrack"], cwd=repo, env=env, check=True)
    rc, out = _make_preset(repo, env, "full")
    assert rc != 0 and params.read_bytes() == edited, out


def test_make_preset_replaces_a_clean_params_file(tmp_path):
    repo, env = _scratch_repo(tmp_path)
    params = repo / "params.yaml"
    rc, out = _make_preset(repo, env, "full")
    assert rc == 0, out
    assert params.read_bytes() == (repo / "presets/full.yaml").read_bytes()
    # Now params.yaml is a preset, not an edit of the user's: switching presets is allowed.
    rc, out = _make_preset(repo, env, "tiny")
    assert rc == 0, out
    assert params.read_bytes() == (repo / "presets/tiny.yaml").read_bytes()
    # An edit on top of a preset is the user's again.
    params.write_bytes(params.read_bytes() + b"seed: 1\n")
    rc, out = _make_preset(repo, env, "full")
    assert rc != 0 and params.read_bytes().endswith(b"seed: 1\n"), out


@pytest.mark.parametrize("name", ["nope", "", "full tiny", "%", "../params"])
def test_make_preset_names_the_presets_when_it_knows_none(tmp_path, name):
    repo, env = _scratch_repo(tmp_path)
    before = (repo / "params.yaml").read_bytes()
    rc, out = _make_preset(repo, env, name or None)
    presets = " ".join(sorted(p.stem for p in (ROOT / "presets").glob("*.yaml")))
    assert rc != 0 and (repo / "params.yaml").read_bytes() == before
    assert len(out) == 1 and presets in out[0], out
    if name:
        assert f"'{name}'" in out[0], out
