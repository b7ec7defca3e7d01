"""FP8 conversion benchmark on a synthetic checkpoint with real diffusers names and shapes.

    python benches/bench_fp8_build.py --family wan --blocks 4 [--keep] [--workdir /tmp/dqfast-bench]

Generates the synthetic checkpoint (Wan2.2-A14B widths; 40 blocks = the full 14B), then runs, each
in a fresh subprocess (peak RSS from that child's ``wait4`` rusage):
  (a) disk limit: reading the BF16 inputs + writing an output-sized file of random bytes with
      ``fdatasync`` (zeros are written unrealistically fast on this VM's disk), one after the
      other, measured two ways: through the page cache (``cat``, buffered write) and with
      O_DIRECT (``dd iflag=direct``, O_DIRECT write); the limit is the faster read + the faster write;
  (b) naive torch + safetensors converter (benches/naive_fp8_convert.py);
  (c) dqfast ``from_bf16`` per-tensor with ``activation_amax`` and ``model_type="none"`` (same
      work as (b); outputs must be byte-identical), with the default ``io="auto"`` (direct I/O)
      and, as ``dqfast-bf16-buffered``, with ``io="buffered"`` (memory map + page cache: the engine
      before direct I/O);
  (d) dqfast calibrated build from the synthetic ModelOpt export + amax sidecar + base;
  (e) peers, with ``--tools ...,dqfast-bf16-channel,llmc-w1,llmc-w2``: llm-compressor's
      ``model_free_ptq(scheme="FP8_DYNAMIC", device="cpu")`` with its default ``max_workers=1`` and
      with 2 workers, next to dqfast's calibration-free per-channel build (``dqfast-bf16-channel``:
      the same scheme, FP8 per-channel weights + dynamic per-token activations). llm-compressor runs
      from its own venv (``make peers-venv`` → ``.venv-peers``; ``--peers-python`` overrides).
Cold runs (page cache dropped before each) when ``/proc/sys/vm/drop_caches`` is writable, then
warm runs. Writes JSON to benches/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ACT_AMAX = 16.0


# --------------------------------------------------------------------------- workers (child side)


def print_worker_result(report: Any = None) -> None:
    """The worker's last stdout line, read by `_run`: its own peak RSS since exec (VmHWM, via
    ``dqfast._core.peak_rss_bytes``) and, for dqfast, the engine's report. Not ``wait4``'s
    ``ru_maxrss``: Linux carries the forking parent's high-water mark across exec into the
    child's, so a benchmark parent that generated the checkpoint in-process would set every
    child's figure."""
    from dqfast._core import peak_rss_bytes

    out: dict[str, Any] = {}
    if report is not None:
        out = {
            "engine_seconds": report.seconds,
            "engine_peak_rss": report.peak_rss_bytes,
            "threads": report.threads,
            "bytes_read": report.bytes_read,
            "bytes_read_direct": report.bytes_read_direct,
            "direct_writes": report.direct_writes,
            "bytes_written": report.bytes_written,
            "timings": report.timings,
        }
    print(json.dumps({**out, "peak_rss_bytes": peak_rss_bytes()}))


def _worker(kind: str, args: dict[str, Any]) -> None:
    if kind == "naive":
        sys.path.insert(0, str(HERE))
        from naive_fp8_convert import convert

        convert(Path(args["src"]), Path(args["dst"]), ACT_AMAX)
        print_worker_result()
        return
    if kind.startswith("llmc-"):
        _llmc_worker(int(kind.removeprefix("llmc-w")), args)
        return
    import dqfast

    if kind == "dqfast-bf16-channel":
        r = dqfast.build_fp8_transformer(
            args["dst"],
            base_transformer_dir=args["src"],
            from_bf16=True,
            weight_granularity="channel",
            model_type="none",
            fsync=args["fsync"],
            max_shard_size=args["shard"],
            threads=args["threads"],
            target="none",  # the conversion alone, as measured before targets existed
        )
    elif kind in ("dqfast-bf16", "dqfast-bf16-buffered"):
        r = dqfast.build_fp8_transformer(
            args["dst"],
            base_transformer_dir=args["src"],
            from_bf16=True,
            weight_granularity="tensor",
            activation_amax=ACT_AMAX,
            model_type="none",
            fsync=args["fsync"],
            max_shard_size=args["shard"],
            threads=args["threads"],
            target="none",  # the conversion alone, as measured before targets existed
            io="buffered" if kind.endswith("-buffered") else "auto",
        )
    elif kind == "dqfast-calib":
        r = dqfast.build_fp8_transformer(
            args["dst"],
            modelopt_hf_dir=args["export"],
            modelopt_backbone_ckpt=args["amax"],
            base_transformer_dir=args["src"],
            fsync=args["fsync"],
            max_shard_size=args["shard"],
            threads=args["threads"],
            target="none",  # the conversion alone, as measured before targets existed
        )
    else:
        raise SystemExit(f"unknown worker {kind}")
    print_worker_result(r)


