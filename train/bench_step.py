"""Seconds per training step and peak memory on the default SmolLM2 backbone, one process per measurement.

    python train/bench_step.py                # writes train/results/bench_step.json and prints a table

Modes, each on the same batch of SNLI rows (32 pairs, then 32 triplets), timed after one warm-up step. Every mode
runs once per round (default 3 rounds of 3 steps) in a fresh process; s/step is the median over all rounds' steps,
and each ratio is taken within a round and reported as the median over rounds, because this machine's speed drifts
by up to 1.5x over minutes and a single sequential pass can put the forward and the fast step in different phases:
  forward  encoder forward of every column under no_grad (the cost of merely reading the texts)
  full     SPT step, backprop through all tokens (full pass over [text | soft tokens])
  fast     SPT step on the causal fast path (text under no_grad with a KV cache, then K soft tokens with grad)
  lora     contrastive LoRA step (peft, r=16 on q,k,v,o; last-token pooling, no soft tokens)
  fast-columns  the fast step with one forward per column (sentence-transformers' own MultipleNegativesRankingLoss;
           the step as training ran it before MergedColumnsMNRL, which `fast` uses: all columns in one forward)
  fast-recompute  the fast step with `recompute_mlp` (the soft pass's MLPs keep only their input for backward and
           recompute gate and up there: less memory, more time)
  deep-suffix  fast-path step of method deep-suffix (the soft tokens plus per-layer offsets at their positions)
  prompt   step of method prompt (the soft tokens before the text: a full pass, read at the text's last token)
  prefix   step of method prefix (peft prefix tuning, K keys/values per layer, under the PromptEOL template, whose
           ~10 template tokens per text this mode also reads)
Memory, read from /proc/self/status around the timed steps (the peak is reset with /proc/self/clear_refs first):
  peak_rss_mb   the process's peak resident memory during the steps, model weights and runtime included
  step_mem_mb   that peak minus the resident memory just before the first step: what the step itself adds
                (activations kept for backward, gradients, optimiser state); the weights are the same in every mode

`--texts wiki` swaps the short SNLI sentences for longer ones (the first 32 Wikipedia lines of 30-60 words, as
pairs) to show how the ratios depend on text length: the fast path costs about text + 2K token-passes (the soft
tokens' forward and their input-gradient backward; frozen weights need no weight gradients) against text + K for the
no-grad forward.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ["forward", "full", "fast", "fast-columns", "fast-recompute", "lora", "deep-suffix", "prompt", "prefix"]
BASE_MODES = ["forward", "full", "fast", "lora"]  # the ratios of the fast path's requirements
KINDS = {"pairs": ["anchor", "positive"], "triplets": ["anchor", "positive", "negative"]}


def batch_rows(texts: str, batch_size: int):
    from spt_embed.training.data import load_pairs

    if texts == "snli":
        return load_pairs("snli-triplets").select(range(batch_size))
    wiki = load_pairs("wiki-unsup")
    keep = [i for i, text in enumerate(wiki["anchor"]) if 30 <= len(text.split()) <= 60][:batch_size]
    return wiki.select(keep)


def memory_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS now, VmHWM the peak since the last reset) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def build_step(mode: str, kind: str, batch_size: int, num_tokens: int, texts: str, pack_tokens: int,
               device: str = "cpu", backbone: str = "smollm2-135m"):
    """The model, batch features, trained parameters and one-step function of `mode` (also used by profile_step.py).
    The step's parts carry record_function scopes, which name them in a torch.profiler trace."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from torch.profiler import record_function

    import spt_embed
    from spt_embed.training.losses import MergedColumnsMNRL
    torch.manual_seed(0)
    rows = batch_rows(texts, batch_size)
    if mode == "prefix":
        from spt_embed.model.baselines import prefix_baseline_encoder

        model = prefix_baseline_encoder(backbone, num_tokens=num_tokens, init_text='" means in one word:"',
                                        device=device)
        module = model[0]
    else:
        model = spt_embed.SuffixPromptEncoder.from_backbone(
            backbone,
            num_tokens=num_tokens,
            method="deep-suffix" if mode == "deep-suffix" else "suffix",
            placement="prefix" if mode == "prompt" else "suffix",
            device=device,
        )
        module = model.prompt_module
        module.pack_tokens = pack_tokens
    features = [
        {key: value.to(device) for key, value in module.preprocess(rows[column]).items()} for column in KINDS[kind]
    ]
    # Training's loss: all columns in one forward where the fast path runs them, the parent's forward elsewhere.
    loss_fn = (MultipleNegativesRankingLoss if mode == "fast-columns" else MergedColumnsMNRL)(model, scale=20.0)
    if mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        module.soft_prompt.requires_grad_(False)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        module.backbone = inject_adapter_in_model(lora, module.backbone).to(device)
        module.forward_path = spt_embed.ForwardPath.FULL
    elif mode in ("full", "fast", "fast-columns"):
        module.forward_path = spt_embed.ForwardPath(mode.removesuffix("-columns"))
    elif mode == "fast-recompute":
        module.forward_path = spt_embed.ForwardPath.FAST
        module.recompute_mlp = True
    elif mode == "deep-suffix":
        module.forward_path = spt_embed.ForwardPath.FAST
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step() -> None:
        if mode == "forward":
            with torch.no_grad():
                for feats in features:
                    module(dict(feats))
            return
        optimizer.zero_grad()
        with record_function("step.forward_and_loss"):
            loss = loss_fn([dict(f) for f in features], None)
        with record_function("step.backward"):
            loss.backward()
        with record_function("step.optimizer"):
            optimizer.step()

    return step, model, features, params


