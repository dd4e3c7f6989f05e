"""Forgetting experiment: SFT vs DFT vs EAFT on a small transformer, on CPU.

    python examples/forgetting/run.py --results examples/forgetting   # full run (~13 min, 2 cores)
    python examples/forgetting/run.py --quick --out forgetting_quick   # pipeline check (~15 s)

Per seed, a small decoder-only transformer is pretrained (cached under ``--out/bases``, so reruns
skip it) until it is confident on four "general" tasks: copy, reverse, sort, shift a sequence of
symbols. Pretraining also shows a fifth prompt, "domain", whose answer is the reversed input with
every second symbol random: the base is confident on the reversal positions and, as wanted,
uncertain on the "slots" it cannot know. Fine-tuning (no replay) teaches the slots' new
content, a secret substitution cipher, on a fixed training set where a fraction of answer
tokens is replaced by random symbols (label noise; the test set is clean). Noisy labels on
positions the model is sure of are confident conflicts: what EAFT's entropy gate down-weights
and SFT forces. Every method (the package's ``vocab_parallel_eaft_cross_entropy`` with
loss_type sft / dft / eaft) fine-tunes the same base on the same data in the same order, at
several learning rates, with domain accuracy and general retention evaluated at checkpoints.

Outputs (under ``--results``, default ``--out``), accuracies in % (teacher-forced answer tokens):
    summary.md / summary.csv   one row per method: target avg / general avg at the highest
                               learning rate and at matched domain gain, std over seeds, paired
                               per-seed differences vs SFT (see report.py)
    by_lr.csv                  one row per (method, lr), final checkpoint
    runs.csv                   every evaluated checkpoint (seed, method, lr, step, accuracies)
    tradeoff.png               domain accuracy vs general retention per method, and paired gains
"""

import argparse
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from eaft_megatron import vocab_parallel_eaft_cross_entropy
from report import METHODS, analyse, write_outputs  # examples/forgetting/report.py

GENERAL_TASKS = ("copy", "reverse", "sort", "shift")
LANDSCAPES: dict[int, dict] = {}  # seed -> base landscape of the domain data (noisy / clean)
TASKS = GENERAL_TASKS + ("domain",)
PAD, SEP = 0, 1
TASK_TOKEN = {task: 2 + i for i, task in enumerate(TASKS)}
FIRST_SYMBOL = 2 + len(TASKS)
TASKS_VERSION = 2  # bump when make_batch changes: cached bases depend on it


@dataclass
class Config:
    """Sizes and schedules; ``quick()`` shrinks them to a pipeline check."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """One pretrained base, cipher and noisy training set per seed; methods are paired on it."""
    lrs: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3])
    """Fine-tuning learning rates (AdamW, constant after warm-up); the highest is the headline."""
    n_symbols: int = 24
    """Answer alphabet (>= top_k = 20, so the top-20 entropy of an unsure model is ~ln 20)."""
    seq_len: int = 6
    """Symbols per input and per answer."""
    d_model: int = 96
    n_layers: int = 2
    n_heads: int = 4
    pretrain_steps: int = 800
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 160
    finetune_steps: int = 200
    finetune_batch: int = 64
    finetune_examples: int = 1024
    """Size of the (fixed, repeated) domain training set."""
    label_noise: float = 0.2
    """Fraction of domain *training* answer tokens replaced by a random symbol."""
    eval_every: int = 25
    eval_examples: int = 512
    """Test examples per task (fixed per seed)."""
    match_frac: float = 0.9
    """Matched domain gain: compare at domain accuracy >= match_frac x SFT's best on that seed."""
    threads: int = 1

    def __post_init__(self):
        if self.n_symbols < 20:
            raise ValueError(f"n_symbols must be >= 20 (EAFT's top_k), got {self.n_symbols}")
        if not self.seeds or not self.lrs:
            raise ValueError(f"need at least one seed and one lr, got {self.seeds}, {self.lrs}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} not divisible by n_heads {self.n_heads}")

    @property
    def vocab(self) -> int:
        return FIRST_SYMBOL + self.n_symbols

    @classmethod
    def quick(cls) -> "Config":
        return cls(seeds=[0, 1], lrs=[1e-3, 3e-3], d_model=32, n_layers=1, pretrain_steps=150,
                   pretrain_batch=64, finetune_steps=20, finetune_batch=32, finetune_examples=128,
                   eval_every=10, eval_examples=64)

    def base_key(self) -> str:
        """Hash of everything the pretrained base depends on (names its cache file)."""
        keys = ("n_symbols", "seq_len", "d_model", "n_layers", "n_heads", "pretrain_steps",
                "pretrain_lr", "pretrain_batch")
        fields = {"tasks": TASKS_VERSION, **{k: getattr(self, k) for k in keys}}
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------
# Tasks. A sequence is [task] x_1..x_L [SEP] y_1..y_L; only the answer y is supervised.


