"""Hostile user inputs read by dqfast's Python side: config.json, amax sidecars, backbone.pt,
batch manifests, policy files, CLI values, API arguments.

Each :class:`Case` writes its inputs under ``inp`` and returns how to run it: a CLI command (run
in a subprocess with a timeout, so a hang is a failure, not a stuck suite) or an API call. The
expectation is either a typed error (exit 2, one ``error:`` line matching ``match``; or the API
raising ``error``) or a correct output checked by ``check``. The runner hashes ``inp`` before and
after and checks that nothing is left at the output path after an error.

Files are written byte by byte (tests/malformed/corpus.py helpers) so each is wrong in one way.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from dqfast.errors import DqfastError, DqfastIOError, PlanError
from malformed.corpus import COLS, E4M3_MAX, MODULE, ROWS, WEIGHT, bf16_bytes, weight, write_base, write_export, write_safetensors

# ---- how a case runs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Cli:
    args: list[str]
    timeout: float = 120.0


@dataclass(frozen=True)
class Api:
    fn: Callable[[], Any]


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path, Path], Cli | Api]
    #: A regex the one-line error must contain; None when the case must succeed.
    match: str | None = None
    #: The DqfastError subclass an API case must raise.
    error: type[DqfastError] = DqfastError
    #: For a success: check(out, result) where result is the API return value or the
    #: CompletedProcess of a CLI run.
    check: Callable[[Path, Any], None] | None = None
    tags: tuple[str, ...] = field(default=())


CASES: list[Case] = []


def case(id: str, match: str | None = None, error: type[DqfastError] = DqfastError, check: Callable | None = None, tags=()):
    def deco(make: Callable[[Path, Path], Cli | Api]) -> Callable[[Path, Path], Cli | Api]:
        CASES.append(Case(id, make, match, error, check, tuple(tags)))
        return make

    return deco


# ---- inputs --------------------------------------------------------------------------------

MOD2 = "blocks.1.proj"


def two_module_base(d: Path, class_name: str = "TinyTransformer") -> Path:
    """A BF16 base with two Linears (so a fallback can keep one and quantize the other)."""
    w0, w1 = weight(0), weight(1)
    tensors = {
        WEIGHT: ("BF16", [ROWS, COLS], bf16_bytes(w0)),
        f"{MOD2}.weight": ("BF16", [ROWS, COLS], bf16_bytes(w1)),
        "norm.weight": ("BF16", [COLS], bf16_bytes(np.ones(COLS, np.float32))),
    }
    write_base(d, tensors)
    (d / "config.json").write_text(json.dumps({"_class_name": class_name}))
    return d


def fp8_from_bf16(base: Path, out: Path, *extra: str) -> Cli:
    return Cli(
        ["build", "fp8", "--from-bf16", "--base-transformer-dir", str(base), "--output-dir", str(out), "--model-type", "none", *extra]
    )


def base_with_config(inp: Path, text: str | bytes) -> Path:
    base = write_base(inp / "base")
    cfg = base / "config.json"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    return base


def export_with_qc(inp: Path, mutate: Callable[[dict], None]) -> dict[str, Any]:
    """The malformed corpus' FP8 export with its quantization_config mutated."""
    kw = write_export(inp)
    cfg_path = Path(kw["modelopt_hf_dir"]) / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    mutate(cfg["quantization_config"])
    cfg_path.write_text(json.dumps(cfg))
    return kw


def fp8_calibrated(kw: dict[str, Any], out: Path, *extra: str) -> Cli:
    args = ["build", "fp8", "--modelopt-hf-dir", str(kw["modelopt_hf_dir"]), "--base-transformer-dir", str(kw["base_transformer_dir"])]
    if kw.get("modelopt_backbone_ckpt"):
        args += ["--modelopt-backbone-ckpt", str(kw["modelopt_backbone_ckpt"])]
    return Cli([*args, "--output-dir", str(out), "--model-type", "none", *extra])


def read_output_config(out: Path) -> dict[str, Any]:
    def refuse(c: str) -> None:
        raise AssertionError(f"output config.json holds {c}: not strict JSON")

    return json.loads((out / "config.json").read_text(), parse_constant=refuse)


def output_tensors(out: Path) -> dict[str, Any]:
    """Every output tensor, read by the safetensors library (the output must open there)."""
    from safetensors.torch import load_file

    t: dict[str, Any] = {}
    for f in sorted(out.glob("*.safetensors")):
        t.update(load_file(str(f)))
    return t


# ---- config.json ---------------------------------------------------------------------------


@case("config-nan", r"config\.json: not valid JSON: NaN is not JSON")
def _(inp, out):
    return fp8_from_bf16(base_with_config(inp, '{"_class_name": "X", "eps": NaN}'), out)


@case("config-neg-infinity", r"config\.json: not valid JSON: -Infinity is not JSON")
def _(inp, out):
    return fp8_from_bf16(base_with_config(inp, '{"_class_name": "X", "eps": -Infinity}'), out)


@case("config-infinity-nested", r"config\.json: not valid JSON: Infinity")
def _(inp, out):
    return fp8_from_bf16(base_with_config(inp, '{"a": {"b": [1, Infinity]}}'), out)


@case("config-deep-recursion", r"config\.json: JSON nested too deeply")
def _(inp, out):
    return fp8_from_bf16(base_with_config(inp, "[" * 200_000 + "]" * 200_000), out)


@case("config-deep-100", r"config\.json: JSON nested more than 64 levels")
def _(inp, out):
    return fp8_from_bf16(base_with_config(inp, '{"a":' * 100 + "1" + "}" * 100), out)


@case("config-not-utf8", r"config\.json: not UTF-8")
def _(inp, out):
    return fp8_from_bf16(base_with_config(inp, b'{"_class_name": "\xff\xfe"}'), out)


