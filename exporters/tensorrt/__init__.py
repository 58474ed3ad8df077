"""ONNX -> TensorRT engine, by concern: what to build, building it, the trtexec line.

* :mod:`.plan`: the build a device profile asks for (shapes, precision, DLA, timing cache) and
  whether it is strongly typed; pure Python.
* :mod:`.trtexec`: the equivalent ``trtexec`` command line; pure Python.
* :mod:`.build`: the engine build with TensorRT's Python API, and the converted ONNX it reads.

Running an engine is the TensorRT backend's (:mod:`ats_deploy.backends.tensorrt`: the runner,
the plugin registration). The conversion to a reduced precision is not TensorRT's
(:mod:`ats_deploy.exporters.precisions`), nor is its CPU agreement check
(:func:`ats_deploy.exporters.validate.measure_conversion`). Everything that needs
TensorRT imports it through :func:`ats_deploy.backends.tensorrt.runner.import_tensorrt` when called,
so every module here imports on machines without a GPU.
"""