def make_batch(task: str, n: int, cfg: Config, gen: torch.Generator, cipher: torch.Tensor | None = None,
               noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (inputs [n, 2L+1], targets [n, 2L+1] with -100 off the answer, noisy mask [n, 2L+1]).

    ``task="domain"`` with ``cipher=None`` gives random answers (the pretraining precursor);
    with a cipher (a permutation of the symbols) the answer is ``cipher[x]``. ``noise`` replaces
    that fraction of answer tokens by uniformly random symbols.
    """
    L, S = cfg.seq_len, cfg.n_symbols
    x = torch.randint(0, S, (n, L), generator=gen)  # symbol indices
    if task == "copy":
        y = x
    elif task == "reverse":
        y = x.flip(1)
    elif task == "sort":
        y = x.sort(1).values
    elif task == "shift":
        y = (x + 1) % S
    elif task == "domain":
        # reverse(x) with every second symbol (the "slots") replaced by new content: random in
        # pretraining (the base learns it cannot know them), the cipher in fine-tuning.
        y = x.flip(1).clone()
        slots = y[:, 1::2]
        y[:, 1::2] = torch.randint(0, S, slots.shape, generator=gen) if cipher is None else cipher[slots]
    else:
        raise ValueError(f"unknown task {task!r}, expected one of {TASKS}")
    noisy = torch.rand(n, L, generator=gen) < noise
    y = torch.where(noisy, torch.randint(0, S, (n, L), generator=gen), y)
    seq = torch.cat([torch.full((n, 1), TASK_TOKEN[task]), x + FIRST_SYMBOL, torch.full((n, 1), SEP),
                     y + FIRST_SYMBOL], 1)  # [n, 2L+2]
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, : L + 1] = -100  # predictions of x and of SEP are not supervised
    noisy_mask = torch.cat([torch.zeros(n, L + 1, dtype=torch.bool), noisy], 1)
    return inputs, targets, noisy_mask


# ----------------------------------------------------------------------------------------------
# Model: a pre-norm decoder-only transformer with learned positions.


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h):  # h: [b, t, d]
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)  # [b, heads, t, d/heads]
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return h + self.mlp(self.ln2(h))


class TinyGPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        t = 2 * cfg.seq_len + 1
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(t, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln, self.head = nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx):  # idx: [b, t] -> logits [b, t, vocab]
        h = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


# ----------------------------------------------------------------------------------------------
# Training and evaluation.


def loss_fn(logits, targets, loss_type: str):
    """Mean over supervised tokens of the package's per-token loss (SFT/DFT/EAFT); + stats."""
    loss, stats = vocab_parallel_eaft_cross_entropy(logits, targets, loss_type=loss_type, top_k=20,
                                                    alpha=1.0, return_stats=True)
    return loss.sum() / stats.mask.sum(), stats


@torch.no_grad()
def evaluate(model, test_sets: dict) -> dict[str, float]:
    """Teacher-forced answer-token accuracy (%) per task, plus the general average."""
    model.eval()
    acc = {}
    for task, (inputs, targets) in test_sets.items():
        pred = model(inputs).argmax(-1)
        mask = targets != -100
        acc[task] = 100.0 * (pred[mask] == targets[mask]).float().mean().item()
    model.train()
    acc["general"] = sum(acc[t] for t in GENERAL_TASKS) / len(GENERAL_TASKS)
    return acc


def pretrained_base(cfg: Config, seed: int, cache_dir: Path) -> tuple[TinyGPT, bool]:
    """Pretrains on the general tasks + the domain precursor, or loads the cache; (model, cached)."""
    path = cache_dir / f"base_{cfg.base_key()}_seed{seed}.pt"
    model = TinyGPT(cfg)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model, True
    torch.manual_seed(seed)
    model = TinyGPT(cfg)
    gen = torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    warmup = max(1, cfg.pretrain_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.pretrain_steps))))
    per_task = cfg.pretrain_batch // len(TASKS)
    for _ in range(cfg.pretrain_steps):
        parts = [make_batch(task, per_task, cfg, gen) for task in TASKS]
        inputs, targets = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        loss, _ = loss_fn(model(inputs), targets, "sft")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.rename(path)  # atomic: an interrupted run never leaves a half-written base
    return model, False