def _llmc_view(base: Path, view: Path) -> tuple[Path, list[str]]:
    """llm-compressor looks for transformers' names (``model.safetensors`` or
    ``model.safetensors.index.json``): a directory of symlinks to the diffusers shards under those
    names, with an index. Nothing is copied, so the timed work is the same. Also the modules whose
    weight is not 2-D (norms, the Conv3d patch embedding), which it refuses instead of skipping."""
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    shards = sorted(base.glob("*.safetensors"))
    names = {s.name: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, s in enumerate(shards)}
    weight_map: dict[str, str] = {}
    not_2d: list[str] = []
    for s in shards:
        (view / names[s.name]).symlink_to(s.resolve())
        n = int.from_bytes(s.open("rb").read(8), "little")
        header = json.loads(s.open("rb").read(8 + n)[8:])
        weight_map.update({t: names[s.name] for t in header if t != "__metadata__"})
        not_2d += [t.removesuffix(".weight") for t, v in header.items() if t.endswith(".weight") and len(v["shape"]) != 2]
    (view / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(base / "config.json", view / "config.json")
    return view, not_2d


def _llmc_worker(workers: int, args: dict[str, Any]) -> None:
    """llm-compressor's calibration-free FP8 (runs under the peers venv's python)."""
    from llmcompressor import model_free_ptq

    view, not_2d = _llmc_view(Path(args["src"]), Path(args["dst"] + ".in"))
    model_free_ptq(view, args["dst"], scheme="FP8_DYNAMIC", ignore=not_2d, max_workers=workers, device="cpu")
    sys.path.insert(0, str(HERE.parent / "python"))  # the built extension, for the same VmHWM reader
    print_worker_result()


# --------------------------------------------------------------------------- parent side


def _run(cmd: list[str], **kw: Any) -> dict[str, Any]:
    """Run a child; wall time and its own peak RSS (wait4 rusage, per child)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    out = p.stdout.read() if p.stdout else b""
    err = p.stderr.read() if p.stderr else b""
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({p.returncode}): {err.decode()[-2000:]}")
    # wait4's figure includes the parent's RSS at fork (see print_worker_result); kept for reference, the
    # worker's own VmHWM (in its JSON line) replaces it.
    info: dict[str, Any] = {"wall_s": wall, "peak_rss_bytes": ru.ru_maxrss * 1024, "wait4_maxrss_bytes": ru.ru_maxrss * 1024}
    last = out.decode().strip().splitlines()[-1:] if out else []
    if last and last[0].startswith("{"):
        info.update(json.loads(last[0]))
    return info


def write_limit(path: Path, nbytes: int, direct: bool = False) -> float:
    """Seconds to write ``nbytes`` (a multiple of 16 MiB) of random (incompressible, non-zero)
    data and fdatasync it; ``direct``: with O_DIRECT from a page-aligned buffer.

    Not ``dd if=/dev/zero``: a virtual disk may write zeros more cheaply than real data (here,
    1 GiB back to back: 0.94 s of zeros, 1.32 s of random bytes), which would flatter the limit.
    """
    import mmap

    block = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT needs
    block.write(np.random.default_rng(0).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes())
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t
    path.unlink()
    return seconds


def disk_limit(in_files: list[str], out_bytes: int, work: Path) -> dict[str, Any]:
    """The physical limit: read the inputs, then write an output-sized file with fdatasync (one
    after the other), each both through the page cache (`cat`, buffered write) and with O_DIRECT
    (`dd iflag=direct`, O_DIRECT write). ``wall_s`` = the faster read + the faster write: the
    disk's limit, not one I/O path's. Call with the page cache dropped for a cold limit (O_DIRECT
    ignores the cache; warm, `cat` reads from it)."""
    nbytes = max(1, out_bytes // (16 << 20)) * (16 << 20)
    t = time.perf_counter()
    subprocess.run(["cat", *in_files], stdout=subprocess.DEVNULL, check=True)
    cached_read = time.perf_counter() - t
    cached_write = write_limit(work / "limit.out", nbytes)
    t = time.perf_counter()
    for f in in_files:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M", "iflag=direct", "status=none"], check=True)
    direct_read = time.perf_counter() - t
    direct_write = write_limit(work / "limit.out", nbytes, direct=True)
    # Reading and writing at the same time, as a streaming converter does (both O_DIRECT): on a
    # shared virtual disk this can be slower than the serial sum, whose writes the host may absorb
    # in its cache and flush later, after the measurement.
    t = time.perf_counter()
    reader = subprocess.Popen(["sh", "-c", " && ".join(f"dd if='{f}' of=/dev/null bs=16M iflag=direct status=none" for f in in_files)])
    write_limit(work / "limit.out", nbytes, direct=True)
    reader.wait()
    concurrent = time.perf_counter() - t
    read_s, write_s = min(cached_read, direct_read), min(cached_write, direct_write)
    kind = lambda c, d: "page cache" if c <= d else "O_DIRECT"  # noqa: E731
    return {
        "wall_s": read_s + write_s,
        "read_s": read_s,
        "write_s": write_s,
        "write_bytes": nbytes,
        "limit_kind": f"read {kind(cached_read, direct_read)} + write {kind(cached_write, direct_write)}",
        "cached_read_s": cached_read,
        "cached_write_s": cached_write,
        "direct_read_s": direct_read,
        "direct_write_s": direct_write,
        "concurrent_s": concurrent,
        "peak_rss_bytes": 0,
    }


def _limit_line(r: dict[str, Any], mode: str, in_bytes: int, width: int) -> str:
    gb = lambda n, s: f"{n / s / 1e9:.2f} GB/s"  # noqa: E731
    return (
        f"  {'limit':{width}s} {mode:4s} {r['wall_s']:7.2f} s  ({r['limit_kind']}; page cache: read "
        f"{r['cached_read_s']:.2f} s = {gb(in_bytes, r['cached_read_s'])}, write+fdatasync {r['cached_write_s']:.2f} s"
        f" = {gb(r['write_bytes'], r['cached_write_s'])}; O_DIRECT: read {r['direct_read_s']:.2f} s = "
        f"{gb(in_bytes, r['direct_read_s'])}, write+fdatasync {r['direct_write_s']:.2f} s = "
        f"{gb(r['write_bytes'], r['direct_write_s'])}; O_DIRECT read and write at once {r['concurrent_s']:.2f} s)"
    )


def prepare_mode(mode: str, in_files: list[str], cache_inputs: bool = True) -> None:
    """Before timing a tool: cold = drop the page cache; warm = flush the previous tool's dirty
    output (so its writeback is not charged here), then, with ``cache_inputs``, read the inputs into
    the page cache."""
    if mode == "cold":
        _drop_caches()
        return
    subprocess.run(["sync"], check=True)
    if cache_inputs:
        subprocess.run(["cat", *in_files], stdout=subprocess.DEVNULL, check=True)


def time_limit(mode: str, in_files: list[str], in_bytes: int, out_bytes: int, work: Path, width: int) -> dict[str, Any]:
    """The disk limit in ``mode`` (the limit reads the inputs itself, so warm does not pre-read them)."""
    prepare_mode(mode, in_files, cache_inputs=False)
    r = disk_limit(in_files, out_bytes, work)
    print(_limit_line(r, mode, in_bytes, width), flush=True)
    return r


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The options both build benchmarks take."""
    ap.add_argument("--family", default="wan", choices=["wan", "flux1"])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--single-blocks", type=int, default=None)
    ap.add_argument("--shard-bytes", type=int, default=2_000_000_000, help="input shard size (naive RSS follows it)")
    ap.add_argument("--out-shard", default="5GB", help="dqfast output max shard size")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dqfast-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and outputs")
    ap.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds to wait after generating the checkpoint: a VM's host may still be writing it back "
        "to its disk for minutes, which slows whatever is timed first",
    )


