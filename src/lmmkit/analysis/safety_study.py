"""`lmmkit safety-study`: the demo model trained with and without safety SFT data, attacked before and after.

Both models are the demo's recipe (shipped pretrained LM + tower, an MLP bridge aligned once on captions,
then SFT from that same aligned bridge), differing only in the SFT data: the baseline trains on the
ShapesWorld instruction conversations; the safety model on the same conversations plus a share of safety
conversations (lmmkit.data.shapes.attacks.write_safety_sft: denials of false premises and false written
claims, image-order questions, refusals to read out a contact card, answers that ignore injected text),
for the same number of steps. Each model is then scored on held-out images: every attack twin's ASR
(attack success rate, with 95% Wilson intervals), POPE F1 (mean of the three splits, official parser) and
the LM loss on held-out conversations: the safety / helpfulness trade-off, measured. Per attack, the
before/after difference gets a paired-bootstrap interval and an exact McNemar test on the same items.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmmkit.atomic import atomic_write
from lmmkit.data.shapes.attacks import FAMILIES, mix_conversations, write_attack_twin, write_safety_sft
from lmmkit.data.shapes.bench import write_bench
from lmmkit.data.shapes.generate import generate_shapes
from lmmkit.demo import train_demo_stage
from lmmkit.eval.backends.lmmkit_model import LmmkitBackend
from lmmkit.eval.cache import ResponseCache
from lmmkit.eval.generation import lm_loss
from lmmkit.eval.runner import EvalOptions, run_eval
from lmmkit.eval.stats import mcnemar, paired_bootstrap
from lmmkit.eval.task_stats import accuracy_statistic, compare_runs
from lmmkit.eval.tasks import get_tasks
from lmmkit.models.build import build_vlm
from lmmkit.train.features import FeatureCache
from lmmkit.train.run import load_samples

VARIANTS: tuple[str, ...] = ("baseline", "safety")


@dataclass
class SafetyStudySettings:
    out: Path = Path("runs/safety")
    seed: int = 0
    n_train: int = 8000
    n_test: int = 600
    n_pope_images: int = 300
    n_attack: int = 100  # attack items per family (each with its control)
    safety_share: float = 0.15  # safety conversations added to SFT, as a share of the training images
    align_steps: int = 100
    sft_steps: int = 400
    batch_size: int = 64
    align_lr: float = 2e-3
    sft_lr: float = 2e-3
    warmup_ratio: float = 0.03
    threads: int = 0  # 0 = torch's choice
    timings: dict[str, float] = field(default_factory=dict)


def compare_attacks(a: dict, b: dict, n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Per family, B - A of the ASR on the attack items answered in both runs: paired-bootstrap 95% interval
    and the exact McNemar p on the items' success flags."""
    by_b = {r["id"]: r for r in b["items"] if r["role"] == "attack" and r["response"] is not None}
    out: dict[str, dict] = {}
    for fam in FAMILIES:
        ra = [r for r in a["items"] if r["family"] == fam and r["role"] == "attack" and r["response"] is not None
              and r["id"] in by_b]
        if not ra:
            continue
        rb = [by_b[r["id"]] for r in ra]
        flags = [[{"correct_asr": bool(r["success"])} for r in rs] for rs in (ra, rb)]
        boot = paired_bootstrap(flags[0], flags[1], accuracy_statistic("asr"), n_boot=n_boot, seed=seed)
        test = mcnemar([r["success"] for r in ra], [r["success"] for r in rb])
        out[fam] = {"n_paired": len(ra), "a": boot["a"], "b": boot["b"], "difference": boot["difference"],
                    "low": boot["low"], "high": boot["high"], "p_value": test["p_value"], "mcnemar": test}
    return out


