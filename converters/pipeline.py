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
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent._fsutil import atomic_write_bytes
from device_agent.bundle.manifest import TensorSpec, canonical_json
from device_agent.payloads import DriftProfile, SmokeSamples

from . import reference
from .bundle import BundleFile, build_manifest, pack_bundle, sign_bundle
from .errors import (
    ArtifactLoadError,
    ConverterError,
    ParityError,
    SampleError,
    UnexpectedConverterError,
    error_code,
)
from .parity import ParityReport, Tolerance, compare_batches, default_tolerance
from .produce import TFLITE_WEIGHTS, onnx_artifact, tflite_artifact
from .quantization_report import QuantizationSummary
from .samples import (
    batches,
    check_samples,
    generate_samples,
    sample_count,
    split_samples,
    take,
)
from .source import SourceModel
from .targets import Target, min_onnxruntime

Progress = Callable[[str], None]
__all__ = [
    "TFLITE_WEIGHTS",
    "Artifact",
    "BuildResult",
    "build_bundles",
    "convert",
    "pack_artifact",
    "save_artifact",
    "save_artifacts",
]
STEPS_PER_TARGET = 4  # convert, parity, reference, pack
#: precisions that calibrate on samples: refused without them, parity on the rest
CALIBRATED = ("int8-static", "int8-full", "int8-full-io")


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
    quantization: QuantizationSummary | None = None
    #: how the image layout of the drift reference was decided ("" for other inputs)
    layout_from: str = ""

    @property
    def format(self) -> str:
        return self.target.format

    @property
    def precision(self) -> str:
        """The precision the model file has: the target's, or float32 when packed unquantized."""
        q = self.quantization
        return "float32" if q is not None and q.packed_unquantized else self.target.precision

    def labels(self) -> dict[str, str]:
        """Manifest labels saying what the model file is."""
        out = {"precision": self.precision}
        if self.precision != self.target.precision:
            out.update(requested_precision=self.target.precision, quantized="no")
        return out

    def provenance(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target.to_json(),
            "parity": self.parity.to_json(),
            "conversion": {"notes": list(self.notes), "seconds": round(self.seconds, 3)},
            **({"quantization": self.quantization.to_json()} if self.quantization else {}),
            "drift_reference": {
                "samples": self.profile.sample_count,
                "reduction": self.profile.reduction,
                **(
                    {"layout": self.profile.layout, "layout_from": self.layout_from}
                    if self.profile.layout
                    else {}
                ),
            },
        }


# -- producing the model file ---------------------------------------------------


class _ArtifactRunner:
    """Runs a produced model file with the runtime a device would use."""

    def __init__(self, data: bytes, fmt: str, target: str) -> None:
        from device_agent.runtime import BackendError, load_backend

        self.target = target
        self._dir = tempfile.TemporaryDirectory(prefix="edgefleet-artifact-")
        path = Path(self._dir.name) / f"model.{fmt}"
        path.write_bytes(data)
        try:
            self.backend = load_backend(path, fmt)
        except BackendError as e:
            self._dir.cleanup()
            raise ArtifactLoadError(
                f"{target}: the device runtime refuses the produced model ({e}). The "
                "converter cannot make this model for this target; choose another "
                "precision or format for it"
            ) from e
        self.runtime = f"{self.backend.name} {getattr(self.backend, 'version', '')}".strip()
        if fmt == "onnx":
            from .introspect import onnx_signature

            self.inputs, self.outputs, self.requirements = onnx_signature(path)
        else:
            from .introspect import tflite_signature

            self.inputs, self.outputs, self.requirements = tflite_signature(path)
        # integer inputs/outputs: parity feeds and reads real values the way devices do
        # (device_agent.quant_io: quantize on feed, dequantize the outputs)
        from device_agent.quant_io import quantized_io

        qio = quantized_io(
            target, self.inputs, self.outputs, self.backend.inputs, self.backend.outputs
        )
        self._run = qio.wrap(self.backend.run) if qio is not None else self.backend.run

    def batch_sizes(self, available: int) -> list[int]:
        """Batch sizes to check: for a free batch dimension 1 (how devices serve) and the
        smoke-test batch (how devices check an install); else the fixed batch."""
        shape = self.inputs[0].shape if self.inputs else ()
        fixed = shape[0] if shape and isinstance(shape[0], int) else None
        if fixed is None:
            return sorted({1, min(available, reference.SMOKE_COUNT)})
        if fixed > available:
            raise SampleError(
                f"{self.target}: the artifact takes batches of exactly {fixed}; give at "
                f"least {fixed} validation samples (there are {available})"
            )
        return [fixed]

    def run(
        self, samples: Mapping[str, np.ndarray], source_inputs: Sequence[str]
    ) -> list[np.ndarray]:
        names = self.backend.input_names
        # Positional match: TFLite writers may rename tensors.
        feed = {names[i]: samples[n] for i, n in enumerate(source_inputs)}
        try:
            return [np.asarray(o) for o in self._run(feed)]
        except Exception as e:  # runtimes raise their own types (Fail, ValueError, ...)
            raise ArtifactLoadError(
                f"{self.target}: the produced model fails to run in {self.runtime} on "
                f"{sample_count(samples)} samples: {e}"
            ) from e

    def run_batched(
        self, samples: Mapping[str, np.ndarray], source_inputs: Sequence[str], size: int
    ) -> list[np.ndarray]:
        """Outputs over ``samples`` run ``size`` at a time, concatenated."""
        parts = [self.run(b, source_inputs) for b in batches(samples, size)]
        return [np.concatenate([p[i] for p in parts], axis=0) for i in range(len(parts[0]))]

    def close(self) -> None:
        self._dir.cleanup()


