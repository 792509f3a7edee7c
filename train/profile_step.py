"""Where a training step's time and memory go: torch.profiler over steps of train/bench_step.py's modes, and a tally
of the tensors autograd saves for backward, grouped by shape.

    python train/profile_step.py                       # fast and forward, 32 pairs; writes train/results/profile_step.json
    python train/profile_step.py --modes fast full --kind triplets

For each mode (the batch, model, optimiser and step of bench_step.py's build_step), after one warm-up step:
  scopes        the step's parts (forward and loss, backward, optimiser) and the fast path's passes (text pass,
                unpacking of its keys/values, soft pass), inclusive CPU time per step and share of the step
  ops           the top `--top` operators by self CPU time over `--steps` profiled steps (torch.profiler), with their
                call counts and the memory they allocated themselves (profile_memory)
  ops_by_scope  per scope (the innermost one an operator ran in), its top operators by input shape: the M of a
                matrix product is the number of tokens it ran on, so the text and soft passes compare per token
  saved         the tensors saved for backward during one step, by autograd's saved_tensors_hooks: distinct storages
                only (views of one tensor count once), grouped by (shape, dtype, parameter or not) with their total
                MB, largest first; the frozen weights that linear layers keep for the input gradient are listed but
                are the model's own memory, so saved_activations_mb counts the rest
Times under a profiler are inflated and this machine's speed drifts, so the operators' shares are what to read here;
bench_step.py gives the step times and memory peaks themselves.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import KINDS, MODES, build_step  # noqa: E402


def saved_tensors(step, model) -> list[dict]:
    """Distinct storages saved for backward during one step, grouped by (shape, dtype, whether it is a parameter:
    frozen weights are saved too, for the input gradient, but they are the model's own memory, not the step's)."""
    import torch

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    groups: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            key = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), storage.data_ptr() in parameters)
            groups[key][0] += 1
            groups[key][1] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    rows = [{"shape": list(shape), "dtype": dtype, "parameter": is_param, "count": n, "mb": round(size / 2**20, 2)}
            for (shape, dtype, is_param), (n, size) in groups.items()]
    return sorted(rows, key=lambda row: -row["mb"])


SCOPES = ("step.", "spt_embed.")


def _scope(event) -> str:
    """The innermost named scope (a fast-path pass, else a part of the step) that an operator ran in."""
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith(SCOPES):
        parent = parent.cpu_parent
    return parent.name if parent is not None else "(none)"


def ops_by_scope(events, steps: int, top: int) -> dict[str, list[dict]]:
    """Per named scope, its top operators by self CPU time with their input shapes: where the text pass and the soft
    pass each spend their matrix products, and on how many rows (the M of an mm is the tokens it ran on)."""
    groups: dict[tuple, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in events:
        if event.name.startswith(SCOPES):
            continue
        key = (_scope(event), event.name, str(event.input_shapes))
        groups[key][0] += 1
        groups[key][1] += event.self_cpu_time_total
    scopes: dict[str, list[dict]] = defaultdict(list)
    for (scope, name, shapes), (count, micros) in sorted(groups.items(), key=lambda item: -item[1][1]):
        if len(scopes[scope]) < top:
            scopes[scope].append({"op": name, "shapes": shapes, "calls": count // steps,
                                  "self_ms_per_step": round(micros / 1000 / steps, 1)})
    return dict(scopes)


def operators(step, steps: int, top: int) -> tuple[list[dict], list[dict], dict[str, list[dict]]]:
    """The top operators by self CPU time, the named scopes (the step's parts, the fast path's passes) with their
    inclusive CPU time, both as shares of the profiled steps' total self CPU time, and each scope's top operators
    by input shape."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        for _ in range(steps):
            step()
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    scopes = [{"scope": e.key, "calls": e.count, "ms_per_step": round(e.cpu_time_total / 1000 / steps, 1),
               "share": round(e.cpu_time_total / total, 3)}
              for e in averages if e.key.startswith(("step.", "spt_embed."))]
    events = sorted((e for e in averages if not e.key.startswith(("step.", "spt_embed."))),
                    key=lambda e: -e.self_cpu_time_total)
    ops = [{"op": e.key, "calls": e.count, "self_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 1),
            "share": round(e.self_cpu_time_total / total, 3),
            "self_alloc_mb_per_step": round(e.self_cpu_memory_usage / 2**20 / steps, 1)} for e in events[:top]]
    return ops, sorted(scopes, key=lambda row: row["scope"]), ops_by_scope(prof.events(), steps, top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["fast", "forward"], choices=MODES)
    parser.add_argument("--kind", choices=sorted(KINDS), default="pairs")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps per mode (default 2)")
    parser.add_argument("--top", type=int, default=20, help="operators to keep per mode (default 20)")
    parser.add_argument("--num-tokens", type=int, default=16)
    parser.add_argument("--pack-tokens", type=int, default=64)
    parser.add_argument("--out", default="train/results/profile_step.json")
    args = parser.parse_args()

    import torch

    record = {"command": "python train/profile_step.py " + " ".join(sys.argv[1:]),
              "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
              "kind": args.kind, "num_tokens": args.num_tokens, "pack_tokens": args.pack_tokens, "modes": {}}
    for mode in args.modes:
        step, model, _, _ = build_step(mode, args.kind, 32, args.num_tokens, "snli", args.pack_tokens)
        step()  # warm-up
        ops, scopes, by_scope = operators(step, args.steps, args.top)
        result = {"scopes": scopes, "ops": ops, "ops_by_scope": by_scope}
        if mode != "forward":
            result["saved"] = saved_tensors(step, model)
            # what the step adds: activations only (frozen weights saved for backward are the model's memory)
            result["saved_activations_mb"] = round(sum(r["mb"] for r in result["saved"] if not r["parameter"]), 1)
        record["modes"][mode] = result
        print(f"\n== {mode} ({args.kind}) ==")
        for row in scopes:
            print(f"  {row['scope']:40s} {row['calls']:6d} calls {row['ms_per_step']:9.1f} ms/step {row['share']:6.1%}")
        for row in result["ops"]:
            print(f"  {row['op'][:40]:40s} {row['calls']:6d} calls {row['self_ms_per_step']:9.1f} ms/step "
                  f"{row['share']:6.1%} {row['self_alloc_mb_per_step']:8.1f} MB alloc/step")
        for scope, rows in by_scope.items():
            print(f"  in {scope}:")
            for row in rows[:8]:
                print(f"    {row['op'][:34]:34s} {row['shapes'][:60]:60s} {row['calls']:5d} calls "
                      f"{row['self_ms_per_step']:8.1f} ms/step")
        if "saved" in result:
            print(f"  activations saved for backward: {result['saved_activations_mb']} MB; largest groups:")
            for row in [r for r in result["saved"] if not r["parameter"]][:12]:
                print(f"    {str(row['shape']):24s} {row['dtype']:9s} x{row['count']:4d} {row['mb']:8.1f} MB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
