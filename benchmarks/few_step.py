"""Few-step generation on real Fashion-MNIST: teachers trained here, each few-step student trained from them at the
same batch, scored by Frechet distance (the project classifier's features, 5000 samples against the test split) at
1, 2 and 4 network evaluations, against the teachers at 10, 20 and 50.

    python benchmarks/few_step.py --classifier CLF.ckpt [--teacher-steps 3000] [--student-steps 3000]
        [--batch-size 128] [--num-samples 5000] [--teacher-nfe 10,20,50]
        [--students cd,pd,reflow,ct,meanflow,shortcut]
        [--threads N]
        [--out benchmarks/out/few_step] [--runs-from EARLIER_OUT]

Teachers: EDM (experiment=edm_fashion_mnist; sampled with sampler=edm) for consistency distillation (cd) and
progressive distillation (pd), rectified flow (experiment=rectified_flow_fashion_mnist; sampler=heun) for reflow,
whose teacher must be a flow; consistency training (ct, iCT), MeanFlow and shortcut models (one-step flow maps
trained from scratch, experiment=meanflow_fashion_mnist / shortcut_fashion_mnist) have none. Students: cd and ct
sample with sampler=consistency, meanflow and shortcut with sampler=flow_map; pd, in its teacher's EDM
parameterisation, runs 6 stages of student-steps / 6 optimizer steps from a 64-step teacher (32, 16, 8, 4, 2, 1
steps) and each NFE samples the stage checkpoint of that many DDIM steps; reflow draws --reflow-pairs teacher pairs and samples with Euler. Every run is a `train.py` preset with EMA weights
sampled; a rerun with the same --out continues each run (ckpt_path=auto) and keeps the scores of a model already
scored at the same step count; --runs-from scores the finished runs of another --out instead of training. Writes
`<out>/<name>/results.json` and `<out>/table.md`, whose rows give each model's training time (the teacher's not
included in a student's).
"""

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch

from common import add_threads_argument, apply_threads, compose_train, best_device
from diffusion_lab.generate import generate
from diffusion_lab.metrics.evaluate import data_split
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.builders import load_model
from diffusion_lab.samplers import Sampler
from diffusion_lab.train import train
from diffusion_lab.utils.checkpoint import load_checkpoint
from process_quality import sampler_at
from quality_vs_reference import DATA, score

TEACHERS = {"edm": ("edm_fashion_mnist", ("edm", "karras", {})),
            "rectified_flow": ("rectified_flow_fashion_mnist", ("heun", "uniform", {}))}
STUDENTS = {  # name -> (preset, teacher or None)
    "cd": ("consistency_distillation", "edm"),
    "pd": ("progressive_distillation_edm", "edm"),
    "reflow": ("reflow", "rectified_flow"),
    "ct": ("consistency_training", None),
    "meanflow": ("meanflow_fashion_mnist", None),
    "shortcut": ("shortcut_fashion_mnist", None),
}
PD_TEACHER_STEPS, PD_STAGES = 64, 6


def fit(name: str, overrides: list[str], steps: int, args) -> tuple[Path, float]:
    """Train (or continue) the run `<out>/<name>/run`; returns its folder and the seconds this call trained. With
    --runs-from, the run trained there instead, and the seconds it took there."""
    if args.runs_from:
        done = args.runs_from / name / "results.json"
        if not (done.is_file() and json.loads(done.read_text())["steps"] == steps):
            raise SystemExit(f"--runs-from {args.runs_from}: {name} has not finished {steps} steps there ({done})")
        return args.runs_from / name / "run", json.loads(done.read_text())["train_seconds"]
    run_dir = args.out / name / "run"
    cfg = compose_train([*overrides, f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
                         f"data.batch_size={args.batch_size}", "logger=none", f"paths.output_dir={run_dir}",
                         "callbacks.sample_media=null", "callbacks.rich_progress_bar=null", f"seed={args.seed}",
                         "ckpt_path=auto"])
    start = time.perf_counter()
    train(cfg)
    return run_dir, time.perf_counter() - start


def fd(checkpoint: Path, sampler: Sampler | Callable[[DiffusionModel], Sampler], args, test_images: torch.Tensor) -> dict:
    """FD of --num-samples samples of the checkpoint's EMA model by the sampler (or the sampler made for the model)."""
    model = load_model(load_checkpoint(checkpoint), "ema", best_device())
    sampler = sampler if isinstance(sampler, Sampler) else sampler(model)
    samples = generate(model, sampler, args.num_samples, 250, seed=args.seed).samples
    return {"sampler": str(sampler), "evaluations": sampler.evaluations_used,
            "fd": score(samples, test_images, args.classifier, args.seed)["fd"]}


