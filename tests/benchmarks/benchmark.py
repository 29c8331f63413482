"""Speed and memory of the pack's training next to the diffusers reference loops, side by side.

Each figure comes from a fresh process per side and configuration (peak RSS is per process):
``pack_side.py`` runs the pack's trainer, ``reference_loops.py`` the loop diffusers' own example
runs, on the same checkpoint (``--unet tiny``: the tests' one-level UNet; ``sd15-full``: a
random-weight UNet of SD1.5's real size, 860M parameters, with the full CLIP-L and VAE)::

    python tests/benchmarks/benchmark.py --mode ti --unet sd15-full --resolution 512 --steps 2
    python tests/benchmarks/benchmark.py --mode all --unet sd15-full --resolution 512 --steps 2
    python tests/benchmarks/benchmark.py --mode lora --curve --unet sd15-full   # 256/512/768 x batch 1/2/4, plot
    python tests/benchmarks/benchmark.py --quick                                # CI: every mode, tiny, 1 step
    python tests/benchmarks/benchmark.py --replot A.jsonl B.jsonl               # one table and plot of several runs

Figures: seconds per step (mean of the timed steps after warm-up), and what training adds to
memory: on the CPU the peak RSS during set-up and training minus the RSS with the models
loaded, on CUDA the peak allocated memory minus what the loaded models hold. Figures are
printed and written to ``--out`` (JSON lines, a Markdown table, the curve's PNG); nothing is
asserted: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
TESTS_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from reference_loops import UNET_CONFIGS, run_json_command  # noqa: E402

MODES = ("ti", "lora", "full")
LABEL = {"ti": "Textual Inversion", "lora": "DreamBooth LoRA (rank 4)", "full": "DreamBooth full"}
CURVE_RESOLUTIONS = (256, 512, 768)
CURVE_BATCHES = (1, 2, 4)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else float("nan")
    return f"{os.cpu_count()}-core {cpu}, {memory:.0f} GiB"


def _checkpoint(unet: str, timeout: float) -> Path:
    """The cached checkpoint for ``unet`` (built in a process of its own on first use, so no
    measured process pays for it)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import reference_loops; print(reference_loops.default_checkpoint(unet=sys.argv[2]))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(BENCH_DIR), unet], capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"building the {unet} checkpoint failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def measure(mode: str, resolution: int, batch: int, args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    common = [
        "--resolution",
        str(resolution),
        "--batch-size",
        str(batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--seed",
        str(args.seed),
        "--device",
        args.device,
        "--checkpoint",
        str(checkpoint),
        "--unet",
        args.unet,
    ]
    if args.prior and mode != "ti":
        common.append("--prior")
    if args.gradient_checkpointing and mode != "ti":
        common.append("--gradient-checkpointing")
    pack = [sys.executable, str(BENCH_DIR / "pack_side.py"), "--mode", mode, *common, "--precision", args.precision]
    if args.no_full_bf16:
        pack.append("--no-full-bf16")
    if args.no_fused_backward:
        pack.append("--no-fused-backward")
    reference = [
        sys.executable,
        str(BENCH_DIR / "reference_loops.py"),
        *(["--ti"] if mode == "ti" else ["--db", "--mode", mode]),
        *common,
        "--mixed-precision",
        args.reference_precision,
    ]
    ours = run_json_command(pack, args.timeout)
    theirs = run_json_command(reference, args.timeout)
    return {"mode": mode, "resolution": resolution, "batch_size": batch, "unet": args.unet, "pack": ours, "reference": theirs}