def child(mode: str, kind: str, batch_size: int, steps: int, num_tokens: int, texts: str, pack_tokens: int,
          device: str = "cpu", backbone: str = "smollm2-135m") -> dict:
    import torch

    step, _, features, params = build_step(mode, kind, batch_size, num_tokens, texts, pack_tokens, device, backbone)
    cuda = device.startswith("cuda")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    rss_before = memory_mb("VmRSS")
    step()  # warm-up
    if cuda:  # on a GPU the step's memory is the device's: allocated bytes, peak reset after the warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated() / 2**20
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()  # kernels run asynchronously: time them to the end
        times.append(time.perf_counter() - start)
    lengths = [int(f["attention_mask"].sum()) for f in features]
    padded = [f["attention_mask"].numel() for f in features]
    if cuda:
        peak, before = torch.cuda.max_memory_allocated() / 2**20, cuda_before
    else:
        peak, before = memory_mb("VmHWM"), rss_before
    return {
        "mode": mode,
        "kind": kind,
        "device": device,
        "median_s": statistics.median(times),
        "steps_s": times,
        "peak_rss_mb": peak,  # on CUDA: the device's peak allocated memory
        "rss_before_steps_mb": before,
        "step_mem_mb": peak - before,
        "trainable_params": sum(p.numel() for p in params),
        "text_tokens": sum(lengths),
        "padded_text_tokens": sum(padded),
    }


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def merge_rounds(rounds: list[dict]) -> dict:
    """One mode's result over all rounds: the median of every timed step, and the largest memory peak."""
    steps = [t for r in rounds for t in r["steps_s"]]
    worst = max(rounds, key=lambda r: r["step_mem_mb"])
    return {
        **{k: v for k, v in rounds[0].items() if k not in ("median_s", "steps_s")},
        "median_s": statistics.median(steps),
        "steps_s": steps,
        "round_medians_s": [r["median_s"] for r in rounds],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
        "rss_before_steps_mb": worst["rss_before_steps_mb"],
        "step_mem_mb": worst["step_mem_mb"],
    }


def compute_ratios(merged: dict, kinds: list[str], modes: list[str]) -> dict:
    """The ratios of the modes that ran, per batch kind. A time ratio is taken within each round (its modes ran
    minutes apart, so the machine's speed drifts little between them) and the median over rounds is reported; the
    memory ratios use the largest peaks. Every ratio needs only its own two modes."""
    rounds = {key: row["round_medians_s"] for key, row in merged.items()}
    pairs = [("fast_over_forward", "fast", "forward"), ("full_over_fast", "full", "fast"),
             ("lora_over_fast", "lora", "fast"), ("fast_recompute_over_forward", "fast-recompute", "forward"),
             ("fast_columns_over_forward", "fast-columns", "forward")]
    # Each method's step against the no-grad forward.
    pairs += [(f"{mode.replace('-', '_')}_over_forward", mode, "forward") for mode in ("deep-suffix", "prompt", "prefix")]
    ratios = {}
    for kind in kinds:
        per_round = {
            name: [top / bottom for top, bottom in zip(rounds[kind, a], rounds[kind, b])]
            for name, a, b in pairs if a in modes and b in modes
        }
        memory = {}
        if "full" in modes:
            full = merged[kind, "full"]
            memory = {f"{mode.replace('-', '_')}_mem_over_full": merged[kind, mode]["step_mem_mb"] / full["step_mem_mb"]
                      for mode in ("fast", "fast-columns", "fast-recompute") if mode in modes}
            if "fast" in modes:
                memory["fast_peak_rss_over_full"] = merged[kind, "fast"]["peak_rss_mb"] / full["peak_rss_mb"]
        if not per_round and not memory:
            continue
        ratios[kind] = {
            **{name: statistics.median(values) for name, values in per_round.items()},
            **memory,
            **{f"{name}_per_round": values for name, values in per_round.items()},
        }
        if set(BASE_MODES) <= set(modes):
            ratios[kind]["meets_requirements"] = (
                ratios[kind]["fast_over_forward"] <= 1.3
                and ratios[kind]["full_over_fast"] >= 1.5
                and ratios[kind]["lora_over_fast"] >= 1.5
                and ratios[kind]["fast_mem_over_full"] <= 0.5
            )
        if "deep_suffix_over_forward" in ratios[kind]:  # issue 16: a deep-suffix step costs <= 1.3 no-grad forwards
            ratios[kind]["deep_suffix_meets_target"] = ratios[kind]["deep_suffix_over_forward"] <= 1.3
    return ratios


