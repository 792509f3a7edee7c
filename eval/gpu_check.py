"""GPU readiness check: everything that must hold on CUDA, in one run of a few minutes, into one JSON file.

    make gpu-check                                # = python eval/gpu_check.py; writes train/results/gpu_check.json
    python eval/gpu_check.py --device cpu --backbone <tiny model dir> --steps 2 --skip bench_step   # smoke test

Sections (each one timed; a failing section is recorded with its error and the others still run):
  environment   torch, CUDA, the GPU's name and capability, native bfloat16
  fast_vs_full  the fast training path against the full pass on the device, in float32 and bfloat16: loss and
                embeddings, and the relative error of every trained tensor's gradient (a suffix and a deep suffix)
  train         `--steps` optimiser steps of the recipe (train/configs/smollm2-nli.yaml) on the device, in bfloat16
                mixed precision (no dev evaluation): seconds per step and the loss falling
  bench_step    train/bench_step.py on the device (one round: forward, full, fast, lora), in its own JSON beside this
  encode        texts per second of the recipe's encoder on STS-B dev sentences, float32 and bfloat16
`ok` per section says whether its checks passed; the file's `ok` is all of them.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["environment", "fast_vs_full", "train", "bench_step", "encode"]
# Tolerances of the fast == full check: float32 as the CPU tests; bfloat16 keeps 8 bits of mantissa, so the two
# paths' different orders of summation differ at about 1e-2.
TOLERANCE = {"float32": {"loss": 1e-5, "grad": 1e-4}, "bfloat16": {"loss": 3e-2, "grad": 5e-2}}


def environment(args) -> dict:
    import torch

    from spt_embed.model.dtypes import native_bf16

    cuda = torch.cuda.is_available()
    info = {
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda_available": cuda,
        "device": args.device,
        "cpu_native_bf16": native_bf16(),
    }
    if cuda:
        info.update(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                    cuda=torch.version.cuda, gpu_bf16=torch.cuda.is_bf16_supported())
    info["ok"] = cuda or not args.device.startswith("cuda")
    return info


def _batch(rows: int):
    from spt_embed.training.data import load_pairs

    data = load_pairs("snli-triplets").select(range(rows))
    return data["anchor"], data["positive"], data["negative"]


def fast_vs_full(args) -> dict:
    import torch
    import torch.nn.functional as F

    import spt_embed

    anchors, positives, negatives = _batch(16)
    results = {}
    for method in ("suffix", "deep-suffix"):
        for dtype_name in ("float32", "bfloat16"):
            dtype = getattr(torch, dtype_name)
            model = spt_embed.SuffixPromptEncoder.from_backbone(
                args.backbone, num_tokens=16, method=method, dtype=dtype, device=args.device
            )
            module = model.prompt_module
            if method == "deep-suffix":
                with torch.no_grad():  # trained-looking offsets, so that they matter
                    module.layer_offsets.normal_(0, 0.01, generator=torch.Generator(module.layer_offsets.device))
            params = {name: p for name, p in module.named_parameters() if p.requires_grad}
            outcome = {}
            for path in (spt_embed.ForwardPath.FULL, spt_embed.ForwardPath.FAST):
                module.zero_grad()
                module.forward_path = path
                embed = [module(_to(module.preprocess(texts), args.device))["sentence_embedding"]
                         for texts in (anchors, positives, negatives)]
                a, p, n = (F.normalize(e.float(), dim=-1) for e in embed)
                loss = F.cross_entropy(a @ torch.cat([p, n]).T / 0.05, torch.arange(len(anchors), device=a.device))
                loss.backward()
                outcome[path] = (loss.item(), embed[0].detach().float(),
                                 {name: p.grad.detach().float().clone() for name, p in params.items()})
            (full_loss, full_emb, full_grads), (fast_loss, fast_emb, fast_grads) = outcome.values()
            grad_errors = {name: ((fast_grads[name] - full_grads[name]).norm() / full_grads[name].norm()).item()
                           for name in params}
            limits = TOLERANCE[dtype_name]
            loss_error = abs(fast_loss - full_loss) / max(1.0, abs(full_loss))
            results[f"{method}/{dtype_name}"] = {
                "loss_full": full_loss, "loss_fast": fast_loss, "loss_rel_error": loss_error,
                "embedding_max_abs_diff": (fast_emb - full_emb).abs().max().item(),
                "grad_rel_error": grad_errors,
                "ok": loss_error <= limits["loss"] and max(grad_errors.values()) <= limits["grad"],
            }
    results["tolerances"] = TOLERANCE
    results["ok"] = all(r["ok"] for key, r in results.items() if key != "tolerances")
    return results


def _to(features: dict, device: str) -> dict:
    return {key: value.to(device) if hasattr(value, "to") else value for key, value in features.items()}


def train(args) -> dict:
    import spt_embed

    with tempfile.TemporaryDirectory() as folder:
        config = spt_embed.TrainConfig.from_sources(
            str(REPO / "train/configs/smollm2-nli.yaml"), backbone=args.backbone, output=f"{folder}/run",
            max_steps=args.steps, eval_steps=0, save_steps=args.steps, logging_steps=1, warmup_steps=0, bf16=True,
        )
        start = time.perf_counter()
        spt_embed.train(config)
        seconds = time.perf_counter() - start
        records = [json.loads(line) for line in Path(f"{folder}/run/train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    return {
        "steps": args.steps, "bf16": True, "seconds_total": round(seconds, 2),
        "seconds_per_step": round(seconds / args.steps, 3), "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "ok": len(losses) >= 2 and all(loss == loss for loss in losses) and losses[-1] < losses[0],
    }


def bench_step(args) -> dict:
    out = Path(args.output).with_name(Path(args.output).stem + "_bench_step.json")
    command = [sys.executable, str(REPO / "train/bench_step.py"), "--device", args.device, "--rounds", "1",
               "--steps", "3", "--modes", "forward", "full", "fast", "lora", "--backbone", args.backbone,
               "--output", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_step failed:\n{proc.stderr[-3000:]}")
    report = json.loads(out.read_text())
    return {"file": str(out), "ratios": report["ratios"],
            "s_per_step": {f"{r['kind']}/{r['mode']}": r["median_s"] for r in report["results"]}, "ok": True}


def encode(args) -> dict:
    import torch

    import spt_embed
    from spt_embed.datafiles import load_sts

    texts = load_sts("dev")[0][:512]
    results = {}
    for dtype_name in ("float32", "bfloat16"):
        model = spt_embed.SuffixPromptEncoder.from_backbone(
            args.backbone, num_tokens=16, dtype=getattr(torch, dtype_name), device=args.device
        )
        model.encode(texts[:64], batch_size=64)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.encode(texts, batch_size=64)
        seconds = time.perf_counter() - start
        results[dtype_name] = {"texts": len(texts), "seconds": round(seconds, 3),
                               "texts_per_s": round(len(texts) / seconds, 1)}
    results["ok"] = True
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test of the script)")
    parser.add_argument("--backbone", default="smollm2-135m", help="backbone spec (default: the bundled SmolLM2)")
    parser.add_argument("--steps", type=int, default=20, help="training steps of the train section (default 20)")
    parser.add_argument("--skip", nargs="+", default=[], choices=SECTIONS, help="sections not to run")
    parser.add_argument("--output", default=str(REPO / "train/results/gpu_check.json"))
    args = parser.parse_args(argv)
    report: dict = {"command": "python eval/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    functions = {"environment": environment, "fast_vs_full": fast_vs_full, "train": train, "bench_step": bench_step,
                 "encode": encode}
    for name in SECTIONS:
        if name in args.skip:
            continue
        start = time.perf_counter()
        try:
            result = functions[name](args)
        except Exception as exc:  # a failing section is reported; the others still run
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - start, 1)
        report[name] = result
        print(f"{name:13s} {'ok' if result['ok'] else 'FAILED'}  ({result['seconds']} s)", flush=True)
        if name == "environment" and not result["ok"]:
            print("No CUDA device: nothing else to check (run with --device cpu for a smoke test).", flush=True)
            break
    report["ok"] = all(value["ok"] for key, value in report.items() if isinstance(value, dict))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}: {'all checks passed' if report['ok'] else 'some checks FAILED'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
