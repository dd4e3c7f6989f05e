"""Analysis and artifacts of the forgetting experiment (see run.py): paired comparisons vs SFT,
matched domain gain, the markdown/CSV tables and the trade-off plot.

``rows`` are the dicts ``run.py`` records, one per evaluated checkpoint: seed, method ("base" for
the pretrained model at step 0), lr, step, per-task accuracies in %, "general" (their mean) and
the mean loss weight the method gave to clean / noisy labels so far. ``cfg`` is run.py's Config.
"""

import csv
import math
from pathlib import Path

METHODS = ("sft", "dft", "eaft")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def matched_points(rows: list[dict], cfg) -> tuple[dict, list[float]]:
    """Matched domain gain: ({method: {seed: row or None}}, per-seed levels).

    Per seed, the level D* = match_frac x SFT's best domain accuracy over all its learning rates
    and checkpoints; each method's point is its checkpoint (any lr; every method has the same
    number) with the best general accuracy among those reaching D*, None if none does.
    """
    matched, levels = {m: {} for m in METHODS}, []
    for s in cfg.seeds:
        sft = [r["domain"] for r in rows if r["seed"] == s and r["method"] == "sft"]
        level = cfg.match_frac * max(sft)
        levels.append(level)
        for m in METHODS:
            ok = [r for r in rows if r["seed"] == s and r["method"] == m and r["domain"] >= level]
            matched[m][s] = max(ok, key=lambda r: r["general"]) if ok else None
    return matched, levels


def analyse(rows: list[dict], cfg) -> tuple[list[dict], list[dict], dict]:
    """Returns (summary rows, one per method; by-lr rows; base averages)."""
    seeds, final = cfg.seeds, cfg.finetune_steps
    pick = {(r["seed"], r["method"], r["lr"], r["step"]): r for r in rows}
    base = {k: _mean_std([pick[(s, "base", 0.0, 0)][k] for s in seeds])[0]
            for k in ("domain", "general")}

    by_lr = []
    for lr in cfg.lrs:
        for m in METHODS:
            pts = [pick[(s, m, lr, final)] for s in seeds]
            ref = [pick[(s, "sft", lr, final)] for s in seeds]
            d_gen = [p["general"] - q["general"] for p, q in zip(pts, ref)]
            d_dom = [p["domain"] - q["domain"] for p, q in zip(pts, ref)]
            row = dict(method=m, lr=lr, step=final)
            row["target_avg"], row["target_std"] = _mean_std([p["domain"] for p in pts])
            row["general_avg"], row["general_std"] = _mean_std([p["general"] for p in pts])
            row["d_target_vs_sft"], row["d_target_vs_sft_std"] = _mean_std(d_dom)
            row["d_general_vs_sft"], row["d_general_vs_sft_std"] = _mean_std(d_gen)
            row["wins_vs_sft"] = f"{sum(d > 0 for d in d_gen)}/{len(seeds)}"
            row["w_clean"] = _mean_std([p["w_clean"] for p in pts])[0]
            row["w_noisy"] = _mean_std([p["w_noisy"] for p in pts])[0]
            by_lr.append(row)

    matched, levels = matched_points(rows, cfg)
    headline = max(cfg.lrs)
    summary = []
    for m in METHODS:
        row = next(r for r in by_lr if r["method"] == m and r["lr"] == headline).copy()
        del row["step"]
        row["matched_level"] = _mean_std(levels)[0]
        reached = [s for s in seeds if matched[m][s] is not None]
        row["matched_reached"] = f"{len(reached)}/{len(seeds)}"
        row["matched_target"] = _mean_std([matched[m][s]["domain"] for s in reached])[0]
        row["matched_general"], row["matched_general_std"] = _mean_std(
            [matched[m][s]["general"] for s in reached])
        d = [matched[m][s]["general"] - matched["sft"][s]["general"] for s in reached]
        row["matched_d_general_vs_sft"], row["matched_d_general_vs_sft_std"] = _mean_std(d)
        row["matched_wins_vs_sft"] = f"{sum(x > 0 for x in d)}/{len(reached)}"
        summary.append(row)
    return summary, by_lr, base


def _fmt(x, nd=1, sign=False) -> str:
    if isinstance(x, str):
        return x
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _pm(r: dict, key: str, sign=False) -> str:
    """'mean ± std' from r[key] and its std column (target_avg -> target_std, x -> x_std)."""
    return f"{_fmt(r[key], sign=sign)} ± {_fmt(r[key.removesuffix('_avg') + '_std'])}"


