"""A model loaded from an installed slot, and its post-install smoke test.

Slots hold a bundle that :func:`device_agent.bundle.unpack_bundle` already
verified; loading re-reads the manifest from the slot (the install wrote it
from the verified bytes) and opens the model with the matching runtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle.manifest import MANIFEST_NAME, Manifest
from .payloads import DriftProfile, SmokeSamples
from .quant_io import QuantizedIO, quantized_io, served_spec
from .runtime import Backend, Runner, TensorSpec, load_backend


class SmokeTestError(Exception):
    """The model's outputs on its own smoke samples do not match the expected ones."""

    code = "smoke_test_failed"


@dataclass
class LoadedModel:
    """An installed bundle opened for inference.

    ``io`` is the model's quantized inputs and outputs (None when its I/O is float, or
    its manifest records no quantization): :meth:`run` and :meth:`fast_runner` then take
    real values, quantize them on feed and return real outputs (:mod:`.quant_io`), and
    :attr:`inputs` / :attr:`outputs` describe those tensors as float32.
    """

    manifest: Manifest
    slot: str
    path: Path
    backend: Backend
    profile: DriftProfile | None
    smoke: SmokeSamples | None
    io: QuantizedIO | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def inputs(self) -> list[TensorSpec]:
        """The inputs as the application feeds them (quantized ones as float32)."""
        if self.io is None:
            return self.backend.inputs
        return [served_spec(s, self.io.inputs.get(s.name)) for s in self.backend.inputs]

    @property
    def outputs(self) -> list[TensorSpec]:
        """The outputs as :meth:`run` returns them (quantized ones dequantized, float32)."""
        if self.io is None:
            return self.backend.outputs
        return [
            served_spec(s, q) for s, q in zip(self.backend.outputs, self.io.outputs, strict=True)
        ]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.io is None:
            return self.backend.run(inputs)
        return self.io.wrap(self.backend.run)(inputs)  # type: ignore[arg-type]

    def fast_runner(self) -> Runner:
        """The backend's fast runner; wrapped to quantize and dequantize when ``io`` is set."""
        run = self.backend.fast_runner()
        return run if self.io is None else self.io.wrap(run)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else {"placeholder": True}


def load_model(slot_dir: str | Path, slot: str = "", threads: int = 1) -> LoadedModel:
    """Open the verified bundle installed in ``slot_dir``."""
    slot_dir = Path(slot_dir)
    manifest = Manifest.from_bytes((slot_dir / MANIFEST_NAME).read_bytes())
    backend = load_backend(slot_dir / manifest.model_file.path, manifest.format, threads)
    profile_entry = manifest.file("drift_profile")
    smoke_entry = manifest.file("smoke_samples")
    profile = (
        DriftProfile.from_json(_read_json(slot_dir / profile_entry.path)) if profile_entry else None
    )
    smoke = SmokeSamples.from_json(_read_json(slot_dir / smoke_entry.path)) if smoke_entry else None
    io = quantized_io(
        f"{manifest.name} v{manifest.version}",
        manifest.inputs,
        manifest.outputs,
        backend.inputs,
        backend.outputs,
    )
    return LoadedModel(manifest, slot or slot_dir.name, slot_dir, backend, profile, smoke, io)


def run_smoke_test(model: LoadedModel) -> dict[str, Any]:
    """Run the bundle's smoke samples; raise :class:`SmokeTestError` on a mismatch.

    Returns a small report (``{"ran": bool, "max_abs_error": ..., ...}``).
    """
    smoke = model.smoke
    if smoke is None:
        return {"ran": False, "reason": "bundle carries no smoke samples"}
    try:
        outputs = model.run(dict(smoke.inputs))
    except Exception as e:  # any runtime failure on known-good inputs is a failed smoke test
        raise SmokeTestError(
            f"{model.name} v{model.version} failed to run its smoke samples: {e}"
        ) from e
    names = model.backend.output_names
    report: dict[str, Any] = {"ran": True, "check": smoke.check, "outputs": {}}
    for name, expected in smoke.expected.items():
        if name not in names:
            raise SmokeTestError(f"smoke samples expect output {name!r}, model has {names}")
        got = np.asarray(outputs[names.index(name)])
        if got.shape != expected.shape:
            raise SmokeTestError(
                f"output {name!r} has shape {got.shape}, smoke samples expect {expected.shape}"
            )
        if smoke.check == "top1":
            agree = float(np.mean(got.argmax(-1) == expected.argmax(-1)))
            report["outputs"][name] = {"top1_agreement": agree}
            if agree < smoke.min_top1_agreement:
                raise SmokeTestError(
                    f"output {name!r}: top-1 agreement {agree:.3f} below "
                    f"{smoke.min_top1_agreement:.3f}; the installed model does not compute "
                    "what was converted"
                )
        else:
            err = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
            report["outputs"][name] = {"max_abs_error": err}
            if not np.allclose(got, expected, atol=smoke.atol, rtol=smoke.rtol):
                raise SmokeTestError(
                    f"output {name!r}: max abs error {err:.3g} exceeds atol {smoke.atol:g} / "
                    f"rtol {smoke.rtol:g}; the installed model does not compute what was "
                    "converted"
                )
    report["warm_up_calls"] = warm_up(model)
    return report


def warm_up(model: LoadedModel, calls: int = 8) -> int:
    """Run single-row predictions on the smoke inputs before the model serves.

    The first calls of a fresh session or interpreter pay for allocation and
    (for TFLite) resizing to the serving batch size; doing that here keeps it
    out of the latency figures a rollout's gates compare.
    """
    smoke = model.smoke
    if smoke is None:
        return 0
    row = {k: v[:1] for k, v in smoke.inputs.items()}
    for _ in range(calls):
        model.run(row)
    return calls