def memory_added(side: dict[str, Any]) -> float | None:
    return side.get("train_overhead_cuda_peak_mb", side.get("train_overhead_peak_rss_mb"))


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["configuration", "pack s/step", "reference s/step", "speed-up", "pack adds MB", "reference adds MB", "memory"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        ours, ref = row["pack"], row["reference"]
        mem_ours, mem_ref = memory_added(ours), memory_added(ref)
        config = f"{LABEL[row['mode']]}, {row['unet']}, {row['resolution']}², batch {row['batch_size']}"
        speed = ref["s_per_step"] / ours["s_per_step"] if ours.get("s_per_step") else float("nan")
        share = f"{100 * mem_ours / mem_ref:.0f} %" if mem_ours is not None and mem_ref else "–"
        lines.append(f"| {config} | {ours['s_per_step']:.3f} | {ref['s_per_step']:.3f} | {speed:.2f}× | {mem_ours} | {mem_ref} | {share} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], target: Path) -> Path:
    """Step time and memory against pixels per step (resolution² × batch), pack and reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows}, key=MODES.index)
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.6 * len(modes)), squeeze=False)
    for line, mode in enumerate(modes):
        selected = sorted((r for r in rows if r["mode"] == mode), key=lambda r: (r["batch_size"], r["resolution"]))
        for column, (what, pick, unit) in enumerate(
            (("step time", lambda s: s["s_per_step"], "s/step"), ("memory training adds", memory_added, "MB"))
        ):
            ax = axes[line][column]
            for side, style in (("pack", "-o"), ("reference", "--s")):
                for number, batch in enumerate(sorted({r["batch_size"] for r in selected})):
                    points = [(r["resolution"] ** 2 * batch / 1e6, pick(r[side])) for r in selected if r["batch_size"] == batch]
                    ax.plot(*zip(*points, strict=True), style, color=f"C{number}", label=f"{side}, batch {batch}")
            ax.set_xlabel("megapixels per step (resolution² × batch)")
            ax.set_ylabel(unit)
            ax.set_title(f"{LABEL[mode]}: {what}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"comfyui-personalize vs diffusers reference, {rows[0]['unet']} UNet, {machine()}", fontsize=9)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    return target


def add_run_arguments(p: argparse.ArgumentParser, steps: int, steps_help: str) -> None:
    """What every benchmark here asks: which modes, model, resolution, batch and steps."""
    p.add_argument("--mode", choices=(*MODES, "all"), default="all")
    p.add_argument("--unet", choices=tuple(UNET_CONFIGS), default="sd15-full")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=steps, help=steps_help)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(p, steps=2, steps_help="timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", help="the pack's precision setting")
    p.add_argument(
        "--reference-precision",
        choices=("no", "fp16", "bf16"),
        default="no",
        help="the reference's mixed precision, as accelerate's --mixed_precision (GPU runs: fp16)",
    )
    p.add_argument("--prior", action="store_true", help="DreamBooth with prior preservation")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-full-bf16", action="store_true")
    p.add_argument("--no-fused-backward", action="store_true")
    p.add_argument("--curve", action="store_true", help="step resolution and batch; plot how time and memory grow")
    p.add_argument("--resolutions", default=",".join(map(str, CURVE_RESOLUTIONS)))
    p.add_argument("--batches", default=",".join(map(str, CURVE_BATCHES)))
    p.add_argument(
        "--quick", action="store_true", help="every mode on the tiny UNet at 64 px, one timed step (CI: keeps the benchmark running)"
    )
    p.add_argument("--out", type=Path, default=TESTS_DIR / "artifacts" / "benchmarks")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument(
        "--replot",
        type=Path,
        nargs="+",
        metavar="JSONL",
        help="measure nothing: table and plot of earlier runs' figures together (e.g. a curve measured in parts)",
    )
    args = p.parse_args(argv)
    if args.replot:
        rows = [json.loads(line) for path in args.replot for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        print(table(rows))
        print(f"plot: {plot(rows, args.out / args.replot[0].name.replace('.jsonl', '-all.png'))}")
        return 0
    if args.quick:
        args.unet, args.resolution, args.steps, args.warmup, args.mode = "tiny", 64, 1, 1, "all"
    modes = MODES if args.mode == "all" else (args.mode,)
    grid = (
        [(r, b) for b in map(int, args.batches.split(",")) for r in map(int, args.resolutions.split(","))]
        if args.curve
        else [(args.resolution, args.batch_size)]
    )
    checkpoint = _checkpoint(args.unet, args.timeout)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = args.out / f"{'curve' if args.curve else 'figures'}-{args.unet}-{stamp}.jsonl"
    rows = []
    print(f"machine: {machine()}; device {args.device}; checkpoint {checkpoint.name}", flush=True)
    for mode in modes:
        for resolution, batch in grid:
            row = measure(mode, resolution, batch, args, checkpoint)
            rows.append(row)
            with log.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(row) + "\n")
            print(table([row]).splitlines()[-1], flush=True)
    text = table(rows)
    (args.out / log.name.replace(".jsonl", ".md")).write_text(f"Machine: {machine()}; device {args.device}\n\n{text}\n", encoding="utf-8")
    print(text)
    if args.curve:
        print(f"plot: {plot(rows, args.out / log.name.replace('.jsonl', '.png'))}")
    print(f"figures: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