def synthetic_inputs(a: argparse.Namespace, src_root: Path, ready: Path, **synth: Any) -> tuple[Path, int, list[str], float]:
    """Generate the synthetic checkpoint under ``src_root`` unless ``ready`` exists (then flush it
    and wait ``--settle`` seconds); return the BF16 base dir, its bytes, its shard files and the
    generation time."""
    sys.path.insert(0, str(HERE.parent / "python"))
    from dqfast.synth import make_transformer

    gen_s = 0.0
    if not ready.is_file():
        t0 = time.perf_counter()
        shutil.rmtree(src_root, ignore_errors=True)
        make_transformer(src_root, a.family, blocks=a.blocks, single_blocks=a.single_blocks, max_shard_bytes=a.shard_bytes, **synth)
        gen_s = time.perf_counter() - t0
        subprocess.run(["sync"], check=True)
        time.sleep(a.settle)
    base = src_root / "base" / "transformer"
    in_bytes = _dir_bytes(base)
    in_files = sorted(str(p) for p in base.glob("*.safetensors"))
    print(
        f"synthetic {a.family} x{a.blocks}: {in_bytes / 1e9:.2f} GB BF16 in {len(in_files)} shards (generated in {gen_s:.1f} s)", flush=True
    )
    return base, in_bytes, in_files, gen_s


