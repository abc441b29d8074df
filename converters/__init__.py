"""edgefleet converters: turn trained models into signed, parity-checked bundles.

Writing and signing bundles lives here; reading and verifying them lives in
:mod:`device_agent.bundle`, the party that must trust them.

The way through, one module per step (heavy libraries load only when used)::

    source.py     intake: ONNX, torch nn.Module / TorchScript / torch.export,
                  scikit-learn estimators, TFLite -> SourceModel (graph + reference runner)
    targets.py    Target: format, precision, runtime version -> IR/opset limits
    graph_checks.py  refusals every path makes (dropout in training mode)
    onnx_tools.py lowering (IR, opset) and offline optimization of ONNX graphs
    quantize.py   float16, dynamic int8, static int8 (QDQ) for ONNX
    quantization_report.py  what a quantization pass changed (weights, operators, bytes)
    int8_report.py  read from the produced file: weights by dtype, ONNX nodes int8 or
                  float and why (an int8 variant without int8 weights is refused)
    tflite/       ONNX -> TFLite flatbuffer writer (no TensorFlow)
    produce.py    one target's model file (ONNX lowered + precision, or TFLite)
    parity.py     pure comparison of artifact vs source outputs, tolerances
    samples.py    samples: checked, generated, split into calibration / validation
    reference.py  drift reference profile and smoke samples for the device
    pipeline.py   convert() -> Artifact, pack_artifact(), build_bundles()
    bundle.py     manifest, pack, sign; keys.py release signing keys
    packing.py    a model file packed as it is (ONNX external data inlined)
    conformance/  ONNX node test cases through every path (docs/conformance.md)

Example::

    from converters.source import from_torch
    from converters.targets import Target
    from converters.pipeline import build_bundles

    source = from_torch(model, example_batch)
    results = build_bundles(source, [Target("onnx", "int8-dynamic", runtime_version="1.16"),
                                     Target("tflite", "float16")],
                            "out/", name="detector", version=7, signing_key=key,
                            samples=calibration_batch)
"""