def _plan_samples(
    source: SourceModel,
    target: Target,
    samples: Mapping[str, np.ndarray] | np.ndarray | None,
    validation_samples: Mapping[str, np.ndarray] | np.ndarray | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None, dict[str, np.ndarray], str]:
    """(all given samples, calibration samples or None, validation samples, how)."""
    calibrates = target.precision in CALIBRATED
    if calibrates and samples is None:
        raise SampleError(
            f"{target.name} calibrates its int8 activation ranges on representative "
            "inputs, and no calibration samples were given: give --samples (real inputs, "
            "100 or more; a random half is held out to check parity). Inputs generated "
            "from the signature would calibrate ranges that real inputs do not have"
        )
    if samples is None:
        given = generate_samples(source.inputs)
        origin = "generated from the input signature"
    else:
        given = check_samples(source.inputs, samples)
        origin = "operator"
    if validation_samples is not None:
        validation = check_samples(source.inputs, validation_samples)
        how = f"{sample_count(validation)} validation samples given apart from calibration"
        return given, given if calibrates else None, validation, f"{origin}; {how}"
    if samples is None:
        validation = generate_samples(source.inputs, seed=1)
        how = f"{sample_count(validation)} validation samples generated apart from calibration"
        return given, given if calibrates else None, validation, f"{origin}; {how}"
    calibration, validation, how = split_samples(given, calibrates)
    return given, calibration, validation, f"{origin}; {how}"


