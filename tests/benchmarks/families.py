"""Flux.1 and SD3.5 training, side by side: the pack against ComfyUI's own Train LoRA and against the
loops of diffusers' DreamBooth scripts, on the same model, resolution, rank and batch.

The models (``family_models.py``) have the families' real widths, cut to a few blocks so that they
fit this machine: Flux.1-dev (hidden 3072, 24 heads, context 4096, vec 768; 1 double + 1 single
block by default, 0.55B weights) and SD3.5 Medium (hidden 1536, 24 heads, RMS QK-norm, dual
attention; 2 blocks, 0.19B), random weights, loaded by ComfyUI's own loader; the diffusers
reference holds the same weights (converted with ComfyUI's key maps, checked forward against
ComfyUI's). Each measurement is a fresh process (``family_sides.py``), so its memory figures are
its own. Latents and text conditioning are precomputed stand-ins of the real shapes on every
side: what is measured is the diffusion model's training step::

    python tests/benchmarks/families.py                          # both models, 512², LoRA and full (about 8 min on 2 idle cores)
    python tests/benchmarks/families.py --models flux --modes lora --flux-blocks 2,2
    python tests/benchmarks/families.py --device cuda --resolution 1024 --steps 5 --warmup 2
    python tests/benchmarks/families.py --quick                  # CI: the tests' tiny Flux and SD3.5, 128², 1 step (about 75 s)
    python tests/benchmarks/families.py --table A.jsonl          # measure nothing: tables and verdicts of earlier figures

Runs per model: LoRA (rank 16, the pack's ``attention`` preset; the reference adapts the same
weights, Train LoRA adapts everything, as it always does) for the pack and the diffusers loop with
``--gradient-checkpointing`` as given (off: both defaults), and for Train LoRA and the pack with
``--core-gradient-checkpointing`` (on: Train LoRA's default; without it its Flux backward fails on
an in-place residual, on v0.3.64 and v0.28 alike); full fine-tuning (the pack's defaults: bfloat16
weights and moments, fused backward step) for the pack and the diffusers loop. Train LoRA
computes in the pack's compute dtype (fp32 on the CPU, bf16 on CUDA); the diffusers loop runs
under ``--reference-precision`` (no on the CPU, bf16 on CUDA: accelerate's ``--mixed_precision``).
A side that cannot run a configuration is a result too: its row says why. Where the pack's run
with Train LoRA's setting is missing (the quick form does not run it) or failed (the pack refuses
gradient checkpointing with a LoRA on Flux), Train LoRA is compared with the pack's other run, and
the verdict says so. Train LoRA on v0.3.64 cannot train these models as a workflow loads them
(under inference mode: their norm gains are bare parameters, inference tensors there); it is then
measured on the model loaded outside inference mode, and says so.

Figures: seconds per step and steps per second (mean of the timed steps after the warm-up), peak
memory (CPU: the process's peak RSS, loading included; CUDA: peak allocated) and what training
adds (the peak during set-up and training minus the memory with the model loaded), the pack's
speed-up and memory share against each, and a verdict against the targets: LoRA at least 1.5×
Train LoRA's speed at no more training memory, at least 1.2× the diffusers loop's; full
fine-tuning at most 60 % of the diffusers loop's training memory. Printed and written to
``--out`` (JSON lines, Markdown); never asserted: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
TESTS_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from benchmark import machine  # noqa: E402
from reference_loops import run_json_command  # noqa: E402

MODELS = ("flux", "sd35")
MODES = ("lora", "full")
LABEL = {"flux": "Flux.1-shaped", "sd35": "SD3.5-shaped", "flux-tiny": "tiny Flux.1", "sd35-tiny": "tiny SD3.5"}
SIDE_LABEL = {"pack": "this pack", "core": "ComfyUI Train LoRA", "reference": "diffusers loop"}
ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception)\b")
TARGETS = {  # (against, mode): (the pack's minimum speed-up, its maximum training-memory share, or None)
    ("core", "lora"): (1.5, 1.0),
    ("reference", "lora"): (1.2, None),
    ("reference", "full"): (None, 0.6),
}


def build_models(items: Sequence[str], timeout: float) -> dict[str, Path]:
    """The models' JSON files, built (first time) in a process of their own so no measured process pays for it."""
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / "family_models.py"), *items], capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(lines) != len(items):
        raise RuntimeError(f"building the models failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return {line["model"].partition(":")[0]: Path(line["built"]) for line in lines}


def side_command(side: str, mode: str, model: Path, checkpointing: bool, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, str(BENCH_DIR / "family_sides.py"), "--side", side, "--mode", mode, "--model", str(model)]
    cmd += ["--resolution", str(args.resolution), "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--seed", str(args.seed), "--device", args.device, "--lora-rank", str(args.lora_rank)]
    cmd += ["--lora-targets", args.lora_targets, "--precision", args.precision, "--core-dtype", args.core_dtype]
    cmd += ["--reference-precision", args.reference_precision]
    if checkpointing:
        cmd.append("--gradient-checkpointing")
    cmd += [flag for flag, on in (("--no-full-bf16", args.no_full_bf16), ("--no-fused-backward", args.no_fused_backward)) if on]
    return cmd


def _run(cmd: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One process's figures, or ``{"error": ...}`` with the line that says why it could not run."""
    try:
        return run_json_command(cmd, args.timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if ERROR_LINE.match(line)), lines[-1] if lines else repr(error))
        return {"error": reason.split(". ")[0][:300]}


def measure(side: str, mode: str, model: Path, checkpointing: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One side's figures (or why it could not run). Train LoRA on a model a workflow loaded (under
    inference mode) fails on ComfyUI v0.3.64 for these families (their norm gains are bare
    parameters, inference tensors there); it is then measured once more on the model loaded
    outside inference mode, and says so."""
    cmd = side_command(side, mode, model, checkpointing, args)
    result = _run(cmd, args)
    if side == "core" and "Inference tensors cannot be saved for backward" in result.get("error", ""):
        retry = _run([*cmd, "--core-load-for-autograd"], args)
        retry["as_a_workflow_loads_it"] = result["error"]
        result = retry
    result.setdefault("gradient_checkpointing", checkpointing)
    return result


def plan(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(side, mode, gradient checkpointing) of each measurement of one model, each once."""
    runs = []
    if "lora" in args.modes:
        runs += [("pack", "lora", args.gradient_checkpointing), ("reference", "lora", args.gradient_checkpointing)]
        if not args.no_core:
            runs += [("core", "lora", args.core_gradient_checkpointing)]
            if not args.quick:  # the pack as Train LoRA runs (the quick form compares with the pack's other run)
                runs += [("pack", "lora", args.core_gradient_checkpointing)]
    if "full" in args.modes:
        runs += [("pack", "full", args.gradient_checkpointing), ("reference", "full", args.gradient_checkpointing)]
    return list(dict.fromkeys(runs))


def memory_added(side: dict[str, Any]) -> float | None:
    return side.get("train_overhead_cuda_peak_mb", side.get("train_overhead_peak_rss_mb"))


def memory_peak(side: dict[str, Any]) -> float | None:
    return side.get("cuda_peak_mb", side.get("peak_rss_mb"))


def _short(error: str) -> str:
    """An error's first sentence: what the tables show (the JSON keeps it whole)."""
    return error.split(". ")[0][:200]


def _ok(side: dict[str, Any] | None) -> bool:
    return bool(side) and "error" not in side


def comparison(
    model: str, mode: str, against: str, ours: dict[str, Any], theirs: dict[str, Any], note: str | None = None
) -> dict[str, Any]:
    """The pack's speed-up and training-memory share against one other side, with the verdict."""
    out: dict[str, Any] = {"model": model, "mode": mode, "against": against, "gradient_checkpointing": theirs.get("gradient_checkpointing")}
    if theirs.get("as_a_workflow_loads_it"):
        note = "; ".join(filter(None, [note, "Train LoRA on the model loaded outside inference mode: on one a workflow loads, it fails"]))
    if note:
        out["note"] = note
    min_speed, max_share = TARGETS[(against, mode)]
    if not (_ok(ours) and _ok(theirs)):
        failed = ours if not _ok(ours) else theirs
        who = "this pack" if failed is ours else SIDE_LABEL[against]
        out["verdict"] = f"not measured: {who} could not run ({_short(failed.get('error', 'no figures'))})"
        return out
    out["speedup"] = theirs["s_per_step"] / ours["s_per_step"]
    # Process CPU seconds: less disturbed than wall time when other work shares the machine.
    out["speedup_cpu_time"] = theirs["cpu_s_per_step"] / ours["cpu_s_per_step"]
    ours_mem, theirs_mem = memory_added(ours), memory_added(theirs)
    out["memory_share"] = ours_mem / theirs_mem if ours_mem is not None and theirs_mem else None
    parts, met = [], True
    if min_speed is not None:
        ok = out["speedup"] >= min_speed
        met &= ok
        parts.append(
            f"{out['speedup']:.2f}× the speed (target ≥ {min_speed:g}×: {'met' if ok else 'missed'}; CPU time {out['speedup_cpu_time']:.2f}×)"
        )
    else:
        parts.append(f"{out['speedup']:.2f}× the speed (no target; CPU time {out['speedup_cpu_time']:.2f}×)")
    if out["memory_share"] is not None:
        share = 100 * out["memory_share"]
        if max_share is not None:
            ok = out["memory_share"] <= max_share
            met &= ok
            parts.append(f"{share:.0f} % of the training memory (target ≤ {100 * max_share:.0f} %: {'met' if ok else 'missed'})")
        else:
            parts.append(f"{share:.0f} % of the training memory (no target)")
    out["met"] = met
    out["verdict"] = ("MEETS" if met else "MISSES") + " the target: " + "; ".join(parts) + (f" [{note}]" if note else "")
    return out


def _load(side: dict[str, Any]) -> str:
    """The 1-minute load average when the side started and ended: above the core count, the run shared the CPU."""
    start, end = side.get("loadavg_start", [None])[0], side.get("loadavg_end", [None])[0]
    return "–" if start is None or end is None else f"{start:.1f}–{end:.1f}"


def figures_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["model", "mode", "side", "grad. ckpt", "s/step", "it/s", "CPU s/step", "load", "peak MB", "adds MB", "trained weights"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        side = row["result"]
        what = f"{LABEL.get(row['model'], row['model'])} {side.get('blocks', '')}".strip()
        mode = "LoRA r" + str(row["lora_rank"]) if row["mode"] == "lora" else "full"
        checkpointing = "on" if row["gradient_checkpointing"] else "off"
        if not _ok(side):
            lines.append(
                f"| {what} | {mode} | {SIDE_LABEL[row['side']]} | {checkpointing} | – | – | – | – | – | – | could not run: {_short(side['error'])} |"
            )
            continue
        trained = side.get("trainable_params")
        trained = f"{trained / 1e6:.2f}M" if trained is not None else "–"
        if row["mode"] == "lora" and side.get("adapted_layers") is not None:
            trained += f" ({side['adapted_layers']} layers)"
        if side.get("as_a_workflow_loads_it"):
            trained += "; model loaded outside inference mode (as a workflow loads it: " + _short(side["as_a_workflow_loads_it"]) + ")"
        lines.append(
            f"| {what} | {mode} | {SIDE_LABEL[row['side']]} | {checkpointing} | {side['s_per_step']:.3f} | {1 / side['s_per_step']:.3f} | "
            f"{side['cpu_s_per_step']:.3f} | {_load(side)} | {memory_peak(side):.0f} | {memory_added(side):.0f} | {trained} |"
        )
    return "\n".join(lines)


def verdict_table(comparisons: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | mode | this pack against | speed-up | training memory | verdict |", "| --- | --- | --- | --- | --- | --- |"]
    for c in comparisons:
        speed = f"{c['speedup']:.2f}×" if "speedup" in c else "–"
        share = f"{100 * c['memory_share']:.0f} %" if c.get("memory_share") is not None else "–"
        mode = "LoRA" if c["mode"] == "lora" else "full"
        ckpt = " (grad. ckpt)" if c.get("gradient_checkpointing") else ""
        lines.append(
            f"| {LABEL.get(c['model'], c['model'])} | {mode} | {SIDE_LABEL[c['against']]}{ckpt} | {speed} | {share} | {c['verdict']} |"
        )
    return "\n".join(lines)


def comparisons_of(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each other side's run against the pack's run of the same model, mode and gradient
    checkpointing; where that one is missing or failed, against the pack's other run, said so."""
    out = []
    for model in dict.fromkeys(row["model"] for row in rows):
        measured = {(r["side"], r["mode"], r["gradient_checkpointing"]): r["result"] for r in rows if r["model"] == model}
        for (side, mode, checkpointing), theirs in measured.items():
            if side == "pack":
                continue
            ours = measured.get(("pack", mode, checkpointing))
            other = measured.get(("pack", mode, not checkpointing))
            note = None
            if not _ok(ours) and _ok(other):
                why = "not run" if ours is None else f"fails: {_short(ours['error'])}"
                ours, state = other, ("without", "with") if checkpointing else ("with", "without")
                note = f"this pack {state[0]} gradient checkpointing ({state[1]} it: {why})"
            if ours is not None:
                out.append(comparison(model, mode, side, ours, theirs, note))
    return out


def report(header: str, rows: Sequence[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    comparisons = comparisons_of(rows)
    text = f"{header}\n\n{figures_table(rows)}\n\n{verdict_table(comparisons)}\n"
    text += "".join(
        f"\nverdict: {LABEL.get(c['model'], c['model'])} {c['mode']} against {SIDE_LABEL[c['against']]}: {c['verdict']}"
        for c in comparisons
    )
    return text + "\n", comparisons


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="flux, sd35 (comma-separated)")
    p.add_argument("--modes", default=",".join(MODES), help="lora, full (comma-separated)")
    p.add_argument("--flux-blocks", default="1,1", help="double,single blocks of the Flux-shaped model")
    p.add_argument("--sd35-blocks", default="2", help="blocks of the SD3.5-shaped model")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-targets", default="attention", help="the pack's LoRA preset (attention, attention+mlp, all)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="pack and diffusers loop (LoRA and full)")
    p.add_argument(
        "--core-gradient-checkpointing",
        choices=("on", "off"),
        default="on",
        help="Train LoRA and the pack run next to it (on: Train LoRA's default)",
    )
    p.add_argument("--no-core", action="store_true", help="leave ComfyUI's Train LoRA out")
    p.add_argument("--precision", default="auto", help="the pack's precision setting")
    p.add_argument("--no-full-bf16", action="store_true", help="the pack's full mode trains a float32 copy")
    p.add_argument("--no-fused-backward", action="store_true", help="the pack's full mode steps after backward (whole-model gradients)")
    p.add_argument(
        "--core-dtype", choices=("auto", "fp32", "bf16"), default="auto", help="Train LoRA's dtype (auto: the pack's compute dtype)"
    )
    p.add_argument(
        "--reference-precision", choices=("auto", "no", "fp16", "bf16"), default="auto", help="auto: no on the CPU, bf16 on CUDA"
    )
    p.add_argument("--quick", action="store_true", help="the tests' tiny Flux and SD3.5 at 128², one timed step (CI)")
    p.add_argument("--out", type=Path, default=TESTS_DIR / "artifacts" / "benchmarks")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument(
        "--table", type=Path, nargs="+", metavar="JSONL", help="measure nothing: the tables and verdicts of earlier runs' figures"
    )
    args = p.parse_args(argv)
    if args.table:
        lines = [json.loads(line) for path in args.table for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        header = next((line["header"] for line in lines if "header" in line), "")
        print(report(header, [line for line in lines if "result" in line])[0])
        return 0
    args.modes = [m for m in args.modes.split(",") if m]
    args.core_gradient_checkpointing = args.core_gradient_checkpointing == "on"
    if args.reference_precision == "auto":
        args.reference_precision = "no" if args.device == "cpu" else "bf16"
    models = [m for m in args.models.split(",") if m]
    if args.quick:
        args.resolution, args.steps, args.warmup = 128, 1, 1
        items = [f"{m}-tiny" for m in models]
    else:
        items = [f"{m}:{args.flux_blocks if m == 'flux' else args.sd35_blocks}" for m in models]

    started = time.perf_counter()
    header = (
        f"Machine: {machine()}; device {args.device}; {args.resolution}², batch {args.batch_size}, "
        f"{args.steps} timed step(s) after {args.warmup}"
    )
    print(header, flush=True)
    built = build_models(items, args.timeout)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / f"families-{'quick' if args.quick else 'full'}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    log.write_text(json.dumps({"header": header}) + "\n", encoding="utf-8")
    rows = []
    for model, path in built.items():
        description = json.loads(path.read_text(encoding="utf-8"))
        print(f"{LABEL.get(model, model)}: {description['description']}, {description['parameters'] / 1e6:.0f}M weights", flush=True)
        measured: dict[tuple[str, str, bool], dict[str, Any]] = {}
        for side, mode, checkpointing in plan(args):
            result = measure(side, mode, path, checkpointing, args)
            measured[(side, mode, checkpointing)] = result
            row = {
                "model": model,
                "side": side,
                "mode": mode,
                "gradient_checkpointing": checkpointing,
                "lora_rank": args.lora_rank,
                "result": result,
            }
            rows.append(row)
            with log.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(row) + "\n")
            print(figures_table([row]).splitlines()[-1], flush=True)
    text, comparisons = report(header, rows)
    (args.out / log.name.replace(".jsonl", ".md")).write_text(text, encoding="utf-8")
    with log.open("a", encoding="utf-8") as stream:
        for c in comparisons:
            stream.write(json.dumps({"comparison": c}) + "\n")
    print()
    print(text)
    print(f"figures: {log} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