@case("config-utf16", r"config\.json: not UTF-8")
def _(inp, out):
    return fp8_from_bf16(base_with_config(inp, '{"_class_name": "X"}'.encode("utf-16")), out)


@case("config-array", r"config\.json: expected a JSON object, found an array")
def _(inp, out):
    return fp8_from_bf16(base_with_config(inp, "[1, 2]"), out)


@case("config-fifo", r"config\.json: JSON file is a FIFO", tags=("fifo",))
def _(inp, out):
    base = write_base(inp / "base")
    (base / "config.json").unlink()
    os.mkfifo(base / "config.json")
    return fp8_from_bf16(base, out, "--dry-run")


@case("config-directory", r"config\.json: JSON file is a directory")
def _(inp, out):
    base = write_base(inp / "base")
    (base / "config.json").unlink()
    (base / "config.json").mkdir()
    return fp8_from_bf16(base, out)


@case("config-dangling-link", r"config\.json: JSON file: No such file")
def _(inp, out):
    base = write_base(inp / "base")
    (base / "config.json").unlink()
    (base / "config.json").symlink_to(inp / "nowhere.json")
    return fp8_from_bf16(base, out)


@case("config-class-name-int", r"'_class_name' must be a string")
def _(inp, out):
    base = base_with_config(inp, '{"_class_name": 5}')
    return Cli(["build", "fp8", "--from-bf16", "--base-transformer-dir", str(base), "--output-dir", str(out)])


@case("config-qc-list", r"config\.json: field 'quantization_config' must be an object, found an array")
def _(inp, out):
    return fp8_from_bf16(base_with_config(inp, '{"quantization_config": [1, 2]}'), out)


@case("config-qc-string", r"config\.json: field 'quantization_config' must be an object, found a string")
def _(inp, out):
    return fp8_from_bf16(base_with_config(inp, '{"quantization_config": "modelopt"}'), out)


@case("qc-producer-string", r"config\.json: field 'producer' must be an object, found a string")
def _(inp, out):
    return fp8_calibrated(export_with_qc(inp, lambda q: q.update(producer="modelopt")), out)


@case("qc-ignore-int", r"config\.json: field 'ignore' must be an array, found a number")
def _(inp, out):
    return fp8_calibrated(export_with_qc(inp, lambda q: q.update(ignore=5)), out)


@case("qc-ignore-ints", r"config\.json: field 'ignore' must be a list of strings")
def _(inp, out):
    return fp8_calibrated(export_with_qc(inp, lambda q: q.update(ignore=[1, 2])), out)


@case("qc-quant-algo-int", r"config\.json: field 'quant_algo' must be a string, found a number")
def _(inp, out):
    return fp8_calibrated(export_with_qc(inp, lambda q: q.update(quant_algo=8)), out)


@case("qc-quant-method-list", r"config\.json: field 'quant_method' must be a string, found an array")
def _(inp, out):
    return fp8_calibrated(export_with_qc(inp, lambda q: q.update(quant_method=["modelopt"])), out)


@case("qc-group-size-string", r"config\.json: field 'group_size' must be an integer, found a string")
def _(inp, out):
    return fp8_calibrated(export_with_qc(inp, lambda q: q.update(group_size="16")), out)


@case("qc-group-size-negative", r"config\.json: field 'group_size' is -16")
def _(inp, out):
    return fp8_calibrated(export_with_qc(inp, lambda q: q.update(group_size=-16)), out)


@case("qc-config-groups-entry", r"config\.json: field 'config_groups\.g' must be an object")
def _(inp, out):
    return fp8_calibrated(export_with_qc(inp, lambda q: q.update(config_groups={"g": "x"})), out)


@case("qc-quantized-layers-list", r"config\.json: field 'quantized_layers' must be an object, found an array")
def _(inp, out):
    return fp8_calibrated(export_with_qc(inp, lambda q: q.update(quant_algo="MIXED_PRECISION", quantized_layers=["a"])), out)


@case("qc-quantized-layer-spec", r"config\.json: field 'quantized_layers\.blocks\.0\.proj' must be an object")
def _(inp, out):
    return fp8_calibrated(export_with_qc(inp, lambda q: q.update(quant_algo="MIXED_PRECISION", quantized_layers={MODULE: "FP8"})), out)


@case("legacy-quantization-list", r"hf_quant_config\.json: field 'quantization' must be an object")
def _(inp, out):
    base = write_base(inp / "base")
    (base / "hf_quant_config.json").write_text('{"quantization": [1]}')
    return fp8_from_bf16(base, out)


@case("metadata-qc-nan", r"metadata 'quantization_config': not valid JSON: NaN")
def _(inp, out):
    from malformed.corpus import base_tensors

    d = inp / "base"
    write_safetensors(d / "m.safetensors", base_tensors(), {"quantization_config": '{"quant_method": "modelopt", "x": NaN}'})
    return fp8_from_bf16(d, out)


def _strict_output(out: Path, proc: Any) -> None:
    cfg = read_output_config(out)
    assert cfg["huge"] == 1e308 and cfg["name"] == "Ünïcødé ✓"
    assert WEIGHT in output_tensors(out)


@case("config-strict-output-ok", check=_strict_output)
def _(inp, out):
    return fp8_from_bf16(base_with_config(inp, '{"_class_name": "X", "huge": 1e308, "name": "Ünïcødé ✓"}'), out)


# ---- amax sidecars -------------------------------------------------------------------------

# Sidecar codes of weight amax 0.0625 and input amax 0.5 in each 8-bit float format.
_FP8_CODES = {"F8_E4M3": (0x18, 0x30), "F8_E5M2": (0x2C, 0x38), "F8_E8M0": (123, 126)}


