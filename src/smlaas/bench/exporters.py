"""Benchmark: models nobody here made, from real exporters, partitioned and verified.

Each model is obtained the way a model owner would get it: shipped inside a PyPI wheel
(PaddlePaddle OCR models in ``rapidocr-onnxruntime``, ``silero-vad``'s PyTorch exports),
exported by onnx-caffe2 (the models in onnx's own wheel), converted by ``skl2onnx``,
quantised by ``onnxruntime.quantization``, converted to fp16 by ``onnxconverter-common``, or
saved with external data. Every model is partitioned with the default planner and with
``dp-throughput --machines 3``, the chain is verified against the whole model, and the
predicted native stage times are compared with the measured ones. A model must verify or be
refused with a one-line message; anything else (a crash, a wrong result) is a failure.

    smlaas bench exporters --out docs/results/exporter_models.json

Needs ``pip install -e ".[exporters]"`` (skl2onnx, scikit-learn, onnxconverter-common) and
PyPI for the two wheels (``pip download --no-deps``, cached in ``--work-dir``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from smlaas import zoo
from smlaas.errors import GraphError, ModelError, SmlaasError
from smlaas.partition import PlanOptions, partition
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileCache, ProfileSettings, machine_id

WHEELS = {"rapidocr": "rapidocr-onnxruntime==1.4.4", "silero": "silero-vad==6.2.3"}
ONNX_LIGHT_MODELS = ("light_bvlc_alexnet", "light_densenet121", "light_inception_v1",
                     "light_inception_v2", "light_resnet50", "light_shufflenet",
                     "light_squeezenet", "light_vgg19", "light_zfnet512")
PLANNERS = (("default (dp-latency)", PlanOptions(Planner.DP_LATENCY, None, False)),
            ("dp-throughput --machines 3", PlanOptions(Planner.DP_THROUGHPUT, 3, False)))


@dataclass(frozen=True)
class Case:
    """One model: where it comes from, and what ``smlaas partition`` is told about it."""

    name: str
    exporter: str
    make: Callable[[Path], Path]
    input_sizes: tuple[str, ...] = ()
    input_values: tuple[str, ...] = ()
    expect_refusal: bool = False
    notes: str = ""


# --- where the models come from -------------------------------------------------------------

def _wheel_member(work: Path, wheel: str, member: str) -> Path:
    target = work / "wheels" / member
    if target.is_file():
        return target
    wheels = work / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = WHEELS[wheel].split("==")[0].replace("-", "_") + "-*.whl"
    if not any(wheels.glob(pattern)):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        WHEELS[wheel], "-d", str(wheels)], check=True, timeout=600)
    found = sorted(wheels.glob(pattern))
    with zipfile.ZipFile(found[-1]) as archive:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(archive.read(member))
    return target


def _from_wheel(wheel: str, member: str) -> Callable[[Path], Path]:
    return lambda work: _wheel_member(work, wheel, member)


def _onnx_light(name: str) -> Callable[[Path], Path]:
    def make(_work: Path) -> Path:
        return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"{name}.onnx"
    return make


def _zoo_file(work: Path, name: str) -> Path:
    path = work / "zoo" / f"{name}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(zoo.get(name).build(None), str(path))
    return path


def _quantized(name: str, kind: str) -> Callable[[Path], Path]:
    def make(work: Path) -> Path:
        from onnxruntime import quantization as q

        out = work / "quantized" / f"{name}_{kind}.onnx"
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        source = _zoo_file(work, name)
        if kind == "dynamic":
            q.quantize_dynamic(str(source), str(out), weight_type=q.QuantType.QInt8)
            return out
        model = onnx.load(str(source))
        inputs = {i.name: [d.dim_value or 1 for d in i.type.tensor_type.shape.dim]
                  for i in model.graph.input}

        class Calibration(q.CalibrationDataReader):
            def __init__(self) -> None:
                rng = np.random.default_rng(0)
                self.batches = iter([{k: rng.standard_normal(v).astype(np.float32)
                                      for k, v in inputs.items()} for _ in range(4)])

            def get_next(self):
                return next(self.batches, None)

        fmt = q.QuantFormat.QDQ if kind == "qdq" else q.QuantFormat.QOperator
        q.quantize_static(str(source), str(out), Calibration(), quant_format=fmt)
        return out
    return make


def _fp16(name: str, keep_io_types: bool) -> Callable[[Path], Path]:
    def make(work: Path) -> Path:
        from onnxconverter_common import float16

        out = work / "fp16" / f"{name}_fp16{'_fp32io' if keep_io_types else ''}.onnx"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            model = onnx.load(str(_zoo_file(work, name)))
            onnx.save(float16.convert_float_to_float16(model, keep_io_types=keep_io_types),
                      str(out))
        return out
    return make


def _external_data(name: str) -> Callable[[Path], Path]:
    def make(work: Path) -> Path:
        out = work / "external" / f"{name}.onnx"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(zoo.get(name).build(None), str(out), save_as_external_data=True,
                      all_tensors_to_one_file=True, location=f"{name}.data")
        return out
    return make


def _sklearn(kind: str) -> Callable[[Path], Path]:
    def make(work: Path) -> Path:
        from skl2onnx import to_onnx
        from sklearn.datasets import make_classification, make_regression
        from sklearn.decomposition import PCA
        from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        out = work / "sklearn" / f"{kind}.onnx"
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        x, y = make_classification(n_samples=400, n_features=20, n_informative=8,
                                   n_classes=3, random_state=0)
        options: dict = {"zipmap": False}
        if kind == "scaler_pca_logreg":
            estimator = make_pipeline(StandardScaler(), PCA(8), LogisticRegression())
        elif kind == "random_forest":
            estimator = RandomForestClassifier(n_estimators=30, max_depth=8, random_state=0)
        elif kind == "mlp":
            estimator = make_pipeline(StandardScaler(),
                                      MLPClassifier((64, 32), max_iter=300, random_state=0))
        elif kind == "gradient_boosting_regressor":
            x, y = make_regression(n_samples=400, n_features=20, random_state=0)
            estimator, options = GradientBoostingRegressor(n_estimators=40, random_state=0), {}
        elif kind == "logreg_zipmap":
            estimator, options = LogisticRegression(max_iter=300), {}
        else:
            raise ValueError(kind)
        estimator.fit(x.astype(np.float32), y)
        model = to_onnx(estimator, x[:1].astype(np.float32), target_opset=17,
                        options={id(estimator): options} if options else None)
        onnx.save(model, str(out))
        return out
    return make


def cases() -> list[Case]:
    return [
        Case("ch_ppocr_mobile_v2.0_cls", "paddle2onnx (rapidocr wheel)",
             _from_wheel("rapidocr", "rapidocr_onnxruntime/models/"
                                     "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
             ("x:1,3,48,192",)),
        Case("ch_PP-OCRv4_det", "paddle2onnx (rapidocr wheel)",
             _from_wheel("rapidocr", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
             ("x:1,3,320,320",)),
        Case("ch_PP-OCRv4_rec", "paddle2onnx (rapidocr wheel)",
             _from_wheel("rapidocr", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
             ("x:1,3,48,320",)),
        *[Case(stem, "torch.onnx (silero-vad wheel)",
               _from_wheel("silero", f"silero_vad/data/{stem}.onnx"),
               ("input:1,512", "state:2,1,128"), ("sr=16000",))
          for stem in ("silero_vad", "silero_vad_16k_op15", "silero_vad_op18_ifless")],
        Case("silero_vad_half", "torch.onnx (silero-vad wheel)",
             _from_wheel("silero", "silero_vad/data/silero_vad_half.onnx"),
             ("input:1,512", "state:2,1,128")),
        *[Case(name, "onnx-caffe2 (onnx wheel)", _onnx_light(name)) for name in ONNX_LIGHT_MODELS],
        Case("resnet18_int8_qdq", "onnxruntime.quantization (static, QDQ)",
             _quantized("resnet18", "qdq"), ("input:1,3,224,224",)),
        Case("resnet18_int8_qoperator", "onnxruntime.quantization (static, QOperator)",
             _quantized("resnet18", "qoperator"), ("input:1,3,224,224",)),
        Case("bert_base_int8_dynamic", "onnxruntime.quantization (dynamic)",
             _quantized("bert_base", "dynamic"), ("input_ids:1,128", "attention_mask:1,128")),
        Case("resnet50_fp16_fp32io", "onnxconverter-common (keep_io_types)",
             _fp16("resnet50", True), ("input:1,3,224,224",)),
        Case("mobilenet_v2_fp16", "onnxconverter-common", _fp16("mobilenet_v2", False),
             ("input:1,3,224,224",)),
        Case("resnet18_external_data", "onnx.save (external data)", _external_data("resnet18"),
             ("input:1,3,224,224",)),
        Case("scaler_pca_logreg", "skl2onnx", _sklearn("scaler_pca_logreg"), ("X:1,20",)),
        Case("random_forest", "skl2onnx", _sklearn("random_forest"), ("X:1,20",)),
        Case("mlp", "skl2onnx", _sklearn("mlp"), ("X:1,20",)),
        Case("gradient_boosting_regressor", "skl2onnx", _sklearn("gradient_boosting_regressor"),
             ("X:1,20",)),
        Case("logreg_zipmap", "skl2onnx (default ZipMap output)", _sklearn("logreg_zipmap"),
             ("X:1,20",), expect_refusal=True,
             notes="a sequence of maps is not a tensor: refused by design"),
    ]


# --- running them ---------------------------------------------------------------------------

def run_case(case: Case, work: Path, settings: ProfileSettings, cache: ProfileCache) -> dict:
    row: dict = {"model": case.name, "exporter": case.exporter, "runs": []}
    if case.notes:
        row["notes"] = case.notes
    try:
        path = case.make(work)
    except Exception as err:  # the exporter itself failed: not our code, but say so
        row["source_error"] = f"{type(err).__name__}: {err}"
        return row
    row["file_mib"] = _size_mib(path)
    for label, options in PLANNERS:
        started = time.perf_counter()
        run: dict = {"planner": label}
        try:
            result = partition(str(path), work / "builds" / case.name, cost_model=preset("sgx1"),
                               options=options, settings=settings, cache=cache,
                               input_size_specs=case.input_sizes,
                               input_values=case.input_values, verify=True)
        except (ModelError, GraphError) as err:  # the model refused, as bad input (exit 2)
            message = str(err)
            run.update(outcome="refused", message=message,
                       one_line="\n" not in message.strip())
        except SmlaasError as err:  # our failure on a model we should take
            run.update(outcome="failed", message=f"{type(err).__name__}: {err}")
        except Exception as err:
            run.update(outcome="crashed", message=f"{type(err).__name__}: {err}",
                       traceback=traceback.format_exc())
        else:
            verified = bool(result.verification and result.verification.ok)
            stages = [{"predicted_ms": s.native_ms, "measured_ms": s.measured_native_ms,
                       "error": abs(s.native_ms - s.measured_native_ms) / s.measured_native_ms}
                      for s in result.plan.stages if s.measured_native_ms]
            run.update(outcome="verified" if verified else "MISMATCH", stages=stages,
                       stage_count=len(result.plan.stages))
        run["seconds"] = time.perf_counter() - started
        row["runs"].append(run)
    row["ok"] = all(_run_ok(case, r) for r in row["runs"])
    return row


def _run_ok(case: Case, run: dict) -> bool:
    if case.expect_refusal:
        return run["outcome"] == "refused" and run["one_line"]
    return run["outcome"] == "verified" or (run["outcome"] == "refused" and run["one_line"])


def _size_mib(path: Path) -> float:
    data = path.with_name(path.stem + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.is_file() else 0)) / 2**20


def main(argv: list[str] | None, *, say: Callable[[str], None]) -> None:
    """Runs the benchmark; ``say`` shows its progress and tables (the CLI's echo)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="*", help="Only these models (default: all).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--work-dir", type=Path,
                        help="Where downloaded wheels and converted models are kept "
                             "(default: a temporary directory); profiles never are.")
    parser.add_argument("--out", type=Path, default=Path("docs/results/exporter_models.json"))
    args = parser.parse_args(argv)
    settings = ProfileSettings(threads=args.threads, warmup_runs=3, measured_runs=args.runs)
    chosen = [c for c in cases() if not args.models or c.name in args.models]
    with tempfile.TemporaryDirectory(prefix="smlaas-exporters-") as tmp:
        work = args.work_dir or Path(tmp)
        # A fresh profile cache per run: profiles and stage timings from the same minutes.
        cache = ProfileCache(Path(tmp) / "cache")
        (work / "builds").mkdir(parents=True, exist_ok=True)
        rows = []
        for case in chosen:
            rows.append(run_case(case, work, settings, cache))
            say(_line(rows[-1]))
    errors = [s["error"] for row in rows for run in row["runs"] for s in run.get("stages", [])]
    summary = {"machine": machine_id(), "python": platform.python_version(),
               "threads": args.threads, "runs": args.runs, "models": rows,
               "all_ok": all(row.get("ok") for row in rows),
               "median_error_all_stages": statistics.median(errors) if errors else None,
               "stage_count": len(errors)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    say(markdown(summary))


def _line(row: dict) -> str:
    if "source_error" in row:
        return f"{row['model']}: could not obtain the model: {row['source_error']}"
    return f"{row['model']}: " + "; ".join(
        f"{r['planner']}: {r['outcome']}" + (f" ({r['stage_count']} stages)"
                                             if "stage_count" in r else "")
        for r in row["runs"])


def markdown(summary: dict) -> str:
    lines = ["| model | exporter | MiB | default planner | dp-throughput K=3 | "
             "median error | ok |", "|---|---|---:|---|---|---:|:---:|"]
    for row in summary["models"]:
        if "source_error" in row:
            lines.append(f"| {row['model']} | {row['exporter']} | - | "
                         f"not obtained: {row['source_error']} | | | NO |")
            continue
        cells = []
        for run in row["runs"]:
            if run["outcome"] == "verified":
                cells.append(f"{run['stage_count']} stages, verified")
            else:
                cells.append(f"{run['outcome']}: {run['message'].splitlines()[0][:90]}")
        errors = [s["error"] for r in row["runs"] for s in r.get("stages", [])]
        median = f"{100 * statistics.median(errors):.1f}%" if errors else "-"
        lines.append(f"| {row['model']} | {row['exporter']} | {row['file_mib']:.1f} | "
                     f"{' | '.join(cells)} | {median} | {'yes' if row['ok'] else 'NO'} |")
    median = summary["median_error_all_stages"]
    lines.append("")
    lines.append(f"median |predicted - measured| / measured over all {summary['stage_count']} "
                 f"stages: {100 * median:.1f}%" if median is not None else "no stages measured")
    return "\n".join(lines)