def finetune(base: TinyGPT, cfg: Config, method: str, lr: float, data: dict, test_sets: dict, seed: int):
    """Fine-tunes a copy of ``base`` on the noisy domain set; returns one row per checkpoint."""
    model = TinyGPT(cfg)
    model.load_state_dict(base.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, cfg.finetune_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator().manual_seed(20_000 + seed)  # same batch order for every method / lr
    inputs, targets, noisy = data["inputs"], data["targets"], data["noisy"]
    n = inputs.shape[0]
    perm, pos = torch.randperm(n, generator=gen), 0
    rows, w_sum = [], {"clean": 0.0, "noisy": 0.0}
    counts = {"clean": 0, "noisy": 0}
    # What the noisy labels carry of the optimised objective: their share of sum(w * CE) (every
    # step) and of the gradient (at checkpoints: ||g_noisy|| / (||g_noisy|| + ||g_clean||), the
    # gradient of the batch loss split into its noisy-label and clean-label terms).
    share = {"loss_noisy": 0.0, "loss_all": 0.0, "grad": []}
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(1, cfg.finetune_steps + 1):
        if pos + cfg.finetune_batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos: pos + cfg.finetune_batch]
        pos += cfg.finetune_batch
        per_token, stats = vocab_parallel_eaft_cross_entropy(
            model(inputs[idx]), targets[idx], loss_type=method, top_k=20, alpha=1.0,
            return_stats=True)
        loss = per_token.sum() / stats.mask.sum()
        is_noisy = noisy[idx] & stats.mask
        share["loss_noisy"] += float(per_token.detach()[is_noisy].sum())
        share["loss_all"] += float(per_token.detach().sum())
        measure = step % cfg.eval_every == 0 or step == cfg.finetune_steps
        opt.zero_grad(set_to_none=True)
        if measure:  # a second forward: the op's backward runs once per graph
            again = vocab_parallel_eaft_cross_entropy(model(inputs[idx]), targets[idx],
                                                      loss_type=method, top_k=20, alpha=1.0)
            g_noisy = torch.autograd.grad(again[is_noisy].sum() / stats.mask.sum(), params,
                                          allow_unused=True)
        loss.backward()
        if measure:
            n_noisy = math.sqrt(sum(float((g ** 2).sum()) for g in g_noisy if g is not None))
            n_clean = math.sqrt(sum(float(((p.grad - (g if g is not None else 0)) ** 2).sum())
                                    for p, g in zip(params, g_noisy)))
            share["grad"].append(n_noisy / (n_noisy + n_clean) if n_noisy + n_clean else 0.0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        # Mean weight the method gives to noisy vs clean labels (what the gate does).
        is_clean = stats.mask & ~noisy[idx]
        w_sum["noisy"] += stats.weight[is_noisy].sum().item()
        w_sum["clean"] += stats.weight[is_clean].sum().item()
        counts["noisy"] += int(is_noisy.sum())
        counts["clean"] += int(is_clean.sum())
        if step % cfg.eval_every == 0 or step == cfg.finetune_steps:
            acc = evaluate(model, test_sets)
            w_mean = {k: w_sum[k] / counts[k] if counts[k] else float("nan") for k in w_sum}
            rows.append(dict(seed=seed, method=method, lr=lr, step=step, **acc,
                             w_clean=w_mean["clean"], w_noisy=w_mean["noisy"],
                             loss_share_noisy=share["loss_noisy"] / share["loss_all"],
                             grad_share_noisy=sum(share["grad"]) / len(share["grad"]),
                             token_share_noisy=counts["noisy"] / (counts["noisy"] +
                                                                  counts["clean"])))
    return rows


def base_diagnostics(model: TinyGPT, data: dict, test_sets: dict) -> dict[str, float]:
    """Normalised top-20 entropy of the base on domain vs general answers (should be ~1 vs ~0)."""
    with torch.no_grad():
        _, dom = loss_fn(model(data["inputs"]), data["targets"], "eaft")
        gen_in, gen_tg = test_sets["copy"]
        _, gen = loss_fn(model(gen_in), gen_tg, "eaft")
    return {"base_w_domain": (dom.weight.sum() / dom.mask.sum()).item(),
            "base_w_general": (gen.weight.sum() / gen.mask.sum()).item()}


def base_landscape(model: TinyGPT, data: dict, bins: int = 20, threshold: float = 0.15) -> dict:
    """The landscape of the domain training data under the pretrained model, noisy and clean
    labels apart: ``{"noisy"|"clean": record}`` in the trainer's landscape.json layout
    (normalised top-20 entropy x p(label) counts, the four quadrants at ``threshold``)."""
    with torch.no_grad():
        _, st = loss_fn(model(data["inputs"]), data["targets"], "eaft")
    e = torch.clamp(st.entropy / math.log(20), max=1.0)
    out = {}
    for name, sel in (("noisy", st.mask & data["noisy"]), ("clean", st.mask & ~data["noisy"])):
        ee, pp = e[sel], st.target_prob[sel]
        cell = (ee * bins).long().clamp(0, bins - 1) * bins + (pp * bins).long().clamp(0, bins - 1)
        counts = torch.bincount(cell, minlength=bins * bins).view(bins, bins)
        n = int(sel.sum())
        quadrants = torch.bincount((ee < threshold).long() * 2 + (pp < threshold).long(),
                                   minlength=4)
        names = ("uncertain_likely", "uncertain_unlikely", "confident_agreement",
                 "confident_conflict")
        out[name] = dict(
            iteration=0, model="pretrained base", data=f"domain training data, {name} labels",
            tokens=n, bins=bins, counts=counts.tolist(),
            thresholds={"entropy": threshold, "prob": threshold},
            quadrants={k: {"tokens": int(v), "share": int(v) / n if n else 0.0}
                       for k, v in zip(names, quadrants)},
            confident_conflicts=int(quadrants[3]) / n if n else 0.0)
    return out


def run_seed(cfg: Config, seed: int, cache_dir: Path, log) -> list[dict]:
    t0 = time.time()
    base, cached = pretrained_base(cfg, seed, cache_dir)
    t_base = time.time() - t0
    gen = torch.Generator().manual_seed(30_000 + seed)
    test_sets = {}
    for task in GENERAL_TASKS:
        inputs, targets, _ = make_batch(task, cfg.eval_examples, cfg, gen)
        test_sets[task] = (inputs, targets)
    cipher = torch.randperm(cfg.n_symbols, generator=gen)  # the domain's new content
    inputs, targets, _ = make_batch("domain", cfg.eval_examples, cfg, gen, cipher=cipher)
    test_sets["domain"] = (inputs, targets)  # clean
    inputs, targets, noisy = make_batch("domain", cfg.finetune_examples, cfg, gen, cipher=cipher,
                                        noise=cfg.label_noise)
    data = {"inputs": inputs, "targets": targets, "noisy": noisy}

    base_acc = evaluate(base, test_sets)
    diag = base_diagnostics(base, data, test_sets)
    LANDSCAPES[seed] = base_landscape(base, data)
    how = "loaded from cache" if cached else f"pretrained in {t_base:.0f}s"
    per_task = ", ".join(f"{t} {base_acc[t]:.1f}" for t in GENERAL_TASKS)
    log(f"seed {seed}: base {how}: domain {base_acc['domain']:.1f}% general "
        f"{base_acc['general']:.1f}% ({per_task}); base EAFT weight: domain answers "
        f"{diag['base_w_domain']:.2f}, general {diag['base_w_general']:.2f}")
    ls = LANDSCAPES[seed]
    log(f"  landscape of the domain training labels under the base: confident conflicts "
        f"{100 * ls['noisy']['confident_conflicts']:.1f}% of noisy, "
        f"{100 * ls['clean']['confident_conflicts']:.1f}% of clean labels")
    rows = [dict(seed=seed, method="base", lr=0.0, step=0, **base_acc, w_clean=float("nan"),
                 w_noisy=float("nan"), **diag)]
    for lr in cfg.lrs:
        for method in METHODS:
            t1 = time.time()
            r = finetune(base, cfg, method, lr, data, test_sets, seed)
            rows += r
            log(f"  {method:4s} lr {lr:g}: domain {r[-1]['domain']:5.1f}%  general "
                f"{r[-1]['general']:5.1f}%  w clean/noisy {r[-1]['w_clean']:.2f}/{r[-1]['w_noisy']:.2f}"
                f"  noisy share: tokens {r[-1]['token_share_noisy']:.3f} loss "
                f"{r[-1]['loss_share_noisy']:.3f} grad {r[-1]['grad_share_noisy']:.3f}"
                f"  ({time.time() - t1:.0f}s)")
    return rows


def write_mechanism(rows: list[dict], cfg: Config, results: Path) -> str:
    """mechanism.md / mechanism.json: per method and lr (mean over seeds, whole fine-tuning
    run), the noisy labels' share of tokens, of the objective sum(w * CE) and of the gradient
    norm; the base landscape of the domain data with noisy and clean labels apart
    (landscape_base.png: the trainer's picture, noisy left, clean right)."""
    finals = {}
    for r in rows:
        if r["method"] != "base":
            finals[(r["seed"], r["method"], r["lr"])] = r  # the last checkpoint's running means
    table = {}
    for (seed, method, lr), r in sorted(finals.items()):
        entry = table.setdefault((method, lr), {k: [] for k in (
            "token_share_noisy", "loss_share_noisy", "grad_share_noisy", "w_noisy", "w_clean")})
        for k in entry:
            entry[k].append(r[k])
    lines = ["| method | lr | noisy share of tokens | of the loss (w * CE) | of the gradient norm "
             "| mean w noisy / clean |", "|---|---|---|---|---|---|"]
    data = []
    for (method, lr), entry in sorted(table.items(), key=lambda x: (x[0][1], x[0][0])):
        m = {k: sum(v) / len(v) for k, v in entry.items()}
        data.append(dict(method=method, lr=lr, seeds=len(entry["w_noisy"]), **m))
        lines.append(f"| {method.upper()} | {lr:g} | {m['token_share_noisy']:.3f} | "
                     f"{m['loss_share_noisy']:.3f} | {m['grad_share_noisy']:.3f} | "
                     f"{m['w_noisy']:.3f} / {m['w_clean']:.3f} |")
    land = {name: {k: sum(LANDSCAPES[s][name]["quadrants"][k]["share"] for s in LANDSCAPES)
                   / len(LANDSCAPES) for k in LANDSCAPES[cfg.seeds[0]][name]["quadrants"]}
            for name in ("noisy", "clean")}
    lines += ["", "Base model on the domain training labels (mean over seeds; entropy and p(label) "
              "thresholds 0.15):", "", "| labels | confident conflict | confident agreement | "
              "uncertain, p < 0.15 | uncertain, p >= 0.15 |", "|---|---|---|---|---|"]
    for name, q in land.items():
        lines.append(f"| {name} | {q['confident_conflict']:.3f} | {q['confident_agreement']:.3f} "
                     f"| {q['uncertain_unlikely']:.3f} | {q['uncertain_likely']:.3f} |")
    text = "\n".join(lines) + "\n"
    results.mkdir(parents=True, exist_ok=True)
    (results / "mechanism.md").write_text(text)
    (results / "mechanism.json").write_text(json.dumps(dict(
        methods=data, base_landscape_quadrants=land,
        base_landscape_seed0={k: v for k, v in LANDSCAPES[cfg.seeds[0]].items()}), indent=1))
    try:
        import sys as _sys

        _sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from eaft_megatron.plots import plot_landscapes

        first = LANDSCAPES[cfg.seeds[0]]
        plot_landscapes([first["noisy"], first["clean"]], results / "landscape_base.png")
    except ImportError:
        pass
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 seeds: a pipeline check (~1 min)")
    p.add_argument("--out", type=Path, default=Path("eaft_forgetting"),
                   help="output dir (default: ./eaft_forgetting under the current directory); "
                        "pretrained bases are cached under OUT/bases")
    p.add_argument("--results", type=Path, default=None, help="where the md/csv/png go (default: --out)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5, quick 2)")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="fine-tuning learning rates")
    p.add_argument("--label-noise", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    args = p.parse_args(argv)

    cfg = Config.quick() if args.quick else Config()
    overrides = {}
    if args.seeds is not None:
        overrides["seeds"] = list(range(args.seeds))
    if args.lrs is not None:
        overrides["lrs"] = args.lrs
    if args.label_noise is not None:
        overrides["label_noise"] = args.label_noise
    if args.threads is not None:
        overrides["threads"] = args.threads
    cfg = dataclasses.replace(cfg, **overrides)
    torch.set_num_threads(cfg.threads)
    results = args.results or args.out

    def log(msg):
        print(msg, flush=True)

    t0 = time.time()
    log(f"config: {cfg}")
    rows = []
    for seed in cfg.seeds:
        rows += run_seed(cfg, seed, args.out / "bases", log)
    summary, by_lr, base = analyse(rows, cfg)
    table = write_outputs(rows, summary, by_lr, base, cfg, results, time.time() - t0)
    log("\n" + table)
    log("\n" + write_mechanism(rows, cfg, results))
    log(f"\nwrote {results}/summary.md, summary.csv, by_lr.csv, runs.csv, tradeoff.png "
        f"in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
