"""Models written by real, light exporters (skl2onnx, onnxconverter-common,
onnxruntime.quantization, onnx-caffe2's models in onnx's wheel, onnx's external data) are
partitioned under dp-throughput and verified against the whole model at every stage count the
planner picks, or refused with exit code 2 and one line. Heavy exporters' constructs (torch,
paddle, transformers) are built with onnx.helper in tests/exporter_models.py; the full set,
with wheels' models, is `smlaas bench exporters`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from smlaas.cli.main import EXIT_BAD_INPUT, main
from smlaas.partition import PlanOptions, partition, verify_build
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileCache, ProfileSettings
from tests.exporter_models import random_calibration, small_cnn_model
from tests.models import chain_model

FAST = ProfileSettings(threads=1, warmup_runs=1, measured_runs=1)
LIGHT_MODELS = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _partition_file(path: Path, tmp_path: Path, sizes, machines: int = 3):
    result = partition(str(path), tmp_path / "build", input_size_specs=list(sizes),
                       cost_model=preset("sgx1"),
                       options=PlanOptions(Planner.DP_THROUGHPUT, machines, False),
                       settings=FAST, cache=ProfileCache(tmp_path / "cache"))
    assert result.verification is not None and result.verification.ok
    assert verify_build(tmp_path / "build", threads=1).ok
    return result


def _sklearn_model(kind: str, **options):
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.datasets import make_classification
    from sklearn.decomposition import PCA
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = make_classification(n_samples=200, n_features=12, n_informative=6, n_classes=3,
                               random_state=0)
    estimator = {
        "pipeline": lambda: make_pipeline(StandardScaler(), PCA(6),
                                          LogisticRegression(max_iter=300)),
        "forest": lambda: RandomForestClassifier(n_estimators=8, max_depth=5, random_state=0),
        "mlp": lambda: make_pipeline(StandardScaler(), MLPClassifier((32, 16), max_iter=50,
                                                                     random_state=0)),
    }[kind]()
    estimator.fit(x.astype(np.float32), y)
    return skl2onnx.to_onnx(estimator, x[:1].astype(np.float32), target_opset=17,
                            options={id(estimator): options} if options else None)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("kind", ["pipeline", "forest", "mlp"])
def test_skl2onnx_models_partition_and_verify(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.onnx"
    onnx.save(_sklearn_model(kind, zipmap=False), str(path))
    result = _partition_file(path, tmp_path, ["X:1,12"])
    domains = {node.domain for node in onnx.load(str(path)).graph.node}
    assert "ai.onnx.ml" in domains or kind == "mlp"
    assert result.plan.stages


def test_skl2onnx_zipmap_output_is_refused_with_exit_code_2(tmp_path: Path, capsys) -> None:
    path = tmp_path / "zipmap.onnx"
    onnx.save(_sklearn_model("pipeline"), str(path))  # skl2onnx's default: a ZipMap output
    code = main(["partition", "--model", str(path), "--input-size", "X:1,12", "--build-dir",
                 str(tmp_path / "build"), "--threads", "1", "--runs", "1", "--no-cache"])
    assert code == EXIT_BAD_INPUT
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "ZipMap" in error, error
    assert not (tmp_path / "build").exists()


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_onnxconverter_common_fp16_model_partitions_and_verifies(keep_io_types: bool,
                                                                 tmp_path: Path) -> None:
    float16 = pytest.importorskip("onnxconverter_common.float16")
    path = tmp_path / "fp16.onnx"
    onnx.save(float16.convert_float_to_float16(small_cnn_model(), keep_io_types=keep_io_types),
              str(path))
    result = _partition_file(path, tmp_path, ["input:1,3,16,16"])
    assert "float16" in (tmp_path / "build" / "report.md").read_text()
    assert result.plan.stages


@pytest.mark.parametrize("fmt", ["qoperator", "dynamic"])
def test_onnxruntime_quantized_models_partition_and_verify(fmt: str, tmp_path: Path) -> None:
    from onnxruntime import quantization as q

    source, target = tmp_path / "fp32.onnx", tmp_path / f"{fmt}.onnx"
    if fmt == "dynamic":  # MatMulInteger / DynamicQuantizeLinear, as for BERT
        onnx.save(chain_model(width=64, depth=4), str(source))
        q.quantize_dynamic(str(source), str(target), weight_type=q.QuantType.QInt8)
        sizes = ["x:2,64"]
    else:  # QLinearConv and friends
        onnx.save(small_cnn_model(), str(source))
        q.quantize_static(str(source), str(target), random_calibration({"input": (1, 3, 16, 16)}),
                          quant_format=q.QuantFormat.QOperator)
        sizes = ["input:1,3,16,16"]
    ops = {node.op_type for node in onnx.load(str(target)).graph.node}
    assert ops & {"QLinearConv", "MatMulInteger", "DynamicQuantizeLinear"}, ops
    _partition_file(target, tmp_path, sizes)


@pytest.mark.parametrize("name", ["light_inception_v1", "light_shufflenet"])
def test_onnx_caffe2_models_with_initializers_as_inputs_partition_and_verify(
        name: str, tmp_path: Path) -> None:
    """Opset 9, IR 3: every initializer is also a graph input, and weights are made by
    ConstantOfShape at run time."""
    path = LIGHT_MODELS / f"{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is not in this onnx wheel")
    model = onnx.load(str(path))
    assert {i.name for i in model.graph.initializer} <= {i.name for i in model.graph.input}
    result = _partition_file(path, tmp_path, [])
    assert result.plan.model.inputs == [i.name for i in model.graph.input
                                        if i.name not in {t.name for t in
                                                          model.graph.initializer}]


def test_model_with_external_data_partitions_and_verifies(tmp_path: Path) -> None:
    model = small_cnn_model()
    path = tmp_path / "external" / "cnn.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="cnn.data", size_threshold=0)
    assert (path.parent / "cnn.data").stat().st_size > 0
    _partition_file(path, tmp_path, ["input:1,3,16,16"])