def _sidecar(inp: Path, dtype: str, codes: tuple[int, int] | None = None, shape: list[int] | None = None) -> dict[str, Any]:
    kw = write_export(inp, weight_amax=0.0625)
    w, i = codes or _FP8_CODES[dtype]
    shape = [] if shape is None else shape
    n = int(np.prod(shape)) if shape else 1
    sz = {"I32": 4, "BOOL": 1}.get(dtype, 1)
    enc = {"I32": lambda v: struct.pack("<i", v) * n}.get(dtype, lambda v: bytes([v]) * n)
    write_safetensors(
        Path(kw["modelopt_backbone_ckpt"]),
        {f"{MODULE}.weight_quantizer._amax": (dtype, shape, enc(w)), f"{MODULE}.input_quantizer._amax": (dtype, shape, enc(i))},
    )
    assert sz
    return kw


def _amax_scales_ok(out: Path, res: Any) -> None:
    t = output_tensors(out)
    assert float(t[f"{MODULE}.weight_scale"].reshape(-1)[0]) == np.float32(0.0625) / np.float32(E4M3_MAX)
    assert float(t[f"{MODULE}.input_scale"].reshape(-1)[0]) == np.float32(0.5) / np.float32(E4M3_MAX)


for _dt in ("F8_E4M3", "F8_E5M2", "F8_E8M0"):
    case(f"amax-{_dt.lower()}-decoded", check=_amax_scales_ok)(lambda inp, out, _dt=_dt: fp8_calibrated(_sidecar(inp, _dt), out))


@case("amax-int32", r"amax\.safetensors: tensor 'blocks\.0\.proj\.\w+_quantizer\._amax': amax has dtype I32, not a float dtype")
def _(inp, out):
    return fp8_calibrated(_sidecar(inp, "I32", (1, 1)), out)


@case("amax-bool", r"amax has dtype BOOL, not a float dtype")
def _(inp, out):
    return fp8_calibrated(_sidecar(inp, "BOOL", (1, 1)), out)


@case("amax-sidecar-fifo", r"amax\.safetensors: amax sidecar is a FIFO", tags=("fifo",))
def _(inp, out):
    kw = write_export(inp)
    p = Path(kw["modelopt_backbone_ckpt"])
    p.unlink()
    os.mkfifo(p)
    return fp8_calibrated(kw, out)


@case("amax-sidecar-directory", r"amax\.safetensors: amax sidecar is a directory")
def _(inp, out):
    kw = write_export(inp)
    p = Path(kw["modelopt_backbone_ckpt"])
    p.unlink()
    p.mkdir()
    return fp8_calibrated(kw, out)


# ---- backbone.pt (built with torch.save, then altered one way) ----------------------------


def _torch_backbone(path: Path, state: dict[str, Any]) -> Path:
    import torch

    torch.save({"modelopt_state": {"x": 1}, "model_state_dict": state}, path)
    return path


def _backbone_kw(inp: Path, state: Any = None) -> dict[str, Any]:
    import torch

    kw = write_export(inp, weight_amax=0.0625)
    if state is None:
        state = {
            f"{MODULE}.weight_quantizer._amax": torch.tensor(0.0625),
            f"{MODULE}.input_quantizer._amax": torch.tensor(0.5),
        }
    kw["modelopt_backbone_ckpt"] = _torch_backbone(inp / "ckpt" / "backbone.pt", state)
    return kw


def _rewrite(path: Path, alter: Callable[[zipfile.ZipInfo, bytes], tuple[zipfile.ZipInfo, bytes]]) -> None:
    with zipfile.ZipFile(path) as zin:
        items = [(i, zin.read(i)) for i in zin.infolist()]
    with zipfile.ZipFile(path, "w") as zout:
        for info, data in items:
            info, data = alter(info, data)
            zout.writestr(info, data)


def _compress(suffix: str) -> Callable[[zipfile.ZipInfo, bytes], tuple[zipfile.ZipInfo, bytes]]:
    def alter(info: zipfile.ZipInfo, data: bytes) -> tuple[zipfile.ZipInfo, bytes]:
        if info.filename.endswith(suffix):
            info.compress_type = zipfile.ZIP_DEFLATED
        return info, data

    return alter


def _patch_central(path: Path, name_suffix: str, offset: int, fmt: str, value: Callable[[int], int]) -> None:
    """Change one field of the central-directory record of the entry ending in ``name_suffix``."""
    b = bytearray(path.read_bytes())
    pos = b.find(b"PK\x01\x02")
    while pos != -1:
        n = struct.unpack_from("<H", b, pos + 28)[0]
        name = bytes(b[pos + 46 : pos + 46 + n]).decode()
        if name.endswith(name_suffix):
            old = struct.unpack_from(fmt, b, pos + offset)[0]
            struct.pack_into(fmt, b, pos + offset, value(old))
            path.write_bytes(bytes(b))
            return
        pos = b.find(b"PK\x01\x02", pos + 4)
    raise AssertionError(f"no entry {name_suffix}")


def _first_storage(path: Path) -> str:
    with zipfile.ZipFile(path) as zf:
        return next(n for n in zf.namelist() if "/data/" in n)


def _bb(alter: Callable[[Path], None]) -> Callable[[Path, Path], Cli]:
    def make(inp: Path, out: Path) -> Cli:
        kw = _backbone_kw(inp)
        alter(Path(kw["modelopt_backbone_ckpt"]))
        return fp8_calibrated(kw, out)

    return make