def ratios_of_file(path: Path) -> dict:
    """Recompute the `ratios` of a results file from its per-round medians (for files written before a ratio
    existed), and write them back."""
    report = json.loads(path.read_text())
    merged = {(row["kind"], row["mode"]): row for row in report["results"]}
    kinds = list(dict.fromkeys(row["kind"] for row in report["results"]))
    modes = list(dict.fromkeys(row["mode"] for row in report["results"]))
    report["ratios"] = compute_ratios(merged, kinds, modes)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report["ratios"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps after one warm-up, per round")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="times every mode is run, each time in a fresh process")
    parser.add_argument("--num-tokens", type=int, default=16)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--pack-tokens", type=int, default=None, help="tokens per packed row in the fast path's text "
                        "pass (default: the module's)")
    parser.add_argument("--texts", default="snli", choices=["snli", "wiki"], help="short SNLI or long wiki texts")
    parser.add_argument("--output", default=None, help="default: train/results/bench_step[_wiki][_cuda].json")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: on CUDA the memory columns are the "
                        "device's allocated memory (torch.cuda.max_memory_allocated)")
    parser.add_argument("--backbone", default="smollm2-135m", help="backbone spec (default: the bundled SmolLM2)")
    parser.add_argument("--ratios-of", type=Path, default=None, metavar="JSON",
                        help="measure nothing: recompute the ratios of a results file from its per-round medians")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ratios_of:
        print(json.dumps(ratios_of_file(args.ratios_of), indent=2))
        return
    if args.child:
        result = child(*args.child, args.batch_size, args.steps, args.num_tokens, args.texts, args.pack_tokens,
                       args.device, args.backbone)
        print("RESULT " + json.dumps(result))
        return

    import torch

    if args.texts == "wiki" and "triplets" in args.kinds:
        args.kinds = ["pairs"]  # wiki lines have no hard negatives
    from spt_embed.hardware import cpu_summary
    from spt_embed.model.module import SuffixPromptModule

    args.pack_tokens = args.pack_tokens or SuffixPromptModule.DEFAULT_PACK_TOKENS
    suffix = "" if args.texts == "snli" else f"_{args.texts}"
    suffix += "" if args.pack_tokens == SuffixPromptModule.DEFAULT_PACK_TOKENS else f"_pack{args.pack_tokens}"
    suffix += "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    args.output = args.output or f"train/results/bench_step{suffix}.json"
    common = ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--num-tokens", str(args.num_tokens),
              "--texts", args.texts, "--pack-tokens", str(args.pack_tokens), "--device", args.device,
              "--backbone", args.backbone]
    runs: dict[tuple[str, str], list[dict]] = {(kind, mode): [] for kind in args.kinds for mode in args.modes}
    for round_ in range(args.rounds):
        for kind, mode in runs:
            proc = subprocess.run([sys.executable, __file__, "--child", mode, kind, *common],
                                  capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"{mode}/{kind} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(lines[-1][len("RESULT "):])
            runs[kind, mode].append(r)
            print(f"round {round_ + 1}/{args.rounds} {kind:8s} {mode:8s} {r['median_s']:7.2f} s/step  "
                  f"peak RSS {r['peak_rss_mb'] / 1024:5.2f} GB  step memory {r['step_mem_mb'] / 1024:5.2f} GB  "
                  f"text tokens {r['text_tokens']} ({r['padded_text_tokens']} padded)", flush=True)
    merged = {key: merge_rounds(rs) for key, rs in runs.items()}
    results = list(merged.values())

    ratios = compute_ratios(merged, args.kinds, args.modes)
    report = {
        "command": "python train/bench_step.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": torch.get_num_threads(), **cpu_summary(), "platform": platform.platform(),
                    "torch": torch.__version__,
                    "device": args.device,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "batch_size": args.batch_size,
        "texts": args.texts,
        "pack_tokens": args.pack_tokens,
        "num_tokens": args.num_tokens,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "results": results,
        "ratios": ratios,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| batch | mode | s/step (median) | step memory | peak RSS |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {args.batch_size} {r['kind']} | {r['mode']} | {r['median_s']:.2f} | {r['step_mem_mb'] / 1024:.2f} GB "
              f"| {r['peak_rss_mb'] / 1024:.2f} GB |")
    for kind, ratio in ratios.items():
        print(f"{kind}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items() if isinstance(v, float))
              + (f", meets_requirements {ratio['meets_requirements']}" if "meets_requirements" in ratio else ""))
        print("  per round: fast/forward " + " ".join(f"{v:.2f}" for v in ratio["fast_over_forward_per_round"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