def run_study(s: SafetyStudySettings) -> dict[str, Any]:
    """Data, one align, two SFTs (without / with safety data), both scored; writes safety_study.json / .md."""
    if not 0 <= s.safety_share <= 1:
        raise ValueError(f"safety_share must be in [0, 1], got {s.safety_share}")
    if s.threads:
        torch.set_num_threads(s.threads)
    t0 = t = time.time()
    out = Path(s.out)
    data = generate_shapes(out / "data", seed=s.seed, n_train=s.n_train, n_test=s.n_test,
                           n_pope_images=s.n_pope_images, workers=1, progress=False)
    bench = write_bench(data.root)["pope"].parent
    write_attack_twin(data.root, bench, n=s.n_attack, seed=s.seed)
    safety = write_safety_sft(data.root, round(s.safety_share * s.n_train), seed=s.seed)
    mixed = data.root / "train" / "conversations_with_safety.json"
    mix_conversations([data.train_conversations, safety.conversations], mixed)
    s.timings["data"] = round(time.time() - t, 1)

    t = time.time()
    model = build_vlm("shipped:lm", "shipped:vision", seed=s.seed)
    images, cache = data.image_folder, FeatureCache()
    loaded = {}
    for name, path in (("captions", data.train_captions), ("sft", data.train_conversations),
                       ("safety", safety.conversations), ("test", data.test_conversations)):
        samples, counter = load_samples(model, path, images, 512)
        if counter.total:
            print(f"{path}: {counter.summary()}")
        cache.fill(model, [im for smp in samples for im in smp.images], desc=f"encode {name}")
        loaded[name] = samples
    s.timings["tokenize + encode"] = round(time.time() - t, 1)

    t = time.time()
    align = train_demo_stage(model, s, "align", loaded["captions"], data.train_captions, images, out / "align", None,
                             cache, source="lmmkit safety-study", progress=False)
    aligned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    s.timings["align"] = round(time.time() - t, 1)

    runs: dict[str, dict] = {}
    features = FeatureCache()  # the frozen tower's features of the eval images, shared by both models
    for variant in VARIANTS:
        t = time.time()
        model.load_state_dict(aligned)
        samples = loaded["sft"] + (loaded["safety"] if variant == "safety" else [])
        file = mixed if variant == "safety" else data.train_conversations
        res = train_demo_stage(model, s, "sft", samples, file, images, out / variant / "sft", align.checkpoint,
                               cache, source="lmmkit safety-study", progress=False)
        train_seconds = time.time() - t
        backend = LmmkitBackend(model, fingerprint=f"safety-study:{variant}", name=variant, progress=False,
                                    features=features)
        tasks = run_eval(get_tasks(["pope", "attacks"]), backend, bench, ResponseCache(None),
                         opts=EvalOptions(progress=False, out_dir=out / variant / "eval"))["tasks"]
        loss = lm_loss(model, loaded["test"], cache=cache)
        runs[variant] = {"sft_samples": len(samples), "final_loss": round(res.final_loss, 4),
                         "checkpoint": str(res.checkpoint), "sft_seconds": round(train_seconds, 1),
                         "seconds": round(time.time() - t, 1), "lm_loss": round(loss["loss"], 4),
                         "pope_f1_mean": tasks["pope"]["strict"]["mean_f1"],
                         "pope_f1": {k: v["f1"] for k, v in tasks["pope"]["strict"].items() if k != "mean_f1"},
                         "pope_ci": tasks["pope"]["intervals"]["strict"]["F1 mean"],
                         "attacks": tasks["attacks"]["strict"], "failures": tasks["attacks"]["failures"],
                         "tasks": tasks}
        print(f"{variant}: {summary_line(runs[variant])}", flush=True)
    base, safe = runs["baseline"]["tasks"], runs["safety"]["tasks"]
    pope_effect = compare_runs({"tasks": {"pope": base["pope"]}}, {"tasks": {"pope": safe["pope"]}})
    study = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(s).items()},
             "safety_data": {"records": safety.n_records, "per_family": safety.per_family,
                             "file": str(safety.conversations), "mixed": str(mixed)},
             "runs": {v: {k: x for k, x in r.items() if k != "tasks"} for v, r in runs.items()},
             "attack_effect": compare_attacks(base["attacks"], safe["attacks"]),
             "pope_effect": pope_effect["tasks"]["pope"]["rows"][0]}
    s.timings["total"] = round(time.time() - t0, 1)
    study["settings"]["timings"] = s.timings
    atomic_write(out / "safety_study.json", json.dumps(study, indent=1) + "\n")
    atomic_write(out / "safety_study.md", markdown_table(study) + "\n")
    return study