case("backbone-compressed-pkl", r"backbone\.pt: .*data\.pkl: zip compression method 8", tags=("torch",))(
    _bb(lambda p: _rewrite(p, _compress("data.pkl")))
)
case("backbone-compressed-storage", r"backbone\.pt: .*data/\d+: zip compression method 8", tags=("torch",))(
    _bb(lambda p: _rewrite(p, _compress("/data/0")))
)
case("backbone-unknown-method", r"backbone\.pt: .*data\.pkl: zip compression method 99", tags=("torch",))(
    _bb(lambda p: _patch_central(p, "data.pkl", 10, "<H", lambda v: 99))
)
case("backbone-encrypted", r"backbone\.pt: .*data\.pkl: encrypted zip entry", tags=("torch",))(
    _bb(lambda p: _patch_central(p, "data.pkl", 8, "<H", lambda v: v | 1))
)
case("backbone-bad-crc", r"backbone\.pt: .*data\.pkl: unreadable zip entry \(Bad CRC-32", tags=("torch",))(
    _bb(lambda p: _patch_central(p, "data.pkl", 16, "<I", lambda v: v ^ 0xDEADBEEF))
)
case("backbone-size-beyond-file", r"backbone\.pt: .*data\.pkl: entry claims \d+ bytes, beyond the file's", tags=("torch",))(
    _bb(
        lambda p: (
            _patch_central(p, "data.pkl", 20, "<I", lambda v: 0x7FFFFFF0),
            _patch_central(p, "data.pkl", 24, "<I", lambda v: 0x7FFFFFF0),
        )
    )
)
case("backbone-empty", r"backbone\.pt: not a torch zip checkpoint", tags=("torch",))(_bb(lambda p: p.write_bytes(b"")))


def _deflated_bomb(p: Path) -> None:
    """The amax storage entry replaced by 256 MiB of zeros deflated to a few hundred KB."""
    storage = _first_storage(p)
    with zipfile.ZipFile(p) as zin:
        items = [(i, zin.read(i)) for i in zin.infolist()]
    with zipfile.ZipFile(p, "w") as zout:
        for info, data in items:
            if info.filename == storage:
                zi = zipfile.ZipInfo(info.filename)
                zi.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(zi, "w", force_zip64=True) as w:
                    chunk = bytes(1 << 20)
                    for _ in range(256):
                        w.write(chunk)
            else:
                zout.writestr(info, data)


case("backbone-zip-bomb-storage", r"backbone\.pt: .*data/\d+: zip compression method 8", tags=("torch",))(_bb(_deflated_bomb))


def _stride0(inp: Path, out: Path) -> Cli:
    import torch

    state = {
        f"{MODULE}.weight_quantizer._amax": torch.tensor([0.0625]).expand(1 << 30),
        f"{MODULE}.input_quantizer._amax": torch.tensor(0.5),
    }
    return fp8_calibrated(_backbone_kw(inp, state), out)


case(
    "backbone-stride0-2^30",
    r"backbone\.pt: blocks\.0\.proj\.weight_quantizer\._amax: view of 1073741824 elements over a storage of 1",
    tags=("torch",),
)(_stride0)


@case("backbone-fifo", r"backbone\.pt: backbone checkpoint is a FIFO", tags=("fifo",))
def _(inp, out):
    kw = write_export(inp)
    p = inp / "ckpt" / "backbone.pt"
    os.mkfifo(p)
    kw["modelopt_backbone_ckpt"] = p
    return fp8_calibrated(kw, out)


@case("backbone-dir-with-fifo", r"backbone\.pt: backbone checkpoint is a FIFO", tags=("fifo",))
def _(inp, out):
    kw = write_export(inp)
    os.mkfifo(inp / "ckpt" / "backbone.pt")
    kw["modelopt_backbone_ckpt"] = inp / "ckpt"
    return fp8_calibrated(kw, out)


# ---- batch manifests -----------------------------------------------------------------------


def _manifest(inp: Path, text: str | bytes, suffix: str = ".yaml") -> Path:
    p = inp / f"m{suffix}"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _batch(inp: Path, text: str | bytes, suffix: str = ".yaml") -> Cli:
    return Cli(["batch", str(_manifest(inp, text, suffix)), "--check"], timeout=60)


def _job(inp: Path, **fields: Any) -> str:
    base = write_base(inp / "base")
    job = {"name": "a", "builder": "fp8", "output": "out/a", "inputs": {"base_transformer_dir": str(base)}, "options": {"from_bf16": True}}
    job.update(fields)
    return json.dumps({"jobs": [job]})  # JSON is YAML


_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)


@case("yaml-billion-laughs", r"m\.yaml: invalid manifest: not valid YAML: .*alias '\*a'")
def _(inp, out):
    return _batch(inp, _LAUGHS + "jobs: *i\n")


@case("yaml-self-reference", r"m\.yaml: invalid manifest: not valid YAML: .*alias '\*x'")
def _(inp, out):
    return _batch(inp, "jobs: &x [*x]\n")


@case("yaml-merge-key", r"m\.yaml: invalid manifest: not valid YAML: .*alias '\*d'")
def _(inp, out):
    return _batch(inp, "defaults: &d {builder: fp8}\njobs:\n  - <<: *d\n    output: o\n")


@case("yaml-deep-nesting", r"m\.yaml: invalid manifest: YAML nested too deeply")
def _(inp, out):
    return _batch(inp, "jobs: " + "[" * 50_000 + "]" * 50_000 + "\n")


@case("yaml-top-list", r"m\.yaml: invalid manifest: top level must be a table/mapping, not a list")
def _(inp, out):
    return _batch(inp, "- a\n- b\n")


@case("yaml-top-scalar", r"m\.yaml: invalid manifest: top level must be a table/mapping, not a string")
def _(inp, out):
    return _batch(inp, "hello\n")


@case("yaml-int-keys", r"m\.yaml: invalid manifest: unknown top-level key '1'")
def _(inp, out):
    return _batch(inp, "1: x\nzz: y\njobs: []\n")


@case("yaml-jobs-mapping", r"m\.yaml: invalid manifest: 'jobs' must be a list of tables, not a table")
def _(inp, out):
    return _batch(inp, "jobs: {a: 1}\n")


@case("yaml-job-scalar", r"m\.yaml: invalid manifest: jobs\[0\]: must be a table, not a string")
def _(inp, out):
    return _batch(inp, "jobs: [x]\n")


