"""`edgefleet convert` and `edgefleet bundle build`: model -> checked artifacts -> signed bundles.

The commands parse arguments, call :mod:`converters.pipeline` and print what
happened; conversion libraries are imported only when a command runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from converters.errors import IntakeError
from fleet_server.cli._common import (
    handle_errors,
    keys_dir_option,
    parse_labels,
    passphrase_options,
    read_passphrase,
)


def _load_samples(path: Path | None) -> Any:
    """``.npy`` -> one array (single-input models); ``.npz`` -> {input name: array}."""
    if path is None:
        return None
    import numpy as np

    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IntakeError(f"cannot read samples {path}: {e}; give a .npy or .npz file") from e


def _progress(total: int) -> tuple[Callable[[str], None], Callable[[], None]]:
    """A progress bar on stderr; returns (step callback, finish)."""
    bar = click.progressbar(
        length=total,
        label="converting",
        file=sys.stderr,
        item_show_func=lambda s: s,
        show_eta=False,
        width=24,
    )
    bar.__enter__()

    def step(label: str) -> None:
        bar.update(1, label)

    def finish() -> None:
        bar.update(total - bar.pos)
        bar.__exit__(None, None, None)

    return step, finish


def _row(name: str, status: str, report: Any, size: str, where: str) -> list[str]:
    if report is None or not report.outputs:
        return [name, status, "", "", "", "", size, where]
    o = report.outputs[0]
    top1 = "" if o.top1_agreement is None else f"{o.top1_agreement:.3f}"
    return [
        name,
        status,
        o.name,
        f"{o.max_abs_error:.2e}",
        f"{o.max_rel_error:.2e}",
        top1,
        size,
        where,
    ]


def _table(rows: list[list[str]]) -> str:
    head = ["target", "status", "output", "max abs", "max rel", "top-1", "size", "file"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *rows]
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


_common_options: list[Callable[[Any], Any]] = [
    click.argument("model", type=click.Path(dir_okay=False, exists=True, path_type=Path)),
    click.option(
        "--target",
        "targets",
        multiple=True,
        metavar="SPEC",
        help="Target FORMAT[:PRECISION][@onnxruntime-X.Y | @irN/opsetM], e.g. onnx, "
        "onnx:int8-dynamic@onnxruntime-1.16, tflite:float16 (repeatable; "
        "default onnx).",
    ),
    click.option(
        "--samples",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="Calibration samples (.npy for one input, .npz by input name); "
        "generated from the input signature when omitted.",
    ),
    click.option(
        "--validation-samples",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="Samples parity is judged on (default: held out from --samples when the "
        "target calibrates on them, else --samples itself).",
    ),
    click.option(
        "--reference-samples",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="Training-like samples for the drift reference (default: --samples).",
    ),
    click.option(
        "--input-shape",
        metavar="N,C,H,W",
        help="Example input shape for a TorchScript / torch.export (.pt) model.",
    ),
    click.option(
        "--trust-pickle",
        is_flag=True,
        help="Allow a pickled scikit-learn model (.joblib/.pkl). Unpickling runs "
        "code from the file: only for files you trust.",
    ),
    click.option(
        "--task",
        type=click.Choice(["auto", "classification", "regression"]),
        default="auto",
        show_default=True,
        help="How outputs are judged; auto: [N, C>=2] float outputs are class scores.",
    ),
    click.option(
        "--atol", type=float, help="Override the parity bound: max absolute error per element."
    ),
    click.option(
        "--min-top1",
        type=click.FloatRange(0, 1),
        help="Override the parity bound: judge classifier outputs by top-1 agreement.",
    ),
    click.option(
        "--allow-parity-failure",
        is_flag=True,
        help="Keep variants that fail parity (the report records the override).",
    ),
    click.option(
        "--allow-unquantized",
        is_flag=True,
        help="Pack a quantized target that quantized nothing as the float32 model, "
        "labelled unquantized (refused by default).",
    ),
    click.option(
        "--device-class",
        "device_classes",
        multiple=True,
        help="Device class the artifacts are for (repeatable).",
    ),
]


def common_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_common_options):
        f = option(f)
    return f


def _source(
    model: Path, samples: Any, input_shape: str | None, trust_pickle: bool, task: str
) -> Any:
    from converters.source import load_source, parse_shape

    if model.suffix.lower() in (".joblib", ".pkl", ".pickle"):
        click.secho(
            f"warning: loading {model.name} unpickles it, which runs code from the file",
            fg="yellow",
            err=True,
        )
        if samples is not None and not hasattr(samples, "shape"):
            samples = next(iter(samples.values()))
    return load_source(
        model,
        input_shape=parse_shape(input_shape) if input_shape else None,
        example_inputs=samples if hasattr(samples, "shape") else None,
        allow_pickle=trust_pickle,
        task=None if task == "auto" else task,
    )


def _tolerance(atol: float | None, min_top1: float | None) -> Any:
    if atol is None and min_top1 is None:
        return None
    from converters.parity import Tolerance

    return Tolerance(atol=atol, min_top1=min_top1)


def _run(
    model: Path,
    targets: tuple[str, ...],
    samples_path: Path | None,
    reference_path: Path | None,
    input_shape: str | None,
    trust_pickle: bool,
    task: str,
    atol: float | None,
    min_top1: float | None,
    allow_parity_failure: bool,
    device_classes: tuple[str, ...],
    out_dir: Path,
    pack: dict[str, Any] | None,
    validation_samples: Path | None = None,
    allow_unquantized: bool = False,
) -> None:
    from converters.pipeline import (
        STEPS_PER_TARGET,
        BuildResult,
        build_bundles,
        save_artifacts,
    )
    from converters.targets import parse_target

    specs = [parse_target(t, tuple(device_classes)) for t in (targets or ("onnx",))]
    samples = _load_samples(samples_path)
    reference = _load_samples(reference_path)
    validation = _load_samples(validation_samples)
    click.echo(f"reading {model}", err=True)
    source = _source(model, samples, input_shape, trust_pickle, task)
    tol = _tolerance(atol, min_top1)
    out_dir.mkdir(parents=True, exist_ok=True)
    step, finish = _progress(len(specs) * STEPS_PER_TARGET)
    results: list[BuildResult] = []
    try:
        if pack is not None:
            results = build_bundles(
                source,
                specs,
                out_dir,
                samples=samples,
                validation_samples=validation,
                reference_samples=reference,
                tolerances={s.name: tol for s in specs} if tol else None,
                allow_parity_failure=allow_parity_failure,
                allow_unquantized=allow_unquantized,
                progress=step,
                **pack,
            )
        else:
            results = save_artifacts(
                source,
                specs,
                out_dir,
                model.stem,
                samples=samples,
                validation_samples=validation,
                reference_samples=reference,
                tolerance=tol,
                allow_parity_failure=allow_parity_failure,
                allow_unquantized=allow_unquantized,
                progress=step,
            )
    finally:
        finish()
    _report(results)


def _report(results: list[Any]) -> None:
    rows, failures = [], []
    for r in results:
        if r.error is None:
            size = f"{len(r.artifact.data) / 1024:.1f} KiB"
            status = "ok" if r.artifact.parity.passed else "OVERRIDDEN"
            rows.append(_row(r.target.name, status, r.artifact.parity, size, str(r.bundle)))
        else:
            report = getattr(r.error, "report", None)
            rows.append(_row(r.target.name, f"REFUSED [{r.code}]", report, "", ""))
            failures.append(r)
    click.echo(_table(rows))
    for r in failures:
        click.echo(f"refused {r.target.name} [{r.code}]: {r.message}")
    if failures:
        click.secho(
            f"{len(failures)} of {len(results)} targets refused (see above); "
            f"{len(results) - len(failures)} built",
            fg="red",
            err=True,
        )
        sys.exit(1)


def _signing(
    keys_dir: Path, key: str, passphrase_env: str | None, passphrase_file: Path | None
) -> Any:
    from converters.keys import KeyStore

    store = KeyStore(keys_dir)
    kid = store.resolve(key)
    passphrase = read_passphrase(passphrase_env, passphrase_file)
    if passphrase is None and store.info(kid).encrypted:
        passphrase = click.prompt(f"Passphrase for {kid}", hide_input=True).encode()
    return store.private_key(kid, passphrase)


def _pack_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option("--name", help="Model name in the bundle (letters, digits, '._-')."),
            click.option(
                "--version",
                "version",
                type=click.IntRange(min=0),
                help="Monotonically increasing integer bundle version.",
            ),
            click.option("--key", help="Signing key id, id prefix or name (from --keys-dir)."),
            click.option("--label", "labels", multiple=True, help="key=value label (repeatable)."),
            click.option(
                "--valid-days",
                type=click.IntRange(min=1),
                default=90,
                show_default=True,
                help="Days until the bundles expire on devices.",
            ),
        ]
    ):
        f = option(f)
    return f


@click.command("convert")
@common_options
@click.option(
    "--out-dir",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where artifacts (or bundles, with --pack) are written.",
)
@click.option(
    "--pack",
    is_flag=True,
    help="Pack and sign each passing artifact into a bundle (needs --name, --version, --key).",
)
@_pack_options
@passphrase_options
@keys_dir_option
@handle_errors
def convert(
    model: Path,
    targets: tuple[str, ...],
    samples: Path | None,
    reference_samples: Path | None,
    input_shape: str | None,
    trust_pickle: bool,
    task: str,
    atol: float | None,
    min_top1: float | None,
    allow_parity_failure: bool,
    device_classes: tuple[str, ...],
    out_dir: Path,
    pack: bool,
    name: str | None,
    version: int | None,
    key: str | None,
    labels: tuple[str, ...],
    valid_days: int,
    passphrase_env: str | None,
    passphrase_file: Path | None,
    keys_dir: Path,
    **more: Any,
) -> None:
    """Convert MODEL (.onnx, .tflite, .pt/.pt2, .joblib/.pkl) for one or more targets.

    Every artifact is checked for parity against MODEL in its own runtime; one
    over its tolerance is refused (exit status 1) unless --allow-parity-failure.
    Without --pack, writes each artifact and its parity report (JSON) to --out-dir.
    """
    pack_args = None
    if pack:
        pack_args = _pack_args(
            name, version, key, labels, valid_days, passphrase_env, passphrase_file, keys_dir
        )
    _run(
        model,
        targets,
        samples,
        reference_samples,
        input_shape,
        trust_pickle,
        task,
        atol,
        min_top1,
        allow_parity_failure,
        device_classes,
        out_dir,
        pack_args,
        **more,
    )


def _pack_args(
    name: str | None,
    version: int | None,
    key: str | None,
    labels: tuple[str, ...],
    valid_days: int,
    passphrase_env: str | None,
    passphrase_file: Path | None,
    keys_dir: Path,
) -> dict[str, Any]:
    missing = [
        opt for opt, v in (("--name", name), ("--version", version), ("--key", key)) if v is None
    ]
    if missing:
        raise click.UsageError(f"packing bundles needs {', '.join(missing)}")
    assert key is not None
    return {
        "name": name,
        "version": version,
        "signing_key": _signing(keys_dir, key, passphrase_env, passphrase_file),
        "labels": parse_labels(labels),
        "valid_for": timedelta(days=valid_days),
    }


@click.command("build")
@common_options
@click.option(
    "--out-dir",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where the bundles are written.",
)
@_pack_options
@passphrase_options
@keys_dir_option
@handle_errors
def bundle_build(
    model: Path,
    targets: tuple[str, ...],
    samples: Path | None,
    reference_samples: Path | None,
    input_shape: str | None,
    trust_pickle: bool,
    task: str,
    atol: float | None,
    min_top1: float | None,
    allow_parity_failure: bool,
    device_classes: tuple[str, ...],
    out_dir: Path,
    name: str | None,
    version: int | None,
    key: str | None,
    labels: tuple[str, ...],
    valid_days: int,
    passphrase_env: str | None,
    passphrase_file: Path | None,
    keys_dir: Path,
    **more: Any,
) -> None:
    """Convert MODEL for each --target, check parity, and write signed bundles.

    Same as `edgefleet convert --pack`. Bundles are named NAME-vVERSION-TARGET.efb;
    each carries the model, its drift reference, smoke samples, and the parity
    report in the manifest's provenance.
    """
    pack_args = _pack_args(
        name, version, key, labels, valid_days, passphrase_env, passphrase_file, keys_dir
    )
    _run(
        model,
        targets,
        samples,
        reference_samples,
        input_shape,
        trust_pickle,
        task,
        atol,
        min_top1,
        allow_parity_failure,
        device_classes,
        out_dir,
        pack_args,
        **more,
    )
