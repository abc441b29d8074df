"""Source model + target -> checked artifact -> signed bundle.

:func:`convert` produces one :class:`Artifact` for one :class:`Target`:

1. ONNX targets: the source graph is lowered to the target runtime's IR
   version and opsets, optimized offline (onnxruntime basic level), then
   quantized to the target precision. TFLite targets go through
   :func:`converters.tflite.onnx_to_tflite` (or pass a TFLite source through).
2. Parity: the artifact runs on the calibration samples in its own runtime and
   is compared with the source in *its* runtime (:mod:`converters.parity`).
   Over tolerance -> :class:`ParityError` carrying the report, unless the
   operator overrides it (the report then says so).
3. Drift reference and smoke samples (:mod:`converters.reference`) from the
   artifact's own outputs.

:func:`pack_artifact` writes the bundle (model, drift profile, smoke samples;
the parity report in the manifest's provenance) and signs it.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent._fsutil import atomic_write_bytes
from device_agent.bundle.manifest import TensorSpec, canonical_json
from device_agent.payloads import DriftProfile, SmokeSamples

from . import onnx_tools, reference
from .bundle import BundleFile, build_manifest, pack_bundle, sign_bundle
from .errors import ConverterError, ParityError, TargetError, TargetUnavailableError
from .graph_checks import check_inference_mode
from .parity import ParityReport, Tolerance, compare, default_tolerance
from .quantize import apply_precision
from .samples import check_samples, generate_samples, sample_count
from .source import SourceModel
from .targets import Target, min_onnxruntime

Progress = Callable[[str], None]
TFLITE_WEIGHTS = {"float32": "float32", "float16": "float16", "int8-dynamic": "int8"}
STEPS_PER_TARGET = 4  # convert, parity, reference, pack


def _quiet(_: str) -> None:
    pass


@dataclass
class Artifact:
    """One produced model file with everything needed to bundle it."""

    target: Target
    data: bytes
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    runtime: dict[str, Any]
    parity: ParityReport
    profile: DriftProfile
    smoke: SmokeSamples
    source: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def format(self) -> str:
        return self.target.format

    def provenance(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target.to_json(),
            "parity": self.parity.to_json(),
            "conversion": {"notes": list(self.notes), "seconds": round(self.seconds, 3)},
            "drift_reference": {
                "samples": self.profile.sample_count,
                "reduction": self.profile.reduction,
            },
        }


# -- producing the model file ---------------------------------------------------


def float32_onnx_for(
    model: Any, max_ir: int | None, max_opset: int | None, max_ml: int | None = None
) -> tuple[Any, list[str]]:
    """The float32 ONNX model an ONNX target gets: checked for inference mode,
    lowered to the limits, optimized offline. Returns (model, notes)."""
    check_inference_mode(model)
    model = onnx_tools.loadable_by_installed_ort(model)
    model, notes = onnx_tools.lower(model, max_ir, max_opset, max_ml)
    model = onnx_tools.optimize(model)
    notes.append("optimized (onnxruntime basic level)")
    return model, notes


def _onnx_artifact(
    source: SourceModel, target: Target, samples: Mapping[str, np.ndarray]
) -> tuple[bytes, list[str]]:
    import onnx

    if source.onnx_model is None:
        raise TargetError(
            f"a {source.origin} source can only produce TFLite targets (pass-through); "
            "convert the original model to get an ONNX artifact"
        )
    max_ir, max_opset, max_ml = target.limits
    model, notes = float32_onnx_for(source.onnx_model, max_ir, max_opset, max_ml)
    model, qnotes = apply_precision(model, target.precision, samples)
    notes.extend(qnotes)
    final_opset = onnx_tools.opsets(model).get("", 0)
    if max_opset is not None and final_opset > max_opset:
        raise TargetError(
            f"{target.precision} needs opset {final_opset}, the target allows {max_opset}; "
            "choose float32 or a newer runtime for this device class"
        )
    if max_ir is not None:
        onnx_tools.set_ir_version(model, max_ir)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise TargetError(f"the produced ONNX model does not pass the checker: {e}") from e
    return model.SerializeToString(), notes


def _tflite_artifact(source: SourceModel, target: Target) -> tuple[bytes, list[str]]:
    if source.tflite_bytes is not None:
        if target.precision != "float32":
            raise TargetError(
                "a TFLite source is passed through as it is; re-quantizing it is not "
                "supported (target precision float32)"
            )
        return source.tflite_bytes, ["TFLite source passed through"]
    try:
        from converters.tflite import onnx_to_tflite
    except ImportError as e:
        raise TargetUnavailableError(
            "the ONNX -> TFLite writer (converters.tflite) is not available in this "
            "installation; target ONNX instead"
        ) from e
    assert source.onnx_model is not None
    model = onnx_tools.optimize(onnx_tools.loadable_by_installed_ort(source.onnx_model))
    try:
        data = onnx_to_tflite(model, weights=TFLITE_WEIGHTS[target.precision])
    except ConverterError:
        raise
    except Exception as e:  # keep one error root for callers
        raise TargetError(f"ONNX -> TFLite conversion failed: {e}") from e
    return bytes(data), [f"ONNX -> TFLite ({TFLITE_WEIGHTS[target.precision]} weights)"]


class _ArtifactRunner:
    """Runs a produced model file with the runtime a device would use."""

    def __init__(self, data: bytes, fmt: str) -> None:
        from device_agent.runtime import load_backend

        self._dir = tempfile.TemporaryDirectory(prefix="edgefleet-artifact-")
        path = Path(self._dir.name) / f"model.{fmt}"
        path.write_bytes(data)
        self.backend = load_backend(path, fmt)
        self.runtime = f"{self.backend.name} {getattr(self.backend, 'version', '')}".strip()
        if fmt == "onnx":
            from .introspect import onnx_signature

            self.inputs, self.outputs, self.requirements = onnx_signature(path)
        else:
            from .introspect import tflite_signature

            self.inputs, self.outputs, self.requirements = tflite_signature(path)

    def run(
        self, samples: Mapping[str, np.ndarray], source_inputs: Sequence[str]
    ) -> list[np.ndarray]:
        names = self.backend.input_names
        # Positional match: TFLite writers may rename tensors.
        feed = {names[i]: samples[n] for i, n in enumerate(source_inputs)}
        return [np.asarray(o) for o in self.backend.run(feed)]

    def close(self) -> None:
        self._dir.cleanup()


def convert(
    source: SourceModel,
    target: Target,
    *,
    samples: Mapping[str, np.ndarray] | np.ndarray | None = None,
    reference_samples: Mapping[str, np.ndarray] | np.ndarray | None = None,
    tolerance: Tolerance | None = None,
    allow_parity_failure: bool = False,
    progress: Progress = _quiet,
) -> Artifact:
    """Produce, check and describe one artifact of ``source`` for ``target``.

    ``samples`` are calibration samples (also used for parity and static
    quantization); when None they are generated from the input signature.
    ``reference_samples`` (e.g. training data) feed the drift reference
    instead of the calibration samples when given.
    Raises :class:`ParityError` (with ``.report``) when the artifact is over
    tolerance and ``allow_parity_failure`` is false.
    """
    started = time.perf_counter()
    if samples is None:
        calib = generate_samples(source.inputs)
        origin = "generated from the input signature"
    else:
        calib = check_samples(source.inputs, samples)
        origin = "operator"
    progress(f"{target.name}: converting")
    if target.format == "onnx":
        data, notes = _onnx_artifact(source, target, calib)
    else:
        data, notes = _tflite_artifact(source, target)
    progress(f"{target.name}: checking parity")
    runner = _ArtifactRunner(data, target.format)
    try:
        in_names = [s.name for s in source.inputs]
        produced = runner.run(calib, in_names)
        expected = source.reference(calib)
        tol = tolerance or default_tolerance(target.precision)
        report = compare(
            variant=target.name,
            precision=target.precision,
            names=[o.name for o in source.outputs],
            tasks=source.tasks,
            reference=expected,
            produced=produced,
            tolerance=tol,
            reference_runtime=source.reference_runtime,
            artifact_runtime=runner.runtime,
            samples=sample_count(calib),
            samples_origin=origin,
            notes=notes,
        )
        if not report.passed:
            if not allow_parity_failure:
                raise ParityError(
                    f"{target.name} is over its parity tolerance and was not packed: "
                    f"{report.summary()}. Give better calibration samples, a different "
                    "precision, or override the gate deliberately",
                    report,
                )
            report = _overridden(report)
        progress(f"{target.name}: drift reference and smoke samples")
        if reference_samples is not None:
            drift_in = check_samples(source.inputs, reference_samples)
            drift_out = runner.run(drift_in, in_names)
        else:
            drift_in, drift_out = calib, produced
        artifact_in = {runner.inputs[i].name: calib[n] for i, n in enumerate(in_names)}
        out_names = [o.name for o in runner.outputs]
        task = source.tasks.get(source.outputs[0].name, "regression")
        profile = reference.drift_profile(
            runner.inputs[0].name,
            drift_in[in_names[0]],
            out_names[0],
            drift_out[0],
            task,
        )
        smoke = reference.smoke_samples(
            artifact_in, produced, out_names, target.precision, classifier=source.is_classifier
        )
        runtime = dict(runner.requirements)
        if target.format == "onnx":
            ops = runtime.get("opsets", {})
            runtime["min_runtime_version"] = min_onnxruntime(
                int(runtime["onnx_ir_version"]), ops.get("ai.onnx"), ops.get("ai.onnx.ml")
            )
        inputs, outputs = list(runner.inputs), list(runner.outputs)
    finally:
        runner.close()
    return Artifact(
        target=target,
        data=data,
        inputs=inputs,
        outputs=outputs,
        runtime=runtime,
        parity=report,
        profile=profile,
        smoke=smoke,
        source=source.provenance(),
        notes=notes,
        seconds=time.perf_counter() - started,
    )


def _overridden(report: ParityReport) -> ParityReport:
    from dataclasses import replace

    return replace(
        report, overridden=True, notes=(*report.notes, "parity gate overridden by the operator")
    )


# -- packing -------------------------------------------------------------------


def pack_artifact(
    artifact: Artifact,
    out: str | Path,
    *,
    name: str,
    version: int,
    signing_key: Ed25519PrivateKey | None = None,
    labels: Mapping[str, str] | None = None,
    created_at: datetime | None = None,
    valid_for: timedelta = timedelta(days=90),
) -> Path:
    """Write ``artifact`` as a bundle at ``out`` (signed when ``signing_key`` is given)."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-pack-") as tmp:
        d = Path(tmp)
        model = d / f"model.{artifact.format}"
        model.write_bytes(artifact.data)
        profile = d / "drift_profile.json"
        profile.write_bytes(canonical_json(artifact.profile.to_json()))
        smoke = d / "smoke_samples.json"
        smoke.write_bytes(json.dumps(artifact.smoke.to_json()).encode())
        files = [
            BundleFile(model, model.name, "model"),
            BundleFile(profile, profile.name, "drift_profile"),
            BundleFile(smoke, smoke.name, "smoke_samples"),
        ]
        manifest = build_manifest(
            name=name,
            version=version,
            fmt=artifact.format,
            files=files,
            inputs=artifact.inputs,
            outputs=artifact.outputs,
            runtime=artifact.runtime,
            target_device_classes=artifact.target.device_classes,
            provenance=artifact.provenance(),
            labels={"precision": artifact.target.precision, **(labels or {})},
            created_at=created_at,
            valid_for=valid_for,
        )
        path = pack_bundle(out, manifest, files)
    if signing_key is not None:
        sign_bundle(path, signing_key)
    return path