@case("yaml-builder-list", r"job 'a': 'builder' must be a builder name string, not a list")
def _(inp, out):
    return _batch(inp, _job(inp, builder=["fp8"]))


@case("yaml-output-int", r"job 'a': 'output' must be a path string, not an integer")
def _(inp, out):
    return _batch(inp, _job(inp, output=5))


@case("yaml-name-list", r"jobs\[0\]: name must be a string, not a list")
def _(inp, out):
    return _batch(inp, _job(inp, name=["a"]))


@case("yaml-inputs-list", r"job 'a': 'inputs' must be a table, not a list")
def _(inp, out):
    return _batch(inp, _job(inp, inputs=["x"]))


@case("yaml-options-string", r"job 'a': 'options' must be a table, not a string")
def _(inp, out):
    return _batch(inp, _job(inp, options="fast"))


@case("yaml-input-int", r"job 'a': input 'base_transformer_dir' must be a path string, not an integer")
def _(inp, out):
    return _batch(inp, _job(inp, inputs={"base_transformer_dir": 7}))


@case("yaml-input-nul", r"job 'a': input 'base_transformer_dir' must be a path string")
def _(inp, out):
    return _batch(inp, _job(inp, inputs={"base_transformer_dir": "a\x00b"}))


@case("yaml-threads-string", r"job 'a': threads must be an integer >= 1, not 'many'")
def _(inp, out):
    return _batch(inp, _job(inp, threads="many"))


@case("yaml-memory-list", r"job 'a': memory: must be a size .*not a list")
def _(inp, out):
    return _batch(inp, _job(inp, memory=[1]))


@case("yaml-memory-5X", r"job 'a': memory: '5X' is not a size")
def _(inp, out):
    return _batch(inp, _job(inp, memory="5X"))


@case("yaml-memory-negative", r"job 'a': memory: '-5' is not a size")
def _(inp, out):
    return _batch(inp, _job(inp, memory="-5"))


@case("yaml-identity-list", r"job 'a': identity must be 'stat' or 'content'")
def _(inp, out):
    return _batch(inp, _job(inp, identity=["stat"]))


@case("yaml-batch-list", r"\[batch\] must be a table, not a list")
def _(inp, out):
    return _batch(inp, "batch: [1]\njobs: []\n")


@case("yaml-log-dir-int", r"\[batch\] log_dir must be a string, not an integer")
def _(inp, out):
    return _batch(inp, "batch: {log_dir: 5}\njobs: []\n")


@case("yaml-max-parallel-float", r"\[batch\] max_parallel must be a non-negative integer, not 1\.5")
def _(inp, out):
    return _batch(inp, "batch: {max_parallel: 1.5}\njobs: []\n")


@case("toml-deep-nesting", r"m\.toml: invalid manifest: (TOML nested too deeply|not valid TOML)")
def _(inp, out):
    return _batch(inp, "a = " + "[" * 100_000 + "]" * 100_000 + "\n", ".toml")


@case("toml-not-utf8", r"m\.toml: invalid manifest: not valid TOML")
def _(inp, out):
    return _batch(inp, b'[batch]\nlog_dir = "\xff"\n', ".toml")


@case("manifest-fifo", r"m\.yaml: invalid manifest: manifest is a FIFO", tags=("fifo",))
def _(inp, out):
    inp.mkdir(parents=True, exist_ok=True)
    os.mkfifo(inp / "m.yaml")
    return Cli(["batch", str(inp / "m.yaml"), "--check"], timeout=60)


@case("manifest-too-large", r"m\.yaml: invalid manifest: manifest is \d+ bytes")
def _(inp, out):
    return _batch(inp, b"#" * (17 << 20))


@case("batch-input-dir-fifo", r"base/pipe: input file is a FIFO", error=DqfastIOError, tags=("fifo",))
def _(inp, out):
    from dqfast.batch import input_identity

    base = write_base(inp / "base")
    os.mkfifo(base / "pipe")
    return Api(lambda: input_identity(base, "content"))


# ---- CLI values ----------------------------------------------------------------------------


def _flag(flag: str, value: str, match: str, *more: str) -> None:
    def make(inp: Path, out: Path) -> Cli:
        return fp8_from_bf16(write_base(inp / "base"), out, *more, flag, value)

    CASES.append(Case(f"cli{flag}={value}", make, match))


for _v in ("5X", "inf", "-1", "nan", "1e9", "5 GB GB", "0x10"):
    _flag("--max-shard-size", _v, rf"Invalid value for '--max-shard-size': '{_v}': not a size \(examples: 5GB, 500MiB, 1000000\)")
_flag("--max-shard-size", "0", r"Invalid value for '--max-shard-size': '0': must be at least 1 bytes")
for _v in ("-1", "inf", "many", "1.5"):
    _flag("--threads", _v, r"Invalid value for '--threads': ")
for _v in ("inf", "nan", "-3", "0", "abc"):
    _flag("--activation-amax", _v, r"Invalid value for '--activation-amax': ")


def _shards_ok(out: Path, proc: Any) -> None:
    assert len(list(out.glob("*.safetensors"))) >= 2, "a 1.5KB shard limit splits the tensors"
    assert WEIGHT in output_tensors(out)


@case("cli-max-shard-size-fraction-ok", check=_shards_ok)
def _(inp, out):
    return fp8_from_bf16(write_base(inp / "base"), out, "--max-shard-size", "1.5KB")


@case("batch-memory-limit-5X", r"Invalid value for '--memory-limit': '5X': not a size")
def _(inp, out):
    return Cli(["batch", str(_manifest(inp, _job(inp))), "--memory-limit", "5X"])


@case("batch-cores-negative", r"Invalid value for '--cores': -2 is not in the range x>=0")
def _(inp, out):
    return Cli(["batch", str(_manifest(inp, _job(inp))), "--cores", "-2"])