def convert(
    source: SourceModel,
    target: Target,
    *,
    samples: Mapping[str, np.ndarray] | np.ndarray | None = None,
    validation_samples: Mapping[str, np.ndarray] | np.ndarray | None = None,
    reference_samples: Mapping[str, np.ndarray] | np.ndarray | None = None,
    tolerance: Tolerance | None = None,
    allow_parity_failure: bool = False,
    allow_unquantized: bool = False,
    progress: Progress = _quiet,
) -> Artifact:
    """Produce, check and describe one artifact of ``source`` for ``target``.

    ``samples`` calibrate static quantization and, for the part held out
    (:func:`~converters.samples.split_samples`), check parity; when None they are
    generated from the input signature (validation samples then too, separately),
    except for a target that calibrates (:data:`CALIBRATED`), which is refused
    (:class:`~converters.errors.SampleError`).
    ``validation_samples`` give the parity set explicitly. Parity is checked the
    way devices run: one sample at a time, and at the other batch sizes the artifact
    allows (see :mod:`converters.parity`). ``reference_samples`` (e.g. training
    data) feed the drift reference instead of the samples when given.

    Raises :class:`ParityError` (with ``.report``) when the artifact is over
    tolerance and ``allow_parity_failure`` is false, and
    :class:`~converters.errors.NothingQuantizedError` when a quantized precision
    changed nothing, unless ``allow_unquantized`` (the float32 model is then
    produced, labelled unquantized).
    """
    started = time.perf_counter()
    given, calibration, validation, samples_origin = _plan_samples(
        source, target, samples, validation_samples
    )
    progress(f"{target.name}: converting")
    if target.format == "onnx":
        produced = onnx_artifact(source, target, calibration or {}, allow_unquantized)
    else:
        produced = tflite_artifact(source, target, allow_unquantized, calibration)
    data, notes = produced.data, produced.notes
    precision = produced.precision_packed or target.precision
    progress(f"{target.name}: checking parity")
    runner = _ArtifactRunner(data, target.format, target.name)
    try:
        in_names = [s.name for s in source.inputs]
        sizes = runner.batch_sizes(sample_count(validation))
        if len(sizes) == 1 and sizes[0] > 1:
            validation = take(validation, slice(0, sample_count(validation) // sizes[0] * sizes[0]))
        by_batch = {b: runner.run_batched(validation, in_names, b) for b in sizes}
        expected = source.reference(validation)
        tol = tolerance or default_tolerance(precision)
        report = compare_batches(
            produced_by_batch=by_batch,
            judged_at=sizes[:1],
            calibration_samples=sample_count(calibration) if calibration is not None else None,
            variant=target.name,
            precision=precision,
            names=[o.name for o in source.outputs],
            tasks=source.tasks,
            reference=expected,
            tolerance=tol,
            reference_runtime=source.reference_runtime,
            artifact_runtime=runner.runtime,
            samples=sample_count(validation),
            samples_origin=samples_origin,
            notes=notes,
        )
        report = replace(report, held_out=True)  # no validation sample calibrated
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
        drift_in = (
            check_samples(source.inputs, reference_samples)
            if reference_samples is not None
            else given
        )
        drift_out = runner.run_batched(drift_in, in_names, sizes[-1])
        drift_in = take(drift_in, slice(0, len(drift_out[0])))
        one_by_one = by_batch[sizes[0]]
        artifact_in = {runner.inputs[i].name: validation[n] for i, n in enumerate(in_names)}
        out_names = [o.name for o in runner.outputs]
        task = source.tasks.get(source.outputs[0].name, "regression")
        x0 = drift_in[in_names[0]]
        # no layout is recorded for a model's inputs: infer it, and say so (provenance)
        layout, layout_from = (
            reference.image_layout(x0.shape, source.origin) if np.ndim(x0) == 4 else ("", "")
        )
        profile = reference.drift_profile(
            runner.inputs[0].name, x0, out_names[0], drift_out[0], task, layout=layout or None
        )
        smoke = reference.smoke_samples(
            artifact_in, one_by_one, out_names, precision, classifier=source.is_classifier
        )
        # The device runs the smoke samples as one batch: expect what that batch gives.
        smoke_in = {n: smoke.inputs[runner.inputs[i].name] for i, n in enumerate(in_names)}
        smoke = replace(
            smoke, expected=dict(zip(out_names, runner.run(smoke_in, in_names), strict=True))
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
        quantization=produced.quantization,
        layout_from=layout_from,
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
            labels={**artifact.labels(), **(labels or {})},
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

    @property
    def code(self) -> str:
        """``ok``, or the refusal's code (``parity``, ``nothing_quantized``, ...)."""
        return "ok" if self.error is None else error_code(self.error)

    @property
    def message(self) -> str:
        return "" if self.error is None else str(self.error)


def _guarded(target: Target, work: Callable[[], BuildResult]) -> BuildResult:
    """Run one target's work; any failure becomes that target's refusal."""
    try:
        return work()
    except ConverterError as e:
        return BuildResult(target, None, None, e)
    except Exception as e:  # a library failing on this model must not stop the others
        wrapped = UnexpectedConverterError(
            f"{target.name}: unexpected {type(e).__name__} while building: {e}. The "
            "other targets were still built; please report this with the model"
        )
        wrapped.__cause__ = e
        return BuildResult(target, None, None, wrapped)


def save_artifacts(
    source: SourceModel,
    targets: Sequence[Target],
    out_dir: str | Path,
    stem: str,
    **convert_args: Any,
) -> list[BuildResult]:
    """:func:`convert` every target and :func:`save_artifact` each as ``STEM-TARGET.*``;
    a failing target is recorded like in :func:`build_bundles` and the others still run."""

    def one(target: Target) -> BuildResult:
        artifact = convert(source, target, **convert_args)
        path = save_artifact(artifact, out_dir, f"{stem}-{target.name}")
        return BuildResult(target, artifact, path)

    return [_guarded(t, lambda t=t: one(t)) for t in targets]  # type: ignore[misc]


def build_bundles(
    source: SourceModel,
    targets: Sequence[Target],
    out_dir: str | Path,
    *,
    name: str,
    version: int,
    signing_key: Ed25519PrivateKey | None = None,
    samples: Mapping[str, np.ndarray] | np.ndarray | None = None,
    validation_samples: Mapping[str, np.ndarray] | np.ndarray | None = None,
    reference_samples: Mapping[str, np.ndarray] | np.ndarray | None = None,
    tolerances: Mapping[str, Tolerance] | None = None,
    allow_parity_failure: bool = False,
    allow_unquantized: bool = False,
    labels: Mapping[str, str] | None = None,
    valid_for: timedelta = timedelta(days=90),
    progress: Progress = _quiet,
) -> list[BuildResult]:
    """Convert ``source`` for every target and pack each passing artifact.

    A target that fails (parity, lowering, unsupported operator, a runtime refusing
    the produced file, packing...) does not stop the others: its
    :class:`BuildResult` carries the error (a :class:`ConverterError`; anything else
    is wrapped as :class:`~converters.errors.UnexpectedConverterError`). Bundles are
    named ``NAME-vVERSION-TARGET.efb``. ``tolerances`` maps a target name to an
    override of its default tolerance.
    """
    out_dir = Path(out_dir)

    def one(target: Target) -> BuildResult:
        artifact = convert(
            source,
            target,
            samples=samples,
            validation_samples=validation_samples,
            reference_samples=reference_samples,
            tolerance=(tolerances or {}).get(target.name),
            allow_parity_failure=allow_parity_failure,
            allow_unquantized=allow_unquantized,
            progress=progress,
        )
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
        return BuildResult(target, artifact, path)

    return [_guarded(t, lambda t=t: one(t)) for t in targets]  # type: ignore[misc]