def save_artifact(artifact: Artifact, out_dir: str | Path, stem: str) -> Path:
    """Write the model file and ``STEM.parity.json`` (its provenance) durably."""
    out_dir = Path(out_dir)
    path = out_dir / f"{stem}.{artifact.format}"
    atomic_write_bytes(path, artifact.data)
    report = json.dumps(artifact.provenance(), indent=2) + "\n"
    atomic_write_bytes(out_dir / f"{stem}.parity.json", report.encode())
    return path


@dataclass
class BuildResult:
    """What :func:`build_bundles` did per target: a bundle path or the refusal."""

    target: Target
    artifact: Artifact | None
    bundle: Path | None
    error: Exception | None = None


def build_bundles(
    source: SourceModel,
    targets: Sequence[Target],
    out_dir: str | Path,
    *,
    name: str,
    version: int,
    signing_key: Ed25519PrivateKey | None = None,
    samples: Mapping[str, np.ndarray] | np.ndarray | None = None,
    reference_samples: Mapping[str, np.ndarray] | np.ndarray | None = None,
    tolerances: Mapping[str, Tolerance] | None = None,
    allow_parity_failure: bool = False,
    labels: Mapping[str, str] | None = None,
    valid_for: timedelta = timedelta(days=90),
    progress: Progress = _quiet,
) -> list[BuildResult]:
    """Convert ``source`` for every target and pack each passing artifact.

    A target that fails (parity, lowering, unsupported operator...) does not
    stop the others; its :class:`BuildResult` carries the error. Bundles are
    named ``NAME-vVERSION-TARGET.efb``. ``tolerances`` maps a target name to
    an override of its default tolerance.
    """
    out_dir = Path(out_dir)
    results = []
    for target in targets:
        try:
            artifact = convert(
                source,
                target,
                samples=samples,
                reference_samples=reference_samples,
                tolerance=(tolerances or {}).get(target.name),
                allow_parity_failure=allow_parity_failure,
                progress=progress,
            )
        except ConverterError as e:
            results.append(BuildResult(target, None, None, e))
            continue
        progress(f"{target.name}: packing and signing")
        path = pack_artifact(
            artifact,
            out_dir / f"{name}-v{version}-{target.name}.efb",
            name=name,
            version=version,
            signing_key=signing_key,
            labels=labels,
            valid_for=valid_for,
        )
        results.append(BuildResult(target, artifact, path))
    return results