@case("mixed-fp8-amax-inf", r"Invalid value for '--fp8-activation-amax': 'inf': must be finite and > 0")
def _(inp, out):
    base = two_module_base(inp / "base")
    return Cli(["build", "mixed", "--base-transformer-dir", str(base), "--output-dir", str(out), "--fp8-activation-amax", "inf"])


def _parse_size(value: Any) -> Callable[[Path, Path], Api]:
    from dqfast.plan import parse_size

    return lambda inp, out: Api(lambda: parse_size(value))


for _v, _m in (
    ("5X", r"'5X': not a size"),
    ("-1", r"'-1': not a size"),
    (-1, r"-1: a size cannot be negative"),
    (True, r"True: not a size"),
    (1.5, r"1\.5: not a size"),
    (None, r"None: not a size"),
    ("inf", r"'inf': not a size"),
):
    CASES.append(Case(f"api-parse-size-{_v!r}", _parse_size(_v), _m, PlanError))


# ---- --policy ------------------------------------------------------------------------------


def _mixed(inp: Path, out: Path, *extra: str, class_name: str = "TinyTransformer") -> Cli:
    base = two_module_base(inp / "base", class_name)
    # --target none: these cases are about the inputs (SGLang, part of the default `any`, rejects MIXED_PRECISION).
    return Cli(["build", "mixed", "--base-transformer-dir", str(base), "--output-dir", str(out), "--target", "none", *extra])


def _policy_file(inp: Path, text: str) -> str:
    p = inp / "policy.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return str(p)


@case("policy-array-file", r"policy\.json: expected a JSON object, found an array")
def _(inp, out):
    return _mixed(inp, out, "--policy", _policy_file(inp, '["fp8", "."]'))


@case("policy-pattern-int", r"--policy .*policy\.json: fp8 pattern 5 is not a string; expected")
def _(inp, out):
    return _mixed(inp, out, "--policy", _policy_file(inp, '{"fp8": 5}'))


@case("policy-pattern-object", r"--policy .*policy\.json: fp8 pattern \{'a': 1\} is not a string")
def _(inp, out):
    return _mixed(inp, out, "--policy", _policy_file(inp, '{"fp8": {"a": 1}}'))


@case("policy-unknown-algo", r"--policy .*policy\.json: policy algorithm 'int4' is not one of fp8, nvfp4, bf16")
def _(inp, out):
    return _mixed(inp, out, "--policy", _policy_file(inp, '{"int4": ["."]}'))


@case("policy-bad-regex", r"--policy .*policy\.json: policy pattern '\(' \(fp8\) is not a valid regex")
def _(inp, out):
    return _mixed(inp, out, "--policy", _policy_file(inp, '{"fp8": ["("]}'))


@case("policy-nan", r"policy\.json: not valid JSON: NaN")
def _(inp, out):
    return _mixed(inp, out, "--policy", _policy_file(inp, '{"fp8": NaN}'))


@case("policy-inline-pairs-bad", r"--policy: rule 1 is not an \[algo, regex\] pair")
def _(inp, out):
    return _mixed(inp, out, "--policy", "[1, 2]")


@case("policy-inline-number", r"--policy: a policy cannot be int")
def _(inp, out):
    return _mixed(inp, out, "--policy", "7")


@case("policy-fifo", r"policy\.json: JSON file is a FIFO", tags=("fifo",))
def _(inp, out):
    inp.mkdir(parents=True, exist_ok=True)
    os.mkfifo(inp / "policy.json")
    return _mixed(inp, out, "--policy", str(inp / "policy.json"))


def _fallback_merged(out: Path, proc: Any) -> None:
    q = read_output_config(out)["quantization_config"]
    assert MODULE not in q["quantized_layers"], "--fallback was dropped"
    assert MOD2 in q["quantized_layers"]
    assert str(output_tensors(out)[f"{MODULE}.weight"].dtype) == "torch.bfloat16"


@case("mixed-fallback-with-preset-policy", check=_fallback_merged)
def _(inp, out):
    # flux1's default policy has its own bf16 key; the user's --fallback must survive it.
    return _mixed(inp, out, "--fallback", r"^blocks\.0\.proj$", class_name="FluxTransformer2DModel")


@case("mixed-fallback-with-policy-bf16-key", check=_fallback_merged)
def _(inp, out):
    return _mixed(inp, out, "--fallback", r"^blocks\.0\.proj$", "--policy", '{"bf16": ["^norm$"], "fp8": ["."]}')


# ---- --model-type vs config.json -----------------------------------------------------------


@case("model-type-mismatch", r"--model-type wan is for WanTransformer3DModel, but config\.json says _class_name 'FluxTransformer2DModel'")
def _(inp, out):
    base = two_module_base(inp / "base", "FluxTransformer2DModel")
    return Cli(["build", "fp8", "--from-bf16", "--base-transformer-dir", str(base), "--output-dir", str(out), "--model-type", "wan"])


def _built(out: Path, proc: Any) -> None:
    assert WEIGHT in output_tensors(out)


@case("model-type-mismatch-forced", check=_built)
def _(inp, out):
    base = two_module_base(inp / "base", "FluxTransformer2DModel")
    return Cli(
        [
            "build",
            "fp8",
            "--from-bf16",
            "--base-transformer-dir",
            str(base),
            "--output-dir",
            str(out),
            "--model-type",
            "wan",
            "--force-model-type",
        ]
    )


@case(
    "model-type-mismatch-nvfp4-api",
    r"--model-type flux1 is for FluxTransformer2DModel, but config\.json says _class_name 'WanTransformer3DModel'",
    PlanError,
)
def _(inp, out):
    from dqfast.nvfp4 import build_nvfp4_transformer

    base = two_module_base(inp / "base", "WanTransformer3DModel")
    return Api(lambda: build_nvfp4_transformer(out, base_transformer_dir=base, from_bf16=True, model_type="flux1"))


