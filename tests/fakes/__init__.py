"""Stand-ins for libraries that cannot be installed where the tests run (TensorRT, pycuda)."""