def write_outputs(rows, summary, by_lr, base, cfg, out: Path, elapsed: float) -> str:
    out.mkdir(parents=True, exist_ok=True)
    for name, table in (("summary.csv", summary), ("by_lr.csv", by_lr), ("runs.csv", rows)):
        keys = list(dict.fromkeys(k for r in table for k in r))
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, restval="")
            w.writeheader()
            for r in table:
                w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})

    lrs = ", ".join(f"{x:g}" for x in cfg.lrs)
    lines = [
        f"Forgetting experiment: {len(cfg.seeds)} seeds, label noise {cfg.label_noise:.0%} in the "
        f"domain training set (test clean), {cfg.finetune_steps} fine-tuning steps, lrs {lrs}; "
        f"accuracies in % (teacher-forced answer tokens), mean ± std over seeds; Δ = paired per-seed "
        f"difference vs SFT (mean ± std), wins = seeds where the method retains more than SFT. "
        f"Run time {elapsed / 60:.1f} min.",
        "",
        f"**At lr {max(cfg.lrs):g}, final checkpoint** and **at matched domain gain** (best general "
        f"retention among each method's checkpoints, all lrs, with domain accuracy >= "
        f"{cfg.match_frac:g} x SFT's best on that seed; level {_fmt(summary[0]['matched_level'])}% "
        f"on average):",
        "",
        "| method | target avg | general avg | Δtarget vs SFT | Δgeneral vs SFT | wins | "
        "matched: target | matched: general | matched: Δgeneral vs SFT | matched: wins (reached) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| base | {_fmt(base['domain'])} | {_fmt(base['general'])} | | | | | | | |",
    ]
    for r in summary:
        lines.append(
            f"| {r['method'].upper()} | {_pm(r, 'target_avg')} | {_pm(r, 'general_avg')} | "
            f"{_pm(r, 'd_target_vs_sft', True)} | {_pm(r, 'd_general_vs_sft', True)} | "
            f"{r['wins_vs_sft']} | {_fmt(r['matched_target'])} | {_pm(r, 'matched_general')} | "
            f"{_pm(r, 'matched_d_general_vs_sft', True)} | "
            f"{r['matched_wins_vs_sft']} ({r['matched_reached']}) |")
    lines += ["", "Every learning rate, final checkpoint (w = mean loss weight on clean / noisy labels "
              "during fine-tuning):", "",
              "| method | lr | target avg | general avg | Δtarget vs SFT | Δgeneral vs SFT | wins "
              "| w clean / noisy |",
              "|---|---|---|---|---|---|---|---|"]
    for r in by_lr:
        lines.append(
            f"| {r['method'].upper()} | {r['lr']:g} | {_pm(r, 'target_avg')} | "
            f"{_pm(r, 'general_avg')} | "
            f"{_pm(r, 'd_target_vs_sft', True)} | {_pm(r, 'd_general_vs_sft', True)} | "
            f"{r['wins_vs_sft']} | {_fmt(r['w_clean'], 2)} / {_fmt(r['w_noisy'], 2)} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(rows, cfg, out / "tradeoff.png")
    return "\n".join(lines)


def plot(rows, cfg, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sft": "tab:red", "dft": "tab:gray", "eaft": "tab:blue"}
    markers = ["o", "s", "^", "D", "v"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    base = [r for r in rows if r["method"] == "base"]
    bd, bg = _mean_std([r["domain"] for r in base])[0], _mean_std([r["general"] for r in base])[0]
    ax.plot([bd], [bg], "k*", ms=14, label="base")
    steps = sorted({r["step"] for r in rows if r["method"] != "base"})
    for m in METHODS:
        for i, lr in enumerate(cfg.lrs):
            xs, ys = [bd], [bg]
            for st in steps:
                pts = [r for r in rows if r["method"] == m and r["lr"] == lr and r["step"] == st]
                xs.append(_mean_std([p["domain"] for p in pts])[0])
                ys.append(_mean_std([p["general"] for p in pts])[0])
            ax.plot(xs, ys, "-", color=colors[m], alpha=0.35 + 0.65 * (i + 1) / len(cfg.lrs), lw=1)
            ax.plot(xs[-1], ys[-1], markers[i % len(markers)], color=colors[m], ms=8,
                    label=f"{m.upper()} lr {lr:g}")
    ax.set_xlabel("domain (target) accuracy, clean test, %")
    ax.set_ylabel("general accuracy (retention), %")
    ax.set_title(f"Trade-off: mean over {len(cfg.seeds)} seeds, "
                 f"checkpoints every {cfg.eval_every} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)

    # Paired per-seed differences in general retention vs SFT: headline lr, and matched gain.
    hl, final = max(cfg.lrs), cfg.finetune_steps
    general = {(r["seed"], r["method"]): r["general"]
               for r in rows if r["lr"] == hl and r["step"] == final}
    matched, _ = matched_points(rows, cfg)
    for j, m in enumerate(("dft", "eaft")):
        at_lr = [general[(s, m)] - general[(s, "sft")] for s in cfg.seeds]
        at_match = [matched[m][s]["general"] - matched["sft"][s]["general"]
                    for s in cfg.seeds if matched[m][s] is not None]
        for k, d in enumerate((at_lr, at_match)):
            mean = _mean_std(d)[0]
            bx.bar(2 * j + k, 0 if math.isnan(mean) else mean, color=colors[m],
                   alpha=0.5 if k == 0 else 0.9)
            bx.plot([2 * j + k] * len(d), d, "k.", ms=6)
    bx.axhline(0, color="k", lw=0.8)
    bx.set_xticks(range(4), [f"DFT\nlr {hl:g}", "DFT\nmatched", f"EAFT\nlr {hl:g}", "EAFT\nmatched"])
    bx.set_ylabel("Δ general accuracy vs SFT, paired per seed (points)")
    bx.set_title("Retention gain over SFT (bar: mean, dots: seeds)")
    bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