@case("model-type-unknown-api", r"unknown model type 'fluxx'", PlanError)
def _(inp, out):
    base = two_module_base(inp / "base")
    return Api(lambda: __import__("dqfast").build_fp8_transformer(out, base_transformer_dir=base, from_bf16=True, model_type="fluxx"))


# ---- fallback given as one str --------------------------------------------------------------


def _only_first_kept(out: Path, report: Any) -> None:
    t = output_tensors(out)
    assert str(t[WEIGHT].dtype) == "torch.bfloat16", "the str fallback did not keep its module in BF16"
    assert f"{MOD2}.weight_scale" in t, "a str fallback iterated per character matched every module"


@case("api-fp8-fallback-str", check=_only_first_kept)
def _(inp, out):
    import dqfast

    base = two_module_base(inp / "base")
    return Api(
        lambda: dqfast.build_fp8_transformer(
            out, base_transformer_dir=base, from_bf16=True, model_type="none", fallback=r"^blocks\.0\.proj$"
        )
    )


@case("api-nvfp4-fallback-str", check=_only_first_kept)
def _(inp, out):
    from dqfast.nvfp4 import build_nvfp4_transformer

    base = two_module_base(inp / "base")
    return Api(lambda: build_nvfp4_transformer(out, base_transformer_dir=base, from_bf16=True, model_type="none", fallback="blocks.0.proj"))


@case("api-mixed-fallback-str", check=_only_first_kept)
def _(inp, out):
    from dqfast.mixed import build_mixed_transformer

    base = two_module_base(inp / "base")
    return Api(lambda: build_mixed_transformer(out, base, fallback=r"^blocks\.0\.proj$", model_type="none", target="none"))


@case("api-fallback-int", r"fallback \(--fallback\): expected a pattern or a list of patterns, not int", PlanError)
def _(inp, out):
    import dqfast

    base = two_module_base(inp / "base")
    return Api(lambda: dqfast.build_fp8_transformer(out, base_transformer_dir=base, from_bf16=True, fallback=5))


@case("api-fallback-list-of-ints", r"fallback \(--fallback\): pattern 1 is not a string", PlanError)
def _(inp, out):
    from dqfast.nvfp4 import build_nvfp4_transformer

    base = two_module_base(inp / "base")
    return Api(lambda: build_nvfp4_transformer(out, base_transformer_dir=base, from_bf16=True, fallback=[1]))


# ---- --from-bf16 with an export ---------------------------------------------------------------


def _from_bf16_with(builder: str, flag: str, key: str) -> Callable[[Path, Path], Cli]:
    """`build <builder> --from-bf16` given also the export's `flag` (`key` of write_export)."""

    def make(inp: Path, out: Path) -> Cli:
        kw = write_export(inp)
        base = str(kw["base_transformer_dir"])
        return Cli(["build", builder, "--from-bf16", "--base-transformer-dir", base, flag, str(kw[key]), "--output-dir", str(out)])

    return make


for _id, _builder, _flag, _key in (
    ("fp8-from-bf16-with-export", "fp8", "--modelopt-hf-dir", "modelopt_hf_dir"),
    ("fp8-from-bf16-with-backbone", "fp8", "--modelopt-backbone-ckpt", "modelopt_backbone_ckpt"),
    ("nvfp4-from-bf16-with-export", "nvfp4", "--modelopt-hf-dir", "modelopt_hf_dir"),
):
    case(_id, f"--from-bf16 and {_flag} exclude each other")(_from_bf16_with(_builder, _flag, _key))


# ---- a build that quantizes nothing ----------------------------------------------------------


def _warned(out: Path, proc: Any) -> None:
    assert "warning: no module was quantized" in proc.stderr, proc.stderr


@case("fp8-nothing-quantized-warns", check=_warned)
def _(inp, out):
    return fp8_from_bf16(write_base(inp / "base"), out, "--fallback", ".")


@case("fp8-nothing-quantized-json-warns", check=_warned)
def _(inp, out):
    return fp8_from_bf16(write_base(inp / "base"), out, "--fallback", ".", "--json")


@case("fp8-nothing-quantized-strict", r"no module was quantized.*refused by --strict")
def _(inp, out):
    return fp8_from_bf16(write_base(inp / "base"), out, "--fallback", ".", "--strict")


@case("nvfp4-nothing-quantized-strict", r"no module was quantized.*refused by --strict")
def _(inp, out):
    base = write_base(inp / "base")
    return Cli(
        [
            "build",
            "nvfp4",
            "--from-bf16",
            "--base-transformer-dir",
            str(base),
            "--output-dir",
            str(out),
            "--model-type",
            "none",
            "--fallback",
            "*",
            "--strict",
        ]
    )


@case("api-nothing-quantized-strict", r"no module was quantized", PlanError)
def _(inp, out):
    import dqfast

    base = write_base(inp / "base")
    return Api(
        lambda: dqfast.build_fp8_transformer(out, base_transformer_dir=base, from_bf16=True, model_type="none", fallback=".", strict=True)
    )


# ---- verify / components ---------------------------------------------------------------------