def write(name: str, result: dict, args) -> None:
    (args.out / name).mkdir(parents=True, exist_ok=True)
    (args.out / name / "results.json").write_text(json.dumps(result, indent=2))
    print(name, [f"{row['evaluations']} NFE: FD {row['fd']:.1f}" for row in result["rows"]], flush=True)


def scored(name: str, steps: int, args) -> bool:
    """Whether `<out>/<name>/results.json` holds the scores of this model at `steps` optimizer steps."""
    path = args.out / name / "results.json"
    return path.is_file() and json.loads(path.read_text())["steps"] == steps


def teacher(name: str, args, test_images: torch.Tensor) -> Path:
    preset, (algorithm, spacing, options) = TEACHERS[name]
    if scored(name, args.teacher_steps, args):
        return (args.runs_from or args.out) / name / "run" / "checkpoints" / "last.ckpt"
    run_dir, seconds = fit(name, [f"experiment={preset}"], args.teacher_steps, args)
    last = run_dir / "checkpoints" / "last.ckpt"
    rows = [fd(last, sampler_at(algorithm, spacing, options, nfe), args, test_images) for nfe in args.teacher_nfe]
    write(name, {"model": f"teacher {preset}", "steps": args.teacher_steps, "train_seconds": seconds, "rows": rows}, args)
    return last


def student(name: str, teacher_ckpt: Path | None, args, test_images: torch.Tensor) -> None:
    preset, _ = STUDENTS[name]
    if scored(name, args.student_steps, args):
        return
    overrides = [f"experiment={preset}"] + ([f"teacher_ckpt={teacher_ckpt}"] if teacher_ckpt else [])
    if name == "pd":
        overrides += [f"module.teacher_steps={PD_TEACHER_STEPS}", f"module.steps_per_stage={args.student_steps // PD_STAGES}"]
    if name == "reflow":
        overrides += [f"module.num_pairs={args.reflow_pairs}"]
    run_dir, seconds = fit(name, overrides, args.student_steps, args)
    checkpoints = run_dir / "checkpoints"
    rows = []
    for nfe in (1, 2, 4):
        if name == "pd":
            stage = PD_STAGES - 1 - (nfe.bit_length() - 1)  # the stage whose student takes nfe steps
            rows.append(fd(checkpoints / f"stage{stage}_{nfe}steps.ckpt", Sampler("ddim", nfe, "trailing"), args, test_images))
        elif name == "reflow":
            rows.append(fd(checkpoints / "last.ckpt", Sampler("euler", nfe, "uniform"), args, test_images))
        elif name in ("meanflow", "shortcut"):
            rows.append(fd(checkpoints / "last.ckpt", Sampler("flow_map", nfe, "uniform"), args, test_images))
        else:
            rows.append(fd(checkpoints / "last.ckpt",
                           lambda model, n=nfe: Sampler("consistency", n, "karras", sigma_min=model.process.sigma_min),
                           args, test_images))
    write(name, {"model": f"student {preset}", "steps": args.student_steps, "train_seconds": seconds, "rows": rows}, args)


def table(out: Path) -> str:
    lines = ["| model | optimizer steps | training (s) | FD at (NFE) |", "|---|---:|---:|---|"]
    for path in sorted(out.glob("*/results.json")):
        result = json.loads(path.read_text())
        cells = ", ".join(f"{row['fd']:.1f} ({row['evaluations']})" for row in result["rows"])
        lines.append(f"| {result['model']} | {result['steps']} | {result['train_seconds']:.0f} | {cells} |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", required=True, help="a feature_classifier checkpoint (experiment=feature_classifier)")
    parser.add_argument("--teacher-steps", type=int, default=3000)
    parser.add_argument("--student-steps", type=int, default=3000)
    parser.add_argument("--reflow-pairs", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--teacher-nfe", type=lambda s: [int(n) for n in s.split(",")], default=[10, 20, 50],
                        help="the teachers' evaluation counts (Heun and EDM samplers: 2 x steps - 1 of them)")
    parser.add_argument("--students", type=lambda s: s.split(","), default=list(STUDENTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/few_step"))
    parser.add_argument("--runs-from", type=Path, default=None,
                        help="score the finished runs of an earlier --out (e.g. at another --num-samples), training none")
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    unknown = [s for s in args.students if s not in STUDENTS]
    if unknown:
        parser.error(f"--students: unknown {unknown}; choose from {', '.join(STUDENTS)}")
    if args.student_steps < PD_STAGES:
        parser.error(f"--student-steps={args.student_steps} must be >= {PD_STAGES} (the stages of pd)")
    test_images, _ = data_split(DATA, "test")
    teachers = {name: teacher(name, args, test_images)
                for name in sorted({STUDENTS[s][1] for s in args.students} - {None})}
    for name in args.students:
        student(name, teachers.get(STUDENTS[name][1]), args, test_images)
    print(table(args.out))


if __name__ == "__main__":
    main()