def _drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def _compare_outputs(a: Path, b: Path) -> dict[str, Any]:
    """Byte-compare every tensor of two checkpoint dirs (any sharding)."""
    import dqfast

    ia, ib = dqfast.open_checkpoint(a), dqfast.open_checkpoint(b)
    names_equal = set(ia.tensors) == set(ib.tensors)
    differ: list[str] = []
    diff_bytes = 0
    total = 0
    for name, ma in ia.tensors.items():
        mb = ib.tensors.get(name)
        if mb is None:
            continue
        ra = dqfast.read_tensor(ma.file, name, raw=True)
        rb = dqfast.read_tensor(mb.file, name, raw=True)
        total += ra.nbytes
        if ma.dtype != mb.dtype or ra.shape != rb.shape or not np.array_equal(ra.reshape(-1), rb.reshape(-1)):
            differ.append(name)
            if ra.shape == rb.shape and ra.dtype == rb.dtype:
                diff_bytes += int(np.count_nonzero(ra.view(np.uint8) != rb.view(np.uint8)))
    return {
        "names_equal": names_equal,
        "tensors": len(ia.tensors),
        "tensors_differing": len(differ),
        "first_differing": differ[:5],
        "bytes_differing": diff_bytes,
        "bytes_compared": total,
        "bit_exact": names_equal and not differ,
    }


def summarize(results: dict[str, dict[str, Any]], in_bytes: int, width: int) -> list[dict[str, Any]]:
    """Print the comparison table (wall time, GB/s of input, peak RSS, naive/tool, tool/limit,
    tool/(reading and writing at once)) and
    return its rows; ``results`` maps ``tool/mode`` to a measurement."""
    rows = []
    print(
        f"\n{'tool':{width}s} {'mode':5s} {'wall s':>8s} {'GB/s in':>8s} {'peak RSS GiB':>13s} {'naive/x':>8s} {'x/limit':>8s} {'x/concur':>8s}"
    )
    for key, r in results.items():
        tool, mode = key.split("/")
        naive = results.get(f"naive/{mode}", {}).get("wall_s")
        limit = results.get(f"limit/{mode}", {}).get("wall_s")
        concurrent = results.get(f"limit/{mode}", {}).get("concurrent_s")
        row = {
            "tool": tool,
            "mode": mode,
            "wall_s": r["wall_s"],
            "gbps_in": in_bytes / r["wall_s"] / 1e9,
            "peak_rss_gib": r["peak_rss_bytes"] / 2**30,
            "naive_over_tool": naive / r["wall_s"] if naive else None,
            "tool_over_limit": r["wall_s"] / limit if limit else None,
            "tool_over_concurrent": r["wall_s"] / concurrent if concurrent else None,
            **r,
        }
        rows.append(row)
        fmt = lambda v: f"{v:8.2f}" if v is not None else f"{'-':>8s}"  # noqa: E731
        print(
            f"{tool:{width}s} {mode:5s} {r['wall_s']:8.2f} {row['gbps_in']:8.2f} {row['peak_rss_gib']:13.2f} "
            f"{fmt(row['naive_over_tool'])} {fmt(row['tool_over_limit'])} {fmt(row['tool_over_concurrent'])}"
        )
    return rows