@case("verify-truncated-checkpoint", r"error: .*(truncated|beyond|past the end|shorter|size)", tags=("torch",))
def _(inp, out):
    import dqfast

    base = write_base(inp / "base")
    q = inp / "quant"
    dqfast.build_fp8_transformer(q, base_transformer_dir=base, from_bf16=True, model_type="none")
    shard = next(q.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    return Cli(["verify", "layers", str(base), str(q)])


@case("components-failed-leaves-no-dir", r"error: ")
def _(inp, out):
    root = inp / "pipe"
    w = weight()
    w[0, 0] = np.nan
    from malformed.corpus import base_tensors

    write_base(root / "transformer", base_tensors(w))
    return Cli(
        [
            "build",
            "components",
            "fp8",
            "--root",
            str(root),
            "--from-bf16",
            "--model-type",
            "none",
            "--output-dir",
            str(out / "new" / "deeper"),
        ]
    )


__all__ = ["CASES", "Case", "Cli", "Api"]


# ---- ptq / verify counts ---------------------------------------------------------------------


def _ptq(flag: str, value: str) -> Callable[[Path, Path], Cli]:
    def make(inp: Path, out: Path) -> Cli:
        base = write_base(inp / "base")
        return Cli(["ptq", "--model-dir", str(base), "--out", str(out), flag, value])

    return make


for _f, _v in (("--calib-size", "0"), ("--n-steps", "-1"), ("--batch-size", "inf"), ("--height", "0"), ("--seed", "-5")):
    CASES.append(Case(f"ptq{_f}={_v}", _ptq(_f, _v), rf"Invalid value for '{_f}': "))


@case("verify-trajectory-steps-zero", r"Invalid value for '--steps': 0 is not in the range x>=1")
def _(inp, out):
    base = write_base(inp / "base")
    return Cli(["verify", "trajectory", str(base), str(base), "--steps", "0"])


# ---- manifest option values checked against the builder's signature -------------------------

for _opt, _val, _m in (
    ("from_bf16", "yes", r"option 'from_bf16' must be true or false, not a string 'yes'"),
    ("activation_amax", "big", r"option 'activation_amax' must be a number, not a string 'big'"),
    ("rounding", "fast", r"option 'rounding' must be one of 'exact', 'modelopt', not a string 'fast'"),
    ("fallback", 5, r"option 'fallback' must be a list or a string, not an integer 5"),
    ("max_shard_size", [1], r"option 'max_shard_size' must be a string or an integer, not a list"),
    ("io", True, r"option 'io' must be one of 'auto', 'direct', 'buffered', not a boolean True"),
):
    CASES.append(
        Case(
            f"yaml-option-{_opt}-{type(_val).__name__}",
            lambda inp, out, _opt=_opt, _val=_val: _batch(inp, _job(inp, options={"from_bf16": True, _opt: _val})),
            rf"m\.yaml: invalid manifest: job 'a': {_m}",
        )
    )


# ---- paths of the wrong kind, flags named in messages ----------------------------------------


@case("base-dir-is-fifo", r"no config\.json here or in transformer/", tags=("fifo",))
def _(inp, out):
    os.mkfifo(inp / "base")
    return fp8_from_bf16(inp / "base", out)


@case("policy-is-directory", r"policy\.json: JSON file is a directory")
def _(inp, out):
    (inp / "policy.json").mkdir(parents=True)
    return _mixed(inp, out, "--policy", str(inp / "policy.json"))


@case("output-exists-names-the-flag", r"output already exists \(pass --overwrite")
def _(inp, out):
    existing = inp / "existing"
    (existing / "keep.txt").parent.mkdir(parents=True)
    (existing / "keep.txt").write_text("mine")
    return fp8_from_bf16(write_base(inp / "base"), existing)


@case("components-output-exists-names-the-flag", r"output already exists \(pass --overwrite")
def _(inp, out):
    write_base(inp / "pipe" / "transformer")
    (inp / "done" / "transformer").mkdir(parents=True)
    return Cli(
        [
            "build",
            "components",
            "fp8",
            "--root",
            str(inp / "pipe"),
            "--from-bf16",
            "--model-type",
            "none",
            "--output-dir",
            str(inp / "done"),
        ]
    )


@case("components-nothing-quantized-json-warns", check=_warned)
def _(inp, out):
    write_base(inp / "pipe" / "transformer")
    return Cli(
        [
            "build",
            "components",
            "fp8",
            "--root",
            str(inp / "pipe"),
            "--from-bf16",
            "--model-type",
            "none",
            "--fallback",
            ".",
            "--json",
            "--output-dir",
            str(out),
        ]
    )


def _consistent_bomb(inp: Path, out: Path) -> Cli:
    """A storage whose pickled size agrees with its entry (64 MiB, a scalar view of its first
    element), stored deflated: a reader that inflates entries allocates it all."""
    import torch

    big = torch.full((1 << 24,), 0.0625)
    state = {f"{MODULE}.weight_quantizer._amax": big[0], f"{MODULE}.input_quantizer._amax": torch.tensor(0.5)}
    kw = _backbone_kw(inp, state)
    p = Path(kw["modelopt_backbone_ckpt"])
    with zipfile.ZipFile(p) as zf:
        big_entry = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size).filename
    _rewrite(p, _compress(big_entry))
    return fp8_calibrated(kw, out)


case("backbone-zip-bomb-consistent-sizes", r"backbone\.pt: .*data/\d+: zip compression method 8", tags=("torch",))(_consistent_bomb)


# ---- inspect / verify read the same configs ---------------------------------------------------


@case("inspect-config-nan", r"config\.json: not valid JSON: NaN is not JSON")
def _(inp, out):
    return Cli(["inspect", str(base_with_config(inp, '{"_class_name": "X", "eps": NaN}'))])


@case("inspect-qc-ignore-int", r"config\.json: field 'ignore' must be an array, found a number")
def _(inp, out):
    kw = export_with_qc(inp, lambda q: q.update(ignore=5))
    return Cli(["inspect", str(Path(kw["modelopt_hf_dir"]) / "transformer")])


@case("verify-quant-config-deep", r"config\.json: JSON nested more than 64 levels", tags=("torch",))
def _(inp, out):
    import dqfast

    base = write_base(inp / "base")
    q = inp / "quant"
    dqfast.build_fp8_transformer(q, base_transformer_dir=base, from_bf16=True, model_type="none")
    cfg = json.loads((q / "config.json").read_text())
    cfg["deep"] = json.loads('{"a":' * 80 + "1" + "}" * 80)
    (q / "config.json").write_text(json.dumps(cfg))
    return Cli(["verify", "layers", str(base), str(q)])
