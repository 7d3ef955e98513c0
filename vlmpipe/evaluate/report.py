"""Pictures for people: training curves, metrics beside baselines, and a gallery.

PNGs via matplotlib's Agg backend (no display needed) and a self-contained
HTML gallery with the images inlined, so the report opens anywhere.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from vlmpipe.scoring.metrics import normalize_answer  # noqa: E402
from vlmpipe.core.io import atomic_path, write_text  # noqa: E402


def _read_csv(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = []
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    continue
            rows.append(row)
        return rows


def plot_curves(report_dirs: Mapping[str, Path], out_dir: Path) -> list[Path]:
    """One PNG per training stage: training loss by step, held-out metrics by epoch."""
    written = []
    for name, d in report_dirs.items():
        train, val = _read_csv(Path(d) / "train_curve.csv"), _read_csv(Path(d) / "val_curve.csv")
        if not train:
            continue
        val_keys = [k for k in (val[0] if val else {}) if k not in ("epoch", "step")]
        fig, axes = plt.subplots(1, 1 + bool(val_keys), figsize=(5 + 5 * bool(val_keys), 3.6), squeeze=False)
        ax = axes[0][0]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
        ax.set(title=f"{name}: training loss", xlabel="optimizer step", ylabel="loss")
        ax.grid(alpha=0.3)
        if val_keys:
            ax2 = axes[0][1]
            for k in val_keys:
                ax2.plot([r["epoch"] for r in val], [r.get(k, float("nan")) for r in val], marker="o", label=k)
            ax2.set(title=f"{name}: held-out, per epoch", xlabel="epoch")
            ax2.grid(alpha=0.3)
            ax2.legend(fontsize=7)
        fig.tight_layout()
        out = Path(out_dir) / f"{name}_curves.png"
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        written.append(out)
    return written


def plot_baselines(pairs: Sequence[tuple[str, float, float]], out: Path) -> Path:
    """Bars of (metric, model value, baseline value): did every model beat its baseline?"""
    fig, ax = plt.subplots(figsize=(1.6 * len(pairs) + 2, 3.6))
    xs = range(len(pairs))
    ax.bar([x - 0.2 for x in xs], [p[2] for p in pairs], width=0.4, label="baseline", color="#bbbbbb")
    ax.bar([x + 0.2 for x in xs], [p[1] for p in pairs], width=0.4, label="model", color="#3b7dd8")
    for x, (_, v, b) in zip(xs, pairs):
        ax.text(x + 0.2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.text(x - 0.2, b, f"{b:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [p[0] for p in pairs], fontsize=8)
    ax.set_title("held-out metrics beside their baselines")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


@dataclass
class CaptionExample:
    image: Image.Image
    generated: str
    references: list[str]


@dataclass
class QAExample:
    image: Image.Image
    label: str
    turns: list[tuple[str, str, str]] = field(default_factory=list)  # (question, model answer, true answer)


def _png_b64(img: Image.Image, size: int = 128) -> str:
    buf = io.BytesIO()
    img.resize((size, size), Image.NEAREST).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def gallery_png(captions: Sequence[CaptionExample], qa: Sequence[QAExample], out: Path,
                chat: Sequence[QAExample] = ()) -> Path:
    """A grid: captioned scenes on top, Q/A images, then dialogues, text beside each image."""
    rows = len(captions) + len(qa) + len(chat)
    fig, axes = plt.subplots(max(rows, 1), 2, figsize=(10, 1.9 * max(rows, 1)),
                             gridspec_kw={"width_ratios": [1, 4]}, squeeze=False)
    items = [("cap", c) for c in captions] + [("qa", q) for q in qa] + [("chat", c) for c in chat]
    for (kind, ex), (ax_img, ax_txt) in zip(items, axes):
        ax_img.imshow(ex.image, interpolation="nearest")
        ax_img.axis("off")
        ax_txt.axis("off")
        if kind == "cap":
            lines = [f"model: {ex.generated}"] + [f"ref: {r}" for r in ex.references[:3]]
            colors = ["#1a4fa0"] + ["#444444"] * 3
        else:
            lines = [f"[{ex.label}]"]
            colors = ["#444444"]
            for q, a, t in ex.turns[:3]:
                ok = normalize_answer(a) == normalize_answer(t)  # the rule the accuracy is scored by
                who = ("Q", "model") if kind == "qa" else ("user", "assistant")
                lines.append(f"{who[0]}: {q}  {who[1]}: {a}  truth: {t}")
                colors.append("#1a7a2e" if ok else "#b0201a")
        # A line wider than the figure defeats tight_layout; the HTML gallery keeps the whole text.
        lines = [x if len(x) <= 125 else x[:124] + "…" for x in lines]
        for i, (line, c) in enumerate(zip(lines, colors)):
            # parse_math=False: a caption or answer with "$" is text, not matplotlib mathtext
            # (which raises on "$x" and would make a model's odd output crash the report).
            ax_txt.text(0, 1 - i * 0.24, line, va="top", fontsize=8.5, color=c, transform=ax_txt.transAxes,
                        parse_math=False)
    with warnings.catch_warnings():  # characters the font lacks are drawn as boxes; no need to warn per glyph
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return out


def _dialogue_rows(examples: Sequence[QAExample], turn: str) -> list[str]:
    """Table rows: the image, then each turn as ``turn`` (``{m}`` the message, ``{a}`` the reply, green
    when it matches the truth by the rule the scores use, red with the truth beside it otherwise)."""
    e = html.escape
    rows = []
    for ex in examples:
        lines = "".join(
            "<div>" + turn.format(m=e(m), a=f"<span class={'ok' if normalize_answer(a) == normalize_answer(t) else 'bad'}>"
                                            f"{e(a)}</span>") + f" <span class=ref>(truth: {e(t)})</span></div>"
            for m, a, t in ex.turns)
        rows.append(f"<tr><td><img src='data:image/png;base64,{_png_b64(ex.image)}'></td>"
                    f"<td><i>{e(ex.label)}</i>{lines}</td></tr>")
    return rows


def gallery_html(captions: Sequence[CaptionExample], qa: Sequence[QAExample], metrics: Mapping, out: Path,
                 chat: Sequence[QAExample] = ()) -> Path:
    e = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>vlmpipe gallery</title>",
             "<style>body{font-family:sans-serif;max-width:960px;margin:auto}"
             "td{vertical-align:top;padding:6px}img{image-rendering:pixelated}"
             ".ok{color:#1a7a2e}.bad{color:#b0201a}.ref{color:#555}</style>",
             "<h1>vlmpipe: held-out examples</h1>"]
    cap = metrics.get("captioner", {})
    scene = (f"; the caption entirely right in {cap['scene_right']:.3f} of the scenes (constant caption "
             f"{cap['baseline_scene_right']:.3f})" if "scene_right" in cap else "")
    parts.append(f"<h2>Captioner</h2><p>CIDEr {cap.get('cider', float('nan')):.3f} "
                 f"(constant-caption baseline {cap.get('baseline_cider', float('nan')):.3f}){scene}</p><table>")
    for c in captions:
        refs = "".join(f"<div class=ref>ref: {e(r)}</div>" for r in c.references)
        parts.append(f"<tr><td><img src='data:image/png;base64,{_png_b64(c.image)}'></td>"
                     f"<td><b>{e(c.generated)}</b>{refs}</td></tr>")
    vqa = metrics.get("vqa", {})
    parts.append(f"</table><h2>Visual QA</h2><p>accuracy {vqa.get('accuracy', float('nan')):.3f} "
                 f"(blind baseline {vqa.get('blind_baseline', float('nan')):.3f})</p><table>")
    parts += _dialogue_rows(qa, "Q: {m} — {a}")
    parts.append("</table>")
    if chat:
        ch = metrics.get("chat", {})
        parts.append(f"<h2>Chat</h2><p>exact match {ch.get('exact_match', float('nan')):.3f} (blind baseline "
                     f"{ch.get('blind_baseline', float('nan')):.3f}); follow-ups "
                     f"{ch.get('by_type', {}).get('followup', float('nan')):.3f}, without the history "
                     f"{ch.get('followup_no_history', float('nan')):.3f}</p><table>")
        parts += _dialogue_rows(chat, "user: {m}<br>assistant: {a}")
        parts.append("</table>")
    write_text(out, "\n".join(parts) + "\n")
    return out


def evaluation_reports(reports: Path, metrics: Mapping, qa_examples: Sequence, cap_examples: Sequence,
                       gallery_images: int, coco_root: Path, cifar_root: Path,
                       chat_examples: Sequence = ()) -> list[Path]:
    """The evaluate stage's pictures: training curves, metrics beside baselines, and the gallery
    (PNG and self-contained HTML) of ``gallery_images`` held-out examples per model."""
    from vlmpipe.data.cifar import load_split
    from vlmpipe.data.coco import CocoCaptions

    plots = reports / "plots"
    written = plot_curves({name: reports / name for name in ("siglip", "phi2_vlm", "captioner", "chat")}, plots)
    sig, vqa, cap = metrics["siglip"], metrics["vqa"], metrics["captioner"]
    written.append(plot_baselines([
        ("SigLIP zero-shot", sig["zero_shot_acc"], sig["zero_shot_chance"]),
        # (no retrieval over fewer than two held-out images: evaluate.max_images 1)
        *([("SigLIP i2t R@1", sig["i2t_r1"], sig["r1_chance"])] if "i2t_r1" in sig else []),
        ("VQA accuracy", vqa["accuracy"], vqa["blind_baseline"]),
        *([("VQA token F1, free-form", vqa["free_form"]["token_f1"], vqa["free_form"]["blind_token_f1"])]
          if "free_form" in vqa else []),
        ("CIDEr", cap["cider"], cap["baseline_cider"]),
        ("BLEU-4", cap["bleu4"], cap["baseline_bleu4"]),
        # (the shapes world only: real COCO has no scene facts to check a caption against)
        *([("caption entirely right", cap["scene_right"], cap["baseline_scene_right"])] if "scene_right" in cap else []),
        *([("chat exact match", metrics["chat"]["exact_match"], metrics["chat"]["blind_baseline"])]
          if "chat" in metrics else []),
    ], plots / "baselines.png"))
    n = gallery_images
    coco_val = CocoCaptions(coco_root, "val")
    caps = [CaptionExample(coco_val.image(i), g, refs) for i, g, refs in cap_examples[:n]]
    # A Q/A example names its CIFAR split after its turns where that is not the test split.
    cifar = {s: load_split(cifar_root, s) for s in {"test", *(ex[3] for ex in qa_examples[:n] if len(ex) > 3)}}
    qa = [QAExample(Image.fromarray(cifar[split[0] if split else "test"].images[idx]), label,
                    [(q, a, t) for q, a, t, _ in turns]) for idx, label, turns, *split in qa_examples[:n]]
    # Dialogues about the held-out COCO images (their own train2017 images where the source has no val ones).
    coco_train = CocoCaptions(coco_root, "train")
    val_ids = set(coco_val.ids)
    chat = [QAExample((coco_val if iid in val_ids else coco_train).image(iid), f"image {iid}",
                      [(q, a, t) for q, a, t, _ in turns]) for iid, turns in chat_examples[:n]]
    return written + [gallery_png(caps, qa, reports / "gallery.png", chat),
                      gallery_html(caps, qa, metrics, reports / "gallery.html", chat)]