def save_results(prefix: str, fields: dict[str, Any]) -> Path:
    """Write one run's JSON (date, machine, the given fields) under benches/results/."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    res_dir = HERE / "results"
    res_dir.mkdir(exist_ok=True)
    path = res_dir / f"{prefix}_{stamp}.json"
    path.write_text(json.dumps({"date": stamp, "machine": _machine(), **fields}, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return path


def _machine() -> dict[str, Any]:
    mem = Path("/proc/meminfo").read_text().split("\n")[0]
    cpu = next(
        (l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")),
        platform.processor(),
    )
    return {"cpus": os.cpu_count(), "cpu": cpu, "mem": mem, "kernel": platform.release(), "python": sys.version.split()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--fsync", action="store_true", help="dqfast fsyncs its output (naive never does)")
    ap.add_argument("--no-cold", action="store_true")
    ap.add_argument("--modes", default="cold,warm", help="cold and/or warm (warm is meaningless once the input exceeds the page cache)")
    ap.add_argument(
        "--no-export",
        action="store_true",
        help="skip the ModelOpt-like export and the dqfast-calib tool (saves ~half the input size on disk)",
    )
    ap.add_argument(
        "--drop-outputs", action="store_true", help="delete each tool's output right after timing it (no bit-exact comparison; saves disk)"
    )
    ap.add_argument("--tools", default="limit,naive,dqfast-bf16,dqfast-bf16-buffered,dqfast-calib")
    ap.add_argument("--peers-python", type=Path, default=HERE.parent / ".venv-peers" / "bin" / "python")
    a = ap.parse_args()

    work = a.workdir / f"{a.family}-{a.blocks}"
    src_root = work / "src"
    ready = src_root / ("base/transformer/config.json" if a.no_export else "ckpt/amax.safetensors")
    base, in_bytes, in_files, gen_s = synthetic_inputs(
        a, src_root, ready, modelopt_fp8_export=not a.no_export, export_filter="no-block-filter", write_backbone=False
    )
    export = src_root / "hf"
    amax = src_root / "ckpt" / "amax.safetensors"

    tools = [t for t in a.tools.split(",") if not (a.no_export and t == "dqfast-calib")]
    want = a.modes.split(",")
    can_drop = not a.no_cold and "cold" in want and _drop_caches()
    modes = (["cold"] if can_drop else []) + (["warm"] if "warm" in want else [])
    results: dict[str, dict[str, Any]] = {}
    wargs = {"src": str(base), "export": str(export), "amax": str(amax), "fsync": a.fsync, "shard": a.out_shard, "threads": a.threads}
    outs = {t: work / f"out-{t}" for t in tools if t != "limit"}
    for mode in modes:
        for tool in [t for t in tools if t != "limit"]:
            shutil.rmtree(outs[tool], ignore_errors=True)
            prepare_mode(mode, in_files)
            python = str(a.peers_python) if tool.startswith("llmc-") else sys.executable
            r = _run([python, __file__, "_worker", tool, json.dumps({**wargs, "dst": str(outs[tool])})])
            r["out_bytes"] = _dir_bytes(outs[tool])
            results[f"{tool}/{mode}"] = r
            if a.drop_outputs:
                shutil.rmtree(outs[tool], ignore_errors=True)
            print(
                f"  {tool:20s} {mode:4s} {r['wall_s']:7.2f} s  {in_bytes / r['wall_s'] / 1e9:5.2f} GB/s  "
                f"peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB",
                flush=True,
            )
        if "limit" in tools:
            out_size = results.get(f"dqfast-bf16/{mode}", {}).get("out_bytes") or in_bytes // 2
            results[f"limit/{mode}"] = time_limit(mode, in_files, in_bytes, out_size, work, 20)

    exact = None
    built = lambda *ts: all(t in outs and outs[t].exists() for t in ts)  # noqa: E731
    if built("naive", "dqfast-bf16"):
        exact = _compare_outputs(outs["naive"], outs["dqfast-bf16"])
        print(
            f"bit-exact naive vs dqfast from_bf16: {exact['bit_exact']} ({exact['tensors']} tensors, "
            f"{exact['tensors_differing']} differ, {exact['bytes_differing']} bytes differ)"
        )
    if built("dqfast-bf16-buffered", "dqfast-bf16"):
        same = _compare_outputs(outs["dqfast-bf16-buffered"], outs["dqfast-bf16"])
        print(f"bit-exact dqfast io=buffered vs io=auto: {same['bit_exact']}")
        exact = {**(exact or {}), "buffered_vs_auto": same["bit_exact"]}

    rows = summarize(results, in_bytes, width=20)

    save_results(
        f"fp8_build_{a.family}{a.blocks}",
        {
            "family": a.family,
            "blocks": a.blocks,
            "input_bytes": in_bytes,
            "input_shards": len(in_files),
            "generate_s": gen_s,
            "cold_available": can_drop,
            "modes": modes,
            "fsync": a.fsync,
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
