"""NVFP4 conversion benchmark (BF16 -> NVFP4 weights) on a synthetic checkpoint with real names and shapes.

    python benches/bench_nvfp4_build.py --family wan --blocks 4 [--modes cold,warm] [--keep]

Generates the synthetic BF16 checkpoint (``dqfast.synth``; Wan2.2-A14B widths, 40 blocks = 14B),
then runs, each in a fresh subprocess (peak RSS from that child's ``wait4`` rusage):
  (a) disk limit: reading the inputs + writing an output-sized file of random bytes + fdatasync, the
      faster of page cache and O_DIRECT (``bench_fp8_build.disk_limit``);
  (b) naive torch + safetensors NVFP4 converter (benches/naive_nvfp4_convert.py: ModelOpt's
      definition in plain torch, tests/nvfp4_reference.py, shard by shard);
  (c) dqfast ``build_nvfp4_transformer(from_bf16=True, model_type="none")`` — the same work as (b);
      both outputs are compared tensor by tensor and must be byte-identical; ``dqfast-buffered``
      is the same build with ``io="buffered"`` (memory map + page cache, no direct I/O).
Writes JSON to benches/results/nvfp4_build_<family><blocks>_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_fp8_build import (  # noqa: E402
    _compare_outputs,
    _dir_bytes,
    _drop_caches,
    _run,
    add_common_args,
    prepare_mode,
    print_worker_result,
    save_results,
    summarize,
    synthetic_inputs,
    time_limit,
)

ACT_AMAX = 16.0
TOOLS = ("naive", "dqfast", "dqfast-buffered")


def _worker(kind: str, args: dict[str, Any]) -> None:
    if kind == "naive":
        from naive_nvfp4_convert import convert

        convert(Path(args["src"]), Path(args["dst"]), ACT_AMAX)
        print_worker_result()
        return
    from dqfast.nvfp4 import build_nvfp4_transformer

    r = build_nvfp4_transformer(
        args["dst"],
        base_transformer_dir=args["src"],
        from_bf16=True,
        model_type="none",
        activation_amax=ACT_AMAX,
        fsync=False,
        max_shard_size=args["shard"],
        threads=args["threads"],
        target="none",  # the conversion alone, as measured before targets existed
        io="buffered" if kind == "dqfast-buffered" else "auto",
    )
    print_worker_result(r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--modes", default="cold,warm", help="cold (page cache dropped first) and/or warm")
    ap.add_argument("--tools", default="limit,naive,dqfast,dqfast-buffered")
    a = ap.parse_args()

    work = a.workdir / f"nvfp4-{a.family}-{a.blocks}"
    src_root = work / "src"
    base, in_bytes, in_files, gen_s = synthetic_inputs(
        a, src_root, src_root / "base" / "transformer" / "config.json", modelopt_fp8_export=False
    )

    tools = a.tools.split(",")
    modes = a.modes.split(",")
    if "cold" in modes and not _drop_caches():
        print("cannot drop caches (not root): cold runs skipped", flush=True)
        modes = [m for m in modes if m != "cold"]
    results: dict[str, dict[str, Any]] = {}
    wargs = {"src": str(base), "shard": a.out_shard, "threads": a.threads}
    outs = {t: work / f"out-{t}" for t in TOOLS}
    for mode in modes:
        for tool in [t for t in tools if t in TOOLS]:
            shutil.rmtree(outs[tool], ignore_errors=True)
            prepare_mode(mode, in_files)
            r = _run([sys.executable, __file__, "_worker", tool, json.dumps({**wargs, "dst": str(outs[tool])})])
            r["out_bytes"] = _dir_bytes(outs[tool])
            results[f"{tool}/{mode}"] = r
            print(
                f"  {tool:15s} {mode:4s} {r['wall_s']:7.2f} s  {in_bytes / r['wall_s'] / 1e9:5.2f} GB/s  "
                f"peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB  out {r['out_bytes'] / 1e9:.2f} GB",
                flush=True,
            )
        if "limit" in tools:
            out_size = results.get(f"dqfast/{mode}", {}).get("out_bytes") or int(in_bytes * 0.29)
            results[f"limit/{mode}"] = time_limit(mode, in_files, in_bytes, out_size, work, 15)

    exact = None
    if outs["naive"].exists() and outs["dqfast"].exists():
        exact = _compare_outputs(outs["naive"], outs["dqfast"])
        print(
            f"bit-exact naive vs dqfast: {exact['bit_exact']} ({exact['tensors']} tensors, "
            f"{exact['tensors_differing']} differ {exact['first_differing']}, {exact['bytes_differing']} bytes differ)"
        )

    rows = summarize(results, in_bytes, width=15)

    save_results(
        f"nvfp4_build_{a.family}{a.blocks}",
        {
            "format": "nvfp4",
            "family": a.family,
            "blocks": a.blocks,
            "input_bytes": in_bytes,
            "input_shards": len(in_files),
            "generate_s": gen_s,
            "modes": modes,
            "threads": a.threads,
            "activation_amax": ACT_AMAX,
            "rows": rows,
            "bit_exact_naive_vs_dqfast": exact,
        },
    )
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "_worker":
        _worker(sys.argv[2], json.loads(sys.argv[3]))
    else:
        main()