def summary_line(run: dict) -> str:
    asr = ", ".join(f"{f} {v['asr']:.2f}" for f, v in run["attacks"]["families"].items() if v["asr"] is not None)
    return (f"ASR {asr}; POPE F1 {run['pope_f1_mean']:.3f}; LM loss {run['lm_loss']:.4f}; "
            f"{run['seconds']:.0f} s")


def _ci(v: float | None, ci: Sequence[float] | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else f"{v:.{digits}f}"


def markdown_table(study: dict) -> str:
    """The before/after table: every attack's ASR and control rate, then POPE F1 and the LM loss."""
    base, safe = study["runs"]["baseline"], study["runs"]["safety"]
    lines = ["| attack (aspect) | ASR baseline [95% CI] | ASR with safety SFT [95% CI] | difference [95% CI] "
             "| McNemar p | control: what is counted | control baseline | control with safety SFT |",
             "|---|---|---|---|---|---|---|---|"]
    for fam in FAMILIES:
        a, b = base["attacks"]["families"].get(fam), safe["attacks"]["families"].get(fam)
        if a is None or b is None:
            continue
        eff = study["attack_effect"].get(fam)
        diff = f"{eff['difference']:+.2f} [{eff['low']:+.2f}, {eff['high']:+.2f}]" if eff else "-"
        p = f"{eff['p_value']:.2g}" if eff else "-"
        lines.append(f"| {fam.replace('_', ' ')} ({a['aspect']}) | {_ci(a['asr'], a['asr_ci'])} | "
                     f"{_ci(b['asr'], b['asr_ci'])} | {diff} | {p} | {a['control_metric']} | "
                     f"{_ci(a['control_rate'], a['control_ci'])} | {_ci(b['control_rate'], b['control_ci'])} |")
    pe = study["pope_effect"]
    lines += ["", "| helpfulness | baseline | with safety SFT | difference [95% CI] | p |", "|---|---|---|---|---|",
              f"| POPE F1, mean of 3 splits (official parser) | {_ci(base['pope_f1_mean'], _pair(base['pope_ci']), 3)} | "
              f"{_ci(safe['pope_f1_mean'], _pair(safe['pope_ci']), 3)} | {pe['difference']:+.3f} "
              f"[{pe['low']:+.3f}, {pe['high']:+.3f}] | {pe['p_value']:.2g} ({pe['test']}) |",
              f"| LM loss, held-out conversations (answer tokens) | {base['lm_loss']:.4f} | {safe['lm_loss']:.4f} | "
              f"{safe['lm_loss'] - base['lm_loss']:+.4f} | - |"]
    return "\n".join(lines)


def _pair(ci: dict | None) -> list[float] | None:
    return [ci["low"], ci["high"]] if ci else None


def _run(args) -> int:
    import sys

    s = SafetyStudySettings(out=Path(args.out), seed=args.seed, threads=args.threads)
    for name in ("n_train", "n_test", "n_pope_images", "n_attack", "safety_share", "align_steps", "sft_steps",
                 "batch_size"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    try:
        study = run_study(s)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n" + markdown_table(study))
    print(f"\ntimings (s): {s.timings}\nwrote {s.out}/safety_study.json and .md")
    return 0


def add_safety_study_parser(subparsers) -> None:
    """Add `safety-study` to a CLI's subparsers."""
    p = subparsers.add_parser(
        "safety-study", help="the demo model with and without safety SFT data: attack success before and after",
        description="Train the demo model twice from one aligned bridge: SFT on the ShapesWorld conversations, "
                    "and on the same plus safety conversations (refusals, denials, injection-resistant answers). "
                    "Score both on the attack twins (ASR with 95%% intervals), POPE and the held-out LM loss. "
                    "Writes safety_study.json and .md under --out (docs/safety.md).")
    p.add_argument("--out", default="runs/safety")
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--n-pope-images", type=int)
    p.add_argument("--n-attack", type=int, help="attack items per family (each with a control item)")
    p.add_argument("--safety-share", type=float, help="safety conversations added, as a share of the training "
                                                       "images (default 0.15)")
    p.add_argument("--align-steps", type=int)
    p.add_argument("--sft-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.set_defaults(func=_run)
